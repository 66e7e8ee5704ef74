"""Kernels of the DiT, each op file holding its Triton kernel, launcher and plain-PyTorch reference.

The implementation is chosen when a model is built (`dit_ops(backend)`), never per call: "torch" gives the
references (the CPU path, the export path and the test oracle), "triton" the Triton kernels, and "auto"
(on CUDA) each op's fastest correct implementation, measured once per shape class at its first call and
remembered on disk (kernels/select.py). An unsupported combination raises an error that names the fix;
nothing falls back silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from .select import Selector

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device | str | None) -> str:
    """The backend a model on `device` is built with: "torch" and "triton" as asked; "auto" stays "auto" on
    CUDA (chosen per op by measurement, kernels/select.py) and is "torch" elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "auto" and dev.type != "cuda":
        return "torch"
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
    """The ops a DiT forward calls; one instance per model, picked at construction (under "auto", each field
    is a `select.AutoOp` that picks per shape class at its first call)."""

    backend: str
    attention: Callable  # (q, k, v) -> softmax(q k^T / sqrt(D)) v, [B, Lq, H, D]
    layernorm_modulate: Callable  # (x, shift, scale, segments: SegmentMap, eps, out_dtype) -> [B, L, D]
    gated_residual: Callable  # (residual, y, gate, segments: SegmentMap) -> residual + y * gate (fp32)
    rms_norm: Callable  # (x, weight, eps) -> x / rms(x) * weight
    rms_norm_rope: Callable  # (x, weight, eps, rope, num_heads) -> RoPE per head of rms_norm(x), [B, L, H*D]
    layer_norm: Callable  # (x, weight, bias, eps) -> affine LayerNorm computed in fp32
    # self-attention over the whole token sequence, (q, k, v) -> [B, L, H, D]; None: `attention`. Sequence
    # parallelism (anyid_rt/parallel.py) sets it to an all-to-all around `attention`, which leaves the
    # cross-attention (each rank's queries against the whole text) as it is
    sequence_attention: Callable | None = None


# 8-bit attention modes (kernels/attention_8bit.py): Q and K in INT8 after smoothing K, P and V in FP8 E4M3
# ("int8-fp8", sm89+) or in 16 bits ("int8").
ATTENTION_QUANT = (None, "int8", "int8-fp8")


def dit_ops(backend: str, attention_quant: str | None = None, *, compiled: bool = False,
            selector: Selector | None = None) -> DiTOps:
    """The ops of a DiT built with `backend` ("torch", "triton" or "auto"; resolve "auto" per device with
    `resolve_backend` first) and 8-bit attention mode `attention_quant`. Under "auto", `compiled` says the
    model runs under torch.compile (the norms then compete with their compiled references) and `selector`
    (a select.Selector) replaces the process's default one."""
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
    if backend == "auto":
        from . import select

        def auto(op: str) -> select.AutoOp:
            return select.AutoOp(op, select.candidates(op, compiled), selector, select.unavailable(op))

        # the 8-bit attention has one GPU implementation (its numerics are its own): nothing to choose from
        attn = auto("attention") if pv is None else select.on_cuda(
            partial(attention_8bit.attention_8bit, pv=pv), partial(attention_8bit.attention_8bit_ref, pv=pv))
        return DiTOps("auto", attn, auto("layernorm_modulate"), auto("gated_residual"), auto("rms_norm"),
                      auto("rms_norm_rope"), auto("layer_norm"))
    raise ValueError(f"dit_ops takes 'torch', 'triton' or 'auto', got {backend!r}")
