"""CPU benchmark suite on the tiny preset (pytest-benchmark), and the checks of the benchmark package
`anyid_rt.bench` (bench/): the timing harness, `anyid-rt bench` and the report.

`make bench` times the benchmarks (`--benchmark-only`); `make test` / CI run every test once with
`--benchmark-disable`, so each benchmark is also a test of what it computed. The rest checks the benchmark
itself: the timing harness, the FLOP and MFU arithmetic, that diffusers gets our weights (equal outputs), that
the whole GPU path of `anyid-rt bench` runs at tiny size on a CPU and writes complete records, that nothing is
skipped without a recorded reason, that the report turns records into tables and plots, and that the runtime
never imports the benchmark package.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anyid_rt.bench import report
from anyid_rt.bench.baseline import diffusers_from_dit, diffusers_step, dit_view, make_step_inputs, ours_step, relerr
from anyid_rt.bench.e2e import main as bench_main
from anyid_rt.bench.run import SCHEMA, Case, compose_video
from anyid_rt.bench.settings import DEFAULT_DIFFUSERS_BACKENDS, PROMPT, RESULTS_FILE
from anyid_rt.bench.steps import default_variants, parse_variant, step_flops, throughput
from anyid_rt.bench.timing import bench_ms, dense_peaks, measure, summarize
from anyid_rt.config import DiTConfig, ModelConfig
from anyid_rt.engine import Engine
from anyid_rt.models.dit import count_flops
from anyid_rt.models.random_weights import random_dit, random_vae
from anyid_rt.models.text_encoder import TextEncoder
from anyid_rt.models.vae_tiling import VAETiling
from anyid_rt.quant import quantize_dit_fp8_

ROOT = Path(__file__).resolve().parent.parent
CFG = ModelConfig.preset("tiny")
CPU = torch.device("cpu")
CASES = {"t2v": Case("t2v", CFG.geometry, 64, 64, 9),
         "refs": Case("refs", CFG.geometry, 64, 64, 9, ref_images=4, ref_clip_frames=9)}


@pytest.fixture(scope="module")
def dit():
    return random_dit(CFG.dit, dtype=torch.float32, device="cpu", seed=0)


@pytest.fixture(scope="module")
def vae():
    return random_vae(CFG.vae, seed=0)


# ---------------------------------------------------------------------------------------------------------
# The CPU suite: each benchmark asserts what it computed
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["t2v", "refs"])
def test_dit_guided_step(benchmark, dit, case):
    inp = make_step_inputs(dit, CASES[case], batch=2, guidance=5.0, t=999.0, prompt_tokens=7, seed=1)
    with torch.inference_mode():
        out = benchmark(ours_step(dit, inp, dit.prepare_text(inp.contexts)))
    assert out.shape == (1, 48, 3, 4, 4) and torch.isfinite(out).all()


def test_vae_encode(benchmark, vae):
    frames = torch.rand(1, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        latent = benchmark(vae.encode, frames)
    assert latent.shape == (1, 48, 3, 4, 4) and latent.dtype == torch.float32 and torch.isfinite(latent).all()


@pytest.mark.parametrize("tile", [None, (2, 2, 1)], ids=["untiled", "tiled"])
def test_vae_decode(benchmark, vae, tile):
    latent = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        pixels = benchmark(vae.decode, latent, tile=VAETiling.of(tile) if tile else None)
    assert pixels.shape == (1, 3, 9, 64, 64) and pixels.abs().max() <= 1.0 and torch.isfinite(pixels).all()


def test_text_encode(benchmark):
    te = TextEncoder.tiny(seed=0, cache_size=0)  # no cache: every round really encodes
    cond, uncond = benchmark(te.encode, [PROMPT, ""])
    n_tokens = int(te.tokenize([PROMPT])[1].sum())
    assert cond.shape == (n_tokens, CFG.text.dim) and uncond.shape == (1, CFG.text.dim)
    assert te.cache_info().currsize == 0


def test_generate_with_references(benchmark):
    engine = Engine.tiny(seed=0)
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (9, 64, 64, 3), dtype=np.uint8)]
    video = benchmark(engine.generate, "a woman smiles", references=refs, steps=2, seed=0, progress=False)
    assert video.frames.shape == (9, 64, 64, 3) and video.frames.dtype == torch.uint8
    assert set(video.timings) == {"text_encode", "reference_encode", "denoise", "vae_decode", "total"}
    assert video.timings["total"] == pytest.approx(sum(v for k, v in video.timings.items() if k != "total"))


# ---------------------------------------------------------------------------------------------------------
# Timing and arithmetic
# ---------------------------------------------------------------------------------------------------------

def test_summarize_quantiles_like_do_bench():
    s = summarize([float(x) for x in range(10, 0, -1)])  # 10..1, unsorted input
    assert (s.median_ms, s.p20_ms, s.p80_ms) == pytest.approx((5.5, 2.8, 8.2))  # linear interpolation
    assert (s.min_ms, s.max_ms, s.mean_ms, s.reps) == pytest.approx((1, 10, 5.5, 10))
    assert s.record()["times_ms"] == [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    with pytest.raises(ValueError):
        summarize([])


class _FakeClock:
    """A clock that only moves when the timed function says so: timings become exact."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_measure_keeps_the_first_call_out_of_the_statistics():
    clock, calls = _FakeClock(), []

    def fn():
        calls.append(len(calls))
        # a slow first call (compilation) that must not reach the timed numbers, then 2, 4, 6, ... ms
        clock.now += 5.0 if len(calls) == 1 else 0.002 * (len(calls) - 1)
        return torch.tensor(float(len(calls)))

    m = measure(fn, warmup=2, reps=3, device=CPU, clock=clock)
    assert len(calls) == 6 and m.warmup == 2  # first call, 2 untimed, 3 timed
    assert m.first_result.item() == 1.0 and m.first_call_s == pytest.approx(5.0)
    assert m.times_ms == pytest.approx([6.0, 8.0, 10.0])  # calls 4-6: the warm-up calls are not timed either
    assert m.timing.median_ms == pytest.approx(8.0) and m.median_s == pytest.approx(0.008)
    assert m.summary()["peak_mem_gb"] is None  # no CUDA memory on a CPU, and none is invented
    assert measure(fn, warmup=0, reps=1, device=CPU, inspect=None, clock=clock).first_result is None
    with pytest.raises(ValueError):
        measure(fn, warmup=0, reps=0, device=CPU)


def test_bench_ms_reports_do_bench_quantiles_in_a_dry_run():
    """The kernel scripts' form of the harness: in a dry run one untimed call, then three timed ones."""
    calls = []
    t = bench_ms(lambda: calls.append(1), argparse.Namespace(dry_run=True, warmup=25, rep=100))
    assert len(calls) == 4 and set(t) == {"ms", "ms_p20", "ms_p80"} and t["ms_p20"] <= t["ms"] <= t["ms_p80"]


def test_flops_and_mfu_for_the_5b_shape():
    full = DiTConfig.preset("wan2.2-ti2v-5b")
    d, f, layers, text, p = 3072, 14336, 30, 512, 4
    # perf-anchors.md §11 totals per forward, less the 0.58 TFLOP of text K/V that runs once per prompt
    for tokens, tflop in ((27280, 516.9 - 0.58), (58080, 1759.3 - 0.58)):
        linear = tokens * layers * (12 * d * d + 4 * d * f)  # q k v o + cross q o + FFN, 2 FLOPs per MAC
        attn = layers * (4 * tokens * tokens * d + 4 * tokens * text * d)
        embed = 2 * tokens * d * p * (48 + 48)  # patch embedding and head
        assert count_flops(full, tokens) == pytest.approx(linear + attn + embed, rel=1e-12)
        assert step_flops(full, tokens, batch=2) == pytest.approx(2 * tflop * 1e12, rel=5e-4)
    flops = step_flops(full, 27280, 2)  # 1,032.8 TFLOP per guided step
    thr = throughput(flops, 2.0, peak_tflops=989.4, ceiling_tflops=790.0)
    assert thr["tflops"] == pytest.approx(516.4, rel=2e-4)
    assert thr["mfu_peak"] == pytest.approx(516.4 / 989.4, rel=2e-4)  # 52.2%
    assert thr["mfu_ceiling"] == pytest.approx(516.4 / 790.0, rel=2e-4)
    assert throughput(flops, 2.0, None, None)["mfu_peak"] is None


def test_dense_peaks_by_device_name():
    assert dense_peaks("NVIDIA H100 80GB HBM3")["bf16"] == 989.4
    assert dense_peaks("NVIDIA H200")["fp8"] == 1978.9
    assert dense_peaks("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert dense_peaks("Some GPU")["bf16"] is None


def test_case_shapes_and_token_counts():
    full = DiTConfig.preset("wan2.2-ti2v-5b")
    geometry = ModelConfig.preset("wan2.2-ti2v-5b").geometry
    t2v = Case("t2v", geometry, 704, 1280, 121)
    refs = Case("refs", geometry, 704, 1280, 121, ref_images=4, ref_clip_frames=121)
    assert t2v.tokens == 27280 and refs.tokens == 58080
    assert t2v.describe(full)["latent"] == [48, 31, 44, 80]
    assert refs.ref_frames == [1, 1, 1, 1, 31]
    with pytest.raises(ValueError, match="4n\\+1"):
        Case("t2v", geometry, 704, 1280, 120)
    with pytest.raises(ValueError, match="reference clip: .*4n\\+1"):
        Case("refs", geometry, 704, 1280, 121, ref_clip_frames=8)
    with pytest.raises(ValueError, match="multiple of 32"):
        Case("t2v", geometry, 700, 1280, 121)


def test_compose_video_adds_the_measured_parts():
    stages = {"text_encode": 0.5, "text_kv_prepare:refs": 0.01, "reference_encode": 3.0, "vae_decode": 7.0}
    v = compose_video(stages, CASES["refs"], step_s=2.0, steps=50)
    assert v.total_s == pytest.approx(50 * 2.0 + 0.5 + 0.01 + 3.0 + 7.0) and "missing" not in v.record()
    v = compose_video({"text_encode": 0.5, "vae_decode_tiled": 9.0}, CASES["t2v"], step_s=1.0, steps=50)
    assert v.total_s is None and v.record()["missing"] == ["text_kv_prepare"]  # never a silent partial sum
    assert "vae_decode_tiled" in v.parts  # the tiled decode stands in when the untiled one did not run


def test_parse_variant():
    assert parse_variant("triton+fp8+compile").name == "triton+compile+fp8"
    assert parse_variant("diffusers+compile").impl == "diffusers"
    for bad in ("cuda", "torch+fast", "torch+compile+compile", "diffusers+fp8", ""):
        with pytest.raises(ValueError):
            parse_variant(bad)


# ---------------------------------------------------------------------------------------------------------
# The baseline gets our weights and our inputs
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["t2v", "refs"])
def test_diffusers_baseline_has_our_weights_and_inputs(dit, case):
    model, info = diffusers_from_dit(dit)
    assert info.converted_bytes == 0  # fp32: every tensor shared, no copy
    assert model.blocks[1].ffn.net[0].proj.weight.data_ptr() == dit.blocks[1].ffn[0].weight.data_ptr()
    inp = make_step_inputs(dit, CASES[case], batch=2, guidance=5.0, t=731.0, prompt_tokens=9, seed=2)
    with torch.inference_mode():
        ours = ours_step(dit, inp, dit.prepare_text(inp.contexts))()
        theirs = diffusers_step(model, inp)()
        assert relerr(theirs, ours) < 1e-5
        # the check can fail: one perturbed weight in the baseline (a copy; ours is untouched) shows up
        blk = model.blocks[0].attn1.to_q
        blk.weight = torch.nn.Parameter(blk.weight + 0.05 * torch.randn_like(blk.weight), requires_grad=False)
        assert relerr(diffusers_step(model, inp)(), ours) > 1e-3
    assert torch.equal(ours_step(dit, inp, dit.prepare_text(inp.contexts))(), ours)


def test_diffusers_bf16_shares_what_it_can():
    dit16 = random_dit(CFG.dit, dtype=torch.bfloat16, device="cpu", seed=3)
    model, info = diffusers_from_dit(dit16)
    ours = dit16.state_dict()
    from anyid_rt.models.dit_loader import original_to_diffusers
    theirs = dict(model.named_parameters())
    converted = [k for k, v in ours.items() if theirs[original_to_diffusers(k)].data_ptr() != v.data_ptr()]
    assert converted and all(theirs[original_to_diffusers(k)].dtype == torch.bfloat16 for k in converted)
    assert not any(".ffn." in k or "self_attn.q.weight" in k for k in converted)  # the big layers are shared
    assert info.converted_bytes == sum(ours[k].numel() * 2 for k in converted)
    inp = make_step_inputs(dit16, CASES["t2v"], batch=2, guidance=5.0, t=500.0, prompt_tokens=5, seed=4)
    with torch.inference_mode():
        ours_out = ours_step(dit16, inp, dit16.prepare_text(inp.contexts))()
        theirs_out = diffusers_step(model, inp)()
    assert relerr(theirs_out, ours_out) < 0.1  # bf16 weights and activations, fp32 reference differs


def test_views_share_storage_and_are_independent(dit):
    view = dit_view(dit, "torch")
    assert view.blocks[0].self_attn.q.weight.data_ptr() == dit.blocks[0].self_attn.q.weight.data_ptr()
    quantize_dit_fp8_(view)  # quantising the view swaps its modules only
    assert isinstance(dit.blocks[0].self_attn.q, torch.nn.Linear)
    assert not isinstance(view.blocks[0].self_attn.q, torch.nn.Linear)


# ---------------------------------------------------------------------------------------------------------
# `anyid-rt bench` end to end at tiny size on the CPU, and the report
# ---------------------------------------------------------------------------------------------------------

def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RESULTS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench_main(["--preset", "tiny", "--device", "cpu", "--steps-timed", "1", "--warmup", "0", "--out", str(out),
                     "--steps", "3", "--full-video"])
    return rc, out, _records(out)


def test_cli_tiny_runs_every_stage_and_variant(tiny_run):
    rc, _, recs = tiny_run
    assert rc == 0
    assert len({r["run_id"] for r in recs}) == 1
    for r in recs:
        assert r["schema"] == SCHEMA and r["preset"] == "tiny"
        env = r["env"]
        for key in ("device_name", "driver", "torch", "triton", "diffusers", "commit", "date", "loadavg"):
            assert key in env, key
    run = [r for r in recs if r["kind"] == "run"]
    assert len(run) == 1 and run[0]["command"].startswith("anyid-rt bench --preset tiny")
    assert [c["tokens"] for c in run[0]["cases"]] == [12, 40]
    stages = {(r["stage"], r.get("case")): r for r in recs if r["kind"] == "stage"}
    for key in [("text_encode", None), ("reference_encode", None), ("vae_decode", None), ("vae_decode_tiled", None),
                ("text_kv_prepare", "t2v"), ("text_kv_prepare", "refs")]:
        assert stages[key]["status"] == "ok", stages[key]
        assert stages[key]["seconds"] == pytest.approx(stages[key]["timing"]["median_ms"] / 1e3 *
                                                       stages[key].get("layers_full", 1) /
                                                       stages[key].get("layers_measured", 1))
    assert stages[("vae_decode", None)]["output"] == {"shape": [1, 3, 9, 64, 64], "finite": True}
    assert stages[("reference_encode", None)]["latents"] == [[1, 48, 1, 4, 4]] * 4 + [[1, 48, 3, 4, 4]]


def test_cli_tiny_step_records(tiny_run):
    _, _, recs = tiny_run
    ceiling = next(r for r in recs if r["kind"] == "ceiling")
    assert ceiling["status"] == "ok" and ceiling["matmul_tflops"] > 0 and ceiling["copy_gbps"] > 0
    steps = {(r["case"], r["variant"]): r for r in recs if r["kind"] == "dit_step"}
    assert set(steps) == {(c, v) for c in ("t2v", "refs") for v in default_variants(CPU)}
    stage_s = {(r["stage"], r.get("case")): r.get("seconds") for r in recs if r["kind"] == "stage"}
    for case, tokens in (("t2v", 12), ("refs", 40)):
        base = steps[(case, "diffusers")]
        assert base["status"] == "ok" and base["attention_backend"] in base["backends_ok"]
        assert base["relerr_vs_torch"] < 1e-5  # the baseline computes what we compute
        for variant in ("torch", "diffusers", "torch+fp8"):
            r = steps[(case, variant)]
            assert r["status"] == "ok" and r["tokens"] == tokens and r["batch"] == 2 and r["finite"]
            assert r["flops_per_step"] == 2 * count_flops(CFG.dit, tokens)
            assert r["median_s"] == pytest.approx(r["timing"]["median_ms"] / 1e3)
            assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["median_s"] / 1e12)
            assert r["mfu_ceiling"] == pytest.approx(r["tflops"] / ceiling["matmul_tflops"])
            assert r["mfu_peak"] is None  # no datasheet peak for a CPU, and none is invented
            assert r["speedup_vs_baseline"] == pytest.approx(base["median_s"] / r["median_s"])
            assert r["baseline"]["attention_backend"] == base["attention_backend"]
            assert r["relerr_vs_torch"] < (0.2 if variant.endswith("fp8") else 1e-5)
            v = r["video"]
            parts = {"text_encode": stage_s[("text_encode", None)], "vae_decode": stage_s[("vae_decode", None)],
                     "text_kv_prepare": stage_s[("text_kv_prepare", case)]}
            if case == "refs":
                parts["reference_encode"] = stage_s[("reference_encode", None)]
            assert v["parts"] == pytest.approx(parts)
            assert v["total_s"] == pytest.approx(3 * r["median_s"] + sum(parts.values()))
        assert steps[(case, "torch")]["relerr_vs_torch"] == 0.0
        assert steps[(case, "triton")]["status"] == "skipped" and "CUDA" in steps[(case, "triton")]["reason"]
        assert steps[(case, "torch+compile")]["status"] == "skipped"
        assert "CPU" in steps[(case, "torch+compile")]["reason"]
    probes = [r for r in recs if r["kind"] == "diffusers_backend"]
    assert {p["attention_backend"] for p in probes} == set(DEFAULT_DIFFUSERS_BACKENDS)
    assert all(p["status"] == "ok" or p["reason"] for p in probes)  # unusable backends say why
    videos = [r for r in recs if r["kind"] == "video"]
    assert [v["case"] for v in videos] == ["t2v", "refs"] and all(v["status"] == "ok" for v in videos)
    assert videos[1]["frames"] == [9, 64, 64, 3] and videos[1]["steps"] == 3
    assert videos[1]["timings"]["total"] == videos[1]["total_s"]


def test_report_of_the_tiny_run(tiny_run, tmp_path):
    _, out, recs = tiny_run
    paths = report.write_report(out, tmp_path)
    text = paths["readme"].read_text()
    run_id = recs[0]["run_id"]
    assert "| t2v | 12 | torch | torch |" in text and "| refs | 40 | diffusers |" in text
    assert "| refs | 40 | triton | skipped: the Triton backend needs a CUDA GPU" in text
    assert f"`{run_id}`" in text and "anyid-rt bench --preset tiny" in text
    for key in ("latency", "tflops"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 5000


def test_triton_and_compile_paths_under_the_interpreter(tmp_path):
    """The GPU-only variants on a CPU: Triton kernels under TRITON_INTERPRET=1 (set by conftest without CUDA)
    and torch.compile with the eager backend (dynamo tracing without the minute-long C++ build)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 is set by conftest on machines without CUDA")
    rc = bench_main(["--preset", "tiny", "--device", "cpu", "--steps-timed", "1", "--warmup", "0", "--out",
                     str(tmp_path), "--cases", "t2v", "--stages", "none", "--variants",
                     "torch,triton,triton+compile,diffusers+compile", "--triton-interpret", "--compile", "on",
                     "--compile-backend", "eager", "--strict"])
    assert rc == 0
    steps = {r["variant"]: r for r in _records(tmp_path) if r["kind"] == "dit_step"}
    for name in ("triton", "triton+compile", "diffusers+compile"):
        assert steps[name]["status"] == "ok", steps[name]
        assert steps[name]["relerr_vs_torch"] < 1e-4
    assert steps["triton+compile"]["compile"]["backend"] == "eager" and steps["triton+compile"]["compile_s"] >= 0
    assert steps["triton"]["backend"] == "triton" and steps["triton"]["compile"] is None
    assert steps["diffusers+compile"]["baseline"] is None and steps["diffusers+compile"]["baseline_reason"]


def test_missing_diffusers_and_ftfy_are_recorded_not_hidden(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    monkeypatch.setitem(sys.modules, "ftfy", None)  # not on the GPU machines either
    rc = bench_main(["--preset", "tiny", "--device", "cpu", "--steps-timed", "1", "--warmup", "0", "--out",
                     str(tmp_path), "--cases", "t2v", "--stages", "text", "--variants", "torch,diffusers"])
    assert rc == 0
    recs = _records(tmp_path)
    text = next(r for r in recs if r["kind"] == "stage" and r["stage"] == "text_encode")
    assert text["status"] == "ok" and "ftfy" in text["path"] and text["output"]["shape"][1] == CFG.text.dim
    steps = {r["variant"]: r for r in recs if r["kind"] == "dit_step"}
    assert steps["diffusers"]["status"] == "skipped" and "pip install \"diffusers" in steps["diffusers"]["reason"]
    assert steps["torch"]["status"] == "ok" and steps["torch"]["baseline"] is None
    assert "not importable" in steps["torch"]["baseline_reason"]


def test_bad_options_fail_with_a_message(tmp_path, capsys):
    base = ["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path)]
    assert bench_main(base + ["--cases", "i2v"]) == 2
    assert bench_main(base + ["--frames", "10"]) == 2
    assert bench_main(base + ["--variants", "torch,torch"]) == 2
    assert bench_main(base + ["--steps-timed", "0"]) == 2
    err = capsys.readouterr().err
    assert "choose from t2v, refs" in err and "4n+1" in err and "twice" in err and "--steps-timed" in err
    assert not (tmp_path / RESULTS_FILE).exists()  # nothing measured, nothing written


# ---------------------------------------------------------------------------------------------------------
# bench/report.py on synthetic records
# ---------------------------------------------------------------------------------------------------------

def _env(device, date):
    return dict(device_name=device, date=date, driver="580.159.04", torch="2.11.0", triton="3.6.0",
                diffusers="0.42.1", cuda="13.0", commit="abc1234def", dirty=False)


def _synthetic(run_id, device, date, case, tokens, variant, median_ms, **extra):
    env = _env(device, date)
    flops = 2 * count_flops(DiTConfig.preset("wan2.2-ti2v-5b"), tokens)
    rec = dict(schema=SCHEMA, bench="e2e", kind="dit_step", run_id=run_id, preset="wan2.2-ti2v-5b", case=case,
               tokens=tokens, variant=variant, status="ok", env=env, peaks=dict(bf16=989.4),
               backend=None if variant.startswith("diffusers") else variant.split("+")[0],
               timing=dict(median_ms=median_ms, p20_ms=median_ms * 0.99, p80_ms=median_ms * 1.01),
               median_s=median_ms / 1e3, tflops=flops / (median_ms / 1e3) / 1e12, ceiling_tflops=790.0,
               first_call_s=3.0, peak_mem_gb=30.0, video=dict(total_s=50 * median_ms / 1e3 + 20))
    rec.update(mfu_peak=rec["tflops"] / 989.4, mfu_ceiling=rec["tflops"] / 790.0, **extra)
    return rec


def test_report_on_synthetic_records(tmp_path):
    h100, date = "NVIDIA H100 80GB HBM3", "2026-11-20T10:00:00+00:00"
    recs = [dict(schema=SCHEMA, kind="run", run_id="r1", command="anyid-rt bench --cases t2v", env=_env(h100, date)),
            _synthetic("r0", h100, "2026-11-19T10:00:00+00:00", "t2v", 27280, "triton+compile", 9999.0),  # older
            _synthetic("r1", h100, date, "t2v", 27280, "diffusers", 3000.0, attention_backend="_native_cudnn",
                       speedup_vs_baseline=1.0),
            _synthetic("r1", h100, date, "t2v", 27280, "triton+compile", 1500.0, speedup_vs_baseline=2.0,
                       relerr_vs_torch=0.012),
            _synthetic("r1", h100, date, "refs", 58080, "triton+compile", 5000.0, speedup_vs_baseline=1.5),
            dict(schema=SCHEMA, kind="dit_step", run_id="r1", case="refs", tokens=58080, variant="triton+fp8",
                 status="skipped", reason="quant='fp8' needs an FP8 GPU", env=dict(device_name=h100, date=date)),
            dict(schema=SCHEMA, kind="stage", run_id="r1", stage="vae_decode", status="ok", seconds=12.5,
                 timing=dict(median_ms=12500.0, p20_ms=12400.0, p80_ms=12600.0), peak_mem_gb=31.2,
                 env=dict(device_name=h100, date=date)),
            dict(schema=SCHEMA, kind="ceiling", run_id="r1", status="ok", matmul_tflops=791.3, copy_gbps=2987.0,
                 matmul=dict(n=8192, dtype="bfloat16"), peaks=dict(bf16=989.4), env=dict(device_name=h100, date=date)),
            _synthetic("r2", "NVIDIA H200", date, "t2v", 27280, "triton", 1200.0)]
    lines = [json.dumps(r) for r in recs] + ['{"bench": "load_dit", "load_s": 29.4}']
    (tmp_path / "e2e.jsonl").write_text("\n".join(lines) + "\n")
    paths = report.write_report(tmp_path)
    text = paths["readme"].read_text()
    assert "## NVIDIA H100 80GB HBM3" in text and "## NVIDIA H200" in text
    tflops = 2 * count_flops(DiTConfig.preset("wan2.2-ti2v-5b"), 27280) / 1.5 / 1e12  # ~689
    mfu = f"{tflops / 989.4:.1%} | {tflops / 790.0:.1%}"
    row = f"| t2v | 27280 | triton+compile | triton | 1500.0 | 1485.0–1515.0 | {tflops:.4g} | {mfu} | 2.00x |"
    assert row in text
    assert "9999.0" not in text  # an older measurement of the same device, case and variant is superseded
    assert "| t2v | 27280 | diffusers | _native_cudnn | 3000.0 |" in text
    assert "| refs | 58080 | triton+fp8 | skipped: quant='fp8' needs an FP8 GPU |" in text
    assert "| vae_decode | – | 12.5 |" in text and "matmul 791.3 TFLOP/s" in text
    assert "`r1`: 2026-11-20T10:00:00+00:00, commit abc1234def: `anyid-rt bench --cases t2v`" in text
    assert "(1 records of other benchmarks" in text
    for key in ("latency", "tflops"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 5000


def test_scripts_answer_help():
    """The scripts run both ways: as files and as modules of the package."""
    for cmd, option in ((["bench/bench_e2e.py"], "--steps-timed"),
                        (["-m", "anyid_rt.bench.bench_e2e"], "--steps-timed"),
                        (["bench/report.py"], "--results")):
        out = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        assert option in out.stdout


def test_cli_loads_bench_by_name_only_when_it_runs(tmp_path):
    """`anyid-rt bench` runs the package's e2e, and nothing of the runtime imports the benchmark package or
    the tests: importing the engine, the CLI and the kernel, export and trainer packages loads none of it."""
    from anyid_rt.cli import main

    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--cases", "t2v", "--variants", "torch",
                 "--stages", "none", "--steps-timed", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    recs = _records(tmp_path)
    assert recs[0]["kind"] == "run" and recs[0]["command"].startswith("anyid-rt bench --preset tiny")
    assert recs[0]["args"]["preset"] == "tiny" and recs[0]["args"]["variants"] == ["torch"]
    assert [r["status"] for r in recs if r["kind"] == "dit_step"] == ["ok"]
    probe = ("import sys, anyid_rt, anyid_rt.cli, anyid_rt.engine, anyid_rt.kernels, anyid_rt.export.cli, "
             "anyid_rt.trainer.cli\n"
             "anyid_rt.cli.build_parser()\n"
             "print([m for m in sys.modules if m.startswith('anyid_rt.bench') or m in ('helpers', 'conftest')])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
