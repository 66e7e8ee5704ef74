"""`anyid-rt train sft | dpo --config FILE`: the trainer's command line.

    anyid-rt train sft --config sft.toml [--set optim.lr=5e-5 ...] [--max-steps N] [--output DIR]
    anyid-rt train dpo --config dpo.toml
    python -m anyid_rt.trainer.cli sft --config sft.toml
    torchrun --nproc_per_node 8 -m anyid_rt.trainer.cli sft --config sft.toml      (data parallel)
    anyid-rt train synth-data --out data/synthetic                                  (a tiny test dataset)

`add_parser(subparsers)` registers `train` on the main `anyid-rt` parser (anyid_rt/cli.py).
"""
from __future__ import annotations

import argparse
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a .toml or .json config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config field, e.g. --set optim.lr=5e-5 (value read as JSON, else string)")
    p.add_argument("--max-steps", type=int, default=None, help="shortcut for --set max_steps=N")
    p.add_argument("--output", default=None, help="shortcut for --set output_dir=DIR")
    p.add_argument("--resume", default=None, help="auto (default), none, or a checkpoint folder")


def _overrides(args) -> list[str]:
    out = list(args.overrides)
    if args.max_steps is not None:
        out.append(f"max_steps={args.max_steps}")
    if args.output is not None:
        out.append(f"output_dir={args.output}")
    if args.resume is not None:
        out.append(f"resume={args.resume}")
    return out


def cmd_sft(args) -> int:
    from . import dist as dist_utils
    from .config import SFTConfig, load_config
    from .sft import train_sft

    cfg = load_config(args.config, SFTConfig, _overrides(args))
    try:
        result = train_sft(cfg)
    finally:
        dist_utils.shutdown()
    if result.lora_path is not None:
        print(f"wrote {result.lora_path} after {result.step} steps (log: {cfg.output_dir}/log.csv)")
    return 0


def cmd_dpo(args) -> int:
    from . import dist as dist_utils
    from .config import DPOConfig, load_config
    from .dpo import train_dpo

    cfg = load_config(args.config, DPOConfig, _overrides(args))
    try:
        result = train_dpo(cfg)
    finally:
        dist_utils.shutdown()
    if result.lora_path is not None:
        after = f" (apply after {cfg.sft_lora})" if cfg.sft_lora else ""
        print(f"wrote {result.lora_path}{after} after {result.step} steps (log: {cfg.output_dir}/log.csv)")
    return 0


def cmd_synth(args) -> int:
    from .synthetic import make_id_groups

    root = make_id_groups(args.out, groups=args.groups, clips=args.clips, face_boxes=args.face_boxes)
    print(f"wrote {args.groups} synthetic ID group(s) of {args.clips} clips to {root}")
    return 0


def _register(sub) -> None:
    s = sub.add_parser("sft", help="supervised LoRA training on ID groups (AnyID section 4.2)")
    _common(s)
    s.set_defaults(func=cmd_sft)
    d = sub.add_parser("dpo", help="Flow-DPO on preference pairs from the merged SFT weights (section 4.4)")
    _common(d)
    d.set_defaults(func=cmd_dpo)
    y = sub.add_parser("synth-data", help="write a tiny synthetic ID-group dataset (bundled astronaut image)")
    y.add_argument("--out", required=True)
    y.add_argument("--groups", type=int, default=2)
    y.add_argument("--clips", type=int, default=3)
    y.add_argument("--face-boxes", default="first", choices=["none", "first", "all"])
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
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"anyid-rt train {args.train_command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
