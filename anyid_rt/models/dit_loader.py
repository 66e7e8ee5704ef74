"""`load_dit`: the Wan DiT from the original layout, the diffusers layout or a single-file repack.

The layout is detected from key names (original: `head.head.weight`, `blocks.0.self_attn.q.weight`;
diffusers: `proj_out.weight`, `blocks.0.attn1.to_q.weight`); diffusers names are mapped to the original ones
at load time. The config comes from `config.json` when present and is checked against the tensor shapes;
without one it is read off the shapes (head_dim 128, as in every released Wan DiT).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import DiTConfig, parse_dtype
from ..kernels import resolve_backend
from .checkpoint import SINGLE_FILE_PREFIXES, CheckpointError, CheckpointReader, describe_keys, load_into
from .dit import WanDiT

WAN_HEAD_DIM = 128

# original <-> diffusers key renames (reference section 10.2), one table for both directions: "{n}" is a
# block index, "{x}" a single letter (q, k, v). Names not listed (patch_embedding, ...) are the same.
_RENAMES = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation$", "scale_shift_table$"),
    ("head.head.", "proj_out."),
    ("blocks.{n}.modulation$", "blocks.{n}.scale_shift_table$"),
    ("blocks.{n}.self_attn.o.", "blocks.{n}.attn1.to_out.0."),
    ("blocks.{n}.cross_attn.o.", "blocks.{n}.attn2.to_out.0."),
    ("blocks.{n}.self_attn.{x}.", "blocks.{n}.attn1.to_{x}."),
    ("blocks.{n}.cross_attn.{x}.", "blocks.{n}.attn2.to_{x}."),
    ("blocks.{n}.self_attn.norm_{x}.", "blocks.{n}.attn1.norm_{x}."),
    ("blocks.{n}.cross_attn.norm_{x}.", "blocks.{n}.attn2.norm_{x}."),
    ("blocks.{n}.norm3.", "blocks.{n}.norm2."),  # diffusers' norm2 is the affine cross-attn norm
    ("blocks.{n}.ffn.0.", "blocks.{n}.ffn.net.0.proj."),
    ("blocks.{n}.ffn.2.", "blocks.{n}.ffn.net.2."),
]


def _pattern(template: str) -> str:
    anchored_end = template.endswith("$")
    body = re.escape(template.rstrip("$")).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{x\}", r"(?P<x>[qkv])")
    return "^" + body + ("$" if anchored_end else "")


def _replacement(template: str) -> str:
    return template.rstrip("$").replace("{n}", r"\g<n>").replace("{x}", r"\g<x>")


_ORIGINAL_TO_DIFFUSERS = [(_pattern(o), _replacement(d)) for o, d in _RENAMES]
_DIFFUSERS_TO_ORIGINAL = [(_pattern(d), _replacement(o)) for o, d in _RENAMES]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def diffusers_to_original(key: str) -> str:
    return _rename(key, _DIFFUSERS_TO_ORIGINAL)


def original_to_diffusers(key: str) -> str:
    return _rename(key, _ORIGINAL_TO_DIFFUSERS)


def detect_layout(keys, where: str | Path | None = None) -> str:
    """'original' or 'diffusers' from the key names; a CheckpointError naming the file (`where`) and saying what
    it looks like otherwise (e.g. the VAE, picked up from a folder that holds no DiT weights)."""
    keys = set(keys)
    if "head.head.weight" in keys or "blocks.0.self_attn.q.weight" in keys:
        return "original"
    if "proj_out.weight" in keys or "blocks.0.attn1.to_q.weight" in keys:
        return "diffusers"
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointError(f"{where or 'checkpoint'}: not a Wan DiT checkpoint: it looks like {describe_keys(keys)} "
                          f"(keys like {sample}); expected 'head.head.weight' (original layout) or 'proj_out.weight' "
                          "(diffusers layout)")


def _resolve_path(path: Path) -> Path:
    if path.is_dir() and (path / "transformer").is_dir():  # a diffusers pipeline folder
        return path / "transformer"
    return path


def _config_from_json(cfg_path: Path, layout: str) -> dict:
    raw = json.loads(cfg_path.read_text())
    if layout == "diffusers" or "num_attention_heads" in raw:
        heads, head_dim = raw["num_attention_heads"], raw["attention_head_dim"]
        if raw.get("image_dim") or raw.get("added_kv_proj_dim"):
            raise CheckpointError(f"{cfg_path}: this DiT has an image (CLIP) branch (Wan2.1 I2V); anyid_rt runs "
                                  "the Wan2.2 DiTs without one")
        return dict(dim=heads * head_dim, num_heads=heads, ffn_dim=raw["ffn_dim"], freq_dim=raw["freq_dim"],
                    num_layers=raw["num_layers"], in_dim=raw["in_channels"], out_dim=raw["out_channels"],
                    text_dim=raw["text_dim"], eps=raw.get("eps", 1e-6), patch_size=tuple(raw["patch_size"]),
                    rope_max_positions=raw.get("rope_max_seq_len", 1024))
    out = {k: raw[k] for k in ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim",
                               "text_len", "text_dim", "eps") if k in raw}
    if "patch_size" in raw:
        out["patch_size"] = tuple(raw["patch_size"])
    if raw.get("model_type") in ("i2v", "flf2v", "vace"):
        raise CheckpointError(f"{cfg_path}: model_type {raw['model_type']!r} is not supported; anyid_rt runs "
                              "ti2v / t2v Wan DiTs")
    return out


def _shape_fields(reader: CheckpointReader, to_orig) -> dict:
    """Every config field that the tensor shapes determine (all but num_heads)."""
    shape = {to_orig(k): reader.shape(k) for k in reader.keys()}
    need = ["patch_embedding.weight", "blocks.0.ffn.0.weight", "text_embedding.0.weight",
            "time_embedding.0.weight", "head.head.weight"]
    missing = [k for k in need if k not in shape]
    if missing:
        raise CheckpointError(f"{reader.path}: cannot read the DiT config off the tensors, missing {missing}")
    dim, in_dim, pt, ph, pw = shape["patch_embedding.weight"]
    layers = 1 + max(int(m.group(1)) for k in shape if (m := re.match(r"blocks\.(\d+)\.", k)))
    return dict(dim=dim, in_dim=in_dim, patch_size=(pt, ph, pw),
                ffn_dim=shape["blocks.0.ffn.0.weight"][0], text_dim=shape["text_embedding.0.weight"][1],
                freq_dim=shape["time_embedding.0.weight"][1], num_layers=layers,
                out_dim=shape["head.head.weight"][0] // (pt * ph * pw))


def _config_from_shapes(reader: CheckpointReader, to_orig) -> dict:
    fields = _shape_fields(reader, to_orig)
    if fields["dim"] % WAN_HEAD_DIM:
        raise CheckpointError(f"{reader.path}: dim {fields['dim']} is not a multiple of Wan's head_dim "
                              f"{WAN_HEAD_DIM} and there is no config.json; pass config= (a DiTConfig)")
    return dict(fields, num_heads=fields["dim"] // WAN_HEAD_DIM)


def _check_config_against_shapes(cfg: DiTConfig, reader: CheckpointReader, to_orig, path: Path) -> None:
    got = _shape_fields(reader, to_orig)
    bad = [f"{k}: config {getattr(cfg, k)} vs tensors {v}" for k, v in got.items() if getattr(cfg, k) != v]
    if bad:
        raise CheckpointError(f"{path}: config does not match the tensor shapes (a checkpoint of another model?): "
                              + "; ".join(bad))


# Small layers whose maths Wan runs in fp32; keeping their weights fp32 costs ~40 MB at 5B.
def keep_fp32(name: str) -> bool:
    return (name.startswith(("time_embedding.", "time_projection.", "head.")) or name.endswith(".modulation")
            or ".norm_q." in name or ".norm_k." in name or ".norm3." in name)


def _open(path: str | Path):
    path = _resolve_path(Path(path))
    # `model.`: the prefix of a DiT saved from a training wrapper's state dict (Wan2.2-TI2V-5B-Turbo's model.pt)
    reader = CheckpointReader(path, strip_prefixes=SINGLE_FILE_PREFIXES + ("model.",))
    layout = detect_layout(reader.keys(), reader.file)
    return path, reader, (diffusers_to_original if layout == "diffusers" else (lambda k: k)), layout


def _read_config(path: Path, reader: CheckpointReader, to_orig, layout: str) -> DiTConfig:
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    fields = _config_from_json(cfg_path, layout) if cfg_path.exists() else _config_from_shapes(reader, to_orig)
    try:
        config = DiTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid DiT config {fields}: {e}") from e
    _check_config_against_shapes(config, reader, to_orig, path)
    return config


def read_dit_config(path: str | Path) -> DiTConfig:
    """The config of the DiT at `path` (config.json, checked against the tensor shapes, or the shapes alone)
    without reading any weight: what the engine checks LoRA files against before loading."""
    path, reader, to_orig, layout = _open(path)
    return _read_config(path, reader, to_orig, layout)


def load_dit(path: str | Path, dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str = "cpu",
             backend: str = "auto", config: DiTConfig | None = None,
             attention_quant: str | None = None, progress: bool = False) -> WanDiT:
    """Load a Wan DiT from a file or folder in the original, diffusers or single-file layout.

    Weights are read one tensor at a time (safetensors mmap), cast to `dtype` (norms, modulation, time
    embedding and head stay fp32) and placed on `device`; no second full-size copy is held. `progress`
    shows a progress bar.
    """
    dtype = parse_dtype(dtype)
    path, reader, to_orig, layout = _open(path)
    if config is None:
        config = _read_config(path, reader, to_orig, layout)
    else:
        _check_config_against_shapes(config, reader, to_orig, path)
    with torch.device("meta"):
        model = WanDiT(config, backend=resolve_backend(backend, device), attention_quant=attention_quant)
    load_into(model, reader, to_orig, dtype, device, keep_fp32=keep_fp32, what="DiT", progress=progress)
    return model.eval().requires_grad_(False)


def save_dit(model: WanDiT, path: str | Path, layout: str = "original", shards: int = 1) -> None:
    """Write a DiT as safetensors in the original (optionally sharded with an index json) or diffusers layout,
    with a config.json, under the checkpoint's names (a fused model's projections written as their pieces,
    `WanDiT.checkpoint_state_dict`). Used by `Engine.save_pretrained`, tests and the memory benchmark."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rename = original_to_diffusers if layout == "diffusers" else (lambda k: k)
    sd = {rename(k): v.detach().contiguous() for k, v in model.checkpoint_state_dict().items()}
    keys = list(sd)
    cfg = model.cfg
    if layout == "diffusers":
        meta = {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
                "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
                "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim,
                "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
                "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": cfg.eps,
                "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": cfg.rope_max_positions}
    else:
        meta = {"_class_name": "WanModel", "model_type": "ti2v", "dim": cfg.dim, "eps": cfg.eps,
                "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim,
                "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "text_len": cfg.text_len,
                "text_dim": cfg.text_dim}
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    if shards <= 1:
        save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
        return
    weight_map = {}
    per = -(-len(keys) // shards)
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
