"""LoRA files in the ComfyUI-compatible key format, and merging them into a DiT at load.

Keys (ARCHITECTURE.md section 5): `diffusion_model.blocks.{i}.{self_attn|cross_attn}.{q,k,v,o}.lora_down.weight`,
`.lora_up.weight` and `.alpha` (also `blocks.{i}.ffn.{0,2}`); the delta of a module is
(alpha / rank) * up @ down. The conditioning layout and training facts sit in the safetensors metadata.
The trainer writes these files (anyid_rt.trainer.lora) and the engine merges them here, once, at load, before
it fuses the projections; a fused model takes a LoRA as well, each piece's delta into its rows of the fused
weight (`lora_targets`), so the keys name the checkpoint's modules either way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models.checkpoint import CheckpointError
from .models.linears import checkpoint_names

LORA_PREFIX = "diffusion_model."
_KEY = re.compile(r"^(?:model\.)?diffusion_model\.(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass
class LoraWeights:
    """One LoRA: per target module name (e.g. `blocks.3.self_attn.q`) its down [r, in], up [out, r], alpha."""

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alpha: dict[str, float]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.down)

    def rank(self, name: str) -> int:
        return self.down[name].shape[0]

    def scale(self, name: str) -> float:
        return self.alpha[name] / self.rank(name)


def lora_state_dict(lora: LoraWeights) -> dict[str, torch.Tensor]:
    sd = {}
    for name in lora.modules:
        sd[f"{LORA_PREFIX}{name}.lora_down.weight"] = lora.down[name].contiguous()
        sd[f"{LORA_PREFIX}{name}.lora_up.weight"] = lora.up[name].contiguous()
        sd[f"{LORA_PREFIX}{name}.alpha"] = torch.tensor(float(lora.alpha[name]))
    return sd


def save_lora(lora: LoraWeights, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file(lora_state_dict(lora), str(path), metadata={k: str(v) for k, v in lora.metadata.items()})


def read_lora(path: str | Path) -> LoraWeights:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors LoRA: {e}") from e
    down, up, alpha, bad = {}, {}, {}, []
    for key in f.keys():
        m = _KEY.match(key)
        if not m:
            bad.append(key)
            continue
        name, kind = m.groups()
        t = f.get_tensor(key)
        if kind == "lora_down.weight":
            down[name] = t
        elif kind == "lora_up.weight":
            up[name] = t
        else:
            alpha[name] = float(t)
    if bad:
        raise CheckpointError(f"{path}: keys not in the ComfyUI LoRA format "
                              f"'diffusion_model.<module>.lora_down.weight|lora_up.weight|alpha': {bad[:10]}")
    unpaired = sorted(set(down) ^ set(up))
    if unpaired:
        raise CheckpointError(f"{path}: modules with only one of lora_down / lora_up: {unpaired[:10]}")
    if not down:
        raise CheckpointError(f"{path}: holds no LoRA weights")
    for name in down:
        alpha.setdefault(name, float(down[name].shape[0]))  # no alpha stored: scale 1, as ComfyUI does
        if up[name].shape[1] != down[name].shape[0]:
            raise CheckpointError(f"{path}: {name} has up {tuple(up[name].shape)} and down {tuple(down[name].shape)} "
                                  "of different ranks")
    return LoraWeights(down, up, alpha, dict(f.metadata() or {}))


def lora_targets(model: nn.Module) -> dict[str, tuple[nn.Linear, slice]]:
    """Every nn.Linear of `model` by the checkpoint module name a LoRA uses, with the rows of its weight that
    the name owns: all of them, or one piece's block of a fused projection (`blocks.3.self_attn.q` -> rows
    0:dim of `blocks.3.self_attn.qkv`; models/linears.py `checkpoint_names`)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            pieces = checkpoint_names(name)
            rows = module.out_features // len(pieces)
            for i, piece in enumerate(pieces):
                out[piece] = (module, slice(i * rows, (i + 1) * rows))
    return out


def check_lora_fits(model: nn.Module, lora: LoraWeights) -> None:
    """Raise a CheckpointError unless every module of the LoRA is a Linear of `model` (or a piece of a fused
    one) of matching shape. `model` may live on the meta device: the engine checks LoRA files this way
    before loading any weight."""
    targets = lora_targets(model)
    unknown = [n for n in lora.modules if n not in targets]
    if unknown:
        raise CheckpointError(f"LoRA does not fit the model: no Linear named {unknown[:10]}"
                              + (" ..." if len(unknown) > 10 else ""))

    def shape(n: str) -> tuple[int, int]:
        module, rows = targets[n]
        return rows.stop - rows.start, module.in_features

    wrong = [f"{n}: LoRA {lora.up[n].shape[0]}x{lora.down[n].shape[1]} vs weight {shape(n)}"
             for n in lora.modules if (lora.up[n].shape[0], lora.down[n].shape[1]) != shape(n)]
    if wrong:
        raise CheckpointError("LoRA does not fit the model (shapes differ; trained for another model size?): "
                              + "; ".join(wrong[:10]))


@torch.no_grad()
def merge_lora_(model: nn.Module, lora: LoraWeights, strength: float = 1.0, sign: float = 1.0) -> None:
    """W += sign * strength * (alpha / rank) * up @ down for every module of the LoRA, in fp32, in place (into
    its rows of a fused projection). Every module must exist in `model` as a Linear of matching shape, or
    nothing is changed."""
    check_lora_fits(model, lora)
    targets = lora_targets(model)
    for n in lora.modules:
        module, rows = targets[n]
        w = module.weight[rows]  # a view: the update lands in the layer's weight
        delta = lora.up[n].float().to(w.device) @ lora.down[n].float().to(w.device)
        w.copy_((w.float() + sign * strength * lora.scale(n) * delta).to(w.dtype))
