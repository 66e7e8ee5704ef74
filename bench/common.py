"""Shared benchmark helpers: run setup (GPU or CPU dry run), timing, environment record, JSON lines, plots.

A benchmark script calls `setup(args)` before importing anything that imports triton: a `--dry-run` (or a
machine without CUDA) sets TRITON_INTERPRET=1 so that the same script runs at toy sizes on a CPU, to check
its plumbing; the numbers of a dry run measure the interpreter and mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
QUANTILES = (0.5, 0.2, 0.8)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results",
                   help="folder for <bench>.jsonl (appended) and <bench>.png (default: bench/results)")
    p.add_argument("--dry-run", action="store_true",
                   help="toy sizes on the CPU under the Triton interpreter: checks the script, not the speed")
    p.add_argument("--warmup", type=int, default=25, help="warm-up time per measurement, ms (do_bench)")
    p.add_argument("--rep", type=int, default=100, help="measured time per measurement, ms (do_bench)")
    return p


def setup(args: argparse.Namespace) -> str:
    """Pick the device; on a CPU force the dry run and the Triton interpreter (before triton is imported)."""
    if not torch.cuda.is_available():
        if not args.dry_run:
            print("no CUDA device: running the --dry-run (toy sizes, Triton interpreter)", file=sys.stderr)
        args.dry_run = True
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("triton was imported before setup(); TRITON_INTERPRET can no longer take effect")
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    return "cuda"


def bench_ms(fn: Callable[[], object], args: argparse.Namespace) -> dict[str, float]:
    """Median and 20/80 % quantiles of fn's run time in ms (triton.testing.do_bench on a GPU, which flushes
    the L2 cache between runs; a few wall-clock runs in a dry run)."""
    if not args.dry_run:
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, quantiles=list(QUANTILES))
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": times[1], "ms_p20": times[0], "ms_p80": times[2]}


def peak_memory(fn: Callable[[], object], device: str) -> float | None:
    """Peak allocated GiB of one call of fn beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def env_record(device: str) -> dict:
    """Where and with what a measurement was taken."""
    import triton

    rec = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu (Triton interpreter, dry run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "HEAD") or None,
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if device == "cuda":
        rec["capability"] = "sm%d%d" % torch.cuda.get_device_capability()
    return rec


def append_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _pyplot():
    """matplotlib.pyplot with the file backend, or None if matplotlib is missing (the GPU machines may not
    have it: the JSON lines are the record, the plots a convenience)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return None
    return plt


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    fig.clf()


def plot(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
         hlines: dict[str, float] | None = None, logx: bool = True) -> bool:
    """Line plot of {label: [(x, y)]} with optional labelled horizontal reference lines."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    if logx:
        ax.set_xscale("log", base=2)
    _save(fig, ax, path, xlabel, ylabel, title)
    plt.close(fig)
    return True


def bar_plot(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> bool:
    """Grouped bars: one group per entry of `groups`, one bar per series (values in group order)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
    _save(fig, ax, path, "", ylabel, title)
    plt.close(fig)
    return True


def print_row(rec: dict, keys: tuple[str, ...]) -> None:
    print("  ".join(f"{k}={rec[k]:.4g}" if isinstance(rec.get(k), float) else f"{k}={rec.get(k)}" for k in keys),
          flush=True)
