"""Triton flash attention against `attention_ref` (forward, gradients, strides, torch.library).

On a CPU the kernels run under TRITON_INTERPRET=1 in fp32 and fp16 (the interpreter's tl.dot is wrong for
bf16); bf16, autotuning and torch.compile with Inductor are checked by the `gpu` tests.
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
from anyid_rt.kernels.attention import attention, attention_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _qkv(B, Lq, Lk, H, D, dtype, layout="blhd", device=DEV):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] in a given memory layout (all are [B, L, H, D] views)."""
    if layout == "blhd":
        q, k, v = (torch.randn(B, L, H, D, device=device) for L in (Lq, Lk, Lk))
    elif layout == "bhld":  # head-major storage, seen through a transpose
        q, k, v = (torch.randn(B, H, L, D, device=device).transpose(1, 2) for L in (Lq, Lk, Lk))
    elif layout == "packed":  # one fused qkv projection [B, L, 3, H, D]
        assert Lq == Lk
        q, k, v = torch.randn(B, Lq, 3, H, D, device=device).unbind(2)
    return tuple(t.to(dtype) for t in (q, k, v))


def _check(q, k, v, seed, grad=False, dout=None):
    """Kernel vs the fp32 reference on the same (rounded) inputs, calibrated by the reference at q.dtype."""
    what = f"attention {tuple(q.shape)} x {tuple(k.shape)} {q.dtype} seed={seed}"
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    leaves_ref = [t.detach().float().requires_grad_(grad) for t in (q, k, v)]
    leaves_pt = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    out = attention(*leaves)
    out_ref = attention_ref(*leaves_ref)
    out_pt = attention_ref(*leaves_pt)
    assert out.shape == out_ref.shape and out.dtype == q.dtype
    assert_calibrated(out, out_ref, out_pt, what + " out")
    if grad:
        dout = torch.randn_like(out) if dout is None else dout
        grads = torch.autograd.grad(out, leaves, dout)
        grads_ref = torch.autograd.grad(out_ref, leaves_ref, dout.float())
        grads_pt = torch.autograd.grad(out_pt, leaves_pt, dout)
        for name, g, g_ref, g_pt, x in zip("qkv", grads, grads_ref, grads_pt, leaves):
            assert g.shape == x.shape and g.dtype == x.dtype
            assert_calibrated(g, g_ref, g_pt, f"{what} d{name}")


# (B, Lq, Lk, H, D), as the DiT calls it (q and k already rotated by the q/k norm): self-attention over lengths
# that are and are not multiples of the block size, cross-attention with Lq != Lk both ways (text: a handful
# of keys; queries over more keys), a single query row.
FWD_CASES = [
    (2, 37, 37, 3, 64),
    (2, 64, 64, 2, 128),
    (1, 37, 100, 3, 64),
    (1, 100, 37, 2, 32),
    (2, 50, 7, 2, 32),  # text cross-attention: a handful of keys
    (1, 1, 5, 2, 32),  # a single query row
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Lq,Lk,H,D", FWD_CASES)
def test_forward_matches_reference(B, Lq, Lk, H, D, dtype):
    seed = fresh_seed()
    _check(*_qkv(B, Lq, Lk, H, D, dtype), seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Lq,Lk,H,D", [(2, 37, 70, 2, 64), (1, 70, 37, 3, 32), (1, 40, 40, 2, 128)])
def test_gradients_match_reference(B, Lq, Lk, H, D, dtype):
    seed = fresh_seed()
    _check(*_qkv(B, Lq, Lk, H, D, dtype), seed, grad=True)


@pytest.mark.parametrize("layout", ["bhld", "packed"])
def test_strided_inputs(layout):
    """Views with non-standard strides are read in place; a non-contiguous output gradient too."""
    seed = fresh_seed()
    B, L, H, D = 2, 45, 3, 32
    q, k, v = _qkv(B, L, L, H, D, torch.float32, layout)
    assert not q.is_contiguous()
    dout = torch.randn(B, H, L, D, device=DEV).transpose(1, 2)
    _check(q, k, v, seed, grad=True, dout=dout)


def test_rejects_unsupported_inputs():
    q, k, v = _qkv(1, 8, 8, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="head dim 48"):
        attention(*_qkv(1, 8, 8, 2, 48, torch.float32))
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="must be"):
        attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="zero keys"):
        attention(q, k[:, :0], v[:, :0])


def test_registered_op_compiles_and_exports():
    """opcheck (schema, fake tensors, autograd registration, AOT dispatch), torch.export and a fullgraph
    torch.compile with a backward pass all see one op, and run the kernels."""
    seed = fresh_seed()
    B, L, H, D = 1, 40, 2, 32
    q, k, v = (t.requires_grad_() for t in _qkv(B, L, L, H, D, torch.float32))
    torch.library.opcheck(torch.ops.anyid_rt.attention_fwd.default, (q, k, v))

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v)

    ref = attention_ref(q, k, v)
    exported = torch.export.export(Attn(), (q.detach(), k.detach(), v.detach()))
    assert "anyid_rt.attention_fwd" in exported.graph_module.code
    assert_calibrated(exported.module()(q, k, v), ref, ref, f"exported attention seed={seed}")

    compiled = torch.compile(Attn(), backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    assert_calibrated(out, ref, ref, f"compiled attention seed={seed}")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_calibrated(g, g_ref, g_ref, f"compiled attention d{name} seed={seed}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; the GPU suite runs the real benchmark")
def test_benchmark_dry_run(tmp_path):
    """bench/bench_attention.py parses its arguments, times, writes JSON lines and a plot at tiny sizes."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_attention.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (tmp_path / "bench_attention.jsonl").read_text().splitlines()
    assert len(lines) >= 4 and '"tflops"' in lines[0]


# ----------------------------------------------------------------------------------------------------------
# GPU: bf16 (the production dtype), autotuned configs, Inductor
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Lq,Lk,H,D", [(2, 1037, 1037, 3, 128), (1, 880, 2133, 4, 128), (2, 1500, 512, 2, 128),
                                         (2, 777, 777, 2, 64)])
@pytest.mark.gpu
@requires_cuda
def test_gpu_forward_backward(B, Lq, Lk, H, D, dtype):
    seed = fresh_seed()
    _check(*_qkv(B, Lq, Lk, H, D, dtype), seed, grad=True)


@pytest.mark.gpu
@requires_cuda
def test_gpu_fp32_and_strided():
    seed = fresh_seed()
    _check(*_qkv(1, 300, 333, 2, 64, torch.float32, "bhld"), seed, grad=True)
    _check(*_qkv(2, 640, 640, 4, 128, torch.bfloat16, "packed"), seed, grad=True)


@pytest.mark.gpu
@requires_cuda
def test_gpu_long_sequence():
    """One production-length sequence (27,280 tokens, 880 per latent frame) at 2 heads."""
    seed = fresh_seed()
    _check(*_qkv(1, 27280, 27280, 2, 128, torch.bfloat16), seed)


@pytest.mark.gpu
@requires_cuda
def test_gpu_inductor_compile():
    seed = fresh_seed()
    q, k, v = (t.requires_grad_() for t in _qkv(2, 300, 300, 2, 128, torch.bfloat16))

    def f(q, k, v):
        return attention(q, k, v) * 2.0

    out = torch.compile(f, fullgraph=True)(q, k, v)
    ref = f(q, k, v)  # eager kernel: same kernels, so the results agree to rounding
    assert_calibrated(out, ref.float(), ref, f"inductor attention seed={seed}")
    out.sum().backward()
