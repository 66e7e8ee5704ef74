"""ONNX export: the tensor-only DiT step and the streaming VAE-decoder graphs against the PyTorch models,
in PyTorch first, then in onnxruntime (CPU, tiny sizes), then whole generations through the graphs.

The graphs are exported once per test session through the CLI (`anyid-rt export onnx --check`) into a
shared folder that the export-trt and Triton tests reuse.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="the export extra is not installed: pip install onnx onnxruntime")
pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install onnxruntime")


from anyid_rt.media import ASSET_DIR as ASSETS  # noqa: E402
from anyid_rt.export import cli as export_cli  # noqa: E402
from anyid_rt.export.graph_engine import onnx_engine, ort_dit_call, ort_graph_call, ort_session  # noqa: E402
from anyid_rt.export.onnx_dit import DIT_INPUTS, DiTStep, dit_inputs, export_dit_onnx, run_dit_step  # noqa: E402
from anyid_rt.export.onnx_vae import VAEDecodeFirst, VAEDecodeStep, cache_layout, decode_streaming  # noqa: E402
from anyid_rt.models.dit import Segments, unpatchify  # noqa: E402

# (name, target token grid, reference token grids, batch, image-to-video): token counts 4 .. 80, 0 .. 3 refs
LAYOUTS = [
    ("t2v 4 tokens", (1, 2, 2), (), 1, False),
    ("1 image ref", (2, 2, 3), ((1, 2, 3),), 2, False),
    ("image + clip refs, i2v", (3, 2, 2), ((1, 2, 2), (2, 2, 2)), 2, True),
    ("3 refs, 76 tokens", (2, 4, 4), ((1, 4, 4), (1, 4, 4), (3, 2, 2)), 2, False),
]


def make_case(cfg, target, refs, batch, i2v, seed=0):
    """Random latents, RoPE starts (references after the target), AnyID segments and a ragged context."""
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = cfg.patch_size
    lat = [torch.randn(batch, cfg.in_dim, f * pt, h * ph, w * pw, generator=g) for f, h, w in (target, *refs)]
    per_frame = target[1] * target[2]
    n = target[0] * per_frame
    r = sum(a * b * c for a, b, c in refs)
    t = (torch.rand(batch, 1, generator=g) * 1000).tolist()
    lens, ts = [], []
    if i2v:
        lens.append(per_frame), ts.append([0.0] * batch)
        lens.append(n - per_frame)
    else:
        lens.append(n)
    ts.append([v[0] for v in t])
    if r:
        lens.append(r), ts.append([0.0] * batch)
    seg = Segments(tuple(lens), torch.tensor(ts).T.contiguous())
    starts, cursor = [0], target[0]
    for f, _, _ in refs:
        starts.append(cursor)
        cursor += f
    ctx = [torch.randn(int(k), cfg.text_dim, generator=g) for k in torch.randint(2, 20, (batch,), generator=g)]
    return lat, starts, seg, ctx


@pytest.mark.parametrize("name,target,refs,batch,i2v", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_dit_step_equals_forward_groups_in_pytorch(engine, name, target, refs, batch, i2v):
    dit = engine.dit
    lat, starts, seg, ctx = make_case(dit.cfg, target, refs, batch, i2v)
    with torch.no_grad():
        ref = dit.forward_groups(lat, starts, seg, ctx)
        got = unpatchify(dit.cfg, run_dit_step(DiTStep(dit), dit_inputs(dit.cfg, lat, starts, seg, ctx)), target)
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    # the same forward_tokens; only the tables are built differently (cached per layout vs per call)
    assert err < 1e-5 * max(1.0, ref.abs().max().item()), f"{name}: max |error| {err}"


def test_dit_graph_interface(exported):
    model = onnx.load(str(exported / "dit.onnx"))
    assert model.opset_import[0].version >= 18
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert list(dims) == list(DIT_INPUTS)
    assert dims["tokens"] == ["batch", "tokens", 192] and dims["ref_tokens"] == ["batch", "ref_tokens", 192]
    assert dims["seg_index"] == ["tokens"] and dims["ref_rope_cos"] == ["ref_tokens", 16]
    assert dims["t_freq"] == ["batch", "segments", 32] and dims["context"] == ["batch", 512, 32]
    names = {n.name for n in model.graph.node}
    assert {"blocks.0.self_attn.q/MatMul", "blocks.1.ffn.2/MatMul", "head.head/MatMul"} <= names
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["check_dit_max_abs_error"] < 2e-5 and manifest["check_vae_max_abs_error"] < 2e-5


@pytest.mark.parametrize("name,target,refs,batch,i2v", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_dit_onnxruntime_equals_pytorch(exported, engine, name, target, refs, batch, i2v):
    dit = engine.dit
    call = ort_dit_call(ort_session(exported / "dit.onnx"))
    lat, starts, seg, ctx = make_case(dit.cfg, target, refs, batch, i2v, seed=7)
    with torch.no_grad():
        ref = dit.forward_groups(lat, starts, seg, ctx)
    got = unpatchify(dit.cfg, call(dit_inputs(dit.cfg, lat, starts, seg, ctx)), target)
    err = (got - ref).abs().max().item()
    n, r = target[0] * target[1] * target[2], sum(a * b * c for a, b, c in refs)
    print(f"\nDiT onnxruntime vs PyTorch [{name}] batch {batch}, {n} target + {r} reference tokens, "
          f"{len(seg.lens)} segments: max |error| {err:.2e} (output max {ref.abs().max():.2f})")
    assert err < 2e-5 * max(1.0, ref.abs().max().item())


def test_dit_onnxruntime_rejects_nothing_silently(exported, engine):
    """A wrong context width must fail in onnxruntime, not broadcast."""
    dit = engine.dit
    lat, starts, seg, ctx = make_case(dit.cfg, (1, 2, 2), (), 1, False)
    feed = {k: v.numpy() for k, v in dit_inputs(dit.cfg, lat, starts, seg, ctx).items()}
    feed["context"] = np.zeros((1, 512, 31), np.float32)
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

    with pytest.raises((Fail, InvalidArgument)):
        ort_session(exported / "dit.onnx").run(None, feed)


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_vae_stream_modules_equal_decode(engine, frames):
    vae = engine.vae
    z = torch.randn(2, vae.cfg.z_dim, frames, 4, 6, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        got = decode_streaming(VAEDecodeFirst(vae), VAEDecodeStep(vae), z)
    assert torch.equal(got, vae.decode(z))  # same ops in the same order: bit-identical


def test_vae_cache_layout(engine, exported):
    layout = cache_layout(engine.vae)
    assert len(layout) == engine.vae.decoder_slots
    assert {s for _, s in layout} == {1, 2, 4, 8}  # latent resolution up to the last up-stage
    model = onnx.load(str(exported / "vae_decode_step.onnx"))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs == ["latent"] + [f"cache_{k}" for k in range(len(layout))]
    assert outputs == ["frames"] + [f"cache_out_{k}" for k in range(len(layout))]


@pytest.mark.parametrize("shape", [(2, 48, 3, 4, 6), (1, 48, 2, 6, 4), (1, 48, 1, 4, 4), (1, 48, 4, 8, 8)])
def test_vae_onnxruntime_equals_decode(exported, engine, shape):
    first = ort_graph_call(ort_session(exported / "vae_decode_first.onnx"))
    step = ort_graph_call(ort_session(exported / "vae_decode_step.onnx"))
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    got = decode_streaming(first, step, z)
    ref = engine.vae.decode(z)
    err = (got - ref).abs().max().item()
    print(f"\nVAE decode onnxruntime vs PyTorch, latent {list(shape)}: max |error| {err:.2e}")
    assert got.shape == ref.shape and err < 2e-5


def test_generation_through_onnxruntime_matches_pytorch(exported, engine):
    """Whole AnyID generations (guidance, an image and a clip reference) with the DiT and the VAE decoder
    in onnxruntime: the latents agree to fp32 rounding; frames differ by at most 1 level where a value
    sits on a rounding boundary."""
    graphs = onnx_engine(engine, exported)
    refs = [str(ASSETS / "astronaut.png"), str(ASSETS / "astronaut_clip.mp4")]
    for kw in (dict(), dict(references=refs, primary=1), dict(references=refs[:1], guidance=1.0)):
        a = engine.generate("a smiling person", steps=2, num_frames=9, seed=5, progress=False, **kw)
        b = graphs.generate("a smiling person", steps=2, num_frames=9, seed=5, progress=False, **kw)
        assert (a.latents - b.latents).abs().max().item() < 1e-4
        diff = (a.frames.int() - b.frames.int()).abs()
        assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < 1e-3


def test_bf16_export_keeps_the_interface(engine, tmp_path):
    """A bf16 model exports bf16 weights (for a strongly typed TensorRT build) with the same fp32 / int64
    inputs and outputs, and its FP8 Q/DQ graph type-checks with bf16 scales. onnxruntime's CPU provider
    has no bf16 MatMul, so this is checked structurally (ONNX's full type and shape inference)."""
    from anyid_rt.export.qdq import insert_qdq, linear_nodes

    import copy

    dit = copy.deepcopy(engine.dit).to(torch.bfloat16)
    path = export_dit_onnx(dit, tmp_path / "dit_bf16.onnx")
    model = onnx.load(str(path))
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types["blocks.0.self_attn.q.weight_t"] == onnx.TensorProto.BFLOAT16
    assert types["blocks.1.ffn.0.weight_t"] == onnx.TensorProto.BFLOAT16
    io_types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io_types["tokens"] == io_types["velocity"] == onnx.TensorProto.FLOAT
    assert io_types["seg_index"] == onnx.TensorProto.INT64
    insert_qdq(model, {ln.module: 1.0 for ln in linear_nodes(model) if ln.quantized}, "fp8")  # full check inside
    scales = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith("scale")}
    assert scales and set(scales.values()) == {onnx.TensorProto.BFLOAT16}


def test_export_cli_rejects_bad_arguments(tmp_path, capsys):
    assert export_cli.main(["export", "onnx", "--preset", "wan2.2-ti2v-5b", "--out", str(tmp_path)]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert export_cli.main(["export", "onnx", "--parts", "unet", "--out", str(tmp_path)]) == 2
