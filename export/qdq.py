"""FP8 post-training quantisation of the DiT graph: QuantizeLinear / DequantizeLinear on the block linears.

The recipe is modelopt's `FP8_DEFAULT_CFG` (reference/perf-anchors.md section 8): E4M3, one scale per
tensor for each linear's weight and input, "max" calibration (scale = amax / 448). As in modelopt's Wan
recipe (`filter_func_wan_video`), the patch embedding, the time and text embedders and the head stay in
high precision; every linear inside the transformer blocks (self- and cross-attention q, k, v, o and the
FFN) is quantised. Attention itself (the two batched matmuls) is not, by either path below: that is
modelopt's `--quantize-mha` option, which needs TensorRT's FP8 fMHA fusion.

Two ways to produce the Q/DQ graph (opset 19 QuantizeLinear / DequantizeLinear with float8e4m3fn zero
points), quantising the same layers:

- `insert_qdq` (`--quantizer builtin`): this module's pass, with activation ranges calibrated in PyTorch
  (`calibrate`). Weights are stored as FP8 initializers followed by a DequantizeLinear, activations get a
  Q -> DQ pair in front of the MatMul, one scale per tensor (amax / 448). It is the reference the tests check
  (graph structure, onnxruntime against `fake_quant` in PyTorch) and needs no modelopt. `fmt="int8"`
  (scale = amax / 127) builds the INT8 variant.
- `modelopt_qdq.quantize_modelopt` (`--quantizer modelopt`): modelopt's ONNX PTQ on the same layers, with
  modelopt's own conventions (per-channel weight scales behind a Q -> DQ pair, amax mapped to 127^2 / 448;
  see that module). `fake_quant(..., per_channel_weights=True, amax_level=...)` emulates it.

LoRA must be merged into the weights before quantising (unmerged LoRA branches break TensorRT's Q/DQ
fusion): the export loads LoRA files through `Engine.from_pretrained(lora=...)`, which merges them.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..models.dit import WanDiT
from ..models.linears import BLOCK_LINEARS, HIGH_PRECISION_LINEARS

# every linear inside the transformer blocks, text K/V included (the graph runs them on every call):
# quantised. The embedders and the head stay in high precision (models/linears.py).
QUANTIZED = re.compile(r"^blocks\.\d+\.(" + "|".join(map(re.escape, BLOCK_LINEARS)) + ")$")
HIGH_PRECISION = re.compile("^(" + "|".join(map(re.escape, HIGH_PRECISION_LINEARS)) + ")$")
FORMATS = {"fp8": 448.0, "int8": 127.0}  # largest representable magnitude
QDQ_OPSET = 19  # first opset with FP8 QuantizeLinear / DequantizeLinear


class MissingDependency(ImportError):
    """An optional package is needed; the message names the pip command."""


@dataclass(frozen=True)
class LinearNode:
    node: str  # ONNX node name, "<module>/MatMul"
    module: str  # checkpoint module name, e.g. "blocks.3.self_attn.q"
    quantized: bool


def linear_nodes(model) -> list[LinearNode]:
    """The linears of an exported DiT graph (named by `export_dit_onnx`), in graph order."""
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and "/" in node.name:
            module = node.name.rsplit("/", 1)[0]
            if QUANTIZED.match(module) or HIGH_PRECISION.match(module):
                out.append(LinearNode(node.name, module, bool(QUANTIZED.match(module))))
    return out


# ---------------------------------------------------------------------------------------------------------
# Calibration and the PyTorch emulation
# ---------------------------------------------------------------------------------------------------------

def quantized_modules(dit: WanDiT) -> dict[str, nn.Linear]:
    """The checkpoint's block linears, one per graph MatMul. The graph is the unfused model (`DiTStep` unfuses
    the engine's fused q, k, v in place), so its calibration and emulation unfuse first too: hooks on a fused
    qkv layer would see nothing once `DiTStep` swaps the separate layers back in."""
    dit.unfuse_projections()
    return {name: m for name, m in dit.named_modules() if isinstance(m, nn.Linear) and QUANTIZED.match(name)}


@contextlib.contextmanager
def _amax_hooks(dit: WanDiT):
    """Collect max |input| of every quantised linear while the block runs: yields the (growing) dict."""
    amax: dict[str, float] = {}
    hooks = []
    for name, m in quantized_modules(dit).items():
        def hook(mod, args, name=name):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        yield amax
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def calibrate(dit: WanDiT, samples: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Max |input| of every quantised linear over the calibration samples (graph inputs of `DiTStep`)."""
    from .onnx_dit import DiTStep, run_dit_step

    step, n = DiTStep(dit), 0
    with _amax_hooks(dit) as amax:
        for sample in samples:
            run_dit_step(step, sample)
            n += 1
    if n == 0:
        raise ValueError("calibration needs at least one sample")
    return dict(amax)


# differential prompts over the seven AnyID elements, for calibration
CALIBRATION_PROMPTS = (
    "Shot type: close-up. Expression: a broad smile. Action: nods slowly. Background: a sunlit park.",
    "Shot type: medium shot. Clothes: a dark wool coat. Action: walks toward the camera. Background: a rainy street at night.",
    "Shot type: wide shot. Action: sits on a bench reading a book. Background: an autumn forest.",
    "Hairstyle: a high ponytail. Expression: surprised. Action: turns the head to the left. Background: a white studio.",
    "Shot type: medium close-up. Accessory: round glasses. Expression: thoughtful. Action: speaks to someone off camera.",
    "Clothes: a red sports jacket. Action: runs along a beach. Background: waves under a cloudy sky.",
    "Shot type: close-up. Expression: laughing. Action: covers the mouth with one hand. Background: a busy cafe.",
    "Shot type: full shot. Action: dances in place. Background: a stage with colored lights.",
)


@torch.no_grad()
def run_calibration(engine, prompts: Sequence[str], references: Sequence | None = None, *, steps: int = 8,
                    height: int | None = None, width: int | None = None, num_frames: int | None = None,
                    seed: int = 0, on_inputs=None) -> int:
    """Generate each prompt with `engine` (its PyTorch DiT run through `DiTStep`, so that the calibrated graph
    sees exactly these activations), calling `on_inputs(graph inputs)` at every DiT forward. Returns the
    number of forwards."""
    from ..engine import Engine
    from .graph_engine import GraphDiT
    from .onnx_dit import DiTStep, run_dit_step

    step, count = DiTStep(engine.dit), 0

    def call(inputs):
        nonlocal count
        count += 1
        if on_inputs is not None:
            on_inputs(inputs)
        return run_dit_step(step, inputs)

    runner = Engine(GraphDiT(engine.dit.cfg, call), engine.vae, engine.text_encoder, layout=engine.layout,
                    defaults=engine.defaults, device=engine.device)
    for i, prompt in enumerate(prompts):
        runner.generate(prompt, references=list(references) if references else None, steps=steps, height=height,
                        width=width, num_frames=num_frames, seed=seed + i, progress=False)
    return count


def calibrate_engine(engine, prompts: Sequence[str] = CALIBRATION_PROMPTS, references: Sequence | None = None,
                     **kw) -> dict[str, float]:
    """Activation ranges of the quantised linears over real generations (`run_calibration`), streamed:
    nothing is stored but the running maxima."""
    with _amax_hooks(engine.dit) as amax:
        run_calibration(engine, prompts, references, **kw)
    return dict(amax)


def _fake_quant(x: torch.Tensor, scale: float | torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "fp8":
        return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale
    return torch.round(x.float() / scale).clamp(-128, 127) * scale


def _scale(amax: float, fmt: str) -> float:
    return max(float(amax), 1e-12) / FORMATS[fmt]


@contextlib.contextmanager
def fake_quant(dit: WanDiT, act_amax: dict[str, float], fmt: str = "fp8", *, per_channel_weights: bool = False,
               amax_level: float | None = None):
    """Within the block, the quantised linears of `dit` compute on fake-quantised weights and inputs: the
    PyTorch oracle of a Q/DQ graph. By default the scales `insert_qdq` writes (one per tensor, amax mapped to
    the format's largest value); `per_channel_weights` gives every output channel its own weight scale, and
    `amax_level` maps amax to another value (modelopt's ONNX FP8: both, with
    `modelopt_qdq.MODELOPT_FP8_AMAX_LEVEL`)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    level = FORMATS[fmt] if amax_level is None else float(amax_level)
    saved, hooks = {}, []
    with torch.no_grad():
        for name, m in quantized_modules(dit).items():
            saved[name] = w = m.weight.data
            # nn.Linear weight [out, in]: one amax per output channel ([out, 1]) or one in all
            amax = w.float().abs().amax(dim=1, keepdim=True) if per_channel_weights else w.float().abs().max()
            m.weight.data = _fake_quant(w, amax.clamp_min(1e-12) / level, fmt).to(w.dtype)
            s = max(float(act_amax[name]), 1e-12) / level
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, s=s: (_fake_quant(args[0], s, fmt).to(args[0].dtype), *args[1:])))
    try:
        yield dit
    finally:
        for h in hooks:
            h.remove()
        for name, m in quantized_modules(dit).items():
            m.weight.data = saved[name]


# ---------------------------------------------------------------------------------------------------------
# The Q/DQ pass
# ---------------------------------------------------------------------------------------------------------

def _scale_tensor(name: str, value: float, dtype: int):
    """A scalar scale initializer of the graph's float type, and the value it holds after rounding (the
    weights are quantised with exactly that value)."""
    from onnx import TensorProto, helper

    torch_dtype = {TensorProto.FLOAT: torch.float32, TensorProto.BFLOAT16: torch.bfloat16,
                   TensorProto.FLOAT16: torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"{name}: cannot quantise weights of ONNX type {dtype}")
    t = torch.tensor(value, dtype=torch_dtype)
    raw = t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().tobytes()
    return helper.make_tensor(name, dtype, [], raw, raw=True), float(t)


def _quantize_array(a: np.ndarray, scale: float, fmt: str):
    """(raw bytes, ONNX data type) of a / scale in the format (round to nearest even, saturating)."""
    from onnx import TensorProto

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) / scale
    if fmt == "fp8":
        q = t.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return q.view(torch.uint8).numpy().tobytes(), TensorProto.FLOAT8E4M3FN
    q = torch.round(t).clamp(-128, 127).to(torch.int8)
    return q.numpy().tobytes(), TensorProto.INT8


def insert_qdq(model, act_amax: dict[str, float], fmt: str = "fp8"):
    """Quantise the block linears of an exported DiT graph in place (see the module docstring); returns the
    model. `act_amax` maps module names to calibrated input ranges (`calibrate`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    nodes = [n for n in linear_nodes(model) if n.quantized]
    if not nodes:
        raise ValueError("no block linears found: quantise a graph written by export_dit_onnx (its linears are "
                         "named '<module>/MatMul')")
    missing = sorted({n.module for n in nodes} - set(act_amax))
    if missing:
        raise ValueError(f"no calibrated input range for {missing[:4]}{'...' if len(missing) > 4 else ''}")
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_name = {n.name: n for n in g.node}
    zp_name = f"qdq_zero_point_{fmt}"
    zp_type = TensorProto.FLOAT8E4M3FN if fmt == "fp8" else TensorProto.INT8
    new_inits = [helper.make_tensor(zp_name, zp_type, [], b"\x00", raw=True)]
    act_qdq: dict[tuple[str, float], str] = {}  # (activation, scale) -> dequantised tensor, shared by q/k/v
    inserted: dict[str, list] = {}  # node name -> nodes to put in front of it
    for ln in nodes:
        node = by_name[ln.node]
        x, w = node.input[0], node.input[1]
        if w not in inits:
            raise ValueError(f"{ln.node}: weight {w!r} is not an initializer")
        # scales take the graph's float type (DequantizeLinear outputs the scale's type): fp32 or bf16
        dtype = inits[w].data_type
        weight = numpy_helper.to_array(inits[w], base_dir="").astype(np.float32)
        new = []
        # weight: stored quantised, one DequantizeLinear
        scale_t, ws = _scale_tensor(f"{w}_scale", _scale(np.abs(weight).max(), fmt), dtype)
        raw, qtype = _quantize_array(weight, ws, fmt)
        new_inits += [helper.make_tensor(f"{w}_{fmt}", qtype, list(weight.shape), raw, raw=True), scale_t]
        new.append(helper.make_node("DequantizeLinear", [f"{w}_{fmt}", f"{w}_scale", zp_name], [f"{w}_dq"],
                                    name=f"{ln.module}/weight_dq"))
        # activation: Q -> DQ, shared between linears that read the same tensor with the same scale
        xs = _scale(act_amax[ln.module], fmt)
        key = (x, xs)
        if key not in act_qdq:
            i = len(act_qdq)
            s_name = f"{ln.module}.input_scale"
            new_inits.append(_scale_tensor(s_name, xs, dtype)[0])
            new += [helper.make_node("QuantizeLinear", [x, s_name, zp_name], [f"act{i}_q"], name=f"{ln.module}/input_q"),
                    helper.make_node("DequantizeLinear", [f"act{i}_q", s_name, zp_name], [f"act{i}_dq"],
                                     name=f"{ln.module}/input_dq")]
            act_qdq[key] = f"act{i}_dq"
        node.input[0], node.input[1] = act_qdq[key], f"{w}_dq"
        inserted[ln.node] = new
    # rebuild the node list in topological order: the new nodes go right before their MatMul
    order = []
    for n in g.node:
        order += inserted.get(n.name, [])
        order.append(n)
    del g.node[:]
    g.node.extend(order)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < QDQ_OPSET:
            # the ops whose definition changed at opset 19 (Reshape, Shape, Cast, Pad, Resize, ...) only gained
            # types or optional modes there, so the graph means the same at 19
            op.version = QDQ_OPSET
    if sum(len(t.raw_data) for t in g.initializer) < (1800 << 20):
        onnx.checker.check_model(model, full_check=True)  # types and shapes; bigger graphs: check the file
    return model


def qdq_summary(model) -> dict[str, object]:
    """Counts the tests and the CLI report: Q/DQ nodes, quantised and high-precision linears."""
    ops = [n.op_type for n in model.graph.node]
    lins = linear_nodes(model)
    dq_inputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    by_name = {n.name: n for n in model.graph.node}
    quantized = [ln.module for ln in lins if all(i in dq_inputs for i in by_name[ln.node].input[:2])]
    return {"QuantizeLinear": ops.count("QuantizeLinear"), "DequantizeLinear": ops.count("DequantizeLinear"),
            "quantized": quantized, "high_precision": [ln.module for ln in lins if ln.module not in quantized]}


def save_qdq(onnx_in: str | Path, onnx_out: str | Path, act_amax: dict[str, float], fmt: str = "fp8") -> dict[str, object]:
    """Insert Q/DQ into the graph at `onnx_in` with calibrated input ranges, write `onnx_out`; returns the
    summary. Graphs over 2 GB keep their weights in `<onnx_out>.data`."""
    import onnx

    model = onnx.load(str(onnx_in))
    insert_qdq(model, act_amax, fmt)
    onnx_out = Path(onnx_out)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > (1800 << 20)  # protobuf's limit is 2 GB
    onnx_out.with_name(onnx_out.name + ".data").unlink(missing_ok=True)
    onnx.save(model, str(onnx_out), save_as_external_data=big, location=onnx_out.name + ".data" if big else None)
    if big:
        onnx.checker.check_model(str(onnx_out))
    return qdq_summary(model)


__all__ = ["QUANTIZED", "HIGH_PRECISION", "LinearNode", "linear_nodes", "calibrate", "calibrate_engine",
           "run_calibration", "CALIBRATION_PROMPTS", "fake_quant", "insert_qdq", "qdq_summary", "save_qdq",
           "MissingDependency"]
