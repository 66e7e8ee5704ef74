"""`anyid-rt bench`: end-to-end benchmark of the engine against diffusers, on the same weights, inputs, device
and run.

One run appends JSON lines to `<out>/e2e.jsonl` (default `bench/results/`), one record per measurement, each
carrying the environment (device, driver, torch / triton / diffusers versions, git commit, date):

- `ceiling`: what this device really does, measured in the same run: a large matmul (bf16 8192^3 on a GPU;
  TFLOP/s) and a device-to-device copy (GB/s, bytes read plus bytes written). MFU is also given against it.
- `stage`: text encoding (umT5-XXL at full size with random weights, conditional and empty prompt, 512
  positions each as the official code), reference encoding (VAE encode of N images and one clip), VAE decode
  untiled and tiled, and the per-prompt text K/V projection of the DiT; time and peak memory of each.
- `dit_step`: one guided denoising step (batch 2: conditional and unconditional pass) at the full shape, for
  every variant: our engine with the torch and the Triton backend, each eager and under torch.compile, with
  FP8 linears, and diffusers' `WanTransformer3DModel` with the fastest attention backend found on the machine
  (the baseline, measured in the same run). All variants run the SAME random weights (one copy, shared by
  storage; diffusers gets them through the key map) on the same inputs (noise, timestep, text context
  zero-padded to 512; diffusers gets per-token timesteps [B, L] as `expand_timesteps` builds them and the
  references concatenated along time). Each record gives the latency quantiles, achieved TFLOP/s, MFU against
  the dense peak and against the measured ceiling, peak memory, the speedup over the baseline, the relative
  error against our torch-backend output, and the seconds per video composed from measured parts (`steps` x
  step latency + text encode + text K/V + reference encode + decode).
- `diffusers_backend`: every diffusers attention backend tried, with its time or the reason it did not run.
- `video` (with `--full-video`): a whole `Engine.generate` measured end to end.

Timing (bench/timing.py) follows `triton.testing.do_bench`: CUDA events around each repetition, median and
20/80% quantiles. The first call of every variant (compilation, autotuning, cuDNN plan choice) is never timed
with the rest: it is reported as `first_call_s`, `--warmup` more untimed calls follow, then `--steps-timed`
timed ones. Nothing is skipped silently: a variant that cannot run here is recorded with `status: "skipped"`
and the reason (Triton or torch.compile on a CPU, diffusers not installed, FP8 without an sm89+ GPU), one that
breaks with `status: "failed"` and the error.

    anyid-rt bench                                    # 5B shapes on the GPU: 1280x704x121, + 4 images + a clip
    anyid-rt bench --cases t2v --variants diffusers,triton,triton+compile --steps-timed 3
    anyid-rt bench --preset tiny --device cpu --steps-timed 1 --warmup 0   # the whole path in seconds on a CPU
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from anyid_rt.config import DTYPE_NAMES, PRESETS

# torch and the measuring modules are imported when a run starts (cmd_bench), not here: `--help` stays instant
from .settings import CASE_NAMES, RESULTS_FILE, STAGE_NAMES, Settings


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _stages(text: str) -> frozenset[str]:
    return frozenset(_names(text)) - {"none"}


def _tile(text: str) -> tuple[int, int, int]:
    parts = _names(text)
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: want tile_h,tile_w,overlap in latent cells, e.g. 32,32,8")
    return tuple(int(p) for p in parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `anyid-rt bench`, one per field of `Settings` (same names), with its defaults."""
    d = Settings()
    g = p.add_argument_group("what and where")
    g.add_argument("--preset", default=d.preset, choices=PRESETS,
                   help="model sizes (random weights): the 5B (default) or tiny (runs on a CPU in seconds)")
    g.add_argument("--device", default=d.device, help="cuda, cuda:1 or cpu (default: cuda when available)")
    g.add_argument("--dtype", default=d.dtype, choices=DTYPE_NAMES,
                   help="DiT weights / compute dtype (default bf16 on a GPU, fp32 on a CPU)")
    g.add_argument("--cases", type=_names, default=d.cases,
                   help=f"comma list of {', '.join(CASE_NAMES)}: the target alone, or target + --refs images + "
                        "one clip (default both)")
    g.add_argument("--variants", type=_names, default=d.variants,
                   help="comma list of torch|triton|diffusers[+compile][+fp8] (default: all that apply)")
    g.add_argument("--stages", type=_stages, default=d.stages,
                   help=f"comma list of {','.join(STAGE_NAMES)} (or 'none'); the ceiling always runs")
    g = p.add_argument_group("shape (default: the preset's, 1280x704x121 for the 5B)")
    g.add_argument("--height", type=int, default=d.height)
    g.add_argument("--width", type=int, default=d.width)
    g.add_argument("--frames", type=int, default=d.frames, help="4n+1")
    g.add_argument("--refs", type=int, default=d.refs, help="image references in the refs case (default %(default)s)")
    g.add_argument("--ref-clip-frames", type=int, default=d.ref_clip_frames,
                   help="frames of the reference clip in the refs case (default --frames; 0: no clip)")
    g.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens,
                   help="real rows of the prompt embedding (default %(default)s)")
    g = p.add_argument_group("timing")
    g.add_argument("--steps-timed", type=int, default=d.steps_timed,
                   help="timed guided steps per variant (default %(default)s)")
    g.add_argument("--warmup", type=int, default=d.warmup,
                   help="untimed steps after the first call, which is always untimed and reported "
                        "(default %(default)s)")
    g.add_argument("--stage-repeats", type=int, default=d.stage_repeats,
                   help="timed repetitions of each stage (default %(default)s)")
    g.add_argument("--stage-warmup", type=int, default=d.stage_warmup,
                   help="untimed repetitions of each stage after its untimed first call (default %(default)s)")
    g.add_argument("--time-budget", type=float, default=d.time_budget,
                   help="seconds; what would start after that is recorded as skipped (fit a device time limit)")
    g = p.add_argument_group("sampling (for FLOPs and seconds per video)")
    g.add_argument("--steps", type=int, default=d.steps, help="denoising steps per video (default %(default)s)")
    g.add_argument("--guidance", type=float, default=d.guidance,
                   help="guidance scale; 1 = batch 1 (default %(default)s)")
    g.add_argument("--timestep", type=float, default=d.timestep, help="the step's timestep (default %(default)s)")
    g = p.add_argument_group("components")
    g.add_argument("--text-encoder", default=d.text_encoder, choices=["full", "layers", "skip"],
                   help="full umT5 (5.7B, 11.4 GB bf16), or --text-layers layers at full width scaled up")
    g.add_argument("--text-layers", type=int, default=d.text_layers,
                   help="layers measured with --text-encoder layers (default %(default)s)")
    g.add_argument("--vae-dtype", default=d.vae_dtype, choices=DTYPE_NAMES,
                   help="VAE dtype (default %(default)s, the engine's)")
    g.add_argument("--vae-tile", type=_tile, default=d.vae_tile,
                   help="tiled decode: tile_h,tile_w,overlap in latent cells (default 32,32,8)")
    g.add_argument("--diffusers-backends", type=_names, default=d.diffusers_backends,
                   help="diffusers attention backends to try; the fastest that runs is the baseline "
                        f"(default {','.join(d.diffusers_backends)})")
    g.add_argument("--compile", default=d.compile, choices=["auto", "on", "off"],
                   help="compiled variants: auto = on a GPU only")
    g.add_argument("--compile-backend", default=d.compile_backend,
                   help="torch.compile backend (eager: tracing check)")
    g.add_argument("--compile-mode", default=d.compile_mode, help="torch.compile mode (default: inductor's default)")
    g.add_argument("--triton-interpret", action="store_true",
                   help="on a CPU, run the Triton variants under TRITON_INTERPRET=1 (correctness only)")
    g.add_argument("--full-video", action="store_true",
                   help="also run Engine.generate end to end (--steps steps) with the fastest variant")
    g.add_argument("--full-video-variant", default=d.full_video_variant,
                   help="variant for --full-video (default: the fastest)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=d.out, help=f"folder; records are appended to {RESULTS_FILE}")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--ceiling-n", type=int, default=d.ceiling_n,
                   help="matmul size of the ceiling (default 8192 GPU, 512 CPU)")
    g.add_argument("--ceiling-copy-gb", type=float, default=d.ceiling_copy_gb,
                   help="copy size of the ceiling (default 2 GB GPU)")
    g.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help="dense bf16 peak for MFU (default: by device name)")
    g.add_argument("--commit", default=d.commit, help="git commit to record where the checkout has no .git")
    g.add_argument("--tag", default=d.tag, help="free text stored in every record")
    g.add_argument("--strict", action="store_true", help="raise on the first failure instead of recording it")


def settings_from_args(args: argparse.Namespace, command_line: str | None = None) -> Settings:
    """The typed settings of parsed options (ValueError on a bad combination). Other attributes of the
    namespace (the `anyid-rt` subcommand, its handler) are not settings and are left out."""
    given = vars(args)
    return Settings(**{f.name: given[f.name] for f in fields(Settings) if f.name in given},
                    command_line=command_line)


def cmd_bench(args: argparse.Namespace, command_line: str | None = None) -> int:
    from .video import run_benchmark

    settings = settings_from_args(args, command_line)
    records = run_benchmark(settings)
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        print(f"anyid-rt bench: {len(failed)} measurement(s) failed; see 'reason' in "
              f"{Path(settings.out) / RESULTS_FILE}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anyid-rt bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """`anyid-rt bench ARGS` (anyid_rt/cli.py hands the arguments here) and `python bench/bench_e2e.py ARGS`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return cmd_bench(args, " ".join(shlex.quote(x) for x in ["anyid-rt", "bench", *argv]))
    except ValueError as e:
        print(f"anyid-rt bench: error: {e}", file=sys.stderr)
        return 2


__all__ = ["main", "settings_from_args", "add_arguments", "build_parser"]


if __name__ == "__main__":
    sys.exit(main())
