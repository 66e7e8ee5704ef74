"""Attention: softmax(q k^T / sqrt(D)) v, no mask, not causal.

Shapes: q [B, Lq, H, D], k and v [B, Lk, H, D]; Lk may differ from Lq (text, reference tokens). The DiT
rotates q and k by its 3-axis RoPE in the q/k norm before calling this (kernels/norm.py `rms_norm_rope`):
there each token is rotated once, where inside this kernel every key tile would be rotated again for every
query block, at a cost in registers and shared memory.

`attention_ref` is the spec, the CPU / export path and the test oracle; `attention` is the Triton kernel
(flash attention forward, FA2-style backward) with the same contract.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import INTERPRET, check_triton_device, config_family

HEAD_DIMS = (32, 64, 128)  # head dims the Triton attention kernels (this file, attention_8bit.py) compile for
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # their input dtypes
LOG2E = 1.4426950408889634  # scores are scaled by log2(e) and exponentiated with exp2


def check_qkv_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, Lq, H, D], k and v [B, Lk, H, D] with Lk >= 1 (the Triton kernels' shared contract)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k and v must be [B, Lk, H, D] matching q {tuple(q.shape)}; got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[1] == 0:
        raise ValueError("attention over zero keys is undefined; Lk must be at least 1")


def check_triton_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str, instead: str) -> None:
    """What the Triton attention kernels (this file, attention_8bit.py) accept: shapes, a compiled head dim, one
    dtype of DTYPES, a Triton device, 32-bit row offsets. `instead` says what to use otherwise."""
    check_qkv_shapes(q, k, v)
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported by {kernel} (one of {HEAD_DIMS}); {instead}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"q, k, v must share one dtype among {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    for t in (q, k, v):
        check_triton_device(t)
        if max(t.shape[1] * t.stride(1), t.shape[-1] * t.stride(-1)) >= 2**31:
            raise ValueError(f"a [B, L, H, D] slice of shape {tuple(t.shape)} with strides {t.stride()} needs "
                             f"64-bit row offsets, which {kernel} does not use; split the batch")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention: SDPA in the input dtype. Returns [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # [B, Lq, H, D]


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: flash attention (FA2 algorithm: online softmax forward, saved log-sum-exp, separate dK/dV
# and dQ backward kernels, no atomics). Scores are kept in the log2 domain (qk * sm_scale * log2(e), exp2):
# the saved LSE is m + log2(sum(exp2(s - m))) per query row, [B, H, Lq] fp32, internal to this file.
# ----------------------------------------------------------------------------------------------------------
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
def batch_head(H):
    """Program axis 1 runs over batch * head: (that index, b, h), in int64 for pointer offsets."""
    pid_bh = tl.program_id(1)
    return pid_bh.to(tl.int64), (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _head_slices(Q, K, V, O, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh):
    """The (b, h) [L, D] slices of q, k, v and one more [B, L, H, D] tensor (the output, or dO)."""
    return (Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
            O + b * stride_ob + h * stride_oh)


@triton.jit
def online_softmax_init(BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Running row max (-inf), running row sum and output accumulator before the first key block."""
    return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
            tl.zeros([BLOCK_M, HEAD_DIM], tl.float32))


@triton.jit
def _store_tile(base, rows, n_rows, stride_l, stride_d, x, HEAD_DIM: tl.constexpr):
    """Store the fp32 tile x [len(rows), HEAD_DIM] in base's dtype, rows < n_rows only."""
    ptrs = base + rows[:, None] * stride_l + tl.arange(0, HEAD_DIM)[None, :] * stride_d
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows[:, None] < n_rows)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, start_n, L_K, stride_kl, stride_kd, stride_vl, stride_vd,
               QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """One key block of the online softmax: rescale the running max/sum/accumulator, add p @ v."""
    rows = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(K, rows, L_K, stride_kl, stride_kd, HEAD_DIM, MASK)
    v = load_tile(V, rows, L_K, stride_vl, stride_vd, HEAD_DIM, MASK)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * QK_SCALE  # [BLOCK_M, BLOCK_N], log2 units
    if MASK:
        qk = tl.where(rows[None, :] < L_K, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)  # 0 on the first block (m_i = -inf)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse,
                     stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
                     stride_vb, stride_vl, stride_vh, stride_vd, stride_ob, stride_ol, stride_oh, stride_od,
                     H, L_Q, L_K,
                     HEAD_DIM: tl.constexpr, QK_SCALE: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (query block, batch*head): O = softmax(q k^T / sqrt(D)) v and the row LSE."""
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    Q, K, V, Out = _head_slices(Q, K, V, Out, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                               stride_ob, stride_oh)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_tile(Q, rows, L_Q, stride_ql, stride_qd, HEAD_DIM, True)
    m_i, l_i, acc = online_softmax_init(BLOCK_M, HEAD_DIM)
    n_full = (L_K // BLOCK_N) * BLOCK_N  # full key blocks run unmasked, the tail block once with a mask
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, start_n, L_K, stride_kl, stride_kd, stride_vl, stride_vd,
                                   QK_SCALE, BLOCK_N, HEAD_DIM, False, DOT_PREC)
    if n_full < L_K:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, n_full, L_K, stride_kl, stride_kd, stride_vl, stride_vd,
                                   QK_SCALE, BLOCK_N, HEAD_DIM, True, DOT_PREC)
    _store_tile(Out, rows, L_Q, stride_ol, stride_od, acc / l_i[:, None], HEAD_DIM)
    tl.store(Lse + bh * L_Q + rows, m_i + tl.log2(l_i), mask=rows < L_Q)


@triton.jit
def _attn_bwd_delta_kernel(Out, DO, Delta, stride_ob, stride_ol, stride_oh, stride_od,
                           stride_db, stride_dl, stride_dh, stride_dd, H, L_Q,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(O * dO) per query row, [B, H, Lq] fp32 (the softmax-backward correction term)."""
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = load_tile(Out + b * stride_ob + h * stride_oh, rows, L_Q, stride_ol, stride_od, HEAD_DIM, True)
    do = load_tile(DO + b * stride_db + h * stride_dh, rows, L_Q, stride_dl, stride_dd, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * L_Q + rows, delta, mask=rows < L_Q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, start_m, L_Q, stride_ql, stride_qd, stride_dol, stride_dod,
                    QK_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """One query block's contribution to dK and dV of the program's key block (all transposed: [N, M])."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(Q, rows, L_Q, stride_ql, stride_qd, HEAD_DIM, MASK)
    do = load_tile(DO, rows, L_Q, stride_dol, stride_dod, HEAD_DIM, MASK)
    if MASK:  # padded query rows: lse = +inf gives p = 0, and their dO is 0
        lse = tl.load(Lse + rows, mask=rows < L_Q, other=float("inf"))
        delta = tl.load(Delta + rows, mask=rows < L_Q, other=0.0)
    else:
        lse = tl.load(Lse + rows)
        delta = tl.load(Delta + rows)
    qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    p_t = tl.exp2(qk_t * QK_SCALE - lse[None, :])  # [BLOCK_N, BLOCK_M]
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk = tl.dot(ds_t, q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV,
                          stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
                          stride_vb, stride_vl, stride_vh, stride_vd, stride_dob, stride_dol, stride_doh, stride_dod,
                          stride_dkb, stride_dkl, stride_dkh, stride_dkd,
                          stride_dvb, stride_dvl, stride_dvh, stride_dvd,
                          H, L_Q, L_K,
                          HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr,
                          DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (key block, batch*head): dK = SM_SCALE * dS^T q, dV = P^T dO, over all query blocks."""
    pid_n = tl.program_id(0)
    bh, b, h = batch_head(H)
    Q, K, V, DO = _head_slices(Q, K, V, DO, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                               stride_dob, stride_doh)
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    Lse += bh * L_Q
    Delta += bh * L_Q

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = load_tile(K, rows, L_K, stride_kl, stride_kd, HEAD_DIM, True)
    v = load_tile(V, rows, L_K, stride_vl, stride_vd, HEAD_DIM, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    m_full = (L_Q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, start_m, L_Q, stride_ql, stride_qd, stride_dol,
                                 stride_dod, QK_SCALE, BLOCK_M, HEAD_DIM, False, DOT_PREC)
    if m_full < L_Q:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, m_full, L_Q, stride_ql, stride_qd, stride_dol,
                                 stride_dod, QK_SCALE, BLOCK_M, HEAD_DIM, True, DOT_PREC)
    _store_tile(DK, rows, L_K, stride_dkl, stride_dkd, dk * SM_SCALE, HEAD_DIM)
    _store_tile(DV, rows, L_K, stride_dvl, stride_dvd, dv, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, start_n, L_K, stride_kl, stride_kd, stride_vl, stride_vd,
                  QK_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """One key block's contribution to dQ of the program's query block."""
    rows = start_n + tl.arange(0, BLOCK_N)
    k = load_tile(K, rows, L_K, stride_kl, stride_kd, HEAD_DIM, MASK)
    v = load_tile(V, rows, L_K, stride_vl, stride_vd, HEAD_DIM, MASK)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    p = tl.exp2(qk * QK_SCALE - lse[:, None])
    if MASK:
        p = tl.where(rows[None, :] < L_K, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    return tl.dot(ds, k, dq, input_precision=DOT_PREC)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, Lse, Delta, DQ,
                        stride_qb, stride_ql, stride_qh, stride_qd, stride_kb, stride_kl, stride_kh, stride_kd,
                        stride_vb, stride_vl, stride_vh, stride_vd, stride_dob, stride_dol, stride_doh, stride_dod,
                        stride_dqb, stride_dql, stride_dqh, stride_dqd,
                        H, L_Q, L_K,
                        HEAD_DIM: tl.constexpr, SM_SCALE: tl.constexpr, QK_SCALE: tl.constexpr,
                        DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (query block, batch*head): dQ = SM_SCALE * dS k, over all key blocks."""
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    Q, K, V, DO = _head_slices(Q, K, V, DO, b, h, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                               stride_dob, stride_doh)
    DQ += b * stride_dqb + h * stride_dqh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_tile(Q, rows, L_Q, stride_ql, stride_qd, HEAD_DIM, True)
    do = load_tile(DO, rows, L_Q, stride_dol, stride_dod, HEAD_DIM, True)
    lse = tl.load(Lse + bh * L_Q + rows, mask=rows < L_Q, other=0.0)
    delta = tl.load(Delta + bh * L_Q + rows, mask=rows < L_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (L_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, start_n, L_K, stride_kl, stride_kd, stride_vl, stride_vd,
                           QK_SCALE, BLOCK_N, HEAD_DIM, False, DOT_PREC)
    if n_full < L_K:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, n_full, L_K, stride_kl, stride_kd, stride_vl, stride_vd,
                           QK_SCALE, BLOCK_N, HEAD_DIM, True, DOT_PREC)
    _store_tile(DQ, rows, L_Q, stride_dql, stride_dqd, dq * SM_SCALE, HEAD_DIM)


# ----------------------------------------------------------------------------------------------------------
# Autotuning. One tuner per device family (`config_family`) over the same kernels, because what fits differs:
# a program may use 227 KB of shared memory on sm90 (H100/H200), 163 KB on sm80 (A100) and 99 KB on sm86/sm89
# (RTX 30xx/40xx, A10, L4, L40S). No config uses TMA, wgmma-specific code or warp specialisation. The lists
# were chosen from ptxas reports (`python -m anyid_rt.bench.cross_compile`, bench/results/
# kernel_resources.md), at head dim 128 in bf16, the DiT's case: every config fits its family's
# shared memory, and 4-warp 128-row tiles were dropped (1.3-2 KB of register spills per thread against 0 with
# 8 warps); their speed is not yet measured on a GPU (bench/bench_attention.py). Under the interpreter: one
# 32x32 config, which keeps the program count low and still runs several key blocks plus a masked tail.
# ----------------------------------------------------------------------------------------------------------
def _configs(entries: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if INTERPRET:
        entries = [(32, 32, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in entries]


_KEY = ["L_Q", "L_K", "HEAD_DIM"]  # the tuner adds the tensors' dtypes to the key
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


def _consts(q: torch.Tensor) -> dict:
    """Compile-time constants shared by the attention kernels (the forward takes all but SM_SCALE)."""
    D = q.shape[-1]
    return dict(HEAD_DIM=D, QK_SCALE=LOG2E / math.sqrt(D),
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")  # fp32 stays fp32


# ----------------------------------------------------------------------------------------------------------
# Operators. torch.library.custom_op with fake (shape) functions and register_autograd: torch.compile
# keeps each op as one graph node (no graph break, CUDA-graph safe) and torch.export records it. triton_op
# would also let Inductor see the kernels, but nothing fuses into them, and its functional decomposition
# launches the kernels on fake tensors under TRITON_INTERPRET, which would leave the compile/export path
# untestable on CPU.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("anyid_rt::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Lq, Lk, **_consts(q))
    return out, lse


@torch.library.custom_op("anyid_rt::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes, shapes [B, L, H, D]."""
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
    consts = dict(_consts(q), SM_SCALE=1.0 / math.sqrt(D))

    _attn_bwd_delta_kernel[(triton.cdiv(Lq, _DELTA_BLOCK_M), B * H)](
        out, dout, delta, *out.stride(), *dout.stride(), H, Lq, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M)

    def grid_k(meta):
        return (triton.cdiv(Lk, meta["BLOCK_N"]), B * H)

    dkdv_kernel[grid_k](
        q, k, v, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(), H, Lq, Lk, **consts)

    def grid_q(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), H, Lq, Lk, **consts)
    return dq, dk, dv


@_attention_fwd.register_fake
def _(q, k, v):
    B, Lq, H, D = q.shape
    return q.new_empty((B, Lq, H, D)), q.new_empty((B, H, Lq), dtype=torch.float32)


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _attention_backward(ctx, dout, _dlse):
    return _attention_bwd(dout, *ctx.saved_tensors)


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Triton flash attention; same contract and result as `attention_ref`.

    Forward: one pass over K/V per query block (online softmax, fp32 accumulation, P rounded to the input
    dtype before P @ V as flash attention does). Backward (autograd, registered on the op): Triton
    FA2-style dK/dV and dQ kernels from the saved LSE. Inputs [B, L, H, D] with any strides, head dim 32, 64
    or 128, fp16 / bf16 / fp32 (fp32 dots run in IEEE fp32, not TF32). Output is contiguous [B, Lq, H, D].
    Registered as torch.ops.anyid_rt.attention_fwd / attention_bwd.
    """
    check_triton_qkv(q, k, v, "the Triton attention", "use backend='torch'")
    return _attention_fwd(q, k, v)[0]
