"""Parallel generation vs world size (anyid_rt/parallel.py): per-rank peak memory and time of one guided DiT step
(batch 2: conditional + unconditional) on CPU processes over gloo, for one process and for each way of
spreading the step (Ulysses S, guidance x2, both), with the largest error against the one-process velocity.

The model is a mid-size DiT (dim 256, 4 heads, 4 layers, text 512 rows) on 8 latent frames of 24 x 40 latent
pixels (240 tokens per frame, 1,920 target tokens) plus one reference frame, so that a step takes a fraction
of a second on one core: each process runs one intra-op thread. On a machine with fewer free cores than
processes the times measure contention, not scaling: the record carries the host's CPU count and load.
Memory is each rank's peak RSS over its steps (the first included) above its RSS before the first (weights and
inputs are replicated on every rank: Ulysses and guidance parallelism divide the activations, not the weights).

    python bench/bench_parallel.py                  # appends to bench/results/parallel.jsonl, plots parallel.png
    python bench/bench_parallel.py --worlds 1,2     # fewer configurations
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from anyid_rt.bench.report import bar_plot
from anyid_rt.bench.timing import RESULTS, PhasePeak, append_jsonl, environment, summarize
from anyid_rt.config import DiTConfig, ParallelConfig
from anyid_rt.parallel import free_port

CONFIG = DiTConfig(dim=256, ffn_dim=1024, freq_dim=64, num_heads=4, num_layers=4, text_dim=64)
TARGET, REF = (8, 24, 40), (1, 24, 40)  # latent frames, h, w (tokens per frame: 12 x 20 = 240)
# (label, world size, ParallelConfig or None)
LAYOUTS = [("1 process", 1, None), ("Ulysses 2", 2, ParallelConfig(sequence=2)),
           ("guidance 2", 2, ParallelConfig(cfg=True)), ("Ulysses 4", 4, ParallelConfig(sequence=4)),
           ("Ulysses 2 x guidance 2", 4, ParallelConfig(sequence=2, cfg=True))]


def step_inputs(dit):
    """A guided step's inputs: target and reference latents (batch 2), segments (reference at t = 0), text."""
    from anyid_rt.models.dit import Segments

    g = torch.Generator().manual_seed(0)
    target, ref = torch.randn(2, 48, *TARGET, generator=g), torch.randn(2, 48, *REF, generator=g)
    per_frame = TARGET[1] * TARGET[2] // 4
    segments = Segments((TARGET[0] * per_frame, REF[0] * per_frame), torch.tensor([[500.0, 0.0], [500.0, 0.0]]))
    text = dit.prepare_text([torch.randn(20, CONFIG.text_dim, generator=g), torch.randn(1, CONFIG.text_dim,
                                                                                          generator=g)])
    return [target, ref], [0, TARGET[0] + 1], segments, text


def _worker(rank: int, world: int, port: int, parallel: ParallelConfig | None, reps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from anyid_rt import parallel as par
    from anyid_rt.models.random_weights import random_dit

    dit = random_dit(CONFIG, seed=0)
    inputs = step_inputs(dit)
    if parallel is None:
        forward, barrier = dit.forward_groups, (lambda: None)
    else:
        ctx = par.ParallelContext.join(parallel, torch.device("cpu"))
        forward, barrier = par.ParallelDiT(dit, ctx).forward_groups, dist.barrier
    try:
        with torch.inference_mode():
            # the peak covers the first call (RoPE tables, segment maps) and the timed ones, from a heap that
            # no step has grown yet: the step's own activations and buffers
            peak = PhasePeak("cpu")
            peak.reset()
            v = forward(*inputs)
            times = []
            for _ in range(reps):
                barrier()  # every rank starts the step together: the slowest rank sets the time
                t0 = time.perf_counter()
                forward(*inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            step_peak = peak.peak_gib() - peak.start_gib
            ref = dit.forward_groups(*inputs) if parallel is not None else v  # after the measurement
            row = dict(rank=rank, start_gib=peak.start_gib, step_peak_gib=step_peak, timing=summarize(times).record(),
                       max_abs_err_vs_one_process=(v - ref).abs().max().item(), how=peak.how)
        Path(out, f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        par.shutdown()


def run_layout(label: str, world: int, parallel: ParallelConfig | None, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, free_port(), parallel, reps, out), nprocs=world, join=True,
                           start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    return dict(bench="parallel", layout=label, world=world, sequence=parallel.sequence if parallel else 1,
                cfg=bool(parallel and parallel.cfg), tokens=(TARGET[0] + REF[0]) * TARGET[1] * TARGET[2] // 4,
                step_ms=max(r["timing"]["median_ms"] for r in ranks),
                step_peak_gib_per_rank=[round(r["step_peak_gib"], 4) for r in ranks],
                start_gib_per_rank=[round(r["start_gib"], 3) for r in ranks],
                max_abs_err_vs_one_process=max(r["max_abs_err_vs_one_process"] for r in ranks),
                memory=ranks[0]["how"], reps=reps, threads_per_process=1, dit=dataclasses.asdict(CONFIG))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="1,2,4", help="world sizes to run (default 1,2,4)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per layout (default 5)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of parallel.jsonl and parallel.png")
    args = ap.parse_args(argv)
    worlds = {int(w) for w in args.worlds.split(",")}
    env = environment("cpu")
    rows = []
    for label, world, parallel in LAYOUTS:
        if world in worlds:
            row = run_layout(label, world, parallel, args.reps) | {"env": env}
            print(f"{label:24s} {row['step_ms']:8.1f} ms/step  step peak per rank "
                  f"{max(row['step_peak_gib_per_rank']) * 1024:7.1f} MiB  max |err| {row['max_abs_err_vs_one_process']:.1e}",
                  flush=True)
            rows.append(row)
    out = Path(args.out)
    append_jsonl(out / "parallel.jsonl", rows)
    labels = [r["layout"] for r in rows]
    bar_plot(out / "parallel_time.png", labels, {"ms per guided step (slowest rank)": [r["step_ms"] for r in rows]},
             "ms", f"DiT step vs layout, CPU gloo, 1 thread/process ({env.get('cpu_count')} CPUs, "
             f"commit {str(env.get('commit'))[:8]})")
    bar_plot(out / "parallel_memory.png", labels,
             {"step peak MiB (largest rank)": [max(r["step_peak_gib_per_rank"]) * 1024 for r in rows]},
             "MiB above the rank's start", f"Per-rank activation peak of a guided step ({rows[0]['tokens']} tokens)")
    return rows


if __name__ == "__main__":
    main()
