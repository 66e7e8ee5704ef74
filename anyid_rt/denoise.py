"""The denoising loop of a generation: one DiT call per step (conditional and unconditional rows as one batch),
guidance, the sampler's update, and the count of DiT forwards run and skipped that `Video.stats` reports.

A "forward" is one row of one step (a guided step is 2 forwards, as the performance anchors count them:
shared/reference/perf-anchors.md conventions); a forward is skipped when a step cache reuses its residual
(anyid_rt/step_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from .conditioning import StepLayout
from .models.dit import TextKV, WanDiT
from .sampling import FlowSampler
from .step_cache import StepCache


@dataclass
class DenoiseStats:
    """What the loop did: steps, DiT forwards run and skipped (one per batch row per step)."""

    steps: int = 0
    dit_forwards: int = 0
    dit_forwards_skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "dit_forwards": self.dit_forwards,
                "dit_forwards_skipped": self.dit_forwards_skipped}


@torch.inference_mode()
def denoise(dit: WanDiT, x: torch.Tensor, ref_latents: list[torch.Tensor], layout: StepLayout, text_kv: TextKV,
            schedule: FlowSampler, guidance: float, image_latent: torch.Tensor | None,
            progress: bool = True, cache: StepCache | None = None) -> tuple[torch.Tensor, DenoiseStats]:
    """Run every step of `schedule` from the initial latent x [1, 48, F, h, w] fp32; returns the final latent and
    the stats. `ref_latents`: each [batch, 48, f_i, h, w] (row 1 the nulled references when guided); `text_kv` has
    the same batch. `image_latent` ([1, 48, 1, h, w]) pins latent frame 0 after every step (image-to-video).
    `cache` (over the same rows) may skip the block stack of a row on a step and reuse its residual."""
    use_cfg = guidance != 1.0
    batch = 2 if use_cfg else 1
    stats = DenoiseStats()
    if image_latent is not None:
        x[:, :, :1] = image_latent
    for i, t in enumerate(tqdm(schedule.timesteps, desc="denoising", disable=not progress)):
        segments = layout.segments(float(t), batch, x.device)
        if cache is not None:
            cache.begin(i)
        v = dit.forward_groups([x.expand(batch, -1, -1, -1, -1), *ref_latents], layout.frame_starts, segments,
                               text_kv, None if cache is None else partial(cache.block_stack, dit))  # [batch, 48, F, h, w]
        skipped = 0 if cache is None else len(cache.skipped)
        stats.dit_forwards += batch - skipped
        stats.dit_forwards_skipped += skipped
        if use_cfg:
            v = v[1:] + guidance * (v[:1] - v[1:])
        x = schedule.step(v, i, x)
        if image_latent is not None:  # re-pin the clean first frame, as the official i2v loop
            x[:, :, :1] = image_latent
        stats.steps += 1
    return x, stats


__all__ = ["denoise", "DenoiseStats"]
