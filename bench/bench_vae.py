"""Wan2.2 VAE benchmark: encode and decode time and peak memory, untiled vs tiled decode.

Random weights (`random_vae`, deterministic), so it needs no checkpoint; the timings do not depend on the
values. Peak memory: CUDA `max_memory_allocated` on a GPU (reset before each phase); on a CPU the peak RSS
of the process (VmHWM, reset per phase through /proc/self/clear_refs where Linux allows it, else the
process-lifetime `ru_maxrss`, which only grows). Each phase also reports its peak above the memory in use
when it started (weights, inputs). CPU numbers are coarse: the C allocator keeps memory freed by an
earlier phase, so a later phase can reuse it without raising the RSS, and the output of a phase's first call
is kept (on the host) while its timed calls run. Times: the best of --repeats timed calls after the untimed
first call and --warmup more (bench/timing.py `measure`).

    python bench/bench_vae.py                                  # full size: 1280x704x121, latent [48,31,44,80]
    python -m anyid_rt.bench.bench_vae ...                     # the same
    python bench/bench_vae.py --preset tiny --height 64 --width 64 --frames 9
    python bench/bench_vae.py --dtype bf16 --tile 24x40 --overlap 8

Prints a table and appends one JSON line per run to bench/results/vae.jsonl.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from anyid_rt.bench.timing import RESULTS, PhasePeak, append_jsonl, environment, measure
from anyid_rt.config import DTYPES, PRESETS, VAEConfig, parse_dtype
from anyid_rt.engine import TINY_DEFAULTS, Defaults
from anyid_rt.models.random_weights import random_vae
from anyid_rt.models.vae_tiling import VAETiling

DEFAULT_SHAPES = {"wan2.2-ti2v-5b": Defaults(), "tiny": TINY_DEFAULTS}  # the engine's default video per preset


def timed(fn, device: torch.device, mem: PhasePeak, repeats: int, warmup: int):
    """One phase: (the first call's output on the host, best seconds of the timed calls, (peak GiB, peak GiB
    above the memory in use when the phase started))."""
    mem.reset()
    m = measure(fn, warmup=warmup, reps=repeats, device=device, inspect=lambda out: out.cpu())
    peak = mem.peak_gib()
    return m.first_result, m.timing.min_ms / 1e3, (peak, peak - mem.start_gib)


# ---- helpers --------------------------------------------------------------------------------------------

def parse_tile(text: str | None, lh: int, lw: int, overlap: int) -> VAETiling:
    """'HxW' in latent pixels, or None for an automatic 2x2 grid: tiles of ceil((size + overlap) / 2), with
    the overlap cut to a quarter of the latent for small latents."""
    if text:
        try:
            th, tw = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--tile must look like 24x40 (latent pixels), got {text!r}") from None
    else:
        overlap = min(overlap, max(1, min(lh, lw) // 4))
        th, tw = math.ceil((lh + overlap) / 2), math.ceil((lw + overlap) / 2)
    th, tw = min(th, lh), min(tw, lw)
    ov = min(overlap, max(0, min(th, tw) - 1))
    return VAETiling(th, tw, ov)


# ---- main -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="wan2.2-ti2v-5b")
    ap.add_argument("--height", type=int, help="pixels, multiple of 16 (default: 704 full size, 64 tiny)")
    ap.add_argument("--width", type=int, help="pixels, multiple of 16 (default: 1280 full size, 64 tiny)")
    ap.add_argument("--frames", type=int, help="4n+1 (default: 121 full size, 9 tiny)")
    ap.add_argument("--tile", help="decode tile HxW in latent pixels (default: a 2x2 grid)")
    ap.add_argument("--overlap", type=int, default=8, help="tile overlap in latent pixels (default 8)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per phase (the best is reported)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed runs per phase after the untimed first call (default 1 on CUDA, 0 on CPU)")
    ap.add_argument("--skip-untiled", action="store_true", help="skip the untiled decode (if it does not fit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "vae.jsonl"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype, "--dtype")
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    cfg = VAEConfig.preset(args.preset)
    default = DEFAULT_SHAPES[args.preset]
    h, w, t = args.height or default.height, args.width or default.width, args.frames or default.num_frames
    s, tc = cfg.spatial_compression, cfg.temporal_compression
    if h % s or w % s or (t - 1) % tc:
        raise SystemExit(f"need H, W multiples of {s} and frames = {tc}n+1; got {h}x{w}x{t}")
    lat_shape = (1, cfg.z_dim, 1 + (t - 1) // tc, h // s, w // s)
    tiling = parse_tile(args.tile, lat_shape[3], lat_shape[4], args.overlap)

    t_build = time.perf_counter()
    vae = random_vae(cfg, seed=args.seed, dtype=dtype, device=device)
    t_build = time.perf_counter() - t_build
    params_gib = sum(p.numel() * p.element_size() for p in vae.parameters()) / 2 ** 30
    g = torch.Generator().manual_seed(args.seed + 1)
    video = (torch.rand(1, 3, t, h, w, generator=g) * 2 - 1).to(device)
    latent = torch.randn(lat_shape, generator=g).to(device)
    mem = PhasePeak(device)
    env = environment(device)

    rows = []
    with torch.inference_mode():
        z, enc_s, enc_mem = timed(lambda: vae.encode(video), device, mem, args.repeats, warmup)
        assert tuple(z.shape) == lat_shape, (tuple(z.shape), lat_shape)
        del z
        rows.append(("encode", tuple(video.shape), lat_shape, enc_s, enc_mem))
        # tiled first: on a CPU the allocator keeps freed memory, which would hide a smaller later peak
        tiled, tdec_s, tdec_mem = timed(lambda: vae.decode(latent, tile=tiling), device, mem, args.repeats, warmup)
        rows.append((f"decode tiled {tiling.tile_h}x{tiling.tile_w}/{tiling.overlap}", lat_shape,
                     tuple(tiled.shape), tdec_s, tdec_mem))
        untiled = None
        if not args.skip_untiled:
            untiled, dec_s, dec_mem = timed(lambda: vae.decode(latent), device, mem, args.repeats, warmup)
            rows.append(("decode", lat_shape, tuple(untiled.shape), dec_s, dec_mem))
    seam = None
    if untiled is not None:
        d = (tiled - untiled).abs()
        seam = {"max_abs": d.max().item(), "mean_abs": d.mean().item()}

    print(f"Wan2.2 VAE [{args.preset}] {args.dtype} on {env['device_name']}; weights {params_gib:.2f} GiB "
          f"(random, built in {t_build:.1f} s); memory: {mem.how}")
    print(f"{'phase':<26} {'input':<24} {'output':<24} {'seconds':>9} {'peak GiB':>9} {'above start':>11}")
    for name, shape_in, shape_out, sec, (peak, extra) in rows:
        print(f"{name:<26} {str(list(shape_in)):<24} {str(list(shape_out)):<24} {sec:>9.3f} {peak:>9.3f} "
              f"{extra:>11.3f}")
    if seam is not None:
        print(f"tiled vs untiled (random weights, not a quality measure): max |diff| {seam['max_abs']:.4f}, "
              f"mean {seam['mean_abs']:.5f}")

    record = {
        "bench": "vae", **env, "preset": args.preset, "dtype": args.dtype, "video_shape": [1, 3, t, h, w],
        "latent_shape": list(lat_shape),
        "tiling": {"tile_h": tiling.tile_h, "tile_w": tiling.tile_w, "overlap": tiling.overlap},
        "repeats": args.repeats, "warmup": warmup, "weights_gib": round(params_gib, 4), "memory": mem.how,
        "encode_s": enc_s, "encode_peak_gib": enc_mem[0], "encode_peak_above_start_gib": enc_mem[1],
        "decode_s": None if args.skip_untiled else dec_s,
        "decode_peak_gib": None if args.skip_untiled else dec_mem[0],
        "decode_peak_above_start_gib": None if args.skip_untiled else dec_mem[1],
        "decode_tiled_s": tdec_s, "decode_tiled_peak_gib": tdec_mem[0], "decode_tiled_peak_above_start_gib": tdec_mem[1],
        "tiled_vs_untiled": seam,
    }
    append_jsonl(args.out, [record])
    print(f"appended to {args.out}")
    return record


if __name__ == "__main__":
    main()
