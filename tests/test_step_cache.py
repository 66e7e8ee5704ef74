"""Step caching: threshold 0 is bit-identical to no cache, a positive threshold skips exactly the steps the
published criteria (written out by hand here) pick, a skipped row adds the residual of its last computed step,
the curves are measured and read back beside the LoRA, and bad settings are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anyid_rt import Engine
from anyid_rt.lora import LoraWeights, save_lora
from anyid_rt.models.dit import Segments, sinusoidal_embedding
from anyid_rt.request import GenerationRequest, RequestError
from anyid_rt.sampling import make_sampler
from anyid_rt.step_cache import PUBLISHED_TI2V_5B, CacheCalibration, magcache_skips

KW = dict(height=64, width=64, num_frames=5, steps=8, progress=False)
STEPS = KW["steps"]
# a hand-made curve: rows decide differently (row 1 drifts faster), so both the whole-batch and the one-row
# paths run
CURVE = CacheCalibration(STEPS, tuple((1.0, 1.0) if i == 0 else (0.99, 0.97) for i in range(STEPS)),
                         (1.0, 0.0), "test curve")


@pytest.fixture(scope="module")
def tiny():
    engine = Engine.tiny(seed=0)
    engine.cache_calibration = CURVE
    return engine


@pytest.mark.parametrize("mode", ["magcache", "teacache"])
def test_threshold_zero_is_bit_identical(tiny, mode):
    refs = [np.full((40, 40, 3), 90, np.uint8)]
    a = tiny.generate("A woman smiles.", references=refs, **KW)
    b = tiny.generate("A woman smiles.", references=refs, cache=mode, cache_threshold=0.0, **KW)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert b.stats == {"steps": STEPS, "dit_forwards": 2 * STEPS, "dit_forwards_skipped": 0, "reference_passes": 0}


def _magcache_skips(gamma, steps, threshold, k=2, retention=0.2):
    """MagCache4Wan2.2's rule for one row, written out: the skipped step indices."""
    skips, ratio, n, err = [], 1.0, 0, 0.0
    for i in range(int(steps * retention), steps):
        ratio *= gamma[i]
        n += 1
        err += abs(1 - ratio)
        if err < threshold and n <= k:
            skips.append(i)
        else:
            ratio, n, err = 1.0, 0, 0.0
    return skips


def test_magcache_skips_the_steps_of_the_published_rule(tiny):
    v = tiny.generate("A woman smiles.", cache="magcache", cache_threshold=0.05, **KW)
    expect = [_magcache_skips([c[r] for c in CURVE.mag_ratios], STEPS, 0.05) for r in (0, 1)]
    assert len(expect[0]) > len(expect[1]) > 0  # the curve makes the rows differ
    assert v.stats["dit_forwards_skipped"] == len(expect[0]) + len(expect[1])
    assert v.stats["dit_forwards"] == 2 * STEPS - v.stats["dit_forwards_skipped"]


def test_teacache_skips_the_steps_of_the_published_rule(tiny):
    """TeaCache (LightX2V's Wan rule): the rescaled relative L1 change of the time embedding accumulates; the first
    and last steps always run. The embeddings are computed here from the schedule's timesteps."""
    dit = tiny.dit
    ts = make_sampler("unipc", STEPS, 5.0).timesteps.double()
    with torch.no_grad():
        freq = sinusoidal_embedding(ts, dit.cfg.freq_dim)
        e = dit.time_embedding[2](torch.nn.functional.silu(dit.time_embedding[0](freq)))  # [steps, dim]
    poly, acc, skips = np.poly1d(CURVE.tea_coefficients), 0.0, 0
    for i in range(1, STEPS - 1):
        acc += poly(float((e[i] - e[i - 1]).abs().mean() / e[i - 1].abs().mean()))
        if acc < 2.5:  # random tiny weights: the embedding changes by ~100% a step
            skips += 1
        else:
            acc = 0.0
    assert 0 < skips < STEPS - 2
    v = tiny.generate("A woman smiles.", cache="teacache", cache_threshold=2.5, **KW)
    assert v.stats["dit_forwards_skipped"] == 2 * skips  # both rows see the same timestep


def test_a_skipped_step_adds_the_last_residual(tiny):
    """Without guidance (one row): the cached run equals a loop written here that runs the blocks on the steps
    the rule keeps and adds the last computed residual on the others."""
    skip = set(_magcache_skips([c[0] for c in CURVE.mag_ratios], STEPS, 0.05))
    emb = torch.randn(1, 6, tiny.dit.cfg.text_dim, generator=torch.Generator().manual_seed(2))
    v = tiny.generate(prompt_embeds=emb, guidance=1.0, cache="magcache", cache_threshold=0.05, seed=4, **KW)
    assert v.stats["dit_forwards_skipped"] == len(skip) > 0
    dit, sampler = tiny.dit, make_sampler("unipc", STEPS, 5.0)
    x = torch.randn(48, 2, 4, 4, generator=torch.Generator().manual_seed(4))[None]
    residual = {}

    def blocks(i):
        def run(h, e, e0, segments, rope, text_kv, ops):
            if i not in skip:
                residual["r"] = dit.run_blocks(h, e0, segments, rope, text_kv, ops) - h
            return h + residual["r"]
        return run

    with torch.inference_mode():
        text_kv = dit.prepare_text([emb[0]])
        for i, t in enumerate(sampler.timesteps):
            out = dit.forward_groups([x], [0], Segments((8,), torch.tensor([[float(t)]])), text_kv, blocks(i))
            x = sampler.step(out, i, x)
    torch.testing.assert_close(v.latents, x[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cache="magcache", cache_threshold=-0.1), "cache_threshold=-0.1 must be a number >= 0"),
    (dict(cache_threshold=0.1), "needs cache"),
    (dict(cache="fbcache"), "not one of magcache, teacache"),
    (dict(cache="teacache", sampler="dmd", timesteps=[1000, 500], steps=None), "does not apply to sampler=.dmd."),
])
def test_bad_cache_settings_are_refused(tiny, kwargs, match):
    with pytest.raises(RequestError, match=match):
        tiny.generate("A woman smiles.", **{**KW, **kwargs})


def test_curves_are_measured_saved_beside_the_lora_and_read_back(tmp_path):
    plain = Engine.tiny(seed=0)
    with pytest.raises(RequestError, match="calibrate-cache"):  # random weights: no curves, refused up front
        plain.generate("A woman smiles.", cache="magcache", **KW)
    name, g = "blocks.0.self_attn.q", torch.Generator().manual_seed(0)
    lora = tmp_path / "style.safetensors"
    save_lora(LoraWeights({name: torch.randn(4, 64, generator=g) * 0.01},
                          {name: torch.randn(64, 4, generator=g) * 0.01}, {name: 4.0}), lora)
    engine = Engine.tiny(seed=0, lora=lora)
    assert engine.cache_calibration is None and engine.cache_path == tmp_path / "style.cache.json"
    reqs = [GenerationRequest(p, height=64, width=64, num_frames=5, steps=6) for p in ("A woman smiles.", "A man.")]
    cal = engine.calibrate_cache(reqs)
    assert cal.steps == 6 and len(cal.mag_ratios) == 6 and cal.mag_ratios[0] == (1.0, 1.0)
    assert all(0.2 < r < 5 for pair in cal.mag_ratios for r in pair)
    again = Engine.tiny(seed=0, lora=lora)
    assert again.cache_calibration == CacheCalibration.load(tmp_path / "style.cache.json") == cal
    assert again.generate("A woman smiles.", cache="teacache", cache_threshold=0.0,
                          **{**KW, "steps": 6}).stats["dit_forwards_skipped"] == 0


def test_published_ti2v_5b_curves():
    p = PUBLISHED_TI2V_5B
    assert p.steps == 50 and p.mag_ratios[0] == (1.0, 1.0) and p.mag_ratios[1] == (0.99505, 0.99389)
    assert p.mag_ratios[-1] == (0.96949, 0.97015) and p.mag_ratios_image[-1] == (0.96655, 0.96616)
    assert p.tea_coefficients[0] == 1.57472669e+05 and len(p.tea_coefficients) == 6
    assert p.ratios(25, image=False).shape == (25, 2)  # nearest-neighbour resampling to another step count
    np.testing.assert_array_equal(p.ratios(50, image=True), np.asarray(p.mag_ratios_image))
    # the 5B at the published E006K2R02: the rule reads only the curve, so its forward count is exact without weights
    skips = magcache_skips(p, 50, 0.06)
    assert skips == [_magcache_skips([c[r] for c in p.mag_ratios], 50, 0.06) for r in (0, 1)]
    assert 100 - sum(map(len, skips)) == 50  # MagCache4Wan2.2 reports 1.97x on an L20


def test_cli_cache_and_calibrate(tmp_path, capsys):
    from anyid_rt.cli import main

    small = ["--height", "64", "--width", "64", "--frames", "5", "--steps", "6"]
    out = str(tmp_path / "v.mp4")
    assert main(["generate", "--tiny", "--prompt", "A woman.", "--cache", "magcache", "--cache-threshold", "-1",
                 "--out", out, *small]) == 2
    assert "--cache-threshold -1.0 must be a number >= 0" in capsys.readouterr().err
    assert main(["generate", "--tiny", "--prompt", "A woman.", "--sampler", "dmd", "--timesteps", "1000,1000",
                 "--out", out, "--height", "64"]) == 2
    assert "--timesteps must be strictly decreasing" in capsys.readouterr().err
    assert main(["generate", "--tiny", "--prompt", "A woman.", "--cache", "teacache", "--out", out, *small]) == 2
    text = capsys.readouterr()
    assert "anyid-rt calibrate-cache" in text.err and "loaded in" not in text.out  # refused before loading
    assert main(["calibrate-cache", "--tiny", "--prompt", "A woman.", "--prompt", "A man.", "--out",
                 str(tmp_path / "cal.json"), "--no-progress", *small]) == 0
    assert CacheCalibration.load(tmp_path / "cal.json").steps == 6
    assert main(["generate", "--tiny", "--prompt", "A woman.", "--sampler", "dmd", "--timesteps", "1000,500",
                 "--guidance", "1", "--out", out, "--no-progress", "--height", "64", "--width", "64",
                 "--frames", "5"]) == 0
    assert "DiT forwards: 2 run, 0 skipped over 2 steps" in capsys.readouterr().out
