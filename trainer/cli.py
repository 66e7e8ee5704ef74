"""`anyid-rt train sft | dpo CONFIG`: the trainer's command line.

    anyid-rt train sft configs/sft-tiny.toml                   (the tiny preset on the bundled tiny data, CPU)
    anyid-rt train sft sft.toml [--set optim.lr=5e-5 ...] [--max-steps N] [--output DIR] [--resume auto|none|DIR]
    anyid-rt train dpo dpo.toml
    python -m anyid_rt.trainer.cli sft sft.toml
    torchrun --nproc_per_node 8 -m anyid_rt.trainer.cli sft sft.toml             (data parallel)
    anyid-rt train synth-data --out configs/data                                (rebuild the tiny data set)
    anyid-rt train candidates --data configs/data/id_groups --tiny --out runs/candidates   (DPO matchups)
    anyid-rt label runs/candidates                       (the two-track labelling page, http://127.0.0.1:8765/)
    anyid-rt train pairs runs/candidates                 (human labels + automatic verdicts -> pairs.jsonl)

Exit codes: 0 done; 2 the config cannot work (a `ConfigError` naming the key, found before any model is
loaded); 1 a data problem met during the run (e.g. no face found in a frame; the message names the file);
130 interrupted (Ctrl-C): one line saying which checkpoint the same command resumes from. Checkpoints, the
LoRA, the log and validation videos are written atomically, so an interruption leaves nothing half-written.

`add_parser(subparsers)` registers `train` on the main `anyid-rt` parser (anyid_rt/cli.py), and
`add_label_parser(subparsers)` registers `label`. Preference data (candidates, the labelling page, pairs):
docs/preference-data.md.
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


def cmd_candidates(args) -> int:
    """Generate, score and match up candidates (trainer/candidates.py); exit 2 on bad input, found before any
    model loads; 130 on Ctrl-C (the same command resumes: finished videos and scores are kept)."""
    from ..eval.common import EvalError
    from .candidates import CandidatesError, CandidatesOptions, run_candidates
    from .config import ConfigError
    from .groups import DataError

    prog = "anyid-rt train candidates"
    try:
        evaluation = None
        if not args.no_scoring:
            from ..eval.cli import _config as eval_config

            evaluation = eval_config(args)
        opts = CandidatesOptions(
            out=args.out, data=args.data, sets=args.sets, k=args.k, per_group=args.sets_per_group,
            max_references=args.max_references, similarity=args.similarity, model=args.model, tiny=args.tiny,
            lora=tuple(args.lora or ()), dtype=args.dtype, device=args.device,
            text_encoder_device=args.text_encoder_device, height=args.height, width=args.width, frames=args.frames,
            steps=args.steps, guidance=args.guidance, shift=args.shift, sampler=args.sampler, seed=args.seed,
            eval=evaluation, prompt_metric=args.prompt_metric, identity_margin=args.identity_margin,
            prompt_margin=args.prompt_margin, progress=not args.no_progress)
        summary = run_candidates(opts)
    except DataError as e:  # met while running (a clip that does not decode): the message names the file
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, CandidatesError, EvalError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the same command resumes (finished videos and scores in {args.out} are kept, "
              "nothing is half-written)", file=sys.stderr)
        return 130
    print(f"{args.out}: {summary.line()}")
    print(f"wrote {summary.path}; label the matchups with: anyid-rt label {args.out}")
    return 0


def cmd_pairs(args) -> int:
    """Merge a candidates folder's human labels with its automatic verdicts into the pairs file DPO reads."""
    from .candidates import CandidatesError, CandidatesFolder, merge_pairs
    from .label import LabelError, read_labels

    try:
        folder = CandidatesFolder.load(args.folder)
        summary = merge_pairs(folder, read_labels(folder, args.labels), args.out)
    except (CandidatesError, LabelError, OSError) as e:
        print(f"anyid-rt train pairs: error: {e}", file=sys.stderr)
        return 2
    print(f"{summary.line()}\nwrote {summary.path}")
    return 0


def _candidate_args(c: argparse.ArgumentParser) -> None:
    from ..eval.cli import _eval_options  # argparse only

    src = c.add_argument_group("sets of inputs (one of them)")
    src.add_argument("--data", default=None, metavar="ROOT",
                     help="ID groups (one folder per identity with meta.json): one set per target clip, references "
                          "from the group's other clips, the differential prompt")
    src.add_argument("--sets", default=None, metavar="FILE.jsonl",
                     help='explicit sets: {"id", "prompt", "references", "primary", "group", "seed"} per line')
    src.add_argument("--sets-per-group", type=int, default=None, help="with --data: at most N target clips a group")
    src.add_argument("--max-references", type=int, default=3, help="with --data: references per set (default 3)")
    src.add_argument("--similarity", default="auto", choices=["auto", "minilm", "jaccard"],
                     help="with --data: the differential prompt's text similarity (default auto)")
    g = c.add_argument_group("generation")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", default=None, help="model folder (diffusers or original Wan2.2 layout)")
    which.add_argument("--tiny", action="store_true", help="the tiny random-weight preset (checks a setup)")
    g.add_argument("--lora", action="append", default=None, help="LoRA file(s) merged at load (the SFT LoRA)")
    g.add_argument("--k", type=int, default=2, help="candidates per set (default 2, as the paper; K > 2 gives "
                   "K(K-1)/2 matchups a set)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    g.add_argument("--device", default=None, help="generation device (default: cuda when available; cpu with --tiny)")
    g.add_argument("--text-encoder-device", default=None)
    for flag, kind in (("--height", int), ("--width", int), ("--frames", int), ("--steps", int),
                       ("--guidance", float), ("--shift", float)):
        g.add_argument(flag, type=kind, default=None, help="default: the model's")
    g.add_argument("--sampler", default=None, choices=["unipc", "euler", "dpm++"])
    g.add_argument("--seed", type=int, default=0, help="candidate k of a set uses seed + k (default 0)")
    sc = c.add_argument_group("scoring (the two tracks)")
    sc.add_argument("--no-scoring", action="store_true",
                    help="no automatic verdicts: both tracks are left to human labels")
    sc.add_argument("--prompt-metric", default="clip-text", choices=["clip-text", "clip-text+element"],
                    help="prompt track with --clip: the frame-text cosine, or it and the similarity to the primary "
                         "reference together (better on both, else a tie)")
    sc.add_argument("--identity-margin", type=float, default=0.02,
                    help="identity scores closer than this are a tie (default 0.02)")
    sc.add_argument("--prompt-margin", type=float, default=0.01,
                    help="prompt scores closer than this are a tie (default 0.01)")
    c.add_argument("--out", required=True, help="the candidates folder (resumable)")
    c.add_argument("--no-progress", action="store_true")
    _eval_options(c)


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
    c = sub.add_parser("candidates", help="K videos per set of inputs, scored on both tracks, as DPO matchups "
                       "(section 4.4)", description="Generate K candidates per set of inputs (ID groups or a sets "
                       "file) with a model / LoRA, score each on identity (face recognisers, against the whole ID "
                       "group) and prompt following (CLIP, with --clip), propose matchups and write pairs.jsonl: a "
                       "pair needs one candidate strictly better on both tracks. Resumable. Then label the rest with "
                       "`anyid-rt label OUT`. See docs/preference-data.md.")
    _candidate_args(c)
    c.set_defaults(func=cmd_candidates)
    q = sub.add_parser("pairs", help="candidates folder -> pairs.jsonl (human labels win per track, automatic "
                       "verdicts fill in)")
    q.add_argument("folder", metavar="CANDIDATES_DIR")
    q.add_argument("--labels", default=None, help="a labels JSONL (default: CANDIDATES_DIR/labels.jsonl)")
    q.add_argument("--out", default=None, help="the pairs file (default: CANDIDATES_DIR/pairs.jsonl)")
    q.set_defaults(func=cmd_pairs)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `train` (sft, dpo, synth-data, candidates, pairs) on an argparse sub-parser set."""
    t = subparsers.add_parser("train", help="train an AnyID LoRA (SFT, then Flow-DPO)")
    _register(t.add_subparsers(dest="train_command", required=True))
    return t


def cmd_label(args) -> int:
    from .label import cmd_label as run

    return run(args)


def add_label_parser(subparsers) -> None:
    """Register `label` (the labelling page, trainer/label.py) on the main `anyid-rt` parser."""
    p = subparsers.add_parser("label", help="the two-track labelling page of a candidates folder (local web page)",
                              description="Serve the labelling page of a candidates folder (made by `anyid-rt train "
                                          "candidates`): per matchup, judge identity fidelity, then prompt "
                                          "following; keys 1 / 2 / 0 (left / right / tie), u undo, space play. "
                                          "Labels go to labels.jsonl, pairs.jsonl follows. See "
                                          "docs/preference-data.md.")
    p.add_argument("folder", metavar="CANDIDATES_DIR")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only; 0.0.0.0 opens the page and the videos to the network, without a login)")
    p.add_argument("--track", default="both", choices=["both", "identity", "prompt"],
                   help="judge both tracks per matchup (default), or one track only (the paper's two modes)")
    p.add_argument("--only-needed", action="store_true", help="ask only for tracks without an automatic verdict")
    p.add_argument("--annotator", default=None, help="a name recorded with every judgement")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    p.set_defaults(func=cmd_label)


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
