"""The toy benchmark's report: report.json (every number, the verdicts), report.md (the tables) and sheet.png
(sample frames per arm: reference | base | SFT | DPO | ...). The verdicts come from `arms.verdicts`."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import world as W
from .arms import copy_rate, verdicts

HEADER = ("What this shows and what it does not: the project's real Engine, conditioning, LoRA SFT trainer and "
          "Flow-DPO trainer, trained from random weights on a synthetic sprite world whose identity can only come "
          "from the references. A fixed exact codec (ToyCodec) replaces the Wan2.2 VAE, so WanVAE numerics and "
          "real latent statistics are not tested, and sprites are not faces.")


def write_report(run, seconds: float) -> dict:
    out = run.out
    r = run.results
    ev = r.get("eval", {})
    gates = r["evaluator"]["gates"]
    pairs = r.get("pairs", {}).get("pairs", 0)
    copy = 0.0
    if ev and (run.dir("eval") / "cases.json").is_file():
        rows = json.loads((run.dir("eval") / "cases.json").read_text()).get("sft", [])
        cases = {c.index: c for c in W.read_cases(run.dir("world"), "unseen")}
        copy = copy_rate(rows, cases)
    verdict = verdicts(gates["passed"], ev, pairs, copy) if ev else {
        k: {"verdict": "inconclusive", "why": ["the evaluator failed its gates; later stages did not run"]}
        for k in ("a", "b")}
    report = {"header": HEADER, "preset": run.p.name, "settings": asdict(run.p), "threads": torch.get_num_threads(),
              "seconds": round(seconds, 1), "stage_seconds": {k: v.get("seconds") for k, v in r.items()},
              "skipped_stages": run.skipped, "evaluator": {"gates": gates, "fingerprint": r["evaluator"]["fingerprint"]},
              "pretrain": r.get("pretrain"), "sft": r.get("sft"), "pairs": r.get("pairs"), "dpo": r.get("dpo"),
              "eval": ev, "copy_rate": copy, "verdicts": verdict,
              "curves": ["pretrain/log.csv", "sft/log.csv", "sft/gap.json", "dpo/log.csv"]}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "report.md").write_text(markdown(report))
    if ev:
        sheet(run.dir("eval") / "sheet.npz", out / "sheet.png")
    run.log(f"[toy] verdicts: (a) {verdict['a']['verdict']}, (b) {verdict['b']['verdict']}; report in {out}")
    return report


def _f(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(rep: dict) -> str:
    lines = [f"# Toy identity benchmark: preset {rep['preset']}", "", rep["header"], "",
             f"Wall time {rep['seconds']:.0f} s on {rep['threads']} thread(s); stages (s): "
             + ", ".join(f"{k} {v}" for k, v in rep["stage_seconds"].items())
             + (f" (cached: {', '.join(rep['skipped_stages'])})" if rep["skipped_stages"] else ""), "",
             "## Verdicts (pre-registered rules of issue 19, computed by the code)", ""]
    for k, v in rep["verdicts"].items():
        lines.append(f"- **({k}) {v['verdict']}**" + (f": {'; '.join(v['why'])}" if "why" in v else ""))
        for name, ok in v.get("checks", {}).items():
            lines.append(f"  - {'yes' if ok else 'no'}: {name}")
    g = rep["evaluator"]["gates"]
    lines += ["", f"Evaluator {rep['evaluator']['fingerprint']}: worst head on clean renders {g['worst_clean']:.3f}, "
              f"at noise 0.1 {g['worst_noisy']:.3f}, noise / background-only called invalid {g['invalid']:.3f} "
              f"({'gates pass' if g['passed'] else 'gates FAIL'})."]
    ev = rep.get("eval") or {}
    if ev:
        lines += ["", "## Arms (unseen identities, same cases and seeds)", "",
                  "| arm | n | id_acc | id_exact | elem_acc | valid | id_acc_raw (diagnostic) | skin_raw |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, s in ev["arms"].items():
            lines.append(f"| {arm} | {s['n']} | {s['id_acc']:.3f} | {s['id_exact']:.3f} | {s['elem_acc']:.3f} | "
                         f"{s['valid']:.3f} | {s.get('id_acc_raw', float('nan')):.3f} | "
                         f"{s.get('raw_skin', float('nan')):.3f} |")
        lines += ["", f"Chance id_acc {ev['chance_id_acc']:.3f}; copy rate (SFT) {rep['copy_rate']:.3f}. id_acc_raw and "
                  "skin_raw read the identity heads also on frames the valid head rejects: a diagnostic, in no rule.", "",
                  "| comparison | n | mean a | mean b | b - a | 95 % CI | wins/ties/losses | sign p |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, c in ev["comparisons"].items():
            if name == "swap":
                continue
            lines.append(f"| {name} | {c['n']} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | {c['diff']:+.3f} | "
                         f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['wins']}/{c['ties']}/{c['losses']} | "
                         f"{c['p_sign']:.3g} |")
        if "swap" in ev["comparisons"]:
            s = ev["comparisons"]["swap"]
            lines += ["", f"Swapped references ({s['n']} cases): id_acc against the references' identity B "
                      f"{s['id_acc_b']:.3f} (SFT on the same cases {s['sft_id_acc']:.3f}); against the prompt's "
                      f"case A {s['id_acc_a']:.3f}. Diagnostic id_acc_raw: against B "
                      f"{s.get('id_acc_raw_b', float('nan')):.3f}, against A {s.get('id_acc_raw_a', float('nan')):.3f}."]
    sft = rep.get("sft") or {}
    if sft.get("curve"):
        lines += ["", "## SFT reliance gap (held-out, unseen identities)", "", "| step | gap | probe id_acc |",
                  "|---|---|---|"]
        lines += [f"| {c['step']} | {c['gap']:+.4f} | {c['probe_id_acc']:.3f} |" for c in sft["curve"]]
    pre, pairs, dpo = rep.get("pretrain") or {}, rep.get("pairs") or {}, rep.get("dpo") or {}
    lines += ["", "## Stages", "",
              f"- pretrain: {pre.get('steps')} steps, loss {_f(pre.get('loss_first'))} -> {_f(pre.get('loss_last'))}",
              f"- pairs: {pairs.get('matchups')} matchups, {pairs.get('pareto')} Pareto, {pairs.get('pairs')} kept; "
              f"SFT candidates on training identities: id_acc {_f(pairs.get('candidate_id_acc'))}",
              f"- dpo: {dpo.get('steps')} steps" + (f", implicit accuracy on its pairs {dpo['fit']['accuracy']:.3f}"
                                                     if "fit" in dpo else f" ({dpo.get('skipped', '')})"), ""]
    return "\n".join(lines)


def sheet(npz: Path, png: Path) -> None:
    """Columns: the primary reference, then latent frames 0 and 1 of each arm; one row per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.load(npz)
    arms = [a for a in ("oracle", "base", "sft", "null", "swap", "dpo") if a in data]
    refs = data["references"]
    rows = len(refs)
    fig, axes = plt.subplots(rows, 1 + 2 * len(arms), figsize=(1.2 * (1 + 2 * len(arms)), 1.25 * rows))
    axes = np.atleast_2d(axes)
    for i in range(rows):
        cells = [("reference", refs[i])] + [(f"{a} f{k}", data[a][i][min(k, 1)]) for a in arms for k in (0, 1)
                                            if i < len(data[a])]
        for j, ax in enumerate(axes[i]):
            ax.axis("off")
            if j < len(cells):
                ax.imshow(cells[j][1])
                if i == 0:
                    ax.set_title(cells[j][0], fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


__all__ = ["write_report", "markdown", "sheet", "HEADER"]
