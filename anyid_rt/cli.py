"""`anyid-rt`: generate videos and run the bundled demo.

    anyid-rt generate --model ./Wan2.2-TI2V-5B --prompt "..." --ref face.jpg --ref clip.mp4 --primary 0 --out x.mp4
    anyid-rt demo

Every request is checked before any model loads, in two steps: first what needs no torch (flags, sizes, that
every named file exists, that the outputs can be written: a typo fails in a fraction of a second), then, with
torch, what needs it (devices, LoRA files against the model's config, optional packages, the first frame of
every reference). A bad request exits with code 2 and a one-line reason naming the flag; Ctrl-C exits with
code 130 and one line; outputs are written beside their final name and renamed at the end, so neither leaves
a partial file. This module imports no torch until a command runs (`anyid-rt --help` stays fast).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

# Tools: subcommands whose code is tooling outside the runtime (bench/ is the package anyid_rt.bench). The
# runtime modules never import tooling; the CLI is the one place that launches it, so a tool's module is
# imported by name only when its subcommand runs, and parses the rest of the command line itself
# (`main(argv)`, with its own --help). `anyid-rt --help` still lists it.
TOOLS = {"bench": ("anyid_rt.bench.e2e", "end-to-end benchmark against diffusers (see README.md, Benchmarks)")}
DEMO_PROMPT = ("Shot type: medium close-up. Expression: a calm smile. Action: slowly turns the head toward the "
               "camera. Background: a sunlit garden.")

# Python argument -> the flag that sets it: request checks name what the user typed (`--frames 10`, not
# `num_frames=10`)
CLI_NAMES = {"prompt": "--prompt", "references": "--ref", "primary": "--primary", "image": "--image",
             "negative_prompt": "--negative-prompt", "height": "--height", "width": "--width",
             "num_frames": "--frames", "steps": "--steps", "guidance": "--guidance", "shift": "--shift",
             "sampler": "--sampler", "seed": "--seed", "output": "--out", "path": "--model", "lora": "--lora",
             "dtype": "--dtype", "backend": "--backend", "device": "--device",
             "text_encoder_device": "--text-encoder-device", "timings_json": "--timings-json",
             "compile": "--compile", "sequence_parallel": "--sequence-parallel", "cfg_parallel": "--cfg-parallel",
             "vae_tile": "--vae-tile", "timesteps": "--timesteps", "dit": "--dit", "cache": "--cache",
             "cache_threshold": "--cache-threshold"}
# --compile's values -> Engine(compile=...)
COMPILE_MODES = {"off": False, "on": True, "cudagraphs": "cudagraphs"}


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from .request import CACHE_MODES, SAMPLERS

    p.add_argument("--prompt", required=True,
                   help="the (differential) prompt: what changes relative to the primary reference")
    p.add_argument("--ref", action="append", default=None, metavar="PATH",
                   help="a reference image or video clip; repeat for several")
    p.add_argument("--primary", type=int, default=0, help="index of the primary reference among --ref (default 0)")
    p.add_argument("--image", help="an image for image-to-video (latent frame 0 pinned to it)")
    p.add_argument("--negative-prompt", default=None, help="replaces the empty prompt of the unconditional pass")
    p.add_argument("--height", type=int, help="multiple of 32 (default: the model's, 704 for the 5B)")
    p.add_argument("--width", type=int, help="multiple of 32 (default: 1280 for the 5B)")
    p.add_argument("--frames", type=int, help="4n+1 frames (default: 121 for the 5B)")
    p.add_argument("--steps", type=int, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, help="guidance scale (default 5.0; 1 disables the second pass)")
    p.add_argument("--shift", type=float, help="flow shift (default 5.0)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="default unipc; a few-step distilled model's default is dmd (docs/fewer-forwards.md)")
    p.add_argument("--timesteps", type=_timestep_list, default=None, metavar="T1,T2,...",
                   help="sampler dmd: the timestep list, strictly decreasing in (0, 1000], e.g. 1000,750,500,250 "
                        "(default: the distilled model's own)")
    p.add_argument("--cache", choices=CACHE_MODES, default=None,
                   help="step cache: skip the DiT blocks on steps predicted to change little (docs/fewer-forwards.md)")
    p.add_argument("--cache-threshold", type=float, default=None,
                   help="the cache's threshold, >= 0 (default: the published one, magcache 0.06, teacache 0.26; "
                        "0 never skips)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/video.mp4", help="output mp4 path (written whole or not at all)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _timestep_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1000,750,500,250") \
            from e


def _request(args):
    from .request import GenerationRequest

    return GenerationRequest(prompt=args.prompt, references=args.ref, primary=args.primary, image=args.image,
                             negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                             num_frames=args.frames, steps=args.steps, guidance=args.guidance, shift=args.shift,
                             sampler=args.sampler, seed=args.seed, output=args.out, timesteps=args.timesteps,
                             cache=args.cache, cache_threshold=args.cache_threshold)


def _print_result(video, out: Path) -> None:
    t = ", ".join(f"{k} {v:.2f}s" for k, v in video.timings.items())
    T, H, W, _ = video.frames.shape
    print(f"wrote {out} ({T} frames, {W}x{H}, {video.fps} fps)")
    print(f"timings: {t}")
    print("DiT forwards: {dit_forwards} run, {dit_forwards_skipped} skipped over {steps} steps".format(**video.stats))


def _load(command: str, plan, progress: bool, quiet: bool = False):
    """Print the plan's one line, build the engine and say how long it took (`quiet`: say nothing)."""
    from .engine import Engine

    if not quiet:
        print(f"anyid-rt {command}: {plan.summary()}", flush=True)
    t0 = time.perf_counter()
    engine = Engine.from_plan(plan, progress=progress)
    if not quiet:
        print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    return engine


def _parallel(args):
    """The ParallelConfig of --sequence-parallel / --cfg-parallel (None without them), checked against the
    guidance and torchrun's process count before torch is imported."""
    from .config import ParallelConfig
    from .request import RequestError

    if args.sequence_parallel is None and not args.cfg_parallel:
        return None
    flags = f"--sequence-parallel {args.sequence_parallel or 1}" + (" --cfg-parallel" if args.cfg_parallel else "")
    try:
        config = ParallelConfig(sequence=args.sequence_parallel or 1, cfg=args.cfg_parallel)
    except ValueError:
        raise RequestError(f"{flags} parallelises nothing: give --sequence-parallel S >= 2 and/or --cfg-parallel",
                           "sequence_parallel") from None
    try:
        if args.guidance is not None:
            config.check_guidance(args.guidance, "--cfg-parallel")
        config.check_world(int(os.environ.get("WORLD_SIZE", "1")), flags)
    except ValueError as e:
        raise RequestError(str(e), "cfg_parallel") from None
    return config


def cmd_generate(args) -> int:
    from .config import ModelConfig
    from .few_step import find_few_step
    from .request import (TINY_DEFAULTS, ModelFiles, RequestError, check_input_file, check_output_path,
                          defaults_for, show, write_text_atomic)

    # 1. what needs no torch: a typo in a flag, a size or a path fails here, before anything heavy is imported
    if args.negative_prompt is not None and args.guidance == 1:
        raise RequestError(f"{show(CLI_NAMES, 'negative_prompt')} has no effect with --guidance 1 (no "
                           "unconditional pass): drop it, or raise --guidance", "negative_prompt")
    parallel = _parallel(args)
    quiet = parallel is not None and os.environ.get("RANK", "0") != "0"  # rank 0 speaks for a parallel job
    if args.tiny:
        geometry, defaults = ModelConfig.preset("tiny").geometry, TINY_DEFAULTS
    else:
        files = ModelFiles.find(args.model, CLI_NAMES)
        if args.dit:
            files = files.with_dit(args.dit, CLI_NAMES)
        geometry, defaults = files.geometry, defaults_for(files.dim)
        few = find_few_step(files.folder, files.dit)
        defaults = few.defaults(defaults) if few else defaults
    request = _request(args)
    request.check(geometry, defaults, CLI_NAMES)
    for f in args.lora or []:
        check_input_file(f, "lora", CLI_NAMES, what="LoRA")
    if args.timings_json:
        check_output_path(args.timings_json, "timings_json", CLI_NAMES, suffix=".json")
    # 2. with torch, still before any weight is read: devices, backend, LoRAs against the model, packages, and
    # the first frame of every reference
    from .plan import plan_pretrained, plan_tiny

    vae_tile = tuple(args.vae_tile) if args.vae_tile else None
    if args.tiny:
        plan = plan_tiny(seed=args.seed, device=args.device or "cpu", backend=args.backend, dtype=args.dtype or "fp32",
                         lora=args.lora, text_encoder_device=args.text_encoder_device,
                         compile=COMPILE_MODES[args.compile], vae_tile=vae_tile, parallel=parallel, names=CLI_NAMES)
    else:
        plan = plan_pretrained(args.model, lora=args.lora, dtype=args.dtype or "bf16", backend=args.backend,
                               device=args.device, text_encoder_device=args.text_encoder_device,
                               compile=COMPILE_MODES[args.compile], vae_tile=vae_tile, parallel=parallel,
                               names=CLI_NAMES, dit=args.dit)
    request = plan.check(request, CLI_NAMES)
    if request.references and not quiet:  # a differential prompt should not restate what the references show
        from .trainer.prompt_cli import warn_restatements

        warn_restatements(request.prompt, "generate")
    if not request.prompt.strip() and not quiet:
        print("note: --prompt is empty: nothing is asked to change relative to the "
              + ("primary reference" if request.references else "--image"))
    try:
        engine = _load("generate", plan, not (args.no_progress or quiet), quiet)
        video = engine.run(request, progress=not (args.no_progress or quiet), names=CLI_NAMES)
    finally:
        if parallel is not None:
            from .parallel import shutdown

            shutdown()
    if quiet:
        return 0
    _print_result(video, Path(args.out))
    if args.timings_json:
        import json

        write_text_atomic(args.timings_json, json.dumps(video.timings, indent=2))
    return 0


def cmd_calibrate_cache(args) -> int:
    from .request import GenerationRequest, RequestError, check_output_path

    if args.tiny and not (args.lora or args.out):
        raise RequestError("calibrate-cache --tiny without --lora needs --out (random weights have no folder)", "out")
    if args.out:
        check_output_path(args.out, "out", CLI_NAMES, suffix=".json")
    from .plan import plan_pretrained, plan_tiny

    if args.tiny:
        plan = plan_tiny(device=args.device or "cpu", dtype=args.dtype or "fp32", lora=args.lora, names=CLI_NAMES)
    else:
        plan = plan_pretrained(args.model, lora=args.lora, dtype=args.dtype or "bf16", device=args.device, dit=args.dit,
                               names=CLI_NAMES)
    requests = [plan.check(GenerationRequest(prompt=p, references=args.ref, height=args.height, width=args.width,
                                             num_frames=args.frames, steps=args.steps, guidance=args.guidance),
                           CLI_NAMES) for p in args.prompt]
    engine = _load("calibrate-cache", plan, not args.no_progress)
    cal = engine.calibrate_cache(requests, save=not args.out)
    out = cal.save(args.out) if args.out else engine.cache_path
    print(f"wrote {out}: MagCache ratios over {cal.steps} steps, TeaCache polynomial of degree "
          f"{len(cal.tea_coefficients) - 1} ({cal.source})")
    return 0


def cmd_demo(args) -> int:
    from .request import GenerationRequest, check_output_path

    check_output_path(args.out, "output", CLI_NAMES, suffix=".mp4")
    from .plan import plan_tiny
    from .media import ASSET_DIR

    refs = [str(ASSET_DIR / "astronaut.png"), str(ASSET_DIR / "astronaut_clip.mp4")]
    plan = plan_tiny(seed=args.seed)
    request = plan.check(GenerationRequest(prompt=DEMO_PROMPT, references=refs, primary=0, seed=args.seed,
                                           output=args.out), CLI_NAMES)
    print("anyid-rt demo: the tiny preset (random weights) with two bundled references:")
    for i, r in enumerate(refs):
        print(f"  ref {i}{' (primary)' if i == 0 else ''}: {r}")
    print(f"  prompt: {DEMO_PROMPT}")
    engine = _load("demo", plan, not args.no_progress)
    video = engine.run(request, progress=not args.no_progress, names=CLI_NAMES)
    _print_result(video, Path(args.out))
    print("note: the tiny model has random weights, so the video is noise. It exercises the whole pipeline "
          "(text encoder, reference encoding, guided denoising, VAE decode).")
    print("For real videos, download Wan2.2-TI2V-5B (original or -Diffusers layout) and run:")
    print('  anyid-rt generate --model /path/to/Wan2.2-TI2V-5B --prompt "..." --ref face.jpg --ref clip.mp4 '
          "--out out/video.mp4")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="anyid-rt", description="Identity-preserving video generation on "
                                 "Wan2.2-TI2V-5B (AnyID) - inference runtime")
    sub = ap.add_subparsers(dest="command", required=True)

    from .config import DTYPE_NAMES

    g = sub.add_parser("generate", help="generate a video from a prompt and optional references")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model folder (diffusers or original Wan2.2 layout)")
    which.add_argument("--tiny", action="store_true", help="use the tiny random-weight model (no download)")
    g.add_argument("--dit", default=None, metavar="PATH",
                   help="DiT weights replacing the model folder's (e.g. Wan2.2-TI2V-5B-Turbo/model.pt over the base "
                        "Wan2.2-TI2V-5B folder)")
    g.add_argument("--lora", action="append", default=None,
                   help="LoRA file(s) to merge at load (with --tiny: LoRAs trained on the tiny preset)")
    g.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="DiT and text-encoder weights (default: bf16 with --model, fp32 with --tiny)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="kernels: auto (on CUDA the fastest correct kernel per op, measured once and "
                        "remembered; torch on a CPU), torch or triton")
    g.add_argument("--device", default=None,
                   help="cuda, cuda:1, cpu (default: cuda when available; cpu with --tiny)")
    g.add_argument("--text-encoder-device", default=None,
                   help="e.g. cpu to keep umT5 off the GPU (default: --device)")
    g.add_argument("--compile", nargs="?", const="on", default="off", choices=list(COMPILE_MODES),
                   help="torch.compile the DiT block (one graph for all blocks; the first step compiles): "
                        "--compile (on), --compile cudagraphs (also one CUDA graph per step, CUDA only); "
                        "default off")
    g.add_argument("--timings-json", default=None, help="also write the stage timings to this JSON file")
    g.add_argument("--vae-tile", nargs=2, type=int, metavar=("TILE_H", "TILE_W"), default=None,
                   help="decode in spatial tiles of TILE_H x TILE_W latent pixels (under parallel generation the "
                        "tiles are shared by the ranks)")
    g.add_argument("--sequence-parallel", type=int, default=None, metavar="S",
                   help="under torchrun: shard each sample's tokens over S processes (Ulysses; the DiT's heads "
                        "must divide by S); see docs/distributed.md")
    g.add_argument("--cfg-parallel", action="store_true",
                   help="under torchrun: conditional and unconditional passes on separate processes "
                        "(S x 2 processes in all)")
    _add_generation_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate-cache", help="measure a model's step-cache curves (MagCache ratios, TeaCache "
                       "polynomial) on a few prompts; written beside the LoRA or in the model folder, read automatically")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model folder (diffusers or original Wan2.2 layout)")
    which.add_argument("--tiny", action="store_true", help="the tiny random-weight model (needs --lora or --out)")
    c.add_argument("--dit", default=None, metavar="PATH", help="DiT weights replacing the model folder's")
    c.add_argument("--lora", action="append", default=None, help="LoRA file(s): the curves are written beside the first")
    c.add_argument("--prompt", action="append", required=True, help="a prompt to measure on; repeat (3-5 suffice)")
    c.add_argument("--ref", action="append", default=None, metavar="PATH", help="references for every prompt")
    for flag, text in (("--height", "default: the model's"), ("--width", "default: the model's"),
                       ("--frames", "default: the model's"), ("--steps", "default: the model's (50)")):
        c.add_argument(flag, type=int, help=text)
    c.add_argument("--guidance", type=float, help="default: the model's (5.0)")
    c.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    c.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default bf16 (--model), fp32 (--tiny)")
    c.add_argument("--out", default=None, help="write the JSON here instead of beside the LoRA / in the model folder")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    c.set_defaults(func=cmd_calibrate_cache)

    d = sub.add_parser("demo", help="run the tiny model on the bundled references (no weights needed)")
    d.add_argument("--out", default="out/demo.mp4", help="output mp4 path (default out/demo.mp4)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the noise")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    d.set_defaults(func=cmd_demo)

    for name, (_, help_text) in TOOLS.items():  # listed here; main() hands the arguments to the tool
        t = sub.add_parser(name, help=help_text, add_help=False)
        t.add_argument("tool_args", nargs=argparse.REMAINDER, help=f"see anyid-rt {name} --help")
    from .trainer.cli import add_label_parser, add_parser as add_train_parser

    add_train_parser(sub)
    add_label_parser(sub)  # `anyid-rt label`: the preference-labelling page (trainer/label.py)
    from .trainer.toy.cli import add_parser as add_toy_parser  # argparse only; stages import torch when run

    add_toy_parser(sub)  # `anyid-rt toy ...`: the toy identity benchmark (docs/toy-identity.md)
    from .trainer.prompt_cli import add_parser as add_prompt_parser  # argparse only

    add_prompt_parser(sub)  # `anyid-rt prompt build|check|calibrate`: differential prompts (docs/prompts.md)
    from .export.cli import add_parser as add_export_parser, add_serve_parser

    add_export_parser(sub)
    add_serve_parser(sub)
    from .eval.cli import add_parser as add_eval_parser  # argparse only; models load inside the handlers

    add_eval_parser(sub)
    return ap


def run_tool(name: str, argv: list[str]) -> int:
    module, _ = TOOLS[name]
    return importlib.import_module(module).main(argv)


def _command(argv: list[str]) -> str:
    """`generate`, `export onnx`, ...: the words of the command line that name the command, for messages."""
    words = []
    for a in argv[:2]:
        if a.startswith("-"):
            break
        words.append(a)
    return " ".join(words[:2] if words[:1] == ["export"] or words[:1] == ["train"] else words[:1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    try:
        if argv and argv[0] in TOOLS:
            return run_tool(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        # outputs are written beside their final names and renamed at the end: nothing partial is left
        print(f"\nanyid-rt {command}: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"anyid-rt {command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
            raise
        print(f"anyid-rt {command}: error: out of GPU memory. Try --text-encoder-device cpu, a smaller --height / "
              "--width / --frames, or fewer references", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
