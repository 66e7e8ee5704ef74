"""The guided denoising step of every variant on one case: our engine (torch or Triton backend, eager or
compiled regionally, optionally with FP8 linears) and diffusers' WanTransformer3DModel with the fastest of its
attention backends, all over one random copy of the weights and on the same inputs (bench/baseline.py).

Our torch backend runs first: its output is the reference of every relative error. Then the baseline, then
the rest. Each variant gives one `dit_step` record: latency, TFLOP/s and MFU, peak memory, speedup over the
baseline, relative error, and the seconds per video composed from the run's measured stages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from anyid_rt.config import DiTConfig
from anyid_rt.models.dit import WanDiT, count_flops
from anyid_rt.quant import check_fp8_device, quantize_dit_fp8_

from .baseline import (SharedWeights, StepInputs, diffusers_attention, diffusers_from_dit, diffusers_step, dit_view,
                       make_step_inputs, ours_step, relerr)
from .run import Case, Run, VideoEstimate, compose_video, free_memory, log
from .settings import Settings
from .timing import Measurement, measure

VARIANT_BASES = ("torch", "triton", "diffusers")
FLOP_FORMULA = ("per guided step = batch x count_flops(cfg, N); count_flops = layers x (2 N d (6 d + 2 f) "
                "+ 4 N^2 d + 4 N T d) + 2 N d p (in + out): N tokens (target + references, joint attention), "
                "T = 512 text rows, d = dim, f = ffn_dim, p = patch volume; 2 FLOPs per multiply-add; the text "
                "K/V projections (once per prompt) are not counted")
# what a user is told when the diffusers baseline cannot run (the offline recipe is in README.md)
DIFFUSERS_CARRY = ("To compare against diffusers: pip install \"diffusers>=0.35\" (on a machine without a package "
                   "index, carry its wheel: README.md, Benchmarks, \"On the GPU machines\")")


def step_flops(cfg: DiTConfig, tokens: int, batch: int) -> float:
    """FLOPs of one guided step: `batch` samples (2 with guidance) of one forward over `tokens` tokens."""
    return batch * count_flops(cfg, tokens)


def throughput(flops: float, seconds: float, peak_tflops: float | None, ceiling_tflops: float | None) -> dict:
    """Achieved TFLOP/s and MFU against a datasheet peak and against a measured ceiling (None when unknown)."""
    tflops = flops / seconds / 1e12
    return dict(tflops=tflops, mfu_peak=None if not peak_tflops else tflops / peak_tflops,
                mfu_ceiling=None if not ceiling_tflops else tflops / ceiling_tflops)


# ---------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """`torch`, `triton` or `diffusers`, optionally `+compile`, and (ours) `+fp8`."""

    base: str
    compile: bool = False
    fp8: bool = False

    @property
    def name(self) -> str:
        return self.base + ("+compile" if self.compile else "") + ("+fp8" if self.fp8 else "")

    @property
    def impl(self) -> str:
        return "diffusers" if self.base == "diffusers" else "anyid_rt"

    def record(self, settings: Settings) -> dict:
        """The fields naming the variant in its records."""
        compiled = dict(backend=settings.compile_backend, mode=settings.compile_mode or "default", dynamic=False,
                        scope="each transformer block (regional)")
        return dict(variant=self.name, impl=self.impl, backend=None if self.base == "diffusers" else self.base,
                    compile=compiled if self.compile else None, quant="fp8" if self.fp8 else None)


def parse_variant(text: str) -> Variant:
    parts = [p.strip() for p in text.strip().split("+") if p.strip()]
    if not parts or parts[0] not in VARIANT_BASES:
        raise ValueError(f"variant {text!r} must start with one of {VARIANT_BASES} (e.g. triton+compile+fp8)")
    flags = set(parts[1:])
    if flags - {"compile", "fp8"} or len(flags) != len(parts) - 1:
        raise ValueError(f"variant {text!r}: only '+compile' and '+fp8' may follow the base, once each")
    if parts[0] == "diffusers" and "fp8" in flags:
        raise ValueError("variant 'diffusers+fp8' is not benchmarked: the baseline runs diffusers as shipped")
    return Variant(parts[0], "compile" in flags, "fp8" in flags)


def default_variants(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["torch", "diffusers", "triton", "torch+compile", "triton+compile", "triton+fp8",
                "triton+compile+fp8"]
    # on a CPU the Triton and compiled variants are recorded as skipped, with the reason
    return ["torch", "diffusers", "torch+fp8", "triton", "torch+compile"]


def variant_unavailable(v: Variant, device: torch.device, settings: Settings) -> str | None:
    """The reason a variant cannot run on this machine with these settings, or None."""
    if v.base == "triton" and device.type != "cuda":
        if not settings.triton_interpret:
            return ("the Triton backend needs a CUDA GPU (device is cpu); --triton-interpret runs it under "
                    "TRITON_INTERPRET=1 for a correctness check (timings meaningless)")
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "--triton-interpret needs TRITON_INTERPRET=1 set before Python starts (before triton is imported)"
    if v.compile:
        if settings.compile == "off":
            return "torch.compile disabled (--compile off)"
        if settings.compile == "auto" and device.type != "cuda":
            return ("torch.compile is skipped on a CPU by default (the inductor C++ build takes about a minute "
                    "even at tiny size); --compile on forces it, --compile-backend eager checks tracing only")
    if v.fp8:
        try:
            check_fp8_device(device)
        except ValueError as e:
            return str(e)
    if v.base == "diffusers":
        try:
            import diffusers  # noqa: F401
        except ImportError as e:
            return f"diffusers is not importable ({type(e).__name__}: {e}). {DIFFUSERS_CARRY}"
    return None


def _compile_kwargs(settings: Settings) -> dict:
    kw: dict[str, Any] = dict(dynamic=False, backend=settings.compile_backend)
    if settings.compile_mode:
        kw["mode"] = settings.compile_mode
    return kw


def _raise_dynamo_limits() -> None:
    """Each compiled variant x shape is one cache entry of the shared block code: allow plenty."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


# ---------------------------------------------------------------------------------------------------------
# The step of each variant
# ---------------------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    """One variant's guided step on one case."""

    variant: Variant
    status: str  # "ok" | "skipped" | "failed"
    reason: str | None = None
    measurement: Measurement | None = None
    output: torch.Tensor | None = None  # the guided velocity [1, C, F, h, w] (not recorded; for relative errors)
    diffusers: dict = field(default_factory=dict)  # attention backend chosen and tried, weight sharing
    video: VideoEstimate | None = None

    @property
    def median_s(self) -> float:
        return self.measurement.median_s


@dataclass
class StepBench:
    """The modules of every variant over one random copy of the weights (built once, reused across cases),
    the attention backend the eager diffusers baseline chose per case, and the results per case."""

    base: WanDiT
    ours: dict[str, WanDiT] = field(default_factory=dict)  # variant name -> view of `base`
    diffusers: dict[str, tuple[Any, SharedWeights]] = field(default_factory=dict)  # variant name -> (model, weights)
    chosen_backend: dict[str, str] = field(default_factory=dict)  # case name -> diffusers attention backend
    results: dict[str, list[StepResult]] = field(default_factory=dict)  # case name -> results

    def module(self, v: Variant, settings: Settings) -> WanDiT:
        """Our module of a variant: a view of the base weights with its own backend, quantised and compiled."""
        if v.name not in self.ours:
            model = dit_view(self.base, v.base)
            if v.fp8:
                quantize_dit_fp8_(model)
            if v.compile:
                _raise_dynamo_limits()
                for block in model.blocks:  # regional compilation: every block runs the same compiled code
                    block.compile(**_compile_kwargs(settings))
            self.ours[v.name] = model
        return self.ours[v.name]

    def diffusers_model(self, v: Variant, settings: Settings) -> tuple[Any, SharedWeights]:
        if v.name not in self.diffusers:
            model, weights = diffusers_from_dit(self.base)
            if v.compile:
                _raise_dynamo_limits()
                model.compile_repeated_blocks(**_compile_kwargs(settings))
            self.diffusers[v.name] = (model, weights)
        return self.diffusers[v.name]

    def clear(self) -> None:
        self.ours.clear()
        self.diffusers.clear()


def bench_diffusers(run: Run, steps: StepBench, v: Variant, inp: StepInputs,
                    reference: torch.Tensor | None) -> tuple[Measurement | None, dict]:
    """Try every requested attention backend (one untimed and one timed step each; the relative error of its
    output against our torch backend is recorded), then time the fastest that gives finite output. The
    compiled variant uses the backend the eager baseline chose for this case."""
    s, case = run.settings, inp.case
    model, weights = steps.diffusers_model(v, s)
    step = diffusers_step(model, inp)
    candidates = list(s.diffusers_backends)
    if v.compile and case.name in steps.chosen_backend:
        candidates = [steps.chosen_backend[case.name]]
    probes = []
    for name in candidates:
        if len(candidates) == 1:
            probes.append(dict(attention_backend=name, status="ok", probe_ms=None))
            break
        try:
            with diffusers_attention(model, name):
                m = measure(step, warmup=0, reps=1, device=run.device)
        except Exception as e:  # noqa: BLE001 - an unusable backend is an expected outcome, recorded
            free_memory(run.device)
            probes.append(dict(attention_backend=name, status="unavailable", reason=f"{type(e).__name__}: {e}"[:600]))
            continue
        finite = bool(torch.isfinite(m.first_result).all())
        probes.append(dict(attention_backend=name, status="ok" if finite else "non-finite output",
                           probe_ms=m.times_ms[0], first_call_s=m.first_call_s,
                           relerr_vs_torch=None if reference is None else relerr(m.first_result, reference)))
        del m
    ok = [p for p in probes if p["status"] == "ok"]
    for p in probes:
        run.emit("diffusers_backend", case=case.name, variant=v.name, **p)
    if not ok:
        return None, dict(attention_backend=None, reason="no diffusers attention backend ran: " +
                          "; ".join(f"{p['attention_backend']}: {p.get('reason', p['status'])}" for p in probes),
                          weights=weights.record())
    best = min(ok, key=lambda p: p["probe_ms"] if p["probe_ms"] is not None else 0.0)
    if not v.compile:
        steps.chosen_backend[case.name] = best["attention_backend"]
    with diffusers_attention(model, best["attention_backend"]):
        m = measure(step, warmup=s.warmup, reps=s.steps_timed, device=run.device)
    return m, dict(attention_backend=best["attention_backend"], weights=weights.record(),
                   backends_tried=[p["attention_backend"] for p in probes],
                   backends_ok=[p["attention_backend"] for p in ok])


def _run_variant(run: Run, steps: StepBench, v: Variant, inp: StepInputs, text_kv,
                 reference: torch.Tensor | None) -> StepResult:
    s = run.settings
    reason = variant_unavailable(v, run.device, s) or run.over_budget()
    if reason:
        log(f"  {v.name}: skipped: {reason[:160]}")
        return StepResult(v, "skipped", reason)
    details: dict = {}
    if v.base == "diffusers":
        res, err = run.attempt(f"{inp.case.name}/{v.name}", lambda: bench_diffusers(run, steps, v, inp, reference))
        if res is not None:
            m, details = res
            if m is None:
                return StepResult(v, "failed", details.pop("reason"), diffusers=details)
    else:
        m, err = run.attempt(f"{inp.case.name}/{v.name}", lambda: measure(
            ours_step(steps.module(v, s), inp, text_kv), warmup=s.warmup, reps=s.steps_timed, device=run.device))
    if err:
        return StepResult(v, "failed", err)
    return StepResult(v, "ok", measurement=m, output=m.first_result, diffusers=details)


def _step_record(run: Run, r: StepResult, flops: float, baseline: StepResult | None,
                 reference: torch.Tensor | None, no_baseline: str) -> dict:
    rec = dict(r.variant.record(run.settings), status=r.status)
    if r.status != "ok":
        return dict(rec, reason=r.reason, **r.diffusers)
    m = r.measurement
    thr = throughput(flops, m.median_s, run.peaks.get("bf16"), run.ceiling_tflops)
    rec.update(**m.summary(), median_s=m.median_s, **thr, finite=bool(torch.isfinite(r.output).all()),
               output_shape=list(r.output.shape), **r.diffusers)
    if r.variant.fp8 and run.peaks.get("fp8"):
        rec["mfu_fp8_peak"] = thr["tflops"] / run.peaks["fp8"]
    if r.variant.compile:
        rec["compile_s"] = max(0.0, m.first_call_s - m.median_s)
        rec["compile_note"] = "first call (compilation) excluded from the timing; compile_s = first call - median"
    if reference is not None:
        rec["relerr_vs_torch"] = relerr(r.output, reference)
    if baseline is not None:
        rec["baseline"] = dict(variant="diffusers", attention_backend=baseline.diffusers.get("attention_backend"),
                               median_ms=baseline.measurement.timing.median_ms)
        rec["speedup_vs_baseline"] = baseline.median_s / m.median_s
    else:
        rec["baseline"], rec["baseline_reason"] = None, no_baseline
    rec["video"] = r.video.record()
    return rec


def bench_case(run: Run, steps: StepBench, case: Case, variants: list[Variant]) -> None:
    """The text K/V stage of the case, then every variant's guided step, recorded with the comparisons."""
    s, cfg = run.settings, run.cfg.dit
    batch = 2 if s.guidance != 1.0 else 1
    flops = step_flops(cfg, case.tokens, batch)
    shape = case.describe(cfg)
    common = dict(case=case.name, shape=shape, tokens=case.tokens, batch=batch, timestep=s.timestep,
                  text_len=cfg.text_len, prompt_tokens=s.prompt_tokens, flops_per_step=flops,
                  flop_formula=FLOP_FORMULA, peaks=run.peaks, ceiling_tflops=run.ceiling_tflops)

    def prepare():
        inp = make_step_inputs(steps.base, case, batch=batch, guidance=s.guidance, t=s.timestep,
                               prompt_tokens=s.prompt_tokens, seed=s.seed + 10)
        kv_view = dit_view(steps.base, "torch")
        return inp, measure(lambda: kv_view.prepare_text(inp.contexts), warmup=s.stage_warmup,
                            reps=s.stage_repeats, device=run.device)

    res, err = run.attempt(f"{case.name} inputs", prepare)
    if err:
        run.emit("stage", stage="text_kv_prepare", case=case.name, status="failed", reason=err)
        for v in variants:
            run.emit("dit_step", **common, **v.record(s), status="failed", reason=f"inputs: {err}")
        return
    inp, m_kv = res
    text_kv = m_kv.first_result
    run.stage_s[f"text_kv_prepare:{case.name}"] = m_kv.median_s
    run.emit("stage", stage="text_kv_prepare", case=case.name, status="ok", seconds=m_kv.median_s,
             note="text embedding and every block's cross-attention K/V, once per prompt pair", **m_kv.summary())
    log(f"case {case.name}: {case.tokens} tokens, {flops / 1e12:.4g} TFLOP per guided step, target latent "
        f"{shape['latent']}, references {shape['ref_latents']}")

    # order: our torch backend first (the numerical reference), then the baseline, then the rest
    results: list[StepResult] = []
    reference = None  # our torch-backend output, the reference for every relative error
    for v in sorted(variants, key=lambda v: (v.name != "torch", v.name != "diffusers")):
        r = _run_variant(run, steps, v, inp, text_kv, reference)
        results.append(r)
        if r.status != "ok":
            continue
        if v.name == "torch":
            reference = r.output
        r.video = compose_video(run.stage_s, case, r.median_s, s.steps, run.stage_note)
        t = r.measurement.timing
        log(f"  {v.name}: {t.median_ms:.1f} ms/step (p20 {t.p20_ms:.1f}, p80 {t.p80_ms:.1f}), "
            f"{flops / r.median_s / 1e12:.4g} TFLOP/s, first call {r.measurement.first_call_s:.1f} s")

    baseline = next((r for r in results if r.variant.name == "diffusers" and r.status == "ok"), None)
    no_baseline = next((r.reason for r in results if r.variant.name == "diffusers"), "diffusers not in --variants")
    for r in results:
        run.emit("dit_step", **common, **_step_record(run, r, flops, baseline, reference, no_baseline))
        r.output = None  # the records are written: free the outputs
    steps.results[case.name] = results
    del reference, text_kv, inp
    free_memory(run.device)
