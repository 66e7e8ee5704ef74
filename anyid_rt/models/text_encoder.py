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
runs the whole encoder in bf16, so both loaders here build the model themselves and follow the official numerics.

Checkpoint layouts accepted by `TextEncoder.from_pretrained(path)`:

* diffusers: a pipeline folder holding `text_encoder/` (config.json + model.safetensors, sharded safetensors with an
  index, or pytorch_model.bin) and `tokenizer/`; or the `text_encoder/` folder itself (the tokenizer is then taken
  from the sibling `tokenizer/` folder or from the same folder);
* original Wan: a folder holding `models_t5_umt5-xxl-enc-bf16.pth` and the tokenizer in `google/umt5-xxl/`, or the
  .pth file itself. Original key names are mapped to transformers names (`original_to_hf`) and the configuration is
  derived from the tensor shapes.

The model is built on the meta device and the checkpoint tensors are assigned to it (`load_state_dict(assign=True)`),
converted one tensor at a time, so no second full-size copy is made (a .pth is memory-mapped; with matching dtype on
the CPU the parameters stay mapped). Missing, unexpected or wrongly shaped keys raise a ValueError that names them.
"""
from __future__ import annotations

import html
import json
import re
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import nn

from ..config import TextEncoderConfig

ORIGINAL_WEIGHTS = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"text encoder dtype must be bf16, fp16 or fp32, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype or one of {sorted(_DTYPES)}")


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
# Key mapping, original Wan T5 <-> transformers UMT5EncoderModel
# ---------------------------------------------------------------------------------------------------------------

_BLOCK_MAP = {
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm1.weight": "layer.0.layer_norm.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_MAP_INV = {v: k for k, v in _BLOCK_MAP.items()}
_TOP_MAP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_TOP_MAP_INV = {v: k for k, v in _TOP_MAP.items()}
_ORIG_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def original_to_hf(state: dict) -> dict:
    """Rename original Wan T5 keys to transformers names; keys with no mapping keep their name (and will be
    reported as unexpected). `token_embedding` becomes `shared` (the encoder's embed_tokens is tied to it)."""
    names = _original_name_map(state.keys())
    return {names[k]: v for k, v in state.items()}


def hf_to_original(state: dict) -> dict:
    """Inverse of `original_to_hf`; `encoder.embed_tokens.weight` (a tied copy of `shared`) is dropped."""
    out = {}
    for k, v in state.items():
        m = _HF_BLOCK_RE.match(k)
        if k == "encoder.embed_tokens.weight":
            continue
        if k in _TOP_MAP_INV:
            out[_TOP_MAP_INV[k]] = v
        elif m and m.group(2) in _BLOCK_MAP_INV:
            out[f"blocks.{m.group(1)}.{_BLOCK_MAP_INV[m.group(2)]}"] = v
        else:
            raise KeyError(f"no original-layout name for {k!r}")
    return out


def _hf_to_original_name(k: str) -> str:
    m = _HF_BLOCK_RE.match(k)
    if k in _TOP_MAP_INV:
        return _TOP_MAP_INV[k]
    if k == "encoder.embed_tokens.weight":
        return "token_embedding.weight"
    if m and m.group(2) in _BLOCK_MAP_INV:
        return f"blocks.{m.group(1)}.{_BLOCK_MAP_INV[m.group(2)]}"
    return k


def _is_original_layout(keys) -> bool:
    return any(k == "token_embedding.weight" or k.startswith("blocks.") for k in keys)


def config_from_original(state: dict, base: TextEncoderConfig | None = None) -> TextEncoderConfig:
    """Derive the encoder sizes from original-layout tensor shapes (max_distance and text_len from `base`)."""
    base = base or TextEncoderConfig()
    need = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
            "blocks.0.pos_embedding.embedding.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"original-layout umT5 checkpoint is missing keys needed to infer its sizes: {missing}")
    vocab, dim = _shape(state, "token_embedding.weight")
    buckets, heads = _shape(state, "blocks.0.pos_embedding.embedding.weight")
    inner = _shape(state, "blocks.0.attn.q.weight")[0]
    dim_ffn = _shape(state, "blocks.0.ffn.fc1.weight")[0]
    layers = 1 + max(int(m.group(1)) for k in state.keys() if (m := _ORIG_BLOCK_RE.match(k)))
    if inner % heads:
        raise ValueError(f"attention width {inner} is not a multiple of the {heads} heads of the position bias")
    return replace(base, vocab_size=int(vocab), dim=int(dim), dim_kv=int(inner // heads), num_heads=int(heads),
                   dim_ffn=int(dim_ffn), num_layers=int(layers), num_buckets=int(buckets))


def umt5_config(cfg: TextEncoderConfig):
    """The transformers `UMT5Config` of a `TextEncoderConfig` (umT5: gated-gelu FFN, per-layer relative bias)."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim_kv, num_heads=cfg.num_heads, d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers,
        relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_distance,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.1,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _config_from_hf(hf_cfg, base: TextEncoderConfig | None = None) -> TextEncoderConfig:
    base = base or TextEncoderConfig()
    if getattr(hf_cfg, "model_type", "umt5") not in ("umt5", "t5"):
        raise ValueError(f"text_encoder/config.json describes a {hf_cfg.model_type!r} model, expected umt5")
    return replace(base, vocab_size=hf_cfg.vocab_size, dim=hf_cfg.d_model, dim_kv=hf_cfg.d_kv,
                   num_heads=hf_cfg.num_heads, dim_ffn=hf_cfg.d_ff, num_layers=hf_cfg.num_layers,
                   num_buckets=hf_cfg.relative_attention_num_buckets,
                   max_distance=hf_cfg.relative_attention_max_distance)


# ---------------------------------------------------------------------------------------------------------------
# Reading checkpoint files
# ---------------------------------------------------------------------------------------------------------------

def _read_pth(path: Path) -> dict:
    sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


class _LazySafetensors:
    """name -> tensor, read on access from one or more safetensors files (tensors are read and converted one at a
    time, never all at once). `renamed(fn)` gives a view with new names for the same tensors."""

    def __init__(self, files: list[Path] | None = None):
        from safetensors import safe_open

        self._where: dict[str, tuple] = {}
        for f in files or []:
            h = safe_open(str(f), framework="pt", device="cpu")
            for k in h.keys():
                self._where[k] = (h, k)

    def keys(self):
        return self._where.keys()

    def __contains__(self, k):
        return k in self._where

    def __len__(self):
        return len(self._where)

    def __getitem__(self, k):
        h, name = self._where[k]
        return h.get_tensor(name)

    def shape(self, k) -> tuple:
        h, name = self._where[k]
        return tuple(h.get_slice(name).get_shape())

    def renamed(self, mapping: dict) -> "_LazySafetensors":
        out = _LazySafetensors()
        out._where = {mapping.get(k, k): v for k, v in self._where.items()}
        return out


def _read_hf_weights(folder: Path):
    idx = folder / "model.safetensors.index.json"
    if idx.is_file():
        files = sorted({folder / f for f in json.loads(idx.read_text())["weight_map"].values()})
        return _LazySafetensors(files)
    if (folder / "model.safetensors").is_file():
        return _LazySafetensors([folder / "model.safetensors"])
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return _LazySafetensors(shards)
    if (folder / "pytorch_model.bin").is_file():
        return _read_pth(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"no weights in {folder}: looked for model.safetensors, model.safetensors.index.json, "
                            f"model-*-of-*.safetensors and pytorch_model.bin")


def _shape(sd, k) -> tuple:
    return sd.shape(k) if isinstance(sd, _LazySafetensors) else tuple(sd[k].shape)


def _original_name_map(keys) -> dict:
    """old name -> transformers name for every key of an original-layout checkpoint (unmapped keys kept)."""
    out = {}
    for k in keys:
        m = _ORIG_BLOCK_RE.match(k)
        if k in _TOP_MAP:
            out[k] = _TOP_MAP[k]
        elif m and m.group(2) in _BLOCK_MAP:
            out[k] = f"encoder.block.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
        else:
            out[k] = k
    return out


def _build_model(cfg: TextEncoderConfig, state, dtype: torch.dtype, device, source: str,
                 original_names: bool = False):
    """Build UMT5EncoderModel on the meta device and assign `state` (transformers names) to it. With
    `original_names`, keys in error messages are shown as `original name (transformers name)`."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(cfg))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = list(state.keys())
    have = set(names)
    tied = ("shared.weight", "encoder.embed_tokens.weight")
    emb_key = next((k for k in tied if k in have), None)
    provided = have | (set(tied) if emb_key else set())
    missing = sorted(set(expected) - provided)
    unexpected = sorted(provided - set(expected))
    bad_shape = sorted(k for k in have & set(expected) if _shape(state, k) != expected[k])
    if missing or unexpected or bad_shape:
        inv = _hf_to_original_name if original_names else (lambda k: k)

        def show(k):
            o = inv(k)
            return k if o == k else f"{o} ({k})"

        def fmt(xs):
            xs = [show(x) for x in xs]
            return ", ".join(xs[:20]) + (f" ... ({len(xs)} in all)" if len(xs) > 20 else "")
        parts = [f"umT5 checkpoint {source} does not match the encoder built from its configuration"]
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if bad_shape:
            parts.append("shape mismatches: " + ", ".join(
                f"{show(k)} checkpoint {_shape(state, k)} vs model {expected[k]}" for k in bad_shape[:20]))
        raise ValueError("; ".join(parts))

    device = torch.device(device)
    tensors = {}
    for k in names:
        if k == "encoder.embed_tokens.weight" and emb_key == "shared.weight":
            continue  # tied duplicate; read `shared` only
        t = state[k]
        tensors["shared.weight" if k in tied else k] = t.to(device=device, dtype=dtype)
        del t
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.set_input_embeddings(model.shared)  # re-tie: one embedding parameter, not two
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:  # pragma: no cover - guards against a transformers change
            raise RuntimeError(f"umT5 tensor {n} was not loaded")
    model.requires_grad_(False)
    return model.eval()


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

class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


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
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.full_length = bool(full_length)
        self.batch_size = batch_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._hits = 0
        self._misses = 0

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = torch.bfloat16,
                        device: str | torch.device = "cpu", *, tokenizer_path: str | Path | None = None,
                        text_len: int = 512, **kwargs) -> "TextEncoder":
        """Load from a diffusers pipeline folder, its `text_encoder/` folder, an original Wan folder, or a weights
        file (.pth / .safetensors, either key layout; then pass `tokenizer_path` unless a `google/umt5-xxl/` or
        `tokenizer/` folder sits beside it). Extra keyword arguments go to the constructor (cache_size, ...)."""
        _require_transformers()
        from transformers import AutoTokenizer, UMT5Config

        dtype = _resolve_dtype(dtype)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"text encoder path {path} does not exist")
        base = replace(TextEncoderConfig(), text_len=text_len)
        tok_candidates: list[Path] = []
        if path.is_file():
            weights_file = path
            state = (_LazySafetensors([path]) if path.suffix == ".safetensors" else _read_pth(path))
            tok_candidates = [path.parent / ORIGINAL_TOKENIZER, path.parent / "tokenizer", path.parent,
                              path.parent.parent / "tokenizer"]
            cfg = None
        elif (path / "text_encoder").is_dir():
            weights_file = path / "text_encoder"
            state = _read_hf_weights(weights_file)
            cfg = _config_from_hf(UMT5Config.from_pretrained(str(weights_file)), base)
            tok_candidates = [path / "tokenizer"]
        elif (path / ORIGINAL_WEIGHTS).is_file():
            weights_file = path / ORIGINAL_WEIGHTS
            state = _read_pth(weights_file)
            cfg = None
            tok_candidates = [path / ORIGINAL_TOKENIZER]
        elif (path / "config.json").is_file():
            weights_file = path
            state = _read_hf_weights(path)
            cfg = _config_from_hf(UMT5Config.from_pretrained(str(path)), base)
            tok_candidates = [path.parent / "tokenizer", path]
        else:
            raise FileNotFoundError(
                f"no umT5 text encoder found in {path}: expected a diffusers pipeline folder (text_encoder/ + "
                f"tokenizer/), a text_encoder folder (config.json + weights), or an original Wan folder "
                f"({ORIGINAL_WEIGHTS} + {ORIGINAL_TOKENIZER}/)")

        original = _is_original_layout(state.keys())
        if original:
            cfg = cfg or config_from_original(state, base)
            names = _original_name_map(state.keys())
            state = state.renamed(names) if isinstance(state, _LazySafetensors) else original_to_hf(state)
        elif cfg is None:
            cfg = _config_from_hf_state(state, base)

        if tokenizer_path is not None:
            tok_candidates = [Path(tokenizer_path)]
        tok_dir = next((p for p in tok_candidates if _has_tokenizer(p)), None)
        if tok_dir is None:
            raise FileNotFoundError("no tokenizer found; looked in " + ", ".join(str(p) for p in tok_candidates)
                                    + " (pass tokenizer_path=)")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model = _build_model(cfg, state, dtype, device, str(weights_file), original_names=original)
        return cls(model, tokenizer, cfg, **kwargs)

    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
             **kwargs) -> "TextEncoder":
        """A random tiny umT5 (`TextEncoderConfig.preset('tiny')`) with an offline WordLevel tokenizer."""
        _require_transformers()
        from .random_weights import random_umt5

        cfg = TextEncoderConfig.preset("tiny")
        model = random_umt5(cfg, dtype=_resolve_dtype(dtype), device=device, seed=seed)
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
        (after cleaning) are served from the LRU cache; returned tensors are copies, never cache storage."""
        texts = _validate_prompts(prompts)
        cleaned = [clean_prompt(t) for t in texts]
        found: dict[str, torch.Tensor] = {}
        todo: list[str] = []
        for c in cleaned:
            if c in found or c in todo:
                self._hits += 1
            elif c in self._cache:
                self._cache.move_to_end(c)
                found[c] = self._cache[c]
                self._hits += 1
            else:
                todo.append(c)
                self._misses += 1
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            for c, e in zip(chunk, self._encode_batch(chunk)):
                found[c] = e
                if self._cache_size:
                    self._cache[c] = e
                    self._cache.move_to_end(c)
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        out = []
        device = torch.device(device) if device is not None else self.device
        for c in cleaned:
            e = found[c]
            r = e.to(device=device, dtype=dtype or self.dtype)
            out.append(r.clone() if r.data_ptr() == e.data_ptr() else r)
        return out

    # -- cache ----------------------------------------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, self._cache_size, len(self._cache))

    def clear_cache(self) -> None:
        """Drop every cached embedding and reset the hit/miss counters."""
        self._cache.clear()
        self._hits = self._misses = 0

    def set_cache_size(self, size: int) -> None:
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"cache size must be an int >= 0, got {size!r}")
        self._cache_size = size
        while len(self._cache) > size:
            self._cache.popitem(last=False)


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

def _has_tokenizer(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def _config_from_hf_state(state, base: TextEncoderConfig) -> TextEncoderConfig:
    """Sizes from a transformers-named state dict without config.json (a bare .safetensors / .pth file)."""
    def shape(k):
        if k not in state:
            raise ValueError(f"umT5 checkpoint is missing {k!r}, needed to infer its sizes")
        return _shape(state, k)

    emb = "shared.weight" if "shared.weight" in state else "encoder.embed_tokens.weight"
    vocab, dim = shape(emb)
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    dim_ffn = shape("encoder.block.0.layer.1.DenseReluDense.wi_1.weight")[0]
    layers = 1 + max(int(m.group(1)) for k in state.keys() if (m := _HF_BLOCK_RE.match(k)))
    return replace(base, vocab_size=vocab, dim=dim, dim_kv=inner // heads, num_heads=heads, dim_ffn=dim_ffn,
                   num_layers=layers, num_buckets=buckets)


__all__ = ["TextEncoder", "CacheInfo", "clean_prompt", "pad_embeddings", "original_to_hf", "hf_to_original",
           "config_from_original", "umt5_config", "tiny_tokenizer", "ORIGINAL_WEIGHTS", "ORIGINAL_TOKENIZER"]
