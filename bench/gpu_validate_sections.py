"""The sections of bench/gpu_validate.py (the driver: command line, budget, JSON, log, summary): each a
function that records its measurements into a dict as it goes and returns a one-line headline, run in the
order of `SECTIONS` with the estimated seconds used by the budget. Sizes are the production ones on a GPU and
toy ones in a dry run (`Ctx.size`); every timing goes through anyid_rt.bench.timing.measure. The driver
imports this module after it has mapped the package and, for a dry run, set TRITON_INTERPRET; what a
section needs from work in progress elsewhere (compiled engine, FP8) is imported inside it, so that its
absence is that section's "not available" and nothing else's."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from anyid_rt.bench import timing
from anyid_rt.bench.baseline import dit_view
from anyid_rt.config import DiTConfig, VAEConfig
from anyid_rt.kernels import SegmentMap, attention, dit_ops, select
from anyid_rt.kernels import attention_8bit as a8
from anyid_rt.kernels._utils import config_family
from anyid_rt.kernels.select import REFERENCES, AutoOp, dense
from anyid_rt.models.dit import count_flops, patchify, sinusoidal_embedding
from anyid_rt.models.random_weights import random_dit, random_vae
from anyid_rt.models.vae_tiling import VAETiling
from anyid_rt.quant import cosine, psnr


class NotAvailable(Exception):
    """A section that cannot run here (a feature or a device capability missing): recorded as skipped."""


class CheckFailed(Exception):
    """A section whose measurements were recorded but whose correctness check failed."""


@dataclass
class Budget:
    total_s: float
    start: float  # time.monotonic() at the process start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def why_not(self, estimate_s: float) -> str | None:
        """Why a step estimated at `estimate_s` must not start now (None: it may)."""
        end = self.elapsed() + estimate_s
        if end <= self.total_s:
            return None
        return (f"would end near {end:.0f} s, past the {self.total_s:.0f} s budget (estimate {estimate_s:.0f} s, "
                f"{max(0.0, self.total_s - self.elapsed()):.0f} s left)")


@dataclass
class Ctx:
    """What every section gets: the device, the sizes' switch, the harness, the log and the shared results."""

    args: argparse.Namespace
    device: Any
    budget: Budget
    log: Callable[[str], None]
    flush: Callable[[], None]  # rewrite the JSON now (inside long sections)
    selector: Any = None
    shared: dict = field(default_factory=dict)

    @property
    def dry(self) -> bool:
        return self.args.dry_run

    def size(self, gpu, dry):
        return dry if self.dry else gpu

    @property
    def adt(self):
        """The activations' dtype: bf16; fp16 in a dry run (the interpreter's bf16 dots are wrong)."""
        return torch.float16 if self.dry else torch.bfloat16

    def time(self, fn: Callable[[], object], warmup: int = 2, reps: int = 10, keep: bool = False):
        """The one harness (anyid_rt.bench.timing.measure): an untimed first call (its output kept with
        `keep`), then `warmup` untimed and `reps` timed ones; one of each in a dry run."""
        return timing.measure(fn, warmup=0 if self.dry else warmup, reps=1 if self.dry else reps,
                              device=self.device, inspect=(lambda out: out) if keep else None)

    def timer(self, fn, _device) -> float:  # the selector's timer: the same harness
        return self.time(fn).timing.median_ms

    def randn(self, *shape, dtype=None, scale: float = 1.0):
        return (torch.randn(*shape, device=self.device) * scale).to(dtype or torch.float32)


def rel_l2(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def poisoned(ctx: Ctx, fn: Callable[[], Any], out_bytes: int) -> tuple[Any, bool]:
    """fn() after filling the CUDA allocator's next block of `out_bytes` with NaN bits (0xFF bytes), which the
    output allocation then reuses: (the output, whether every element is finite, i.e. written)."""
    if ctx.device.type == "cuda":
        torch.empty(out_bytes, dtype=torch.uint8, device=ctx.device).fill_(255)  # freed at once, then reused
    out = fn()
    return out, bool(torch.isfinite(dense(out)).all())


def auto_ops(ctx: Ctx, compiled: bool = False):
    """dit_ops("auto") on this run's selector; in a dry run timed on the CPU too, so that it chooses."""
    ops = dit_ops("auto", compiled=compiled, selector=ctx.selector)
    if not ctx.dry:
        return ops

    def dry(a: AutoOp) -> AutoOp:  # compiled references traced by the eager backend: no C++ build
        impls = {k: torch.compile(REFERENCES[a.op], backend="eager") if k == "torch-compile" else f
                 for k, f in a.impls.items()}
        return AutoOp(a.op, impls, a.selector, a.not_available, timed_on=("cpu",))

    return replace(ops, **{f.name: dry(a) for f in fields(ops) if isinstance(a := getattr(ops, f.name), AutoOp)})


def choices_of(ops) -> dict:
    return {c.shape_class: c.name for f in fields(ops) for c in getattr(getattr(ops, f.name), "choices", {}).values()}


# ---------------------------------------------------------------------------------------------------------
# Sections: each records into `rec` as it goes and returns a one-line headline
# ---------------------------------------------------------------------------------------------------------

def sec_env(ctx: Ctx, rec: dict) -> str:
    env = timing.environment(ctx.device)
    rec.update(environment=env, fingerprint=select.device_fingerprint(ctx.device), package=ctx.shared["package"],
               fa3=select.unavailable("attention").get("fa3", "importable"),
               datasheet=timing.dense_peaks(env.get("device_name")))
    n, dtype = ctx.size((8192, torch.bfloat16), (256, torch.float32))
    nbytes = ctx.size(2_000_000_000, 16_000_000)

    def matmul():
        a, b = ctx.randn(n, n, dtype=dtype), ctx.randn(n, n, dtype=dtype)
        c = torch.empty(n, n, dtype=dtype, device=ctx.device)
        return ctx.time(lambda: torch.mm(a, b, out=c), warmup=10, reps=50)

    def copy():
        src = ctx.randn(nbytes // 4)
        dst = torch.empty_like(src)
        return ctx.time(lambda: dst.copy_(src), warmup=10, reps=50)

    m = matmul()  # each helper's tensors are freed on return
    tflops = 2 * n ** 3 / m.median_s / 1e12
    rec["matmul"] = dict(n=n, dtype=str(dtype), tflops=tflops, **m.summary())
    m = copy()
    gbps = 2 * nbytes / m.median_s / 1e9
    rec["copy"] = dict(bytes_moved=2 * nbytes, gbps=gbps, **m.summary())
    ctx.shared["copy_gbps"] = gbps
    return f"{env.get('device_name')}: matmul {tflops:.4g} TFLOP/s ({dtype}), copy {gbps:.4g} GB/s"


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_nbytes(a) for a in x) if isinstance(x, (tuple, list)) else 0


def sec_norms(ctx: Ctx, rec: dict) -> str:
    B, L, D, H = ctx.size((2, 27280, 3072, 24), (2, 37, 64, 2))
    x32, xa = ctx.randn(B, L, D), ctx.randn(B, L, D, dtype=ctx.adt)
    shift, scale, gate = ctx.randn(B, 1, 3, D, scale=0.1).unbind(2)  # views of one tensor, as Block.forward's
    w, b = 1 + ctx.randn(D, scale=0.05), ctx.randn(D, scale=0.01)
    angles = ctx.randn(L, D // H // 2, scale=3.0)
    seg = SegmentMap.from_lens((L,), ctx.device)
    calls = {  # as WanDiT's blocks make them: fp32 residual stream, activations in the compute dtype
        "layernorm_modulate": (x32, shift, scale, seg, 1e-6, ctx.adt),
        "gated_residual": (x32, xa, gate, seg),
        "rms_norm": (xa, w, 1e-6),
        "rms_norm_rope": (xa, w, 1e-6, (angles.cos(), angles.sin()), H),
        "layer_norm": (x32, w, b, 1e-6),
    }
    copy, bad, heads = ctx.shared.get("copy_gbps"), [], []
    for op, args in calls.items():
        ref = select.oracle(op, args)
        out, written = poisoned(ctx, lambda: select.TRITON[op](*args), _nbytes(ref.low))  # noqa: B023
        verdict = select.check(out, ref.fp32, ref.low)
        traffic = _nbytes(args) + _nbytes(out)
        choice = ctx.selector.choose(op, select.candidates(op), args)
        gbps = {k: traffic / ms / 1e6 for k, ms in choice.ms.items()}
        rec[op] = dict(shape_class=choice.shape_class, written=written, ok=verdict.ok, error=verdict.error,
                       bound=verdict.bound, bytes=traffic, ms=choice.ms, gbps=gbps, auto=choice.name,
                       rejected=choice.rejected, triton_of_copy=gbps.get("triton", 0) / copy if copy else None)
        if not (written and verdict.ok):
            bad.append(f"{op}: written={written}, {verdict.reason or 'ok'}")
        heads.append(f"{op} {gbps.get('triton', 0):.4g} GB/s (auto: {choice.name})")
        ctx.flush()
    if bad:
        raise CheckFailed("; ".join(bad))
    return "triton " + ", ".join(heads)


def attention_case(ctx: Ctx, q, k, v) -> dict:
    """Every attention candidate on one shape: error against fp32 on spread query rows, TFLOP/s, the choice."""
    B, Lq, H, D = q.shape
    flops = 4.0 * B * H * Lq * k.shape[1] * D
    t0 = time.perf_counter()
    _, written = poisoned(ctx, lambda: attention.attention(q, k, v), q.numel() * q.element_size())
    first_s = time.perf_counter() - t0  # compile and autotune, for this autotune key
    tuned = attention._TUNED["fwd", config_family(q.device)].best_config
    ref, checks = select.oracle("attention", (q, k, v)), {}
    impls = select.candidates("attention")
    for name, fn in impls.items():
        try:
            v_ = select.check(ref.pick(fn(q, k, v)), ref.fp32, ref.low)
            checks[name] = dict(ok=v_.ok, error=v_.error, bound=v_.bound)
        except Exception as e:  # noqa: BLE001 - recorded: a backend that cannot run this shape here
            checks[name] = dict(ok=None, unavailable=f"{type(e).__name__}: {str(e).strip()[:200]}")
    choice = ctx.selector.choose("attention", impls, (q, k, v), select.unavailable("attention"))
    tflops = {name: flops / ms / 1e9 for name, ms in choice.ms.items()}
    return dict(shape=dict(B=B, Lq=Lq, Lk=k.shape[1], H=H, D=D, dtype=str(q.dtype)), flops=flops,
                triton_written=written, triton_first_call_s=first_s, triton_config=str(tuned), checks=checks,
                ms=choice.ms, tflops=tflops, auto=choice.name, rejected=choice.rejected)


def _attention_line(case: str, r: dict) -> str:
    others = ", ".join(f"{k} {v:.4g}" for k, v in sorted(r["tflops"].items(), key=lambda kv: -kv[1]))
    return f"{case}: auto={r['auto']} (TFLOP/s {others})"


def sec_attention(ctx: Ctx, rec: dict) -> str:
    B, L, H, D, T = ctx.size((2, 27280, 24, 128, 512), (1, 37, 2, 32, 24))
    lines, bad = [], []
    for case, Lk in (("self", L), ("cross", T)):
        q, k, v = (ctx.randn(B, n, H, D, dtype=ctx.adt) for n in (L, Lk, Lk))
        rec[case] = r = attention_case(ctx, q, k, v)
        ctx.flush()
        lines.append(_attention_line(case, r))
        if not (r["triton_written"] and r["checks"]["triton"]["ok"]):
            bad.append(f"{case}: triton written={r['triton_written']} check={r['checks']['triton']}")
    if bad:
        raise CheckFailed("; ".join(bad))
    return "; ".join(lines)


def _dit(ctx: Ctx):
    """The DiT of every section that runs one: the 5B (tiny in a dry run), random weights made on the device."""
    if "dit" not in ctx.shared:
        cfg = DiTConfig() if not ctx.dry else DiTConfig.preset("tiny")
        dtype = torch.float32 if ctx.dry else torch.bfloat16  # the interpreter: no bf16 dots
        ctx.shared["dit"] = random_dit(cfg, dtype=dtype, device=ctx.device, seed=ctx.args.seed)
    return ctx.shared["dit"]


def dit_inputs(ctx: Ctx, dit, frames: int) -> tuple:
    """One guided step's tensors (batch 2, one segment, a 100-token prompt) for `forward_tokens`."""
    cfg, dev = dit.cfg, ctx.device
    h, w = ctx.size((44, 80), (4, 6))
    z = ctx.randn(2, cfg.in_dim, frames, h, w)
    patches = patchify(cfg, z).to(dit.compute_dtype)
    grid = (frames // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
    with torch.no_grad():
        text = dit.embed_text(dit.pad_context([ctx.randn(100, cfg.text_dim)] * 2), dit_ops("torch"))
    return (patches, sinusoidal_embedding(torch.full((2, 1), 700.0, device=dev), cfg.freq_dim),
            dit.segment_map((patches.shape[1],), dev), dit.rope([grid], [0], dev), text)


def dit_variants(ctx: Ctx, compiled: bool = False) -> dict:
    torch_ops = dit_ops("torch")
    cudnn = None if ctx.dry else replace(torch_ops, attention=select.candidates("attention")["sdpa-cudnn"])
    return {"torch": torch_ops, "auto": auto_ops(ctx, compiled), "triton": dit_ops("triton"), "torch+cudnn": cudnn}


def time_dit(ctx: Ctx, dit, inputs: tuple, ops, reference=None) -> dict:
    with torch.inference_mode():
        m = ctx.time(lambda: dit.forward_tokens(*inputs, ops=ops), warmup=0, reps=2, keep=True)
    out = m.first_result
    L = inputs[0].shape[1]
    r = dict(tokens=L, batch=2, first_call_s=m.first_call_s, s_per_forward=m.median_s,
             tflops=count_flops(dit.cfg, L) * 2 / m.median_s / 1e12, finite=bool(torch.isfinite(out).all()),
             peak_over_before_gib=None if m.peak_mem_bytes is None else (m.peak_mem_bytes - m.mem_before_bytes) / 2**30,
             timing=m.timing.record())
    if reference is not None:
        r.update(cosine_vs_torch=cosine(out, reference),
                 max_rel_vs_torch=((out - reference).abs().max() / reference.abs().max()).item())
    return r | dict(_out=out)


def _keep(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "_out"}


def sec_dit(ctx: Ctx, rec: dict) -> str:
    dit = _dit(ctx)
    inputs = dit_inputs(ctx, dit, ctx.size(31, 2))  # 31 x 22 x 40 = 27,280 tokens
    ctx.shared["dit_inputs"] = inputs
    ref, bad = None, []
    for name, ops in dit_variants(ctx).items():
        if ops is None:
            rec[name] = dict(status="skipped", reason="cuDNN attention needs CUDA (dry run)")
            continue
        r = time_dit(ctx, dit, inputs, ops, ref)
        ref = r["_out"] if ref is None else ref
        if name == "auto":
            r["choices"] = choices_of(ops)
            ctx.shared["auto_out"], ctx.shared["auto_s"] = r["_out"], r["s_per_forward"]
        rec[name] = _keep(r)
        ctx.flush()
        if not r["finite"] or r.get("cosine_vs_torch", 1.0) < 0.999:
            bad.append(f"{name}: finite={r['finite']} cosine={r.get('cosine_vs_torch')}")
    if bad:
        raise CheckFailed("; ".join(bad))
    return ", ".join(f"{k} {v['s_per_forward']:.3g} s" for k, v in rec.items() if "s_per_forward" in v) + \
        f" at {inputs[0].shape[1]} tokens"


def sec_dit_compiled(ctx: Ctx, rec: dict) -> str:
    try:
        from anyid_rt.compiled import compile_dit_
    except ImportError as e:
        raise NotAvailable(f"anyid_rt.compiled.compile_dit_ ({e})") from e
    dit, inputs = _dit(ctx), ctx.shared.get("dit_inputs") or dit_inputs(ctx, _dit(ctx), ctx.size(31, 2))
    view = dit_view(dit, "auto")  # same weights, its own (compiled) modules
    if ctx.dry:  # Inductor's C++ build would take minutes: trace with the eager backend, as a check only
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in view.blocks:
            block.compile(backend="eager", dynamic=False)
        rec["note"] = "dry run: blocks compiled with backend='eager' (tracing only), not compile_dit_"
    else:
        compile_dit_(view, True)
    for name, ops in dit_variants(ctx, compiled=True).items():
        if name == "torch" or ops is None:
            continue
        why = ctx.budget.why_not(ctx.size(100 if name == "auto" else 45, 10))
        if why:
            rec[name] = dict(status="skipped", reason=why)
            continue
        if name == "auto":  # choose first, eagerly (compiled references included), so that the block compiles once
            t0 = time.perf_counter()
            with torch.inference_mode():
                dit.forward_tokens(*inputs, ops=ops)
            rec["auto_selection_s"] = time.perf_counter() - t0
        r = time_dit(ctx, view, inputs, ops, ctx.shared.get("auto_out"))
        r["compile_s"] = max(0.0, r["first_call_s"] - r["s_per_forward"])
        rec[name] = _keep(r) | ({"choices": choices_of(ops)} if name == "auto" else {})
        ctx.flush()
    return ", ".join(f"{k} {v['s_per_forward']:.3g} s (compile {v['compile_s']:.0f} s)"
                     for k, v in rec.items() if isinstance(v, dict) and "s_per_forward" in v)


def sec_fp8(ctx: Ctx, rec: dict) -> str:
    from anyid_rt.quant import FP8Linear, check_fp8_device, quantize_dit_fp8_

    try:
        check_fp8_device(ctx.device)
        from anyid_rt.kernels.fp8_quant import quantize_rows_fp8
    except (ValueError, ImportError) as e:
        raise NotAvailable(str(e)) from e
    M = ctx.size(2 * 27280, 64)
    heads = []
    for K, N in ctx.size(((3072, 3072), (3072, 14336), (14336, 3072)), ((64, 64), (64, 128), (128, 64))):
        x = ctx.randn(M, K, dtype=torch.bfloat16)
        lin = torch.nn.Linear(K, N, device=ctx.device, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(ctx.randn(N, K, scale=(3 * K) ** -0.5))
        fp8 = FP8Linear.from_linear(lin, backend="triton")
        with torch.no_grad():
            ref, y16, y8 = F.linear(x.float(), lin.weight.float(), lin.bias.float()), lin(x), fp8(x)
            rows = quantize_rows_fp8(x)
            xq, xs = rows.values, rows.scale.reshape(-1, 1)

            def mm(fast: bool, xq=xq, xs=xs, fp8=fp8):
                return lambda: torch._scaled_mm(xq, fp8.weight_q.t(), scale_a=xs, scale_b=fp8.weight_scale,
                                                bias=fp8.bias, out_dtype=torch.bfloat16, use_fast_accum=fast)

            ms = {name: ctx.time(fn).timing.median_ms for name, fn in (
                ("bf16", lambda: lin(x)), ("fp8_linear", lambda: fp8(x)),  # noqa: B023
                ("quantise", lambda: quantize_rows_fp8(x)), ("scaled_mm", mm(False)),  # noqa: B023
                ("scaled_mm_fast_accum", mm(True)))}
        rec[f"{K}x{N}"] = dict(M=M, ms=ms, tflops={k: 2 * M * K * N / v / 1e9 for k, v in ms.items()},
                              speedup_fp8_linear=ms["bf16"] / ms["fp8_linear"],
                              speedup_scaled_mm=ms["bf16"] / ms["scaled_mm"], cosine_fp8_vs_bf16=cosine(y8, y16),
                              rel_l2_fp8=rel_l2(y8, ref), rel_l2_bf16=rel_l2(y16, ref))
        heads.append(f"{K}x{N} x{ms['bf16'] / ms['fp8_linear']:.3g}")
        ctx.flush()
    if "dit_inputs" not in ctx.shared or ctx.budget.why_not(ctx.size(30, 5)):
        rec["dit"] = dict(status="skipped", reason="no DiT from the dit section, or no time left")
        return "FP8Linear speed-up " + ", ".join(heads)
    view = dit_view(_dit(ctx), "auto")
    quantize_dit_fp8_(view, backend="triton")
    ops = auto_ops(ctx)
    r = time_dit(ctx, view, ctx.shared["dit_inputs"], ops, ctx.shared.get("auto_out"))
    rec["dit"] = _keep(r) | dict(speedup_vs_bf16_auto=ctx.shared["auto_s"] / r["s_per_forward"],
                                 choices=choices_of(ops))
    del view
    return "FP8Linear speed-up " + ", ".join(heads) + f"; DiT x{rec['dit']['speedup_vs_bf16_auto']:.3g}"


def sec_attention_8bit(ctx: Ctx, rec: dict) -> str:
    B, L, H, D = ctx.size((2, 27280, 24, 128), (1, 37, 2, 32))
    pv = "fp8" if ctx.dry or a8.fp8_supported(torch.cuda.get_device_capability(ctx.device)) else "bf16"
    q, v = ctx.randn(B, L, H, D, dtype=ctx.adt), ctx.randn(B, L, H, D, dtype=ctx.adt)
    k = (ctx.randn(B, L, H, D) + 4.0 * ctx.randn(H, D)).to(ctx.adt)  # a per-channel key mean: what smoothing is for
    t0 = time.perf_counter()
    out, written = poisoned(ctx, lambda: a8.attention_8bit(q, k, v, pv=pv), q.numel() * q.element_size())
    first_s = time.perf_counter() - t0
    rows = torch.linspace(0, L - 1, min(L, 256), device=ctx.device).round().long().unique()
    emul32 = a8.attention_8bit_core_ref(a8.quantize_8bit(q[:, rows], k, v, pv=pv), torch.float32)
    full = attention.attention_ref(q[:, rows].double(), k.double(), v.double())
    d_kernel, d_quant = rel_l2(out[:, rows], emul32), rel_l2(emul32, full)
    d_round = rel_l2(emul32.to(out.dtype), emul32)
    x = a8.quantize_8bit(q, k, v, pv=pv)
    ms = {name: ctx.time(fn).timing.median_ms for name, fn in (
        (f"8bit-{pv}", lambda: a8.attention_8bit(q, k, v, pv=pv)),
        (f"8bit-{pv}-core", lambda: a8.attention_8bit_core(x, q.dtype)),
        ("triton-bf16", lambda: attention.attention(q, k, v)))}
    flops = 4.0 * B * H * L * L * D
    ok = written and d_kernel <= 0.1 * d_quant + 2 * d_round
    rec.update(pv=pv, written=written, first_call_s=first_s, ms=ms, tflops={n: flops / t / 1e9 for n, t in ms.items()},
               config=str(a8._TUNED[config_family(q.device)].best_config), kernel_vs_emulation=d_kernel,
               emulation_vs_fp64=d_quant, output_rounding=d_round, ok=ok, cosine_vs_fp64=cosine(out[:, rows], full),
               speedup_vs_triton_bf16=ms["triton-bf16"] / ms[f"8bit-{pv}"])
    if not ok:
        raise CheckFailed(f"kernel vs emulation {d_kernel:.3e} > 0.1 x {d_quant:.3e} + 2 x {d_round:.3e} "
                          f"(or unwritten output: {not written})")
    return f"8-bit ({pv}) x{rec['speedup_vs_triton_bf16']:.3g} of bf16 Triton, cosine {rec['cosine_vs_fp64']:.5f}"


def sec_vae(ctx: Ctx, rec: dict) -> str:
    cfg = VAEConfig() if not ctx.dry else VAEConfig.preset("tiny")
    latent = ctx.randn(1, cfg.z_dim, *ctx.size((31, 44, 80), (2, 2, 4)))  # 121 frames of 704 x 1280
    tiling = ctx.size(VAETiling(), VAETiling(2, 2, 1))
    vae, fp32_out = random_vae(cfg, seed=ctx.args.seed, device=ctx.device), {}
    for dtype in (torch.float32, torch.bfloat16):
        vae = vae.to(dtype)
        for tile in (None, tiling):
            name = f"{str(dtype).removeprefix('torch.')}{'' if tile is None else '_tiled'}"
            why = ctx.budget.why_not(ctx.size(20, 2))
            if why:
                rec[name] = dict(status="skipped", reason=why)
                continue
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = vae.decode(latent, tile=tile)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            r = dict(seconds=time.perf_counter() - t0, shape=list(out.shape), finite=bool(torch.isfinite(out).all()),
                     tiling=None if tile is None else [tile.tile_h, tile.tile_w, tile.overlap],
                     peak_gib=torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None,
                     note="one call, its cuDNN setup included")
            if dtype == torch.float32:
                fp32_out[tile is None] = out
            elif (tile is None) in fp32_out:
                r["psnr_vs_fp32_db"] = psnr(out, fp32_out[tile is None], peak=2.0)  # frames in [-1, 1]
            rec[name] = r
            del out
            ctx.flush()
    if len(fp32_out) == 2:
        rec["psnr_tiled_vs_untiled_fp32_db"] = psnr(fp32_out[False], fp32_out[True], peak=2.0)
    runs = {k: v for k, v in rec.items() if isinstance(v, dict) and "seconds" in v}
    return ", ".join(f"{k} {v['seconds']:.3g} s" + (f" ({v['psnr_vs_fp32_db']:.1f} dB)" if "psnr_vs_fp32_db" in v
                                                    else "") for k, v in runs.items())


def sec_attention_backward(ctx: Ctx, rec: dict) -> str:
    B, L, H, D = ctx.size((2, 27280, 24, 128), (1, 37, 2, 32))
    impls = {"triton": attention.attention} | {k: v for k, v in select.candidates("attention").items()
                                              if k.startswith("sdpa")}
    flops = 2.5 * 4.0 * B * H * L * L * D
    q, k, v, dout = (ctx.randn(B, L, H, D, dtype=ctx.adt) for _ in range(4))
    # gradients on a 4-head slice at the same length (the same autotune key) against fp32, calibrated by torch
    qs, ks, vs, ds = (t[:1, :, :4].contiguous() for t in (q, k, v, dout))

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (qs, ks, vs)]
        return torch.autograd.grad(fn(*leaves), leaves, ds.to(dtype))

    ref32, low = grads(attention.attention_ref, torch.float32), grads(attention.attention_ref, ctx.adt)

    def backward(fn):  # the forward once, then its backward timed (the graph kept between calls)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return ctx.time(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), warmup=1, reps=3)

    timing, checks = {}, {}
    for name, fn in impls.items():
        try:
            m = backward(fn)
            timing[name] = dict(ms=m.timing.median_ms, tflops=flops / m.timing.median_ms / 1e9,
                                first_call_s=m.first_call_s)
            verdicts = [select.check(g, r, lo) for g, r, lo in zip(grads(fn, ctx.adt), ref32, low)]
            checks[name] = {f"d{n}": dict(ok=vd.ok, error=vd.error, bound=vd.bound) for n, vd in zip("qkv", verdicts)}
        except Exception as e:  # noqa: BLE001 - a backend without this shape here
            timing[name] = dict(unavailable=f"{type(e).__name__}: {str(e).strip()[:200]}")
        ctx.flush()
    rec.update(shape=dict(B=B, L=L, H=H, D=D), flops=flops, timing=timing, gradient_checks=checks)
    wrong = [f"{n} {g}" for n, c in checks.items() for g, vd in c.items() if not vd["ok"]]
    if wrong or "triton" not in checks:
        raise CheckFailed(f"gradients off the calibrated bound: {wrong or 'triton did not run'}")
    return ", ".join(f"{k} {t['tflops']:.4g}" for k, t in timing.items() if "tflops" in t) + " TFLOP/s (2.5x)"


def sec_long(ctx: Ctx, rec: dict) -> str:
    B, L, H, D = ctx.size((2, 58080, 24, 128), (1, 80, 2, 32))
    q, k, v = (ctx.randn(B, L, H, D, dtype=ctx.adt) for _ in range(3))
    rec["attention"] = attention_case(ctx, q, k, v)
    del q, k, v
    ctx.flush()
    line = _attention_line(f"self {L}", rec["attention"])
    why = ctx.budget.why_not(ctx.size(40, 5))
    if why:
        rec["dit"] = dict(status="skipped", reason=why)
        return line
    dit = _dit(ctx)
    ops = auto_ops(ctx)
    rec["dit"] = _keep(time_dit(ctx, dit, dit_inputs(ctx, dit, ctx.size(66, 4)), ops)) | {"choices": choices_of(ops)}
    return line + f"; auto DiT {rec['dit']['s_per_forward']:.3g} s at {rec['dit']['tokens']} tokens"


def sec_gpu_tests(ctx: Ctx, rec: dict) -> str:
    """`pytest -m gpu` on --tests, in this process: the package mapping serves the tests too."""
    import pytest

    files = [str(Path(__file__).resolve().parent.parent / f) for f in ctx.args.tests.split(",")]
    counts: dict[str, int] = {}
    failed: list[str] = []

    class Outcomes:  # a pytest plugin: every test's outcome (a skip or an error outside the call counts too)
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                counts[report.outcome] = counts.get(report.outcome, 0) + 1
            if report.failed:
                failed.append(f"{report.nodeid} ({report.when}): {str(report.longrepr)[-1500:]}")

    code = int(pytest.main(["-m", "gpu", "-q", "-rfE", "-p", "no:cacheprovider", *files], plugins=[Outcomes()]))
    rec.update(files=files, exit_code=code, outcomes=counts, failed=failed)
    line = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "nothing ran"
    if code not in (0, 5):  # 5: nothing collected
        raise CheckFailed(f"pytest exit code {code}: {line}")
    return line


# (name, function, estimated seconds on an H100/H200, in a dry run), in priority order
SECTIONS = (("env", sec_env, 15, 5), ("norms", sec_norms, 25, 10), ("attention", sec_attention, 40, 10),
            ("dit", sec_dit, 60, 10), ("dit_compiled", sec_dit_compiled, 100, 10), ("fp8", sec_fp8, 40, 10),
            ("attention_8bit", sec_attention_8bit, 30, 10), ("vae", sec_vae, 60, 5),
            ("attention_backward", sec_attention_backward, 50, 10), ("long", sec_long, 45, 10),
            ("gpu_tests", sec_gpu_tests, 90, 10))
