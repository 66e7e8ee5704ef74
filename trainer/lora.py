"""LoRA for training, by module swap on the DiT's nn.Linear layers.

`inject_lora(dit, rank, alpha, targets)` replaces every matching `nn.Linear` by a `LoraLinear` that takes
over the frozen weight and bias (no copy, same parameter names, so the DiT's state dict keys are unchanged)
and adds a trainable low-rank path:

    y = x W^T + b + (alpha / rank) * (x A^T) B^T,   A = lora_down [r, in], B = lora_up [out, r]

A is initialised kaiming-uniform (as nn.Linear and PEFT), B with zeros, so a freshly injected model computes
exactly what the base model computes (x + 0.0 is x, bit for bit).

The verbs are the ones a trainer and an exporter need, and nothing global happens around forward:
- `set_lora_enabled(dit, False)` / `with lora_disabled(dit):` turn the low-rank path off; the Flow-DPO
  reference prediction is the same model with the LoRA off (no second copy of the weights).
- `merge_lora(dit)` folds (alpha/rank) B A into W (fp32 maths) and `unmerge_lora(dit)` takes it out again.
- `remove_lora(dit, merge=True)` swaps plain `nn.Linear`s back in (merged or discarded).
- `lora_to_weights(dit, metadata)` -> `anyid_rt.lora.LoraWeights` and `save_trained_lora(...)` writes the
  ComfyUI-keyed file (`diffusion_model.blocks.{i}.self_attn.q.lora_down.weight`, ...) that
  `Engine.from_pretrained(..., lora=)` and diffusers' Wan LoRA loader read.

Targets are regular expressions matched in full (`re.fullmatch`) against module names such as
`blocks.3.self_attn.q`; the default covers self- and cross-attention q, k, v, o and ffn.0 / ffn.2 of every
block (the AnyID / DiffSynth set).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from ..files import atomic_path
from ..lora import LoraWeights, save_lora
from ..models.dit import WanDiT
from ..models.linears import BLOCK_LINEARS

# every linear of every block (models/linears.py), as one full-match pattern
DEFAULT_TARGETS: tuple[str, ...] = (r"blocks\.\d+\.(" + "|".join(map(re.escape, BLOCK_LINEARS)) + ")",)

# safetensors metadata keys written next to anyid_rt.conditioning.LAYOUT_METADATA_KEY
META_RANK = "anyid.lora_rank"
META_ALPHA = "anyid.lora_alpha"
META_TARGETS = "anyid.lora_targets"
META_BASE_MODEL = "anyid.base_model"
META_STAGE = "anyid.stage"


class LoraLinear(nn.Linear):
    """An nn.Linear with a low-rank update. Holds the original module's weight and bias Parameters.

    The low-rank path runs in the activation dtype (bf16 base weights give bf16 matmuls) with fp32 master
    parameters: gradients reach the fp32 `lora_down` / `lora_up` through the casts.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: the weights are taken over, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        dev = base.weight.device
        self.lora_down = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
        self.lora_up = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
        init = torch.empty(rank, self.in_features, dtype=torch.float32)  # drawn on the CPU: same on every device
        nn.init.kaiming_uniform_(init, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_down.copy_(init)
        self.enabled = True
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(alpha / rank) * up @ down in fp32, [out, in]."""
        return self.scale * (self.lora_up.float() @ self.lora_down.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            if not self.enabled:
                raise RuntimeError("this LoRA is merged into the weights; unmerge_lora(dit) before disabling it")
            return y
        if not self.enabled:
            return y
        h = F.linear(x.to(y.dtype), self.lora_down.to(y.dtype))  # [.., r]
        return y + F.linear(h, self.lora_up.to(y.dtype)) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's weight and bias (whatever is merged into them)."""
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, enabled={self.enabled}, merged={self.merged}")


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)  # nn.Sequential children are set by their string index, too


def match_names(names: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The `names` (of nn.Linear modules) that fully match one of the `targets` regexes, in order. A pattern
    that matches nothing is an error (a typo would otherwise train a smaller LoRA silently). Works on names
    alone, so a config can be checked against a checkpoint's header before the model is loaded."""
    if not targets:
        raise ValueError("LoRA targets is empty; give at least one module-name pattern")
    compiled = []
    for t in targets:
        try:
            compiled.append(re.compile(t))
        except re.error as e:
            raise ValueError(f"LoRA target {t!r} is not a valid regular expression: {e}") from e
    out, used = [], set()
    for name in names:
        for pat in compiled:
            if pat.fullmatch(name):
                out.append(name)
                used.add(pat.pattern)
                break
    unused = [p.pattern for p in compiled if p.pattern not in used]
    if unused:
        raise ValueError(f"LoRA target pattern(s) {unused} match no nn.Linear of the model (patterns are full "
                         f"regex matches on names such as {list(names)[:6]})")
    return out


def match_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the nn.Linear modules of `model` that fully match one of the `targets` regexes, in model order."""
    return match_names([n for n, m in model.named_modules() if isinstance(m, nn.Linear)], targets)


def inject_lora(dit: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
                seed: int = 0) -> list[str]:
    """Freeze every parameter of `dit` and swap a `LoraLinear` in for each matching nn.Linear.

    `seed` fixes the kaiming init of the down matrices (drawn on the CPU, in module order), so every process
    of a data-parallel run starts from the same LoRA. Returns the names of the wrapped modules. A WanDiT
    whose projections the engine fused is unfused first: LoRA adapts the checkpoint's separate q, k, v.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if lora_modules(dit):
        raise ValueError("the model already holds LoRA modules; remove_lora(dit) first (merge=True keeps them)")
    if isinstance(dit, WanDiT):
        dit.unfuse_projections()
    names = match_targets(dit, targets)
    dit.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        base = dit.get_submodule(name)
        _set_module(dit, name, LoraLinear(base, rank, alpha, generator=gen))
    return names


def lora_modules(dit: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in dit.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(dit: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters in a fixed order (module order, down then up)."""
    out = []
    for m in lora_modules(dit).values():
        out += [m.lora_down, m.lora_up]
    return out


def lora_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """`{name.lora_down: ..., name.lora_up: ...}` (detached references, not copies): what a checkpoint holds."""
    sd = {}
    for n, m in lora_modules(dit).items():
        sd[f"{n}.lora_down"] = m.lora_down.detach()
        sd[f"{n}.lora_up"] = m.lora_up.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict_(dit: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy a `lora_state_dict` back into the injected modules (every key must match, shapes included)."""
    mods = lora_modules(dit)
    want = {f"{n}.{k}" for n in mods for k in ("lora_down", "lora_up")}
    if set(sd) != want:
        raise ValueError(f"LoRA state does not fit the model: missing {sorted(want - set(sd))[:5]}, "
                         f"unexpected {sorted(set(sd) - want)[:5]}")
    for n, m in mods.items():
        for k in ("lora_down", "lora_up"):
            p, v = getattr(m, k), sd[f"{n}.{k}"]
            if p.shape != v.shape:
                raise ValueError(f"{n}.{k}: shape {tuple(v.shape)} != {tuple(p.shape)} (another rank?)")
            p.copy_(v)


@torch.no_grad()
def load_lora_weights_(dit: nn.Module, weights: LoraWeights) -> None:
    """Copy a LoRA file's tensors (`anyid_rt.lora.read_lora`) into the injected modules, e.g. to continue
    training or to evaluate a saved LoRA. Modules, ranks and alphas must match the injected ones."""
    mods = lora_modules(dit)
    if set(weights.modules) != set(mods):
        raise ValueError(f"LoRA file modules do not match the injected ones: missing "
                         f"{sorted(set(mods) - set(weights.modules))[:5]}, unexpected "
                         f"{sorted(set(weights.modules) - set(mods))[:5]}")
    for n, m in mods.items():
        if weights.down[n].shape != m.lora_down.shape or weights.up[n].shape != m.lora_up.shape:
            raise ValueError(f"{n}: LoRA file rank {weights.rank(n)} != injected rank {m.rank}")
        if abs(weights.scale(n) - m.scale) > 1e-9 * max(1.0, m.scale):
            raise ValueError(f"{n}: LoRA file scale alpha/rank = {weights.scale(n)} != injected {m.scale}")
        m.lora_down.copy_(weights.down[n])
        m.lora_up.copy_(weights.up[n])


def set_lora_enabled(dit: nn.Module, enabled: bool) -> None:
    for m in lora_modules(dit).values():
        if m.merged and not enabled:
            raise RuntimeError("the LoRA is merged into the weights; unmerge_lora(dit) before disabling it")
        m.enabled = bool(enabled)


@contextlib.contextmanager
def lora_disabled(dit: nn.Module) -> Iterator[None]:
    """Run the base model (the Flow-DPO reference): every LoRA path off inside the block, restored after."""
    mods = lora_modules(dit)
    if not mods:
        raise ValueError("the model holds no LoRA modules to disable")
    before = {n: m.enabled for n, m in mods.items()}
    set_lora_enabled(dit, False)
    try:
        yield
    finally:
        for n, m in mods.items():
            m.enabled = before[n]


def merge_lora(dit: nn.Module) -> None:
    """Fold every LoRA update into its weight (in fp32, cast back to the weight's dtype)."""
    for m in lora_modules(dit).values():
        m.merge()


def unmerge_lora(dit: nn.Module) -> None:
    """Take merged LoRA updates out of the weights again (exact up to the weights' dtype rounding)."""
    for m in lora_modules(dit).values():
        m.unmerge()


def remove_lora(dit: nn.Module, merge: bool = True) -> None:
    """Swap plain nn.Linear modules back in: with `merge` the LoRA updates stay in the weights, else dropped."""
    for name, m in lora_modules(dit).items():
        if merge:
            m.merge()
        else:
            m.unmerge()
        _set_module(dit, name, m.to_linear())


def lora_metadata(dit: nn.Module, *, layout: ConditioningLayout, base_model: str,
                  targets: Sequence[str] = DEFAULT_TARGETS, stage: str = "sft",
                  extra: dict[str, str] | None = None) -> dict[str, str]:
    """The safetensors metadata of a trained LoRA: rank, alpha, target patterns, conditioning layout (read back
    by the engine), the base model it was trained on and the training stage."""
    mods = lora_modules(dit)
    if not mods:
        raise ValueError("the model holds no LoRA modules")
    ranks = {m.rank for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    meta = {
        META_RANK: str(ranks.pop()) if len(ranks) == 1 else json.dumps(sorted(ranks)),
        META_ALPHA: repr(alphas.pop()) if len(alphas) == 1 else json.dumps(sorted(alphas)),
        META_TARGETS: json.dumps(list(targets)),
        LAYOUT_METADATA_KEY: layout.to_json(),
        META_BASE_MODEL: str(base_model),
        META_STAGE: stage,
        # the keys musubi / kohya tools read for rank and alpha
        "ss_network_dim": str(max(m.rank for m in mods.values())),
        "ss_network_alpha": repr(max(m.alpha for m in mods.values())),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def lora_to_weights(dit: nn.Module, metadata: dict[str, str] | None = None,
                    dtype: torch.dtype = torch.float32, tensors: dict[str, torch.Tensor] | None = None) -> LoraWeights:
    """The injected LoRA as `anyid_rt.lora.LoraWeights` (CPU copies in `dtype`; fp32 keeps them exact).
    `tensors`: the values to write, a whole `lora_state_dict` (a sharded model's, gathered by
    `dist.full_tensors`); the modules' own tensors otherwise."""
    mods = lora_modules(dit)
    if not mods:
        raise ValueError("the model holds no LoRA modules")
    sd = lora_state_dict(dit) if tensors is None else tensors
    down = {n: sd[f"{n}.lora_down"].detach().to("cpu", dtype).clone() for n in mods}
    up = {n: sd[f"{n}.lora_up"].detach().to("cpu", dtype).clone() for n in mods}
    alpha = {n: m.alpha for n, m in mods.items()}
    return LoraWeights(down, up, alpha, dict(metadata or {}))


def save_trained_lora(dit: nn.Module, path: str | Path, metadata: dict[str, str],
                      dtype: torch.dtype = torch.float32, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the LoRA in the ComfyUI key format, atomically (a temporary file, then os.replace); `tensors` as in
    `lora_to_weights`."""
    path = Path(path)
    with atomic_path(path) as tmp:  # removed again if the write fails or is interrupted
        save_lora(lora_to_weights(dit, metadata, dtype, tensors), tmp)
    return path


__all__ = ["DEFAULT_TARGETS", "LoraLinear", "inject_lora", "match_names", "match_targets", "lora_modules",
           "lora_parameters", "lora_state_dict", "load_lora_state_dict_", "load_lora_weights_", "set_lora_enabled",
           "lora_disabled", "merge_lora", "unmerge_lora", "remove_lora", "lora_metadata", "lora_to_weights",
           "save_trained_lora", "META_RANK", "META_ALPHA", "META_TARGETS", "META_BASE_MODEL", "META_STAGE"]
