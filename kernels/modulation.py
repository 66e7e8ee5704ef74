"""Timestep-split adaptive LayerNorm and gated residual add.

Tokens are grouped in segments that share a timestep (ARCHITECTURE.md section 5): `seg_lens` is a tuple
of token counts, the same for every sample of the batch, summing to L; per-sample modulation rows are
[B, S, D] in fp32 (S = len(seg_lens)). Token l of segment s uses row s. Never a [B, L, 6, D] tensor.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _check_segments(L: int, rows: torch.Tensor, seg_lens: Sequence[int]) -> None:
    if sum(seg_lens) != L or rows.shape[1] != len(seg_lens):
        raise ValueError(f"segments {tuple(seg_lens)} do not cover L={L} with {rows.shape[1]} modulation rows")


def layernorm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg_lens: Sequence[int],
                           eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm(x) (no affine, fp32) * (1 + scale[seg]) + shift[seg]; x [B, L, D], shift/scale [B, S, D]."""
    _check_segments(x.shape[1], shift, seg_lens)
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)  # [B, L, D] fp32
    parts = []
    for s, chunk in enumerate(normed.split(list(seg_lens), dim=1)):
        parts.append(chunk * (1 + scale[:, s:s + 1].float()) + shift[:, s:s + 1].float())
    return torch.cat(parts, dim=1).to(out_dtype or x.dtype)


def gated_residual_ref(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                       seg_lens: Sequence[int]) -> torch.Tensor:
    """residual + y * gate[seg], in fp32 (Wan keeps the residual stream in fp32). Shapes as above."""
    _check_segments(residual.shape[1], gate, seg_lens)
    parts = []
    for s, chunk in enumerate(y.split(list(seg_lens), dim=1)):
        parts.append(chunk.float() * gate[:, s:s + 1].float())
    return residual.float() + torch.cat(parts, dim=1)


def layernorm_modulate(*args, **kwargs):
    raise NotImplementedError("the Triton modulation kernel is not built yet; use backend='torch'")


def gated_residual(*args, **kwargs):
    raise NotImplementedError("the Triton gated-residual kernel is not built yet; use backend='torch'")
