"""The baseline and the inputs of one guided step: diffusers' WanTransformer3DModel holding OUR weights (one
random copy, shared by storage through the key map), its attention-dispatch backends, and the step's inputs
laid out for our engine and, the same tensors, for diffusers.

Every variant of a run computes the same function of the same numbers, so that their times compare and their
outputs differ only by arithmetic (`relerr` against our torch backend is recorded for each).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from anyid_rt.conditioning import ConditioningLayout, StepLayout
from anyid_rt.models.dit import Segments, TextKV, WanDiT
from anyid_rt.models.dit_loader import original_to_diffusers

from .run import Case


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error measure of the benchmark and of the parity tests."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------

@dataclass
class StepInputs:
    """One guided step's inputs, for our engine and (the same tensors, laid out its way) for diffusers."""

    case: Case
    batch: int
    guidance: float
    t: float
    noise: torch.Tensor  # [1, C, F, h, w] fp32, the target latent
    refs: list[torch.Tensor]  # each [batch, C, f, h, w] fp32: row 0 the reference latent, row 1 its null latent
    frame_starts: list[int]
    segments: Segments  # (target tokens at t, reference tokens at 0)
    contexts: list[torch.Tensor]  # trimmed text embeddings [L_i, text_dim]: the prompt, then the empty prompt
    d_latent: torch.Tensor  # [batch, C, F + sum(f), h, w] in the model dtype: target and references along time
    d_timestep: torch.Tensor  # [batch, L] fp32 per-token timesteps (diffusers' expand_timesteps)
    d_context: torch.Tensor  # [batch, text_len, text_dim] zero-padded, in the model dtype


def make_step_inputs(model: WanDiT, case: Case, *, batch: int, guidance: float, t: float, prompt_tokens: int,
                     seed: int) -> StepInputs:
    """Random inputs drawn on the CPU from `seed` (the same on every device), placed on the model's device."""
    cfg = model.cfg
    device, dtype = model.patch_embedding.weight.device, model.compute_dtype
    g = torch.Generator().manual_seed(seed)
    F, h, w = case.latent
    noise = torch.randn(1, cfg.in_dim, F, h, w, generator=g).to(device)
    refs = [torch.randn(batch, cfg.in_dim, f, h, w, generator=g).to(device) for f in case.ref_frames]
    layout = StepLayout.build(ConditioningLayout(), case.geometry, case.latent, case.ref_frames, image_mode=False)
    segments = layout.segments(t, batch, device)
    contexts = [torch.randn(prompt_tokens, cfg.text_dim, generator=g) * 0.5,
                torch.randn(1, cfg.text_dim, generator=g) * 0.5][:batch]
    contexts = [c.to(device=device, dtype=dtype) for c in contexts]
    # diffusers: one latent with the references after the target along time ("after" layout: RoPE frame
    # indices continue after the target, which is what a concatenation gives), t on the target tokens, 0 on
    # the reference tokens, the context zero-padded to text_len as the official model pads it
    if layout.frame_starts != [sum([F, *case.ref_frames][:i]) for i in range(len(case.ref_frames) + 1)]:
        raise RuntimeError(f"frame starts {layout.frame_starts} are not a concatenation in time")
    n_target = case.geometry.tokens(case.latent)
    d_latent = torch.cat([noise.expand(batch, -1, -1, -1, -1), *refs], dim=2).to(dtype)
    d_timestep = torch.cat([torch.full((batch, n_target), float(t), device=device),
                            torch.zeros(batch, layout.ref_tokens, device=device)], dim=1)
    d_context = model.pad_context(contexts).to(dtype)
    return StepInputs(case, batch, guidance, float(t), noise, refs, layout.frame_starts, segments, contexts,
                      d_latent, d_timestep, d_context)


def guide(v: torch.Tensor, guidance: float) -> torch.Tensor:
    """v [batch, C, F, h, w]: batch 2 is (conditional, unconditional) -> v_u + g (v_c - v_u) [1, C, F, h, w]."""
    return v if v.shape[0] == 1 else v[1:] + guidance * (v[:1] - v[1:])


def ours_step(model: WanDiT, inp: StepInputs, text_kv: TextKV) -> Callable[[], torch.Tensor]:
    """One guided step of the engine: forward_groups over [target, *references] with the prepared text K/V."""
    groups = [inp.noise.expand(inp.batch, -1, -1, -1, -1), *inp.refs]

    def step() -> torch.Tensor:
        v = model.forward_groups(groups, inp.frame_starts, inp.segments, text_kv)  # [batch, C, F, h, w] fp32
        return guide(v, inp.guidance)

    return step


def diffusers_step(model, inp: StepInputs) -> Callable[[], torch.Tensor]:
    """One guided step of diffusers' WanTransformer3DModel on the same inputs; the target frames are kept."""
    F = inp.case.latent[0]

    def step() -> torch.Tensor:
        v = model(hidden_states=inp.d_latent, timestep=inp.d_timestep, encoder_hidden_states=inp.d_context,
                  return_dict=False)[0]  # [batch, C, F + sum(f), h, w]
        return guide(v[:, :, :F].float(), inp.guidance)

    return step


# ---------------------------------------------------------------------------------------------------------
# Weights: one random copy, shared by every variant
# ---------------------------------------------------------------------------------------------------------

def dit_view(src: WanDiT, backend: str) -> WanDiT:
    """A second WanDiT over the same parameter storage (no copy), with its own ops backend and modules, so
    that it can be compiled or quantised without touching `src`."""
    with torch.device("meta"):
        view = WanDiT(src.cfg, backend=backend)
    view.load_state_dict(src.state_dict(), strict=True, assign=True)
    return view.eval().requires_grad_(False)


@dataclass(frozen=True)
class SharedWeights:
    """How diffusers got our weights: bytes shared by storage and bytes converted to the dtype it keeps."""

    shared_bytes: int
    converted_bytes: int
    keep_in_fp32: tuple[str, ...]  # diffusers' `_keep_in_fp32_modules`

    def record(self) -> dict:
        return dict(asdict(self), keep_in_fp32=list(self.keep_in_fp32))


def diffusers_from_dit(src: WanDiT) -> tuple[Any, SharedWeights]:
    """diffusers' WanTransformer3DModel holding `src`'s weights through the key map. Tensors whose dtype
    diffusers keeps (its `_keep_in_fp32_modules` in fp32, the rest in the compute dtype, as its loader does)
    are shared by storage; the few that differ (time projection, output projection, q/k norms: ~0.1 GB at
    5B) are converted."""
    from diffusers import WanTransformer3DModel

    cfg = src.cfg
    device, dtype = src.patch_embedding.weight.device, src.compute_dtype
    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=cfg.rope_max_positions)
    keep = tuple(getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or ())
    sd, shared, copied = {}, 0, 0
    for name, t in src.state_dict().items():
        dname = original_to_diffusers(name)
        want = torch.float32 if any(m in dname.split(".") for m in keep) else dtype
        if t.dtype == want:
            sd[dname], shared = t, shared + t.numel() * t.element_size()
        else:
            sd[dname] = t.to(want)
            copied += sd[dname].numel() * sd[dname].element_size()
    model.load_state_dict(sd, strict=True, assign=True)
    # the RoPE tables are non-persistent buffers, not in any state dict: build that module on the device
    with torch.device(device):
        model.rope = type(model.rope)(cfg.head_dim, cfg.patch_size, cfg.rope_max_positions)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers model tensors left unset after the weight copy: {left[:8]}")
    return model.eval().requires_grad_(False), SharedWeights(shared, copied, keep)


@contextlib.contextmanager
def diffusers_attention(model, backend: str) -> Iterator[None]:
    """Run `model` with one diffusers attention-dispatch backend; restores the global default afterwards."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.utils import logging as dlogging

    old, level = _AttentionBackendRegistry._active_backend, dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # set_attention_backend warns "experimental" on every call
    try:
        model.set_attention_backend(backend)
        yield
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(old)
        dlogging.set_verbosity(level)
