"""Attention with the Wan 3-axis RoPE applied to q and k.

Shapes: q [B, Lq, H, D], k and v [B, Lk, H, D]; Lk may differ from Lq (text, reference tokens). RoPE is
given per token as (cos, sin) tables of shape [L, D/2] in fp32 for interleaved pairs
(x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos); None means no rotation
(cross-attention). Softmax scale 1/sqrt(D), no mask, not causal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Rope = tuple[torch.Tensor, torch.Tensor] | None


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by per-token angles; computed in fp32, returned in x.dtype."""
    B, L, H, D = x.shape
    xf = x.float().reshape(B, L, H, D // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # [B, L, H, D/2]
    c = cos[None, :, None, :]  # [1, L, 1, D/2]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # [B, L, H, D/2, 2]
    return out.reshape(B, L, H, D).to(x.dtype)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope_q: Rope = None,
                  rope_k: Rope = None) -> torch.Tensor:
    """Reference attention: RoPE in fp32, then SDPA in the input dtype. Returns [B, Lq, H, D]."""
    if rope_q is not None:
        q = apply_rope_ref(q, *rope_q)
    if rope_k is not None:
        k = apply_rope_ref(k, *rope_k)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, Lq, H, D]


def attention(q, k, v, rope_q: Rope = None, rope_k: Rope = None):
    raise NotImplementedError("the Triton attention kernel is not built yet; use backend='torch'")
