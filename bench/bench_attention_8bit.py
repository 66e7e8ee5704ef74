"""8-bit attention benchmark: INT8 Q/K + FP8 (or bf16) P/V Triton kernel vs the bf16 Triton attention vs SDPA.

TFLOP/s = 4 * B * H * Lq * Lk * D / time, forward only (the 8-bit attention is inference-only); the 8-bit
time includes its quantisation pre-pass (K mean, INT8 Q/K, E4M3 V), and `8bit-fp8-core` times the
attention kernel alone on pre-quantised operands, to show the split. Accuracy in the same run: cosine
similarity and relative L2 error of every provider against attention in fp32 (SDPA math) on a subsample of
--acc-rows query rows over all keys.
Sizes: Wan2.2-TI2V-5B self-attention at 1280x704x121, B=2 (CFG), 24 heads, D=128: Lq = Lk = 27,280 and
58,080 (four reference images and a reference clip), and 27,280 queries over 58,080 keys (reference K/V
reused). Providers: 8bit-fp8 / 8bit-bf16 (attention_8bit, pv=...), 8bit-fp8-core, triton (the bf16 flash
attention, anyid_rt.kernels.attention.attention), sdpa-flash / sdpa-cudnn ([B, H, L, D] inputs). All take q
and k as the DiT hands them over, already rotated by RoPE in its q/k norm.
Inputs are N(0, 1) with a per-channel key offset of --k-offset standard deviations (what smoothing is for).
Appends JSON lines to <out>/attention_8bit.jsonl (device, versions, commit, date in every line).

    python bench/bench_attention_8bit.py [--cases 27280,58080,27280x58080] [--acc-rows 256] [--out DIR]
"""
from __future__ import annotations

import sys

from anyid_rt.bench import timing

B, H, D = 2, 24, 128
CASES = {"27280": (27280, 27280), "58080": (58080, 58080), "27280x58080": (27280, 58080)}
DRY_SHAPES = [(1, 2, 32, 37, 37), (1, 2, 32, 37, 150)]  # toy sizes for the CPU dry run (Triton interpreter)


def flops(B: int, H: int, D: int, Lq: int, Lk: int) -> float:
    return 4.0 * B * H * Lq * Lk * D


def providers(device: str) -> dict:
    """name -> ([B, L, H, D] layout, fn(q, k, v), pv or None); those that run here."""
    from functools import partial

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from anyid_rt.kernels.attention import attention
    from anyid_rt.kernels.attention_8bit import attention_8bit, fp8_supported

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return fn

    out = {}
    if device == "cuda":
        import torch

        if fp8_supported(torch.cuda.get_device_capability()):
            out["8bit-fp8"] = (True, partial(attention_8bit, pv="fp8"), "fp8")
            out["8bit-fp8-core"] = (True, None, "fp8")  # built per case: the kernel on quantised operands
        out["8bit-bf16"] = (True, partial(attention_8bit, pv="bf16"), "bf16")
        out["triton"] = (True, attention, None)
        out["sdpa-flash"] = (False, sdpa(SDPBackend.FLASH_ATTENTION), None)
        out["sdpa-cudnn"] = (False, sdpa(SDPBackend.CUDNN_ATTENTION), None)
    else:  # the interpreter has no bf16 dots: fp16 P/V stands in for bf16
        out["8bit-fp8"] = (True, partial(attention_8bit, pv="fp8"), "fp8")
        out["8bit-fp8-core"] = (True, None, "fp8")
        out["8bit-fp16"] = (True, partial(attention_8bit, pv="fp16"), "fp16")
        out["triton"] = (True, attention, None)
        out["sdpa-default"] = (False, F.scaled_dot_product_attention, None)
    return out


def accuracy(out_blhd, ref, rows) -> dict:
    import torch

    o = out_blhd[:, rows].double().flatten()
    r = ref.double().flatten()
    return {"cosine": torch.nn.functional.cosine_similarity(o, r, dim=0).item(),
            "rel_l2_err": ((o - r).norm() / r.norm()).item(),
            "max_abs_err": (o - r).abs().max().item()}


def run_case(args, device, env, provs, shape, case):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from anyid_rt.kernels.attention import attention_ref
    from anyid_rt.kernels.attention_8bit import attention_8bit_core, quantize_8bit

    b, h, d, Lq, Lk = shape
    dtype = torch.float16 if args.dry_run else torch.bfloat16  # the interpreter has no bf16 dots
    q = torch.randn(b, Lq, h, d, device=device, dtype=dtype)
    k = (torch.randn(b, Lk, h, d, device=device) + args.k_offset * torch.randn(h, d, device=device)).to(dtype)
    v = torch.randn(b, Lk, h, d, device=device, dtype=dtype)
    head_major = [t.transpose(1, 2).contiguous() for t in (q, k, v)]  # [B, H, L, D] for SDPA

    rows = torch.randperm(Lq, device=device)[:args.acc_rows].sort().values
    with sdpa_kernel([SDPBackend.MATH]):  # fp32 reference on the subsample of query rows, all keys
        ref = attention_ref(q[:, rows].float(), k.float(), v.float())

    records = []
    for name, (blhd, fn, pv) in provs.items():
        if fn is None:  # 8bit-<pv>-core: quantise once outside the timed region
            quantised = quantize_8bit(q, k, v, pv=pv)
            fn = lambda q_, k_, v_, x=quantised: attention_8bit_core(x, dtype)  # noqa: E731
        inputs = (q, k, v) if blhd else head_major
        out = timing.first_call(name, fn, inputs)
        if out is None:
            continue
        acc = accuracy(out if blhd else out.transpose(1, 2), ref, rows)
        del out
        timed = lambda: fn(*inputs)  # noqa: E731
        t = timing.bench_ms(timed, args)
        rec = {"bench": "attention_8bit", "case": case, "provider": name, "B": b, "H": h, "D": d, "Lq": Lq,
               "Lk": Lk, "dtype": str(dtype).removeprefix("torch."), "pv": pv,
               "k_offset": args.k_offset, **t, "tflops": flops(b, h, d, Lq, Lk) / (t["ms"] * 1e-3) / 1e12,
               "peak_gib": timing.peak_memory(timed, device), **acc, "acc_rows": len(rows), **env}
        timing.print_row(rec, ("provider", "Lq", "Lk", "ms", "tflops", "cosine", "rel_l2_err", "peak_gib"))
        records.append(rec)
    return records


def main() -> None:
    p = timing.parser(" ".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    p.add_argument("--acc-rows", type=int, default=256, help="query rows in the fp32 accuracy reference")
    p.add_argument("--k-offset", type=float, default=4.0,
                   help="per-channel key mean, in standard deviations of the keys (default 4)")
    args = p.parse_args()
    device = timing.setup(args)  # before anything imports triton
    env = timing.environment(device)
    provs = providers(device)
    if args.dry_run:
        shapes = [(s, "dry-run") for s in DRY_SHAPES]
    else:
        unknown = set(args.cases.split(",")) - set(CASES)
        if unknown:
            p.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")
        shapes = [((B, H, D, *CASES[c]), c) for c in args.cases.split(",")]
    print(f"{env['device_name']}  torch {env['torch']}  triton {env['triton']}  providers {list(provs)}", flush=True)
    path = args.out / "attention_8bit.jsonl"
    n = 0
    for shape, case in shapes:
        print(f"B,H,D,Lq,Lk = {shape} ({case}): {flops(*shape) / 1e12:.3g} TFLOP", flush=True)
        records = run_case(args, device, env, provs, shape, case)
        timing.append_jsonl(path, records)  # keep what is done if a later case dies
        n += len(records)
    print(f"{n} records -> {path}")
    if not n:
        sys.exit("no measurement succeeded")


if __name__ == "__main__":
    main()
