"""The GPU truth in one command: every number this project needs from a GPU, measured in one process.

    python3 bench/gpu_validate.py --out DIR [--budget 390] [--only attention,dit] [--dry-run]

No installs and nothing carried: on a checkout that is not pip-installed, setup.py's package mapping
(anyid_rt.kernels -> kernels/, ...) is rebuilt in-process. Sections run in priority order under a wall-clock
budget counted from the process start: a section whose estimated cost would end past the budget is recorded
as skipped, one that fails is recorded with its traceback and the next one runs, and a watchdog ends the
process, recording why, if a section overruns the budget by --grace seconds. Exactly two files are written:
DIR/gpu_validate.json (rewritten atomically after every section and inside the long ones) and
DIR/gpu_validate.log. A summary is printed last; the exit status is 1 if a section failed, 3 if the
watchdog ended the run. The defaults (--budget 390, --grace 30) bound a run to 7 minutes.

  env                 device, versions, measured ceilings: bf16 8192^3 matmul TFLOP/s, 2 GB device copy GB/s
  norms               the norm and modulation kernels at [2, 27280, 3072] as the DiT calls them: error against
                      fp32 (the calibrated rule), every output element written, GB/s against the copy, `auto`
  attention           B=2 H=24 D=128, self (27,280 keys) and cross (512 text keys): every candidate's error
                      and TFLOP/s, the tuned Triton config, the `auto` choice
  dit                 the 5B DiT, random weights, batch 2, 27,280 tokens: s/forward, TFLOP/s, peak memory and
                      error against the torch backend for torch (SDPA default), auto, triton, torch + cuDNN
  dit_compiled        the same under anyid_rt.compiled.compile_dit_: auto, then triton and torch + cuDNN
  fp8                 the block linears at M = 54,560 (bf16, FP8Linear, quantiser, _scaled_mm alone), the DiT
                      after quantize_dit_fp8_
  attention_8bit      INT8 QK / FP8 PV at the self-attention shape: kernel vs emulation, cosine, TFLOP/s
  vae                 decode of a 121-frame 1280x704 video, fp32 / bf16, untiled / tiled: seconds, peak
                      memory, PSNR of bf16 against fp32
  attention_backward  TFLOP/s (2.5x convention) and gradient error of every candidate
  long                58,080 tokens: the attention candidates, one `auto` DiT forward
  gpu_tests           `pytest -m gpu` on --tests (default: the norm and modulation tests), in this process

`--dry-run` runs every section at toy sizes on the CPU (Triton interpreter); tests/test_gpu_validate.py
does so in `make test`, so that the script cannot rot. The predictions to compare with are in
shared/reference/gpu-readiness.md (sections 1.9, 3 and 4).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.abc
import importlib.util
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

START = time.monotonic()
REPO = Path(__file__).resolve().parent.parent
MAPPED = {"anyid_rt.kernels": "kernels", "anyid_rt.export": "export", "anyid_rt.trainer": "trainer",
          "anyid_rt.bench": "bench"}  # setup.py's package_dir


class _Checkout(importlib.abc.MetaPathFinder):
    """setup.py's package mapping for a checkout that is not installed (the GPU machines: no pip)."""

    def find_spec(self, name, _path=None, _target=None):
        folder = MAPPED.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, REPO / folder / "__init__.py",
                                                      submodule_search_locations=[str(REPO / folder)])


def ensure_package() -> str:
    try:
        import anyid_rt.bench  # noqa: F401
        import anyid_rt.kernels  # noqa: F401
        return "installed"
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO))
        sys.meta_path.insert(0, _Checkout())
        import anyid_rt.kernels  # noqa: F401
        return f"mapped from the checkout {REPO}"


class Report:
    """The JSON document, the log file and the summary; the watchdog thread may finish it too."""

    def __init__(self, out: Path, args: argparse.Namespace, names: list[str]):
        self.json_path, self.log_path = out / "gpu_validate.json", out / "gpu_validate.log"
        self.lock = threading.RLock()
        self.log_file = self.log_path.open("w", buffering=1)
        self.current: str | None = None  # the section running now
        self.done = False
        self.doc = dict(tool="bench/gpu_validate.py", argv=sys.argv[1:], dry_run=args.dry_run, budget_s=args.budget,
                        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        finished=None, elapsed_s=None, sections={n: dict(status="pending") for n in names}, summary=[])

    def log(self, msg: str) -> None:
        with self.lock:
            for line in str(msg).rstrip("\n").splitlines() or [""]:
                line = f"[{time.monotonic() - START:7.1f} s] {line}"
                print(line, flush=True)
                self.log_file.write(line + "\n")

    def flush(self) -> None:
        from anyid_rt.files import write_text_atomic

        with self.lock:
            self.doc["elapsed_s"] = round(time.monotonic() - START, 2)
            write_text_atomic(self.json_path, json.dumps(self.doc, indent=1, default=str) + "\n")

    def finish(self) -> bool:
        """Write the summary (JSON, log, stdout, last); True if a section failed."""
        with self.lock:
            if self.done:
                return False
            self.done = True
            secs = self.doc["sections"]
            lines = [f"{name:<19} {s['status']:<8} {s.get('seconds', 0.0):6.1f} s  "
                     f"{s.get('headline') or s.get('reason', '')}" for name, s in secs.items()]
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            self.doc.update(summary=lines, finished=now)
            self.flush()
            self.log(f"=== gpu_validate summary: {self.doc['elapsed_s']:.0f} s of a {self.doc['budget_s']:.0f} s "
                     f"budget; {self.json_path.name} and {self.log_path.name} in {self.json_path.parent} ===")
            for line in lines:
                self.log(line)
            self.log_file.close()
            return any(s["status"] == "failed" for s in secs.values())


def watchdog(report: Report, deadline_s: float, grace_s: float) -> threading.Timer:
    """End the process at `deadline_s` after its start if a section is still running, recording why."""
    def fire() -> None:
        with report.lock:
            if report.done:
                return
            why = f"still running {grace_s:.0f} s past the budget: the watchdog ended the process"
            if report.current:
                report.doc["sections"][report.current].update(status="failed", reason=why)
            for sec in report.doc["sections"].values():
                if sec["status"] == "pending":
                    sec.update(status="skipped", reason="not reached: " + why)
            report.finish()
        os._exit(3)

    timer = threading.Timer(max(0.0, deadline_s - (time.monotonic() - START)), fire)
    timer.daemon = True
    timer.start()
    return timer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_validate.json and gpu_validate.log")
    p.add_argument("--budget", type=float, default=390.0,
                   help="seconds from the process start; a section estimated to end later is skipped (default 390)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds past the budget after which a still running section is ended (default 30: "
                        "7 minutes in all)")
    p.add_argument("--only", default=None, help="comma-separated section names to run; the others are skipped")
    p.add_argument("--tests", default="tests/test_norm.py,tests/test_modulation.py",
                   help="test files of the gpu_tests section (pytest -m gpu), relative to the checkout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU under the Triton interpreter")
    return p.parse_args(argv)


def run_sections(ctx, report: Report, sections, only: set[str] | None) -> None:
    import gc

    import torch

    from anyid_rt.bench import gpu_validate_sections as S

    for name, fn, est_gpu, est_dry in sections:
        sec = report.doc["sections"][name]
        est = est_dry if ctx.dry else est_gpu
        why = "not selected (--only)" if only is not None and name not in only else ctx.budget.why_not(est)
        if why:
            sec.update(status="skipped", reason=why, estimate_s=est)
            report.log(f"{name}: skipped ({why})")
            report.flush()
            continue
        rec: dict = {}
        sec.update(status="running", estimate_s=est, result=rec)
        report.current = name
        report.flush()
        report.log(f"{name}: start (estimate {est} s)")
        t0 = time.monotonic()
        try:
            sec.update(status="ok", headline=fn(ctx, rec))
        except S.NotAvailable as e:
            sec.update(status="skipped", reason=f"not available: {e}")
        except S.CheckFailed as e:
            sec.update(status="failed", reason=f"check failed: {e}")
        except Exception as e:  # noqa: BLE001 - recorded with its traceback; the next section runs
            sec.update(status="failed", reason=f"{type(e).__name__}: {str(e).strip()[:500]}",
                       traceback=traceback.format_exc())
        sec["seconds"] = round(time.monotonic() - t0, 2)
        report.current = None
        report.log(f"{name}: {sec['status']} in {sec['seconds']:.1f} s: {sec.get('headline') or sec.get('reason')}")
        if "traceback" in sec:
            report.log(sec["traceback"])
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        report.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:  # the interpreter must be chosen before triton is imported
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("triton was imported before --dry-run could set TRITON_INTERPRET=1")
        os.environ["TRITON_INTERPRET"] = "1"
    package = ensure_package()
    import torch

    from anyid_rt.bench import gpu_validate_sections as S
    from anyid_rt.kernels.select import Selector

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_validate: no CUDA device here; --dry-run runs the sections at toy sizes on the CPU", file=sys.stderr)
        return 2
    names = [s[0] for s in S.SECTIONS]
    only = None if args.only is None else set(args.only.split(","))
    if only is not None and only - set(names):
        print(f"gpu_validate: unknown sections {sorted(only - set(names))}; choose from {names}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, args, names)
    ctx = S.Ctx(args, torch.device("cpu" if args.dry_run else "cuda"), S.Budget(args.budget, START), report.log,
                report.flush, shared=dict(package=package))
    # memory only: every candidate is timed afresh by the harness, and each choice is logged here
    ctx.selector = Selector(None, timer=ctx.timer, log=report.log)
    torch.manual_seed(args.seed)
    report.log(f"gpu_validate: {len(names)} sections, budget {args.budget:.0f} s, package {package}")
    dog = watchdog(report, args.budget + args.grace, args.grace)
    run_sections(ctx, report, S.SECTIONS, only)
    dog.cancel()
    return 1 if report.finish() else 0


if __name__ == "__main__":
    sys.exit(main())
