"""The paper's LLM step, pluggable: a local language model judges how similar two element descriptions are.

AnyID scores each of the seven element pairs with an LLM (section 4.3, appendix A: Gemini 2.5 Pro) and drops
an element whose score exceeds 0.8. `LLMJudge` does the same with any transformers language model in a local
folder (a causal LM, or an encoder-decoder such as T5), loaded offline: nothing is downloaded. It asks for a
number between 0 and 1 and reads the first number of the answer; an answer without one in that range is a
`JudgeError` naming the answer, never a guess. Use it through `make_similarity("llm", model=FOLDER)`,
`[data] similarity = "llm"` with `similarity_model = FOLDER`, or `anyid-rt prompt ... --similarity llm
--judge-model FOLDER`; `anyid-rt prompt calibrate` measures its cut-off on labelled pairs.

The quality of the scores is the model's: a small model may answer badly; calibrate it before training on
its prompts.
"""
from __future__ import annotations

import re
from pathlib import Path

from .prompts import hub_offline

JUDGE_TEMPLATE = ("Two descriptions of the {element} of one person, seen in two videos, follow. Rate how similar "
                  "they are, from 0 (a different {element}) to 1 (the same {element}, perhaps worded differently). "
                  "Answer with the number only.\n"
                  "First: {a}\n"
                  "Second: {b}\n"
                  "Similarity:")
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d*)?|\.\d+)")


class JudgeError(ValueError):
    """The judge model's answer holds no similarity between 0 and 1."""


def parse_judge_score(answer: str) -> float:
    """The first number of an answer, which must lie in [0, 1] ("0.65", "Similarity: 1", ".9 - nearly the same")."""
    m = _NUMBER.search(answer)
    if m is None:
        raise JudgeError(f"the judge model answered {answer!r}: no number; it must answer a similarity between 0 "
                         "and 1 (a larger or instruction-tuned model, or another prompt template)")
    value = float(m.group(1))
    if not 0.0 <= value <= 1.0:
        raise JudgeError(f"the judge model answered {answer!r}: {m.group(1)} is not a similarity between 0 and 1")
    return value


class LLMJudge:
    """A similarity (a, b, element) -> [0, 1] answered by a local language model (greedy decoding, memoised).

    model_dir: a folder with a transformers config, weights and tokenizer. `template` is formatted with
    element, a and b; a tokenizer with a chat template gets it as one user message."""

    name = "llm"
    takes_element = True

    def __init__(self, model_dir: str | Path, device: str = "cpu", max_new_tokens: int = 8,
                 template: str = JUDGE_TEMPLATE):
        path = Path(model_dir)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"judge model {path}: not a model folder (a transformers folder with config.json, "
                             "weights and a tokenizer)")
        # imported before the offline scope: see prompts.hub_offline
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        with hub_offline():
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
            auto = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = auto.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device, self.max_new_tokens, self.template = device, max_new_tokens, template
        self.path = path
        self._memo: dict[tuple[str, str, str], float] = {}

    def prompt(self, a: str, b: str, element: str = "appearance") -> str:
        text = self.template.format(element=element, a=a.strip(), b=b.strip())
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def answer(self, a: str, b: str, element: str = "appearance") -> str:
        """The model's raw answer for one pair (greedy, at most max_new_tokens tokens)."""
        import torch

        batch = self.tokenizer(self.prompt(a, b, element), return_tensors="pt").to(self.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=pad)  # [1, L (+ prompt for a causal LM)]
        new = out[0] if self.encoder_decoder else out[0, batch["input_ids"].shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def __call__(self, a: str, b: str, element: str = "appearance") -> float:
        key = (element, a, b)
        if key not in self._memo:
            answer = self.answer(a, b, element)
            try:
                self._memo[key] = parse_judge_score(answer)
            except JudgeError as e:
                raise JudgeError(f"{self.path.name}, {element}: {e}") from None
        return self._memo[key]


__all__ = ["JUDGE_TEMPLATE", "JudgeError", "parse_judge_score", "LLMJudge"]
