"""Triton RMSNorm and affine LayerNorm against their references (values and gradients of x, weight, bias).

Under the interpreter bf16 is checked as an input only (it truncates fp32 -> bf16 casts where a GPU rounds to
nearest); every test here also runs on a GPU, where the bf16 cases are checked in full.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from helpers import assert_calibrated, fresh_seed  # noqa: E402
from anyid_rt.kernels.norm import (layer_norm, layer_norm_ref, rms_norm, rms_norm_ref, rms_norm_rope,  # noqa: E402
                                   rms_norm_rope_ref)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# bf16 outputs: skipped under the interpreter, which truncates fp32 -> bf16 casts (GPUs round to nearest);
# marked `gpu` so that the GPU suite (pytest -m gpu) runs them
bf16_out = [pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                               reason="the Triton interpreter truncates fp32 -> bf16 casts (GPUs round to nearest)"),
            pytest.mark.gpu]
# x shapes: the tiny model's width, an odd width (not a power of two), a prime width, 2-D input
SHAPES = [(2, 37, 64), (2, 5, 3000), (3, 7, 131), (45, 96)]


def _check(op, ref_op, x, params, seed, eps=1e-6, grad=True):
    what = f"{op.__name__} x {tuple(x.shape)} {x.dtype} params {params[0].dtype} seed={seed}"
    leaves = [t.detach().requires_grad_(grad) for t in (x, *params)]
    leaves_ref = [t.detach().float().requires_grad_(grad) for t in (x, *params)]
    leaves_pt = [t.detach().requires_grad_(grad) for t in (x, *params)]
    out = op(*leaves, eps)
    out_ref = ref_op(*leaves_ref, eps)
    out_pt = ref_op(*leaves_pt, eps)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_calibrated(out, out_ref, out_pt, what)
    if grad:
        dout = torch.randn(out.shape, device=DEV).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        grads_ref = torch.autograd.grad(out_ref, leaves_ref, dout.float())
        grads_pt = torch.autograd.grad(out_pt, leaves_pt, dout)
        for name, g, g_ref, g_pt, t in zip(("dx", "dweight", "dbias"), grads, grads_ref, grads_pt, leaves):
            assert g.dtype == t.dtype and g.shape == t.shape
            assert_calibrated(g, g_ref, g_pt, f"{what} {name}")


DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float16),
          pytest.param(torch.bfloat16, torch.float32, marks=bf16_out),
          pytest.param(torch.bfloat16, torch.bfloat16, marks=bf16_out)]


@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm(shape, x_dtype, p_dtype):
    seed = fresh_seed()
    x = (torch.randn(shape, device=DEV) * 2).to(x_dtype)
    w = (1 + torch.randn(shape[-1], device=DEV) * 0.2).to(p_dtype)
    _check(rms_norm, rms_norm_ref, x, (w,), seed)


@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm(shape, x_dtype, p_dtype):
    seed = fresh_seed()
    x = (torch.randn(shape, device=DEV) * 2 + 0.5).to(x_dtype)
    w = (1 + torch.randn(shape[-1], device=DEV) * 0.2).to(p_dtype)
    b = (torch.randn(shape[-1], device=DEV) * 0.2).to(p_dtype)
    _check(layer_norm, layer_norm_ref, x, (w, b), seed)


def _rope_ops(L: int, H: int, D: int):
    """(Triton, reference) q/k norm + RoPE closures with random angles for L tokens of H heads of dim D."""
    angles = (torch.rand(L, D // 2, device=DEV) * 2 - 1) * torch.pi * 4
    rope = (angles.cos(), angles.sin())

    def rms_norm_rope_triton(x, w, eps):
        return rms_norm_rope(x, w, eps, rope, H)

    def rms_norm_rope_reference(x, w, eps):
        return rms_norm_rope_ref(x, w, eps, rope, H)

    return rms_norm_rope_triton, rms_norm_rope_reference


# (B, L, H, D): the tiny model's heads, the 5B head dim, and a width (5 x 6 = 30) that is neither a power of
# two nor a multiple of the pairs per block
ROPE_SHAPES = [(2, 37, 2, 32), (1, 13, 3, 128), (2, 9, 5, 6)]


@pytest.mark.parametrize("x_dtype,p_dtype", DTYPES)
@pytest.mark.parametrize("B,L,H,D", ROPE_SHAPES)
def test_rms_norm_rope(B, L, H, D, x_dtype, p_dtype):
    """The q/k norm with RoPE fused into its output, against the norm followed by `apply_rope_ref`."""
    seed = fresh_seed()
    x = (torch.randn(B, L, H * D, device=DEV) * 2).to(x_dtype)
    w = (1 + torch.randn(H * D, device=DEV) * 0.2).to(p_dtype)
    _check(*_rope_ops(L, H, D), x, (w,), seed)


def test_rms_norm_rope_rejects_bad_tables():
    x, w = torch.randn(2, 5, 64, device=DEV), torch.ones(64, device=DEV)
    cos, sin = torch.ones(5, 16, device=DEV), torch.zeros(5, 16, device=DEV)
    with pytest.raises(ValueError, match=r"must be \[L, D/2\] = \[5, 8\]"):
        rms_norm_rope(x, w, 1e-6, (cos, sin), 4)  # 4 heads of 16: tables of 8 pairs
    with pytest.raises(ValueError, match="require grad"):
        rms_norm_rope(x, w, 1e-6, (cos, sin.requires_grad_()), 2)
    with pytest.raises(ValueError, match=r"\[B, L, H\*D\]"):
        rms_norm_rope(x[0], w, 1e-6, (cos, sin), 2)
    assert torch.equal(rms_norm_rope(x, w, 1e-6, None, 2), rms_norm(x, w, 1e-6))


def test_bf16_inputs_forward():
    """bf16 weights and fp32 x: every store is fp32, so the interpreter checks bf16 loads exactly."""
    seed = fresh_seed()
    x = torch.randn(3, 7, 300, device=DEV)
    w, b = (torch.randn(300, device=DEV).to(torch.bfloat16) for _ in range(2))
    _check(rms_norm, rms_norm_ref, x, (w,), seed, grad=False)
    _check(layer_norm, layer_norm_ref, x, (w, b), seed, grad=False)


def test_strided_input_and_eps():
    """A column slice of a wider tensor (row stride != width), and a large eps that matters."""
    seed = fresh_seed()
    x = torch.randn(4, 9, 200, device=DEV)[:, :, 50:150] * 1e-2
    w, b = torch.randn(100, device=DEV), torch.randn(100, device=DEV)
    _check(rms_norm, rms_norm_ref, x, (w,), seed, eps=1e-3)
    _check(layer_norm, layer_norm_ref, x, (w, b), seed, eps=1e-3)


def test_rejects_mismatched_parameters():
    x = torch.randn(2, 3, 16, device=DEV)
    with pytest.raises(ValueError, match=r"parameters must be \[16\]"):
        rms_norm(x, torch.ones(8, device=DEV))
    with pytest.raises(ValueError, match=r"parameters must be \[16\]"):
        layer_norm(x, torch.ones(16, device=DEV), torch.ones(15, device=DEV))


def test_registered_ops():
    x = torch.randn(3, 5, 40, device=DEV, requires_grad=True)
    w, b = (torch.randn(40, device=DEV, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.anyid_rt.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.anyid_rt.layer_norm.default, (x, w, b, 1e-6))
    angles = torch.randn(5, 10, device=DEV)
    torch.library.opcheck(torch.ops.anyid_rt.rms_norm_rope.default, (x, w, angles.cos(), angles.sin(), 1e-6))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("op", ["rms", "ln"])
def test_gpu_production_width(op):
    """q/k RMSNorm over the full 3072 width of [2, 2640, 3072] bf16 tokens; LayerNorm likewise."""
    seed = fresh_seed()
    x = torch.randn(2, 2640, 3072, device=DEV).to(torch.bfloat16)
    w = (1 + torch.randn(3072, device=DEV) * 0.2)
    if op == "rms":
        _check(rms_norm, rms_norm_ref, x, (w,), seed)
    else:
        _check(layer_norm, layer_norm_ref, x, (w, torch.randn(3072, device=DEV)), seed)


@pytest.mark.gpu
@requires_cuda
def test_gpu_production_width_rope():
    """The 5B q/k norm with RoPE: [2, 2640, 3072] bf16, 24 heads of 128."""
    seed = fresh_seed()
    x = torch.randn(2, 2640, 3072, device=DEV).to(torch.bfloat16)
    w = (1 + torch.randn(3072, device=DEV) * 0.2)
    _check(*_rope_ops(2640, 24, 128), x, (w,), seed)
