"""Compile the Triton kernels for a GPU that is not here, and report what ptxas says about each config.

A config that needs more shared memory than the GPU has fails only when it is launched, and one that
spills registers to local memory runs slowly; ptxas answers both questions without a GPU. This module
points Triton at a chosen architecture (a stand-in for its CUDA driver), turns every kernel launch into a
compilation (every config of an autotuned kernel), and runs the DiT's own forward and backward at the 5B
widths with one block on CPU tensors: so each kernel is compiled with the arguments, constexprs and
integer specialisations that production uses. Nothing is launched; the outputs are garbage and only the
compiled kernels matter. Per kernel and config it records shared memory (against the architecture's
per-block limit), registers, spilled bytes, the tensor-core instructions in the PTX (wgmma / mma, their
operand types) and how many programs fit on one SM.

    python -m anyid_rt.bench.cross_compile --arch 80 89 90 [--dtype bf16] [--out bench/results]
    python bench/cross_compile.py ...                   (the same)

Needs a process without TRITON_INTERPRET (the interpreter replaces the kernels at import). The numbers are
this machine's Triton's (`triton.__version__` is in each record); a GPU machine with another Triton may
allocate differently, and none of this replaces timing the kernels there (bench/gpu_validate.py).

A tool, not runtime: the kernels know nothing of it. Inside `compile_only` it replaces, for its duration, the
two launch-path functions that ask which GPU runs a kernel (`kernels._utils.device_capability`, which picks
configs and instructions, and `check_triton_device`, which refuses CPU tensors) wherever a kernel module
bound them, and puts them back on exit.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from unittest import mock

import torch
import triton

from anyid_rt.bench.timing import environment
from anyid_rt.config import DiTConfig, parse_dtype
from anyid_rt.kernels import _utils, attention, attention_8bit, modulation, norm
from anyid_rt.models.dit import Segments
from anyid_rt.models.random_weights import random_dit

KERNEL_MODULES = (attention, attention_8bit, modulation, norm)

# Largest dynamic shared memory one program may use (cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes), what
# Triton compares a compiled kernel's `shared` with before launching it: A100, RTX 30xx / A10, RTX 40xx / L4 /
# L40S, H100 / H200.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
SHARED_PER_SM = {80: 167_936, 86: 102_400, 89: 102_400, 90: 233_472}  # what co-resident programs share
REGISTERS_PER_SM = 65_536
MAX_PROGRAMS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
GPU_NAMES = {80: "A100", 86: "RTX 30xx / A10", 89: "L40S / RTX 40xx", 90: "H100 / H200"}


@dataclass
class CompiledConfig:
    """One kernel compiled for one architecture with one config."""

    kernel: str
    arch: int
    cases: list[str]  # the exercises (forward, backward, 8-bit attention) that launched it
    constants: dict  # BLOCK_* and the other constexprs that shape the kernel
    num_warps: int
    num_stages: int
    shared_bytes: int = 0
    registers: int = 0
    spill_stores: int = 0  # bytes per thread, from ptxas -v
    spill_loads: int = 0
    stack_bytes: int = 0
    mma: list[str] = field(default_factory=list)  # tensor-core instructions in the PTX, e.g. wgmma.f32.bf16.bf16
    fits_shared: bool = True
    programs_per_sm: int = 0
    error: str | None = None

    def row(self) -> str:
        blocks = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in self.constants.items()
                          if k.startswith("BLOCK"))
        flags = " ".join(k for k, v in self.constants.items() if v is True) or "-"
        config = f"| {self.kernel} | {flags} | sm{self.arch} | {blocks} | {self.num_warps} | {self.num_stages} |"
        if self.error:
            return f"{config} error: {self.error.splitlines()[0][:80]} | | | | |"
        mma = ", ".join(self.mma) or "-"
        shared = f"{self.shared_bytes / 1024:.0f} KB" + ("" if self.fits_shared else " (too much)")
        return f"{config} {shared} | {self.registers} | {self.spill_stores} | {self.programs_per_sm} | {mma} |"


class _StandInDriver:
    """What Triton's JIT asks of its active driver before compiling: the target, a device, a stream."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_MMA = re.compile(r"\b(wgmma\.mma_async|mma)\.sync\.aligned\.(m\d+n\d+k\d+)((?:\.\w+)+)")


def _mma_kinds(ptx: str) -> list[str]:
    """Distinct tensor-core instructions, e.g. 'wgmma m64n128k16 f32.bf16.bf16', 'mma m16n8k32 s32.s8.s8.s32'."""
    kinds = set()
    for op, shape, types in _MMA.findall(ptx):
        types = types.removeprefix(".row.col")
        kinds.add(f"{op.split('.')[0]} {shape} {types.strip('.')}")
    return sorted(kinds)


def _programs_per_sm(arch: int, shared: int, registers: int, num_warps: int) -> int:
    by_shared = SHARED_PER_SM[arch] // max(shared + 1024, 1)  # the driver reserves 1 KB per program
    # registers are allocated per warp in units of 256
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (regs_per_warp * num_warps)
    return max(0, min(by_shared, by_registers, MAX_PROGRAMS_PER_SM[arch]))


class _Recorder:
    def __init__(self, arch: int):
        self.arch = arch
        self.case = ""
        self.by_hash: dict[str, CompiledConfig] = {}
        self.failures: list[CompiledConfig] = []

    def compile(self, jit_fn, run, args, kwargs) -> None:
        """Compile one (kernel, config) through the JIT's own argument binding, capturing ptxas' log."""
        name = jit_fn.fn.__name__
        constants = {k: v for k, v in kwargs.items() if k.isupper()}
        num_warps, num_stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                kernel = run(jit_fn, *args, grid=None, warmup=True, **kwargs)
        except Exception as e:  # a config that does not compile is a finding, not a reason to stop
            self.failures.append(CompiledConfig(name, self.arch, [self.case], constants, num_warps, num_stages,
                                                error=f"{type(e).__name__}: {e}"))
            return
        if kernel.hash in self.by_hash:
            rec = self.by_hash[kernel.hash]
            if self.case not in rec.cases:
                rec.cases.append(self.case)
            return
        md = kernel.metadata
        rec = CompiledConfig(name, self.arch, [self.case], constants, md.num_warps, md.num_stages,
                             shared_bytes=md.shared, mma=_mma_kinds(kernel.asm["ptx"]))
        text = log.getvalue()
        if m := _PTXAS_REGISTERS.search(text):
            rec.registers = int(m.group(1))
        if m := _PTXAS_SPILLS.search(text):
            rec.stack_bytes, rec.spill_stores, rec.spill_loads = (int(g) for g in m.groups())
        rec.fits_shared = md.shared <= SHARED_LIMIT[self.arch]
        rec.programs_per_sm = _programs_per_sm(self.arch, md.shared, rec.registers, md.num_warps) \
            if rec.fits_shared else 0
        self.by_hash[kernel.hash] = rec

    def records(self) -> list[CompiledConfig]:
        return list(self.by_hash.values()) + self.failures


@contextlib.contextmanager
def launch_checks_for(capability: tuple[int, int]):
    """Within: every kernel module's `device_capability` answers `capability` for any device and its
    `check_triton_device` accepts CPU tensors, so that the launchers take the CPU tensors of the exercises
    and pick the configs of that GPU. Each binding is restored on exit (mock.patch.object)."""
    replacements = {_utils.device_capability: lambda device: capability,
                    _utils.check_triton_device: lambda t: None}
    with contextlib.ExitStack() as stack:
        for module in (_utils, *KERNEL_MODULES):
            for name, value in list(vars(module).items()):
                for original, replacement in replacements.items():
                    if value is original:
                        stack.enter_context(mock.patch.object(module, name, replacement))
        yield


@contextlib.contextmanager
def compile_only(arch: int):
    """Within: Triton compiles for sm`arch` and launches nothing; the launchers accept CPU tensors.

    Yields a recorder whose `records()` are the compiled kernels. Not thread-safe (it patches Triton's
    launch entry points for the duration)."""
    if arch not in SHARED_LIMIT:
        raise ValueError(f"arch {arch} is not one of {sorted(SHARED_LIMIT)} (sm80 A100, sm86/sm89 Ampere/Ada "
                         "consumer and L-series, sm90 H100/H200)")
    if _utils.INTERPRET:
        raise RuntimeError("cross-compiling needs the real Triton compiler: run it in a process without "
                           "TRITON_INTERPRET=1 (the interpreter replaced the kernels when triton was imported)")
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    recorder = _Recorder(arch)
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def compile_launch(self, *args, grid, warmup, **kwargs):
        recorder.compile(self, jit_run, args, kwargs)

    def compile_every_config(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            recorder.compile(self.fn, jit_run, args, {**kwargs, **config.all_kwargs()})

    saved_driver = driver._active
    saved_knobs = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    caches = _jit_functions()
    try:
        with launch_checks_for((arch // 10, arch % 10)):
            driver.set_active(_StandInDriver(arch))
            knobs.nvidia.dump_ptxas_log = True  # ptxas runs with -v; its log carries registers and spills
            knobs.compilation.always_compile = True  # a cached binary would come without that log
            JITFunction.run, Autotuner.run = compile_launch, compile_every_config
            for fn in caches:  # binders hold the target they were made for
                fn.device_caches.clear()
            yield recorder
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        driver._active = saved_driver
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved_knobs
        for fn in caches:
            fn.device_caches.clear()


def _jit_functions() -> list:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    found = []
    for module in KERNEL_MODULES:
        for obj in vars(module).values():
            fn = obj.fn if isinstance(obj, Autotuner) else obj
            if isinstance(fn, JITFunction) and fn not in found:
                found.append(fn)
    return found


# ----------------------------------------------------------------------------------------------------------
# The exercises: the DiT at the 5B widths with one block (so every constexpr is production's), a batch of 2
# (guidance), a target group of 2x4x4 latent patches and a 1-frame reference group at t=0 (two timestep
# segments), the 512-row text context. 48 tokens keep the CPU side of each call in milliseconds.
# ----------------------------------------------------------------------------------------------------------
CASES = ("forward", "backward", "int8 attention", "int8-fp8 attention")


def _exercise(case: str, dtype: torch.dtype, arch: int) -> str | None:
    """Run one exercise; returns why it was refused (a clear error the runtime raises) or None."""
    cfg = replace(DiTConfig.preset("wan2.2-ti2v-5b"), num_layers=1)
    attention_quant = {"int8 attention": "int8", "int8-fp8 attention": "int8-fp8"}.get(case)
    dit = random_dit(cfg, dtype=dtype, device="cpu", backend="triton", attention_quant=attention_quant)
    target = torch.randn(2, cfg.in_dim, 2, 8, 8, dtype=dtype, requires_grad=case == "backward")
    reference = torch.randn(2, cfg.in_dim, 1, 8, 8, dtype=dtype)
    segments = Segments((32, 16), torch.tensor([[700.0, 0.0], [700.0, 0.0]]))
    context = torch.randn(2, 120, cfg.text_dim, dtype=dtype)
    try:
        with torch.set_grad_enabled(case == "backward"):
            out = dit.forward_groups([target, reference], [0, 2], segments, context)
            if case == "backward":
                out.sum().backward()
    except RuntimeError as e:
        if "needs FP8 tensor cores" in str(e):
            return str(e)
        raise
    return None


def cross_compile(arch: int, dtype: torch.dtype = torch.bfloat16,
                  cases: tuple[str, ...] = CASES) -> tuple[list[CompiledConfig], dict[str, str]]:
    """Compile every kernel the DiT launches, for sm`arch`. Returns (records, {case: why it was refused})."""
    refused = {}
    with compile_only(arch) as recorder:
        for case in cases:
            if case not in CASES:
                raise ValueError(f"case {case!r} is not one of {CASES}")
            recorder.case = case
            if why := _exercise(case, dtype, arch):
                refused[case] = why
    return recorder.records(), refused


def markdown_table(records: list[CompiledConfig]) -> str:
    head = ("| kernel | variant | arch | blocks | warps | stages | shared | registers | spill bytes | programs/SM | "
            "tensor-core instructions |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = sorted(records, key=lambda r: (r.kernel, r.arch, json.dumps(r.constants, sort_keys=True), r.num_warps,
                                          r.num_stages))
    return "\n".join([head] + [r.row() for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anyid_rt.bench.cross_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 89, 90], choices=sorted(SHARED_LIMIT))
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--case", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--out", type=Path, help="append JSON lines to OUT/kernel_resources.jsonl, the table to "
                                            "OUT/kernel_resources.md (e.g. bench/results)")
    args = p.parse_args(argv)
    dtype = parse_dtype(args.dtype, "--dtype")
    env = environment("cpu")
    meta = dict(date=env["date"], commit=(env["commit"] or "unknown")[:7], triton=triton.__version__,
                torch=torch.__version__, dtype=args.dtype)
    all_records, problems = [], []
    for arch in args.arch:
        records, refused = cross_compile(arch, dtype, tuple(args.case))
        all_records += records
        for case, why in refused.items():
            print(f"sm{arch} {case}: refused by the runtime: {why}")
        for r in records:
            if r.error or not r.fits_shared:
                problems.append(r)
    table = markdown_table(all_records)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "kernel_resources.jsonl", "a") as f:
            for r in all_records:
                f.write(json.dumps({**meta, "gpu": GPU_NAMES[r.arch], **asdict(r)}) + "\n")
        (args.out / "kernel_resources.md").write_text(
            f"Kernels cross-compiled on a CPU (no GPU), {meta['date']}, commit {meta['commit']}, triton "
            f"{meta['triton']}, {args.dtype}; ptxas figures, not timings.\n\n{table}\n")
    for r in problems:
        print(f"note: {r.kernel} sm{r.arch} {r.constants} warps={r.num_warps} stages={r.num_stages}: "
              + (r.error.splitlines()[0] if r.error else f"{r.shared_bytes} B shared > {SHARED_LIMIT[r.arch]} B"),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
