"""The denoising loop of a generation: one DiT call per step (conditional and unconditional rows as one batch),
guidance, the sampler's update, and the count of DiT forwards run and skipped that `Video.stats` reports.

A "forward" is one row of one step (a guided step is 2 forwards, as the performance anchors count them:
shared/reference/perf-anchors.md conventions); a forward is skipped when a step cache reuses its residual
(anyid_rt/step_cache.py). Under isolated reference attention the references run through the blocks once, before
the first step, and the steps process the target's tokens alone against their cached keys and values
(anyid_rt/reference_kv.py), unless `reuse_kv` is off (then every step runs the whole sequence, isolated).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from tqdm.auto import tqdm

from .cache import LRUCache
from .conditioning import StepLayout
from .models.dit import TextKV, WanDiT
from .reference_kv import ReferenceKV, isolated_attention
from .sampling import FlowSampler
from .step_cache import StepCache


@dataclass
class DenoiseStats:
    """What the loop did: steps, DiT forwards run and skipped (one per batch row per step), passes of the
    references alone (isolated reference attention with its K/V cache)."""

    steps: int = 0
    dit_forwards: int = 0
    dit_forwards_skipped: int = 0
    reference_passes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "dit_forwards": self.dit_forwards,
                "dit_forwards_skipped": self.dit_forwards_skipped, "reference_passes": self.reference_passes}


@torch.inference_mode()
def denoise(dit: WanDiT, x: torch.Tensor, ref_latents: list[torch.Tensor], layout: StepLayout, text_kv: TextKV,
            schedule: FlowSampler, guidance: float, image_latent: torch.Tensor | None, progress: bool = True,
            cache: StepCache | None = None, isolated: bool = False, reuse_kv: bool = True,
            null_kv: LRUCache | None = None, forward: Callable | None = None) -> tuple[torch.Tensor, DenoiseStats]:
    """Run every step of `schedule` from the initial latent x [1, 48, F, h, w] fp32; returns the final latent and
    the stats. `ref_latents`: each [batch, 48, f_i, h, w] (row 1 the nulled references when guided); `text_kv` has
    the same batch. `image_latent` ([1, 48, 1, h, w]) pins latent frame 0 after every step (image-to-video).
    `cache` (over the same rows) may skip the block stack of a row on a step and reuse its residual. `isolated`:
    isolated reference attention, with the references' K/V computed once when `reuse_kv` (the nulled references'
    row once per shape and unconditional text, kept in `null_kv`). `forward` replaces `dit.forward_groups` (a
    parallel job's, anyid_rt/parallel.py), which runs neither a step cache nor isolated references."""
    if forward is not None and (cache is not None or (isolated and ref_latents)):
        raise ValueError("a replaced DiT forward (parallel generation) runs neither a step cache nor isolated "
                         "reference attention")
    forward = forward or dit.forward_groups
    use_cfg = guidance != 1.0
    batch = 2 if use_cfg else 1
    stats = DenoiseStats()
    isolated = isolated and bool(ref_latents)
    ref_kv = None
    if isolated and reuse_kv:
        build = ReferenceKV.build if batch == 1 or null_kv is None else partial(ReferenceKV.build_guided,
                                                                                null_cache=null_kv)
        ref_kv = build(dit, ref_latents, layout.frame_starts[1:], layout.reference_segments(batch, x.device), text_kv)
        stats.reference_passes = 1

    def run_blocks(h, e0, segs, rope, tkv, ops, rows=None):  # the block stack over the batch `rows`
        if ref_kv is not None:
            attention_for = ref_kv.attention_for(ops.attention, rows)
        elif isolated:
            attend = isolated_attention(ops.attention, layout.target_tokens)
            attention_for = lambda i: attend  # noqa: E731
        else:
            attention_for = None
        return dit.run_blocks(h, e0, segs, rope, tkv, ops, attention_for=attention_for)

    if cache is not None:
        block_stack = partial(cache.block_stack, run_blocks)
    elif isolated:
        block_stack = lambda h, e, e0, segs, rope, tkv, ops: run_blocks(h, e0, segs, rope, tkv, ops)  # noqa: E731
    else:
        block_stack = None
    if image_latent is not None:
        x[:, :, :1] = image_latent
    for i, t in enumerate(tqdm(schedule.timesteps, desc="denoising", disable=not progress)):
        if ref_kv is not None:  # the target's tokens alone: the references' K/V are cached
            groups, starts = [x.expand(batch, -1, -1, -1, -1)], layout.frame_starts[:1]
        else:
            groups, starts = [x.expand(batch, -1, -1, -1, -1), *ref_latents], layout.frame_starts
        segments = layout.segments(float(t), batch, x.device, target_only=ref_kv is not None)
        if cache is not None:
            cache.begin(i)
        if block_stack is None:
            v = forward(groups, starts, segments, text_kv)  # [batch, 48, F, h, w] fp32
        else:
            v = dit.forward_groups(groups, starts, segments, text_kv, block_stack)
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
