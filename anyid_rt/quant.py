"""FP8 (E4M3) inference for the DiT's linear layers.

Weights are quantised once, at load (after any LoRA is merged), per output channel; activations are
quantised per token on the fly. The matmul is `torch._scaled_mm` with row-wise scales, which doubles the
Hopper matrix rate (1,979 vs 989 dense TFLOP/s). Layers whose error would reach every token through the
time embedding or the output (patch embedding, text and time embedders, head, modulation) stay in bf16,
as do the text K/V projections, which run once per prompt.

    y = (q(x) @ q(W)^T) * s_x[token] * s_w[channel] + b,   q(v) = round_e4m3(v / s),  s = amax|v| / 448

`fp8_linear_ref` is the plain PyTorch emulation of the same numerics (dequantise, matmul in fp32); it is
what the quality tests compare against, and what runs where `_scaled_mm` cannot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models.linears import BLOCK_LINEARS, TEXT_KV_LINEARS

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Linear layers inside each block that are swapped; the text K/V projections run once per prompt
# (WanDiT.prepare_text), so they stay bf16 (models/linears.py says why each consumer picks what it picks).
FP8_TARGETS = tuple(name for name in BLOCK_LINEARS if name not in TEXT_KV_LINEARS)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values and fp32 scales [rows, 1] with one scale per row of a 2-D tensor (amax / 448)."""
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX  # [rows, 1]
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def fp8_linear_ref(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Emulation: quantise x per token, dequantise both operands, matmul in fp32. x [..., in]."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rowwise(x2)
    out = (xq.float() * xs) @ (weight_q.float() * weight_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*x.shape[:-1], weight_q.shape[0])


class FP8Linear(nn.Module):
    """A Linear with E4M3 weights (per output channel) and per-token dynamic E4M3 activations."""

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, use_scaled_mm: bool = True):
        super().__init__()
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        self.register_buffer("weight_q", weight_q)  # [out, in] E4M3, row-major: .t() is column-major
        self.register_buffer("weight_scale", weight_scale.float().reshape(1, -1))  # [1, out]
        self.bias = None if bias is None else nn.Parameter(bias.to(out_dtype), requires_grad=False)
        self.out_dtype = out_dtype
        self.use_scaled_mm = use_scaled_mm

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_scaled_mm: bool = True) -> "FP8Linear":
        wq, ws = quantize_rowwise(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(wq, ws.reshape(-1), bias, linear.weight.dtype, use_scaled_mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_scaled_mm:
            return fp8_linear_ref(x, self.weight_q, self.weight_scale.t(), self.bias, self.out_dtype)
        x2 = x.reshape(-1, self.in_features)
        xq, xs = quantize_rowwise(x2)
        out = torch._scaled_mm(xq, self.weight_q.t(), scale_a=xs, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise"


def check_fp8_device(device: torch.device | str) -> None:
    """FP8 matmuls need sm89+ (Ada, Hopper); on a CPU `_scaled_mm` runs as a (slow) emulation-grade path."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"quant='fp8' needs an FP8 GPU (sm89+: L40, H100, H200); "
                             f"{torch.cuda.get_device_name(device)} is sm{major}{minor}. Use quant=None (bf16)")


def quantize_dit_fp8_(dit: nn.Module, targets: tuple[str, ...] = FP8_TARGETS, use_scaled_mm: bool = True) -> list[str]:
    """Swap the targeted Linear layers of every block for FP8Linear, in place. Returns the swapped names.
    Merge LoRAs before calling: the quantised weights cannot take a LoRA delta afterwards."""
    swapped = []
    for i, block in enumerate(dit.blocks):
        for name in targets:
            parent_name, leaf = name.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"blocks.{i}.{name} is {type(linear).__name__}, not a Linear (quantised twice?)")
            fp8 = FP8Linear.from_linear(linear, use_scaled_mm)
            if leaf.isdigit():
                parent[int(leaf)] = fp8
            else:
                setattr(parent, leaf, fp8)
            swapped.append(f"blocks.{i}.{name}")
    return swapped


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()  # fp64: no >1 from rounding


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 255.0) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()
