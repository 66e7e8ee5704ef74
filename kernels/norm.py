"""Norms of the DiT: RMSNorm over the full width (q/k norms) and the affine LayerNorm before cross-attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x.dtype."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Affine LayerNorm over the last dim in fp32, returned in x.dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def rms_norm(*args, **kwargs):
    raise NotImplementedError("the Triton RMSNorm kernel is not built yet; use backend='torch'")


def layer_norm(*args, **kwargs):
    raise NotImplementedError("the Triton LayerNorm kernel is not built yet; use backend='torch'")
