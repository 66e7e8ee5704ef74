"""TensorRT export up to the engine build: optimisation profiles from buckets, the error without tensorrt,
the build orchestration against a recording stand-in of the tensorrt API, and the FP8 Q/DQ graph (checked
in onnxruntime against fake quantisation in PyTorch, and against fp32 with a measured tolerance).

TensorRT itself is not installed here (its wheels are too large for this environment): building and
running a real engine is left to a GPU machine (README.md, Export and serving).
"""
from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install onnx onnxruntime")
pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install onnxruntime")

from helpers import check_against_fake_quant  # noqa: E402

from anyid_rt import Engine  # noqa: E402
from anyid_rt.media import ASSET_DIR as ASSETS  # noqa: E402
from anyid_rt.config import DiTConfig, ModelConfig  # noqa: E402
from anyid_rt.export import cli as export_cli  # noqa: E402
from anyid_rt.export.graph_engine import GraphDiT, ort_dit_call, ort_session  # noqa: E402
from anyid_rt.export.onnx_dit import DiTStep, run_dit_step, sample_inputs  # noqa: E402
from anyid_rt.export.modelopt_qdq import quantize_modelopt  # noqa: E402
from anyid_rt.export.qdq import (CALIBRATION_PROMPTS, MissingDependency, calibrate_engine, fake_quant,  # noqa: E402
                                 insert_qdq, linear_nodes, qdq_summary)
from anyid_rt.export.trt import (Bucket, build_engine, check_profile, dit_profile, graph_kind,  # noqa: E402
                                 onnx_input_dims, profiles_for, vae_profile)
from anyid_rt.lora import LoraWeights, save_lora  # noqa: E402
from anyid_rt.models.linears import HIGH_PRECISION_LINEARS  # noqa: E402

HIGH_PRECISION = list(HIGH_PRECISION_LINEARS)


@pytest.fixture(scope="module")
def act_amax(engine):
    """Activation ranges from two real 2-step generations with an image and a clip reference."""
    refs = [str(ASSETS / "astronaut.png"), str(ASSETS / "astronaut_clip.mp4")]
    return calibrate_engine(engine, CALIBRATION_PROMPTS[:2], refs, steps=2, num_frames=5)


@pytest.fixture(scope="module")
def fp8_graph(exported, act_amax, tmp_path_factory) -> Path:
    model = onnx.load(str(exported / "dit.onnx"))
    insert_qdq(model, act_amax, "fp8")
    path = tmp_path_factory.mktemp("qdq") / "dit.fp8.onnx"
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------
# buckets and profiles
# ---------------------------------------------------------------------------------------------------------

def test_bucket_parse_and_validation():
    b = Bucket.parse("1280x704:5-81-121:5-35")
    assert (b.width, b.height, b.min_frames, b.opt_frames, b.max_frames) == (1280, 704, 5, 81, 121)
    assert (b.opt_ref_frames, b.max_ref_frames) == (5, 35)
    assert Bucket.parse("832x480:81") == Bucket(480, 832, 81, 81, 81)
    for bad in ("1280x700", "1280x704:6", "1280x704:121-81-5", "abc", "64x64:9:1:2"):
        with pytest.raises(ValueError):
            Bucket.parse(bad)


def test_dit_profile_of_the_5b_bucket():
    """1280 x 704 x 121 frames is 27,280 target tokens, and 4 images + one 121-frame clip 30,800 reference
    tokens (58,080 in all, ARCHITECTURE.md section 7)."""
    cfg = DiTConfig()
    p = dit_profile(cfg, Bucket(704, 1280))
    assert p["tokens"] == ((1, 1760, 192), (2, 27280, 192), (2, 27280, 192))
    assert p["ref_tokens"] == ((1, 0, 192), (2, 4400, 192), (2, 30800, 192))
    assert p["rope_cos"][2] == (27280, 64) and p["ref_rope_sin"][2] == (30800, 64)
    assert p["t_freq"] == ((1, 1, 256), (2, 2, 256), (2, 3, 256))
    assert p["context"][0] == (1, 512, 4096)


def test_profiles_match_the_exported_graphs(exported):
    for name, kind in (("dit.onnx", "dit"), ("vae_decode_first.onnx", "vae_first"), ("vae_decode_step.onnx", "vae_step")):
        path = exported / name
        assert graph_kind(path) == kind
        profiles = profiles_for(path, "tiny")
        assert len(profiles) == 1
        check_profile(profiles[0], onnx_input_dims(path))  # raises on any mismatch


def test_check_profile_catches_mismatches(exported):
    dims = onnx_input_dims(exported / "dit.onnx")
    good = profiles_for(exported / "dit.onnx", "tiny")[0]
    bad = dict(good, rope_cos=((1, 16), (5, 16), (40, 16)))  # 'tokens' differs from tokens' dim 1
    with pytest.raises(ValueError, match="disagree on dim 'tokens'"):
        check_profile(bad, dims)
    with pytest.raises(ValueError, match="dim 2 is 32"):
        check_profile(dict(good, t_freq=((1, 1, 16), (2, 2, 16), (2, 3, 16))), dims)
    with pytest.raises(ValueError, match="missing"):
        check_profile({k: v for k, v in good.items() if k != "context"}, dims)
    vdims = onnx_input_dims(exported / "vae_decode_step.onnx")
    vprof = profiles_for(exported / "vae_decode_step.onnx", "tiny")[0]
    wrong = dict(vprof, cache_12=tuple((s[0], s[1], 2, s[3] // 2, s[4]) for s in vprof["cache_12"]))
    with pytest.raises(ValueError, match="height"):
        check_profile(wrong, vdims)


def test_tiny_profile_covers_real_generations(engine):
    """Every DiT call of real tiny generations (t2v, references, image + clip, guidance on and off) fits
    the tiny bucket's profile."""
    prof = dit_profile(engine.dit.cfg, profiles_bucket := Bucket.parse("64x64:1-9-17:2-8"))
    seen = []

    def record(inputs):
        seen.append({k: tuple(v.shape) for k, v in inputs.items()})
        return run_dit_step(DiTStep(engine.dit), inputs)

    runner = Engine(GraphDiT(engine.dit.cfg, record), engine.vae, engine.text_encoder, defaults=engine.defaults)
    refs = [str(ASSETS / "astronaut.png"), str(ASSETS / "astronaut_clip.mp4")]
    for kw in (dict(num_frames=17), dict(references=refs[:1], num_frames=1), dict(references=refs, guidance=1.0),
               dict(references=refs, image=refs[0], num_frames=5)):
        runner.generate("x", steps=1, progress=False, **kw)
    assert len(seen) == 4 and profiles_bucket.max_frames == 17
    for shapes in seen:
        for name, shape in shapes.items():
            lo, _, hi = prof[name]
            assert all(a <= s <= b for a, s, b in zip(lo, shape, hi)), (name, shape, lo, hi)


def test_vae_profile_shapes():
    cfg = ModelConfig.preset("wan2.2-ti2v-5b").vae
    p = vae_profile(cfg, [(1024, 1), (256, 8)], Bucket(704, 1280), step=True)
    assert p["latent"] == ((1, 48, 1, 44, 80), (1, 48, 1, 44, 80), (2, 48, 1, 44, 80))
    assert p["cache_1"][2] == (2, 256, 2, 352, 640)


# ---------------------------------------------------------------------------------------------------------
# the build, without and with a (recording) tensorrt
# ---------------------------------------------------------------------------------------------------------

def test_missing_tensorrt_names_the_install(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    profiles = profiles_for(exported / "dit.onnx", "tiny")
    with pytest.raises(MissingDependency, match="pip install tensorrt"):
        build_engine(exported / "dit.onnx", tmp_path / "dit.plan", profiles)
    old = types.ModuleType("tensorrt")
    old.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(MissingDependency, match="too old"):
        build_engine(exported / "dit.onnx", tmp_path / "dit.plan", profiles)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = export_cli.main(["export", "trt", "--onnx", str(exported / "dit.onnx"), "--preset", "tiny",
                            "--out", str(tmp_path)])
    assert code == 2 and "pip install tensorrt" in capsys.readouterr().err
    assert not (tmp_path / "dit.plan").exists()
    # printing the profiles needs no TensorRT
    assert export_cli.main(["export", "trt", "--onnx", str(exported), "--preset", "tiny", "--print-profiles"]) == 0
    assert "profile 0: tokens min (1, 4, 192)" in capsys.readouterr().out


class _Recorder:
    def __init__(self):
        self.calls = []


def fake_tensorrt(rec: _Recorder, parse_ok: bool = True) -> types.ModuleType:
    """The subset of the tensorrt 10 Python API that build_engine uses, recording every call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            rec.calls.append(("logger", level))

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 1

    class BuilderFlag:
        BF16, FP8 = "BF16", "FP8"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.builder_optimization_level = [], [], None, None

        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("pool", pool, size))

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, p):
            self.profiles.append(p.shapes)

        def create_timing_cache(self, data):
            rec.calls.append(("timing_cache_in", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.calls.append(("build", sorted(config.flags), config.profiles))
            return b"PLAN"

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec.calls.append(("parse", path))
            return parse_ok

        def get_error(self, i):
            return "unsupported operator"

    for obj in (Logger, NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType, Builder, OnnxParser):
        setattr(trt, obj.__name__, obj)
    return trt


def _calls(rec, kind):
    return [c for c in rec.calls if c[0] == kind]


def test_build_orchestration(exported, fp8_graph, tmp_path, monkeypatch):
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    profiles = profiles_for(exported / "dit.onnx", "tiny", [Bucket(64, 64, 1, 9, 17, 8, 2), Bucket(32, 64, 1, 5, 9, 4, 1)])
    cache = tmp_path / "timing.cache"
    plan = build_engine(exported / "dit.onnx", tmp_path / "dit.plan", profiles, "bf16", timing_cache=cache)
    assert plan.read_bytes() == b"PLAN" and cache.read_bytes() == b"+"
    (_, flags, built_profiles), = _calls(rec, "build")
    assert flags == ["BF16"] and _calls(rec, "network_flags") == [("network_flags", 0)]  # fp32 graph: weakly typed
    assert built_profiles == profiles  # every input, every bucket, in order
    assert _calls(rec, "parse") == [("parse", str(exported / "dit.onnx"))]
    # a second build starts from the timing cache the first one wrote
    build_engine(fp8_graph, tmp_path / "dit_fp8.plan", profiles, "fp8", timing_cache=cache)
    assert _calls(rec, "timing_cache_in")[-1] == ("timing_cache_in", b"+") and cache.read_bytes() == b"++"
    assert _calls(rec, "build")[-1][1] == ["BF16", "FP8"]
    # FP8 needs the Q/DQ graph
    with pytest.raises(ValueError, match="--quantize fp8"):
        build_engine(exported / "dit.onnx", tmp_path / "x.plan", profiles, "fp8")


def test_build_strongly_typed_for_a_bf16_graph(exported, tmp_path, monkeypatch):
    model = onnx.load(str(exported / "dit.onnx"), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == "blocks.0.ffn.0.weight_t")
    arr = torch.from_numpy(onnx.numpy_helper.to_array(t).copy()).to(torch.bfloat16)
    t.CopyFrom(onnx.helper.make_tensor(t.name, onnx.TensorProto.BFLOAT16, list(arr.shape),
                                       arr.view(torch.int16).numpy().tobytes(), raw=True))
    path = tmp_path / "dit_bf16.onnx"
    onnx.save(model, str(path))
    rec = _Recorder()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec))
    build_engine(path, tmp_path / "dit.plan", profiles_for(path, "tiny"), "bf16")
    assert _calls(rec, "network_flags") == [("network_flags", 1 << 1)]  # STRONGLY_TYPED
    assert _calls(rec, "build")[0][1] == []  # the graph's types decide; no precision flags


def test_parse_errors_are_reported(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(_Recorder(), parse_ok=False))
    with pytest.raises(RuntimeError, match="unsupported operator"):
        build_engine(exported / "dit.onnx", tmp_path / "dit.plan", profiles_for(exported / "dit.onnx", "tiny"))
    assert not (tmp_path / "dit.plan").exists()


# ---------------------------------------------------------------------------------------------------------
# FP8 Q/DQ graph (what modelopt's FP8 recipe writes), emulated and checked
# ---------------------------------------------------------------------------------------------------------

def test_qdq_graph_structure(fp8_graph, engine):
    model = onnx.load(str(fp8_graph))
    s = qdq_summary(model)
    blocks = engine.dit.cfg.num_layers
    # in graph order: every block's text K/V first (computed from the context before the blocks run), then
    # each block's own linears
    assert s["quantized"] == [f"blocks.{i}.{m}" for i in range(blocks) for m in ("cross_attn.k", "cross_attn.v")] + \
        [f"blocks.{i}.{m}" for i in range(blocks) for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                             "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")]
    assert s["high_precision"] == HIGH_PRECISION
    # one weight DequantizeLinear per quantised linear; activation Q -> DQ pairs shared by the linears that
    # read the same tensor: per block q/k/v, o, cross q, ffn.0, ffn.2 (5) + the text context for every
    # block's cross k/v (1 in all)
    assert s["DequantizeLinear"] == 10 * blocks + (6 * blocks + 1)
    assert s["QuantizeLinear"] == 6 * blocks + 1
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["blocks.0.self_attn.q.weight_t_fp8"].data_type == onnx.TensorProto.FLOAT8E4M3FN
    assert "blocks.0.self_attn.q.weight_t" not in inits  # the fp32 copy is gone
    assert inits["head.head.weight_t"].data_type == onnx.TensorProto.FLOAT  # head stays high precision
    producers = {o: n for n in model.graph.node for o in n.output}
    for ln in linear_nodes(model):
        node = next(n for n in model.graph.node if n.name == ln.node)
        kinds = {producers[i].op_type if i in producers else "initializer" for i in node.input[:2]}
        assert (kinds == {"DequantizeLinear"}) == ln.quantized, ln


@pytest.mark.parametrize("target,refs", [((1, 2, 2), ()), ((2, 2, 3), ((1, 2, 3),)), ((3, 2, 2), ((1, 2, 2), (2, 2, 2)))])
def test_qdq_onnxruntime_matches_fake_quant(fp8_graph, exported, engine, act_amax, target, refs):
    inputs = sample_inputs(engine.dit.cfg, 2, target, refs, generator=torch.Generator().manual_seed(11))
    dit = copy.deepcopy(engine.dit)
    with torch.no_grad():
        ref32 = run_dit_step(DiTStep(dit), inputs)
        with fake_quant(dit, act_amax, "fp8"):
            ref8 = run_dit_step(DiTStep(dit), inputs)
    got = ort_dit_call(ort_session(fp8_graph))(inputs)
    scale = ref32.abs().max().item()
    err_emul = (got - ref8).abs().max().item()
    err_fp32 = (got - ref32).abs().max().item()
    print(f"\nFP8 Q/DQ graph, {target} + {refs}: vs PyTorch fake-quant {err_emul:.2e}, vs fp32 {err_fp32:.2e} "
          f"(output max {scale:.2f})")
    check_against_fake_quant(err_emul, err_fp32, scale)
    assert err_fp32 < 0.05 * scale  # E4M3 per-tensor on these tiny random weights: measured ~0.7-1% of max


def test_int8_qdq_runs_in_onnxruntime(exported, engine, act_amax, tmp_path):
    model = onnx.load(str(exported / "dit.onnx"))
    insert_qdq(model, act_amax, "int8")
    path = tmp_path / "dit.int8.onnx"
    onnx.save(model, str(path))
    assert {t.data_type for t in model.graph.initializer if t.name.endswith("_int8")} == {onnx.TensorProto.INT8}
    inputs = sample_inputs(engine.dit.cfg, generator=torch.Generator().manual_seed(12))
    dit = copy.deepcopy(engine.dit)
    with torch.no_grad():
        ref32 = run_dit_step(DiTStep(dit), inputs)
        with fake_quant(dit, act_amax, "int8"):
            ref8 = run_dit_step(DiTStep(dit), inputs)
    got = ort_dit_call(ort_session(path))(inputs)
    err_emul, err_fp32 = (got - ref8).abs().max().item(), (got - ref32).abs().max().item()
    print(f"\nINT8 Q/DQ graph: vs PyTorch fake-quant {err_emul:.2e}, vs fp32 {err_fp32:.2e}")
    check_against_fake_quant(err_emul, err_fp32, ref32.abs().max().item())


def test_modelopt_missing_names_the_install(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt", None)
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)
    inputs = [sample_inputs(ModelConfig.preset("tiny").dit)]
    with pytest.raises(MissingDependency, match=r"pip install -e \"\.\[export,modelopt\]\".*--quantizer builtin"):
        quantize_modelopt(exported / "dit.onnx", tmp_path / "q.onnx", inputs)


def test_lora_is_merged_before_quantising(engine, tmp_path):
    """export onnx --model --lora: the exported weights are the merged ones, and the FP8 weights are the
    merged weights quantised (not the base weights)."""
    folder = engine.save_pretrained(tmp_path / "tiny_model")
    g = torch.Generator().manual_seed(3)
    name = "blocks.0.self_attn.q"
    dim = engine.dit.cfg.dim
    lora = LoraWeights({name: torch.randn(4, dim, generator=g)}, {name: torch.randn(dim, 4, generator=g)}, {name: 4.0})
    save_lora(lora, tmp_path / "l.safetensors")
    out = tmp_path / "onnx"
    code = export_cli.main(["export", "onnx", "--model", str(folder), "--lora", str(tmp_path / "l.safetensors"),
                            "--dtype", "fp32", "--device", "cpu", "--parts", "dit", "--out", str(out), "--quantize",
                            "fp8", "--quantizer", "builtin", "--calib-size", "1", "--calib-steps", "1",
                            "--calib-frames", "5"])
    assert code == 0
    base = engine.dit.checkpoint_state_dict()[f"{name}.weight"].detach()  # q's rows of the engine's fused qkv
    merged = base + lora.up[name] @ lora.down[name]  # alpha / rank = 1
    w = {t.name: t for t in onnx.load(str(out / "dit.onnx")).graph.initializer}
    exported_w = torch.from_numpy(onnx.numpy_helper.to_array(w[f"{name}.weight_t"]).copy()).T
    assert torch.allclose(exported_w, merged, atol=1e-5) and not torch.allclose(exported_w, base, atol=1e-2)
    q = {t.name: t for t in onnx.load(str(out / "dit.fp8.onnx")).graph.initializer}
    raw = np.frombuffer(q[f"{name}.weight_t_fp8"].raw_data, dtype=np.uint8).copy()
    fp8 = torch.from_numpy(raw).view(torch.float8_e4m3fn).float().reshape(dim, dim).T
    scale = float(onnx.numpy_helper.to_array(q[f"{name}.weight_t_scale"]))
    assert scale == pytest.approx(merged.abs().max().item() / 448, rel=1e-6)
    # E4M3 keeps 3 mantissa bits: relative rounding error <= 2^-4, plus subnormal steps near zero
    assert ((fp8 * scale - merged).abs() <= merged.abs() / 16 + scale / 8).all()
