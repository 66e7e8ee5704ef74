"""Fewer forwards, measured side by side in one run: seconds per video by stage and DiT forwards for the 50-step
guided baseline, a 4-step DMD run, MagCache and TeaCache at their published thresholds, and AnyID references
(4 images + one 121-frame clip) under joint attention and isolated attention with and without the reference K/V
cache, with the FLOP model (models.dit.count_flops, ARCHITECTURE.md section 7) beside the measurement.

    python bench/bench_fewer_forwards.py                  # CPU: a reduced-width random DiT, results/ appended
    python bench/bench_fewer_forwards.py --device cuda --dim 3072 --layers 30 --heads 24 --ffn 14336

The model has random weights, so the step caches' skip counts are those of this model's own curves (measured here
with Engine.calibrate_cache, as `anyid-rt calibrate-cache` does), not the 5B's; the MagCache count for the 5B at
its published threshold is computed from its published curve alone (the rule reads nothing else). Quality is not
measured here (random weights): docs/fewer-forwards.md cites the published figures.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from anyid_rt.bench.report import bar_plot
from anyid_rt.bench.timing import RESULTS, append_jsonl, environment, measure
from anyid_rt.conditioning import ConditioningLayout, StepLayout
from anyid_rt.config import DiTConfig, ModelConfig
from anyid_rt.engine import Defaults, Engine
from anyid_rt.models.dit import count_flops, grid_of
from anyid_rt.models.random_weights import random_dit
from anyid_rt.reference_kv import ReferenceKV
from anyid_rt.request import GenerationRequest
from anyid_rt.step_cache import PUBLISHED_TI2V_5B, magcache_skips

PROMPT = "A woman turns toward the camera and smiles."
STAGES = ("text_encode", "reference_encode", "denoise", "vae_decode")


def build_engine(args, layout: ConditioningLayout) -> Engine:
    tiny = Engine.tiny(seed=0, device=args.device)
    cfg = DiTConfig(dim=args.dim, ffn_dim=args.ffn, num_heads=args.heads, num_layers=args.layers,
                    text_dim=tiny.dit.cfg.text_dim, freq_dim=128)
    dit = random_dit(cfg, device=args.device, seed=0).fuse_projections()
    return Engine(dit, tiny.vae, tiny.text_encoder, layout=layout, device=args.device,
                  defaults=Defaults(height=args.height, width=args.width, num_frames=args.frames, steps=50))


def references(args) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(4)]
    return images + [rng.integers(0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8)]


def published_magcache_forwards(steps: int = 50) -> dict:
    """The 5B at MagCache's published setting (E006K2R02): the rule reads only the published curve, so its skips
    are exact without the weights."""
    skipped = sum(len(r) for r in magcache_skips(PUBLISHED_TI2V_5B, steps, 0.06))
    return {"forwards": 2 * steps - skipped, "skipped": skipped, "ratio": 2 * steps / (2 * steps - skipped)}


def step_ratio(engine: Engine, args) -> dict:
    """One guided DiT step over [target; references] (joint) against the target's tokens with cached reference
    K/V (isolated), same shapes: measured seconds and the FLOP model."""
    dit, dev = engine.dit, torch.device(args.device)
    shape = engine.geometry.latent_shape(args.frames, args.height, args.width)
    x = torch.randn(2, 48, *shape, device=dev)
    refs = [torch.randn(2, 48, 1, *shape[1:], device=dev) for _ in range(4)] + [torch.randn(2, 48, *shape, device=dev)]
    layout = StepLayout.build(ConditioningLayout(), engine.geometry, shape, [r.shape[2] for r in refs], False)
    text_kv = dit.prepare_text([torch.randn(8, dit.cfg.text_dim, device=dev)] * 2)
    kv = ReferenceKV.build(dit, refs, layout.frame_starts[1:], layout.reference_segments(2, dev), text_kv)

    def joint():
        return dit.forward_groups([x, *refs], layout.frame_starts, layout.segments(500.0, 2, dev), text_kv)

    def cached():
        stack = lambda h, e, e0, s, rope, tkv, ops: dit.run_blocks(  # noqa: E731
            h, e0, s, rope, tkv, ops, attention_for=kv.attention_for(ops.attention))
        return dit.forward_groups([x], layout.frame_starts[:1], layout.segments(500.0, 2, dev, target_only=True),
                                  text_kv, stack)

    with torch.inference_mode():  # alternated, so that a change of load on a shared machine hits both alike
        times: dict[str, list[float]] = {"joint": [], "cached": []}
        for _ in range(args.reps):
            for name, fn in (("joint", joint), ("cached", cached)):
                times[name] += measure(fn, warmup=0, reps=1, device=dev).times_ms
        t_joint, t_cached = float(np.median(times["joint"])), float(np.median(times["cached"]))
    n_target = int(np.prod(grid_of(dit.cfg, x)))
    n_all = n_target + layout.ref_tokens
    cfg5b = ModelConfig.preset("wan2.2-ti2v-5b").dit
    return {"tokens_target": n_target, "tokens_all": n_all, "joint_ms": t_joint, "cached_ms": t_cached,
            "measured_ratio": t_cached / t_joint,
            "flop_ratio_here": count_flops(dit.cfg, n_target, n_all) / count_flops(dit.cfg, n_all),
            "flop_ratio_5b_58080": count_flops(cfg5b, 27280, 58080) / count_flops(cfg5b, 58080)}


def run(args) -> list[dict]:
    env = environment(args.device)
    base = build_engine(args, ConditioningLayout(max_clip_frames=args.frames))
    iso = build_engine(args, ConditioningLayout(max_clip_frames=args.frames, reference_attention="isolated"))
    size = dict(height=args.height, width=args.width, num_frames=args.frames, progress=False)
    t0 = time.perf_counter()
    # the curves of this model (random weights), measured at --calib-steps and resampled to 50 as MagCache does
    base.calibrate_cache([GenerationRequest(p, steps=args.calib_steps, **{k: v for k, v in size.items()
                                                                           if k != "progress"})
                          for p in (PROMPT, "A man walks through a park.")], save=False)
    calib_s = time.perf_counter() - t0
    print(f"calibrated the step-cache curves in {calib_s:.1f} s", flush=True)
    refs = references(args)
    runs = [("baseline 50 steps, guidance 5", base, dict(steps=50)),
            ("DMD 4 steps, guidance 1", base, dict(sampler="dmd", timesteps=[1000, 750, 500, 250], shift=1.0,
                                                    guidance=1.0)),
            ("MagCache 0.06", base, dict(steps=50, cache="magcache")),
            ("TeaCache 0.26", base, dict(steps=50, cache="teacache")),
            (f"refs joint, {args.ref_steps} steps", base, dict(steps=args.ref_steps, references=refs)),
            (f"refs isolated, no K/V cache, {args.ref_steps} steps", iso, dict(steps=args.ref_steps, references=refs,
                                                                               _reuse=False)),
            (f"refs isolated + K/V cache, {args.ref_steps} steps", iso, dict(steps=args.ref_steps, references=refs))]
    records = []
    for engine in (base, iso):  # warm-up: first calls allocate and pick kernels
        engine.generate(PROMPT, steps=2, references=refs, **size)
    for name, engine, kw in runs:
        engine.reuse_reference_kv = kw.pop("_reuse", True)
        engine.reference_cache.clear()  # every run encodes its references (the cache would hide that stage)
        video = engine.generate(PROMPT, seed=1, **size, **kw)
        rec = {"bench": "fewer_forwards", "mode": name, **{k: v for k, v in kw.items() if k != "references"},
               "references": "4 images + 1 clip" if "references" in kw else None, "stats": video.stats,
               "timings": {k: round(v, 4) for k, v in video.timings.items()},
               "config": dict(dim=args.dim, layers=args.layers, heads=args.heads, ffn=args.ffn, height=args.height,
                              width=args.width, frames=args.frames), "env": env}
        records.append(rec)
        print(f"{name:45s} total {video.timings['total']:7.2f} s  denoise {video.timings['denoise']:7.2f} s  "
              f"forwards {video.stats['dit_forwards']:3d} run / {video.stats['dit_forwards_skipped']:3d} skipped",
              flush=True)
    ratio = step_ratio(base, args)
    pub = published_magcache_forwards()
    summary = {"bench": "fewer_forwards_summary", "calibration_s": round(calib_s, 2), "kv_step": ratio,
               "published_magcache_5b": pub, "env": env}
    records.append(summary)
    print(f"per guided step at {ratio['tokens_all']} tokens ({ratio['tokens_target']} target): joint "
          f"{ratio['joint_ms']:.1f} ms, target + cached reference K/V {ratio['cached_ms']:.1f} ms -> measured "
          f"{ratio['measured_ratio']:.2f}x, FLOP model {ratio['flop_ratio_here']:.2f}x here, "
          f"{ratio['flop_ratio_5b_58080']:.2f}x for the 5B at 58,080 tokens")
    print(f"MagCache on the 5B (published curve, threshold 0.06, K 2, retention 0.2): {pub['forwards']} of 100 "
          f"forwards ({pub['ratio']:.2f}x fewer)")
    append_jsonl(args.out / "fewer_forwards.jsonl", records)
    plot(records[:-1], args.out / "fewer_forwards.png", env)
    return records


def plot(records: list[dict], path, env: dict) -> None:
    groups = [r["mode"].replace(", ", "\n").replace("refs ", "") for r in records]
    series = {s: [r["timings"].get(s, 0.0) for r in records] for s in STAGES}
    title = (f"Seconds per video by stage ({env.get('device')}, {str(env.get('commit'))[:7]}, "
             f"{env.get('date', '')[:10]})")
    if bar_plot(path, groups, series, "seconds", title):
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=61,
                   help="video frames, and the reference clip's (121 gives the 5B's 58,080 / 27,280 token ratio)")
    p.add_argument("--ref-steps", type=int, default=10, help="steps of the runs with references")
    p.add_argument("--calib-steps", type=int, default=20, help="steps of the step-cache calibration runs")
    p.add_argument("--reps", type=int, default=7, help="alternated repetitions of the per-step comparison")
    p.add_argument("--step-only", action="store_true",
                   help="only the per-step comparison (joint vs target + cached reference K/V) at these sizes")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.step_only:
        step_only(args)
    else:
        run(args)
    return 0


def step_only(args) -> dict:
    env = environment(args.device)
    ratio = step_ratio(build_engine(args, ConditioningLayout(max_clip_frames=args.frames)), args)
    rec = {"bench": "fewer_forwards_kv_step", "kv_step": ratio, "config": dict(
        dim=args.dim, layers=args.layers, heads=args.heads, ffn=args.ffn, height=args.height, width=args.width,
        frames=args.frames, reps=args.reps), "env": env}
    append_jsonl(args.out / "fewer_forwards.jsonl", [rec])
    print(f"per guided step at {ratio['tokens_all']} tokens ({ratio['tokens_target']} target), dim {args.dim}: joint "
          f"{ratio['joint_ms']:.0f} ms, target + cached reference K/V {ratio['cached_ms']:.0f} ms -> measured "
          f"{ratio['measured_ratio']:.2f}x (FLOP model {ratio['flop_ratio_here']:.2f}x)")
    return rec


if __name__ == "__main__":
    raise SystemExit(main())
