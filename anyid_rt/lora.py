"""LoRA files in the ComfyUI-compatible key format, and merging them into a DiT at load.

Keys (ARCHITECTURE.md section 5): `diffusion_model.blocks.{i}.{self_attn|cross_attn}.{q,k,v,o}.lora_down.weight`,
`.lora_up.weight` and `.alpha` (also `blocks.{i}.ffn.{0,2}`); the delta of a module is
(alpha / rank) * up @ down. The conditioning layout and training facts sit in the safetensors metadata.
The trainer writes these files (anyid_rt.trainer.lora) and the engine merges them here, once, at load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models.checkpoint import CheckpointError

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


def check_lora_fits(model: nn.Module, lora: LoraWeights) -> None:
    """Raise a CheckpointError unless every module of the LoRA is a Linear of `model` of matching shape. `model`
    may live on the meta device: the engine checks LoRA files this way before loading any weight."""
    modules = dict(model.named_modules())
    unknown = [n for n in lora.modules if not isinstance(modules.get(n), nn.Linear)]
    if unknown:
        raise CheckpointError(f"LoRA does not fit the model: no Linear named {unknown[:10]}"
                              + (" ..." if len(unknown) > 10 else ""))
    wrong = [f"{n}: LoRA {lora.up[n].shape[0]}x{lora.down[n].shape[1]} vs weight {tuple(modules[n].weight.shape)}"
             for n in lora.modules if (lora.up[n].shape[0], lora.down[n].shape[1]) != tuple(modules[n].weight.shape)]
    if wrong:
        raise CheckpointError("LoRA does not fit the model (shapes differ; trained for another model size?): "
                              + "; ".join(wrong[:10]))


@torch.no_grad()
def merge_lora_(model: nn.Module, lora: LoraWeights, strength: float = 1.0, sign: float = 1.0) -> None:
    """W += sign * strength * (alpha / rank) * up @ down for every module of the LoRA, in fp32, in place.
    Every module must exist in `model` as a Linear of matching shape, or nothing is changed."""
    check_lora_fits(model, lora)
    modules = dict(model.named_modules())
    for n in lora.modules:
        w = modules[n].weight
        delta = lora.up[n].float().to(w.device) @ lora.down[n].float().to(w.device)
        w.copy_((w.float() + sign * strength * lora.scale(n) * delta).to(w.dtype))
