"""umT5-XXL text encoder for Wan2.2 (transformers `UMT5EncoderModel` plus its tokenizer).

What it computes is the official Wan2.2 `T5EncoderModel.__call__` (reference §8.1):

1. clean every prompt (`clean_prompt`): `ftfy.fix_text`, `html.unescape` twice, strip, collapse whitespace runs to one
   space. ftfy is required (as in the official code, which imports it unconditionally); without it `encode` raises
   ImportError instead of silently cleaning differently.
2. tokenise with `padding="max_length"`, `max_length=text_len` (512), `truncation=True`, `add_special_tokens=True`
   (the umT5 tokenizer appends `</s>`; a truncated prompt keeps its `</s>` as the last of the 512 ids);
3. run the encoder on the ids with the attention mask (padding keys masked);
4. return, per prompt, the output trimmed to its real length (number of mask entries > 0, including `</s>`) as a
   tensor [L_i, dim]. diffusers' `WanPipeline._get_t5_prompt_embeds` does the same trim (and then zero-pads back,
   see `pad_embeddings`).

Output dtype: the model's dtype (bf16 for the released checkpoint, as in the official code) unless `encode(...,
dtype=)` asks for another; output device: the encoder's device unless `encode(..., device=)` asks for another, so
the encoder can stay on the CPU while the DiT runs on a GPU.

All weights are held in ONE dtype. transformers' own `from_pretrained` keeps the FFN output projection `wo` in fp32
(`_keep_in_fp32_modules`), which turns the residual stream into fp32 from the first layer on; the official Wan code
runs the whole encoder in bf16, so the loader here (`models/text_encoder_loader.py`, which also lists the accepted
checkpoint layouts) builds the model itself and follows the official numerics.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..cache import CacheInfo, LRUCache
from ..config import TextEncoderConfig, parse_dtype
from .text_encoder_loader import ORIGINAL_TOKENIZER, ORIGINAL_WEIGHTS, hf_to_original, load_umt5

def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the text encoder needs transformers and tokenizers: pip install 'anyid_rt[text]'") from e
    return transformers


# ---------------------------------------------------------------------------------------------------------------
# Prompt cleaning (official `HuggingfaceTokenizer._clean` with clean='whitespace')
# ---------------------------------------------------------------------------------------------------------------

def clean_prompt(text: str) -> str:
    """Official Wan prompt cleaning: ftfy.fix_text, html.unescape twice, strip, whitespace runs -> one space."""
    try:
        import ftfy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("prompt cleaning follows the official Wan code and needs ftfy: pip install ftfy "
                          "(or pip install 'anyid_rt[text]')") from e
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    return re.sub(r"\s+", " ", text).strip()


def _validate_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if len(prompts) == 0:
            raise ValueError("no prompts given (an empty list); pass a str or a non-empty list of str "
                             "(use '' for the unconditional prompt)")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt [{i}] must be a str, got {type(p).__name__} ({p!r:.60})")
        return list(prompts)
    raise TypeError(f"prompt must be a str or a list of str, got {type(prompts).__name__} ({prompts!r:.60})")


# ---------------------------------------------------------------------------------------------------------------
# Tiny offline tokenizer
# ---------------------------------------------------------------------------------------------------------------

_TINY_WORDS = """
a an the and or of in on at to with without from by for into over under near behind front left right up down
is are was be being very slowly quickly gently softly while as it its this that his her their he she they person
man woman boy girl child people face head hair eyes mouth smile smiles smiling laugh laughs laughing frown look
looks looking turn turns turning walk walks walking run runs running sit sits sitting stand stands standing dance
dances dancing talk talks talking wave waves waving nod nods nodding speak speaks camera shot close closeup medium
wide full body portrait upper background street city park room office kitchen beach forest mountain sky sea river
road garden studio stage night day morning evening sunset sunrise light lights dark bright soft warm cold rain snow
sun wind red orange yellow green blue purple pink brown black white gray grey gold silver long short curly straight
wavy blond blonde ponytail bun braid bald beard shirt t-shirt jacket coat dress suit tie hat cap glasses sunglasses
earrings necklace scarf sweater hoodie jeans skirt uniform helmet spacesuit astronaut flag space suit happy sad
angry surprised calm serious neutral expression action shows wearing wears holding holds cup phone book bag
umbrella flower flowers tree trees car bus train window door table chair desk wall floor grass water cloud clouds
snowy sunny rainy indoor outdoor cinematic realistic high quality detailed sharp blurry static video frame frames
motion moving still one two three first second then again around toward away back side view profile looking
at the camera, . ! ? ; : ' " - ( ) 0 1 2 3 4 5 6 7 8 9
"""


def tiny_tokenizer(vocab_size: int = 512):
    """A small offline umT5-like tokenizer: WordLevel over a fixed English word list, lower-casing, whitespace /
    punctuation pre-tokenizer, `<pad>`=0, `</s>`=1 (appended by the post-processor), `<unk>`=2."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _TINY_WORDS.split():
        if w not in vocab and len(vocab) < vocab_size:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, padding_side="right")


# ---------------------------------------------------------------------------------------------------------------
# TextEncoder
# ---------------------------------------------------------------------------------------------------------------

class TextEncoder(nn.Module):
    """umT5 encoder + tokenizer with the official cleaning/trimming and an LRU cache of prompt embeddings.

    Args:
        model: a transformers `UMT5EncoderModel` (eval mode, weights in one dtype).
        tokenizer: the matching tokenizer (appends `</s>`).
        config: the `TextEncoderConfig` describing `model` (its `text_len` is the tokenizer max_length).
        cache_size: how many prompt embeddings to keep (least recently used are evicted); 0 disables the cache.
        full_length: True (default) runs the encoder on all `text_len` positions as the official code does;
            False runs it only up to the longest real length in the batch. Masked padding keys get exactly zero
            attention weight, so the trimmed outputs are the same up to float rounding, at a fraction of the cost
            (useful for a CPU-resident encoder).
        batch_size: prompts encoded per forward.
    """

    def __init__(self, model: nn.Module, tokenizer, config: TextEncoderConfig, *, cache_size: int = 64,
                 full_length: bool = True, batch_size: int = 8):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.full_length = bool(full_length)
        self.batch_size = batch_size
        self._cache: LRUCache[str, torch.Tensor] = LRUCache(cache_size)  # cleaned prompt -> [L, dim]

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = torch.bfloat16,
                        device: str | torch.device = "cpu", *, tokenizer_path: str | Path | None = None,
                        text_len: int = 512, progress: bool = False, **kwargs) -> "TextEncoder":
        """Load from a diffusers pipeline folder, its `text_encoder/` folder, an original Wan folder, or a weights
        file (.pth / .safetensors, either key layout; then pass `tokenizer_path` unless a `google/umt5-xxl/` or
        `tokenizer/` folder sits beside it). `progress` shows a progress bar while loading. Extra keyword
        arguments go to the constructor (cache_size, ...)."""
        _require_transformers()
        model, tokenizer, cfg = load_umt5(path, parse_dtype(dtype, "text encoder dtype"), device,
                                          tokenizer_path=tokenizer_path, text_len=text_len, progress=progress)
        return cls(model, tokenizer, cfg, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
             **kwargs) -> "TextEncoder":
        """A random tiny umT5 (`TextEncoderConfig.preset('tiny')`) with an offline WordLevel tokenizer."""
        _require_transformers()
        from .random_weights import random_umt5

        cfg = TextEncoderConfig.preset("tiny")
        model = random_umt5(cfg, dtype=parse_dtype(dtype, "text encoder dtype"), device=device, seed=seed)
        return cls(model, tiny_tokenizer(cfg.vocab_size), cfg, **kwargs)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the diffusers layout: `folder/text_encoder/` (config.json + model.safetensors) and
        `folder/tokenizer/`. Returns `folder`."""
        folder = Path(folder)
        (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(folder / "text_encoder"))
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        return folder

    def save_original(self, folder: str | Path) -> Path:
        """Write the original Wan layout: `folder/models_t5_umt5-xxl-enc-bf16.pth` (original key names, in the
        model's current dtype whatever the file name says) and the tokenizer in `folder/google/umt5-xxl/`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = hf_to_original({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()})
        torch.save(sd, folder / ORIGINAL_WEIGHTS)
        self.tokenizer.save_pretrained(str(folder / ORIGINAL_TOKENIZER))
        return folder

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def text_len(self) -> int:
        return self.config.text_len

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw encoder: ids [B, L], mask [B, L] -> hidden states [B, L, dim] (no trimming)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def tokenize(self, prompts: str | Sequence[str], clean: bool = True):
        """Official tokenisation of (cleaned) prompts: returns (input_ids [B, text_len], attention_mask)."""
        texts = _validate_prompts(prompts)
        if clean:
            texts = [clean_prompt(t) for t in texts]
        out = self.tokenizer(texts, padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def _encode_batch(self, cleaned: list[str]) -> list[torch.Tensor]:
        ids, mask = self.tokenize(cleaned, clean=False)
        lens = mask.gt(0).sum(dim=1).tolist()
        if not self.full_length:
            n = max(1, max(lens))
            ids, mask = ids[:, :n], mask[:, :n]
        dev = self.device
        hidden = self.forward(ids.to(dev), mask.to(dev))
        # clone: a view would keep the whole [B, text_len, dim] batch alive in the cache
        return [hidden[i, :n].clone() for i, n in enumerate(lens)]

    def encode(self, prompts: str | Sequence[str], *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Per prompt, the encoder output trimmed to the real token count (incl. `</s>`): [L_i, dim].

        Returned in `dtype` (default: the model's dtype) on `device` (default: the encoder's device). The empty
        string is allowed (the unconditional prompt; it encodes to `</s>` alone, L = 1). Repeated prompts
        (after cleaning) are served from the LRU cache; a prompt repeated within one call is encoded (and
        counted) once. Returned tensors are copies, never cache storage."""
        texts = _validate_prompts(prompts)
        cleaned = [clean_prompt(t) for t in texts]
        found: dict[str, torch.Tensor] = {}
        todo: list[str] = []
        for c in dict.fromkeys(cleaned):  # distinct prompts, in order
            e = self._cache.get(c)
            if e is None:
                todo.append(c)
            else:
                found[c] = e
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            for c, e in zip(chunk, self._encode_batch(chunk)):
                found[c] = e
                self._cache.put(c, e)
        out = []
        device = torch.device(device) if device is not None else self.device
        for c in cleaned:
            e = found[c]
            r = e.to(device=device, dtype=dtype or self.dtype)
            out.append(r.clone() if r.data_ptr() == e.data_ptr() else r)
        return out

    # -- cache ----------------------------------------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        return self._cache.info()

    def clear_cache(self) -> None:
        """Drop every cached embedding and reset the hit/miss counters."""
        self._cache.clear()


def pad_embeddings(embeddings: Sequence[torch.Tensor], length: int = 512) -> torch.Tensor:
    """Zero-pad trimmed embeddings [L_i, dim] to one [B, length, dim] tensor (what the DiT and diffusers'
    `_get_t5_prompt_embeds` use). Raises if an embedding is longer than `length`."""
    if not embeddings:
        raise ValueError("no embeddings to pad")
    dim = embeddings[0].shape[-1]
    out = embeddings[0].new_zeros(len(embeddings), length, dim)
    for i, e in enumerate(embeddings):
        if e.ndim != 2 or e.shape[-1] != dim:
            raise ValueError(f"embedding {i} has shape {tuple(e.shape)}, expected [L, {dim}]")
        if e.shape[0] > length:
            raise ValueError(f"embedding {i} has {e.shape[0]} rows, more than length={length}")
        out[i, :e.shape[0]] = e
    return out


# -- helpers used by from_pretrained ------------------------------------------------------------------------


__all__ = ["TextEncoder", "CacheInfo", "clean_prompt", "pad_embeddings", "tiny_tokenizer"]
