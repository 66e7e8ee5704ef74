"""`anyid-rt toy world|evaluator|pretrain|sft|pairs|dpo|eval|run`: the toy identity benchmark's stages.

Every stage works in one run folder (--out, default runs/toy-<preset>) and reads the stages before it from there;
a stage whose settings did not change is skipped (stage.json holds its hash). `run` does all of them and writes
report.json, report.md and sheet.png. See docs/toy-identity.md.
"""
from __future__ import annotations

import argparse
import json

from . import PRESETS

STAGE_HELP = {
    "world": "render the sprite world: ID groups (mp4 + meta.json) for training and unseen identities, cases.jsonl",
    "evaluator": "train the evaluator CNN on renders from its own seed and check its gates",
    "pretrain": "full-parameter base pretraining, text to video (--probe-every N: calibration samples)",
    "sft": "LoRA SFT with references through the real trainer; logs the reliance gap per chunk",
    "pairs": "preference pairs from SFT samples, ranked by the evaluator, Pareto-filtered",
    "dpo": "Flow-DPO through the real trainer",
    "eval": "the arms on unseen identities (same cases and seeds) and the paired statistics",
    "run": "every stage (cached), then report.json, report.md and sheet.png with the verdicts",
}


def _run(args):
    import torch

    from .run import ToyRun, preset

    torch.set_num_threads(args.threads)
    p = preset(args.preset)
    return ToyRun(p, args.out or f"runs/toy-{p.name}")


def cmd_toy(args) -> int:
    from .run import STAGES

    run = _run(args)
    stage = args.toy_command
    if stage in STAGES:  # the stages before it first (each skipped when its cached output is current)
        for before in STAGES[:STAGES.index(stage)]:
            getattr(run, {"eval": "evaluate"}.get(before, before))()
    if stage == "world":
        result = run.world()
    elif stage == "evaluator":
        result = run.evaluator()
    elif stage == "pretrain":
        probe = None
        if args.probe_every:
            from .calibrate import base_probe

            probe = base_probe(run, args.probe_cases, run.dir("pretrain").with_name("pretrain_probe.csv"))
        run.p = _with_probe(run.p, args.probe_every)
        result = run.pretrain(args.steps, probe)
    elif stage == "sft":
        result = run.sft(args.steps)
    elif stage == "pairs":
        result = run.pairs()
    elif stage == "dpo":
        result = run.dpo()
    elif stage == "eval":
        result = run.evaluate(tuple(a.strip() for a in args.arms.split(",")))
    else:
        result = run.all()
        print(json.dumps(result["verdicts"], indent=1))
        return 0
    print(json.dumps(result, indent=1, default=float)[:4000])
    return 0


def _with_probe(p, every: int):
    from dataclasses import replace

    return replace(p, pretrain=replace(p.pretrain, probe_every=every)) if every else p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `toy` and its stage subcommands on the main `anyid-rt` parser."""
    t = subparsers.add_parser("toy", help="the toy identity benchmark: prove on a CPU that the method learns identity",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = t.add_subparsers(dest="toy_command", required=True)
    for name, text in STAGE_HELP.items():
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--preset", default="bench", choices=list(PRESETS), help="sizes and step counts")
        s.add_argument("--out", default=None, help="the run folder (default runs/toy-PRESET)")
        s.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible)")
        if name in ("pretrain", "sft"):
            s.add_argument("--steps", type=int, default=None, help="override the preset's step count")
        if name == "pretrain":
            s.add_argument("--probe-every", type=int, default=0,
                           help="calibration: sample and score the base every N steps (pretrain_probe.csv)")
            s.add_argument("--probe-cases", type=int, default=32)
        if name == "eval":
            s.add_argument("--arms", default="oracle,base,sft,null,swap,dpo")
        s.set_defaults(func=cmd_toy)
    return t


__all__ = ["add_parser", "cmd_toy"]
