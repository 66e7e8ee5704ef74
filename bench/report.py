"""Turn the benchmark records (`bench/results/*.jsonl`, written by `anyid-rt bench`) into a Markdown page
(`README.md`) and two plots: latency per guided step against the token count, and achieved TFLOP/s against
the device's measured matmul ceiling and its datasheet peak.

For every device it shows the latest measurement of each (case, variant) and of each stage, with the run
it came from (date, commit, command), so that every number can be reproduced. Records of other benchmarks
(without the `anyid_rt.bench/1` schema, e.g. load.jsonl) are counted and left out. Also here: the short
table `anyid-rt bench` prints at the end of a run (`summary_lines`), and the line and bar plots of the kernel
benchmarks (`plot`, `bar_plot`).

    python bench/report.py                                  # reads and writes bench/results/
    python bench/report.py --results $OUT --out $OUT        # on a GPU machine, next to the run
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# The e2e records' schema, defined here (bench/run.py writes it) because this file also runs on its own, where
# the package is not installed (a GPU machine), and imports nothing of it.
SCHEMA = "anyid_rt.bench/1"
STEP_PLOT = "latency_vs_tokens.png"
TFLOPS_PLOT = "tflops_vs_ceiling.png"


def load_records(results: Path) -> tuple[list[dict], int]:
    """Every e2e record in results/*.jsonl (file order kept), and how many other records were left out."""
    records, other = [], 0
    for path in sorted(Path(results).glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
            if rec.get("schema") == SCHEMA:
                records.append(rec)
            else:
                other += 1
    return records, other


def _device(rec: dict) -> str:
    return rec.get("env", {}).get("device_name") or rec.get("env", {}).get("device") or "unknown device"


def latest(records: list[dict], kind: str, key) -> list[dict]:
    """The last record (by date, then file order) of `kind` for each (device, key(record))."""
    best: dict = {}
    for i, rec in enumerate(records):
        if rec.get("kind") != kind:
            continue
        k = (_device(rec), key(rec))
        rank = (rec.get("env", {}).get("date", ""), i)
        if k not in best or rank >= best[k][0]:
            best[k] = (rank, rec)
    return [rec for _, rec in sorted(best.values(), key=lambda x: x[0])]


def _f(x, spec: str, dash: str = "–") -> str:
    return dash if x is None else format(x, spec)


def _variant_order(name: str) -> tuple:
    base = name.split("+")[0]
    return ({"diffusers": 0, "torch": 1, "triton": 2}.get(base, 3), "+compile" in name, "+fp8" in name, name)


def _step_rows(steps: list[dict]) -> list[str]:
    rows = ["| case | tokens | variant | backend | ms/step | p20–p80 ms | TFLOP/s | MFU (peak) | MFU (ceiling) "
            "| speedup vs diffusers | rel. err vs torch | peak mem GB | first call s | s/video | run |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(steps, key=lambda r: (r.get("tokens") or 0, r.get("case", ""), _variant_order(r["variant"]))):
        head = f"| {r.get('case')} | {r.get('tokens', '–')} | {r['variant']} |"
        if r.get("status") != "ok":
            reason = str(r.get("reason") or r.get("status")).replace("|", "/").replace("\n", " ")
            rows.append(f"{head} {r.get('status')}: {reason[:160]} |" + " |" * 10 + f" {r.get('run_id')} |")
            continue
        t = r["timing"]
        video = (r.get("video") or {}).get("total_s")
        rows.append(
            f"{head} {r.get('attention_backend') or r.get('backend') or '–'} | {t['median_ms']:.1f} | "
            f"{t['p20_ms']:.1f}–{t['p80_ms']:.1f} | {r['tflops']:.4g} | {_f(r.get('mfu_peak'), '.1%')} | "
            f"{_f(r.get('mfu_ceiling'), '.1%')} | {_f(r.get('speedup_vs_baseline'), '.2f')}"
            f"{'x' if r.get('speedup_vs_baseline') else ''} | {_f(r.get('relerr_vs_torch'), '.1e')} | "
            f"{_f(r.get('peak_mem_gb'), '.2f')} | {r.get('first_call_s', 0):.1f} | {_f(video, '.1f')} | "
            f"{r.get('run_id')} |")
    return rows


def _stage_rows(stages: list[dict]) -> list[str]:
    rows = ["| stage | case | seconds | p20–p80 s | peak mem GB | note | run |", "|---|---|---:|---:|---:|---|---|"]
    for r in stages:
        case = r.get("case") or "–"
        if r.get("status") != "ok":
            reason = str(r.get("reason") or "").replace("|", "/")[:160]
            rows.append(f"| {r['stage']} | {case} | {r.get('status')} | | | {reason} | {r.get('run_id')} |")
            continue
        t = r["timing"]
        note = r.get("estimate") or (f"tiling {r['tiling']}" if r.get("tiling") else "")
        rows.append(f"| {r['stage']} | {case} | {r['seconds']:.4g} | {t['p20_ms'] / 1e3:.4g}–{t['p80_ms'] / 1e3:.4g} "
                    f"| {_f(r.get('peak_mem_gb'), '.2f')} | {str(note).replace('|', '/')} | {r.get('run_id')} |")
    return rows


def markdown(records: list[dict], other: int = 0) -> str:
    by_device: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for kind, key in (("dit_step", lambda r: (r.get("case"), r.get("variant"))),
                      ("stage", lambda r: (r.get("stage"), r.get("case"))),
                      ("ceiling", lambda r: None),
                      ("video", lambda r: (r.get("case"), r.get("variant"))),
                      ("diffusers_backend", lambda r: (r.get("case"), r.get("variant"), r.get("attention_backend")))):
        for rec in latest(records, kind, key):
            by_device[_device(rec)][kind].append(rec)
    runs = {r["run_id"]: r for r in records if r.get("kind") == "run"}
    out = ["# Benchmark results", "",
           "Generated by `bench/report.py` from the records of `anyid-rt bench` in this folder: for every device, "
           "the latest measurement of each case and variant. All variants of a run use the same random weights and "
           "inputs; the diffusers baseline and the ceiling come from the same run as the numbers beside them. "
           "Timings are medians of CUDA-event-timed repetitions after an untimed first call (`first call s`: "
           "compilation, autotuning). FLOPs per guided step = 2 x `count_flops` (see README.md, Benchmarks); MFU (peak) is "
           "against the dense bf16 datasheet peak, MFU (ceiling) against the bf16 matmul rate measured in the run. "
           "s/video = steps x step latency + text encode + reference encode + VAE decode, composed from parts "
           "measured in the same run.", ""]
    if other:
        out += [f"({other} records of other benchmarks in this folder are not shown.)", ""]
    if not by_device:
        out += ["No `anyid-rt bench` records yet.", ""]
    for device, kinds in sorted(by_device.items()):
        envs = [r["env"] for k in kinds.values() for r in k if r.get("env")]
        env = max(envs, key=lambda e: e.get("date", "")) if envs else {}
        out += [f"## {device}", "",
                f"driver {env.get('driver') or '–'}, torch {env.get('torch')}, CUDA {env.get('cuda') or '–'}, "
                f"triton {env.get('triton') or '–'}, diffusers {env.get('diffusers') or 'not installed'}, "
                f"transformers {env.get('transformers') or '–'}", ""]
        used = sorted({r.get("run_id") for k in kinds.values() for r in k})
        out += ["Runs:", ""]
        for rid in used:
            run = runs.get(rid)
            e = (run or {}).get("env") or next((r["env"] for k in kinds.values() for r in k
                                                if r.get("run_id") == rid), {})
            commit = (e.get("commit") or "unknown")[:10] + (" (dirty, diff " + str(e.get("diff_sha1")) + ")"
                                                           if e.get("dirty") else "")
            command = (run or {}).get("command") or "(command not recorded)"
            out.append(f"- `{rid}`: {e.get('date')}, commit {commit}: `{command}`")
        out.append("")
        for c in kinds.get("ceiling", []):
            if c.get("status") == "ok":
                out += [f"Measured ceiling (run `{c['run_id']}`): matmul {c['matmul_tflops']:.4g} TFLOP/s "
                        f"({c['matmul']['dtype']} {c['matmul']['n']}^3), copy {c['copy_gbps']:.4g} GB/s "
                        f"(bytes read + written); datasheet dense peak: "
                        f"{_f((c.get('peaks') or {}).get('bf16'), '.1f')} TFLOP/s bf16.", ""]
        if kinds.get("dit_step"):
            out += ["### Guided denoising step (batch 2: conditional + unconditional)", "",
                    *_step_rows(kinds["dit_step"]), ""]
        if kinds.get("stage"):
            out += ["### Stages", "", *_stage_rows(kinds["stage"]), ""]
        videos = [v for v in kinds.get("video", []) if v.get("status") == "ok"]
        if videos:
            out += ["### Whole videos, measured end to end (`--full-video`)", "",
                    "| case | variant | steps | seconds | composed estimate s | stages | run |",
                    "|---|---|---:|---:|---:|---|---|"]
            for v in videos:
                stages = ", ".join(f"{k} {s:.1f}" for k, s in v["timings"].items())
                out.append(f"| {v['case']} | {v['variant']} | {v['steps']} | {v['total_s']:.1f} | "
                           f"{_f(v.get('composed_total_s'), '.1f')} | {stages} | {v['run_id']} |")
            out.append("")
        probes = kinds.get("diffusers_backend", [])
        if probes:
            out += ["### diffusers attention backends tried (the fastest that ran is the baseline)", "",
                    "| case | variant | backend | status | probe ms / reason |", "|---|---|---|---|---|"]
            for p in probes:
                what = _f(p.get("probe_ms"), ".1f") if p.get("status") == "ok" else str(p.get("reason", ""))[:140]
                out.append(f"| {p.get('case')} | {p.get('variant')} | {p.get('attention_backend')} | "
                           f"{p.get('status')} | {what.replace('|', '/')} |")
            out.append("")
    out += [f"Plots: [{STEP_PLOT}]({STEP_PLOT}), [{TFLOPS_PLOT}]({TFLOPS_PLOT}).", ""]
    return "\n".join(out)


def summary_lines(records: list[dict]) -> list[str]:
    """The short table `anyid-rt bench` prints last (ceiling, stages, guided steps, videos), so that the end of
    a run's output carries its numbers."""
    lines = []
    for rec in records:
        if rec["kind"] == "ceiling" and rec["status"] == "ok":
            lines.append(f"ceiling: matmul {rec['matmul_tflops']:.4g} TFLOP/s, copy {rec['copy_gbps']:.4g} GB/s")
        elif rec["kind"] == "stage":
            name = rec["stage"] + (":" + rec["case"] if rec.get("case") else "")
            val = (f"{rec['seconds'] * 1e3:10.1f} ms  peak {_f(rec.get('peak_mem_gb'), '.2f', '-')} GB"
                   if rec["status"] == "ok" else f"{rec['status']}: {str(rec.get('reason'))[:90]}")
            lines.append(f"stage {name:28s} {val}")
    lines.append(f"{'case':5s} {'variant':20s} {'ms/step':>9s} {'p20-p80':>17s} {'TFLOP/s':>8s} {'MFU':>6s} "
                 f"{'vs ceil':>7s} {'speedup':>7s} {'relerr':>8s} {'s/video':>8s}")
    for rec in records:
        if rec["kind"] != "dit_step":
            continue
        if rec["status"] != "ok":
            lines.append(f"{rec['case']:5s} {rec['variant']:20s} {rec['status']}: {str(rec.get('reason'))[:100]}")
            continue
        t = rec["timing"]
        speedup = rec.get("speedup_vs_baseline")
        lines.append(f"{rec['case']:5s} {rec['variant']:20s} {t['median_ms']:9.1f} "
                     f"{t['p20_ms']:8.1f}-{t['p80_ms']:<8.1f} {rec['tflops']:8.4g} {_f(rec['mfu_peak'], '6.1%', '-')} "
                     f"{_f(rec['mfu_ceiling'], '7.1%', '-')} {_f(speedup, '6.2f', '-')}{'x' if speedup else ' '} "
                     f"{_f(rec.get('relerr_vs_torch'), '8.1e', '-')} {_f(rec['video']['total_s'], '8.1f', '-')}")
    for rec in records:
        if rec["kind"] == "video":
            lines.append(f"video {rec['case']}: " + (
                f"{rec['total_s']:.2f} s end to end ({rec['variant']}, {rec['steps']} steps; composed estimate "
                f"{_f(rec['composed_total_s'], '.2f', '-')} s)" if rec["status"] == "ok"
                else f"{rec['status']}: {str(rec.get('reason'))[:100]}"))
    return lines


def _pyplot(required: bool = True):
    """matplotlib.pyplot with the file backend. Where it is missing (the GPU machines may lack it): an
    ImportError, or None when the plot is optional (the JSON lines are the record, plots a convenience)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if required:
            raise
        print("matplotlib not installed: no plots", file=sys.stderr)
        return None
    return plt


def plot_latency(records: list[dict], path: Path) -> Path:
    """Median latency per guided step against the token count (p20-p80 as error bars), per device and variant."""
    plt = _pyplot()
    steps = [r for r in latest(records, "dit_step", lambda r: (r.get("case"), r.get("variant")))
             if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[str, str], list] = defaultdict(list)
    for r in steps:
        series[(_device(r), r["variant"])].append(r)
    for (device, variant), rs in sorted(series.items(), key=lambda kv: (kv[0][0], _variant_order(kv[0][1]))):
        rs.sort(key=lambda r: r["tokens"])
        x = [r["tokens"] for r in rs]
        y = [r["timing"]["median_ms"] for r in rs]
        err = [[r["timing"]["median_ms"] - r["timing"]["p20_ms"] for r in rs],
               [r["timing"]["p80_ms"] - r["timing"]["median_ms"] for r in rs]]
        label = variant if len({d for d, _ in series}) == 1 else f"{variant} ({device})"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label,
                    linestyle="--" if variant.startswith("diffusers") else "-")
    ax.set_xlabel("tokens per sample (target + references)")
    ax.set_ylabel("ms per guided step (batch 2), median")
    ax.set_title("Latency per denoising step vs token count")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no successful dit_step records", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tflops(records: list[dict], path: Path) -> Path:
    """Achieved TFLOP/s per variant and case, against the matmul ceiling measured in the same run (dashed)
    and the datasheet dense bf16 peak (dotted); one panel per device."""
    plt = _pyplot()
    steps = [r for r in latest(records, "dit_step", lambda r: (r.get("case"), r.get("variant")))
             if r.get("status") == "ok"]
    devices = sorted({_device(r) for r in steps}) or ["(no data)"]
    fig, axes = plt.subplots(len(devices), 1, figsize=(9, 4.5 * len(devices)), squeeze=False)
    for ax, device in zip(axes[:, 0], devices):
        rs = [r for r in steps if _device(r) == device]
        variants = sorted({r["variant"] for r in rs}, key=_variant_order)
        cases = sorted({r["case"] for r in rs}, key=lambda c: min(r["tokens"] for r in rs if r["case"] == c))
        width = 0.8 / max(1, len(cases))
        for j, case in enumerate(cases):
            vals = {r["variant"]: r for r in rs if r["case"] == case}
            xs = [i + (j - (len(cases) - 1) / 2) * width for i in range(len(variants))]
            hs = [vals[v]["tflops"] if v in vals else 0.0 for v in variants]
            tokens = next(r["tokens"] for r in rs if r["case"] == case)
            ax.bar(xs, hs, width, label=f"{case} ({tokens} tokens)")
        ceilings = [r.get("ceiling_tflops") for r in rs if r.get("ceiling_tflops")]
        if ceilings:
            ax.axhline(max(ceilings), linestyle="--", color="k", label=f"measured matmul ceiling {max(ceilings):.4g}")
        peaks = [(r.get("peaks") or {}).get("bf16") for r in rs if (r.get("peaks") or {}).get("bf16")]
        if peaks:
            ax.axhline(max(peaks), linestyle=":", color="r", label=f"dense bf16 peak {max(peaks):.4g}")
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels(variants, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("achieved TFLOP/s")
        ax.set_title(device)
        ax.grid(True, axis="y", alpha=0.3)
        if rs:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot(path: Path, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
         hlines: dict[str, float] | None = None, logx: bool = True) -> bool:
    """Line plot of {label: [(x, y)]} with optional labelled horizontal reference lines (kernel benchmarks);
    False when matplotlib is missing."""
    plt = _pyplot(required=False)
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in series.items():
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=label)
    for label, y in (hlines or {}).items():
        ax.axhline(y, linestyle="--", linewidth=1, color="gray")
        ax.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    if logx:
        ax.set_xscale("log", base=2)
    _save(fig, ax, path, xlabel, ylabel, title)
    plt.close(fig)
    return True


def bar_plot(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> bool:
    """Grouped bars: one group per entry of `groups`, one bar per series (values in group order)."""
    plt = _pyplot(required=False)
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
    _save(fig, ax, path, "", ylabel, title)
    plt.close(fig)
    return True


def write_report(results: Path, out: Path | None = None) -> dict[str, Path]:
    results = Path(results)
    out = Path(out or results)
    out.mkdir(parents=True, exist_ok=True)
    records, other = load_records(results)
    readme = out / "README.md"
    readme.write_text(markdown(records, other))
    return dict(readme=readme, latency=plot_latency(records, out / STEP_PLOT),
                tflops=plot_tflops(records, out / TFLOPS_PLOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent / "results"
    ap.add_argument("--results", type=Path, default=here, help="folder of *.jsonl records (default bench/results)")
    ap.add_argument("--out", type=Path, default=None, help="where README.md and the plots go (default: --results)")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # checked first: no half-written report, no traceback
        print("bench/report.py: error: the plots need matplotlib, which is not installed: pip install -e \".[bench]\" "
              "(the `bench` extra)", file=sys.stderr)
        return 2
    paths = write_report(args.results, args.out)
    for p in paths.values():
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
