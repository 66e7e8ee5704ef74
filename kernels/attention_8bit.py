"""8-bit attention (SageAttention-style): INT8 Q/K with smoothed K, FP8 or 16-bit P/V.

Same contract as `attention.attention_ref` (q [B, Lq, H, D], k and v [B, Lk, H, D], as the DiT's q/k norm
leaves them, RoPE applied; softmax scale 1/sqrt(D), no mask, not causal; output [B, Lq, H, D] in q.dtype),
forward only (inference). `attention_8bit_ref` is the plain-PyTorch emulation of exactly the quantisation
below: the spec, the CPU / export path and the kernel's test oracle. `attention_8bit` is the Triton
implementation (a quantisation pre-pass, then one attention kernel).

Numerics (both implementations, in this order, in fp32 unless stated):

1. Smooth K: subtract its mean over tokens per (batch, head, channel). Every score of a query row then
   shifts by the same q . mean, so softmax(QK^T) is unchanged, but a per-channel offset shared by all keys
   no longer sets the INT8 scale.
2. INT8 Q and K, symmetric, one scale per token and head: scale = amax over the D channels / 127,
   x8 = trunc(x * (127 / amax) +- 0.5) (round half away from zero: Triton has no portable rint, and this
   form is computed identically by both). Q's scale also carries sm_scale * log2(e), so the scores come out
   in log2 units. Per-token rather than per-block scales: the same kernel cost (one more multiply per score;
   the scale vectors are loaded once per tile) for 1.6x lower error (a Q/K-only emulation on q and k with
   outlier channels: relative L2 error 2.6e-2 per token, 4.1e-2 with 32-row Q and 128-row K blocks).
3. S = (q8 @ k8^T, exact in int32) * k_scale * q_scale, fp32.
4. Online softmax over key tiles of KV_TILE = 128 keys, in order, in fp32: m = running row max,
   P = exp2(S - (m - log2 448)) for the FP8 path, so that P lies in [0, 448], the E4M3 range, without a
   multiply; P = exp2(S - m) for the 16-bit path; the row sum l accumulates the unrounded fp32 P. The tile
   width is part of the numerics (P is rounded relative to the running max), so it is fixed, not tuned.
5. P @ V per tile as a fresh fp32-accumulated dot, added to the fp32 accumulator (acc = acc * alpha + P_t V_t:
   Hopper's FP8 MMA accumulates with reduced precision, so no dot's sum grows longer than one tile).
   pv="fp8": P rounded to E4M3 (nearest-even, saturating), V quantised per (batch, head, channel) over all
   tokens, v8 = e4m3(v * (448 / amax)), v_scale = amax / 448. pv="bf16" / "fp16": P and V in that dtype.
6. out = acc / l (* v_scale), rounded to q.dtype.

Accuracy (tests/test_attention_8bit.py: the emulation against fp64 attention, L=512, D=128, scores of std 2,
130 seeds): keys with a per-channel mean of 12x their token spread give a relative L2 error of 2.0e-2 on
average (max 2.8e-2, cosine >= 0.9993) with pv="fp8", and 6.8e-2 (2.6x to 4.6x per seed) without
smoothing; adding four 8x outlier channels to q and to k gives 2.7e-2 (max 3.8e-2) with pv="fp8" and
2.1e-2 (max 3.4e-2) with pv="bf16". bf16 SDPA on the same (fp32) inputs: 1.8e-2 (max 3.3e-2). Most of the
error is INT8 rounding of Q/K where outlier channels set a token's scale; E4M3 P/V adds about a quarter.

Why INT8 rather than E4M3 for Q/K: INT8 has a uniform step of amax/127 where E4M3 keeps 3 mantissa bits
(SageAttention2 chose INT8 Q/K for accuracy too); it runs at the FP8 tensor-core rate on sm90 and also on
sm80; and the Triton interpreter computes int8 dots exactly, so the kernel is tested on a CPU. FP8 P/V
needs sm89+ (Ada, Hopper): on older GPUs pv="fp8" raises and names pv="bf16".
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, check_triton_device, config_family, device_capability
from .attention import LOG2E, batch_head, check_qkv_shapes, check_triton_qkv, load_tile, online_softmax_init

PV_DTYPES = {"fp8": torch.float8_e4m3fn, "bf16": torch.bfloat16, "fp16": torch.float16}
KV_TILE = 128  # keys per online-softmax step (fixed: part of the numerics, see step 4)
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_LOG2_FP8_MAX = math.log2(FP8_MAX)


class Quantized(NamedTuple):
    """What the attention kernel reads: quantised operands and their fp32 scales (all per batch and head)."""

    q8: torch.Tensor  # [B, H, Lq, D] int8
    q_scale: torch.Tensor  # [B, H, Lq] fp32 per row, times sm_scale * log2(e)
    k8: torch.Tensor  # [B, H, Lk, D] int8, smoothed
    k_scale: torch.Tensor  # [B, H, Lk] fp32 per row
    v: torch.Tensor  # [B, H, Lk, D] view: e4m3 stored token-contiguous ([B, H, D, Lk]), or bf16 / fp16
    v_scale: torch.Tensor | None  # [B, H, D] fp32 for e4m3 V, None for 16-bit V


# ----------------------------------------------------------------------------------------------------------
# Reference: plain PyTorch, the same operations in the same order as the kernels (fp32 unless stated).
# ----------------------------------------------------------------------------------------------------------
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def _quant_int8_ref(x: torch.Tensor, extra: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, L, D] fp32 -> (int8 [B, H, L, D], per-row scale [B, H, L] fp32 times `extra`)."""
    amax = x.abs().amax(dim=-1)  # [B, H, L]
    amax = torch.where(amax > 0, amax, 1.0)  # an all-zero row: any scale represents it
    inv = torch.full_like(amax, INT8_MAX) / amax  # a true division (torch computes `c / t` as t.reciprocal() * c)
    x8 = _round_half_away(x * inv[..., None]).to(torch.int8)
    return x8.contiguous(), (amax / INT8_MAX * extra).contiguous()


def quantize_8bit_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pv: str = "fp8",
                      smooth_k: bool = True) -> Quantized:
    """Steps 1-2 and V's rounding (step 5) of the module docstring, in torch."""
    _check_pv(pv)
    D = q.shape[-1]
    qf, kf = q.float().transpose(1, 2), k.float().transpose(1, 2)  # [B, H, L, D]
    if smooth_k:
        kf = kf - kf.sum(dim=2, keepdim=True) / kf.shape[2]
    q8, q_scale = _quant_int8_ref(qf, LOG2E / math.sqrt(D))
    k8, k_scale = _quant_int8_ref(kf, 1.0)
    if pv == "fp8":
        vf = v.float().transpose(1, 2)  # [B, H, Lk, D]
        amax = vf.abs().amax(dim=2)  # [B, H, D]
        amax = torch.where(amax > 0, amax, 1.0)
        inv = torch.full_like(amax, FP8_MAX) / amax
        v8 = (vf * inv[:, :, None, :]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        v8 = v8.transpose(2, 3).contiguous().transpose(2, 3)  # token-contiguous storage, as the kernel reads it
        return Quantized(q8, q_scale, k8, k_scale, v8, amax / FP8_MAX)
    return Quantized(q8, q_scale, k8, k_scale, v.to(PV_DTYPES[pv]).transpose(1, 2), None)


def attention_8bit_core_ref(x: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """Steps 3-6 on quantised operands: the attention kernel's arithmetic, tile by tile. Returns [B, Lq, H, D]."""
    B, H, Lq, D = x.q8.shape
    Lk = x.k8.shape[2]
    fp8 = x.v_scale is not None
    shift = _LOG2_FP8_MAX if fp8 else 0.0
    qd = x.q8.double()  # int8 products summed in float64 are exact, as the kernel's int32 sums
    m = torch.full((B, H, Lq), float("-inf"), device=qd.device)
    l = torch.zeros((B, H, Lq), device=qd.device)
    acc = torch.zeros((B, H, Lq, D), device=qd.device)
    for n0 in range(0, Lk, KV_TILE):
        raw = (qd @ x.k8[:, :, n0:n0 + KV_TILE].double().transpose(-1, -2)).float()  # [B, H, Lq, n]
        s = raw * x.k_scale[:, :, None, n0:n0 + KV_TILE] * x.q_scale[..., None]  # log2 units
        m_new = torch.maximum(m, s.amax(dim=-1))
        alpha = torch.exp2(m - m_new)  # 0 on the first tile
        p = torch.exp2(s - (m_new - shift)[..., None])
        l = l * alpha + p.sum(dim=-1)
        p_op = p.clamp(max=FP8_MAX).to(torch.float8_e4m3fn) if fp8 else p.to(x.v.dtype)
        acc = acc * alpha[..., None] + p_op.float() @ x.v[:, :, n0:n0 + KV_TILE].float()
        m = m_new
    out = acc / l[..., None]
    if fp8:
        out = out * x.v_scale[:, :, None, :]
    return out.transpose(1, 2).to(out_dtype)  # [B, Lq, H, D]


def attention_8bit_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pv: str = "fp8",
                       smooth_k: bool = True) -> torch.Tensor:
    """Plain-PyTorch 8-bit attention: the module docstring's numerics, exactly. Returns [B, Lq, H, D] in q.dtype."""
    _check_inputs(q, k, v)
    return attention_8bit_core_ref(quantize_8bit_ref(q, k, v, pv=pv, smooth_k=smooth_k), q.dtype)


def _check_pv(pv: str) -> None:
    if pv not in PV_DTYPES:
        raise ValueError(f"pv={pv!r} is not one of {tuple(PV_DTYPES)}")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_qkv_shapes(q, k, v)
    D = q.shape[-1]
    if D % 2 or D > 1024:  # int8 dot products over D <= 1040 stay below 2^24: exact in the fp32 scores
        raise ValueError(f"head dim {D} must be even and at most 1024 for the 8-bit attention")


def fp8_supported(capability: tuple[int, int]) -> bool:
    """FP8 tensor-core dots (E4M3 P @ V) exist from sm89 on (Ada, Hopper); INT8 dots from sm80."""
    return tuple(capability) >= (8, 9)


def require_pv_support(pv: str, capability: tuple[int, int] | None) -> None:
    """Raise for a P/V dtype the device (CUDA capability, or None for the Triton interpreter) cannot run."""
    if capability is not None and pv == "fp8" and not fp8_supported(capability):
        raise RuntimeError(f"pv='fp8' needs FP8 tensor cores (sm89 or newer: Ada, Hopper), this GPU is "
                           f"sm{capability[0]}{capability[1]}; use pv='bf16' (INT8 Q/K runs on sm80)")
    if capability is None and pv == "bf16":
        raise RuntimeError("the Triton interpreter computes bf16 dots wrongly (triton 3.6-3.9); use pv='fp16' "
                           "or 'fp8' on a CPU, pv='bf16' on a GPU")


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. A pre-pass quantises Q, K (smoothing + INT8, per row) and V (per-channel E4M3,
# stored token-contiguous: Hopper's FP8 MMA wants its B operand K-major, and for P @ V the K dimension is the
# token, as in Triton's FP8 attention tutorial); K's mean and V's amax come from a reduction kernel first.
# The attention kernel then runs the online softmax of steps 3-6 over key tiles of KV_TILE keys.
#
# Under the Triton interpreter the fp32 -> E4M3 cast rounds wrongly (triton 3.9: 1.96 -> 1.0, 0.0019 -> 0, a
# carry out of the mantissa is lost; 3844 of 65536 random values differed from torch), while casts of values
# that E4M3 represents exactly are exact; so there (only) values are first rounded to E4M3 in fp32 arithmetic
# (_round_e4m3), and the GPU path uses the hardware's round-to-nearest-even, satfinite conversion.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _round_e4m3(x):
    """Round fp32 x (|x| <= 448) to the nearest E4M3 value, ties to even; the result stays fp32.

    The quantum is 2^(e-3) for |x| in [2^e, 2^(e+1)), e >= -6, and the subnormal step 2^-9 below: adding and
    subtracting magic = quantum * 2^23 (whose fp32 ulp is the quantum) rounds to a multiple of it.
    """
    exp_bits = x.to(tl.int32, bitcast=True) & 0x7F800000
    quantum_bits = tl.maximum(exp_bits - (3 << 23), (127 - 9) << 23)
    magic = (quantum_bits + (23 << 23)).to(tl.float32, bitcast=True)
    r = (tl.abs(x) + magic) - magic
    return tl.where(x < 0, -r, r)


@triton.jit
def _kv_stats_kernel(K, V, KSum, VMax,
                     stride_kb, stride_kl, stride_kh, stride_kd, stride_vb, stride_vl, stride_vh, stride_vd,
                     H, L_K, N_BLOCKS,
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SMOOTH_K: tl.constexpr, V_FP8: tl.constexpr):
    """Program (row block, batch*head): partial column sums of k and column amax of |v|, [BH, blocks, D]."""
    pid_l = tl.program_id(0)
    bh, b, h = batch_head(H)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    out = (bh * N_BLOCKS + pid_l) * HEAD_DIM + tl.arange(0, HEAD_DIM)
    if SMOOTH_K:
        k = load_tile(K + b * stride_kb + h * stride_kh, rows, L_K, stride_kl, stride_kd, HEAD_DIM, True)
        tl.store(KSum + out, tl.sum(k.to(tl.float32), 0))
    if V_FP8:
        v = load_tile(V + b * stride_vb + h * stride_vh, rows, L_K, stride_vl, stride_vd, HEAD_DIM, True)
        v = v.to(tl.float32)
        tl.store(VMax + out, tl.max(tl.abs(v), 0))


@triton.jit
def _quant_int8_kernel(X, Mean, Xq, Scale, stride_xb, stride_xl, stride_xh, stride_xd, H, L,
                       EXTRA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, SMOOTH: tl.constexpr):
    """Program (row block, batch*head): rows of x -> minus Mean -> int8 [BH, L, D] + scale [BH, L]."""
    pid_l = tl.program_id(0)
    bh, b, h = batch_head(H)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    x = load_tile(X + b * stride_xb + h * stride_xh, rows, L, stride_xl, stride_xd, HEAD_DIM, True).to(tl.float32)
    if SMOOTH:
        x = x - tl.load(Mean + bh * HEAD_DIM + cols)[None, :]
    amax = tl.max(tl.abs(x), 1)
    amax = tl.where(amax > 0, amax, 1.0)
    y = x * (127.0 / amax)[:, None]
    y = y + tl.where(y >= 0, 0.5, -0.5)  # then the cast truncates: round half away from zero
    row_base = bh * L
    tl.store(Xq + (row_base + rows[:, None]) * HEAD_DIM + cols[None, :], y.to(tl.int8), mask=rows[:, None] < L)
    tl.store(Scale + row_base + rows, amax / 127.0 * EXTRA, mask=rows < L)


@triton.jit
def _quant_v_fp8_kernel(V, Inv, Vq, stride_vb, stride_vl, stride_vh, stride_vd, H, L_K,
                        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
    """Program (row block, batch*head): e4m3(v * inv[channel]) stored token-contiguous, [BH, D, Lk]."""
    pid_l = tl.program_id(0)
    bh, b, h = batch_head(H)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    v = load_tile(V + b * stride_vb + h * stride_vh, rows, L_K, stride_vl, stride_vd, HEAD_DIM, True)
    v = v.to(tl.float32)
    y = v * tl.load(Inv + bh * HEAD_DIM + cols)[None, :]
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    if ROUND_IN_FP32:
        y = _round_e4m3(y)
    ptrs = Vq + (bh * HEAD_DIM + cols[None, :]) * L_K + rows[:, None]
    tl.store(ptrs, y.to(tl.float8e4nv), mask=rows[:, None] < L_K)


@triton.jit
def _attn8_inner(acc, l_i, m_i, q, q_scale, K8, KS, V, start_n, L_K, stride_vl, stride_vd,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PV_FP8: tl.constexpr, P_SHIFT: tl.constexpr,
                 ROUND_IN_FP32: tl.constexpr, MASK: tl.constexpr):
    """One key tile of the online softmax (steps 3-5): int8 scores, fp32 softmax update, fresh P @ V dot."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k_ptrs = K8 + cols[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    v_ptrs = V + cols[:, None] * stride_vl + tl.arange(0, HEAD_DIM)[None, :] * stride_vd
    if MASK:
        k = tl.load(k_ptrs, mask=cols[:, None] < L_K, other=0)
        k_scale = tl.load(KS + cols, mask=cols < L_K, other=0.0)
        v = tl.load(v_ptrs, mask=cols[:, None] < L_K, other=0.0)
    else:
        k = tl.load(k_ptrs)
        k_scale = tl.load(KS + cols)
        v = tl.load(v_ptrs)
    raw = tl.dot(q, tl.trans(k))  # int32, exact
    s = raw.to(tl.float32) * k_scale[None, :] * q_scale[:, None]  # log2 units
    if MASK:
        s = tl.where(cols[None, :] < L_K, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
    p = tl.exp2(s - (m_new - P_SHIFT)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:
        p = tl.minimum(p, 448.0)
        if ROUND_IN_FP32:
            p = _round_e4m3(p)
        p_op = p.to(tl.float8e4nv)
    else:
        p_op = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p_op, v)
    return acc, l_i, m_new


@triton.jit
def _attn8_fwd_kernel(Q8, QS, K8, KS, V, VS, Out,
                      stride_vb, stride_vh, stride_vl, stride_vd, stride_ob, stride_ol, stride_oh, stride_od,
                      H, L_Q, L_K,
                      HEAD_DIM: tl.constexpr, PV_FP8: tl.constexpr, P_SHIFT: tl.constexpr,
                      ROUND_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (query block, batch*head): O = softmax(S) V on quantised operands (steps 3-6)."""
    pid_m = tl.program_id(0)
    bh, b, h = batch_head(H)
    Q8 += bh * L_Q * HEAD_DIM
    QS += bh * L_Q
    K8 += bh * L_K * HEAD_DIM
    KS += bh * L_K
    V += b * stride_vb + h * stride_vh
    Out += b * stride_ob + h * stride_oh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q8 + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < L_Q, other=0)
    q_scale = tl.load(QS + rows, mask=rows < L_Q, other=0.0)
    m_i, l_i, acc = online_softmax_init(BLOCK_M, HEAD_DIM)
    n_full = (L_K // BLOCK_N) * BLOCK_N  # full key tiles run unmasked, the tail tile once with a mask
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn8_inner(acc, l_i, m_i, q, q_scale, K8, KS, V, start_n, L_K, stride_vl, stride_vd,
                                     BLOCK_N, HEAD_DIM, PV_FP8, P_SHIFT, ROUND_IN_FP32, False)
    if n_full < L_K:
        acc, l_i, m_i = _attn8_inner(acc, l_i, m_i, q, q_scale, K8, KS, V, n_full, L_K, stride_vl, stride_vd,
                                     BLOCK_N, HEAD_DIM, PV_FP8, P_SHIFT, ROUND_IN_FP32, True)
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(VS + bh * HEAD_DIM + dims)[None, :]
    o_ptrs = Out + rows[:, None] * stride_ol + dims[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None] < L_Q)


# ----------------------------------------------------------------------------------------------------------
# Autotuning of the attention kernel: BLOCK_M, warps and stages only (the key tile is fixed, see step 4).
# One list per device family (`config_family`): sm90 (H100/H200): 128-row query blocks, deeper pipelines (K
# and V tiles are 16 KB each at D=128 in 8 bits); sm80 (A100, INT8 Q/K and 16-bit P/V, 163 KB of shared
# memory); sm8x (sm86, and sm89 with FP8: 99 KB, so at most two stages at 128 rows with 16-bit V). Under the
# interpreter one small config (several query blocks at the test sizes). The pre-pass kernels are
# memory-bound and run one fixed config.
# ----------------------------------------------------------------------------------------------------------
def _configs(entries: list[tuple[int, int, int]]) -> list[triton.Config]:
    if INTERPRET:
        entries = [(32, 4, 1)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in entries]


_KEY = ["L_Q", "L_K", "HEAD_DIM", "PV_FP8"]  # the tuner adds the tensors' dtypes to the key
#                                 (BLOCK_M, num_warps, num_stages)
# From ptxas reports (bench/cross_compile.py): 4-warp 128-row tiles spill 1.3-35 KB per thread and were
# dropped; on sm86/sm89 (99 KB) only 2-stage 128-row and 64-row tiles fit with 16-bit P/V.
_TUNED = {family: triton.autotune(_configs(entries), key=_KEY)(_attn8_fwd_kernel) for family, entries in (
    ("sm90", [(128, 8, 3), (128, 8, 2), (64, 4, 3), (64, 8, 3)]),
    ("sm80", [(128, 8, 2), (128, 8, 3), (64, 4, 3), (64, 4, 1)]),
    ("sm8x", [(128, 8, 2), (64, 4, 2), (64, 4, 1), (64, 8, 2)]))}
_PREPASS_BLOCK = 64


def quantize_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pv: str = "fp8",
                  smooth_k: bool = True) -> Quantized:
    """The Triton pre-pass: `quantize_8bit_ref`'s result, up to rare one-step differences where a last-bit
    difference (the K mean summed in another order, an fma on a GPU) meets a rounding boundary."""
    _check_pv(pv)
    _check_inputs(q, k, v)
    for t in (q, k, v):
        check_triton_device(t)
    return _quantize(q, k, v, pv, smooth_k)


def _quantize(q, k, v, pv: str, smooth_k: bool) -> Quantized:
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    fp8 = pv == "fp8"
    blk = _PREPASS_BLOCK
    n_blocks = triton.cdiv(Lk, blk)
    k_mean = v_inv = v_scale = None
    if smooth_k or fp8:
        k_sum = torch.empty((B * H, n_blocks, D), dtype=torch.float32, device=dev) if smooth_k else None
        v_max = torch.empty((B * H, n_blocks, D), dtype=torch.float32, device=dev) if fp8 else None
        _kv_stats_kernel[(n_blocks, B * H)](
            k, v, q if k_sum is None else k_sum, q if v_max is None else v_max,  # q: a never-read pointer
            *k.stride(), *v.stride(), H, Lk, n_blocks, HEAD_DIM=D, BLOCK=blk, SMOOTH_K=smooth_k, V_FP8=fp8)
        if smooth_k:
            k_mean = k_sum.sum(dim=1) / Lk  # [B*H, D]
        if fp8:
            amax = v_max.amax(dim=1)  # [B*H, D]
            amax = torch.where(amax > 0, amax, 1.0)
            v_inv, v_scale = torch.full_like(amax, FP8_MAX) / amax, (amax / FP8_MAX).view(B, H, D)

    def int8_rows(x, mean, extra):
        L = x.shape[1]
        x8 = torch.empty((B, H, L, D), dtype=torch.int8, device=dev)
        scale = torch.empty((B, H, L), dtype=torch.float32, device=dev)
        _quant_int8_kernel[(triton.cdiv(L, blk), B * H)](
            x, q if mean is None else mean, x8, scale,
            *x.stride(), H, L, EXTRA=extra, HEAD_DIM=D, BLOCK=blk, SMOOTH=mean is not None)
        return x8, scale

    q8, q_scale = int8_rows(q, None, LOG2E / math.sqrt(D))
    k8, k_scale = int8_rows(k, k_mean, 1.0)
    if fp8:
        v8 = torch.empty((B, H, D, Lk), dtype=torch.float8_e4m3fn, device=dev)
        _quant_v_fp8_kernel[(n_blocks, B * H)](v, v_inv, v8, *v.stride(), H, Lk, HEAD_DIM=D, BLOCK=blk,
                                               ROUND_IN_FP32=INTERPRET)
        return Quantized(q8, q_scale, k8, k_scale, v8.transpose(2, 3), v_scale)
    v16 = v.to(PV_DTYPES[pv]).transpose(1, 2)  # a view when v already has that dtype: read in place
    return Quantized(q8, q_scale, k8, k_scale, v16, None)


def attention_8bit_core(x: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton attention kernel on quantised operands (steps 3-6); `attention_8bit_core_ref`'s result."""
    B, H, Lq, D = x.q8.shape
    Lk = x.k8.shape[2]
    fp8 = x.v_scale is not None
    assert all(t.is_contiguous() for t in (x.q8, x.q_scale, x.k8, x.k_scale)), "q8, k8 and scales are dense"
    assert not fp8 or (x.v.dtype == torch.float8_e4m3fn and x.v_scale.is_contiguous())
    out = torch.empty((B, Lq, H, D), dtype=out_dtype, device=x.q8.device)
    if out.numel() == 0:
        return out
    kernel = _TUNED[config_family(x.q8.device)]

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    kernel[grid](x.q8, x.q_scale, x.k8, x.k_scale, x.v, x.q_scale if x.v_scale is None else x.v_scale, out,
                 *x.v.stride(), *out.stride(), H, Lq, Lk,
                 HEAD_DIM=D, PV_FP8=fp8, P_SHIFT=_LOG2_FP8_MAX if fp8 else 0.0, ROUND_IN_FP32=INTERPRET,
                 BLOCK_N=KV_TILE)
    return out


# ----------------------------------------------------------------------------------------------------------
# Operator: torch.library.custom_op with a fake (shape) function, as attention.py does, so that torch.compile
# keeps the whole 8-bit attention (pre-pass and kernel) as one graph node and torch.export records it.
# Forward only: no autograd is registered, and a backward through it raises.
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("anyid_rt::attention_8bit", mutates_args=())
def _attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str, smooth_k: bool) -> torch.Tensor:
    """out [B, Lq, H, D] in q.dtype."""
    # checked here, at run time, rather than in the traced wrapper: torch.compile need not trace the query
    require_pv_support(pv, device_capability(q.device))
    return attention_8bit_core(_quantize(q, k, v, pv, smooth_k), q.dtype)


@_attention_8bit_op.register_fake
def _(q, k, v, pv, smooth_k):
    return q.new_empty(q.shape)


def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, pv: str = "fp8",
                   smooth_k: bool = True) -> torch.Tensor:
    """Triton 8-bit attention; same contract as `attention_ref`, same numerics as `attention_8bit_ref`.

    pv: "fp8" (E4M3 P and per-channel V, sm89+), "bf16" or "fp16" (P and V in that dtype, also sm80).
    smooth_k=False skips step 1 (for measurements: it costs accuracy, not time worth saving). Inputs
    [B, L, H, D] with any strides, head dim 32, 64 or 128, fp16 / bf16 / fp32; output contiguous
    [B, Lq, H, D] in q.dtype. Inference only: no gradient. Registered as torch.ops.anyid_rt.attention_8bit.
    """
    _check_pv(pv)
    _check_inputs(q, k, v)
    check_triton_qkv(q, k, v, "the Triton 8-bit attention", "use attention_8bit_ref")
    return _attention_8bit_op(q, k, v, pv, smooth_k)
