"""FP8 Q/DQ through NVIDIA TensorRT Model Optimizer's ONNX PTQ (`modelopt.onnx.quantization.quantize`).

The same choice of layers as the builtin pass (qdq.py): the block linears are quantised, named one by one
(`nodes_to_quantize`, anchored patterns of the `<module>/MatMul` names `export_dit_onnx` writes); the
embedders and the head stay in high precision; attention's two batched matmuls are not quantised
(`disable_mha_qdq`). Activation ranges come from "max" calibration in onnxruntime over the graph inputs of
real generations (`run_calibration`), one forward per calibration step.

What modelopt writes differs from the builtin graph in form and in two numeric conventions, both its own
(modelopt 0.47, `modelopt/onnx/quantization/fp8.py`):

- weights stay in the graph's float type behind a QuantizeLinear -> DequantizeLinear pair (TensorRT folds
  the pair at build time) instead of FP8 initializers, and their scales are per output channel
  (`quantize_static(per_channel=True)`), where the builtin pass uses one scale per tensor;
- modelopt calibrates in INT8 (scale = amax / 127) and converts to FP8 by multiplying the scale by 448 / 127,
  so that amax maps to 127^2 / 448 ~ 36 rather than to 448 (`MODELOPT_FP8_AMAX_LEVEL`; NVIDIA keeps this
  on purpose, NVIDIA/Model-Optimizer issue 215). E4M3 keeps its 3 mantissa bits over that range; only
  values below ~4e-4 x amax (instead of ~3.5e-5 x amax) fall into the subnormals.

`qdq.fake_quant(..., per_channel_weights=True, amax_level=MODELOPT_FP8_AMAX_LEVEL)` is the PyTorch oracle of
that graph (tests/test_export_modelopt.py).

Three things modelopt does to files are kept inside a private folder that is removed whatever happens:
it rewrites its input graph in place (`onnx.shape_inference.infer_shapes_path`), so it gets a copy; it
writes its intermediate graphs beside its output, so the output goes to that folder first; and it writes
temporary graphs through `tempfile`, which is pointed at the same folder while it runs.

Calibration inputs are handed over as a data reader, one forward's inputs at a time. modelopt's array form
(`calibration_data=`) splits every input along its first axis into calibration steps, which fits inputs
that all lead with the batch but not this graph's per-token tables (`seg_index` [N], `rope_cos` [N, D/2]):
split, they no longer match the tokens, and onnxruntime fails on the first Mul that joins them.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

# torch (through qdq.py) is imported where it is used, so that the export command's request check can ask
# `check_graph_dtype` before anything heavy loads

# modelopt's FP8 scale is its INT8 scale (amax / 127) times 448 / 127: amax is quantised to 127^2 / 448
MODELOPT_FP8_AMAX_LEVEL = 127.0 * 127.0 / 448.0

_INSTALL = ("FP8 quantisation with modelopt needs NVIDIA TensorRT Model Optimizer and the packages its ONNX PTQ "
            "imports: pip install -e \".[export,modelopt]\" (the `modelopt` extra; or use --quantizer builtin, which "
            "quantises the same layers without modelopt)")


def _require_modelopt():
    from .qdq import MissingDependency

    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise MissingDependency(f"{_INSTALL}; importing it failed with: {e}") from e
    return quantize


def calibration_reader(samples: Sequence[dict[str, torch.Tensor]]):
    """An onnxruntime `CalibrationDataReader` over graph-input dicts, one forward each, converted to numpy as
    they are read (`get_first` and `rewind` are what modelopt adds to onnxruntime's protocol)."""
    from onnxruntime.quantization import CalibrationDataReader

    if len(samples) == 0:
        raise ValueError("calibration needs at least one sample")

    def arrays(sample: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in sample.items()}

    class SampleReader(CalibrationDataReader):
        def __init__(self):
            self.next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.next >= len(samples):
                return None
            self.next += 1
            return arrays(samples[self.next - 1])

        def get_first(self) -> dict[str, np.ndarray]:
            return arrays(samples[0])

        def rewind(self) -> None:
            self.next = 0

    return SampleReader()


@contextlib.contextmanager
def _tempfiles_in(folder: Path) -> Iterator[None]:
    """`tempfile`'s default folder is `folder` within the block (modelopt and onnxruntime write temporary
    graphs through it)."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _copy_graph(src: Path, folder: Path) -> Path:
    """Copy a graph and its external data files into `folder` (same relative locations); returns the copy."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    dst = folder / src.name
    shutil.copyfile(src, dst)
    for loc in locations:
        (folder / loc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / loc, folder / loc)
    return dst


def _graph_float_type(model) -> str:
    """The float type of the block linears' weights ("fp32", "bf16" or "fp16"): modelopt keeps it
    (`high_precision_dtype`), as the builtin pass does."""
    from onnx import TensorProto

    from .qdq import linear_nodes

    inits = {t.name: t for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    types = {inits[by_name[ln.node].input[1]].data_type for ln in linear_nodes(model) if ln.quantized
             and by_name[ln.node].input[1] in inits}
    names = {TensorProto.FLOAT: "fp32", TensorProto.BFLOAT16: "bf16", TensorProto.FLOAT16: "fp16"}
    if len(types) != 1 or next(iter(types)) not in names:
        raise ValueError(f"the block linears' weights must share one float type, got ONNX types {sorted(types)}")
    return names[types.pop()]


def calibration_eps() -> list[str]:
    """Where modelopt runs the graph: onnxruntime's CUDA provider when this onnxruntime has it, else the CPU
    (never TensorRT: a graph of standard operators needs none of its plugins)."""
    import onnxruntime as ort

    return ["cuda:0", "cpu"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]


def check_graph_dtype(dtype: str) -> None:
    """modelopt calibrates by running the graph in onnxruntime, whose CPU provider has no bf16 MatMul: a bf16
    graph needs an onnxruntime with the CUDA provider (onnxruntime-gpu). Raises ValueError naming the fix."""
    if dtype != "fp32" and calibration_eps() == ["cpu"]:
        raise ValueError(f"--quantizer modelopt calibrates the {dtype} graph in onnxruntime, and this onnxruntime has "
                         f"only the CPU provider, which has no {dtype} MatMul: export with --dtype fp32, install "
                         "onnxruntime-gpu on a CUDA machine, or use --quantizer builtin (calibrated in PyTorch)")


def quantize_modelopt(onnx_in: str | Path, onnx_out: str | Path, samples: Sequence[dict[str, torch.Tensor]],
                      fmt: str = "fp8", log_level: str = "WARNING") -> dict[str, object]:
    """Write the FP8 Q/DQ graph of the DiT graph at `onnx_in` to `onnx_out` with modelopt (see the module
    docstring), calibrated on `samples` (graph-input dicts of `DiTStep`, any layouts). `onnx_in` is left as it
    was; nothing but `onnx_out` (and `<onnx_out>.data` for graphs over 2 GB) is written, even on failure.
    Returns `qdq_summary` of the result, which must quantise exactly the block linears."""
    if fmt != "fp8":
        raise ValueError("the modelopt path here writes fp8; use --quantizer builtin for int8")
    quantize = _require_modelopt()
    import onnx

    from .qdq import linear_nodes, qdq_summary

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    model = onnx.load(str(onnx_in), load_external_data=False)
    wanted = [ln for ln in linear_nodes(model) if ln.quantized]
    if not wanted:
        raise ValueError("no block linears found: quantise a graph written by export_dit_onnx (its linears are "
                         "named '<module>/MatMul')")
    precision = _graph_float_type(model)
    check_graph_dtype(precision)
    reader = calibration_reader(samples)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{onnx_out.name}.modelopt-", dir=onnx_out.parent))
    try:
        (work / "in").mkdir()
        (work / "out").mkdir()
        src = _copy_graph(onnx_in, work / "in")
        written = work / "out" / onnx_out.name
        with _tempfiles_in(work):
            quantize(str(src), quantize_mode="fp8", calibration_data_reader=reader, calibration_method="max",
                     calibration_eps=calibration_eps(), op_types_to_quantize=["MatMul", "Gemm"],
                     nodes_to_quantize=["^" + re.escape(ln.node) + "$" for ln in wanted], disable_mha_qdq=True,
                     high_precision_dtype=precision, output_path=str(written), log_level=log_level)
        if not written.is_file():
            raise RuntimeError(f"modelopt wrote no graph (expected {written.name})")
        result = onnx.load(str(written))
        summary = qdq_summary(result)
        _check_layers(result, summary, {ln.module for ln in wanted})
        # saved as the builtin pass saves: external weights (graphs over 2 GB) in `<name>.data`
        big = sum(len(t.raw_data) for t in result.graph.initializer) > (1800 << 20)
        final = work / onnx_out.name
        onnx.save(result, str(final), save_as_external_data=big, location=onnx_out.name + ".data" if big else None)
        onnx.checker.check_model(str(final), full_check=not big)  # types and shapes too, where it fits in memory
        onnx_out.with_name(onnx_out.name + ".data").unlink(missing_ok=True)
        if big:
            shutil.move(str(final.with_name(final.name + ".data")), str(onnx_out.with_name(onnx_out.name + ".data")))
        shutil.move(str(final), str(onnx_out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _check_layers(model, summary: dict, wanted: set[str]) -> None:
    """modelopt must have quantised exactly the block linears (its own rules, such as skipping GEMVs and GEMMs
    with a dimension under 16, could drop some) and put Q/DQ nowhere else: every QuantizeLinear feeds only
    DequantizeLinear nodes, and every DequantizeLinear feeds only those linears' MatMuls."""
    got = set(summary["quantized"])
    if got != wanted:
        wrong = ([f"quantised {sorted(got - wanted)[:4]}, which should stay in high precision"] if got - wanted else []) \
            + ([f"left {sorted(wanted - got)[:4]} unquantised"] if wanted - got else [])
        raise RuntimeError(f"modelopt {' and '.join(wrong)}: the graph would not be the FP8 recipe")
    linears = {f"{m}/MatMul" for m in wanted} | {f"{m}/Gemm" for m in wanted}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        allowed = {"QuantizeLinear": lambda c: c.op_type == "DequantizeLinear",
                   "DequantizeLinear": lambda c: c.name in linears}.get(n.op_type)
        if allowed is not None:
            stray = [c.name or c.op_type for c in consumers.get(n.output[0], []) if not allowed(c)]
            if stray:
                raise RuntimeError(f"modelopt put {n.op_type} {n.name!r} in front of {stray[:4]}, outside the block "
                                   "linears")


__all__ = ["quantize_modelopt", "calibration_reader", "calibration_eps", "check_graph_dtype", "MODELOPT_FP8_AMAX_LEVEL"]
