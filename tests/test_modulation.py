"""Triton timestep-split LayerNorm-modulate and gated residual against their references (values, gradients).

These kernels have no tl.dot, so the interpreter reads bf16 correctly, but it truncates fp32 -> bf16 casts
where a GPU rounds to nearest (triton 3.9): under the interpreter bf16 is checked as an input only, and every
test here runs on a GPU too, where bf16 outputs are checked; the `gpu` tests add the production width (3072)
and token counts of a few thousand.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from helpers import assert_calibrated, fresh_seed  # noqa: E402
from anyid_rt.kernels import SegmentMap  # noqa: E402
from anyid_rt.kernels.modulation import (gated_residual, gated_residual_ref, layernorm_modulate,  # noqa: E402
                                         layernorm_modulate_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SEGMENTS = [(5, 17, 3), (25,), (0, 20, 5), (1, 1, 23)]
# bf16 outputs: skipped under the interpreter, which truncates fp32 -> bf16 casts (GPUs round to nearest);
# marked `gpu` so that the GPU suite (pytest -m gpu) runs them
bf16_out = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                               reason="the Triton interpreter truncates fp32 -> bf16 casts (GPUs round to nearest)"),
            pytest.mark.gpu]


def _mod_rows(B, S, D, strided=False):
    """shift, scale [B, S, D] fp32; `strided` takes them as views of a [B, S, 6, D] modulation tensor."""
    if strided:
        mod = torch.randn(B, S, 6, D, device=DEV)
        return mod[:, :, 0], mod[:, :, 1]
    return torch.randn(B, S, D, device=DEV), torch.randn(B, S, D, device=DEV)


def _check_ln_modulate(x, shift, scale, seg_lens, out_dtype, seed, grad=True):
    what = f"layernorm_modulate x {tuple(x.shape)} {x.dtype} -> {out_dtype} segments {seg_lens} seed={seed}"
    leaves = [t.detach().requires_grad_(grad) for t in (x, shift, scale)]
    leaves_ref = [t.detach().float().requires_grad_(grad) for t in (x, shift, scale)]
    leaves_pt = [t.detach().requires_grad_(grad) for t in (x, shift, scale)]
    seg = SegmentMap.from_lens(seg_lens, DEV)
    out = layernorm_modulate(*leaves, seg, 1e-6, out_dtype)
    out_ref = layernorm_modulate_ref(*leaves_ref, seg, 1e-6, torch.float32)
    out_pt = layernorm_modulate_ref(*leaves_pt, seg, 1e-6, out_dtype)
    assert out.dtype == (out_dtype or x.dtype) and out.shape == x.shape
    assert_calibrated(out, out_ref, out_pt, what)
    if grad:
        dout = torch.randn(out.shape, device=DEV).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        grads_ref = torch.autograd.grad(out_ref, leaves_ref, dout.float())
        grads_pt = torch.autograd.grad(out_pt, leaves_pt, dout)
        for name, g, g_ref, g_pt, t in zip(("dx", "dshift", "dscale"), grads, grads_ref, grads_pt, leaves):
            assert g.dtype == t.dtype and g.shape == t.shape
            assert_calibrated(g, g_ref, g_pt, f"{what} {name}")


def _check_gated_residual(residual, y, gate, seg_lens, seed, grad=True):
    what = f"gated_residual y {tuple(y.shape)} {y.dtype} segments {seg_lens} seed={seed}"
    leaves = [t.detach().requires_grad_(grad) for t in (residual, y, gate)]
    leaves_ref = [t.detach().float().requires_grad_(grad) for t in (residual, y, gate)]
    leaves_pt = [t.detach().requires_grad_(grad) for t in (residual, y, gate)]
    seg = SegmentMap.from_lens(seg_lens, DEV)
    out = gated_residual(*leaves, seg)
    out_ref = gated_residual_ref(*leaves_ref, seg)
    out_pt = gated_residual_ref(*leaves_pt, seg)
    assert out.dtype == torch.float32 and out.shape == residual.shape
    assert_calibrated(out, out_ref, out_pt, what)
    if grad:
        dout = torch.randn(out.shape, device=DEV)
        grads = torch.autograd.grad(out, leaves, dout)
        grads_ref = torch.autograd.grad(out_ref, leaves_ref, dout)
        grads_pt = torch.autograd.grad(out_pt, leaves_pt, dout)
        for name, g, g_ref, g_pt, t in zip(("dresidual", "dy", "dgate"), grads, grads_ref, grads_pt, leaves):
            assert g.dtype == t.dtype and g.shape == t.shape
            assert_calibrated(g, g_ref, g_pt, f"{what} {name}")


@pytest.mark.parametrize("seg_lens", SEGMENTS)
@pytest.mark.parametrize("x_dtype,out_dtype", [
    (torch.float32, None), (torch.float16, None), (torch.float32, torch.float16), (torch.float16, torch.float32),
    pytest.param(torch.bfloat16, None, marks=bf16_out), pytest.param(torch.float32, torch.bfloat16, marks=bf16_out),
    pytest.param(torch.bfloat16, torch.float32, marks=bf16_out)])
def test_layernorm_modulate(seg_lens, x_dtype, out_dtype):
    seed = fresh_seed()
    B, L, D = 2, sum(seg_lens), 48
    x = (torch.randn(B, L, D, device=DEV) * 3 + 1).to(x_dtype)  # nonzero mean, non-unit variance
    _check_ln_modulate(x, *_mod_rows(B, len(seg_lens), D), seg_lens, out_dtype, seed)


def test_bf16_inputs_forward():
    """bf16 activations in, fp32 out (the forward part that the interpreter gets right for bf16)."""
    seed = fresh_seed()
    B, seg_lens, D = 2, (5, 17, 3), 40
    x = torch.randn(B, 25, D, device=DEV).to(torch.bfloat16)
    _check_ln_modulate(x, *_mod_rows(B, 3, D), seg_lens, torch.float32, seed, grad=False)
    y = torch.randn(B, 25, D, device=DEV).to(torch.bfloat16)
    _check_gated_residual(torch.randn(B, 25, D, device=DEV), y, _mod_rows(B, 3, D)[0], seg_lens, seed, grad=False)


@pytest.mark.parametrize("D", [3000, 17])
def test_layernorm_modulate_odd_width_and_strides(D):
    """A width that is not a power of two, x as a column slice of a wider tensor, shift/scale as views."""
    seed = fresh_seed()
    seg_lens, B = (5, 17, 3), 2
    x = torch.randn(B, 25, 2 * D, device=DEV).to(torch.float16)[:, :, :D]
    assert not x.is_contiguous()
    _check_ln_modulate(x, *_mod_rows(B, 3, D, strided=True), seg_lens, None, seed)


@pytest.mark.parametrize("seg_lens", SEGMENTS)
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_out)])
def test_gated_residual(seg_lens, y_dtype):
    seed = fresh_seed()
    B, L, D = 2, sum(seg_lens), 48
    residual = torch.randn(B, L, D, device=DEV)
    y = torch.randn(B, L, D, device=DEV).to(y_dtype)
    _check_gated_residual(residual, y, _mod_rows(B, len(seg_lens), D)[0], seg_lens, seed)


def test_gated_residual_odd_width_and_strides():
    seed = fresh_seed()
    B, D, seg_lens = 2, 3000, (5, 17, 3)
    residual = torch.randn(B, 25, D + 8, device=DEV)[:, :, 8:]
    y = torch.randn(B, 25, 2 * D, device=DEV).to(torch.float16)[:, :, D:]
    _check_gated_residual(residual, y, _mod_rows(B, 3, D, strided=True)[1], seg_lens, seed)


def test_shape_errors_match_reference():
    x = torch.randn(2, 25, 16, device=DEV)
    shift, scale = _mod_rows(2, 3, 16)
    for seg_lens in [(5, 17, 4), (5, 20)]:  # wrong total; wrong number of segments
        seg = SegmentMap.from_lens(seg_lens, DEV)
        with pytest.raises(ValueError) as ref_err:
            layernorm_modulate_ref(x, shift, scale, seg)
        with pytest.raises(ValueError) as err:
            layernorm_modulate(x, shift, scale, seg)
        assert str(err.value) == str(ref_err.value)
        with pytest.raises(ValueError) as err:
            gated_residual(x, x, shift, seg)
        assert str(err.value) == str(ref_err.value)
    with pytest.raises(ValueError, match=r"\[B, S, D\]"):
        layernorm_modulate(x, shift[:, :, :8], scale, SegmentMap.from_lens((5, 17, 3), DEV))
    with pytest.raises(ValueError, match="negative segment length"):
        SegmentMap.from_lens((5, -1, 21))


def test_reference_runs_on_the_index_alone():
    """A layout given only as an index tensor (how the exported graph receives it): the references give the
    same result as with the lengths known; the Triton kernels, which launch per segment, refuse it by name."""
    fresh_seed()
    seg = SegmentMap.from_lens((5, 0, 17, 3), DEV)
    index_only = SegmentMap(seg.index)
    x, y = torch.randn(2, 25, 16, device=DEV), torch.randn(2, 25, 16, device=DEV)
    shift, scale = _mod_rows(2, 4, 16)
    assert torch.equal(layernorm_modulate_ref(x, shift, scale, index_only),
                       layernorm_modulate_ref(x, shift, scale, seg))
    assert torch.equal(gated_residual_ref(x, y, shift, index_only), gated_residual_ref(x, y, shift, seg))
    with pytest.raises(ValueError, match=r"segment index \(24,\) does not cover L=25"):
        layernorm_modulate_ref(x, shift, scale, SegmentMap(seg.index[:24]))
    with pytest.raises(ValueError, match="need the segment lengths"):
        layernorm_modulate(x, shift, scale, index_only)
    with pytest.raises(ValueError, match="need the segment lengths"):
        gated_residual(x, y, shift, index_only)


def test_registered_ops_compile_and_export():
    seed = fresh_seed()
    seg_lens = (5, 17, 3)
    seg = SegmentMap.from_lens(seg_lens, DEV)
    x = torch.randn(2, 25, 32, device=DEV, requires_grad=True)
    shift, scale = (t.requires_grad_() for t in _mod_rows(2, 3, 32))
    y = torch.randn(2, 25, 32, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.anyid_rt.layernorm_modulate.default,
                          (x, shift, scale, list(seg_lens), 1e-6, torch.float32))
    torch.library.opcheck(torch.ops.anyid_rt.gated_residual.default, (x, y, scale, list(seg_lens)))

    class Block(torch.nn.Module):  # the DiT's norm -> (branch) -> gated residual pattern
        def forward(self, x, shift, scale, y):
            return gated_residual(x, layernorm_modulate(x, shift, scale, seg) * y, scale, seg)

    args = (x, shift, scale, y)
    ref = gated_residual_ref(x, layernorm_modulate_ref(x, shift, scale, seg) * y, scale, seg)
    exported = torch.export.export(Block(), tuple(t.detach() for t in args))
    assert "anyid_rt.layernorm_modulate" in exported.graph_module.code
    assert_calibrated(exported.module()(*args), ref, ref, f"exported block seed={seed}")
    out = torch.compile(Block(), backend="aot_eager", fullgraph=True)(*args)
    assert_calibrated(out, ref, ref, f"compiled block seed={seed}")
    for name, g, g_ref in zip(("x", "shift", "scale", "y"), torch.autograd.grad(out.sum(), args),
                              torch.autograd.grad(ref.sum(), args)):
        assert_calibrated(g, g_ref, g_ref, f"compiled block d{name} seed={seed}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; the GPU suite runs the real benchmark")
def test_benchmark_dry_run(tmp_path):
    """bench/bench_modulation.py parses its arguments, times, writes JSON lines and a plot at tiny sizes."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_modulation.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (tmp_path / "bench_modulation.jsonl").read_text().splitlines()
    assert len(lines) >= 4 and '"gbps"' in lines[0]


# ----------------------------------------------------------------------------------------------------------
# GPU: production width, bf16 activations, thousands of tokens, image-to-video and reference segments
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("seg_lens", [(880, 1760), (1000, 37, 880, 3)])
def test_gpu_production_width(seg_lens):
    seed = fresh_seed()
    B, L, D = 2, sum(seg_lens), 3072
    x = torch.randn(B, L, D, device=DEV).to(torch.bfloat16)
    shift, scale = _mod_rows(B, len(seg_lens), D, strided=True)
    _check_ln_modulate(x, shift, scale, seg_lens, None, seed)
    _check_ln_modulate(x.float(), shift, scale, seg_lens, torch.bfloat16, seed)
    _check_gated_residual(torch.randn(B, L, D, device=DEV), torch.randn(B, L, D, device=DEV).to(torch.bfloat16),
                          shift, seg_lens, seed)
