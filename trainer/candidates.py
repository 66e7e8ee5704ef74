"""Candidate matchups for Flow-DPO, made as the paper makes them (AnyID section 4.4): sets of inputs from the
training data, K videos per set from the trained model, each scored on the two tracks, and matchups that
humans (`anyid-rt label`, `label.py`) and the automatic scores judge; `pairs.jsonl` keeps the matchups in which
one video is strictly better on both tracks.

    anyid-rt train candidates --data configs/data/id_groups --tiny --out runs/candidates
    anyid-rt train candidates --sets sets.jsonl --model ./Wan2.2-TI2V-5B --lora sft.safetensors --k 4 \\
        --clip ./clip-vit-large-patch14 --out runs/candidates

A set of inputs is a prompt, references (one of them primary) and the ID group they come from. `--data ROOT`
makes one per target clip of every ID group (`sets_from_groups`): the references are the group's other clips,
the first one primary, and the prompt is the differential prompt from the primary's description to the
target's (section 4.3). `--sets FILE` gives them explicitly (`CandidateSet.from_json`).

The candidates folder (everything inside it; paths in its files are relative to it, so it can be moved whole):

    candidates.json    manifest: the run, the settings, which track has an automatic score and why not
    run.json           the model and LoRA(s) the videos come from (a rerun with another model is refused)
    sets.jsonl         one set of inputs per line (references copied into refs/ under their content digest)
    refs/              the references and the ID groups' clips
    videos/<set>.k<k>.mp4 + .json     the candidates and how they were made
    scores/<set>.k<k>.json            the evaluator's report of each candidate (anyid_rt.eval)
    matchups.jsonl     every pair of candidates of a set, with each track's automatic verdict
    labels.jsonl       human judgements, appended by the labelling page (label.py)
    pairs.jsonl        the preference pairs Flow-DPO reads (`merge_pairs`, rewritten after every change)

Tracks. Identity: the first face recogniser's all-reference score against every clip of the ID group (the
paper shows annotators the whole group). Prompt: the CLIP frame-text cosine (`--prompt-metric clip-text`),
or that and the CLIP element similarity to the primary reference together (`clip-text+element`: better only
when better on both), when a CLIP folder is given (`--clip`); without one the track has no automatic score
and needs human labels. A difference within the track's margin is a tie. The pair rule and the merge rule
are `pairs.pareto_filter`, `pairs.merge_axis` and `pairs.dominance`: human labels win per track, a pair needs
one candidate strictly better on both tracks.

Resumable: a video whose .json matches its set, seed and settings is not generated again; a report made with
the same evaluator settings for the same video is reused; every file is written under a temporary name and
renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..eval.common import EvalError
from ..eval.suite import ID_RE, SuiteRun, check_run_folder
from ..files import atomic_path, remove_partials, write_json_atomic, write_text_atomic
from ..media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .cache import file_digest
from .pairs import AXES, PAIRS, PairsSummary, merge_pairs

MANIFEST, SETS, MATCHUPS, LABELS = "candidates.json", "sets.jsonl", "matchups.jsonl", "labels.jsonl"
PROMPT_METRICS = ("clip-text", "clip-text+element")
FORMAT_VERSION = 1
# the flags that set each generation setting, so that a request check names what the user typed
FLAG_NAMES = {"height": "--height", "width": "--width", "num_frames": "--frames", "steps": "--steps",
              "guidance": "--guidance", "shift": "--shift", "sampler": "--sampler", "lora": "--lora",
              "path": "--model", "dtype": "--dtype", "device": "--device", "backend": "--backend",
              "text_encoder_device": "--text-encoder-device", "references": "reference", "prompt": "prompt",
              "primary": "primary", "negative_prompt": "--negative-prompt"}


class CandidatesError(ValueError):
    """A candidates folder or sets file that cannot be used; the message names the file (and line)."""


def _media(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS


@dataclass(frozen=True)
class CandidateSet:
    """One set of inputs: what the K candidates are generated from. `group` is the ID group's clips, what
    the identity track is judged against; `seed` is candidate 0's noise seed (candidate k takes seed + k)."""

    id: str
    prompt: str
    references: tuple[str, ...]
    primary: int = 0
    group: tuple[str, ...] = ()
    seed: int = 0

    @property
    def identity_references(self) -> list[str]:
        """The references, then the group's clips that are not among them: the evaluator's reference list,
        so that `primary` still indexes it."""
        return list(self.references) + [g for g in self.group if g not in self.references]

    def to_json(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "references": list(self.references), "primary": self.primary,
                "group": list(self.group), "seed": self.seed}

    @classmethod
    def from_json(cls, d: Any, where: str, base: Path) -> "CandidateSet":
        """A sets-file line: {"id", "prompt", "references": [paths], "primary" (0), "group": [paths] or an
        ID-group folder (default: the references), "seed" (0)}; relative paths start at `base`."""
        if not isinstance(d, dict):
            raise CandidatesError(f"{where}: expected a JSON object")
        unknown = sorted(set(d) - {"id", "prompt", "references", "primary", "group", "seed"})
        if unknown:
            raise CandidatesError(f"{where}: unknown key(s) {unknown}")
        sid = d.get("id")
        if not isinstance(sid, str) or not ID_RE.match(sid):
            raise CandidatesError(f"{where}: id must be 1-100 of letters, digits, '.', '_', '-', got {sid!r}")
        prompt = d.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise CandidatesError(f"{where}: set {sid}: prompt must be a non-empty string")
        refs = d.get("references")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise CandidatesError(f"{where}: set {sid}: references must be a non-empty list of file paths")
        primary, seed = d.get("primary", 0), d.get("seed", 0)
        if isinstance(primary, bool) or not isinstance(primary, int) or not 0 <= primary < len(refs):
            raise CandidatesError(f"{where}: set {sid}: primary must index its {len(refs)} reference(s)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise CandidatesError(f"{where}: set {sid}: seed must be an int")
        group = d.get("group", [])
        if isinstance(group, str):  # an ID-group folder: its clips, as meta.json lists them
            from .groups import DataError, load_group

            folder = Path(group) if Path(group).is_absolute() else base / group
            try:
                group = [str(c.path) for c in load_group(folder).clips]
            except DataError as e:
                raise CandidatesError(f"{where}: set {sid}: group: {e}") from None
        if not isinstance(group, list) or not all(isinstance(g, str) for g in group):
            raise CandidatesError(f"{where}: set {sid}: group must be a list of clip paths or an ID-group folder")
        files = []
        for what, p in [*((f"reference {i}", r) for i, r in enumerate(refs)),
                        *((f"group clip {i}", g) for i, g in enumerate(group))]:
            f = Path(p) if Path(p).is_absolute() else base / p
            if not f.is_file():
                raise CandidatesError(f"{where}: set {sid}: {what} ({f}): file not found")
            if not _media(f):
                raise CandidatesError(f"{where}: set {sid}: {what} ({f}) is not an image or video file")
            files.append(str(f))
        return cls(sid, prompt, tuple(files[:len(refs)]), primary, tuple(files[len(refs):]), seed)


def read_sets(path: str | Path) -> list[CandidateSet]:
    """A sets file: one JSON object per line (blank lines and `#` lines skipped); ids unique."""
    path = Path(path)
    if not path.is_file():
        raise CandidatesError(f"{path}: sets file not found")
    out, seen = [], {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CandidatesError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        s = CandidateSet.from_json(d, f"{path}:{n}", path.parent)
        if s.id in seen:
            raise CandidatesError(f"{path}:{n}: id {s.id!r} already used on line {seen[s.id]}")
        seen[s.id] = n
        out.append(s)
    if not out:
        raise CandidatesError(f"{path}: no sets")
    return out


def sets_from_groups(root: str | Path, per_group: int | None = None, max_references: int = 3,
                     similarity: str = "auto", threshold: float | None = None, seed: int = 0) -> list[CandidateSet]:
    """Sets of inputs from ID groups (the paper extracts them from the training data): every clip of a group
    (the first `per_group`) is a target once; its references are the group's other clips (at most
    `max_references`, in meta.json order, the first primary) and its prompt the differential prompt from the
    primary's description to the target's (`threshold` None: the similarity's calibrated cut-off). Groups of
    one clip have no reference to give and are skipped."""
    from .groups import load_groups
    from .prompts import differential_prompt, make_similarity

    sim = make_similarity(similarity)
    out = []
    for g in load_groups(root):
        if len(g.clips) < 2:
            continue
        gid = re.sub(r"[^A-Za-z0-9._-]", "_", g.name)[:80] or "group"
        for j, target in enumerate(g.clips[:per_group]):
            others = [c for c in g.clips if c is not target][:max_references]
            prompt = differential_prompt(others[0].description, target.description, sim, threshold=threshold,
                                         primary_form="clip")
            out.append(CandidateSet(f"{gid}.t{j:03d}", prompt, tuple(str(c.path) for c in others), 0,
                                    tuple(str(c.path) for c in g.clips), seed))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class CandidatesOptions:
    """`anyid-rt train candidates`, as flags. Generation settings left None take the model's defaults;
    `eval` None turns automatic scoring off (both tracks then need human labels)."""

    out: str
    data: str | None = None
    sets: str | None = None
    k: int = 2
    per_group: int | None = None
    max_references: int = 3
    similarity: str = "auto"
    model: str | None = None
    tiny: bool = False
    lora: tuple[str, ...] = ()
    dtype: str | None = None
    device: str | None = None
    text_encoder_device: str | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    sampler: str | None = None
    seed: int = 0
    eval: Any = None  # anyid_rt.eval.EvalConfig
    prompt_metric: str = "clip-text"
    identity_margin: float = 0.02
    prompt_margin: float = 0.01
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.data is None) == (self.sets is None):
            raise CandidatesError("give --data ROOT (ID groups) or --sets FILE (sets of inputs), one of them")
        if (self.model is None) == (not self.tiny):
            raise CandidatesError("give --model DIR or --tiny, one of them")
        for key, v, low in (("--k", self.k, 2), ("--max-references", self.max_references, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise CandidatesError(f"{key} {v}: must be an integer >= {low}")
        if self.per_group is not None and self.per_group < 1:
            raise CandidatesError(f"--sets-per-group {self.per_group}: must be >= 1")
        if self.prompt_metric not in PROMPT_METRICS:
            raise CandidatesError(f"--prompt-metric {self.prompt_metric}: one of {', '.join(PROMPT_METRICS)}")
        for key, v in (("--identity-margin", self.identity_margin), ("--prompt-margin", self.prompt_margin)):
            if not v >= 0:
                raise CandidatesError(f"{key} {v}: must be >= 0")

    def generation(self) -> dict:
        return {"height": self.height, "width": self.width, "num_frames": self.frames, "steps": self.steps,
                "guidance": self.guidance, "shift": self.shift, "sampler": self.sampler}

    def axes(self) -> dict:
        """What each track's automatic verdict is made of, or why there is none."""
        ev = self.eval
        if ev is None:
            none = {"automatic": False, "metric": None, "margin": None,
                    "note": "scoring is off (--no-scoring): label this track on the page (anyid-rt label)"}
            return {"identity": dict(none), "prompt": dict(none)}
        identity = {"automatic": True, "metric": f"{ev.recognizers[0].name}.all_reference",
                    "margin": self.identity_margin,
                    "note": "face similarity to every clip of the ID group; a video with no face has no score"}
        if ev.clip is None:
            prompt = {"automatic": False, "metric": None, "margin": None,
                      "note": "no CLIP model folder (--clip DIR): prompt following has no automatic score; label "
                              "this track on the page (anyid-rt label)"}
        else:
            prompt = {"automatic": True, "metric": self.prompt_metric, "margin": self.prompt_margin,
                      "note": "CLIP frame-text cosine" + (" and CLIP similarity to the primary reference, both"
                                                          if self.prompt_metric == "clip-text+element" else "")}
        return {"identity": identity, "prompt": prompt}


# ---------------------------------------------------------------------------------------------------------------
# Scores and verdicts
# ---------------------------------------------------------------------------------------------------------------

def candidate_scores(report: dict) -> dict:
    """The numbers of an evaluator report the tracks use (None: not measured, or no face in the video)."""
    ident = next(iter(report["identity"].values()))
    clip = (report.get("elements") or {}).get("clip")
    pf = report.get("prompt_following")
    return {"identity": ident["all_reference"], "face_rate": report["face_rate"],
            "clip_text": None if pf is None else pf["clip_text"], "element": None if clip is None else clip["primary"]}


def compare(x: float | None, y: float | None, margin: float) -> int | None:
    """+1 when x beats y by more than `margin`, -1 the other way, 0 within it, None when either is missing."""
    if x is None or y is None:
        return None
    return 1 if x - y > margin else -1 if y - x > margin else 0


def auto_verdicts(a: dict | None, b: dict | None, axes: dict) -> dict:
    """Each track's automatic verdict on candidate a against b (their `candidate_scores`; None: unscored)."""
    out = {"identity": None, "prompt": None}
    if a is None or b is None:
        return out
    if axes["identity"]["automatic"]:
        out["identity"] = compare(a["identity"], b["identity"], axes["identity"]["margin"])
    p = axes["prompt"]
    if p["automatic"]:
        text = compare(a["clip_text"], b["clip_text"], p["margin"])
        if p["metric"] == "clip-text":
            out["prompt"] = text
        else:  # better at following the prompt AND at keeping what it does not mention, or a tie
            elem = compare(a["element"], b["element"], p["margin"])
            out["prompt"] = None if text is None or elem is None else text if text == elem else 0
    return out


# ---------------------------------------------------------------------------------------------------------------
# The folder, as the labelling page and `anyid-rt train pairs` read it
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Matchup:
    """Two candidates of one set. `a` / `b`: {"k", "video" (relative path), "digest", "scores"}; `auto`: each
    track's automatic verdict on a against b (+1 / 0 / -1, None: none)."""

    id: str
    set: str
    a: dict
    b: dict
    auto: dict

    @property
    def stamp(self) -> str:
        """Which videos the matchup compares: a label made for other videos (regenerated since) is stale."""
        return f"{self.a['digest']}:{self.b['digest']}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class CandidatesFolder:
    root: Path
    manifest: dict
    sets: dict[str, CandidateSet]
    matchups: list[Matchup] = field(default_factory=list)

    def inside(self, rel: str, where: str) -> Path:
        """A path of the folder's files: relative, and inside the folder once resolved."""
        p = (self.root / rel).resolve()
        if Path(rel).is_absolute() or not p.is_relative_to(self.root.resolve()):
            raise CandidatesError(f"{where}: {rel!r} is not a path inside the candidates folder")
        if not p.is_file():
            raise CandidatesError(f"{where}: {rel}: file not found")
        return p

    @classmethod
    def load(cls, root: str | Path) -> "CandidatesFolder":
        """Read and check a candidates folder (its manifest, sets and matchups; every file they name)."""
        root = Path(root)
        if not root.is_dir():
            raise CandidatesError(f"{root}: not a folder")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise CandidatesError(f"{root}: no {MANIFEST}, so not a candidates folder (make one with "
                                  "`anyid-rt train candidates ... --out DIR`)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CandidatesError(f"{mpath}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION or \
                not isinstance(manifest.get("axes"), dict) or set(manifest["axes"]) != set(AXES):
            raise CandidatesError(f"{mpath}: not a version-{FORMAT_VERSION} candidates manifest with both tracks")
        folder = cls(root, manifest, {})
        for n, d in _jsonl(root / SETS):
            where = f"{root / SETS}:{n}"
            s = CandidateSet.from_json(d, where, root)  # keys, types, files
            if s.id in folder.sets:
                raise CandidatesError(f"{where}: set {s.id!r} appears twice")
            if not isinstance(d.get("group", []), list):
                raise CandidatesError(f"{where}: set {s.id}: group must be a list of files in the folder")
            for i, f in enumerate([*d["references"], *d.get("group", [])]):
                folder.inside(f, f"{where}: set {s.id} file {i}")
            folder.sets[s.id] = CandidateSet(s.id, s.prompt, tuple(d["references"]), s.primary,
                                             tuple(d.get("group", [])), s.seed)
        seen = set()
        verdict = lambda v: v is None or (type(v) is int and v in (-1, 0, 1))  # noqa: E731
        for n, d in _jsonl(root / MATCHUPS):
            where = f"{root / MATCHUPS}:{n}"
            if not isinstance(d, dict) or set(d) != {"id", "set", "a", "b", "auto"}:
                raise CandidatesError(f"{where}: a matchup has the keys id, set, a, b, auto")
            if not isinstance(d["id"], str) or not isinstance(d["set"], str):
                raise CandidatesError(f"{where}: id and set must be strings")
            if d["set"] not in folder.sets:
                raise CandidatesError(f"{where}: set {d['set']!r} is not in {SETS}")
            if d["id"] in seen:
                raise CandidatesError(f"{where}: matchup {d['id']!r} appears twice")
            seen.add(d["id"])
            for side in ("a", "b"):
                c = d[side]
                if not isinstance(c, dict) or not isinstance(c.get("video"), str) or not isinstance(c.get("digest"),
                                                                                                      str):
                    raise CandidatesError(f"{where}: {side} needs a video path and its digest")
                folder.inside(c["video"], f"{where}: {side}")
            auto = d["auto"]
            if not isinstance(auto, dict) or set(auto) != set(AXES) or not all(map(verdict, auto.values())):
                raise CandidatesError(f"{where}: auto must be {{\"identity\": 1|0|-1|null, \"prompt\": ...}}")
            folder.matchups.append(Matchup(d["id"], d["set"], d["a"], d["b"], auto))
        if not folder.matchups:
            raise CandidatesError(f"{root / MATCHUPS}: no matchups")
        return folder


def _jsonl(path: Path):
    if not path.is_file():
        raise CandidatesError(f"{path}: file not found (the candidates folder is incomplete: rerun "
                              "`anyid-rt train candidates` to finish it)")
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if raw.strip():
            try:
                yield n, json.loads(raw)
            except json.JSONDecodeError as e:
                raise CandidatesError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None


# ---------------------------------------------------------------------------------------------------------------
# Making a folder
# ---------------------------------------------------------------------------------------------------------------

def _copy_in(src: str, refs: Path, root: Path) -> str:
    """`src` placed in refs/ under its content digest (a hard link where possible); its path from `root`."""
    dst = refs / f"{file_digest(src)[:20]}{Path(src).suffix.lower()}"
    if not dst.is_file():
        with atomic_path(dst) as tmp:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
    return dst.relative_to(root).as_posix()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_candidates(opts: CandidatesOptions, *, engine: Any = None, engine_factory: Callable[[], Any] | None = None,
                   human: dict | None = None, log: Callable[[str], None] = print) -> PairsSummary:
    """Make (or finish) a candidates folder: check everything, copy the inputs in, generate the missing
    candidates, score them, propose the matchups, and write pairs.jsonl from the automatic verdicts and
    any human labels already in the folder. `engine` / `engine_factory` replace the model the options name."""
    from tqdm.auto import tqdm

    from .label import read_labels
    from .preflight import check_candidates

    checks = check_candidates(opts)  # every flag, path, request and package, before anything is written
    out = Path(opts.out)
    run = SuiteRun(model=str(Path(opts.model).resolve()) if opts.model else None, lora=list(opts.lora), tiny=opts.tiny)
    check_run_folder(out, run)
    refs, videos, scores = out / "refs", out / "videos", out / "scores"
    for d in (out, refs, videos, scores):
        d.mkdir(parents=True, exist_ok=True)
        if remove_partials(d):
            log(f"removed the partial files of an interrupted run in {d}")
    sets = [CandidateSet(s.id, s.prompt, tuple(_copy_in(r, refs, out) for r in s.references), s.primary,
                         tuple(_copy_in(g, refs, out) for g in s.group), s.seed) for s in checks.sets]
    write_text_atomic(out / SETS, "".join(json.dumps(s.to_json()) + "\n" for s in sets))
    write_json_atomic(out / "run.json", {"run": run.to_dict(), "sets": opts.sets or opts.data})
    evaluator = None
    if opts.eval is not None:  # every set's references must show the face before hours of generation
        from ..eval import Evaluator

        evaluator = Evaluator(opts.eval)
        for s in sets:
            try:
                evaluator.references([str(out / r) for r in s.identity_references])
            except EvalError as e:
                raise EvalError(f"set {s.id}: {e}") from None

    gen = opts.generation()
    jobs = [(s, k) for s in sets for k in range(opts.k)]
    name = lambda s, k: f"{s.id}.k{k}"  # noqa: E731
    signature = lambda s, k: {"set": s.to_json(), "k": k, "seed": s.seed + k, "generation": gen}  # noqa: E731
    todo = [(s, k) for s, k in jobs if not ((videos / f"{name(s, k)}.mp4").is_file() and (
        _read_json(videos / f"{name(s, k)}.json") or {}).get("candidate") == signature(s, k))]
    if len(todo) < len(jobs):
        log(f"{len(jobs) - len(todo)} of {len(jobs)} candidate(s) already generated in {videos}: kept")
    if todo:
        if engine is None:
            engine = engine_factory() if engine_factory is not None else checks.build_engine()
        for s, k in tqdm(todo, desc="generating", unit="video", disable=not opts.progress):
            (videos / f"{name(s, k)}.json").unlink(missing_ok=True)  # the old meta must not vouch for a new video
            t0 = time.perf_counter()
            video = engine.generate(s.prompt, references=[str(out / r) for r in s.references], primary=s.primary,
                                    seed=s.seed + k, progress=False, **gen)
            with atomic_path(videos / f"{name(s, k)}.mp4") as tmp:
                video.save(tmp)
            t, h, w, _ = video.frames.shape
            write_json_atomic(videos / f"{name(s, k)}.json", {
                "candidate": signature(s, k), "seconds": round(time.perf_counter() - t0, 3), "frames": t,
                "height": h, "width": w, "fps": video.fps})

    cand: dict[str, dict] = {}
    wanted = json.loads(json.dumps(opts.eval.to_dict())) if evaluator is not None else None
    for s, k in tqdm(jobs, desc="scoring", unit="video", disable=not opts.progress or evaluator is None):
        v = videos / f"{name(s, k)}.mp4"
        c = {"k": k, "seed": s.seed + k, "video": v.relative_to(out).as_posix(), "digest": file_digest(v),
             "scores": None}
        if evaluator is not None:
            stamp = {"digest": c["digest"], "references": s.identity_references, "primary": s.primary,
                     "prompt": s.prompt}
            report = _read_json(scores / f"{name(s, k)}.json")
            if report is None or report.get("config") != wanted or report.get("candidate") != stamp:
                report = evaluator.evaluate(str(v), [str(out / r) for r in s.identity_references], s.primary,
                                            s.prompt)
                report["candidate"] = stamp
                write_json_atomic(scores / f"{name(s, k)}.json", report)
            c["scores"] = candidate_scores(report)
        cand[name(s, k)] = c

    axes = opts.axes()
    faceless = [n for n, c in cand.items() if c["scores"] is not None and c["scores"]["identity"] is None]
    if faceless:
        log(f"{len(faceless)} of {len(cand)} candidate(s) show no face (e.g. {faceless[0]}): their matchups have no "
            "automatic identity verdict")
    matchups = [Matchup(f"{s.id}.k{i}-k{j}", s.id, cand[name(s, i)], cand[name(s, j)],
                        auto_verdicts(cand[name(s, i)]["scores"], cand[name(s, j)]["scores"], axes))
                for s in sets for i in range(opts.k) for j in range(i + 1, opts.k)]
    write_text_atomic(out / MATCHUPS, "".join(json.dumps(m.to_json()) + "\n" for m in matchups))
    write_json_atomic(out / MANIFEST, {
        "version": FORMAT_VERSION, "made_by": "anyid-rt train candidates", "run": run.to_dict(), "k": opts.k,
        "sets": len(sets), "matchups": len(matchups), "generation": gen, "axes": axes,
        "pair_rule": "a pair needs one candidate strictly better on both tracks; a tie on either rejects it; "
                     "human labels win per track, automatic verdicts fill in"})
    for axis, a in axes.items():
        if not a["automatic"]:
            log(f"{axis} track: no automatic verdict ({a['note']})")
    folder = CandidatesFolder.load(out)
    return merge_pairs(folder, read_labels(folder) if human is None else human)


__all__ = ["CandidateSet", "CandidatesOptions", "CandidatesFolder", "CandidatesError", "Matchup", "PairsSummary",
           "read_sets", "sets_from_groups", "candidate_scores", "compare", "auto_verdicts", "merge_pairs",
           "run_candidates", "AXES", "PROMPT_METRICS", "MANIFEST", "SETS", "MATCHUPS", "LABELS", "PAIRS"]
