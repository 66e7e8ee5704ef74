"""The demonstration's arms on unseen identities, and the pre-registered verdicts (issue 19, design section 6.4).

Every arm runs the same cases with the same seeds (common random numbers) through `Engine.generate`:
oracle (renders of the truth: the metric's ceiling), base (full prompt, no references), sft (true references,
differential prompt), null (black references, full prompt), swap (another identity's references on the case's
differential prompt: identity must follow the references), dpo (SFT + DPO LoRAs, as sft).
The verdicts are computed here from the fixed rules; nobody edits them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import world as W
from .evaluator import chance_id_acc, score_video
from .stats import compare

ARMS = ("oracle", "base", "sft", "null", "swap", "dpo")


def _oracle_frames(world: W.WorldConfig, case: W.Case) -> torch.Tensor:
    rng = np.random.default_rng(case.seed)
    start = np.array([W.start_position(rng, case.elements, world.effective)])
    return torch.from_numpy(W.render_clips(world, np.array([case.identity]), [case.elements], start)[0])


def run_arms(run, arms: tuple[str, ...], out: Path) -> dict:
    """Generate and score every arm; writes OUT/cases.json (per-case scores) and OUT/sheet.npz (frames)."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; the arms are {list(ARMS)}")
    p, world = run.p, run.p.world
    evaluator = run.load_evaluator()
    cases = W.read_cases(run.dir("world"), "unseen")[:p.eval.cases]
    by_index = {c.index: c for c in W.read_cases(run.dir("world"), "unseen")}
    refs = lambda c: [str(run.dir("world") / r) for r in c.references]  # noqa: E731
    sft = run.dir("sft") / "lora.safetensors"
    dpo = run.dir("dpo") / "lora.safetensors"
    counts = {"oracle": p.eval.cases, "base": p.eval.base, "sft": p.eval.cases, "null": p.eval.null,
              "swap": p.eval.swap, "dpo": p.eval.cases}
    scores: dict[str, list[dict]] = {}
    sheet: dict[str, np.ndarray] = {}
    for arm in arms:
        if arm == "dpo" and not dpo.is_file():
            run.log("[toy] eval: no DPO LoRA (no pairs survived), the dpo arm is skipped")
            continue
        engine = None if arm == "oracle" else run.engine() if arm == "base" else \
            run.engine(sft, dpo) if arm == "dpo" else run.engine(sft)
        black = np.zeros((world.size, world.size, 3), np.uint8)
        rows, frames_kept = [], []
        for case in cases[:counts[arm]]:
            if arm == "oracle":
                frames = _oracle_frames(world, case)
            else:
                prompt, r = {"base": (case.prompt, None), "null": (case.prompt, [black] * len(case.references)),
                             "swap": (case.differential, refs(by_index[case.swap]))}.get(
                                 arm, (case.differential, refs(case)))
                frames = engine.generate(prompt, references=r, seed=case.seed, progress=False).frames
            s = score_video(evaluator, frames, case.identity, case.elements, world)
            if arm == "swap":
                b = score_video(evaluator, frames, by_index[case.swap].identity, case.elements, world)
                s["id_acc_b"], s["id_acc_raw_b"] = b["id_acc"], b["id_acc_raw"]
            s["case"] = case.index
            rows.append(s)
            if len(frames_kept) < p.eval.sheet:
                frames_kept.append(frames.numpy())
        scores[arm] = rows
        sheet[arm] = np.stack(frames_kept)
        run.log(f"[toy] eval {arm}: {len(rows)} cases, id_acc {np.mean([r['id_acc'] for r in rows]):.3f}, "
                f"elem_acc {np.mean([r['elem_acc'] for r in rows]):.3f}, valid {np.mean([r['valid'] for r in rows]):.3f}")
    refs_sheet = [np.asarray(_ref_image(run.dir("world") / c.references[0], world.size)) for c in cases[:p.eval.sheet]]
    np.savez_compressed(out / "sheet.npz", references=np.stack(refs_sheet), **sheet)
    (out / "cases.json").write_text(json.dumps(scores))
    return {"arms": summarize(scores), "comparisons": comparisons(scores), "chance_id_acc": chance_id_acc(world)}


def _ref_image(path: Path, size: int):
    from PIL import Image

    return Image.open(path).convert("RGB").resize((size, size), Image.NEAREST)


def summarize(scores: dict[str, list[dict]]) -> dict:
    out = {}
    for arm, rows in scores.items():
        keys = [k for k in rows[0] if k not in ("case", "background_pred")]
        out[arm] = {"n": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    return out


def comparisons(scores: dict[str, list[dict]]) -> dict:
    """Paired comparisons on the cases both arms ran (the first n: arms share the case order)."""
    out = {}
    for a, b, key in (("base", "sft", "id_acc"), ("base", "sft", "elem_acc"), ("sft", "dpo", "id_acc"),
                      ("sft", "dpo", "elem_acc"), ("base", "null", "id_acc"),
                      ("base", "sft", "id_acc_raw"), ("sft", "dpo", "id_acc_raw")):  # the last two: diagnostics
        if a in scores and b in scores:
            n = min(len(scores[a]), len(scores[b]))
            c = compare([r[key] for r in scores[a][:n]], [r[key] for r in scores[b][:n]])
            out[f"{b}-{a}:{key}"] = c.to_json()
    if "swap" in scores and "sft" in scores:
        n = len(scores["swap"])
        out["swap"] = {"n": n, "sft_id_acc": float(np.mean([r["id_acc"] for r in scores["sft"][:n]])),
                       "id_acc_b": float(np.mean([r["id_acc_b"] for r in scores["swap"]])),
                       "id_acc_a": float(np.mean([r["id_acc"] for r in scores["swap"]])),
                       "id_acc_raw_b": float(np.mean([r["id_acc_raw_b"] for r in scores["swap"]])),
                       "id_acc_raw_a": float(np.mean([r["id_acc_raw"] for r in scores["swap"]]))}
    return out


def copy_rate(rows: list[dict], cases: dict[int, W.Case]) -> float:
    """Share of cases, where the primary reference's background differs from the prompt's, whose generated
    background follows the reference instead (copy-paste guard; backgrounds only)."""
    hits = [r["background_pred"] == cases[r["case"]].primary_background for r in rows
            if cases[r["case"]].primary_background != cases[r["case"]].elements.background]
    return float(np.mean(hits)) if hits else 0.0


def verdicts(gates_passed: bool, ev: dict, pairs: int, copy: float) -> dict:
    """Claims (a) and (b) by the rules fixed in issue 19 before the first run; "inconclusive" when the evaluator
    failed its gates, the base is not yet a generator, or (b only) fewer than 100 pairs survived."""
    arms, cmp = ev["arms"], ev["comparisons"]
    base = arms.get("base", {})
    generator = base.get("valid", 0) >= 0.8 and base.get("elem_acc", 0) >= 0.7
    why = [] if gates_passed else ["the evaluator failed its gates"]
    if not generator:
        why.append(f"the base is not yet a generator (valid {base.get('valid', 0):.2f} < 0.8 or elem_acc "
                   f"{base.get('elem_acc', 0):.2f} < 0.7)")
    out: dict = {}
    if why:
        out["a"] = {"verdict": "inconclusive", "why": why}
    else:
        ab, sw = cmp["sft-base:id_acc"], cmp["swap"]
        checks = {"sft_minus_base_ci_low > 0.15": ab["ci_low"] > 0.15,
                  "swap: id_acc vs B >= sft - 0.15": sw["id_acc_b"] >= sw["sft_id_acc"] - 0.15,
                  "swap: id_acc vs A <= chance + 0.10": sw["id_acc_a"] <= ev["chance_id_acc"] + 0.10,
                  "null <= base + 0.10": arms["null"]["id_acc"] <= base["id_acc"] + 0.10,
                  "elem_acc(sft) >= elem_acc(base) - 0.10": arms["sft"]["elem_acc"] >= base["elem_acc"] - 0.10,
                  "copy_rate <= 0.2": copy <= 0.2}
        out["a"] = {"verdict": "pass" if all(checks.values()) else "fail", "checks": checks}
    why_b = why + ([f"only {pairs} Pareto pairs (< 100)"] if pairs < 100 else [])
    if why_b or "dpo-sft:id_acc" not in cmp:
        out["b"] = {"verdict": "inconclusive", "why": why_b or ["the DPO arm did not run"]}
    else:
        d = cmp["dpo-sft:id_acc"]
        checks = {"dpo - sft: ci_low > 0 or (sign p < 0.05 and win rate > 0.5)":
                  d["ci_low"] > 0 or (d["p_sign"] < 0.05 and d["win_rate"] > 0.5),
                  "elem_acc(dpo) >= elem_acc(sft) - 0.05": arms["dpo"]["elem_acc"] >= arms["sft"]["elem_acc"] - 0.05}
        out["b"] = {"verdict": "pass" if all(checks.values()) else "fail", "checks": checks}
    return out


__all__ = ["ARMS", "run_arms", "summarize", "comparisons", "copy_rate", "verdicts"]
