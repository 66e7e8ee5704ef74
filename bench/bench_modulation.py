"""Memory-bound DiT kernels: timestep-split LayerNorm-modulate, gated residual, and the two norms.

GB/s = (bytes read + bytes written) / time, counting each tensor once (x, modulation rows, output). Baselines:
the torch reference (`*_ref`, eager; `--compile` adds it under torch.compile) and the measured copy bandwidth
of the same traffic (`dst.copy_(src)` moving the same total bytes: half read, half written), the practical
ceiling of a one-pass kernel. Sizes: B=2 (CFG), width 3072, 27,280 tokens as an image-to-video step (frame 0 at
t=0: segments 880 + 26,400) and 58,080 tokens with references (target 27,280 + references 30,800 at t=0).
The norms (q/k RMSNorm over the full width, the same with the RoPE rotation fused into its output as the DiT's
self-attention calls it, affine LayerNorm) are the same kind of one-pass row kernel and are measured here on
the same tokens. Appends JSON lines to <out>/bench_modulation.jsonl, plots
<out>/bench_modulation.png.

    python bench/bench_modulation.py [--compile] [--out DIR] [--dry-run]
"""
from __future__ import annotations

from anyid_rt.bench import report, timing

CASES = [(2, (880, 26400), 3072), (2, (27280, 30800), 3072)]  # (B, seg_lens, D)
DRY_CASES = [(1, (5, 32), 48), (1, (5, 40, 5), 40)]


def ops(B: int, seg_lens: tuple[int, ...], D: int, device: str, act_dtype):
    """name -> (inputs, triton fn, reference fn); activations in act_dtype, residual and modulation in fp32."""
    import torch

    from anyid_rt.kernels import SegmentMap
    from anyid_rt.kernels import modulation as m
    from anyid_rt.kernels import norm as n

    L, S = sum(seg_lens), len(seg_lens)
    seg = SegmentMap.from_lens(seg_lens, device)  # its index is read by the references only (8 bytes a token)
    x = torch.randn(B, L, D, device=device).to(act_dtype)
    shift, scale, gate = torch.randn(3, B, S, D, device=device).unbind(0)
    residual = torch.randn(B, L, D, device=device)
    w, b = torch.randn(D, device=device), torch.randn(D, device=device)
    head_dim = 128 if D % 128 == 0 else 8  # 24 heads of 128 at the 5B width; the dry run's toy widths
    angles = torch.rand(L, head_dim // 2, device=device) * 100
    rope = (angles.cos(), angles.sin())  # [L, D/2] fp32, read as traffic
    return {
        "layernorm_modulate": ((x, shift, scale, seg), m.layernorm_modulate, m.layernorm_modulate_ref),
        "gated_residual": ((residual, x, gate, seg), m.gated_residual, m.gated_residual_ref),
        "rms_norm": ((x, w, 1e-6), n.rms_norm, n.rms_norm_ref),
        "rms_norm_rope": ((x, w, 1e-6, rope, D // head_dim), n.rms_norm_rope, n.rms_norm_rope_ref),
        "layer_norm": ((x, w, b, 1e-6), n.layer_norm, n.layer_norm_ref),
    }


def traffic_bytes(inputs, out) -> int:
    """Bytes read (every tensor input once) plus bytes written (the output)."""
    import torch

    tensors = [t for x in inputs for t in (x if isinstance(x, tuple) else (x,)) if isinstance(t, torch.Tensor)]
    read = sum(t.numel() * t.element_size() for t in tensors)
    return read + out.numel() * out.element_size()


def main() -> None:
    p = timing.parser(__doc__.split("\n\n")[0])
    p.add_argument("--compile", action="store_true", help="also time the references under torch.compile")
    args = p.parse_args()
    device = timing.setup(args)

    import torch

    env = timing.environment(device)
    act_dtype = torch.float16 if args.dry_run else torch.bfloat16
    print(f"{env['device_name']}  torch {env['torch']}  triton {env['triton']}", flush=True)
    records = []
    for B, seg_lens, D in (DRY_CASES if args.dry_run else CASES):
        L = sum(seg_lens)
        for name, (inputs, fn, ref) in ops(B, seg_lens, D, device, act_dtype).items():
            out = fn(*inputs)
            nbytes = traffic_bytes(inputs, out)
            diff = (out.float() - ref(*inputs).float()).abs().max().item()  # sanity: rounding-level
            half = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            half_dst = torch.empty_like(half)
            providers = {"triton": lambda: fn(*inputs), "torch-ref": lambda: ref(*inputs),
                         "copy": lambda: half_dst.copy_(half)}
            if args.compile:
                compiled = torch.compile(ref, dynamic=False)
                providers["torch-compile"] = lambda: compiled(*inputs)  # noqa: B023 (timed in this iteration)
            for provider, timed in providers.items():
                t = timing.bench_ms(timed, args)
                rec = {"bench": "modulation", "op": name, "provider": provider, "B": B, "L": L, "D": D,
                       "seg_lens": list(seg_lens), "act_dtype": str(act_dtype).removeprefix("torch."),
                       "bytes": nbytes, **t, "gbps": nbytes / (t["ms"] * 1e-3) / 1e9,
                       "peak_gib": timing.peak_memory(timed, device),
                       "max_abs_diff_vs_ref": diff if provider == "triton" else None, **env}
                timing.print_row(rec, ("op", "provider", "L", "D", "ms", "gbps", "max_abs_diff_vs_ref"))
                records.append(rec)
            half = half_dst = None  # free before the next case (not `del`: the timed lambda names them)
        timing.append_jsonl(args.out / "bench_modulation.jsonl", [r for r in records if r["L"] == L and r["B"] == B])
    # plot: GB/s per op and provider at the largest case, against the copy bandwidth of the same traffic
    largest = [r for r in records if r["L"] == max(r["L"] for r in records)]
    op_names = list(dict.fromkeys(r["op"] for r in largest))
    series: dict[str, list[float]] = {}
    for r in largest:
        series.setdefault(r["provider"], [0.0] * len(op_names))[op_names.index(r["op"])] = r["gbps"]
    report.bar_plot(args.out / "bench_modulation.png", op_names, series, "GB/s (read + written)",
                    f"memory-bound kernels, B={largest[0]['B']} L={largest[0]['L']} D={largest[0]['D']} "
                    f"{largest[0]['act_dtype']} - {env['device_name']}")
    print(f"{len(records)} records -> {args.out / 'bench_modulation.jsonl'}")


if __name__ == "__main__":
    main()
