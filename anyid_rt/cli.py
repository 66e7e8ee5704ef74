"""`anyid-rt`: generate videos and run the bundled demo.

    anyid-rt generate --model ./Wan2.2-TI2V-5B --prompt "..." --ref face.jpg --ref clip.mp4 --primary 0 --out x.mp4
    anyid-rt demo
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Tools: subcommands whose code is tooling outside the runtime (bench/ is the package anyid_rt.bench). The
# runtime modules never import tooling; the CLI is the one place that launches it, so a tool's module is
# imported by name only when its subcommand runs, and parses the rest of the command line itself
# (`main(argv)`, with its own --help). `anyid-rt --help` still lists it.
TOOLS = {"bench": ("anyid_rt.bench.e2e", "end-to-end benchmark against diffusers (see README.md, Benchmarks)")}
DEMO_PROMPT = ("Shot type: medium close-up. Expression: a calm smile. Action: slowly turns the head toward the "
               "camera. Background: a sunlit garden.")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", help="the (differential) prompt: what changes relative to the primary reference")
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
    p.add_argument("--sampler", choices=["unipc", "euler", "dpm++"], help="default unipc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/video.mp4", help="output mp4 path")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _generate_kwargs(args) -> dict:
    return dict(references=args.ref, primary=args.primary, image=args.image, negative_prompt=args.negative_prompt,
                height=args.height, width=args.width, num_frames=args.frames, steps=args.steps,
                guidance=args.guidance, shift=args.shift, sampler=args.sampler, seed=args.seed,
                progress=not args.no_progress)


def _print_result(video, out: Path) -> None:
    t = ", ".join(f"{k} {v:.2f}s" for k, v in video.timings.items())
    T, H, W, _ = video.frames.shape
    print(f"wrote {out} ({T} frames, {W}x{H}, {video.fps} fps)")
    print(f"timings: {t}")


def cmd_generate(args) -> int:
    from .engine import Engine

    if args.prompt is None:
        raise SystemExit("anyid-rt generate: --prompt is required")
    if args.tiny:
        engine = Engine.tiny(seed=args.seed, device=args.device or "cpu")
    elif args.model:
        engine = Engine.from_pretrained(args.model, lora=args.lora, dtype=args.dtype, backend=args.backend,
                                        device=args.device, text_encoder_device=args.text_encoder_device)
    else:
        raise SystemExit("anyid-rt generate: pass --model FOLDER (Wan2.2-TI2V-5B weights) or --tiny")
    video = engine.generate(args.prompt, output=args.out, **_generate_kwargs(args))
    _print_result(video, Path(args.out))
    if args.timings_json:
        Path(args.timings_json).write_text(json.dumps(video.timings, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .engine import Engine
    from .media import ASSET_DIR

    refs = [str(ASSET_DIR / "astronaut.png"), str(ASSET_DIR / "astronaut_clip.mp4")]
    print("anyid-rt demo: the tiny preset (random weights) with two bundled references:")
    for i, r in enumerate(refs):
        print(f"  ref {i}{' (primary)' if i == 0 else ''}: {r}")
    print(f"  prompt: {DEMO_PROMPT}")
    engine = Engine.tiny(seed=args.seed)
    video = engine.generate(DEMO_PROMPT, references=refs, primary=0, seed=args.seed, output=args.out,
                            progress=not args.no_progress)
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

    g = sub.add_parser("generate", help="generate a video from a prompt and optional references")
    g.add_argument("--model", help="model folder (diffusers or original Wan2.2 layout)")
    g.add_argument("--tiny", action="store_true", help="use the tiny random-weight model (no download)")
    g.add_argument("--lora", action="append", default=None, help="LoRA file(s) to merge at load")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    g.add_argument("--text-encoder-device", default=None, help="e.g. cpu to keep umT5 off the GPU")
    g.add_argument("--timings-json", default=None, help="also write the stage timings to this JSON file")
    _add_generation_args(g)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="run the tiny model on the bundled references (no weights needed)")
    d.add_argument("--out", default="out/demo.mp4")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    for name, (_, help_text) in TOOLS.items():  # listed here; main() hands the arguments to the tool
        t = sub.add_parser(name, help=help_text, add_help=False)
        t.add_argument("tool_args", nargs=argparse.REMAINDER, help=f"see anyid-rt {name} --help")
    from .trainer.cli import add_parser as add_train_parser

    add_train_parser(sub)
    from .export.cli import add_parser as add_export_parser, add_serve_parser

    add_export_parser(sub)
    add_serve_parser(sub)
    from .eval.cli import add_parser as add_eval_parser  # argparse only; models load inside the handlers

    add_eval_parser(sub)
    return ap


def run_tool(name: str, argv: list[str]) -> int:
    module, _ = TOOLS[name]
    return importlib.import_module(module).main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return run_tool(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"anyid-rt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
