"""The benchmark suite runner: generate the missing videos of a JSONL suite, evaluate them, tabulate, compare.

Suite file: one JSON object per line (blank lines and lines starting with # are skipped):

    {"id": "p01_smile", "references": ["p01/front.jpg", "p01/side.png", "p01/turn.mp4"], "primary": 0,
     "prompt": "Expression: a broad smile. Background: a beach at sunset.", "seed": 0, "size": "1280x704",
     "frames": 121, "steps": 50}

Keys: id (letters, digits, `._-`; unique), references (alias refs; paths relative to the suite file),
primary (default 0), prompt (required unless `video`), seed (default 0), size "WIDTHxHEIGHT", frames,
steps, guidance, shift, sampler, negative_prompt (None: the engine's / the command line's defaults), and
video: an existing video to evaluate instead of generating one (a peer model's output, say).

Output folder:

    run.json                 the model, LoRA(s) and suite of this run (a rerun with another model is refused)
    videos/<id>.mp4 + .json  generated videos and how (case, seconds, timings)
    reports/<id>.json        full evaluation reports (anyid_rt.eval.evaluator)
    results.jsonl            one line per case: case, video, report path, summary (anyid_rt.eval.report)
    results.md               the summary table with a mean row; identity.png, curves.png
    compare.md, compare.png  with --compare OTHER_DIR (repeatable): side by side, per-case deltas

Resumable: a case whose video and its .json exist (for the same case definition) is not generated again,
and a report made with the same settings is reused. Every file is written under a temporary name and
renamed into place, so an interrupted case leaves nothing half-written.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..files import atomic_path, remove_partials, write_json_atomic, write_text_atomic
from .common import EvalError
from .evaluator import EvalConfig, Evaluator

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
GEN_KEYS = ("size", "frames", "steps", "guidance", "shift", "sampler", "negative_prompt")
CASE_KEYS = {"id", "references", "refs", "primary", "prompt", "seed", "video", *GEN_KEYS}


@dataclass
class SuiteCase:
    id: str
    references: list[str]
    primary: int = 0
    prompt: str | None = None
    seed: int = 0
    size: str | None = None  # "WIDTHxHEIGHT"
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    sampler: str | None = None
    negative_prompt: str | None = None
    video: str | None = None  # evaluate this file instead of generating

    @property
    def width_height(self) -> tuple[int | None, int | None]:
        if self.size is None:
            return None, None
        w, h = self.size.lower().split("x")
        return int(w), int(h)

    def signature(self) -> dict:
        """What a generated video depends on: a stored video is reused only for the same signature."""
        return {k: v for k, v in asdict(self).items() if k not in ("video",)}


def _case_error(path: Path, line: int, msg: str) -> EvalError:
    return EvalError(f"{path}:{line}: {msg}")


def parse_suite(path: str | Path, defaults: dict | None = None) -> list[SuiteCase]:
    """Read and check a suite file; `defaults` (size, frames, steps, ...) fill keys a case leaves out."""
    from ..media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"suite file {path} not found")
    base = path.parent
    cases: list[SuiteCase] = []
    seen: dict[str, int] = {}
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _case_error(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(obj, dict):
            raise _case_error(path, n, "expected a JSON object")
        unknown = sorted(set(obj) - CASE_KEYS)
        if unknown:
            raise _case_error(path, n, f"unknown key(s) {unknown}; allowed: {sorted(CASE_KEYS)}")
        cid = obj.get("id")
        if not isinstance(cid, str) or not ID_RE.match(cid):
            raise _case_error(path, n, f"id must be 1-100 of letters, digits, '.', '_', '-', got {cid!r}")
        if cid in seen:
            raise _case_error(path, n, f"id {cid!r} already used on line {seen[cid]}")
        seen[cid] = n
        if "refs" in obj and "references" in obj:
            raise _case_error(path, n, "give references or refs, not both")
        refs = obj.get("references", obj.get("refs"))
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise _case_error(path, n, "references must be a non-empty list of file paths")
        resolved = []
        for i, r in enumerate(refs):
            p = Path(r).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise _case_error(path, n, f"case {cid}: reference {i} ({p}) not found")
            if p.suffix.lower() not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
                raise _case_error(path, n, f"case {cid}: reference {i} ({p}) is not an image or video file")
            resolved.append(str(p))
        fields_ = {**defaults, **{k: obj[k] for k in GEN_KEYS if k in obj}}
        case = SuiteCase(id=cid, references=resolved, primary=obj.get("primary", 0), prompt=obj.get("prompt"),
                         seed=obj.get("seed", 0), **fields_)
        if "video" in obj:
            v = Path(obj["video"]).expanduser()
            v = v if v.is_absolute() else base / v
            if not v.is_file():
                raise _case_error(path, n, f"case {cid}: video {v} not found")
            case.video = str(v)
        _check_case(case, path, n)
        cases.append(case)
    if not cases:
        raise EvalError(f"suite file {path} has no cases")
    return cases


def _check_case(c: SuiteCase, path: Path, n: int) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(c.primary) or not 0 <= c.primary < len(c.references):
        raise _case_error(path, n, f"case {c.id}: primary must index its {len(c.references)} reference(s)")
    if c.video is None and (not isinstance(c.prompt, str) or not c.prompt.strip()):
        raise _case_error(path, n, f"case {c.id}: a prompt is required to generate its video")
    if c.prompt is not None and not isinstance(c.prompt, str):
        raise _case_error(path, n, f"case {c.id}: prompt must be a string")
    if not is_int(c.seed):
        raise _case_error(path, n, f"case {c.id}: seed must be an int")
    if c.size is not None:
        if not isinstance(c.size, str) or not re.match(r"^\d+x\d+$", c.size.lower()):
            raise _case_error(path, n, f"case {c.id}: size must be 'WIDTHxHEIGHT', got {c.size!r}")
        w, h = c.width_height
        if w % 32 or h % 32 or not w or not h:
            raise _case_error(path, n, f"case {c.id}: width and height must be multiples of 32, got {c.size}")
    if c.frames is not None and (not is_int(c.frames) or c.frames < 1 or (c.frames - 1) % 4):
        raise _case_error(path, n, f"case {c.id}: frames must be 4n+1, got {c.frames!r}")
    if c.steps is not None and (not is_int(c.steps) or c.steps < 1):
        raise _case_error(path, n, f"case {c.id}: steps must be a positive int")
    for k in ("guidance", "shift"):
        v = getattr(c, k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise _case_error(path, n, f"case {c.id}: {k} must be a number")


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SuiteRun:
    """What identifies a run's videos: a folder never mixes videos of two models or LoRA sets."""

    model: str | None
    lora: list[str] = field(default_factory=list)
    tiny: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_run_folder(out: Path, run: SuiteRun) -> None:
    meta = _read_json(out / "run.json")
    if meta is not None and meta.get("run") != run.to_dict():
        raise EvalError(f"{out} holds videos of another run ({meta.get('run')}); use another --out for "
                        f"{run.to_dict()}")


def load_results(folder: str | Path) -> dict[str, dict]:
    """{case: summary} of a finished run folder's results.jsonl."""
    p = Path(folder) / "results.jsonl"
    if not p.is_file():
        raise EvalError(f"--compare {folder}: no results.jsonl there (not a finished eval-suite folder)")
    out = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                out[r["case"]] = r["summary"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvalError(f"{p}:{n}: not a results line ({e})") from e
    return out


def _generate(engine, case: SuiteCase, video_path: Path, progress: bool) -> dict:
    w, h = case.width_height
    t0 = time.perf_counter()
    video = engine.generate(case.prompt, references=case.references, primary=case.primary, height=h, width=w,
                            num_frames=case.frames, steps=case.steps, guidance=case.guidance, shift=case.shift,
                            sampler=case.sampler, seed=case.seed, negative_prompt=case.negative_prompt,
                            progress=progress)
    seconds = time.perf_counter() - t0
    with atomic_path(video_path) as tmp:
        video.save(tmp)
    t, hh, ww, _ = video.frames.shape
    return {"case": case.signature(), "seconds": round(seconds, 3), "timings": video.timings,
            "frames": t, "height": hh, "width": ww, "fps": video.fps}


def run_suite(suite: str | Path, out: str | Path, *, config: EvalConfig | None = None,
              model: str | None = None, lora: Sequence[str] | None = None, tiny: bool = False,
              engine: Any = None, engine_factory: Callable[[], Any] | None = None,
              engine_kwargs: dict | None = None, defaults: dict | None = None,
              compare: Sequence[str | Path] = (), progress: bool = True,
              log: Callable[[str], None] = print) -> list[dict]:
    """Generate (missing), evaluate and tabulate a suite; returns the results.jsonl rows.

    The engine comes from `engine` (an object with `generate`), `engine_factory`, or is built from `model` /
    `lora` (Engine.from_pretrained, with `engine_kwargs` such as dtype / device) or `tiny` (Engine.tiny) the
    first time a video is missing. `defaults` (size, frames, steps, ...) fill what cases leave out."""
    from tqdm.auto import tqdm

    from .report import compare_markdown, plot_compare, plot_suite, suite_markdown, summarize

    # -- check everything before loading a model or generating anything ----------------------------------------
    config = config or EvalConfig()
    out = Path(out)
    suite = Path(suite)
    cases = parse_suite(suite, defaults)
    config.check()
    lora = [str(Path(f).expanduser()) for f in (lora or [])]
    for f in lora:
        if not Path(f).is_file():
            raise EvalError(f"--lora {f}: file not found")
    if model is not None and not Path(model).expanduser().is_dir():
        raise EvalError(f"--model {model}: folder not found")
    if model is not None and tiny:
        raise EvalError("give --model or --tiny, not both")
    if lora and tiny:
        raise EvalError("--lora needs --model: the tiny model's random weights take no LoRA")
    run = SuiteRun(model=str(Path(model).expanduser().resolve()) if model else None, lora=lora, tiny=tiny)
    needs_engine = any(c.video is None for c in cases)
    if needs_engine and engine is None and engine_factory is None and model is None and not tiny:
        raise EvalError("the suite has cases to generate: pass --model DIR (Wan2.2-TI2V-5B weights) or --tiny")
    labels = [Path(d).resolve().name or str(d) for d in [out, *compare]]
    if len(set(labels)) < len(labels):  # same folder names in different places: label runs by full path
        labels = [str(Path(d).resolve()) for d in [out, *compare]]
    others = [(label, load_results(d)) for label, d in zip(labels[1:], compare)]
    out.mkdir(parents=True, exist_ok=True)
    check_run_folder(out, run)
    videos, reports = out / "videos", out / "reports"
    for d in (videos, reports):
        d.mkdir(exist_ok=True)
        removed = remove_partials(d)
        if removed:
            log(f"removed {removed} partial file(s) of an interrupted run in {d}")
    write_json_atomic(out / "run.json", {"run": run.to_dict(), "suite": str(suite.resolve())})

    # the references of every case must show a face: found out now, not after hours of generation
    evaluator = Evaluator(config)
    for c in tqdm(cases, desc="checking references", unit="case", disable=not progress):
        try:
            evaluator.references(c.references)
        except EvalError as e:
            raise EvalError(f"case {c.id}: {e}") from e

    # -- generation ---------------------------------------------------------------------------------------------
    todo = []
    for c in cases:
        if c.video is not None:
            continue
        meta = _read_json(videos / f"{c.id}.json")
        if (videos / f"{c.id}.mp4").is_file() and meta is not None and meta.get("case") == c.signature():
            continue
        todo.append(c)
    done = sum(c.video is None for c in cases) - len(todo)
    if done:
        log(f"{done} video(s) already generated in {videos}: skipped")
    if todo:
        if engine is None:
            engine = engine_factory() if engine_factory is not None else _make_engine(run, engine_kwargs or {})
        for c in tqdm(todo, desc="generating", unit="case", disable=not progress):
            video_path = videos / f"{c.id}.mp4"
            (videos / f"{c.id}.json").unlink(missing_ok=True)  # the old meta must not vouch for a new video
            meta = _generate(engine, c, video_path, progress)
            write_json_atomic(videos / f"{c.id}.json", meta)

    # -- evaluation ---------------------------------------------------------------------------------------------
    results, full = [], {}
    wanted_config = json.loads(json.dumps(config.to_dict()))  # as read back from a report (tuples -> lists)
    for c in tqdm(cases, desc="evaluating", unit="case", disable=not progress):
        video_path = Path(c.video) if c.video is not None else videos / f"{c.id}.mp4"
        report_path = reports / f"{c.id}.json"
        report = _read_json(report_path)
        stamp = {"case": c.signature(), "video": str(video_path), "video_mtime_ns": video_path.stat().st_mtime_ns}
        if report is None or report.get("config") != wanted_config or report.get("suite_case") != stamp:
            report = evaluator.evaluate(str(video_path), c.references, c.primary, c.prompt)
            report["case"] = c.id
            report["suite_case"] = stamp
            write_json_atomic(report_path, report)
        full[c.id] = report
        results.append({"case": c.id, "video": str(video_path), "report": str(report_path),
                        "summary": summarize(report)})

    # -- tables, plots, comparison ------------------------------------------------------------------------------
    write_text_atomic(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results))
    title = f"eval-suite {suite.name}: {run.model or ('tiny' if run.tiny else 'given videos')}" + \
        (f" + LoRA {', '.join(Path(f).name for f in run.lora)}" if run.lora else "")
    write_text_atomic(out / "results.md", suite_markdown(results, title))
    plot_suite(results, full, out)
    if others:
        runs = [(labels[0], {r["case"]: r["summary"] for r in results}), *others]
        write_text_atomic(out / "compare.md", compare_markdown(runs))
        plot_compare(runs, out)
    return results


def _make_engine(run: SuiteRun, kwargs: dict):
    from ..engine import Engine

    if run.tiny:
        return Engine.tiny(seed=0, **{k: v for k, v in kwargs.items() if k == "device" and v is not None})
    given = {k: v for k, v in kwargs.items() if v is not None}  # None: Engine.from_pretrained's default
    return Engine.from_pretrained(run.model, lora=run.lora or None, **given)


__all__ = ["SuiteCase", "parse_suite", "run_suite", "load_results", "SuiteRun"]
