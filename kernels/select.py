"""`backend="auto"`: each DiT op's implementation chosen by measurement, so never slower than the best available.

On CUDA, the first call of an op in a new *shape class* (the op with its arguments' shapes, dtypes and
layouts: self-attention at a request's token count, cross-attention over the 512 text keys, each norm at
its width) runs every candidate on that call's own inputs, checks its result against the torch reference
(`check`, the rule of ARCHITECTURE.md section 6), times the correct ones (`default_timer`: CUDA events,
median), keeps the fastest and logs the choice in one line. A wrong candidate is never chosen, however fast;
a shape class no candidate computes correctly is an error that names the fix. Choices are remembered on disk
(`cache_path()`, a JSON file) under a fingerprint of the setup (GPU name, driver, torch and triton
versions), so that a later process finds them instead of timing again.

Candidates (`candidates`): for attention our Triton kernel, SDPA restricted to its cuDNN, flash and
memory-efficient backends, and FlashAttention-3 where `flash_attn_interface` imports; for the norms and the
modulation our Triton kernels and the torch references, run eagerly, or under torch.compile when the model
is compiled. Attention candidates take and return [B, L, H, D] like `attention_ref` (SDPA gets transposed
views, and its output is made contiguous in that layout, so every candidate hands the next layer the same
thing and the timing includes any copy).

`AutoOp` is one such op in a `DiTOps`: after the first call of a shape class it costs one dict lookup on the
arguments' signature. On tensors of a device type it does not time (`timed_on`, CUDA by default) it runs
the torch reference: on a CPU, `auto` is torch.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..files import write_text_atomic
from . import SegmentMap
from . import attention as _attention
from . import modulation as _modulation
from . import norm as _norm

CACHE_ENV = "ANYID_RT_KERNEL_CHOICES"  # the choice file's path; set to "" to keep choices in memory only
CACHE_VERSION = 1
CHECK_ROWS = 256  # attention: query rows compared with the fp32 reference (all keys; rows are independent)

# the torch reference of every op of DiTOps: the spec, and the oracle of the correctness check
REFERENCES: dict[str, Callable] = {
    "attention": _attention.attention_ref,
    "layernorm_modulate": _modulation.layernorm_modulate_ref,
    "gated_residual": _modulation.gated_residual_ref,
    "rms_norm": _norm.rms_norm_ref,
    "rms_norm_rope": _norm.rms_norm_rope_ref,
    "layer_norm": _norm.layer_norm_ref,
}
TRITON: dict[str, Callable] = {
    "attention": _attention.attention,
    "layernorm_modulate": _modulation.layernorm_modulate,
    "gated_residual": _modulation.gated_residual,
    "rms_norm": _norm.rms_norm,
    "rms_norm_rope": _norm.rms_norm_rope,
    "layer_norm": _norm.layer_norm,
}
SDPA_BACKENDS = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}

Timer = Callable[[Callable[[], object], torch.device], float]  # (one call, device) -> median milliseconds


# ---------------------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------------------

def _sdpa(backend: SDPBackend) -> Callable:
    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):  # only this backend: one that cannot run the call raises
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous()  # [B, Lq, H, D], as the Triton kernel returns it

    sdpa.__qualname__ = sdpa.__name__ = f"sdpa_{backend.name.lower()}"
    return sdpa


@cache
def _fa3() -> tuple[Callable | None, str | None]:
    """FlashAttention-3's function, or why it is not available."""
    try:
        import flash_attn_interface
    except Exception as e:  # noqa: BLE001 - ImportError, or a binary that does not load on this machine
        return None, f"flash_attn_interface does not import ({type(e).__name__}: {_first_line(e)})"

    def fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = flash_attn_interface.flash_attn_func(q, k, v)  # [B, L, H, D] in and out, like ours
        return out[0] if isinstance(out, tuple) else out  # some releases also return the LSE

    return fa3, None


def candidates(op: str, compiled: bool = False) -> dict[str, Callable]:
    """The implementations of `op` that `auto` chooses among (those that can be called here at all).
    `compiled`: the model runs under torch.compile, so the norms' torch candidate is their compiled
    reference, which is what Inductor would make of that code in the model."""
    if op not in REFERENCES:
        raise ValueError(f"unknown op {op!r}; one of {list(REFERENCES)}")
    if op == "attention":
        out = {"triton": _attention.attention} | {name: _sdpa(b) for name, b in SDPA_BACKENDS.items()}
        fa3, _ = _fa3()
        return out | ({"fa3": fa3} if fa3 is not None else {})
    if compiled:
        return {"triton": TRITON[op], "torch-compile": torch.compile(REFERENCES[op], dynamic=False)}
    return {"triton": TRITON[op], "torch": REFERENCES[op]}


def unavailable(op: str) -> dict[str, str]:
    """Candidates of `op` that cannot be called in this process, with the reason (for the log)."""
    if op != "attention":
        return {}
    _, why = _fa3()
    return {} if why is None else {"fa3": why}


# ---------------------------------------------------------------------------------------------------------
# Shape classes
# ---------------------------------------------------------------------------------------------------------

def signature(x: Any) -> Any:
    """A hashable key of call arguments: each tensor's shape, dtype, strides and device; a segment map's
    number of segments; other values as they are (eps, head counts, an output dtype)."""
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.stride(), x.device)
    if isinstance(x, SegmentMap):
        return ("segments", None if x.lens is None else len(x.lens))
    if isinstance(x, (tuple, list)):
        return tuple(signature(a) for a in x)
    return x


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        text = f"{str(x.dtype).removeprefix('torch.')}[{','.join(map(str, x.shape))}]"
        return text if x.is_contiguous() else f"{text}/stride({','.join(map(str, x.stride()))})"
    if isinstance(x, SegmentMap):
        return f"segments:{'?' if x.lens is None else len(x.lens)}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(a) for a in x) + ")"
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return repr(x)


def shape_class(op: str, args: tuple) -> str:
    """The text key of a call in the choice file, e.g. `attention(bfloat16[2,27280,24,128], ...)`; strides
    appear for non-contiguous views."""
    return f"{op}({', '.join(_describe(a) for a in args)})"


def _device_of(args: tuple) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise TypeError("an op call without tensor arguments")


# ---------------------------------------------------------------------------------------------------------
# Correctness: ARCHITECTURE.md section 6
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    ok: bool
    error: float  # max |out - reference in fp32|
    bound: float
    reason: str | None = None


def dense(out: Any) -> Any:
    """An op's output as one tensor: E4M3 rows with scales (kernels.fp8_quant.FP8Rows) dequantised."""
    if isinstance(out, torch.Tensor) or not hasattr(out, "dequantize"):
        return out
    return out.dequantize()


def calibrated_bound(ref32: torch.Tensor, ref_low: torch.Tensor, factor: float = 2.0,
                     rel_floor: float = 1e-5) -> tuple[float, float, float]:
    """(bound, max|ref_low - ref32|, atol) of the calibrated rule below; the tests' `assert_calibrated` uses it
    too, so kernel selection and the test suite hold kernels to one rule."""
    if ref32.numel() == 0:
        return 0.0, 0.0, 0.0
    ref = ref32.float()
    low_err = (ref_low.float() - ref).abs().max().item() if ref_low.numel() else 0.0
    noise = ((ref + 0.3 - 0.3) - ref).abs().max().item()
    atol = max(noise, rel_floor * max(1.0, ref.abs().max().item()))
    return factor * low_err + atol, low_err, atol


def check(out: Any, ref32: torch.Tensor, ref_low: Any, factor: float = 2.0, rel_floor: float = 1e-5) -> Verdict:
    """The project's calibrated rule: max|out - ref32| <= factor * max|ref_low - ref32| + atol, where ref32
    is the torch reference on fp32 copies of the inputs and ref_low the same reference at the inputs'
    precision. atol is the rounding noise of a trivial fp32 operation on ref32 ((r + 0.3 - 0.3) - r) or, if
    larger, rel_floor * max(1, max|ref32|). A non-finite output fails (the comparison is False for NaN)."""
    out, ref_low = dense(out), dense(ref_low)
    if not isinstance(out, torch.Tensor):
        return Verdict(False, float("inf"), 0.0, f"returned {type(out).__name__}, not a tensor")
    if out.shape != ref32.shape:
        return Verdict(False, float("inf"), 0.0, f"shape {tuple(out.shape)} != reference {tuple(ref32.shape)}")
    if out.numel() == 0:
        return Verdict(True, 0.0, 0.0)
    # differences in fp32 are exact for nearby values (Sterbenz); distant ones are far over any bound anyway
    err = (out.float() - ref32.float()).abs().max().item()
    bound, low_err, atol = calibrated_bound(ref32, ref_low, factor, rel_floor)
    if err <= bound:
        return Verdict(True, err, bound)
    return Verdict(False, err, bound, f"max error {err:.3g} > bound {bound:.3g} ({factor:g} x the torch "
                                      f"reference's own {low_err:.3g} + {atol:.3g})")


@dataclass(frozen=True)
class Oracle:
    """What candidates are compared with on one call: the reference in fp32 and at the inputs' precision,
    over all elements, or (attention) over `rows`, a spread of query rows against all keys."""

    fp32: torch.Tensor
    low: Any
    rows: torch.Tensor | None = None

    def pick(self, out: Any) -> Any:
        """The compared elements of a candidate's output."""
        return out if self.rows is None else out[:, self.rows]


def _upcast(x: Any) -> Any:
    """Arguments for the fp32 reference: float tensors in fp32, an output dtype argument fp32."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, torch.dtype):
        return torch.float32
    if isinstance(x, (tuple, list)):
        return type(x)(_upcast(a) for a in x)
    return x


def oracle(op: str, args: tuple) -> Oracle:
    ref = REFERENCES[op]
    rows = None
    if op == "attention":  # the fp32 reference over every query would hold O(L^2) memory on some backends
        q, k, v = args
        n = q.shape[1]
        rows = torch.linspace(0, n - 1, min(n, CHECK_ROWS), device=q.device).round().long().unique()
        args = (q[:, rows], k, v)  # evenly spread, first and last (a masked tail) included; no RNG drawn
    with torch.no_grad():
        return Oracle(ref(*_upcast(args)), ref(*args), rows)


# ---------------------------------------------------------------------------------------------------------
# Timing and the setup's fingerprint
# ---------------------------------------------------------------------------------------------------------

def default_timer(fn: Callable[[], object], device: torch.device, budget_ms: float = 100.0,
                  max_reps: int = 50) -> float:
    """Median milliseconds of `fn`: one untimed call, then about `budget_ms` of timed calls (3 to
    `max_reps`), each between CUDA events (a host clock around synchronised calls elsewhere)."""
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    fn()
    sync()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        one = start.elapsed_time(end)
        reps = max(3, min(max_reps, int(budget_ms / max(one, 1e-3))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in events:
            s.record()
            fn()
            e.record()
        sync()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        times = []
        while len(times) < 3 or (sum(times) < budget_ms and len(times) < max_reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


@cache
def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    api = getattr(torch._C, "_cuda_getDriverVersion", None)  # the driver's CUDA API version, e.g. 12080
    return f"cuda-api {api()}" if api is not None else "unknown"


def device_fingerprint(device: torch.device) -> str:
    """What a timing holds for: the GPU's name, the driver, torch and triton (the processor on a CPU)."""
    versions = f"torch {torch.__version__} | triton {_version('triton')}"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} | driver {_driver_version()} | {versions}"
    return f"{device.type} {platform.processor() or platform.machine()} | {versions}"


def cache_path() -> Path | None:
    """$ANYID_RT_KERNEL_CHOICES ("" for none), else $XDG_CACHE_HOME (~/.cache) /anyid_rt/kernel_choices.json."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "anyid_rt" / "kernel_choices.json"


# ---------------------------------------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Choice:
    """The implementation of one op for one shape class on one setup, and the evidence for it."""

    op: str
    shape_class: str
    fingerprint: str
    name: str  # the chosen candidate
    ms: dict[str, float]  # median milliseconds of every correct candidate
    rejected: dict[str, str]  # candidate -> why not: a wrong result, an error, not importable
    candidates: tuple[str, ...]  # the names considered, sorted
    date: str
    source: str = "timed"  # "timed" here, or read from the choice file

    def record(self) -> dict:
        """The choice file's entry."""
        return dict(choice=self.name, ms={k: round(v, 4) for k, v in self.ms.items()}, rejected=self.rejected,
                    candidates=list(self.candidates), date=self.date)

    def line(self) -> str:
        others = ", ".join(f"{k} {v:.3g}" for k, v in sorted(self.ms.items(), key=lambda kv: kv[1]) if k != self.name)
        rejected = "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        detail = f"{self.ms[self.name]:.3g} ms" + (f"; {others} ms" if others else "") + \
            (f"; not chosen: {rejected}" if rejected else "")
        return (f"anyid_rt.kernels: {self.shape_class} on {self.fingerprint.split(' | ')[0]}: {self.name} "
                f"({detail}) [{self.source}]")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else "")[:120]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Selector:
    """Chooses, for each (setup, shape class), the fastest correct candidate; remembers choices in memory
    and in the JSON file `cache_path` (None: memory only). `timer`, `fingerprint` and `log` are the
    measurements and the output, replaceable (tests inject fake timings)."""

    def __init__(self, cache_path: Path | None = None, *, timer: Timer = default_timer,
                 fingerprint: Callable[[torch.device], str] = device_fingerprint,
                 log: Callable[[str], None] = _stderr):
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.timer, self.fingerprint, self.log = timer, fingerprint, log
        self.memo: dict[tuple[str, str], Choice] = {}
        self._file: dict | None = None  # the file's choices, read at the first decision

    def choose(self, op: str, impls: Mapping[str, Callable], args: tuple,
               not_available: Mapping[str, str] | None = None) -> Choice:
        """The choice for `op` called with `args` among `impls` (name -> callable), from memory, the file,
        or measured on these arguments. Raises if no candidate computes this call correctly."""
        device = _device_of(args)
        fp, sc, names = self.fingerprint(device), shape_class(op, args), tuple(sorted(impls))
        known = self.memo.get((fp, sc))
        if known is not None and known.candidates == names:
            return known
        choice = self._from_file(op, fp, sc, names)
        if choice is None:
            choice = self._measure(op, impls, args, device, fp, sc, names, not_available or {})
            if self._save(choice):
                choice = replace(choice, source=f"timed, saved to {self.cache_path}")
        self.memo[fp, sc] = choice
        self.log(choice.line())
        return choice

    # -- the file ---------------------------------------------------------------------------------------
    def _read(self) -> tuple[dict, str | None]:
        """(the file's choices, or {}; why it could not be used, if it exists and cannot)."""
        if self.cache_path is None or not self.cache_path.exists():
            return {}, None
        try:
            data = json.loads(self.cache_path.read_text())
            if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION
                    and isinstance(data.get("choices"), dict)):
                raise ValueError(f"not a version-{CACHE_VERSION} kernel choice file")
            return data["choices"], None
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            return {}, f"{type(e).__name__}: {_first_line(e)}"

    def _from_file(self, op: str, fp: str, sc: str, names: tuple[str, ...]) -> Choice | None:
        if self._file is None:
            self._file, problem = self._read()
            if problem:
                self.log(f"anyid_rt.kernels: the kernel choice file {self.cache_path} is unreadable ({problem}); "
                         "timing again and rewriting it")
        entry = self._file.get(fp, {}).get(sc) if isinstance(self._file.get(fp), dict) else None
        if not isinstance(entry, dict):
            return None
        try:
            choice = Choice(op, sc, fp, str(entry["choice"]), {k: float(v) for k, v in entry["ms"].items()},
                            {k: str(v) for k, v in entry.get("rejected", {}).items()},
                            tuple(sorted(entry["candidates"])), str(entry.get("date", "")),
                            f"from {self.cache_path}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self.log(f"anyid_rt.kernels: a malformed entry for {sc} in {self.cache_path} ({type(e).__name__}: "
                     f"{_first_line(e)}); timing again")
            return None
        # timed among other candidates (a package installed or removed since): time again
        if choice.candidates != names or choice.name not in names or choice.name not in choice.ms:
            return None
        return choice

    def _save(self, choice: Choice) -> bool:
        """Add `choice` to the file (atomically); False if there is no file or it cannot be written."""
        if self.cache_path is None:
            return False
        choices, _ = self._read()  # re-read: keep what other processes wrote meanwhile
        if not isinstance(choices.get(choice.fingerprint), dict):
            choices[choice.fingerprint] = {}
        choices[choice.fingerprint][choice.shape_class] = choice.record()
        try:
            write_text_atomic(self.cache_path, json.dumps({"version": CACHE_VERSION, "choices": choices},
                                                          indent=1, sort_keys=True) + "\n")
        except OSError as e:
            self.log(f"anyid_rt.kernels: cannot write the kernel choice file {self.cache_path} ({e}); the choice "
                     "holds for this process only")
            return False
        self._file = choices
        return True

    # -- measuring -----------------------------------------------------------------------------------------
    def _measure(self, op: str, impls: Mapping[str, Callable], args: tuple, device: torch.device, fp: str, sc: str,
                 names: tuple[str, ...], not_available: Mapping[str, str]) -> Choice:
        ms: dict[str, float] = {}
        rejected = dict(not_available)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA warns about every backend it cannot use; the reason is kept
            ref = oracle(op, args)
            for name, fn in impls.items():
                try:
                    verdict = check(ref.pick(fn(*args)), ref.fp32, ref.low)  # also the untimed first call
                    if not verdict.ok:
                        rejected[name] = f"wrong result: {verdict.reason}"
                        continue
                    ms[name] = float(self.timer(lambda fn=fn: fn(*args), device))
                except Exception as e:  # noqa: BLE001 - a candidate that cannot run this call is not chosen
                    rejected[name] = f"{type(e).__name__}: {_first_line(e)}"
        if not ms:
            raise RuntimeError(f"no implementation computes {sc} correctly on {fp}: "
                               + "; ".join(f"{k}: {v}" for k, v in rejected.items())
                               + ". Use backend='torch' (the references) and report this")
        best = min(ms, key=ms.__getitem__)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return Choice(op, sc, fp, best, ms, rejected, names, date)


_default: Selector | None = None


def default_selector() -> Selector:
    """The process's selector, shared by every model (choices are per setup and shape, not per model)."""
    global _default
    if _default is None:
        _default = Selector(cache_path())
    return _default


# ---------------------------------------------------------------------------------------------------------
# The op in DiTOps
# ---------------------------------------------------------------------------------------------------------

@dataclass(eq=False, repr=False)
class AutoOp:
    """One op of `DiTOps` under backend="auto": calls the candidate chosen for the arguments' shape class,
    deciding at the first call of each class. Positional arguments, as the DiT calls its ops."""

    op: str
    impls: dict[str, Callable]
    selector: Selector | None = None  # None: default_selector(), looked up at the first decision
    not_available: dict[str, str] = field(default_factory=dict)
    timed_on: tuple[str, ...] = ("cuda",)  # device types whose calls are timed; elsewhere the torch reference
    chosen: dict[Any, Callable] = field(default_factory=dict)  # signature -> implementation
    choices: dict[Any, Choice] = field(default_factory=dict)  # signature -> the evidence (timed devices)

    def __repr__(self) -> str:
        chosen = sorted({c.shape_class: c.name for c in self.choices.values()}.items())
        return f"AutoOp({self.op}: {' | '.join(self.impls)}; chosen {dict(chosen)})"

    def __call__(self, *args):
        key = signature(args)
        fn = self.chosen.get(key)
        if fn is None:
            if _device_of(args).type not in self.timed_on:  # nothing to decide: no graph break under compile
                return REFERENCES[self.op](*args)
            fn = self._decide(key, args)
        return fn(*args)

    # Under torch.compile the decision is a graph break at the first call of a shape class (it runs the
    # candidates eagerly); the recompile that follows finds the choice and traces straight into it.
    @torch.compiler.disable
    def _decide(self, key: Any, args: tuple) -> Callable:
        choice = (self.selector or default_selector()).choose(self.op, self.impls, args, self.not_available)
        self.choices[key] = choice
        self.chosen[key] = fn = self.impls[choice.name]
        return fn


def on_cuda(cuda_fn: Callable, other_fn: Callable) -> Callable:
    """An op with one implementation per device kind: `cuda_fn` on CUDA tensors, `other_fn` elsewhere (the
    8-bit attention under `auto`: the Triton kernel is its only GPU implementation, the emulation the CPU one)."""
    def op(*args):
        return (cuda_fn if _device_of(args).type == "cuda" else other_fn)(*args)

    return op
