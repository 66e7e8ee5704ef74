"""Calibration probes (design section 8): how many base steps until the base draws valid sprites that follow
the prompt. `anyid-rt toy pretrain --probe-every N` samples the base every N steps with the full prompts of the
first unseen-identity cases and appends valid / elem_acc to pretrain_probe.csv (the SFT stage logs its own
reliance gap per chunk in sft/gap.json)."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from . import world as W
from .evaluator import score_video


def base_probe(run, cases: int, path: Path):
    """A `probe(engine, step)` for `pretrain`: generate and score `cases` full-prompt samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerow(["step", "valid", "elem_acc", "id_acc", "seconds"])
    state = {"evaluator": None}

    def probe(engine, step: int) -> None:
        if state["evaluator"] is None:
            state["evaluator"] = run.load_evaluator()
        t0 = time.perf_counter()
        rows = []
        for case in W.read_cases(run.dir("world"), "unseen")[:cases]:
            frames = engine.generate(case.prompt, seed=case.seed, progress=False, steps=run.p.eval.steps,
                                     guidance=run.p.eval.guidance).frames
            rows.append(score_video(state["evaluator"], frames, case.identity, case.elements, run.p.world))
        m = {k: float(np.mean([r[k] for r in rows])) for k in ("valid", "elem_acc", "id_acc")}
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow([step, f"{m['valid']:.3f}", f"{m['elem_acc']:.3f}", f"{m['id_acc']:.3f}",
                                    f"{time.perf_counter() - t0:.1f}"])
        run.log(f"[toy] calibration: base at step {step}: valid {m['valid']:.3f}, elem_acc {m['elem_acc']:.3f}")
    return probe


__all__ = ["base_probe"]
