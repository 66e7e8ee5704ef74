"""Timestep-split adaptive LayerNorm and gated residual add.

Tokens are grouped in segments that share a timestep (ARCHITECTURE.md section 5), the same for every sample
of the batch: a `SegmentMap` (kernels/__init__.py) gives each token's segment as an index tensor and, outside
a traced graph, the segments' token counts. Per-sample modulation rows are [B, S, D] in fp32; token l of
segment s uses row s. Never a [B, L, 6, D] tensor.

`*_ref` are the spec, the CPU / export path and the test oracle: they gather rows by the index, so they run
on a graph input as well. `layernorm_modulate` and `gated_residual` are the Triton kernels with the same
contracts (and Triton backward kernels, registered through torch.library). A kernel launch covers one
segment (grid: row blocks x batch), so a token's modulation row is a launch argument instead of a per-token
lookup; a launch per segment (S is 1 to a few) costs a few microseconds against ~0.1 ms of memory traffic
per launch at production sizes.

`layernorm_modulate(..., out_dtype=torch.float8_e4m3fn)` is the FP8 engine's input to the linear layer that
follows (quant.py): the kernel quantises each token's fp32 row (E4M3 values, one fp32 scale per token, as
fp8_quant.py) before its single write, so no bf16 activation is written, read back and quantised again.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import SegmentMap
from ._utils import check_triton_device, num_sms, row_tiling
from .fp8_quant import AMAX_FLOOR, E4M3, E4M3_MAX, FP8Rows, quantize_rows_fp8_ref, quantize_tile


def _check_segments(L: int, rows: torch.Tensor, segments: SegmentMap) -> None:
    lens = segments.lens
    if lens is None:  # a traced layout: only the index's length is known
        if segments.index.shape != (L,):
            raise ValueError(f"segment index {tuple(segments.index.shape)} does not cover L={L}")
    elif sum(lens) != L or rows.shape[1] != len(lens) or segments.index.shape != (L,):
        raise ValueError(f"segments {lens} do not cover L={L} with {rows.shape[1]} modulation rows")


def layernorm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, segments: SegmentMap,
                           eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor | FP8Rows:
    """LayerNorm(x) (no affine, fp32) * (1 + scale[seg]) + shift[seg]; x [B, L, D], shift/scale [B, S, D].

    out_dtype float8_e4m3fn: the fp32 result quantised per token (`quantize_rows_fp8_ref`), returned as
    FP8Rows (values [B, L, D], scales [B, L, 1]): the input an FP8Linear takes without quantising again.
    """
    _check_segments(x.shape[1], shift, segments)
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)  # [B, L, D] fp32
    idx = segments.index
    y = normed * (1 + scale.float())[:, idx] + shift.float()[:, idx]
    return quantize_rows_fp8_ref(y) if out_dtype == E4M3 else y.to(out_dtype or x.dtype)


def gated_residual_ref(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                       segments: SegmentMap) -> torch.Tensor:
    """residual + y * gate[seg], in fp32 (Wan keeps the residual stream in fp32). Shapes as above."""
    _check_segments(residual.shape[1], gate, segments)
    return residual.float() + y.float() * gate.float()[:, segments.index]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Tiles of [BLOCK_R tokens, BLOCK_D channels] of one sample b, rows inside one segment
# [row_start, row_start + n_rows) whose modulation row is `seg`. All math in fp32.
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["row_start", "n_rows", "seg"])
def _ln_modulate_fwd_kernel(X, Shift, Scale, Out, OutScale, row_start, n_rows, seg, D,
                            stride_xb, stride_xl, stride_shb, stride_shs, stride_scb, stride_scs,
                            stride_ob, stride_ol, stride_osb,
                            EPS: tl.constexpr, FP8_OUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = (x - mean) * rstd * (1 + scale[seg]) + shift[seg], one read of x, one write of out.

    FP8_OUT: out is E4M3 and OutScale [B, L] fp32 gets each token's scale, the fp32 rows quantised as
    fp8_quant.quantize_tile does (the tile's masked columns are 0: x, shift and scale load as 0 there)."""
    b = tl.program_id(1).to(tl.int64)
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = (row_start + local).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    rmask = local < n_rows
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None] * stride_xl + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + EPS)
    shift = tl.load(Shift + b * stride_shb + seg * stride_shs + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(Scale + b * stride_scb + seg * stride_scs + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    if FP8_OUT:
        y, row_scale = quantize_tile(y, AMAX_FLOOR, E4M3_MAX)
        tl.store(OutScale + b * stride_osb + rows, row_scale, mask=rmask)
    tl.store(Out + b * stride_ob + rows[:, None] * stride_ol + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["row_start", "n_rows", "seg"])
def _ln_modulate_bwd_kernel(X, Scale, DY, DX, DShiftPart, DScalePart, row_start, n_rows, seg, D, S,
                            stride_xb, stride_xl, stride_scb, stride_scs, stride_dyb, stride_dyl,
                            stride_dxb, stride_dxl,
                            EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx per token, and this program's partial sums of dshift = sum dy, dscale = sum dy * xhat.

    With g = dy * (1 + scale): dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). Programs stride over
    the segment's row blocks; partials go to [B, S, programs, D] and are summed by the launcher.
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mod = 1.0 + tl.load(Scale + b * stride_scb + seg * stride_scs + cols, mask=cmask, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_D], tl.float32)
    dscale = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(pid * BLOCK_R, n_rows, n_prog * BLOCK_R):
        local = r0 + tl.arange(0, BLOCK_R)
        rows = (row_start + local).to(tl.int64)
        mask = (local < n_rows)[:, None] & cmask[None, :]
        x = tl.load(X + b * stride_xb + rows[:, None] * stride_xl + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + b * stride_dyb + rows[:, None] * stride_dyl + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / D + EPS)
        xhat = xc * rstd[:, None]
        g = dy * mod[None, :]
        c_g = tl.sum(g, 1) / D
        c_gx = tl.sum(g * xhat, 1) / D
        dx = (g - c_g[:, None] - xhat * c_gx[:, None]) * rstd[:, None]
        tl.store(DX + b * stride_dxb + rows[:, None] * stride_dxl + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        dshift += tl.sum(dy, 0)
        dscale += tl.sum(dy * xhat, 0)
    part = ((b * S + seg) * n_prog + pid) * D + cols
    tl.store(DShiftPart + part, dshift, mask=cmask)
    tl.store(DScalePart + part, dscale, mask=cmask)


@triton.jit(do_not_specialize=["row_start", "n_rows", "seg"])
def _gated_residual_fwd_kernel(R, Y, G, Out, row_start, n_rows, seg, D,
                               stride_rb, stride_rl, stride_yb, stride_yl, stride_gb, stride_gs,
                               stride_ob, stride_ol, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out = residual + y * gate[seg] in fp32."""
    b = tl.program_id(1).to(tl.int64)
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = (row_start + local).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (local < n_rows)[:, None] & cmask[None, :]
    r = tl.load(R + b * stride_rb + rows[:, None] * stride_rl + cols[None, :], mask=mask, other=0.0)
    y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yl + cols[None, :], mask=mask, other=0.0)
    g = tl.load(G + b * stride_gb + seg * stride_gs + cols, mask=cmask, other=0.0).to(tl.float32)
    out = r.to(tl.float32) + y.to(tl.float32) * g[None, :]
    tl.store(Out + b * stride_ob + rows[:, None] * stride_ol + cols[None, :], out, mask=mask)


@triton.jit(do_not_specialize=["row_start", "n_rows", "seg"])
def _gated_residual_bwd_kernel(DOut, Y, G, DY, DGPart, row_start, n_rows, seg, D, S,
                               stride_db, stride_dl, stride_yb, stride_yl, stride_gb, stride_gs,
                               stride_dyb, stride_dyl, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dy = dout * gate[seg] (in y's dtype) and this program's partial sum of dgate = sum dout * y."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = tl.load(G + b * stride_gb + seg * stride_gs + cols, mask=cmask, other=0.0).to(tl.float32)
    dgate = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(pid * BLOCK_R, n_rows, n_prog * BLOCK_R):
        local = r0 + tl.arange(0, BLOCK_R)
        rows = (row_start + local).to(tl.int64)
        mask = (local < n_rows)[:, None] & cmask[None, :]
        d = tl.load(DOut + b * stride_db + rows[:, None] * stride_dl + cols[None, :], mask=mask, other=0.0)
        y = tl.load(Y + b * stride_yb + rows[:, None] * stride_yl + cols[None, :], mask=mask, other=0.0)
        d = d.to(tl.float32)
        tl.store(DY + b * stride_dyb + rows[:, None] * stride_dyl + cols[None, :],
                 (d * g[None, :]).to(DY.dtype.element_ty), mask=mask)
        dgate += tl.sum(d * y.to(tl.float32), 0)
    tl.store(DGPart + ((b * S + seg) * n_prog + pid) * D + cols, dgate, mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------------------
def _segments(seg_lens: Sequence[int]):
    """(segment index, first token, token count) of each non-empty segment."""
    start = 0
    for s, n in enumerate(seg_lens):
        if n > 0:
            yield s, start, n
        start += n


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with a unit stride on the last dim (the kernels index channels contiguously)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _reduction_programs(seg_lens: Sequence[int], B: int, block_r: int, device: torch.device) -> int:
    """Programs per segment for the backward reductions: enough to fill the GPU about 4 times over."""
    most = triton.cdiv(max(seg_lens, default=0), block_r)
    return max(1, min(most, triton.cdiv(4 * num_sms(device), B)))


def _check(x: torch.Tensor, rows: tuple[torch.Tensor, ...], segments: SegmentMap, what: str) -> list[int]:
    """Validate a launch; returns the segment lengths it runs over."""
    if x.dim() != 3:
        raise ValueError(f"{what}: x must be [B, L, D], got {tuple(x.shape)}")
    if segments.lens is None:
        raise ValueError(f"{what}: the Triton kernels launch once per segment and need the segment lengths; a "
                         "layout given only as an index tensor (a traced graph input) runs the torch references")
    B, L, D = x.shape
    for r in rows:
        _check_segments(L, r, segments)
        if r.dim() != 3 or r.shape[0] != B or r.shape[2] != D:
            raise ValueError(f"{what}: modulation rows must be [B, S, D] = [{B}, {len(segments.lens)}, {D}], "
                             f"got {tuple(r.shape)}")
    if any(n < 0 for n in segments.lens):
        raise ValueError(f"{what}: negative segment length in {segments.lens}")
    for t in (x, *rows):
        check_triton_device(t)
    return list(segments.lens)


# ----------------------------------------------------------------------------------------------------------
# Operators (torch.library.custom_op with fake functions and autograd; see attention.py for the choice)
# ----------------------------------------------------------------------------------------------------------
def _launch_ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg_lens: Sequence[int],
                        eps: float, out: torch.Tensor, out_scale: torch.Tensor | None) -> None:
    """One forward launch per segment into `out` [B, L, D] (and, for E4M3 output, `out_scale` [B, L, 1])."""
    B, L, D = x.shape
    block_r, block_d, warps = row_tiling(D)
    fp8 = out_scale is not None
    for s, start, n in _segments(seg_lens):
        _ln_modulate_fwd_kernel[(triton.cdiv(n, block_r), B)](
            x, shift, scale, out, out_scale if fp8 else out, start, n, s, D, x.stride(0), x.stride(1),
            shift.stride(0), shift.stride(1), scale.stride(0), scale.stride(1), out.stride(0), out.stride(1),
            out_scale.stride(0) if fp8 else 0,
            EPS=eps, FP8_OUT=fp8, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)


@torch.library.custom_op("anyid_rt::layernorm_modulate", mutates_args=())
def _layernorm_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg_lens: list[int],
                           eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    x, shift, scale = _rows(x), _rows(shift), _rows(scale)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _launch_ln_modulate(x, shift, scale, seg_lens, eps, out, None)
    return out


@_layernorm_modulate_op.register_fake
def _(x, shift, scale, seg_lens, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("anyid_rt::layernorm_modulate_bwd", mutates_args=())
def _layernorm_modulate_bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, seg_lens: list[int],
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x.dtype, dshift [B, S, D] fp32, dscale [B, S, D] fp32)."""
    dy, x, scale = _rows(dy), _rows(x), _rows(scale)
    B, L, D = x.shape
    S = len(seg_lens)
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    block_r, block_d, warps = row_tiling(D)
    P = _reduction_programs(seg_lens, B, block_r, x.device)
    dshift_part = torch.zeros((B, S, P, D), dtype=torch.float32, device=x.device)  # empty segments stay 0
    dscale_part = torch.zeros((B, S, P, D), dtype=torch.float32, device=x.device)
    for s, start, n in _segments(seg_lens):
        _ln_modulate_bwd_kernel[(P, B)](
            x, scale, dy, dx, dshift_part, dscale_part, start, n, s, D, S, x.stride(0), x.stride(1),
            scale.stride(0), scale.stride(1), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            EPS=eps, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return dx, dshift_part.sum(2), dscale_part.sum(2)


@_layernorm_modulate_bwd_op.register_fake
def _(dy, x, scale, seg_lens, eps):
    B, L, D = x.shape
    rows = x.new_empty((B, len(seg_lens), D), dtype=torch.float32)
    return x.new_empty(x.shape), rows, torch.empty_like(rows)


def _layernorm_modulate_setup(ctx, inputs, output) -> None:
    x, shift, scale, seg_lens, eps, _ = inputs
    ctx.save_for_backward(x, scale)
    ctx.seg_lens, ctx.eps, ctx.shift_dtype = seg_lens, eps, shift.dtype


def _layernorm_modulate_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, dshift, dscale = _layernorm_modulate_bwd_op(dy, x, scale, ctx.seg_lens, ctx.eps)
    return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None, None, None


_layernorm_modulate_op.register_autograd(_layernorm_modulate_backward, setup_context=_layernorm_modulate_setup)


@torch.library.custom_op("anyid_rt::layernorm_modulate_fp8", mutates_args=())
def _layernorm_modulate_fp8_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seg_lens: list[int],
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 values [B, L, D], per-token scales [B, L, 1] fp32); inference only, no backward."""
    x, shift, scale = _rows(x), _rows(shift), _rows(scale)
    B, L, D = x.shape
    out = torch.empty((B, L, D), dtype=E4M3, device=x.device)
    out_scale = torch.empty((B, L, 1), dtype=torch.float32, device=x.device)
    _launch_ln_modulate(x, shift, scale, seg_lens, eps, out, out_scale)
    return out, out_scale


@_layernorm_modulate_fp8_op.register_fake
def _(x, shift, scale, seg_lens, eps):
    B, L, D = x.shape
    return x.new_empty((B, L, D), dtype=E4M3), x.new_empty((B, L, 1), dtype=torch.float32)


@torch.library.custom_op("anyid_rt::gated_residual", mutates_args=())
def _gated_residual_op(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                       seg_lens: list[int]) -> torch.Tensor:
    residual, y, gate = _rows(residual), _rows(y), _rows(gate)
    B, L, D = residual.shape
    out = torch.empty((B, L, D), dtype=torch.float32, device=residual.device)
    block_r, block_d, warps = row_tiling(D)
    for s, start, n in _segments(seg_lens):
        _gated_residual_fwd_kernel[(triton.cdiv(n, block_r), B)](
            residual, y, gate, out, start, n, s, D, residual.stride(0), residual.stride(1), y.stride(0),
            y.stride(1), gate.stride(0), gate.stride(1), out.stride(0), out.stride(1),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return out


@_gated_residual_op.register_fake
def _(residual, y, gate, seg_lens):
    return residual.new_empty(residual.shape, dtype=torch.float32)


@torch.library.custom_op("anyid_rt::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd_op(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                           seg_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy in y.dtype, dgate [B, S, D] fp32); the residual's gradient is dout itself."""
    dout, y, gate = _rows(dout), _rows(y), _rows(gate)
    B, L, D = y.shape
    S = len(seg_lens)
    dy = torch.empty((B, L, D), dtype=y.dtype, device=y.device)
    block_r, block_d, warps = row_tiling(D)
    P = _reduction_programs(seg_lens, B, block_r, y.device)
    dgate_part = torch.zeros((B, S, P, D), dtype=torch.float32, device=y.device)
    for s, start, n in _segments(seg_lens):
        _gated_residual_bwd_kernel[(P, B)](
            dout, y, gate, dy, dgate_part, start, n, s, D, S, dout.stride(0), dout.stride(1), y.stride(0),
            y.stride(1), gate.stride(0), gate.stride(1), dy.stride(0), dy.stride(1),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return dy, dgate_part.sum(2)


@_gated_residual_bwd_op.register_fake
def _(dout, y, gate, seg_lens):
    B, L, D = y.shape
    return y.new_empty(y.shape), y.new_empty((B, len(seg_lens), D), dtype=torch.float32)


def _gated_residual_setup(ctx, inputs, output) -> None:
    residual, y, gate, seg_lens = inputs
    ctx.save_for_backward(y, gate)
    ctx.seg_lens, ctx.residual_dtype = seg_lens, residual.dtype


def _gated_residual_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dy, dgate = _gated_residual_bwd_op(dout, y, gate, ctx.seg_lens)
    return dout.to(ctx.residual_dtype), dy, dgate.to(gate.dtype), None


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------
def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, segments: SegmentMap,
                       eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor | FP8Rows:
    """Triton `layernorm_modulate_ref`: one read of x [B, L, D], one write of out [B, L, D] in out_dtype.

    LayerNorm without affine in fp32, then * (1 + scale[seg]) + shift[seg] with shift/scale [B, S, D].
    Backward (autograd): a Triton kernel for dx with per-program partial sums for dshift and dscale, reduced
    by torch (ops anyid_rt::layernorm_modulate / layernorm_modulate_bwd).

    out_dtype float8_e4m3fn: the same kernel quantises each fp32 row before its one write and returns FP8Rows
    (E4M3 values [B, L, D], scales [B, L, 1] fp32), the bytes `fp8_quant.quantize_rows_fp8` gives for the
    fp32 output (op anyid_rt::layernorm_modulate_fp8; inference only, no backward). The FP8 layers' input
    costs 1 byte + 4 per row instead of a bf16 write, a read and a separate quantisation.
    """
    seg_lens = _check(x, (shift, scale), segments, "layernorm_modulate")
    if out_dtype == E4M3:
        return FP8Rows(*_layernorm_modulate_fp8_op(x, shift, scale, seg_lens, float(eps)))
    return _layernorm_modulate_op(x, shift, scale, seg_lens, float(eps), out_dtype or x.dtype)


def gated_residual(residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                   segments: SegmentMap) -> torch.Tensor:
    """Triton `gated_residual_ref`: a new fp32 tensor residual + y * gate[seg], gate [B, S, D].

    Backward (autograd): d residual = dout; a Triton kernel for dy with per-program partial sums for
    dgate, reduced by torch (ops anyid_rt::gated_residual / gated_residual_bwd).
    """
    seg_lens = _check(residual, (gate,), segments, "gated_residual")
    if y.shape != residual.shape:
        raise ValueError(f"gated_residual: y {tuple(y.shape)} must match residual {tuple(residual.shape)}")
    check_triton_device(y)
    return _gated_residual_op(residual, y, gate, seg_lens)
