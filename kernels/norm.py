"""Norms of the DiT: RMSNorm over the full width (q/k norms) and the affine LayerNorm before cross-attention.

`*_ref` are the spec, the CPU / export path and the test oracle; `rms_norm` and `layer_norm` are the Triton
kernels with the same contracts: x [..., N] of any float dtype, weight/bias [N] of any float dtype, math in
fp32 over the full last dim (any width up to 64K columns, e.g. 3072 or 3000), result in x.dtype. Backward
(autograd) is a Triton kernel for dx with per-program partial sums for dweight / dbias, reduced by torch.

`rms_norm_rope` is the self-attention's q/k norm with the Wan 3-axis RoPE fused into its output (the kernel
already holds the row, so the rotation costs no memory traffic beyond the [L, D/2] angle tables). RoPE is
given per token as (cos, sin) tables [L, D/2] in fp32 for each head's interleaved pairs:
(x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos). Done here, each token is rotated
once; done inside the attention kernel, every key tile would be rotated again for every query block (214
times per key at 27,280 tokens), with more registers and shared memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import check_triton_device, flat_rows, num_sms, row_tiling

Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) [L, D/2] fp32, or None: no rotation


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by per-token angles; computed in fp32, returned in x.dtype."""
    B, L, H, D = x.shape
    xf = x.float().reshape(B, L, H, D // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # [B, L, H, D/2]
    c = cos[None, :, None, :]  # [1, L, 1, D/2]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # [B, L, H, D/2, 2]
    return out.reshape(B, L, H, D).to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x.dtype."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype)


def rms_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, rope: Rope, num_heads: int) -> torch.Tensor:
    """x [B, L, H*D]: `rms_norm_ref` over the full width (rounded to x.dtype), then RoPE on each head's
    interleaved pairs by the token's angles (cos, sin [L, D/2]) in fp32, rounded to x.dtype: the unfused
    q/k norm followed by `apply_rope_ref`, bit for bit."""
    B, L, N = x.shape
    y = rms_norm_ref(x, weight, eps)
    if rope is None:
        return y
    return apply_rope_ref(y.view(B, L, num_heads, N // num_heads), *rope).view(B, L, N)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Affine LayerNorm over the last dim in fp32, returned in x.dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: one kernel per direction for both norms, IS_RMS a compile-time switch. Tiles of
# [BLOCK_R rows, BLOCK_N columns] of x viewed as [M, N] with unit column stride.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def rotate_pairs(y, Cos, Sin, rows, M, N, L, DIRECTION: tl.constexpr, HALF_D: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Rotate the interleaved pairs (2j, 2j+1) of fp32 rows y [BLOCK_R, BLOCK_N] (heads of HALF_D pairs side by
    side, N columns valid) by +theta (DIRECTION 1) or -theta (-1), theta = angle[row % L, j % HALF_D] from the
    contiguous fp32 [L, HALF_D] tables Cos / Sin; rows >= M read angle 0."""
    pairs = tl.arange(0, BLOCK_N // 2)
    offs = (rows % L)[:, None] * HALF_D + (pairs % HALF_D)[None, :]
    pmask = (rows < M)[:, None] & (pairs < N // 2)[None, :]
    c = tl.load(Cos + offs, mask=pmask, other=0.0)
    s = tl.load(Sin + offs, mask=pmask, other=0.0) * DIRECTION
    y_e, y_o = tl.split(tl.reshape(y, [BLOCK_R, BLOCK_N // 2, 2]))
    return tl.reshape(tl.join(y_e * c - y_o * s, y_e * s + y_o * c), [BLOCK_R, BLOCK_N])


@triton.jit
def _norm_fwd_kernel(X, W, Bias, Y, Cos, Sin, M, N, L, stride_xm, stride_ym, EPS: tl.constexpr,
                     IS_RMS: tl.constexpr, ROPE: tl.constexpr, HALF_D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """RMS: y = x * rstd * w, rstd = rsqrt(mean(x^2) + eps). LN: y = (x - mean) * rstd * w + b.
    ROPE: y, rounded to Y's dtype, is then rotated pair by pair with row r's angles Cos/Sin[r % L, pair % HALF_D]."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        xc = tl.where(mask, x - (tl.sum(x, 1) / N)[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, 1) / N + EPS)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if not IS_RMS:
        y += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if ROPE:
        y = rotate_pairs(y.to(Y.dtype.element_ty).to(tl.float32), Cos, Sin, rows, M, N, L, 1.0, HALF_D, BLOCK_R,
                         BLOCK_N)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(X, W, DY, DX, DWPart, DBPart, Cos, Sin, M, N, L, stride_xm, stride_dym, stride_dxm,
                     EPS: tl.constexpr, IS_RMS: tl.constexpr, ROPE: tl.constexpr, HALF_D: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx per row and this program's partial sums of dw = sum dy * xhat (and db = sum dy for LN).

    With g = dy * w and xhat the normalised row: RMS dx = rstd * (g - xhat * mean(g * xhat));
    LN dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). Programs stride over row blocks; partials go to
    [programs, N] and are summed by the launcher. ROPE: dy is first rotated back (the inverse rotation is
    the gradient of a rotation; the rounding between norm and rotation passes the gradient through).
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(pid * BLOCK_R, M, n_prog * BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (rows < M)[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ROPE:
            dy = rotate_pairs(dy, Cos, Sin, rows, M, N, L, -1.0, HALF_D, BLOCK_R, BLOCK_N)
        if IS_RMS:
            xc = x
        else:
            xc = tl.where(mask, x - (tl.sum(x, 1) / N)[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / N + EPS)
        xhat = xc * rstd[:, None]
        g = dy * w[None, :]
        dx = g - xhat * (tl.sum(g * xhat, 1) / N)[:, None]
        if not IS_RMS:
            dx -= (tl.sum(g, 1) / N)[:, None]
            db += tl.sum(dy, 0)
        dx = dx * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
    tl.store(DWPart + pid * N + cols, dw, mask=cmask)
    if not IS_RMS:
        tl.store(DBPart + pid * N + cols, db, mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launchers and operators (torch.library.custom_op with fake functions and autograd; see attention.py)
# ----------------------------------------------------------------------------------------------------------
def _norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
              cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """cos/sin [L, D/2] fp32 (RMS only): x is [B, L, N] and its rows are rotated after the norm."""
    x2 = flat_rows(x)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M:
        block_r, block_n, warps = row_tiling(N)
        _norm_fwd_kernel[(triton.cdiv(M, block_r),)](
            x2, weight, weight if bias is None else bias, y, weight if cos is None else cos,
            weight if sin is None else sin, M, N, 1 if cos is None else x.shape[-2], x2.stride(0), y.stride(0),
            EPS=eps, IS_RMS=bias is None, ROPE=cos is not None, HALF_D=1 if cos is None else cos.shape[1],
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps)
    return y.view(x.shape)


def _norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, is_rms: bool,
              cos: torch.Tensor | None = None, sin: torch.Tensor | None = None):
    x2, dy2 = flat_rows(x), flat_rows(dy)
    M, N = x2.shape
    block_r, block_n, warps = row_tiling(N)
    P = max(1, min(triton.cdiv(M, block_r), 4 * num_sms(x.device)))
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    dw_part = torch.zeros((P, N), dtype=torch.float32, device=x.device)
    db_part = dw_part if is_rms else torch.zeros((P, N), dtype=torch.float32, device=x.device)
    if M:
        _norm_bwd_kernel[(P,)](
            x2, weight, dy2, dx, dw_part, db_part, weight if cos is None else cos, weight if sin is None else sin,
            M, N, 1 if cos is None else x.shape[-2], x2.stride(0), dy2.stride(0), dx.stride(0),
            EPS=eps, IS_RMS=is_rms, ROPE=cos is not None, HALF_D=1 if cos is None else cos.shape[1],
            BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps)
    return dx.view(x.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0)


@torch.library.custom_op("anyid_rt::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm_fwd(x, weight, None, eps)


@torch.library.custom_op("anyid_rt::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw, _ = _norm_bwd(dy, x, weight, eps, True)
    return dx, dw


@torch.library.custom_op("anyid_rt::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm_fwd(x, weight, bias, eps)


@torch.library.custom_op("anyid_rt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _norm_bwd(dy, x, weight, eps, False)
    return dx, dw, db.to(bias.dtype)


@torch.library.custom_op("anyid_rt::rms_norm_rope", mutates_args=())
def _rms_norm_rope_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      eps: float) -> torch.Tensor:
    return _norm_fwd(x, weight, None, eps, cos, sin)


@torch.library.custom_op("anyid_rt::rms_norm_rope_bwd", mutates_args=())
def _rms_norm_rope_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw, _ = _norm_bwd(dy, x, weight, eps, True, cos, sin)
    return dx, dw


@_rms_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_rms_norm_rope_bwd_op.register_fake
def _(dy, x, weight, cos, sin, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, bias, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight),
            torch.empty_like(bias))


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = _rms_norm_bwd_op(dy, x, weight, ctx.eps)
    return dx, dw, None


def _layer_norm_setup(ctx, inputs, output) -> None:
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps


def _layer_norm_backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd_op(dy, x, weight, bias, ctx.eps)
    return dx, dw, db, None


def _rms_norm_rope_setup(ctx, inputs, output) -> None:
    x, weight, cos, sin, eps = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.eps = eps


def _rms_norm_rope_backward(ctx, dy):
    x, weight, cos, sin = ctx.saved_tensors
    dx, dw = _rms_norm_rope_bwd_op(dy, x, weight, cos, sin, ctx.eps)
    return dx, dw, None, None, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
_rms_norm_rope_op.register_autograd(_rms_norm_rope_backward, setup_context=_rms_norm_rope_setup)
_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def _check(x: torch.Tensor, params: tuple[torch.Tensor, ...], what: str) -> None:
    for p in params:
        if p.shape != (x.shape[-1],):
            raise ValueError(f"{what}: parameters must be [{x.shape[-1]}] for x {tuple(x.shape)}, got {tuple(p.shape)}")
    for t in (x, *params):
        check_triton_device(t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Triton `rms_norm_ref` (op anyid_rt::rms_norm, Triton backward): fp32 math, result in x.dtype."""
    _check(x, (weight,), "rms_norm")
    return _rms_norm_op(x, weight, float(eps))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Triton `layer_norm_ref` (op anyid_rt::layer_norm, Triton backward): fp32 math, result in x.dtype."""
    _check(x, (weight, bias), "layer_norm")
    return _layer_norm_op(x, weight, bias, float(eps))


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, rope: Rope, num_heads: int) -> torch.Tensor:
    """Triton `rms_norm_rope_ref` (op anyid_rt::rms_norm_rope, Triton backward): x [B, L, H*D], RoPE tables
    (cos, sin) [L, D/2]; no gradient for the tables. rope=None is `rms_norm`."""
    if rope is None:
        return rms_norm(x, weight, eps)
    if x.dim() != 3 or x.shape[-1] % num_heads or (x.shape[-1] // num_heads) % 2:
        raise ValueError(f"rms_norm_rope: x must be [B, L, H*D] with {num_heads} heads of an even head dim, "
                         f"got {tuple(x.shape)}")
    _check(x, (weight,), "rms_norm_rope")
    L, half = x.shape[1], x.shape[-1] // num_heads // 2
    cos, sin = rope
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (L, half):
            raise ValueError(f"rms_norm_rope: RoPE {name} table must be [L, D/2] = [{L}, {half}], got {tuple(t.shape)}")
        if t.requires_grad:
            raise ValueError("rms_norm_rope: the RoPE tables require grad; the Triton kernel has no gradient for "
                             "RoPE angles (detach them, or use backend='torch')")
        check_triton_device(t)
    return _rms_norm_rope_op(x, weight, cos.float().contiguous(), sin.float().contiguous(), float(eps))
