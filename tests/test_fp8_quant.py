"""One-pass FP8 activation quantisation (kernels/fp8_quant.py), the adaptive LayerNorm writing FP8 rows
(kernels/modulation.py), and FP8Linear / the DiT taking them (anyid_rt/quant.py).

The Triton quantiser must give the reference's bytes exactly (values and scales), under the interpreter and
on a GPU; the fused paths must equal the unfused ones exactly where they compute the same fp32 rows.
"""
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from helpers import assert_calibrated, fresh_seed, relerr  # noqa: E402
from anyid_rt.config import DiTConfig  # noqa: E402
from anyid_rt.kernels import SegmentMap  # noqa: E402
from anyid_rt.kernels.fp8_quant import (AMAX_FLOOR, E4M3, E4M3_MAX, FP8Rows, quantize_rows_fp8,  # noqa: E402
                                        quantize_rows_fp8_ref)
from anyid_rt.kernels.modulation import layernorm_modulate, layernorm_modulate_ref  # noqa: E402
from anyid_rt.models import Segments  # noqa: E402
from anyid_rt.models.random_weights import random_dit  # noqa: E402
from anyid_rt.quant import FP8Linear, fp8_linear_ref, quantize_dit_fp8_  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SEGMENTS = [(5, 17, 3), (25,), (0, 20, 5), (1, 1, 23)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def assert_same_rows(got: FP8Rows, want: FP8Rows, what: str) -> None:
    """Bit-identical values and scales (compared as bytes: -0 and +0 differ, as they do in memory)."""
    assert got.values.dtype == E4M3 and got.scale.dtype == torch.float32, what
    assert got.values.shape == want.values.shape and got.scale.shape == want.scale.shape, what
    assert torch.equal(got.scale, want.scale), f"{what}: scales differ"
    diff = _bytes(got.values) != _bytes(want.values)
    assert not diff.any(), f"{what}: {int(diff.sum())}/{diff.numel()} values differ"


def _awkward_rows(M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows spanning up to 9 decades, outlier channels (x30), a row of zeros, a row with one huge value (the rest lands
    in E4M3's subnormals or flushes to zero), a negative-only row."""
    top = 2 if dtype == torch.float16 else 4  # fp16 ends at 65504
    x = torch.randn(M, K, device=DEV) * torch.logspace(-5, top, M, device=DEV)[:, None]
    x[:, torch.randperm(K, device=DEV)[:3]] *= 30
    x[M // 3] = 0
    x[M // 2] = torch.randn(K, device=DEV) * 1e-3
    x[M // 2, K // 2] = 3e3
    x[-1] = -x[-1].abs()
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The one-pass quantiser
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K", [(1, 64), (67, 300), (130, 3072), (5, 14336)])
def test_kernel_bytes_equal_reference(M, K, dtype):
    seed = fresh_seed()
    x = _awkward_rows(M, K, dtype)
    assert_same_rows(quantize_rows_fp8(x), quantize_rows_fp8_ref(x), f"[{M}, {K}] {dtype} seed={seed}")


def test_rounding_at_every_e4m3_midpoint():
    """Rows whose amax is 448 (scale exactly 1): every finite E4M3 value, every midpoint between neighbours
    (the ties: round to even), the fp32 neighbours of each midpoint, a sweep; and the same rows 20 binades
    down (scale 2^-20, the division still exact)."""
    grid = _bytes(torch.arange(256, dtype=torch.uint8)).view(E4M3).float()
    grid = grid[torch.isfinite(grid)].unique()  # -448 ... 448, one zero
    mid = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1),
                      torch.linspace(-448, 448, 4001)])
    pad = (-vals.numel()) % 255
    rows = torch.cat([vals, torch.zeros(pad)]).view(-1, 255)
    rows = torch.cat([rows, torch.full((rows.shape[0], 1), E4M3_MAX)], 1)  # amax 448 in every row
    rows = torch.cat([rows, rows * 2.0 ** -20]).to(DEV)
    want = quantize_rows_fp8_ref(rows)
    n = rows.shape[0] // 2
    assert torch.all(want.scale[:n] == 1.0) and torch.all(want.scale[n:] == 2.0 ** -20)
    on_grid = torch.isin(rows[:n], grid.to(DEV))
    assert torch.equal(want.values[:n].float()[on_grid], rows[:n][on_grid])  # E4M3 values map to themselves
    assert_same_rows(quantize_rows_fp8(rows), want, "E4M3 midpoints")


def test_saturation_where_the_division_rounds_above_448():
    """For many amax values, amax / (amax / 448) rounds to 448.00003 in fp32: the clamp keeps the largest
    value of the row at 448 (not above, where E4M3 has no finite value), in the kernel and the reference."""
    amax = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 1000 + 1e-3
    over = amax[amax / (amax / E4M3_MAX) > E4M3_MAX][:64]
    assert over.numel() == 64
    rows = (torch.rand(64, 200) * 2 - 1) * over[:, None]
    rows[:, 7] = over
    rows[::2, 7] *= -1  # the largest magnitude negative in half the rows
    rows = rows.to(DEV)
    want = quantize_rows_fp8_ref(rows)
    assert torch.all(want.values.float().abs().amax(1) == E4M3_MAX)
    assert_same_rows(quantize_rows_fp8(rows), want, "rows whose amax divides to above 448")


def test_reference_range_zero_rows_and_error_bound():
    x = _awkward_rows(40, 96, torch.float32)
    q = quantize_rows_fp8_ref(x)
    assert q.values.shape == (40, 96) and q.scale.shape == (40, 1)
    nonzero = x.abs().amax(1) > 0
    # each nonzero row's largest magnitude maps to +-448 exactly; a row of zeros to zeros with a finite scale
    assert torch.all(q.values.float().abs().amax(1)[nonzero] == E4M3_MAX)
    zero_row = q.values[40 // 3].float()
    assert torch.all(zero_row == 0) and q.scale[40 // 3].item() == (torch.tensor(AMAX_FLOOR) / E4M3_MAX).item()
    assert torch.isfinite(q.dequantize()).all()
    # per element: at most half an E4M3 step (2^-4 relative) or half the smallest subnormal step (2^-10 * s)
    err = (q.dequantize() - x).abs()
    assert torch.all(err <= 2.0 ** -4 * x.abs() + 2.0 ** -10 * q.scale)


def test_leading_dims_strides_and_dtype_errors():
    seed = fresh_seed()
    x = torch.randn(2, 7, 2 * 96, device=DEV)[:, :, 96:]  # [B, L, K] view with a row stride of 2K
    got, want = quantize_rows_fp8(x), quantize_rows_fp8_ref(x)
    assert got.values.shape == (2, 7, 96) and got.scale.shape == (2, 7, 1) and got.shape == x.shape
    assert_same_rows(got, want, f"strided [2, 7, 96] seed={seed}")
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        quantize_rows_fp8(want.values)


# ----------------------------------------------------------------------------------------------------------
# The adaptive LayerNorm writing FP8 rows
# ----------------------------------------------------------------------------------------------------------
def _ln_inputs(B, seg_lens, D, x_dtype=torch.float32):
    S = len(seg_lens)
    x = (torch.randn(B, sum(seg_lens), D, device=DEV) * 3 + 1).to(x_dtype)
    mod = torch.randn(B, S, 6, D, device=DEV)  # shift / scale as the DiT takes them: views of [B, S, 6, D]
    return x, mod[:, :, 0], mod[:, :, 1], SegmentMap.from_lens(seg_lens, DEV)


@pytest.mark.parametrize("seg_lens", SEGMENTS)
@pytest.mark.parametrize("impl", [layernorm_modulate, layernorm_modulate_ref], ids=["triton", "torch"])
def test_modulate_fp8_equals_modulate_then_quantise(seg_lens, impl):
    """The fused output is the fp32 modulated rows quantised, byte for byte, for the kernel and the reference
    alike (each against its own fp32 output and the reference quantiser)."""
    seed = fresh_seed()
    x, shift, scale, seg = _ln_inputs(2, seg_lens, 200)
    got = impl(x, shift, scale, seg, 1e-6, E4M3)
    assert isinstance(got, FP8Rows) and got.scale.shape == (2, sum(seg_lens), 1)
    want = quantize_rows_fp8_ref(impl(x, shift, scale, seg, 1e-6, torch.float32))
    assert_same_rows(got, want, f"{impl.__name__} segments {seg_lens} seed={seed}")


@pytest.mark.parametrize("D,x_dtype", [(48, torch.float32), (3000, torch.float32), (200, torch.bfloat16)])
def test_modulate_fp8_kernel_against_reference(D, x_dtype):
    """Kernel vs reference: the fp32 rows differ by LayerNorm summation order only, which may move a value
    across an E4M3 rounding boundary: calibrated against the reference's own quantisation error."""
    seed = fresh_seed()
    x, shift, scale, seg = _ln_inputs(2, (5, 17, 3), D, x_dtype)
    got = layernorm_modulate(x, shift, scale, seg, 1e-6, E4M3)
    want = layernorm_modulate_ref(x, shift, scale, seg, 1e-6, E4M3)
    exact = layernorm_modulate_ref(x, shift, scale, seg, 1e-6, torch.float32)
    torch.testing.assert_close(got.scale, want.scale, rtol=1e-5, atol=0)
    assert_calibrated(got.dequantize(), exact, want.dequantize(), f"D={D} {x_dtype} seed={seed}")


# ----------------------------------------------------------------------------------------------------------
# FP8Linear and the DiT taking FP8 rows
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_scaled_mm", [True, False], ids=["scaled_mm", "emulated"])
def test_fp8_linear_takes_prequantised_rows(dtype, use_scaled_mm):
    """A tensor quantised inside the layer and the same rows quantised before it give the same output, for
    either backend's quantiser (same bytes)."""
    fresh_seed()
    lin = nn.Linear(96, 80).to(DEV, dtype)
    x = torch.randn(3, 11, 96, device=DEV).to(dtype)
    outs = []
    for backend in ("torch", "triton"):
        layer = FP8Linear.from_linear(lin, use_scaled_mm, backend)
        outs += [layer(x), layer(quantize_rows_fp8_ref(x)), layer(layer.quantize(x))]
    assert all(o.shape == (3, 11, 80) and o.dtype == dtype for o in outs)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    layer = FP8Linear.from_linear(lin, use_scaled_mm)
    emulated = fp8_linear_ref(x, layer.weight_q, layer.weight_scale.t(), layer.bias, dtype)
    if not use_scaled_mm:
        assert torch.equal(outs[0], emulated)
    with pytest.raises(ValueError, match="backend must be one of"):
        FP8Linear.from_linear(lin, use_scaled_mm, "cuda")


def _dit_inputs(cfg, B=2, F=3, H=4, W=6):
    g = torch.Generator().manual_seed(5)
    latent = torch.randn(B, cfg.in_dim, F, H, W, generator=g).to(DEV)
    extra = torch.randn(B, cfg.in_dim, 1, H, W, generator=g).to(DEV)
    per_frame = (H // 2) * (W // 2)
    segs = Segments((per_frame, (F - 1) * per_frame, per_frame),
                    torch.tensor([[0.0, 640.0, 0.0], [0.0, 320.0, 0.0]], device=DEV))
    ctx = [torch.randn(n, cfg.text_dim, generator=g).to(DEV) for n in (7, 11)]
    return [latent, extra], [0, F], segs, ctx


@pytest.mark.parametrize("fused_projections", [False, True], ids=["q,k,v", "qkv"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dit_fused_fp8_inputs_equal_the_unfused_path(backend, fused_projections):
    """The whole DiT (fp32, so the modulated rows the unfused path quantises are the same fp32 rows): the
    modulated LayerNorms writing FP8 rows give the velocity bit for bit that the FP8 layers quantising their
    own bf16/fp32 input give. Both modulated LayerNorms of every block are switched, with q, k, v as three
    layers and as the engine's one qkv layer (`WanDiT.fuse_projections`)."""
    cfg = DiTConfig.preset("tiny")
    dit = random_dit(cfg, seed=0, device=DEV, backend=backend)
    if fused_projections:
        dit.fuse_projections()
    names = quantize_dit_fp8_(dit)
    assert ("blocks.0.self_attn.qkv" in names) == fused_projections
    assert all(b.attn_input_dtype == E4M3 and b.ffn_input_dtype == E4M3 for b in dit.blocks)
    args = _dit_inputs(cfg)
    with torch.no_grad():
        fused = dit.forward_groups(*args)
        for b in dit.blocks:
            b.attn_input_dtype = b.ffn_input_dtype = None
        unfused = dit.forward_groups(*args)
    assert torch.equal(fused, unfused)


def test_fp8_inputs_only_where_every_reader_is_fp8():
    """Leaving self_attn.k in high precision keeps the self-attention input a tensor (q, k, v read it);
    ffn.0 still gets FP8 rows. The result matches the same partial quantisation without the fused input."""
    cfg = DiTConfig.preset("tiny")
    dit = random_dit(cfg, seed=0, device=DEV)
    targets = ("self_attn.q", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")
    quantize_dit_fp8_(dit, targets)
    assert all(b.attn_input_dtype is None and b.ffn_input_dtype == E4M3 for b in dit.blocks)
    args = _dit_inputs(cfg)
    with torch.no_grad():
        fused = dit.forward_groups(*args)
        for b in dit.blocks:
            b.ffn_input_dtype = None
        assert torch.equal(fused, dit.forward_groups(*args))


def test_bf16_dit_fused_inputs_close_to_unfused():
    """In bf16 the fused path quantises the fp32 modulated rows (one rounding), the unfused one their bf16
    rounding (two): not bit-identical. Over four random models the fused path is as close to the bf16 model
    as the unfused one (measured: mean error ratio 1.01, single models 0.95-1.16), and the two differ from
    each other by less than either differs from the bf16 model (measured: 0.5-0.7 of it)."""
    cfg = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, freq_dim=32)
    args = _dit_inputs(cfg)
    errs = []
    for seed in range(4):
        base = random_dit(cfg, seed=seed, device=DEV, dtype=torch.bfloat16)
        dit = random_dit(cfg, seed=seed, device=DEV, dtype=torch.bfloat16)
        quantize_dit_fp8_(dit)
        with torch.no_grad():
            ref = base.forward_groups(*args)
            fused = dit.forward_groups(*args)
            for b in dit.blocks:
                b.attn_input_dtype = b.ffn_input_dtype = None
            unfused = dit.forward_groups(*args)
        assert not torch.equal(fused, unfused)
        errs.append((relerr(fused, ref), relerr(unfused, ref), relerr(fused, unfused)))
    err_fused, err_unfused, between = (torch.tensor(e, dtype=torch.float64) for e in zip(*errs))
    assert err_fused.sum() <= 1.1 * err_unfused.sum(), errs
    assert torch.all(between < err_unfused), errs


# ----------------------------------------------------------------------------------------------------------
# Registration: what torch.compile and torch.export see
# ----------------------------------------------------------------------------------------------------------
def test_ops_opcheck_compile_and_export():
    fresh_seed()
    x = torch.randn(37, 96, device=DEV)
    torch.library.opcheck(torch.ops.anyid_rt.quantize_rows_fp8.default, (x,))
    xs, shift, scale, seg = _ln_inputs(2, (5, 17, 3), 64)
    torch.library.opcheck(torch.ops.anyid_rt.layernorm_modulate_fp8.default,
                          (xs, shift.contiguous(), scale.contiguous(), [5, 17, 3], 1e-6))

    lin = FP8Linear.from_linear(nn.Linear(64, 32).to(DEV), use_scaled_mm=False, backend="triton")

    class Block(nn.Module):  # the DiT's pattern: modulated LayerNorm writing FP8 rows -> FP8 layer -> layer
        def __init__(self):
            super().__init__()
            self.a, self.b = lin, FP8Linear.from_linear(nn.Linear(32, 64).to(DEV), use_scaled_mm=False,
                                                        backend="triton")

        def forward(self, x, shift, scale):
            return self.b(self.a(layernorm_modulate(x, shift, scale, seg, 1e-6, E4M3)))

    block, args = Block(), (xs, shift, scale)
    with torch.no_grad():
        want = block(*args)
        exported = torch.export.export(block, args)
        code = exported.graph_module.code
        assert "anyid_rt.layernorm_modulate_fp8" in code and "anyid_rt.quantize_rows_fp8" in code
        assert torch.equal(exported.module()(*args), want)
        assert torch.equal(torch.compile(block, backend="aot_eager", fullgraph=True)(*args), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_production_shapes_on_gpu():
    """At the 5B's widths on a GPU: bf16 bytes equal to the reference, the modulated LayerNorm's FP8 rows equal
    to its fp32 rows quantised by the kernel, and `_scaled_mm` on them against the emulation."""
    seed = fresh_seed()
    for M, K in ((4099, 3072), (257, 14336)):
        x = _awkward_rows(M, K, torch.bfloat16)
        assert_same_rows(quantize_rows_fp8(x), quantize_rows_fp8_ref(x), f"[{M}, {K}] bf16 seed={seed}")
    x, shift, scale, seg = _ln_inputs(2, (1560, 25720), 3072)
    fused = layernorm_modulate(x, shift, scale, seg, 1e-6, E4M3)
    assert_same_rows(fused, quantize_rows_fp8(layernorm_modulate(x, shift, scale, seg, 1e-6, torch.float32)),
                     f"fused modulate seed={seed}")
    lin = FP8Linear.from_linear(nn.Linear(3072, 3072).to("cuda", torch.bfloat16), backend="triton")
    # same quantised operands: CUTLASS's accumulation order and the bf16 output rounding are the differences
    emulated = fp8_linear_ref(fused, lin.weight_q, lin.weight_scale.t(), lin.bias, torch.float32)
    assert_calibrated(lin(fused), emulated, emulated.bfloat16(), f"_scaled_mm on fused rows seed={seed}")
