"""Isolated reference attention (`ConditioningLayout.reference_attention="isolated"`) and the exact reuse of the
references' keys and values across sampling steps.

In the isolated layout a reference token's self-attention sees only reference tokens, and its cross-attention the
text; the target's tokens see the target and the references. A reference token's hidden state then depends on the
reference latents (t = 0), the text and the weights, none of which change while sampling, so

1. the references run through the blocks once per generation, alone (`ReferenceKV.build`; in the same batch rows
   as the sampling: conditional, and the nulled references with the unconditional text, that row once per shape
   and text: `build_guided`), and every block's reference keys and values are kept ([rows, L_ref, H, D] each,
   after the q/k norm and RoPE);
2. every step runs the target's tokens alone and attends to [target; cached reference] keys, one attention call on
   the concatenated keys (no dense mask): the same softmax over the same keys as the uncached isolated forward.

The uncached isolated forward (`isolated_forward`: the whole [target; references] sequence, the target's queries
against every key and the references' queries against the reference keys, two attention calls) is what the trainer
trains and what the cached engine is checked against. Per step the cached engine does the target's share of the
work: at 4 images + a 121-frame clip (58,080 tokens, 27,280 of them target) about 827 instead of 1,759 TFLOP per
forward (ARCHITECTURE.md section 7; `models.dit.count_flops(cfg, 27280, 58080)`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .cache import LRUCache
from .models.dit import Segments, TextKV, WanDiT, grid_of

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (q, k, v) [B, L, H, D] -> out


def isolated_attention(attention: Attention, n_target: int) -> Attention:
    """Self-attention over [target; references] where the first `n_target` tokens (the target) attend to every
    key and the references only to the references' keys: two calls of `attention`, no mask."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out_target = attention(q[:, :n_target], k, v)  # [B, Lt, H, D]
        out_refs = attention(q[:, n_target:], k[:, n_target:], v[:, n_target:])  # [B, Lr, H, D]
        return torch.cat([out_target, out_refs], dim=1)
    return attend


def isolated_forward(dit: WanDiT, latents: Sequence[torch.Tensor], frame_starts: Sequence[int], segments: Segments,
                     context: torch.Tensor | Sequence[torch.Tensor] | TextKV) -> torch.Tensor:
    """`dit.forward_groups` under isolated reference attention (the uncached form: every token every step).
    Returns the target's velocity [B, 48, F, h, w] fp32."""
    f, h, w = grid_of(dit.cfg, latents[0])
    n_target = f * h * w

    def stack(x, e, e0, segs, rope, text_kv, ops):
        attend = isolated_attention(ops.attention, n_target)
        return dit.run_blocks(x, e0, segs, rope, text_kv, ops, attention_for=lambda i: attend)

    return dit.forward_groups(latents, frame_starts, segments, context, block_stack=stack)


@dataclass
class ReferenceKV:
    """Every block's reference keys and values, kv[i] = (k, v) [rows, L_ref, H, D], from one pass of the
    reference tokens alone (isolated reference attention makes that pass exact)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    @torch.inference_mode()
    def build(cls, dit: WanDiT, ref_latents: Sequence[torch.Tensor], frame_starts: Sequence[int],
              segments: Segments, text_kv: TextKV) -> "ReferenceKV":
        """Run the references (each [rows, 48, f_i, h, w], their RoPE frame starts, t = 0 segments) through the
        blocks with the rows' text, keeping each block's keys and values."""
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []

        def capture(attention: Attention) -> Attention:
            def attend(q, k, v):
                kv.append((k.contiguous(), v.contiguous()))  # v may view a fused q|k|v output: do not pin it
                return attention(q, k, v)
            return attend

        def stack(x, e, e0, segs, rope, tkv, ops):
            return dit.run_blocks(x, e0, segs, rope, tkv, ops, attention_for=lambda i: capture(ops.attention))

        dit.forward_groups(list(ref_latents), list(frame_starts), segments, text_kv, block_stack=stack)
        return cls(kv)

    @classmethod
    def build_guided(cls, dit: WanDiT, ref_latents: Sequence[torch.Tensor], frame_starts: Sequence[int],
                     segments: Segments, text_kv: TextKV, null_cache: LRUCache) -> "ReferenceKV":
        """`build` for the two guided rows, the nulled references' row (black latents of the references' shapes,
        with the unconditional text) taken from `null_cache` when the same shapes, RoPE starts and text were seen:
        it is the same for every generation of that shape."""
        row = lambda r: TextKV([(k[r:r + 1], v[r:r + 1]) for k, v in text_kv.kv])  # noqa: E731
        one = Segments(segments.lens, segments.t[:1])
        cond = cls.build(dit, [z[:1] for z in ref_latents], frame_starts, one, row(0))
        uncond_text = text_kv.kv[0][0][1].float().contiguous().cpu().numpy().tobytes()  # block 0's text keys
        key = (tuple(tuple(z.shape) for z in ref_latents), tuple(frame_starts), hashlib.sha1(uncond_text).hexdigest())
        null = null_cache.get(key)
        if null is None:
            null = cls.build(dit, [z[1:] for z in ref_latents], frame_starts, one, row(1))
            null_cache.put(key, null)
        return cls([(torch.cat([kc, kn]), torch.cat([vc, vn])) for (kc, vc), (kn, vn) in zip(cond.kv, null.kv)])

    def attention_for(self, attention: Attention, rows: Sequence[int] | None = None) -> Callable[[int], Attention]:
        """Block i's self-attention for the target's tokens: keys and values [target; cached references] (the
        batch `rows` of the cache, all by default)."""
        def for_block(i: int) -> Attention:
            k_ref, v_ref = self.kv[i]
            if rows is not None:
                k_ref, v_ref = k_ref[list(rows)], v_ref[list(rows)]

            def attend(q, k, v):
                return attention(q, torch.cat([k, k_ref], dim=1), torch.cat([v, v_ref], dim=1))
            return attend
        return for_block


__all__ = ["ReferenceKV", "isolated_attention", "isolated_forward"]
