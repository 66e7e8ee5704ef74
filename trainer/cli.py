"""`anyid-rt train sft | dpo CONFIG`: the trainer's command line.

    anyid-rt train sft configs/sft-tiny.toml                   (the tiny preset on the bundled tiny data, CPU)
    anyid-rt train sft sft.toml [--set optim.lr=5e-5 ...] [--max-steps N] [--output DIR] [--resume auto|none|DIR]
    anyid-rt train dpo dpo.toml
    python -m anyid_rt.trainer.cli sft sft.toml
    torchrun --nproc_per_node 8 -m anyid_rt.trainer.cli sft sft.toml             (data parallel)
    anyid-rt train synth-data --out configs/data                                (rebuild the tiny data set)

Exit codes: 0 done; 2 the config cannot work (a `ConfigError` naming the key, found before any model is
loaded); 1 a data problem met during the run (e.g. no face found in a frame; the message names the file);
130 interrupted (Ctrl-C): one line saying which checkpoint the same command resumes from. Checkpoints, the
LoRA, the log and validation videos are written atomically, so an interruption leaves nothing half-written.

`add_parser(subparsers)` registers `train` on the main `anyid-rt` parser (anyid_rt/cli.py).
"""
from __future__ import annotations

import argparse
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a .toml or .json config file (see configs/ and README.md, Training)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config field, e.g. --set optim.lr=5e-5 (value read as JSON, else string)")
    p.add_argument("--max-steps", type=int, default=None, help="shortcut for --set max_steps=N")
    p.add_argument("--output", default=None, help="shortcut for --set output_dir=DIR")
    p.add_argument("--resume", default=None, help="shortcut for --set resume=...: auto (default), none, or a "
                   "checkpoint folder")


def _overrides(args) -> list[str]:
    out = list(args.overrides)
    if args.max_steps is not None:
        out.append(f"max_steps={args.max_steps}")
    if args.output is not None:
        out.append(f"output_dir={args.output}")
    if args.resume is not None:
        out.append(f"resume={args.resume}")
    return out


def _train(args, stage: str) -> int:
    """Load and check the config, train, and turn the ways a run ends into exit codes and one-line messages."""
    from pathlib import Path

    from . import dist as dist_utils
    from .common import Checkpoints
    from .config import ConfigError, DPOConfig, SFTConfig, load_config
    from .groups import DataError

    prog = f"anyid-rt train {stage}"
    cfg = None
    try:
        cfg = load_config(args.config, SFTConfig if stage == "sft" else DPOConfig, _overrides(args))
        if stage == "sft":
            from .sft import train_sft as train
        else:
            from .dpo import train_dpo as train
        result = train(cfg)
    except (ConfigError, FileNotFoundError) as e:  # the config (or its file) cannot work: nothing ran
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # met while training (e.g. a frame with no face): the message names the file
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        if cfg is None:  # TOML / JSON syntax, --set syntax
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        last = Checkpoints(cfg.output_dir).latest() if cfg is not None else None
        if last is None:
            where = "no checkpoint was written"
        elif cfg.resume == "none":
            where = f"--resume auto continues from {last}"
        else:
            where = f"the same command resumes from {last}"
        print(f"{prog}: interrupted; {where} (nothing half-written)", file=sys.stderr)
        return 130
    finally:
        dist_utils.shutdown()
    if result.lora_path is not None:
        after = f" (apply after {cfg.sft_lora})" if stage == "dpo" and cfg.sft_lora else ""
        print(f"wrote {result.lora_path}{after} after {result.step} steps (log: {Path(cfg.output_dir) / 'log.csv'})")
    return 0


def cmd_sft(args) -> int:
    return _train(args, "sft")


def cmd_dpo(args) -> int:
    return _train(args, "dpo")


def cmd_synth(args) -> int:
    from .synthetic import make_tiny_data

    try:
        root = make_tiny_data(args.out, groups=args.groups, clips=args.clips, frames=args.frames, size=args.size,
                              face_boxes=args.face_boxes, pairs=args.pairs, crf=args.crf)
    except ValueError as e:
        print(f"anyid-rt train synth-data: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.groups} synthetic ID group(s) of {args.clips} clips to {root / 'id_groups'}"
          + (f" and {args.pairs} preference pair(s) to {root / 'pairs' / 'pairs.jsonl'}" if args.pairs > 0 else ""))
    return 0


def _register(sub) -> None:
    s = sub.add_parser("sft", help="supervised LoRA training on ID groups (AnyID section 4.2)")
    _common(s)
    s.set_defaults(func=cmd_sft)
    d = sub.add_parser("dpo", help="Flow-DPO on preference pairs from the merged SFT weights (section 4.4)")
    _common(d)
    d.set_defaults(func=cmd_dpo)
    y = sub.add_parser("synth-data", help="write a tiny synthetic data set (bundled astronaut image): OUT/id_groups "
                       "and OUT/pairs; the defaults make configs/data")
    y.add_argument("--out", required=True)
    y.add_argument("--groups", type=int, default=1, help="ID groups (default 1)")
    y.add_argument("--clips", type=int, default=3, help="clips per group (default 3)")
    y.add_argument("--frames", type=int, default=9, help="frames per clip (default 9)")
    y.add_argument("--size", type=int, default=64, help="clip height and width in pixels (default 64)")
    y.add_argument("--face-boxes", default="all", choices=["none", "first", "all"],
                   help="which clips carry face boxes in meta.json (none: the face detector, i.e. OpenCV, runs)")
    y.add_argument("--pairs", type=int, default=2, help="preference pairs for DPO (default 2; 0: none)")
    y.add_argument("--crf", type=int, default=30, help="H.264 quality, higher is smaller (default 30)")
    y.set_defaults(func=cmd_synth)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` (with sub-commands sft, dpo, synth-data) on an argparse sub-parser set."""
    t = subparsers.add_parser("train", help="train an AnyID LoRA (SFT, then Flow-DPO)")
    _register(t.add_subparsers(dest="train_command", required=True))
    return t


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m anyid_rt.trainer.cli",
                                 description="AnyID LoRA trainer (the same as `anyid-rt train`)")
    _register(ap.add_subparsers(dest="train_command", required=True))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
