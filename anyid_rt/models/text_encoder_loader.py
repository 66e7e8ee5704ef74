"""Loading the umT5 text encoder (`models/text_encoder.py`): file discovery, key maps, config, model build.

Layouts accepted by `load_umt5(path)` (and so by `TextEncoder.from_pretrained`):

* diffusers: a pipeline folder holding `text_encoder/` (config.json + model.safetensors, sharded safetensors with an
  index, or pytorch_model.bin) and `tokenizer/`; or the `text_encoder/` folder itself (the tokenizer is then taken
  from the sibling `tokenizer/` folder or from the same folder);
* original Wan: a folder holding `models_t5_umt5-xxl-enc-bf16.pth` and the tokenizer in `google/umt5-xxl/`, or the
  .pth file itself. Original key names are mapped to transformers names (`original_to_hf`, reference section 8.1);
* a bare weights file (.safetensors / .pth, either key layout), with `tokenizer_path` unless a tokenizer folder
  sits beside it.

Weights are read through `CheckpointReader`. Without a config.json the sizes are read off the tensor shapes. The
model is built on the meta device and the checkpoint tensors are assigned to it (`load_state_dict(assign=True)`),
converted one tensor at a time, so no second full-size copy is made (a .pth is memory-mapped; with a matching
dtype on the CPU the parameters stay mapped). Every weight is held in ONE dtype (the official numerics; see
`models/text_encoder.py`). Missing, unexpected or wrongly shaped keys raise a CheckpointError that names them.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..config import TextEncoderConfig
from ..request import ORIGINAL_TOKENIZER, ORIGINAL_VAE, TOKENIZER_FILES, has_tokenizer
from ..request import ORIGINAL_UMT5 as ORIGINAL_WEIGHTS
from .checkpoint import CheckpointError, CheckpointReader

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
_TIED = ("shared.weight", "encoder.embed_tokens.weight")  # one parameter under two names


def _original_to_hf_name(k: str) -> str:
    """The transformers name of an original-layout key; keys with no mapping keep their name (and are then
    reported as unexpected)."""
    m = _ORIG_BLOCK_RE.match(k)
    if k in _TOP_MAP:
        return _TOP_MAP[k]
    if m and m.group(2) in _BLOCK_MAP:
        return f"encoder.block.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
    return k


def _hf_to_original_name(k: str) -> str:
    m = _HF_BLOCK_RE.match(k)
    if k in _TOP_MAP_INV:
        return _TOP_MAP_INV[k]
    if k == "encoder.embed_tokens.weight":
        return "token_embedding.weight"
    if m and m.group(2) in _BLOCK_MAP_INV:
        return f"blocks.{m.group(1)}.{_BLOCK_MAP_INV[m.group(2)]}"
    return k


def original_to_hf(state: dict) -> dict:
    """Rename original Wan T5 keys to transformers names; keys with no mapping keep their name.
    `token_embedding` becomes `shared` (the encoder's embed_tokens is tied to it)."""
    return {_original_to_hf_name(k): v for k, v in state.items()}


def hf_to_original(state: dict) -> dict:
    """Inverse of `original_to_hf`; `encoder.embed_tokens.weight` (a tied copy of `shared`) is dropped."""
    out = {}
    for k, v in state.items():
        if k == "encoder.embed_tokens.weight":
            continue
        name = _hf_to_original_name(k)
        if name == k:
            raise KeyError(f"no original-layout name for {k!r}")
        out[name] = v
    return out


def _is_original_layout(keys) -> bool:
    return any(k == "token_embedding.weight" or k.startswith("blocks.") for k in keys)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

def umt5_config(cfg: TextEncoderConfig):
    """The transformers `UMT5Config` of a `TextEncoderConfig` (umT5: gated-gelu FFN, per-layer relative bias)."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.dim, d_kv=cfg.dim_kv, num_heads=cfg.num_heads, d_ff=cfg.dim_ffn,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers,
        relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_distance,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.1,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _config_from_hf(hf_cfg, base: TextEncoderConfig) -> TextEncoderConfig:
    if getattr(hf_cfg, "model_type", "umt5") not in ("umt5", "t5"):
        raise CheckpointError(f"text_encoder/config.json describes a {hf_cfg.model_type!r} model, expected umt5")
    return replace(base, vocab_size=hf_cfg.vocab_size, dim=hf_cfg.d_model, dim_kv=hf_cfg.d_kv,
                   num_heads=hf_cfg.num_heads, dim_ffn=hf_cfg.d_ff, num_layers=hf_cfg.num_layers,
                   num_buckets=hf_cfg.relative_attention_num_buckets,
                   max_distance=hf_cfg.relative_attention_max_distance)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], base: TextEncoderConfig | None = None,
                       show: Callable[[str], str] = str) -> TextEncoderConfig:
    """The encoder sizes from tensor shapes keyed by transformers names (max_distance and text_len from `base`:
    no tensor holds them). `show` renders a name in the error (e.g. with its original-layout name)."""
    base = base or TextEncoderConfig()

    def shape(k: str) -> tuple[int, ...]:
        if k not in shapes:
            raise CheckpointError(f"umT5 checkpoint is missing {show(k)}, needed to infer its sizes")
        return shapes[k]

    vocab, dim = shape("shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight")
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    dim_ffn = shape("encoder.block.0.layer.1.DenseReluDense.wi_1.weight")[0]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _HF_BLOCK_RE.match(k)))
    if inner % heads:
        raise CheckpointError(f"umT5 attention width {inner} is not a multiple of the {heads} heads of the "
                              "position bias")
    return replace(base, vocab_size=int(vocab), dim=int(dim), dim_kv=int(inner // heads), num_heads=int(heads),
                   dim_ffn=int(dim_ffn), num_layers=int(layers), num_buckets=int(buckets))


# ---------------------------------------------------------------------------------------------------------------
# Building the model from a checkpoint
# ---------------------------------------------------------------------------------------------------------------

def _build_model(cfg: TextEncoderConfig, reader: CheckpointReader, names: dict[str, str], dtype: torch.dtype,
                 device, show: Callable[[str], str], progress: bool = False):
    """Build UMT5EncoderModel on the meta device and assign the checkpoint's tensors to it. `names` maps each
    transformers name to the checkpoint key holding it; `show` renders a transformers name in errors."""
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(cfg))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = set(names)
    emb_key = next((k for k in _TIED if k in have), None)
    provided = have | (set(_TIED) if emb_key else set())
    missing = sorted(set(expected) - provided)
    unexpected = sorted(provided - set(expected))
    bad_shape = sorted(k for k in have & set(expected) if reader.shape(names[k]) != expected[k])
    if missing or unexpected or bad_shape:
        def fmt(xs):
            xs = [show(x) for x in xs]
            return ", ".join(xs[:20]) + (f" ... ({len(xs)} in all)" if len(xs) > 20 else "")
        parts = [f"umT5 checkpoint {reader.path} does not match the encoder built from its configuration"]
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if bad_shape:
            parts.append("shape mismatches: " + ", ".join(
                f"{show(k)} checkpoint {reader.shape(names[k])} vs model {expected[k]}" for k in bad_shape[:20]))
        raise CheckpointError("; ".join(parts))

    from tqdm.auto import tqdm

    device = torch.device(device)
    tensors = {}
    for k, ck in tqdm(list(names.items()), desc="loading umT5 text encoder", unit="tensor", disable=not progress):
        if k == "encoder.embed_tokens.weight" and emb_key == "shared.weight":
            continue  # tied duplicate; read `shared` only
        tensors["shared.weight" if k in _TIED else k] = reader.get(ck).to(device=device, dtype=dtype)
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.set_input_embeddings(model.shared)  # re-tie: one embedding parameter, not two
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:  # pragma: no cover - guards against a transformers change
            raise RuntimeError(f"umT5 tensor {n} was not loaded")
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Finding the files, and loading
# ---------------------------------------------------------------------------------------------------------------

def _is_text_encoder_config(path: Path) -> bool:
    """Whether a config.json describes a (u)mT5 model: the original Wan layout has the DiT's config.json there."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and (raw.get("model_type") in ("umt5", "t5", "mt5") or "d_model" in raw)


def _find_files(path: Path) -> tuple[Path, Path | None, list[Path]]:
    """(weights file or folder, folder with a transformers config.json or None, tokenizer folders to try)."""
    if not path.exists():
        raise FileNotFoundError(f"text encoder path {path} does not exist")
    if path.is_file():
        return path, None, [path.parent / ORIGINAL_TOKENIZER, path.parent / "tokenizer", path.parent,
                            path.parent.parent / "tokenizer"]
    if (path / "text_encoder").is_dir():
        return path / "text_encoder", path / "text_encoder", [path / "tokenizer"]
    if (path / ORIGINAL_WEIGHTS).is_file():
        return path / ORIGINAL_WEIGHTS, None, [path / ORIGINAL_TOKENIZER]
    if (path / "config.json").is_file() and _is_text_encoder_config(path / "config.json"):
        return path, path, [path.parent / "tokenizer", path]
    if (path / ORIGINAL_VAE).is_file() or (path / ORIGINAL_TOKENIZER).is_dir() or (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} looks like an original Wan2.2 folder but has no {ORIGINAL_WEIGHTS} (the "
                                f"umT5-XXL text encoder of that layout); put it in {path}")
    raise FileNotFoundError(
        f"no umT5 text encoder found in {path}: expected a diffusers pipeline folder (text_encoder/ + "
        f"tokenizer/), a text_encoder folder (config.json + weights), or an original Wan folder "
        f"({ORIGINAL_WEIGHTS} + {ORIGINAL_TOKENIZER}/)")


def load_umt5(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu", *,
              tokenizer_path: str | Path | None = None, text_len: int = 512, progress: bool = False):
    """(model, tokenizer, config) of the umT5 encoder at `path` (any layout above), weights in `dtype`
    (`progress`: a progress bar over the tensors)."""
    from transformers import AutoTokenizer, UMT5Config

    weights, hf_folder, tok_candidates = _find_files(Path(path))
    base = replace(TextEncoderConfig(), text_len=text_len)
    reader = CheckpointReader(weights, strip_prefixes=())
    original = _is_original_layout(reader.keys())
    to_hf = _original_to_hf_name if original else (lambda k: k)
    names = {to_hf(k): k for k in reader.keys()}  # transformers name -> checkpoint key

    def show(k: str) -> str:  # original-layout keys are shown as `original name (transformers name)`
        o = _hf_to_original_name(k) if original else k
        return k if o == k else f"{o} ({k})"

    if hf_folder is not None:
        cfg = _config_from_hf(UMT5Config.from_pretrained(str(hf_folder)), base)
    else:
        cfg = config_from_shapes({k: reader.shape(ck) for k, ck in names.items()}, base, show)

    if tokenizer_path is not None:
        tok_candidates = [Path(tokenizer_path)]
    tok_dir = next((p for p in tok_candidates if has_tokenizer(p)), None)
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer found (a folder with one of {', '.join(TOKENIZER_FILES)}); looked in "
                                + ", ".join(str(p) for p in tok_candidates) + " (pass tokenizer_path=)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return _build_model(cfg, reader, names, dtype, device, show, progress), tokenizer, cfg


__all__ = ["load_umt5", "original_to_hf", "hf_to_original", "config_from_shapes", "umt5_config",
           "ORIGINAL_WEIGHTS", "ORIGINAL_TOKENIZER"]
