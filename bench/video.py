"""The measurement sequence of one `anyid-rt bench` run (e2e.py is its command line): the ceiling, the stages,
the guided DiT step of every variant on every case, and optionally whole videos through `Engine.generate`."""
from __future__ import annotations

import shlex
import sys

import numpy as np
import torch

from anyid_rt.engine import Defaults, Engine
from anyid_rt.models.random_weights import random_dit

from .report import summary_lines
from .run import Case, Run, free_memory, log, make_cases
from .settings import PROMPT, Settings
from .stages import bench_ceiling, bench_text, bench_vae
from .steps import StepBench, bench_case, default_variants, parse_variant


def bench_full_video(run: Run, steps: StepBench, case: Case) -> None:
    """One Engine.generate, end to end, with the fastest of our variants measured for this case."""
    s = run.settings
    ours = [r for r in steps.results.get(case.name, []) if r.status == "ok" and r.variant.impl == "anyid_rt"]
    name = s.full_video_variant or (min(ours, key=lambda r: r.median_s).variant.name if ours else None)
    reason = run.over_budget()
    if name is None:
        reason = "no variant of ours ran for this case"
    elif parse_variant(name).impl != "anyid_rt":
        reason = f"--full-video-variant {name!r}: the end-to-end run uses our engine (torch or triton variants)"
    elif run.text_encoder is None or run.vae is None:
        reason = "the full-size text encoder or the VAE did not run in this process (see their stage records)"
    if reason:
        run.emit("video", case=case.name, status="skipped", reason=reason)
        return
    engine = Engine(steps.module(parse_variant(name), s), run.vae, run.text_encoder, device=run.device,
                    defaults=Defaults(height=case.height, width=case.width, num_frames=case.frames, steps=s.steps,
                                      guidance=s.guidance))
    rng = np.random.default_rng(s.seed)
    refs = [rng.integers(0, 256, (1, case.height, case.width, 3), dtype=np.uint8) for _ in range(case.ref_images)]
    if case.ref_clip_frames:
        refs.append(rng.integers(0, 256, (case.ref_clip_frames, case.height, case.width, 3), dtype=np.uint8))
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    video, err = run.attempt("full video", lambda: engine.generate(
        PROMPT, references=refs or None, height=case.height, width=case.width, num_frames=case.frames,
        steps=s.steps, guidance=s.guidance, seed=s.seed, progress=False))
    if err:
        run.emit("video", case=case.name, variant=name, status="failed", reason=err)
        return
    peak = torch.cuda.max_memory_allocated(run.device) / 1e9 if run.device.type == "cuda" else None
    composed = next((r.video.total_s for r in ours if r.variant.name == name and r.video), None)
    run.emit("video", case=case.name, variant=name, status="ok", method="measured end to end (Engine.generate)",
             steps=s.steps, timings=video.timings, total_s=video.timings["total"], composed_total_s=composed,
             frames=list(video.frames.shape), peak_mem_gb=peak)
    log(f"full video ({case.name}, {name}): {video.timings['total']:.1f} s "
        f"(composed estimate {composed if composed is None else round(composed, 1)} s)")


def run_benchmark(settings: Settings) -> list[dict]:
    """Run the benchmark; returns the records (also appended to <out>/e2e.jsonl)."""
    run = Run.start(settings)
    cases = make_cases(settings, run.cfg)
    variants = [parse_variant(v) for v in (settings.variants or default_variants(run.device))]
    if len({v.name for v in variants}) != len(variants):
        raise ValueError(f"--variants lists a variant twice: {[v.name for v in variants]}")
    run.emit("run", command=settings.command_line or _command_line(), args=settings.record(),
             cases=[dict(name=c.name, tokens=c.tokens, **c.describe(run.cfg.dit)) for c in cases],
             variants=[v.name for v in variants], tag=settings.tag)
    log(f"run {run.run_id} on {run.env.get('device_name')} ({run.device}, {run.dtype}), commit "
        f"{run.env.get('commit')}, writing {run.out_file}")
    with torch.inference_mode():
        bench_ceiling(run)
        bench_text(run)
        bench_vae(run, cases)
        base, err = run.attempt("DiT build", lambda: random_dit(run.cfg.dit, dtype=run.dtype, device=run.device,
                                                                seed=settings.seed))
        if err:
            for c in cases:
                for v in variants:
                    run.emit("dit_step", case=c.name, **v.record(settings), status="failed",
                             reason=f"DiT build: {err}")
        else:
            steps = StepBench(base)
            for c in cases:
                bench_case(run, steps, c, variants)
                if settings.full_video:
                    bench_full_video(run, steps, c)
            steps.clear()
    print("\n".join(summary_lines(run.records)), flush=True)
    run.vae = run.text_encoder = None
    free_memory(run.device)
    return run.records


def _command_line() -> str:
    """The command that reproduces this run, read off sys.argv (`anyid-rt bench ...` or the script)."""
    parts = ["anyid-rt", *sys.argv[1:]] if sys.argv[1:2] == ["bench"] else sys.argv
    return " ".join(shlex.quote(x) for x in parts)
