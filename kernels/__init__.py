"""Kernels of the DiT, each op file holding its Triton kernel, launcher and plain-PyTorch reference.

The implementation is chosen once, when a model is built (`dit_ops(backend)`), never per call: the torch
references are the CPU path, the export path and the test oracle; the Triton kernels are the CUDA path.
An unsupported combination raises an error that names the fix; nothing falls back silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device | str | None) -> str:
    """Map "auto" to "triton" on CUDA and "torch" elsewhere; validate explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "auto":
        return "triton" if dev.type == "cuda" else "torch"
    return backend


@dataclass(frozen=True)
class SegmentMap:
    """Which modulation row each token of a [B, L, ...] sequence uses. Segments are runs of consecutive tokens
    (ARCHITECTURE.md section 5, "Timesteps as segments"), held in two forms:

    index: [L] int64, each token's segment: what the torch references gather by, so that they depend on no
        Python int and trace into a graph whose token counts are dynamic (export/onnx_dit.py);
    lens: the runs' token counts as Python ints, what the Triton kernels launch over (one launch per segment).
        None when the layout is a graph input, which only the references can run.
    """

    index: torch.Tensor
    lens: tuple[int, ...] | None = None

    @staticmethod
    def from_lens(lens: Sequence[int], device: torch.device | str | None = None) -> "SegmentMap":
        lens = tuple(int(n) for n in lens)
        if any(n < 0 for n in lens):
            raise ValueError(f"negative segment length in {lens}")
        # built on the CPU, where the output length needs no device sync, then moved
        index = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))
        return SegmentMap(index if device is None else index.to(device), lens)


@dataclass(frozen=True)
class DiTOps:
    """The ops a DiT forward calls; one instance per model, picked at construction."""

    backend: str
    attention: Callable  # (q, k, v) -> softmax(q k^T / sqrt(D)) v, [B, Lq, H, D]
    layernorm_modulate: Callable  # (x, shift, scale, segments: SegmentMap, eps, out_dtype) -> [B, L, D]
    gated_residual: Callable  # (residual, y, gate, segments: SegmentMap) -> residual + y * gate (fp32)
    rms_norm: Callable  # (x, weight, eps) -> x / rms(x) * weight
    rms_norm_rope: Callable  # (x, weight, eps, rope, num_heads) -> RoPE per head of rms_norm(x), [B, L, H*D]
    layer_norm: Callable  # (x, weight, bias, eps) -> affine LayerNorm computed in fp32


# 8-bit attention modes (kernels/attention_8bit.py): Q and K in INT8 after smoothing K, P and V in FP8 E4M3
# ("int8-fp8", sm89+) or in 16 bits ("int8").
ATTENTION_QUANT = (None, "int8", "int8-fp8")


def dit_ops(backend: str, attention_quant: str | None = None) -> DiTOps:
    from functools import partial

    from . import attention, attention_8bit, modulation, norm

    if attention_quant not in ATTENTION_QUANT:
        raise ValueError(f"attention_quant={attention_quant!r} is not one of {ATTENTION_QUANT}")
    pv = {"int8": "bf16", "int8-fp8": "fp8"}.get(attention_quant)
    if backend == "torch":
        attn = attention.attention_ref if pv is None else partial(attention_8bit.attention_8bit_ref, pv=pv)
        return DiTOps("torch", attn, modulation.layernorm_modulate_ref, modulation.gated_residual_ref,
                      norm.rms_norm_ref, norm.rms_norm_rope_ref, norm.layer_norm_ref)
    if backend == "triton":
        attn = attention.attention if pv is None else partial(attention_8bit.attention_8bit, pv=pv)
        return DiTOps("triton", attn, modulation.layernorm_modulate, modulation.gated_residual,
                      norm.rms_norm, norm.rms_norm_rope, norm.layer_norm)
    raise ValueError(f"dit_ops needs a resolved backend ('torch' or 'triton'), got {backend!r}")
