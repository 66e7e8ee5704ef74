"""modelopt's ONNX FP8 path (export/modelopt_qdq.py, `export onnx --quantize fp8 --quantizer modelopt`), run
for real on a CPU: the graph it writes quantises exactly the layers the builtin pass quantises, its scales
are the calibrated ranges under modelopt's conventions, it runs in onnxruntime, and its output agrees with
PyTorch fake quantisation of the same recipe and with the builtin graph. A failed export leaves the output
folder as it was (modelopt's intermediate graphs included).
"""
from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install onnx onnxruntime")
pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install onnxruntime")
mq = pytest.importorskip("modelopt.onnx.quantization",
                         reason="nvidia-modelopt is not installed (make test installs it; see the Makefile)")

from helpers import check_against_fake_quant  # noqa: E402

from anyid_rt.export import cli as export_cli  # noqa: E402
from anyid_rt.export.graph_engine import ort_dit_call, ort_session  # noqa: E402
from anyid_rt.export.modelopt_qdq import MODELOPT_FP8_AMAX_LEVEL, quantize_modelopt  # noqa: E402
from anyid_rt.export.onnx_dit import DiTStep, run_dit_step, sample_inputs  # noqa: E402
from anyid_rt.export.qdq import (CALIBRATION_PROMPTS, calibrate, fake_quant, insert_qdq, linear_nodes,  # noqa: E402
                                 qdq_summary, run_calibration)
from anyid_rt.media import ASSET_DIR  # noqa: E402


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def samples(engine) -> list[dict[str, torch.Tensor]]:
    """The graph inputs of every DiT forward of two real 2-step generations with an image and a clip reference
    (the calibration data of both quantisers)."""
    out = []
    refs = [str(ASSET_DIR / "astronaut.png"), str(ASSET_DIR / "astronaut_clip.mp4")]
    run_calibration(engine, CALIBRATION_PROMPTS[:2], refs, steps=2, num_frames=5,
                    on_inputs=lambda x: out.append({k: v.cpu() for k, v in x.items()}))
    return out


@pytest.fixture(scope="module")
def act_amax(engine, samples) -> dict[str, float]:
    return calibrate(engine.dit, samples)  # the builtin pass's ranges over the same forwards


@pytest.fixture(scope="module")
def modelopt_graph(exported, samples, tmp_path_factory):
    """(path, summary, digest of dit.onnx before) of modelopt's graph."""
    before = _digest(exported / "dit.onnx")
    path = tmp_path_factory.mktemp("modelopt") / "dit.fp8.onnx"
    summary = quantize_modelopt(exported / "dit.onnx", path, samples)
    return path, summary, before


@pytest.fixture(scope="module")
def builtin_graph(exported, act_amax, tmp_path_factory) -> Path:
    model = onnx.load(str(exported / "dit.onnx"))
    insert_qdq(model, act_amax, "fp8")
    path = tmp_path_factory.mktemp("builtin") / "dit.fp8.onnx"
    onnx.save(model, str(path))
    return path


def test_modelopt_quantises_the_block_linears_only(modelopt_graph, builtin_graph, exported, engine):
    path, summary, before = modelopt_graph
    model = onnx.load(str(path))
    assert qdq_summary(model) == summary
    builtin = qdq_summary(onnx.load(str(builtin_graph)))
    # the same layers as the builtin pass (modelopt's topological sort reorders them)
    assert set(summary["quantized"]) == set(builtin["quantized"]) and len(summary["quantized"]) == 10 * 2
    assert set(summary["high_precision"]) == set(builtin["high_precision"])
    # and Q/DQ nowhere else: each weight has a Q -> DQ pair, and the activations share pairs as in the builtin
    # graph (per block q/k/v, o, cross q, ffn.0, ffn.2, and one for every block's text K/V); every Q feeds DQ
    # only and every DQ feeds the quantised linears only (attention's batched matmuls stay unquantised)
    blocks = engine.dit.cfg.num_layers
    assert summary["QuantizeLinear"] == summary["DequantizeLinear"] == 10 * blocks + 6 * blocks + 1
    quantized = {ln.node for ln in linear_nodes(model) if ln.module in summary["quantized"]}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert {c.op_type for c in consumers[n.output[0]]} == {"DequantizeLinear"}, n.name
        if n.op_type == "DequantizeLinear":
            assert {c.name for c in consumers[n.output[0]]} <= quantized, n.name
    producers = {o: n for n in model.graph.node for o in n.output}
    head = next(n for n in model.graph.node if n.name == "head.head/MatMul")
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in head.input)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    zero_points = {t.data_type for t in model.graph.initializer if t.name.endswith("_zero_point")}
    assert zero_points == {onnx.TensorProto.FLOAT8E4M3FN}
    # modelopt rewrites its input graph in place: it got a copy; and its intermediate graphs are gone
    assert _digest(exported / "dit.onnx") == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["dit.fp8.onnx"]


def test_modelopt_scales_are_the_calibrated_ranges(modelopt_graph, act_amax, engine):
    """modelopt calibrated on exactly the forwards PyTorch calibrated on: every activation scale is the range
    `calibrate` measured, and every weight scale the weight's per-output-channel range, under modelopt's
    FP8 convention (amax -> 127^2 / 448). onnxruntime's forward differs from PyTorch's by float32 rounding,
    which moves a range by up to 1.3e-5 relative (measured, one activation of 20); weight scales agree to one
    float32 rounding (modelopt rounds its INT8 scale before converting it)."""
    path, summary, _ = modelopt_graph
    model = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    producers = {o: n for n in model.graph.node for o in n.output}
    modules = dict(engine.dit.named_modules())
    for ln in linear_nodes(model):
        if ln.module not in summary["quantized"]:
            continue
        node = next(n for n in model.graph.node if n.name == ln.node)
        act_dq, weight_dq = producers[node.input[0]], producers[node.input[1]]
        assert inits[act_dq.input[1]].shape == ()  # one scale per activation tensor
        assert float(inits[act_dq.input[1]]) == pytest.approx(act_amax[ln.module] / MODELOPT_FP8_AMAX_LEVEL, rel=1e-4)
        weight = modules[ln.module].weight.detach().float()  # [out, in]; the graph holds its transpose
        expected = (weight.abs().amax(dim=1) / MODELOPT_FP8_AMAX_LEVEL).numpy()
        np.testing.assert_allclose(inits[weight_dq.input[1]], expected, rtol=2.4e-7)


@pytest.mark.parametrize("target,refs", [((1, 2, 2), ()), ((3, 2, 2), ((1, 2, 2), (2, 2, 2)))])
def test_modelopt_graph_matches_fake_quant_and_builtin(modelopt_graph, builtin_graph, engine, act_amax, target, refs):
    inputs = sample_inputs(engine.dit.cfg, 2, target, refs, generator=torch.Generator().manual_seed(11))
    dit = copy.deepcopy(engine.dit)
    with torch.no_grad():
        ref32 = run_dit_step(DiTStep(dit), inputs)
        with fake_quant(dit, act_amax, "fp8", per_channel_weights=True, amax_level=MODELOPT_FP8_AMAX_LEVEL):
            ref8 = run_dit_step(DiTStep(dit), inputs)
    got = ort_dit_call(ort_session(modelopt_graph[0]))(inputs)
    builtin = ort_dit_call(ort_session(builtin_graph))(inputs)
    scale = ref32.abs().max().item()
    err_emul = (got - ref8).abs().max().item()
    err_fp32 = (got - ref32).abs().max().item()
    err_builtin = (got - builtin).abs().max().item()
    builtin_fp32 = (builtin - ref32).abs().max().item()
    print(f"\nmodelopt FP8 graph, {target} + {refs}: vs PyTorch fake-quant {err_emul:.2e}, vs fp32 {err_fp32:.2e}, "
          f"vs the builtin graph {err_builtin:.2e} (builtin vs fp32 {builtin_fp32:.2e}, output max {scale:.2f})")
    check_against_fake_quant(err_emul, err_fp32, scale)
    # the two graphs differ only in their weights' quantisation (per channel and amax -> 36 against per tensor and
    # amax -> 448), so they agree to the size of that error. Measured over 9 input draws of 3 layouts: modelopt
    # vs builtin 0.62-0.93% of the output max, modelopt vs fp32 0.57-1.07x the builtin graph's own error.
    assert err_builtin < 0.02 * scale
    assert err_fp32 < 1.5 * builtin_fp32


_CALIB = ["--calib-size", "1", "--calib-steps", "1", "--calib-frames", "5"]


def test_cli_export_with_modelopt(tmp_path):
    """The issue's command, at the smallest calibration: it writes dit.fp8.onnx and nothing of modelopt's."""
    out = tmp_path / "onnx"
    code = export_cli.main(["export", "onnx", "--preset", "tiny", "--dtype", "fp32", "--parts", "dit", "--quantize",
                            "fp8", "--quantizer", "modelopt", "--out", str(out), *_CALIB])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["dit.fp8.onnx", "dit.onnx", "export.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    q = json.loads((out / "export.json").read_text())["quantization"]
    assert q["quantizer"] == "modelopt" and q["samples"] >= 1 and len(q["quantized"]) == 20
    assert qdq_summary(onnx.load(str(out / "dit.fp8.onnx")))["quantized"] == q["quantized"]


def test_cli_refuses_a_bf16_graph_without_the_cuda_provider(tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider, which runs bf16 graphs")
    code = export_cli.main(["export", "onnx", "--preset", "tiny", "--dtype", "bf16", "--parts", "dit", "--quantize",
                            "fp8", "--quantizer", "modelopt", "--out", str(tmp_path / "onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "--dtype fp32" in err and "onnxruntime-gpu" in err and "--quantizer builtin" in err
    assert not (tmp_path / "onnx").exists()


def test_failed_modelopt_export_leaves_the_folder_as_it_was(exported, tmp_path, monkeypatch):
    """modelopt fails half-way through its calibration, after it has written its intermediate graphs: the
    output folder keeps exactly what it held, and neither modelopt's folder nor its temporary files remain.
    (The DiT graph is the session's export, copied where the command writes it: the trace is checked above.)"""
    from anyid_rt.export import onnx_dit

    def copy_export(dit, path, opset, **kw):
        Path(path).write_bytes((exported / "dit.onnx").read_bytes())
        return Path(path)

    monkeypatch.setattr(onnx_dit, "export_dit_onnx", copy_export)
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "dit.onnx").write_text("an earlier export")
    (out / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, seen = mq.quantize, {}

    def failing_quantize(onnx_path, **kw):
        seen["work"], seen["tempdir"] = Path(kw["output_path"]).parent.parent, Path(tempfile.gettempdir())
        reader, get_next, calls = kw["calibration_data_reader"], kw["calibration_data_reader"].get_next, []

        def get_next_then_fail():
            calls.append(1)
            if len(calls) > 1:
                seen["files"] = sorted(str(p.relative_to(seen["work"])) for p in seen["work"].rglob("*.onnx"))
                raise RuntimeError("calibration failed half-way")
            return get_next()

        reader.get_next = get_next_then_fail
        return real(onnx_path, **kw)

    monkeypatch.setattr(mq, "quantize", failing_quantize)
    argv = ["export", "onnx", "--preset", "tiny", "--dtype", "fp32", "--parts", "dit", "--quantize", "fp8",
            "--quantizer", "modelopt", "--out", str(out), *_CALIB]
    with pytest.raises(RuntimeError, match="calibration failed half-way"):
        export_cli.main(argv)
    # by then modelopt had written graphs beside its output (dit_named.onnx, dit_opset19.onnx, ... in 0.47) and
    # through tempfile (onnxruntime's augmented calibration graph, ...)
    assert any(f.startswith("out/") for f in seen["files"]), seen["files"]
    assert any(not f.startswith(("in/", "out/")) for f in seen["files"]), seen["files"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert not seen["work"].exists() and seen["tempdir"] == seen["work"]
    assert tempfile.gettempdir() != str(seen["work"])  # tempfile's folder is restored
