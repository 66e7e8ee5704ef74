"""FP8 (E4M3) linear layers: numerics against the emulation, quality gates against the bf16 path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from anyid_rt.config import DiTConfig
from anyid_rt.engine import Engine
from anyid_rt.models import WanDiT
from anyid_rt.bench.bench_fp8 import (block_roles, layer_speed, predict,  # one home: the FP8 benchmark's inputs
                                      production_like_activations)
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


def test_speed_model_and_layer_bench_run_on_a_cpu():
    """The README's byte / FLOP model (`bench_fp8.predict`) at the 5B shapes, and the per-layer speed run on
    tiny widths (kernels under the interpreter: a smoke run of what the GPU run times, not a timing)."""
    p = predict()
    block = p["block"]
    assert round(block["bf16"], 2) == 19.99 and round(block["quant_eager"], 2) == 20.46
    assert round(block["quant_now"], 2) == 0.82  # 3 B/element for o, cross q/o, ffn.2; fused inputs save 1 B
    for f in p["forward"].values():  # eager quantisation: slower than bf16; one pass and fused: faster
        assert max(f["speedup_eager"]) < 1 < min(f["speedup_now"])
    cfg = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, freq_dim=32)
    rows = layer_speed("cpu", tokens=48, cfg=cfg, reps=1)
    assert [r.get("layer") for r in rows[:-1]] == [r.name for r in block_roles(cfg)]
    assert all(set(r["ms"]) == {"bf16", "fp8_eager", "fp8_one_pass", "fp8_prequantised", "quant_eager",
                                "quant_one_pass"} and r["cos_fp8_vs_bf16"] > 0.99 for r in rows[:-1])
    assert rows[-1]["bench"] == "fp8_modulate_speed" and set(rows[-1]["ms"]) == {"bf16", "fp8_fused",
                                                                                  "bf16_then_quant"}


def test_modelopt_calibration_source():
    """calibration="modelopt": the weight ranges of modelopt's PyTorch PTQ (the real package, per-channel E4M3
    weights, MSE search) become FP8Linear's scales; the model it calibrated from is not converted or changed;
    the weights' reconstruction error is no larger than with max calibration (measured here: 16% smaller; 3% at
    the 5B's widths with N(0, 0.02) weights, `bench_fp8.py --calibration`)."""
    pytest.importorskip("modelopt.torch.quantization")
    from anyid_rt.models.random_weights import random_dit
    from anyid_rt.quant import modelopt_weight_amax

    cfg = DiTConfig.preset("tiny")
    ref = random_dit(cfg, seed=0)
    dits = {c: random_dit(cfg, seed=0) for c in ("max", "modelopt")}
    linears = [dits["modelopt"].blocks[0].ffn[0], dits["modelopt"].blocks[1].self_attn.q]
    amax = modelopt_weight_amax(linears)
    assert all(type(m) is nn.Linear and not hasattr(m, "weight_quantizer") for m in linears)
    assert all(a.shape == (m.out_features, 1) and torch.all(a > 0) for a, m in zip(amax, linears))
    names = {c: quantize_dit_fp8_(d, calibration=c) for c, d in dits.items()}
    assert names["max"] == names["modelopt"]
    assert all(b.attn_input_dtype == torch.float8_e4m3fn for b in dits["modelopt"].blocks)
    got = dits["modelopt"].blocks[0].ffn[0]
    torch.testing.assert_close(got.weight_scale.t(), amax[0] / E4M3_MAX, rtol=0, atol=0)
    assert not torch.equal(got.weight_scale, dits["max"].blocks[0].ffn[0].weight_scale)
    err = {}
    for c, d in dits.items():
        sq = ref_sq = 0.0
        for name in names[c]:
            layer, w = d.get_submodule(name), ref.get_submodule(name).weight.float()
            sq += (layer.weight_q.float() * layer.weight_scale.t() - w).square().sum().item()
            ref_sq += w.square().sum().item()
        err[c] = (sq / ref_sq) ** 0.5
    assert err["modelopt"] <= err["max"], err
    with pytest.raises(ValueError, match="calibration='entropy'"):
        quantize_dit_fp8_(random_dit(cfg, seed=0), calibration="entropy")


def test_modelopt_calibration_names_the_install(monkeypatch):
    import sys

    from anyid_rt.quant import modelopt_weight_amax

    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install 'nvidia-modelopt\\[torch\\]'"):
        modelopt_weight_amax([nn.Linear(16, 16)])
