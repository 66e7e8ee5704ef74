"""Attention benchmark: the Triton flash attention against every torch SDPA backend.

TFLOP/s = 4 * B * H * Lq * Lk * D / time for the forward (QK^T and PV, 2 FLOPs per multiply-add); the
backward counts 2.5x that (five matmuls against two, the flash-attention convention). Sizes: the production
self-attention of Wan2.2-TI2V-5B at 1280x704x121 (B=2 for CFG, 24 heads, D=128, 27,280 tokens; 58,080 with
four reference images and a reference clip; 27,280 queries over 58,080 keys when the reference K/V are
reused), plus a sweep of L. Every provider does the same work: the DiT rotates q and k in its q/k norm
before attention. Providers: `triton` (anyid_rt.kernels.attention.attention, [B, L, H, D] inputs), SDPA
flash / cuDNN / efficient (torch.nn.attention.sdpa_kernel, [B, H, L, D] inputs, their native layout),
flash-attn 2/3 packages if installed, and `eager-ref` (attention_ref with the SDPA math backend) for
L <= --eager-max-l. Appends JSON lines to <out>/bench_attention.jsonl and plots the sweep to
<out>/bench_attention[_bwd].png.

    python bench/bench_attention.py [--mode fwd|bwd|both] [--no-sweep] [--out DIR] [--dry-run]
"""
from __future__ import annotations

import sys

from anyid_rt.bench import report, timing

PRODUCTION = [(2, 24, 128, 27280, 27280), (2, 24, 128, 58080, 58080), (2, 24, 128, 27280, 58080)]
SWEEP = [(2, 24, 128, L, L) for L in (1024, 2048, 4096, 8192, 16384)]
DRY_PRODUCTION = [(1, 2, 32, 37, 37), (1, 2, 32, 37, 50)]  # toy sizes for the CPU dry run
DRY_SWEEP = [(1, 2, 32, L, L) for L in (16, 40)]
# Published anchors drawn on the plot (perf-anchors.md section 5: FA3 paper, H100, bf16, hd128, 16k, non-causal)
ANCHORS = {"FA3 648 (paper, H100, 16k)": 648.0, "cuDNN 595 (paper, H100, 16k)": 595.0}


def flops(B: int, H: int, D: int, Lq: int, Lk: int, mode: str) -> float:
    fwd = 4.0 * B * H * Lq * Lk * D
    return fwd if mode == "fwd" else 2.5 * fwd


def providers(args, device: str) -> dict:
    """name -> (needs [B, L, H, D] inputs?, fn(q, k, v)); only those that run here."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from anyid_rt.kernels.attention import attention, attention_ref

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return fn

    def eager_ref(q, k, v):
        with sdpa_kernel([SDPBackend.MATH]):
            return attention_ref(q, k, v)

    out = {"triton": (True, attention), "eager-ref": (True, eager_ref)}
    if device == "cuda":
        out |= {"sdpa-flash": (False, sdpa(SDPBackend.FLASH_ATTENTION)),
                "sdpa-cudnn": (False, sdpa(SDPBackend.CUDNN_ATTENTION)),
                "sdpa-efficient": (False, sdpa(SDPBackend.EFFICIENT_ATTENTION))}
        for name, module in (("fa3", "flash_attn_interface"), ("flash-attn2", "flash_attn")):
            try:
                fa = __import__(module)
            except ImportError:
                continue
            out[name] = (True, lambda q, k, v, fa=fa: _first(fa.flash_attn_func(q, k, v)))
    else:
        out["sdpa-default"] = (False, F.scaled_dot_product_attention)
    return out


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def run_case(args, device, env, provs, shape, kind):
    import torch

    B, H, D, Lq, Lk = shape
    dtype = torch.float16 if args.dry_run else getattr(torch, args.dtype)  # the interpreter has no bf16 dots
    q = torch.randn(B, Lq, H, D, device=device, dtype=dtype)
    k = torch.randn(B, Lk, H, D, device=device, dtype=dtype)
    v = torch.randn(B, Lk, H, D, device=device, dtype=dtype)
    head_major = [t.transpose(1, 2).contiguous() for t in (q, k, v)]  # [B, H, L, D] for SDPA
    records, reference = [], None
    for name, (blhd, fn) in provs.items():
        if name == "eager-ref" and max(Lq, Lk) > args.eager_max_l:
            continue
        inputs = (q, k, v) if blhd else head_major
        out = timing.first_call(name, fn, inputs)
        if out is None:
            continue
        out_blhd = out if blhd else out.transpose(1, 2)
        if name == "triton":
            reference = out_blhd
        diff = None if reference is None else \
            (out_blhd.float() - reference.float()).abs().max().item()  # sanity: same math as `triton`
        for mode in (("fwd", "bwd") if args.mode == "both" else (args.mode,)):
            if mode == "fwd":
                timed = lambda: fn(*inputs)  # noqa: E731
            else:
                leaves = [t.detach().requires_grad_() for t in inputs]
                out = fn(*leaves)
                dout = torch.randn_like(out)
                timed = lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)  # noqa: E731
            try:
                t = timing.bench_ms(timed, args)
            except RuntimeError as e:
                print(f"  {name} {mode}: failed ({str(e).splitlines()[0][:120]})", flush=True)
                continue
            rec = {"bench": "attention", "case": kind, "provider": name, "mode": mode, "B": B, "H": H, "D": D,
                   "Lq": Lq, "Lk": Lk, "dtype": str(dtype).removeprefix("torch."), **t,
                   "tflops": flops(B, H, D, Lq, Lk, mode) / (t["ms"] * 1e-3) / 1e12,
                   "peak_gib": timing.peak_memory(timed, device), "max_abs_diff_vs_triton": diff, **env}
            timing.print_row(rec, ("provider", "mode", "Lq", "Lk", "ms", "tflops", "max_abs_diff_vs_triton"))
            records.append(rec)
            del timed
    return records


def main() -> None:
    p = timing.parser(__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["fwd", "bwd", "both"], default="both")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--no-sweep", action="store_true", help="only the production sizes")
    p.add_argument("--no-production", action="store_true", help="only the sweep")
    p.add_argument("--eager-max-l", type=int, default=4096, help="longest L for the eager reference (O(L^2) memory)")
    args = p.parse_args()
    device = timing.setup(args)
    env = timing.environment(device)
    provs = providers(args, device)
    production, sweep = (DRY_PRODUCTION, DRY_SWEEP) if args.dry_run else (PRODUCTION, SWEEP)
    cases = ([] if args.no_production else [(s, "production") for s in production]) + \
            ([] if args.no_sweep else [(s, "sweep") for s in sweep])
    print(f"{env['device_name']}  torch {env['torch']}  triton {env['triton']}  providers {list(provs)}", flush=True)
    records = []
    for shape, kind in cases:
        print(f"B,H,D,Lq,Lk = {shape} ({kind}): {flops(*shape, 'fwd') / 1e12:.3g} TFLOP forward", flush=True)
        new = run_case(args, device, env, provs, shape, kind)
        timing.append_jsonl(args.out / "bench_attention.jsonl", new)  # keep what is done if a later case dies
        records += new
    for mode in ("fwd", "bwd"):
        sweep_recs = [r for r in records if r["case"] == "sweep" and r["mode"] == mode]
        if not sweep_recs:
            continue
        series: dict[str, list] = {}
        for r in sweep_recs:
            series.setdefault(r["provider"], []).append((r["Lq"], r["tflops"]))
        B, H, D = sweep_recs[0]["B"], sweep_recs[0]["H"], sweep_recs[0]["D"]
        report.plot(args.out / f"bench_attention{'' if mode == 'fwd' else '_bwd'}.png", series, "L (= Lq = Lk)",
                    "TFLOP/s", f"attention {mode}, B={B} H={H} D={D} {sweep_recs[0]['dtype']} - {env['device_name']}",
                    hlines=None if args.dry_run or mode == "bwd" else ANCHORS)
    print(f"{len(records)} records -> {args.out / 'bench_attention.jsonl'}")
    if not records:
        sys.exit("no measurement succeeded")


if __name__ == "__main__":
    main()
