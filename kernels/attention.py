"""Attention with the Wan 3-axis RoPE applied to q and k.

Shapes: q [B, Lq, H, D], k and v [B, Lk, H, D]; Lk may differ from Lq (text, reference tokens). RoPE is
given per token as (cos, sin) tables of shape [L, D/2] in fp32 for interleaved pairs
(x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i] sin + x[2i+1] cos); None means no rotation
(cross-attention). Softmax scale 1/sqrt(D), no mask, not causal.

`attention_ref` is the spec, the CPU / export path and the test oracle; `attention` is the Triton kernel
(fused RoPE + flash attention forward, FA2-style backward) with the same contract.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import INTERPRET, check_triton_device, config_family

Rope = tuple[torch.Tensor, torch.Tensor] | None
_HEAD_DIMS = (32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: fused RoPE + flash attention (FA2 algorithm: online softmax forward, saved log-sum-exp,
# separate dK/dV and dQ backward kernels, no atomics).
#
# RoPE in the kernel: a score is a sum over the head dim, so it is unchanged when q and k are both read in
# the de-interleaved order (even lanes | odd lanes): q.k = q_even.k_even + q_odd.k_odd. Each tile is loaded
# contiguously, split into its even and odd lanes (tl.split of a [rows, D/2, 2] view), rotated in fp32 and
# rounded back to the input dtype exactly as apply_rope_ref does, and QK^T becomes two dots of depth D/2.
# V and the output are never rotated. The backward rotates dQ and dK back with the inverse rotation
# (angle -theta) before storing them interleaved again. Without RoPE (cross-attention, or q and k rotated
# beforehand, as the DiT does in its q/k norm: kernels/norm.py) tiles stay whole (SPLIT=False): one dot of
# depth D, and no [rows, D/2, 2] reshuffle, which costs registers and shared memory (sm90, 128x128 tiles,
# 3 stages: 352 KB of shared memory with RoPE on both operands, over the 227 KB an H100 has, against
# 224 KB without; `python -m anyid_rt.kernels.cross_compile`).
#
# Scores are kept in the log2 domain (qk * sm_scale * log2(e), exp2): the saved LSE is
# m + log2(sum(exp2(s - m))) per query row, [B, H, Lq] fp32, internal to this file.
# ----------------------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634


@triton.jit
def load_tile(base, rows, n_rows, stride_l, stride_d, HEAD_DIM: tl.constexpr, MASK: tl.constexpr):
    """[len(rows), HEAD_DIM] tile of one (batch, head) slice; rows >= n_rows read as 0 when MASK."""
    ptrs = base + rows[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :] * stride_d
    if MASK:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_cos_sin(Cos, Sin, rows, n_rows, HALF: tl.constexpr, MASK: tl.constexpr):
    """fp32 [len(rows), HALF] angles from the contiguous [L, D/2] tables."""
    offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    if MASK:
        c = tl.load(Cos + offs, mask=rows[:, None] < n_rows, other=0.0)
        s = tl.load(Sin + offs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        c = tl.load(Cos + offs)
        s = tl.load(Sin + offs)
    return c, s


@triton.jit
def rotate_pairs(y, Cos, Sin, rows, M, N, L, DIRECTION: tl.constexpr, HALF_D: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Rotate the interleaved pairs (2j, 2j+1) of fp32 rows y [BLOCK_R, BLOCK_N] (heads of HALF_D pairs side by
    side, N columns valid) by +theta (DIRECTION 1) or -theta (-1), theta = angle[row % L, j % HALF_D] from the
    contiguous fp32 [L, HALF_D] tables Cos / Sin; rows >= M read angle 0. Used by the q/k norm (norm.py) and
    the 8-bit attention's pre-pass, where a row is one head (N = 2 * HALF_D, L = M)."""
    pairs = tl.arange(0, BLOCK_N // 2)
    offs = (rows % L)[:, None] * HALF_D + (pairs % HALF_D)[None, :]
    pmask = (rows < M)[:, None] & (pairs < N // 2)[None, :]
    c = tl.load(Cos + offs, mask=pmask, other=0.0)
    s = tl.load(Sin + offs, mask=pmask, other=0.0) * DIRECTION
    y_e, y_o = tl.split(tl.reshape(y, [BLOCK_R, BLOCK_N // 2, 2]))
    return tl.reshape(tl.join(y_e * c - y_o * s, y_e * s + y_o * c), [BLOCK_R, BLOCK_N])


@triton.jit
def _load_qk(base, rows, n_rows, stride_l, stride_d, Cos, Sin, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
             ROPE: tl.constexpr, SPLIT: tl.constexpr, MASK: tl.constexpr):
    """A q or k operand. SPLIT: its even and odd lanes [BLOCK, D/2], RoPE-rotated in fp32 and rounded to the
    input dtype when ROPE. Otherwise the whole tile [BLOCK, D], returned twice (the second is never read)."""
    x = load_tile(base, rows, n_rows, stride_l, stride_d, HEAD_DIM, MASK)
    if SPLIT:
        x_e, x_o = tl.split(tl.reshape(x, [BLOCK, HEAD_DIM // 2, 2]))
        if ROPE:
            c, s = _load_cos_sin(Cos, Sin, rows, n_rows, HEAD_DIM // 2, MASK)
            xe = x_e.to(tl.float32)
            xo = x_o.to(tl.float32)
            x_e = (xe * c - xo * s).to(x.dtype)
            x_o = (xe * s + xo * c).to(x.dtype)
    else:
        x_e = x
        x_o = x
    return x_e, x_o


@triton.jit
def _dot_qk(a_e, a_o, b_e, b_o, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b^T over the head dim, from lanes (two dots of depth D/2) or whole tiles (one dot of depth D)."""
    out = tl.dot(a_e, tl.trans(b_e), input_precision=DOT_PREC)
    if SPLIT:
        out = tl.dot(a_o, tl.trans(b_o), out, input_precision=DOT_PREC)
    return out


@triton.jit
def _store_unrotated(base, rows, n_rows, stride_l, stride_d, g_e, g_o, Cos, Sin, BLOCK: tl.constexpr,
                     HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, SPLIT: tl.constexpr):
    """Store the gradient of a q or k operand: by lanes (SPLIT, rotated back when ROPE: the inverse rotation
    gives the gradient of the input) or, whole, g_e."""
    if SPLIT:
        if ROPE:
            c, s = _load_cos_sin(Cos, Sin, rows, n_rows, HEAD_DIM // 2, True)
            g_e_rot = g_e * c + g_o * s
            g_o = g_o * c - g_e * s
            g_e = g_e_rot
        g = tl.reshape(tl.join(g_e, g_o), [BLOCK, HEAD_DIM])
    else:
        g = g_e
    ptrs = base + rows[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :] * stride_d
    tl.store(ptrs, g.to(base.dtype.element_ty), mask=rows[:, None] < n_rows)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q_e, q_o, K, V, CosK, SinK, start_n, L_K, stride_kl, stride_kd, stride_vl,
               stride_vd, QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               ROPE_K: tl.constexpr, SPLIT: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block of the online softmax: rescale the running max/sum/accumulator, add p @ v."""
    rows = start_n + tl.arange(0, BLOCK_N)
    k_e, k_o = _load_qk(K, rows, L_K, stride_kl, stride_kd, CosK, SinK, BLOCK_N, HEAD_DIM, ROPE_K, SPLIT, MASK)
    v = load_tile(V, rows, L_K, stride_vl, stride_vd, HEAD_DIM, MASK)
    qk = _dot_qk(q_e, q_o, k_e, k_o, DOT_PREC, SPLIT) * QK_SCALE  # [BLOCK_M, BLOCK_N], log2 units
    if MASK:
        qk = tl.where(rows[None, :] < L_K, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse, CosQ, SinQ, CosK, SinK,
                     stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
                     stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol, stride_oh, stride_od,
                     H, L_Q, L_K,
                     HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, ROPE_Q: tl.constexpr,
                     ROPE_K: tl.constexpr, SPLIT: tl.constexpr, LANE_D: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (query block, batch*head): O = softmax(rope(q) rope(k)^T * SM_SCALE) v and the row LSE."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Out += b * stride_ob + h * stride_oh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_e, q_o = _load_qk(Q, rows, L_Q, stride_ql, stride_qd, CosQ, SinQ, BLOCK_M, HEAD_DIM, ROPE_Q, SPLIT, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (L_K // BLOCK_N) * BLOCK_N  # full key blocks run unmasked, the tail block once with a mask
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_e, q_o, K, V, CosK, SinK, start_n, L_K, stride_kl, stride_kd,
                                   stride_vl, stride_vd, QK_SCALE, BLOCK_N, HEAD_DIM, ROPE_K, SPLIT, False, DOT_PREC)
    if n_full < L_K:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_e, q_o, K, V, CosK, SinK, n_full, L_K, stride_kl, stride_kd,
                                   stride_vl, stride_vd, QK_SCALE, BLOCK_N, HEAD_DIM, ROPE_K, SPLIT, True, DOT_PREC)
    out = acc / l_i[:, None]
    o_ptrs = Out + rows[:, None] * stride_ol + tl.arange(0, HEAD_DIM)[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None] < L_Q)
    tl.store(Lse + pid_bh.to(tl.int64) * L_Q + rows, m_i + tl.log2(l_i), mask=rows < L_Q)


@triton.jit
def _attn_bwd_delta_kernel(Out, DO, Delta, stride_ob, stride_ol, stride_oh, stride_od,
                           stride_db, stride_dl, stride_dh, stride_dd, H, L_Q,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(O * dO) per query row, [B, H, Lq] fp32 (the softmax-backward correction term)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = load_tile(Out + b * stride_ob + h * stride_oh, rows, L_Q, stride_ol, stride_od, HEAD_DIM, True)
    do = load_tile(DO + b * stride_db + h * stride_dh, rows, L_Q, stride_dl, stride_dd, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * L_Q + rows, delta, mask=rows < L_Q)


@triton.jit
def _bwd_dkdv_inner(dk_e, dk_o, dv, k_e, k_o, v, Q, DO, Lse, Delta, CosQ, SinQ, start_m, L_Q, stride_ql,
                    stride_qd, stride_dol, stride_dod, QK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                    HEAD_DIM: tl.constexpr, ROPE_Q: tl.constexpr, SPLIT: tl.constexpr, MASK: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """One query block's contribution to dK and dV of the program's key block (all transposed: [N, M])."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q_e, q_o = _load_qk(Q, rows, L_Q, stride_ql, stride_qd, CosQ, SinQ, BLOCK_M, HEAD_DIM, ROPE_Q, SPLIT, MASK)
    do = load_tile(DO, rows, L_Q, stride_dol, stride_dod, HEAD_DIM, MASK)
    if MASK:  # padded query rows: lse = +inf gives p = 0, and their dO is 0
        lse = tl.load(Lse + rows, mask=rows < L_Q, other=float("inf"))
        delta = tl.load(Delta + rows, mask=rows < L_Q, other=0.0)
    else:
        lse = tl.load(Lse + rows)
        delta = tl.load(Delta + rows)
    qk_t = _dot_qk(k_e, k_o, q_e, q_o, DOT_PREC, SPLIT)
    p_t = tl.exp2(qk_t * QK_SCALE - lse[None, :])  # [BLOCK_N, BLOCK_M]
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q_e.dtype)
    dk_e = tl.dot(ds_t, q_e, dk_e, input_precision=DOT_PREC)
    if SPLIT:
        dk_o = tl.dot(ds_t, q_o, dk_o, input_precision=DOT_PREC)
    return dk_e, dk_o, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, CosQ, SinQ, CosK, SinK,
                          stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
                          stride_vb, stride_vl, stride_vh, stride_vd, stride_dob, stride_dol, stride_doh, stride_dod,
                          stride_dkb, stride_dkl, stride_dkh, stride_dkd,
                          stride_dvb, stride_dvl, stride_dvh, stride_dvd,
                          H, L_Q, L_K,
                          HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, ROPE_Q: tl.constexpr,
                          ROPE_K: tl.constexpr, SPLIT: tl.constexpr, LANE_D: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (key block, batch*head): dK = SM_SCALE * dS^T rope(q), dV = P^T dO, over all query blocks."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    Lse += pid_bh.to(tl.int64) * L_Q
    Delta += pid_bh.to(tl.int64) * L_Q

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_e, k_o = _load_qk(K, rows, L_K, stride_kl, stride_kd, CosK, SinK, BLOCK_N, HEAD_DIM, ROPE_K, SPLIT, True)
    v = load_tile(V, rows, L_K, stride_vl, stride_vd, HEAD_DIM, True)
    dk_e = tl.zeros([BLOCK_N, LANE_D], tl.float32)  # LANE_D: D/2 when SPLIT, else D (dk_o then stays unused)
    dk_o = tl.zeros([BLOCK_N, LANE_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    m_full = (L_Q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk_e, dk_o, dv = _bwd_dkdv_inner(dk_e, dk_o, dv, k_e, k_o, v, Q, DO, Lse, Delta, CosQ, SinQ, start_m, L_Q,
                                         stride_ql, stride_qd, stride_dol, stride_dod, QK_SCALE, BLOCK_M, HEAD_DIM,
                                         ROPE_Q, SPLIT, False, DOT_PREC)
    if m_full < L_Q:
        dk_e, dk_o, dv = _bwd_dkdv_inner(dk_e, dk_o, dv, k_e, k_o, v, Q, DO, Lse, Delta, CosQ, SinQ, m_full, L_Q,
                                         stride_ql, stride_qd, stride_dol, stride_dod, QK_SCALE, BLOCK_M, HEAD_DIM,
                                         ROPE_Q, SPLIT, True, DOT_PREC)
    _store_unrotated(DK, rows, L_K, stride_dkl, stride_dkd, dk_e * SM_SCALE, dk_o * SM_SCALE, CosK, SinK, BLOCK_N,
                     HEAD_DIM, ROPE_K, SPLIT)
    dv_ptrs = DV + rows[:, None] * stride_dvl + tl.arange(0, HEAD_DIM)[None, :] * stride_dvd
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=rows[:, None] < L_K)


@triton.jit
def _bwd_dq_inner(dq_e, dq_o, q_e, q_o, do, lse, delta, K, V, CosK, SinK, start_n, L_K, stride_kl, stride_kd,
                  stride_vl, stride_vd, QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  ROPE_K: tl.constexpr, SPLIT: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key block's contribution to dQ (by lanes) of the program's query block."""
    rows = start_n + tl.arange(0, BLOCK_N)
    k_e, k_o = _load_qk(K, rows, L_K, stride_kl, stride_kd, CosK, SinK, BLOCK_N, HEAD_DIM, ROPE_K, SPLIT, MASK)
    v = load_tile(V, rows, L_K, stride_vl, stride_vd, HEAD_DIM, MASK)
    qk = _dot_qk(q_e, q_o, k_e, k_o, DOT_PREC, SPLIT)
    p = tl.exp2(qk * QK_SCALE - lse[:, None])
    if MASK:
        p = tl.where(rows[None, :] < L_K, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = (p * (dp - delta[:, None])).to(k_e.dtype)
    dq_e = tl.dot(ds, k_e, dq_e, input_precision=DOT_PREC)
    if SPLIT:
        dq_o = tl.dot(ds, k_o, dq_o, input_precision=DOT_PREC)
    return dq_e, dq_o


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, CosQ, SinQ, CosK, SinK,
                        stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
                        stride_vb, stride_vl, stride_vh, stride_vd, stride_dob, stride_dol, stride_doh, stride_dod,
                        stride_dqb, stride_dql, stride_dqh, stride_dqd,
                        H, L_Q, L_K,
                        HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr, ROPE_Q: tl.constexpr,
                        ROPE_K: tl.constexpr, SPLIT: tl.constexpr, LANE_D: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (query block, batch*head): dQ = SM_SCALE * dS rope(k), over all key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_e, q_o = _load_qk(Q, rows, L_Q, stride_ql, stride_qd, CosQ, SinQ, BLOCK_M, HEAD_DIM, ROPE_Q, SPLIT, True)
    do = load_tile(DO, rows, L_Q, stride_dol, stride_dod, HEAD_DIM, True)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * L_Q + rows, mask=rows < L_Q, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * L_Q + rows, mask=rows < L_Q, other=0.0)
    dq_e = tl.zeros([BLOCK_M, LANE_D], tl.float32)
    dq_o = tl.zeros([BLOCK_M, LANE_D], tl.float32)
    n_full = (L_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq_e, dq_o = _bwd_dq_inner(dq_e, dq_o, q_e, q_o, do, lse, delta, K, V, CosK, SinK, start_n, L_K, stride_kl,
                                   stride_kd, stride_vl, stride_vd, QK_SCALE, BLOCK_N, HEAD_DIM, ROPE_K, SPLIT, False,
                                   DOT_PREC)
    if n_full < L_K:
        dq_e, dq_o = _bwd_dq_inner(dq_e, dq_o, q_e, q_o, do, lse, delta, K, V, CosK, SinK, n_full, L_K, stride_kl,
                                   stride_kd, stride_vl, stride_vd, QK_SCALE, BLOCK_N, HEAD_DIM, ROPE_K, SPLIT, True,
                                   DOT_PREC)
    _store_unrotated(DQ, rows, L_Q, stride_dql, stride_dqd, dq_e * SM_SCALE, dq_o * SM_SCALE, CosQ, SinQ, BLOCK_M,
                     HEAD_DIM, ROPE_Q, SPLIT)


# ----------------------------------------------------------------------------------------------------------
# Autotuning. One tuner per device family (`config_family`) over the same kernels, because what fits differs:
# a program may use 227 KB of shared memory on sm90 (H100/H200), 163 KB on sm80 (A100) and 99 KB on sm86/sm89
# (RTX 30xx/40xx, A10, L4, L40S). No config uses TMA, wgmma-specific code or warp specialisation. The lists
# were chosen from ptxas reports (`python -m anyid_rt.kernels.cross_compile`, bench/results/
# kernel_resources.md), at head dim 128 in bf16 without RoPE, the DiT's case: every config fits its family's
# shared memory, and 4-warp 128-row tiles were dropped (1.3-2 KB of register spills per thread against 0 with
# 8 warps); their speed is not yet measured on a GPU (bench/bench_attention.py). Under the interpreter: one
# 32x32 config, which keeps the program count low and still runs several key blocks plus a masked tail.
# ----------------------------------------------------------------------------------------------------------
def _configs(entries: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if INTERPRET:
        entries = [(32, 32, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in entries]


_KEY = ["L_Q", "L_K", "HEAD_DIM", "ROPE_Q", "ROPE_K"]  # the tuner adds the tensors' dtypes to the key
#                                  (BLOCK_M, BLOCK_N, num_warps, num_stages)
_CONFIGS = {
    "fwd": {"sm90": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 8, 3)],
            "sm80": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)],
            "sm8x": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2)]},
    "dkdv": {"sm90": [(64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (64, 64, 8, 3)],
             "sm80": [(64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3)],
             "sm8x": [(64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 3)]},
    "dq": {"sm90": [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2)],
           "sm80": [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 8, 2)],
           "sm8x": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 3)]},
}
_TUNED = {(kind, family): triton.autotune(_configs(entries), key=_KEY)(kernel)
          for kind, kernel in (("fwd", _attn_fwd_kernel), ("dkdv", _attn_bwd_dkdv_kernel), ("dq", _attn_bwd_dq_kernel))
          for family, entries in _CONFIGS[kind].items()}
_DELTA_BLOCK_M = 64


def _consts(q: torch.Tensor, rope_q: bool, rope_k: bool) -> dict:
    """Compile-time constants shared by the attention kernels."""
    D = q.shape[-1]
    split = rope_q or rope_k  # without RoPE the tiles stay whole: one dot of depth D instead of two of D/2
    return dict(HEAD_DIM=D, SM_SCALE=1.0 / math.sqrt(D), QK_SCALE=_LOG2E / math.sqrt(D), ROPE_Q=rope_q,
                ROPE_K=rope_k, SPLIT=split, LANE_D=D // 2 if split else D,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 stays fp32


# ----------------------------------------------------------------------------------------------------------
# Operators. torch.library.custom_op with fake (shape) functions and register_autograd: torch.compile
# keeps each op as one graph node (no graph break, CUDA-graph safe) and torch.export records it. triton_op
# would also let Inductor see the kernels, but nothing fuses into them, and its functional decomposition
# launches the kernels on fake tensors under TRITON_INTERPRET, which would leave the compile/export path
# untestable on CPU. Absent RoPE tables are None and replaced by q in the launch (a never-read pointer).
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("anyid_rt::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_q: torch.Tensor | None,
                   sin_q: torch.Tensor | None, cos_k: torch.Tensor | None,
                   sin_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Lq, H, D] in q.dtype, lse [B, H, Lq] fp32 in log2 units of the scaled scores)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    kernel = _TUNED["fwd", config_family(q.device)]

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    kernel[grid](
        q, k, v, out, lse,
        q if cos_q is None else cos_q, q if sin_q is None else sin_q,
        q if cos_k is None else cos_k, q if sin_k is None else sin_k,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Lq, Lk,
        **_consts(q, cos_q is not None, cos_k is not None))
    return out, lse


@torch.library.custom_op("anyid_rt::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, cos_q: torch.Tensor | None, sin_q: torch.Tensor | None,
                   cos_k: torch.Tensor | None,
                   sin_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes, shapes [B, L, H, D]; gradients reach q and k through RoPE."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dq = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Lk, H, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Lk, H, D), dtype=v.dtype, device=v.device)
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    family = config_family(q.device)
    dkdv_kernel, dq_kernel = _TUNED["dkdv", family], _TUNED["dq", family]
    rope = (q if cos_q is None else cos_q, q if sin_q is None else sin_q,
            q if cos_k is None else cos_k, q if sin_k is None else sin_k)
    consts = _consts(q, cos_q is not None, cos_k is not None)

    _attn_bwd_delta_kernel[(triton.cdiv(Lq, _DELTA_BLOCK_M), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, Lq, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M)

    def grid_k(meta):
        return (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)

    dkdv_kernel[grid_k](
        q, k, v, dout, lse, delta, dk, dv, *rope,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), H, Lq, Lk, **consts)

    def grid_q(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq, *rope,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), H, Lq, Lk, **consts)
    return dq, dk, dv


@_attention_fwd.register_fake
def _(q, k, v, cos_q, sin_q, cos_k, sin_k):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cos_q, sin_q, cos_k, sin_k):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, cos_q, sin_q, cos_k, sin_k = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cos_q, sin_q, cos_k, sin_k)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cos_q, sin_q, cos_k, sin_k = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, cos_q, sin_q, cos_k, sin_k)
    return dq, dk, dv, None, None, None, None


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _rope_tables(rope: Rope, L: int, D: int, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if rope is None:
        return None, None
    cos, sin = rope
    for t in (cos, sin):
        if tuple(t.shape) != (L, D // 2):
            raise ValueError(f"{name} tables must be [L, D/2] = [{L}, {D // 2}], got {tuple(t.shape)}")
        if t.requires_grad:
            raise ValueError(f"{name} tables require grad; the Triton attention has no gradient for RoPE angles "
                             "(detach them, or use backend='torch')")
    return cos.float().contiguous(), sin.float().contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope_q: Rope = None,
              rope_k: Rope = None) -> torch.Tensor:
    """Triton fused RoPE + flash attention; same contract and result as `attention_ref`.

    Forward: one pass over K/V per query block (online softmax, fp32 accumulation, P rounded to the input
    dtype before P @ V as flash attention does), RoPE applied to the q and k tiles in the kernel. Backward
    (autograd, registered on the op): Triton FA2-style dK/dV and dQ kernels from the saved LSE, with the
    inverse rotation fused; no gradient for the RoPE tables. Inputs [B, L, H, D] with any strides, head dim
    32, 64 or 128, fp16 / bf16 / fp32 (fp32 dots run in IEEE fp32, not TF32). Output is contiguous
    [B, Lq, H, D]. Registered as torch.ops.anyid_rt.attention_fwd / attention_bwd.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k and v must be [B, Lk, H, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if D not in _HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported by the Triton attention (one of {_HEAD_DIMS}); "
                         "use backend='torch'")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype among {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[1] == 0:
        raise ValueError("attention over zero keys is undefined; Lk must be at least 1")
    for t in (q, k, v):
        check_triton_device(t)
        if max(t.shape[1] * t.stride(1), t.shape[-1] * t.stride(-1)) >= 2**31:
            raise ValueError(f"a [B, L, H, D] slice of shape {tuple(t.shape)} with strides {t.stride()} needs "
                             "64-bit row offsets, which the Triton attention does not use; split the batch")
    cos_q, sin_q = _rope_tables(rope_q, Lq, D, "rope_q")
    cos_k, sin_k = _rope_tables(rope_k, k.shape[1], D, "rope_k")
    return _attention_fwd(q, k, v, cos_q, sin_q, cos_k, sin_k)[0]
