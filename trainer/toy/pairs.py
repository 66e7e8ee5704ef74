"""Preference pairs from the SFT model's own samples, ranked by the evaluator (design section 4.2, stage 4).

For each training-identity input, K candidates (seeds differ) come from the engine with the SFT LoRA merged.
Each matchup gets a label per track: identity (the evaluator's soft identity score) and prompt (its soft element
score), +1 / 0 / -1 with a tie inside the margin. Every matchup is written with the trainer's `write_pairs`
(all_pairs.jsonl, oriented so the winner has the higher identity score); the trainer's `pareto_filter` keeps
those strictly better on both tracks (AnyID section 4.4), at most `per_input` per input (the widest margins),
and those go to pairs.jsonl, which the DPO stage reads.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import media
from ...engine import Engine
from ..pairs import PreferencePair, pareto_filter, write_pairs
from . import world as W
from .evaluator import ToyEvaluator, score_video


@dataclass(frozen=True)
class PairsConfig:
    inputs: int = 96
    candidates: int = 4
    id_margin: float = 0.03
    prompt_margin: float = 0.03
    per_input: int = 2
    crf: int = 0  # lossless: DPO trains on exactly what was scored


def _label(a: float, b: float, margin: float) -> int:
    return 0 if abs(a - b) <= margin else (1 if a > b else -1)


def make_pairs(engine: Engine, evaluator: ToyEvaluator, world: W.WorldConfig, world_dir: Path,
               cases: list[W.Case], cfg: PairsConfig, out: Path, log=print) -> dict:
    """Generate, score and label; writes OUT/all_pairs.jsonl, OUT/pairs.jsonl and OUT/videos/. Returns counts and
    the candidates' mean scores (the SFT model's identity accuracy on training identities: DPO needs headroom)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(exist_ok=True)
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731 (paths in the pairs file are relative to it)
    matchups, scores = [], []
    for n, case in enumerate(cases[:cfg.inputs]):
        refs = [str(world_dir / r) for r in case.references]
        cand = []
        for k in range(cfg.candidates):
            video = engine.generate(case.differential, references=refs, seed=case.seed + k, progress=False)
            path = out / "videos" / f"case_{case.index:04d}_{k}.mp4"
            media.write_mp4(video.frames, path, video.fps, crf=cfg.crf)
            s = score_video(evaluator, video.frames, case.identity, case.elements, world)
            cand.append((path, s))
            scores.append(s)
        for (pa, sa), (pb, sb) in itertools.combinations(cand, 2):
            if sb["id_score"] > sa["id_score"]:
                (pa, sa), (pb, sb) = (pb, sb), (pa, sa)
            pair = PreferencePair(case.differential, tuple(rel(r) for r in refs), rel(pa), rel(pb),
                                  _label(sa["id_score"], sb["id_score"], cfg.id_margin),
                                  _label(sa["elem_score"], sb["elem_score"], cfg.prompt_margin))
            margin = (sa["id_score"] - sb["id_score"]) + (sa["elem_score"] - sb["elem_score"])
            matchups.append((case.index, margin, pair))
        if (n + 1) % 16 == 0:
            log(f"  pairs: {n + 1}/{min(cfg.inputs, len(cases))} inputs")
    write_pairs(out / "all_pairs.jsonl", [m[2] for m in matchups])
    survivors = set(map(id, pareto_filter([m[2] for m in matchups])))
    kept = []
    for _, group in itertools.groupby(matchups, key=lambda m: m[0]):
        best = sorted((m for m in group if id(m[2]) in survivors), key=lambda m: -m[1])[:cfg.per_input]
        kept += [m[2] for m in best]
    if kept:
        write_pairs(out / "pairs.jsonl", kept)
    return {"inputs": min(cfg.inputs, len(cases)), "matchups": len(matchups), "pareto": len(survivors),
            "pairs": len(kept), "candidate_id_acc": float(np.mean([s["id_acc"] for s in scores])),
            "candidate_elem_acc": float(np.mean([s["elem_acc"] for s in scores])),
            "candidate_valid": float(np.mean([s["valid"] for s in scores]))}


__all__ = ["PairsConfig", "make_pairs"]
