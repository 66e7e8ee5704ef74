"""Per-row E4M3 quantisation of activations in one pass: the input side of the FP8 linear layers (quant.py).

Each row (a token) gets one fp32 scale, and its values are stored in float8_e4m3fn:

    amax = max |x[r, :]|,   s[r] = max(amax, 1e-12) / 448,   q[r, k] = rne_e4m3(clamp(x[r, k] / s[r], -448, 448))

so that q * s approximates x, with the row's largest magnitude mapped to 448 (the largest finite E4M3 value).
A row of zeros gets a tiny finite scale and quantises to zeros. Quantisation is computed in fp32 from the input
as given (bf16, fp16 or fp32), with IEEE division and round-to-nearest-even.

`quantize_rows_fp8_ref` is that formula in PyTorch: the spec, the CPU path and the test oracle (it is also how
the weights are quantised, per output channel, once at load). Done eagerly it costs about seven passes over
the activations (~45 bytes of traffic per bf16 element); `quantize_rows_fp8` is the Triton kernel that reads
each row once and writes the E4M3 values and the row's scale (3 bytes per bf16 element). The same tile
function (`quantize_tile`) is called by the adaptive LayerNorm kernel (modulation.py), which writes FP8 rows
directly when the following linear layer is FP8.

Exactness: the kernel gives the reference's bytes exactly, on a GPU and under the Triton interpreter. It
divides with `div_rn` (Triton's `/` on fp32 is an approximate division on NVIDIA GPUs) and rounds to E4M3 in
fp32 arithmetic (`round_to_e4m3`) before the cast, so that the cast itself is exact: the interpreter (triton
3.9) converts fp32 -> fp8 without carrying a rounded-up mantissa into the exponent and without ties-to-even,
while GPUs round to nearest even; with the rounding done beforehand both give the same bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import check_triton_device, flat_rows, row_tiling

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
AMAX_FLOOR = 1e-12  # a row's amax is raised to this, so that a row of zeros gets a finite scale


class FP8Rows(NamedTuple):
    """Activations quantised per row: what an FP8Linear takes in place of a tensor (see quant.py).

    values [..., K] float8_e4m3fn, scale [..., 1] fp32: values * scale approximates the rows.
    `shape` is the values' shape, so that code that reads an input's shape works on either form.
    """

    values: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantize(self) -> torch.Tensor:
        """The fp32 rows the quantised values stand for: values * scale, [..., K]."""
        return self.values.float() * self.scale


def quantize_rows_fp8_ref(x: torch.Tensor, amax: torch.Tensor | None = None) -> FP8Rows:
    """E4M3 values and fp32 scales [..., 1], one scale per row (last dim) of x [..., K] of any float dtype.

    amax [..., 1]: calibrated row ranges to use instead of each row's max |x| (quant.py's weight calibration);
    values beyond a given range saturate at +-448."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if amax is None else amax.float().reshape(*x.shape[:-1], 1)
    scale = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX  # [..., 1]
    return FP8Rows((xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale)


# ----------------------------------------------------------------------------------------------------------
# Triton: tile functions (shared with modulation.py) and the row quantiser
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def round_to_e4m3(y):
    """fp32 values with |y| <= 448 rounded to the nearest E4M3 value (ties to even), still in fp32.

    Adding 2^(E+20), E = the binade of |y| (at least -6: E4M3's subnormals are spaced like its lowest normal
    binade, 2^-9), leaves fp32 with an ulp of 2^(E-3), E4M3's spacing in that binade, so the fp32 addition
    rounds |y| exactly as the cast would; subtracting it again is exact. The sign is kept (-0 stays -0).
    """
    bits = y.to(tl.int32, bitcast=True)
    biased = tl.maximum((bits >> 23) & 0xFF, 127 - 6)
    magic = ((biased + 20) << 23).to(tl.float32, bitcast=True)  # 2^(E+20)
    a = (tl.abs(y) + magic) - magic
    return tl.where(bits < 0, -a, a)


@triton.jit
def quantize_tile(y, AMAX_FLOOR: tl.constexpr, E4M3_MAX: tl.constexpr):
    """Per-row E4M3 quantisation of an fp32 tile y [BLOCK_R, BLOCK_K] whose masked entries are 0.
    Returns (values rounded to E4M3 but still fp32 [BLOCK_R, BLOCK_K], scales [BLOCK_R] fp32)."""
    amax = tl.max(tl.abs(y), 1)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), E4M3_MAX)
    q = tl.math.div_rn(y, scale[:, None])
    q = tl.minimum(tl.maximum(q, -E4M3_MAX), E4M3_MAX)
    return round_to_e4m3(q), scale


@triton.jit
def _quantize_rows_kernel(X, Q, S, M, K, stride_xm, stride_qm,
                          AMAX_FLOOR: tl.constexpr, E4M3_MAX: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One read of BLOCK_R whole rows of x, one write of their E4M3 values and of their scales."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < M
    mask = rmask[:, None] & (cols < K)[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_tile(x, AMAX_FLOOR, E4M3_MAX)
    tl.store(Q + rows[:, None] * stride_qm + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + rows, scale, mask=rmask)


@torch.library.custom_op("anyid_rt::quantize_rows_fp8", mutates_args=())
def _quantize_rows_fp8_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [M, K] float8_e4m3fn, scales [M, 1] fp32) of x [M, K] with a unit column stride."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=E4M3, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    block_r, block_k, warps = row_tiling(K)
    _quantize_rows_kernel[(triton.cdiv(M, block_r),)](
        x, q, s, M, K, x.stride(0), q.stride(0), AMAX_FLOOR=AMAX_FLOOR, E4M3_MAX=E4M3_MAX,
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps)
    return q, s


@_quantize_rows_fp8_op.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def quantize_rows_fp8(x: torch.Tensor) -> FP8Rows:
    """Triton `quantize_rows_fp8_ref`, byte for byte: x [..., K] (bf16, fp16 or fp32) -> FP8Rows with values
    [..., K] float8_e4m3fn and scales [..., 1] fp32, one read of x (op anyid_rt::quantize_rows_fp8).
    Inference only: the op has no backward."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"quantize_rows_fp8 takes bf16, fp16 or fp32 activations, got {x.dtype}")
    check_triton_device(x)
    q, s = _quantize_rows_fp8_op(flat_rows(x))
    return FP8Rows(q.view(x.shape), s.view(*x.shape[:-1], 1))


__all__ = ["E4M3", "E4M3_MAX", "AMAX_FLOOR", "FP8Rows", "quantize_rows_fp8", "quantize_rows_fp8_ref",
           "quantize_tile", "round_to_e4m3"]
