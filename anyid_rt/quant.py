"""FP8 (E4M3) inference for the DiT's linear layers.

Weights are quantised once, at load (after any LoRA is merged), per output channel; activations are
quantised per token on the fly. The matmul is `torch._scaled_mm` with row-wise scales, which doubles the
Hopper matrix rate (1,979 vs 989 dense TFLOP/s). Layers whose error would reach every token through the
time embedding or the output (patch embedding, text and time embedders, head, modulation) stay in bf16,
as do the text K/V projections, which run once per prompt.

    y = (q(x) @ q(W)^T) * s_x[token] * s_w[channel] + b,   q(v) = round_e4m3(v / s),  s = amax|v| / 448

Activation quantisation is one pass over the activations (kernels/fp8_quant.py: a Triton kernel on the
"triton" backend, its PyTorch reference on "torch"), and none at all where the adaptive LayerNorm feeds the
layer: an `FP8Linear` takes either a tensor, which it quantises, or `FP8Rows` (E4M3 values and per-token
scales) already quantised by its producer. `quantize_dit_fp8_` sets the two modulated LayerNorms of each
block (before the self-attention projections and before ffn.0) to write FP8Rows when every layer reading
them is FP8, so the q, k and v projections share one quantisation of their input and ffn.0 none.

`fp8_linear_ref` is the plain PyTorch emulation of the same numerics (dequantise, matmul in fp32); it is
what the quality tests compare against, and what runs where `_scaled_mm` cannot.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.fp8_quant import E4M3, E4M3_MAX, FP8Rows, quantize_rows_fp8, quantize_rows_fp8_ref
from .kernels.select import on_cuda
from .models.linears import BLOCK_LINEARS, TEXT_KV_LINEARS, fused_names

# Linear layers inside each block that are swapped; the text K/V projections run once per prompt
# (WanDiT.prepare_text), so they stay bf16 (models/linears.py says why each consumer picks what it picks).
FP8_TARGETS = tuple(name for name in BLOCK_LINEARS if name not in TEXT_KV_LINEARS)

# the activation quantiser of each ops backend (kernels/__init__.py), chosen when a layer is built; under
# "auto" the one-pass Triton kernel on CUDA (its only contender, the eager reference, moves several times the
# bytes), the reference elsewhere
QUANTIZERS: dict[str, Callable[[torch.Tensor], FP8Rows]] = {"torch": quantize_rows_fp8_ref,
                                                            "triton": quantize_rows_fp8,
                                                            "auto": on_cuda(quantize_rows_fp8, quantize_rows_fp8_ref)}


def fp8_linear_ref(x: torch.Tensor | FP8Rows, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Emulation: quantise x [..., in] per token (unless given as FP8Rows), dequantise both operands, matmul
    in fp32. weight_q [out, in] E4M3, weight_scale [out, 1] fp32."""
    rows = x if isinstance(x, FP8Rows) else quantize_rows_fp8_ref(x)
    out = rows.dequantize().reshape(-1, rows.shape[-1]) @ (weight_q.float() * weight_scale).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*rows.shape[:-1], weight_q.shape[0])


class FP8Linear(nn.Module):
    """A Linear with E4M3 weights (per output channel) and per-token dynamic E4M3 activations.

    forward takes x [..., in] in any float dtype, quantised here by the backend's one-pass quantiser, or
    FP8Rows (values [..., in] E4M3, scales [..., 1] fp32) quantised by the layer's producer.
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, use_scaled_mm: bool = True, backend: str = "torch"):
        super().__init__()
        if backend not in QUANTIZERS:
            raise ValueError(f"FP8Linear backend must be one of {tuple(QUANTIZERS)} (the DiT's resolved ops "
                             f"backend), got {backend!r}")
        self.in_features, self.out_features = weight_q.shape[1], weight_q.shape[0]
        self.register_buffer("weight_q", weight_q)  # [out, in] E4M3, row-major: .t() is column-major
        self.register_buffer("weight_scale", weight_scale.float().reshape(1, -1))  # [1, out]
        self.bias = None if bias is None else nn.Parameter(bias.to(out_dtype), requires_grad=False)
        self.out_dtype = out_dtype
        self.use_scaled_mm = use_scaled_mm
        self.backend = backend
        self.quantize = QUANTIZERS[backend]  # x [..., in] -> FP8Rows, one pass

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_scaled_mm: bool = True, backend: str = "torch",
                    weight_amax: torch.Tensor | None = None) -> "FP8Linear":
        """Quantise `linear`'s weight per output channel: with each channel's max |w| (max calibration), or
        with calibrated ranges `weight_amax` [out] or [out, 1] (e.g. `modelopt_weight_amax`)."""
        wq, ws = quantize_rows_fp8_ref(linear.weight.detach(), weight_amax)  # [out, in], [out, 1]
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(wq, ws.reshape(-1), bias, linear.weight.dtype, use_scaled_mm, backend)

    def forward(self, x: torch.Tensor | FP8Rows) -> torch.Tensor:
        rows = x if isinstance(x, FP8Rows) else self.quantize(x)
        if rows.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expects {self.in_features} input features, got {tuple(rows.shape)}")
        if not self.use_scaled_mm:
            return fp8_linear_ref(rows, self.weight_q, self.weight_scale.t(), self.bias, self.out_dtype)
        # [M, in] row-major values, [M, 1] scales (views of the contiguous per-token tensors)
        xq, xs = rows.values.reshape(-1, self.in_features), rows.scale.reshape(-1, 1)
        out = torch._scaled_mm(xq, self.weight_q.t(), scale_a=xs, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.out_dtype)
        return out.reshape(*rows.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise, {self.backend}"


def check_fp8_device(device: torch.device | str) -> None:
    """FP8 matmuls need sm89+ (Ada, Hopper); on a CPU `_scaled_mm` runs as a (slow) emulation-grade path."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"quant='fp8' needs an FP8 GPU (sm89+: L40, H100, H200); "
                             f"{torch.cuda.get_device_name(device)} is sm{major}{minor}. Use quant=None (bf16)")


def quantize_dit_fp8_(dit: nn.Module, targets: tuple[str, ...] | None = None, use_scaled_mm: bool = True,
                      backend: str | None = None, calibration: str = "max") -> list[str]:
    """Swap the targeted Linear layers of every block for FP8Linear, in place, and let each block's modulated
    LayerNorms write FP8Rows where every layer reading them is now FP8 (`fp8_inputs_`). Returns the swapped
    names. `targets` (block-relative names) default to FP8_TARGETS, or their fused names (`fused_names`: one
    qkv) when the DiT's projections are fused (`WanDiT.fuse_projections`).
    `backend` picks the layers' activation quantiser (QUANTIZERS); default: the DiT's ops backend.
    `calibration` picks the weight scales (CALIBRATIONS): "max", each output channel's max |w|; "modelopt",
    the ranges modelopt's PyTorch PTQ finds (`modelopt_weight_amax`). Activations are always per token.
    Merge LoRAs before calling: the quantised weights cannot take a LoRA delta afterwards."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration={calibration!r} is not one of {CALIBRATIONS}")
    if targets is None:
        targets = fused_names(FP8_TARGETS) if dit.projections_fused else FP8_TARGETS
    backend = dit.backend if backend is None else backend
    found = []  # (block index, name, parent, leaf, linear)
    for i, block in enumerate(dit.blocks):
        for name in targets:
            parent_name, leaf = name.rsplit(".", 1)
            parent = block.get_submodule(parent_name)
            linear = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
            if not isinstance(linear, nn.Linear):
                raise TypeError(f"blocks.{i}.{name} is {type(linear).__name__}, not a Linear (quantised twice?)")
            found.append((i, name, parent, leaf, linear))
    amax = modelopt_weight_amax([f[-1] for f in found]) if calibration == "modelopt" else [None] * len(found)
    for (_, _, parent, leaf, linear), a in zip(found, amax):
        fp8 = FP8Linear.from_linear(linear, use_scaled_mm, backend, a)
        if leaf.isdigit():
            parent[int(leaf)] = fp8
        else:
            setattr(parent, leaf, fp8)
    for block in dit.blocks:
        fp8_inputs_(block)
    return [f"blocks.{i}.{name}" for i, name, *_ in found]


CALIBRATIONS = ("max", "modelopt")


def modelopt_weight_amax(linears: list[nn.Linear]) -> list[torch.Tensor]:
    """Per-output-channel weight ranges [out, 1] from NVIDIA ModelOpt's PyTorch PTQ (`modelopt.torch.
    quantization`), as a calibration source for FP8Linear's weight scales.

    The quantiser is modelopt's per-channel FP8 weight format (E4M3, axis 0: the weight side of its
    FP8_PER_CHANNEL_PER_TOKEN_CFG, whose activations are dynamic per token like this engine's), calibrated
    with its MSE search: amax candidates from 0.25x to 4x each channel's max, keeping the one whose
    quantise-dequantise round trip is closest to the weights. modelopt converts the modules it quantises,
    so it gets fresh Linears that share the weight tensors (no copy); the model is left as it was.
    """
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ImportError(f"calibration='modelopt' needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[torch]' "
                          f"({e})") from e
    box = nn.ModuleList()
    for linear in linears:
        twin = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        twin.weight = linear.weight  # the same Parameter: modelopt reads it and does not change it
        box.append(twin)
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                         {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": (4, 3), "axis": 0}}],
           "algorithm": {"method": "mse"}}
    with torch.no_grad():
        mtq.quantize(box, cfg, forward_loop=None)  # weights only: no forward pass needed
    return [twin.weight_quantizer.amax.detach().float().reshape(-1, 1).clone() for twin in box]


def modulated_input_readers(block: nn.Module) -> dict[str, list[nn.Module]]:
    """The layers reading each modulated LayerNorm's output in `Block.forward` (models/dit.py), by the Block
    attribute holding that LayerNorm's output dtype: the self-attention's input projections (every linear
    of it but the output projection `o`: q, k and v, or a fused qkv) and the FFN's first layer."""
    attn = [m for n, m in block.self_attn.named_children() if n != "o" and isinstance(m, (nn.Linear, FP8Linear))]
    return {"attn_input_dtype": attn, "ffn_input_dtype": [block.ffn[0]]}


def fp8_inputs_(block: nn.Module) -> dict[str, torch.dtype | None]:
    """Set a block's modulated LayerNorms to write E4M3 rows (FP8Rows) where every reader is an FP8Linear,
    and to the compute dtype (None) otherwise; called by `quantize_dit_fp8_`. Returns the settings."""
    settings = {attr: E4M3 if readers and all(isinstance(m, FP8Linear) for m in readers) else None
                for attr, readers in modulated_input_readers(block).items()}
    for attr, dtype in settings.items():
        setattr(block, attr, dtype)
    return settings


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()  # fp64: no >1 from rounding


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 255.0) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


__all__ = ["E4M3", "E4M3_MAX", "FP8Rows", "FP8_TARGETS", "QUANTIZERS", "CALIBRATIONS", "FP8Linear", "fp8_linear_ref",
           "quantize_dit_fp8_", "modelopt_weight_amax", "modulated_input_readers", "fp8_inputs_",
           "check_fp8_device", "cosine", "psnr"]
