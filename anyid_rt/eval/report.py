"""Reports: the flat summary of one evaluation, Markdown tables, run comparisons and PNG plots.

A summary is a flat dict of the headline numbers of one report (`summarize`), the row that results.jsonl
keeps for each case and that tables and comparisons read: `face_rate`, `<recogniser>.all_ref` (the
Holi-* analogue), `<recogniser>.primary`, `<recogniser>.worst`, `flow`, `copy_paste`, `ele_clip`, `ele_dino`,
`clip_text` (None where not measured).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..files import atomic_path, write_text_atomic

# Columns that are not scores (left out of comparisons' deltas).
NON_SCORES = ("copy_paste",)


def summarize(report: dict) -> dict:
    row: dict = {"face_rate": report["face_rate"]}
    for name, block in report["identity"].items():
        row[f"{name}.all_ref"] = block["all_reference"]
        row[f"{name}.primary"] = block["primary"]
        row[f"{name}.worst"] = block["worst_frame"]
    row["flow"] = report["motion"]["flow_mean"]
    row["copy_paste"] = report["copy_paste"]["flagged"]
    for name in ("clip", "dino"):
        block = (report.get("elements") or {}).get(name)
        row[f"ele_{name}"] = None if block is None else block["primary"]
    pf = report.get("prompt_following")
    row["clip_text"] = None if pf is None else pf["clip_text"]
    return row


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "**yes**" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v).replace("|", "\\|")


def _columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    # a column with no value anywhere (say ele_dino without --dino) only adds noise
    return [c for c in cols if any(r.get(c) is not None for r in rows)]


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    cols = list(columns) if columns is not None else _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def mean_row(rows: Sequence[dict], columns: Sequence[str]) -> dict:
    out: dict = {}
    for c in columns:
        vals = [r.get(c) for r in rows]
        nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None]
        if c in NON_SCORES:
            out[c] = sum(bool(v) for v in vals)  # how many flagged
        else:
            out[c] = sum(nums) / len(nums) if nums else None
    return out


def suite_markdown(results: Sequence[dict], title: str) -> str:
    rows = [{"case": r["case"], **r["summary"]} for r in results]
    cols = _columns(rows)
    mean = {"case": f"mean ({len(rows)})", **mean_row(rows, [c for c in cols if c != "case"])}
    text = [f"# {title}", "", markdown_table(rows + [mean], cols), _LEGEND]
    return "\n".join(text)


_LEGEND = """\
`<recogniser>.all_ref`: mean over references of the frame-vs-reference face cosine clipped at 0 (AnyID's
Holi-* definition, with this recogniser); `.primary`: against the primary reference only; `.worst`: the
lowest per-frame score; `face_rate`: share of sampled frames with a face (frames without one are left out
of the means); `flow`: mean optical flow, pixels per frame at a 256-pixel short side; `copy_paste`: high
identity with almost no motion; `ele_*`: frame-vs-primary-reference image-embedding cosine; `clip_text`:
frame-vs-prompt CLIP cosine. See docs/evaluation.md.
"""


def compare_markdown(runs: Sequence[tuple[str, dict[str, dict]]]) -> str:
    """`runs`: (label, {case: summary}) with this run first; one table per score, deltas = this - other."""
    this_label, this = runs[0]
    cases = [c for c in this if all(c in r for _, r in runs[1:])]
    missing = sorted(set().union(*[set(r) for _, r in runs]) - set(cases))
    metrics: list[str] = []
    for _, r in runs:
        for summ in r.values():
            for k, v in summ.items():
                if k not in metrics and k not in NON_SCORES and (v is None or isinstance(v, (int, float))):
                    metrics.append(k)
    out = [f"# Comparison: {' vs '.join(label for label, _ in runs)}", "",
           f"Deltas are `{this_label}` minus each other run, per case; the last row is the mean over the "
           f"{len(cases)} case(s) in every run.", ""]
    if missing:
        out += [f"Cases not in every run (left out): {', '.join(missing)}", ""]
    for m in metrics:
        if all(r[c].get(m) is None for _, r in runs for c in cases):
            continue
        cols = ["case"] + [label for label, _ in runs] + [f"delta vs {label}" for label, _ in runs[1:]]
        rows = []
        for c in cases + ["mean"]:
            if c == "mean":
                vals = []
                for _, r in runs:
                    nums = [r[k].get(m) for k in cases if r[k].get(m) is not None]
                    vals.append(sum(nums) / len(nums) if nums else None)
            else:
                vals = [r[c].get(m) for _, r in runs]
            row = {"case": c, **{label: v for (label, _), v in zip(runs, vals)}}
            for (label, _), v in zip(runs[1:], vals[1:]):
                row[f"delta vs {label}"] = None if v is None or vals[0] is None else f"{vals[0] - v:+.3f}"
            rows.append(row)
        out += [f"## {m}", "", markdown_table(rows, cols)]
    return "\n".join(out)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def plot_suite(results: Sequence[dict], reports: dict[str, dict], out: Path) -> list[Path]:
    """identity.png (all-reference identity per case and recogniser, with the face rate) and curves.png
    (per-frame identity of the first recogniser and the optical-flow curve of every case)."""
    plt = _pyplot()
    cases = [r["case"] for r in results]
    recognisers = [k[:-len(".all_ref")] for k in results[0]["summary"] if k.endswith(".all_ref")] if results else []
    paths = []
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(cases) + 2), 3.6))
    width = 0.8 / max(len(recognisers), 1)
    for j, name in enumerate(recognisers):
        vals = [r["summary"].get(f"{name}.all_ref") for r in results]
        xs = [i + (j - (len(recognisers) - 1) / 2) * width for i in range(len(cases))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=f"{name} all-ref")
    ax.plot(range(len(cases)), [r["summary"]["face_rate"] for r in results], "k.", label="face rate")
    ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("identity (all references) per case")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "identity.png"))
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    first = recognisers[0] if recognisers else None
    for case in cases:
        rep = reports[case]
        if first is not None:
            curve = rep["identity"][first]["curve"]
            a1.plot([p["frame"] for p in curve], [p["all_reference"] if p["face"] else math.nan for p in curve],
                    ".-", label=case)
        a2.plot(rep["motion"]["curve"], label=case)
    a1.set_title(f"per-frame identity ({first}, all references; gaps: no face)")
    a1.set_xlabel("frame")
    a1.set_ylim(0, 1.05)
    a2.set_title("optical flow (px/frame at 256 short side)")
    a2.set_xlabel("frame pair")
    for a in (a1, a2):
        if cases:
            a.legend(fontsize=7)
    paths.append(_save(fig, out / "curves.png"))
    plt.close(fig)
    return paths


def plot_compare(runs: Sequence[tuple[str, dict[str, dict]]], out: Path) -> Path:
    """compare.png: each run's all-reference identity (every recogniser) per shared case."""
    plt = _pyplot()
    cases = [c for c in runs[0][1] if all(c in r for _, r in runs[1:])]
    keys = [k for k in (next(iter(runs[0][1].values()), {}) or {}) if k.endswith(".all_ref")]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(max(5.0, 1.2 * len(cases) + 2) * max(len(keys), 1), 3.6),
                             squeeze=False)
    width = 0.8 / len(runs)
    for ax, key in zip(axes[0], keys or ["(none)"]):
        for j, (label, r) in enumerate(runs):
            xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(cases))]
            ax.bar(xs, [r[c].get(key) or 0.0 for c in cases], width, label=label)
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(key)
        ax.legend(fontsize=8)
    path = _save(fig, out / "compare.png")
    plt.close(fig)
    return path


def write_markdown(path: Path, text: str) -> Path:
    return write_text_atomic(path, text)


__all__ = ["summarize", "markdown_table", "suite_markdown", "compare_markdown", "plot_suite", "plot_compare",
           "mean_row"]
