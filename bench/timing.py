"""The one timing harness of the benchmarks: `anyid-rt bench` and every bench/ script time through `measure`.

- `measure(fn, warmup=, reps=, device=)`: the first call is never timed with the rest (compilation,
  autotuning and cuDNN plan choice land there; it is reported as `first_call_s`), `warmup` more untimed calls
  follow, then `reps` timed ones: CUDA events around each call on a GPU (no synchronisation between calls, as
  `triton.testing.do_bench`; optionally the L2 cache flushed before each), a wall clock on a CPU. Peak CUDA
  memory covers every call. `summarize` gives do_bench's statistics (median, 20 % and 80 % quantiles).
- `bench_ms`: the kernel benchmarks' form, do_bench's budget in milliseconds, over `measure`.
- Memory: `peak_memory` (CUDA, one call), `PhasePeak` (the CUDA allocator's or the process's peak per
  phase), `AnonPeak` (sampled anonymous memory: what loading memory-mapped weights really holds).
- The record: `environment` (device, versions, git commit and a hash of the uncommitted diff, load),
  `dense_peaks` (datasheet rates for MFU), `append_jsonl`.
- The kernel scripts' command line: `parser`, `setup` (a `--dry-run` on a CPU under the Triton interpreter,
  which must be chosen before triton is imported: this module never imports it at load), `print_row`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# Dense (non-sparse) peak rates in TFLOP/s, from the vendors' datasheets (shared/reference/perf-anchors.md §10).
_DENSE_PEAKS = (  # (name fragments that must all appear, bf16, fp8)
    (("H100", "PCIE"), 756.0, 1513.0),
    (("H100",), 989.4, 1978.9),
    (("H200",), 989.4, 1978.9),
    (("H800",), 989.4, 1978.9),
    (("A100",), 312.0, None),
)
_L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2 (H100: 50 MB), as do_bench's cache buffer


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """do_bench-style statistics of per-repetition times in ms: median, 20 % and 80 % quantiles (linear
    interpolation, as torch.quantile), min, max, mean, and the raw times."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    reps: int
    times_ms: tuple[float, ...]

    def record(self) -> dict:
        """The JSON form (`timing` in every record), raw times rounded to 0.1 us."""
        return dict(dataclasses.asdict(self), times_ms=[round(x, 4) for x in self.times_ms])


def summarize(times_ms: Sequence[float]) -> Timing:
    if not times_ms:
        raise ValueError("no timed repetitions to summarize")
    t = torch.tensor([float(x) for x in times_ms], dtype=torch.float64)
    med, p20, p80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Timing(median_ms=med, p20_ms=p20, p80_ms=p80, min_ms=t.min().item(), max_ms=t.max().item(),
                  mean_ms=t.mean().item(), reps=len(t), times_ms=tuple(t.tolist()))


@dataclass
class Measurement:
    """The first call (never in the statistics), the timed repetitions, and memory over all of them."""

    first_call_s: float
    warmup: int
    times_ms: list[float]
    first_result: Any = None
    mem_before_bytes: int | None = None  # CUDA only
    peak_mem_bytes: int | None = None

    @property
    def timing(self) -> Timing:
        return summarize(self.times_ms)

    @property
    def median_s(self) -> float:
        return self.timing.median_ms / 1e3

    @property
    def peak_mem_gb(self) -> float | None:
        return None if self.peak_mem_bytes is None else round(self.peak_mem_bytes / 1e9, 3)

    def summary(self) -> dict:
        """The fields every timed record carries."""
        gb = lambda b: None if b is None else round(b / 1e9, 3)  # noqa: E731
        over = None if self.peak_mem_bytes is None else self.peak_mem_bytes - self.mem_before_bytes
        return dict(timing=self.timing.record(), first_call_s=round(self.first_call_s, 4), warmup=self.warmup,
                    mem_before_gb=gb(self.mem_before_bytes), peak_mem_gb=self.peak_mem_gb,
                    peak_over_before_gb=gb(over))


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _keep(out: Any) -> Any:
    return out


def measure(fn: Callable[[], Any], *, warmup: int, reps: int, device: torch.device | str,
            inspect: Callable[[Any], Any] | None = _keep, flush_l2: bool = False,
            clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Call `fn` once untimed (timed by `clock`, reported as first_call_s), `warmup` times untimed, then `reps`
    times timed. `inspect` maps the first call's output to what is kept (default: the output itself; a
    reducer for large outputs, None for nothing). `flush_l2` zeroes a buffer larger than the L2 cache before
    each timed CUDA call, outside the timed region, so that no call finds its inputs in a warm cache."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    # allocated before the memory baseline, so that the peak over it is fn's alone
    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if cuda and flush_l2 else None
    sync(device)
    mem_before = torch.cuda.memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = clock()
    out = fn()
    sync(device)
    first_s = clock() - t0
    kept = inspect(out) if inspect is not None else None
    del out
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = clock()
            fn()
            times.append((clock() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return Measurement(first_s, warmup, times, kept, mem_before, peak)


def bench_ms(fn: Callable[[], object], args: argparse.Namespace) -> dict[str, float]:
    """Median and 20/80 % quantiles of fn's run time in ms, as the kernel benchmarks record them (`ms`,
    `ms_p20`, `ms_p80`). On a GPU with do_bench's budget: as many untimed and timed calls as fill
    `args.warmup` and `args.rep` milliseconds (estimated from five calls), each timed one after an L2 flush.
    In a dry run (the Triton interpreter) three timed calls: the numbers check the plumbing, not the speed."""
    if args.dry_run:
        m = measure(fn, warmup=0, reps=3, device="cpu", inspect=None)
    else:
        probe = measure(fn, warmup=0, reps=5, device="cuda", inspect=None, flush_l2=True)
        per_call = max(probe.timing.median_ms, 1e-3)
        m = measure(fn, warmup=max(1, round(args.warmup / per_call)), reps=max(1, round(args.rep / per_call)),
                    device="cuda", inspect=None, flush_l2=True)
    t = m.timing
    return {"ms": t.median_ms, "ms_p20": t.p20_ms, "ms_p80": t.p80_ms}


# ---------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------

def first_call(name: str, fn: Callable[..., Any], inputs: Sequence[Any]) -> Any:
    """fn(*inputs), or None (with a printed reason) when the backend cannot run this dtype / shape / GPU."""
    try:
        return fn(*inputs)
    except RuntimeError as e:
        print(f"  {name}: unavailable ({str(e).splitlines()[0][:120]})", flush=True)
        return None


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak allocated GiB of one call of fn beyond what was allocated before it (CUDA only, else None)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def _status_kb(field: str) -> int | None:
    """A field of /proc/self/status in KiB (Linux), None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PhasePeak:
    """Peak memory of one phase (`reset()` at its start, `peak_gib()` at its end): the CUDA allocator's peak
    on a GPU; on a CPU the process's peak RSS (VmHWM, reset per phase through /proc/self/clear_refs where
    Linux allows it, else the process-lifetime ru_maxrss, which only grows). `start_gib` is what was in use
    when the phase began (weights, inputs, kept outputs)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.how = "cuda_max_memory_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.start_gib = 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_gib = torch.cuda.memory_allocated(self.device) / 2**30
            return
        self.start_gib = (_status_kb("VmRSS") or 0) / 2**20
        try:  # "5" resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.how = "cpu_peak_rss(VmHWM, reset per phase)"
        except OSError:
            self.how = "cpu_peak_rss(ru_maxrss, process lifetime)"

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            sync(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        kb = _status_kb("VmHWM") if "VmHWM" in self.how else None
        if kb is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kb / 2**20


class AnonPeak:
    """The peak of this process's anonymous memory (RssAnon) over a `with` block, sampled every `interval`
    seconds by a thread. RSS would also count the touched file pages of memory-mapped weights (page cache
    the kernel can drop); anonymous memory is what a load or a decode really holds. `base_bytes` is the
    first sample, taken on entry."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.base_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _sample(self) -> int:
        kb = _status_kb("RssAnon")
        if kb is None:
            raise RuntimeError("AnonPeak needs Linux (/proc/self/status with RssAnon)")
        return kb * 1024

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> "AnonPeak":
        self.base_bytes = self.peak_bytes = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._sample())


# ---------------------------------------------------------------------------------------------------------
# The record: environment, datasheet peaks, JSON lines
# ---------------------------------------------------------------------------------------------------------

def dense_peaks(device_name: str | None) -> dict:
    """Datasheet dense peaks (TFLOP/s) for a device name; None where the device is not in the table."""
    name = (device_name or "").upper()
    for fragments, bf16, fp8 in _DENSE_PEAKS:
        if all(f in name for f in fragments):
            return dict(bf16=bf16, fp8=fp8, source="datasheet dense peak (perf-anchors.md §10)")
    return dict(bf16=None, fp8=None, source=f"no datasheet peak known for {device_name!r}")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(override: str | None = None) -> dict:
    """Commit of the checkout this package runs from (or cwd), whether tracked files differ from it, and a
    hash of that difference, so that a result names exactly the code that produced it."""
    for where in (REPO, Path.cwd()):
        commit = _run(["git", "rev-parse", "HEAD"], where)
        if commit:
            status = _run(["git", "status", "--porcelain", "--untracked-files=no"], where) or ""
            diff = _run(["git", "diff", "HEAD"], where) or ""
            return dict(commit=override or commit.strip(), dirty=bool(status.strip()),
                        diff_sha1=hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None)
    return dict(commit=override or os.environ.get("ANYID_RT_COMMIT"), dirty=None, diff_sha1=None,
                commit_source="--commit / ANYID_RT_COMMIT (no git checkout here)")


def environment(device: torch.device | str, commit: str | None = None) -> dict:
    """Where and with what a measurement was taken: date, host, versions, git state, load, device."""
    device = torch.device(device)
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               host=platform.node(), python=platform.python_version(), platform=platform.platform(),
               cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               torch=torch.__version__, cuda=torch.version.cuda, triton=_version("triton"),
               diffusers=_version("diffusers"), transformers=_version("transformers"), numpy=_version("numpy"),
               device=str(device), loadavg=[round(x, 2) for x in os.getloadavg()], **git_info(commit))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm",
                    "--format=csv,noheader"])
        if smi:
            parts = [p.strip() for p in smi.splitlines()[0].split(",")]
            env.update(smi_name=parts[0], driver=parts[1] if len(parts) > 1 else None,
                       power_limit=parts[2] if len(parts) > 2 else None,
                       max_sm_clock=parts[3] if len(parts) > 3 else None)
        else:
            env["driver"] = None
    else:
        env.update(device_name=f"cpu ({env['cpu']}, {env['cpu_count']} cores)", driver=None,
                   torch_threads=torch.get_num_threads(),
                   triton_interpret=os.environ.get("TRITON_INTERPRET") == "1")
    return env


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def append_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Append one JSON line per record (dtypes, devices and paths as strings, sets as sorted lists)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r, default=_json_default) + "\n")


# ---------------------------------------------------------------------------------------------------------
# The kernel scripts' command line
# ---------------------------------------------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=RESULTS,
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


def print_row(rec: dict, keys: tuple[str, ...]) -> None:
    print("  ".join(f"{k}={rec[k]:.4g}" if isinstance(rec.get(k), float) else f"{k}={rec.get(k)}" for k in keys),
          flush=True)
