"""FP8 (E4M3) linear layers: numerics against the emulation, quality gates against the bf16 path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from anyid_rt.config import DiTConfig
from anyid_rt.engine import Engine
from anyid_rt.models import WanDiT
from anyid_rt.bench.bench_fp8 import production_like_activations  # one home: the FP8 benchmark's inputs
from anyid_rt.quant import (E4M3_MAX, FP8Linear, FP8_TARGETS, check_fp8_device, cosine, fp8_linear_ref, psnr,
                            quantize_dit_fp8_)
from anyid_rt.kernels.fp8_quant import quantize_rows_fp8_ref


def test_quantize_rows_range_and_roundtrip():
    x = production_like_activations(64, 200)
    q, s = quantize_rows_fp8_ref(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    assert q.float().abs().amax(1).max().item() == E4M3_MAX  # each row's largest value maps to 448
    rel = ((q.float() * s - x).norm() / x.norm()).item()
    assert rel < 0.04  # E4M3 has 3 mantissa bits: ~2^-4 worst case per element, ~2.5% in norm


def test_scaled_mm_path_equals_emulation():
    torch.manual_seed(0)
    lin = nn.Linear(96, 80).to(torch.bfloat16)
    x = production_like_activations(33, 96).to(torch.bfloat16)
    fast = FP8Linear.from_linear(lin, use_scaled_mm=True)
    emulated = fp8_linear_ref(x, fast.weight_q, fast.weight_scale.t(), fast.bias, torch.bfloat16)
    got = fast(x)
    assert got.shape == (33, 80) and got.dtype == torch.bfloat16
    # same quantised operands; only the accumulation order and the final bf16 rounding differ
    torch.testing.assert_close(got.float(), emulated.float(), rtol=2e-2, atol=2e-2 * emulated.abs().max().item())


@pytest.mark.parametrize("shape", [(3072, 3072), (14336, 3072), (3072, 14336)])
def test_per_layer_quality_at_5b_widths(shape):
    """The 5B's linear shapes, weights N(0, 0.02), activations with outliers: FP8 vs the bf16 path."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(in_f, out_f).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        lin.bias.copy_(torch.randn(out_f, generator=g) * 0.02)
    x = production_like_activations(128, in_f, seed=2).to(torch.bfloat16)
    with torch.no_grad():
        bf16 = lin(x).float()
        fp8 = FP8Linear.from_linear(lin)(x).float()
    rel = ((fp8 - bf16).norm() / bf16.norm()).item()
    assert cosine(fp8, bf16) >= 0.99, (cosine(fp8, bf16), rel)
    assert rel < 0.1


def _mid_dit(seed=0) -> WanDiT:
    cfg = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=32, freq_dim=64)
    torch.manual_seed(seed)
    return WanDiT(cfg).eval().requires_grad_(False)


def test_quantize_swaps_only_the_block_linears():
    dit = _mid_dit()
    names = quantize_dit_fp8_(dit)
    assert len(names) == len(FP8_TARGETS) * dit.cfg.num_layers
    fp8 = {n for n, m in dit.named_modules() if isinstance(m, FP8Linear)}
    assert fp8 == set(names)
    # sensitive layers stay as they were
    assert isinstance(dit.head.head, nn.Linear) and isinstance(dit.text_embedding[0], nn.Linear)
    assert isinstance(dit.blocks[0].cross_attn.k, nn.Linear)
    with pytest.raises(TypeError, match="quantised twice"):
        quantize_dit_fp8_(dit)


def test_full_sampling_run_close_to_unquantised():
    """Same noise, same weights: the FP8 engine's final latent and frames against the unquantised run."""
    base = Engine.tiny(seed=0)
    q = Engine.tiny(seed=0, quant="fp8")
    kw = dict(steps=4, seed=3, progress=False)
    a, b = base.generate("a woman", **kw), q.generate("a woman", **kw)
    assert cosine(a.latents, b.latents) >= 0.99
    assert psnr(a.frames, b.frames) >= 30


def test_fp8_needs_an_fp8_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="sm89\\+.*A100.*quant=None"):
        check_fp8_device("cuda")
    check_fp8_device("cpu")  # the CPU runs _scaled_mm


def test_unknown_quant_mode():
    with pytest.raises(ValueError, match="quant='int4'"):
        Engine.tiny(quant="int4")


@pytest.mark.parametrize("mode", ["int8", "int8-fp8"])
def test_8bit_attention_engine_close_to_full_precision(mode):
    """8-bit attention selected on its own (torch backend: the emulation of the kernel's numerics)."""
    base = Engine.tiny(seed=0)
    q = Engine.tiny(seed=0, attention_quant=mode)
    assert q.dit.attention_quant == mode
    kw = dict(steps=4, seed=3, progress=False)
    a, b = base.generate("a woman", **kw), q.generate("a woman", **kw)
    assert not torch.equal(a.latents, b.latents)  # the 8-bit path really ran
    assert cosine(a.latents, b.latents) >= 0.99
    assert psnr(a.frames, b.frames) >= 30


def test_unknown_attention_quant_mode():
    with pytest.raises(ValueError, match="attention_quant='fp4'"):
        Engine.tiny(attention_quant="fp4")
