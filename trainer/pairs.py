"""Preference pairs for Flow-DPO: two generated clips of the same inputs and which one is better, per track.

One JSONL line per pair (`read_pairs`); the labels say, for identity fidelity and for prompt following,
whether the winner is better (+1), equal (0) or worse (-1) than the loser. `pareto_filter` applies the
paper's rule (section 4.4): a pair is a training sample only when its winner is unequivocally better on BOTH
tracks, so a tie on either track rejects it. `merge_axis` and `dominance` decide a matchup from human and
automatic judgements, and `merge_pairs` writes a candidates folder's pairs file with them (`candidates.py`,
`label.py`). `PairDataset` gives each pair its bucket and reference order and renders its latents through
the cache.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from .. import frame_ops, media
from ..conditioning import ConditioningLayout, prepare_reference
from ..files import write_text_atomic
from .cache import Encoders, file_digest
from .data import assign_bucket
from .groups import DataError, probe_fps, probe_video

if TYPE_CHECKING:
    from .candidates import CandidatesFolder

_LABELS = {"winner": 1, "better": 1, "tie": 0, "equal": 0, "loser": -1, "worse": -1}
AXES = ("identity", "prompt")  # the paper's two tracks: identity fidelity, prompt controllability
PAIRS = "pairs.jsonl"  # a candidates folder's pairs file (candidates.py)


def _label(v, where: str) -> int:
    if isinstance(v, bool):
        raise DataError(f"{where}: a label is 1 / 0 / -1 or \"winner\" / \"tie\" / \"loser\", got {v!r}")
    if isinstance(v, int) and v in (-1, 0, 1):
        return v
    if isinstance(v, str) and v.lower() in _LABELS:
        return _LABELS[v.lower()]
    raise DataError(f"{where}: a label is 1 / 0 / -1 or \"winner\" / \"tie\" / \"loser\", got {v!r}")


@dataclass(frozen=True)
class PreferencePair:
    """One matchup: the inputs (prompt, references, primary) and two generated clips. The labels say, per
    track, whether the winner is better (+1), equal (0) or worse (-1) than the loser: `identity` (identity
    fidelity judged against the whole ID group) and `prompt` (primary-referenced prompt controllability)."""

    prompt: str
    references: tuple[str, ...]
    winner: str
    loser: str
    identity: int
    prompt_following: int
    primary: int = 0

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "references": list(self.references), "primary": self.primary,
                "winner": self.winner, "loser": self.loser,
                "labels": {"identity": self.identity, "prompt": self.prompt_following}}


def read_pairs(path: str | Path, root: str | Path | None = None) -> list[PreferencePair]:
    """Read a JSONL file, one pair per line:
    {"prompt": str, "references": [paths], "primary": 0, "winner": path, "loser": path,
     "labels": {"identity": 1|0|-1, "prompt": 1|0|-1}}   (labels may also be "winner"/"tie"/"loser").
    Relative paths are resolved against `root` (default: the JSONL file's folder); files must exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    base = Path(root) if root is not None else path.parent
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: invalid JSON: {e}") from e
        missing = [k for k in ("prompt", "references", "winner", "loser", "labels") if k not in d]
        if missing:
            raise DataError(f"{where}: missing {missing}")
        refs = d["references"]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise DataError(f"{where}: references must be a non-empty list of paths")
        labels = d["labels"]
        if not isinstance(labels, dict) or set(labels) != {"identity", "prompt"}:
            raise DataError(f"{where}: labels must be {{\"identity\": ..., \"prompt\": ...}}")
        primary = d.get("primary", 0)
        if not isinstance(primary, int) or not 0 <= primary < len(refs):
            raise DataError(f"{where}: primary={primary!r} is not an index into references")
        resolve = lambda p: str(p if Path(p).is_absolute() else base / p)  # noqa: E731
        files = [resolve(r) for r in refs] + [resolve(d["winner"]), resolve(d["loser"])]
        for f in files:
            if not Path(f).is_file():
                raise DataError(f"{where}: file not found: {f}")
        pairs.append(PreferencePair(str(d["prompt"]), tuple(files[:-2]), files[-2], files[-1],
                                    _label(labels["identity"], f"{where} identity"),
                                    _label(labels["prompt"], f"{where} prompt"), primary))
    return pairs


def write_pairs(path: str | Path, pairs: Sequence[PreferencePair], extra: Sequence[dict] | None = None) -> Path:
    """Write `pairs` as JSONL, under a temporary name renamed into place (a reader never sees half a file).
    `extra[i]` adds keys to line i (e.g. where each label came from); `read_pairs` ignores them."""
    lines = [{**p.to_json(), **(extra[i] if extra else {})} for i, p in enumerate(pairs)]
    return write_text_atomic(path, "".join(json.dumps(d) + "\n" for d in lines))


def pareto_filter(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """Keep the pairs whose winner is strictly better than the loser on both tracks (identity fidelity and
    prompt following): the paper (AnyID section 4.4) trains only on matchups in which one video is clearly
    the better one on both axes (Pareto dominance). A tie on either track rejects the pair; so does a line
    whose loser is the better one (write it the other way round)."""
    return [p for p in pairs if p.identity > 0 and p.prompt_following > 0]


def merge_axis(human: int | None, auto: int | None) -> tuple[int | None, str | None]:
    """One track's verdict on a matchup (+1: candidate a better, -1: b better, 0: tie) and where it came
    from: the human label wins where there is one, the automatic score's verdict is used otherwise; (None,
    None) when there is neither (the track needs a human label)."""
    if human is not None:
        return human, "human"
    if auto is not None:
        return auto, "auto"
    return None, None


def dominance(identity: int | None, prompt: int | None) -> int | None:
    """+1 when candidate a is strictly better on both tracks, -1 when b is, 0 when neither is (a tie on a
    track, or each better on one: the paper rejects such pairs), None while a track is undecided."""
    if identity is None or prompt is None:
        return None
    if identity > 0 and prompt > 0:
        return 1
    if identity < 0 and prompt < 0:
        return -1
    return 0


@dataclass
class PairsSummary:
    pairs: int = 0
    rejected: int = 0  # decided on both tracks, but no candidate strictly better on both (ties included)
    undecided: dict = field(default_factory=lambda: {a: 0 for a in AXES})  # matchups a track leaves open
    sources: dict = field(default_factory=dict)  # "human"/"auto" -> judgements used
    path: Path | None = None

    def line(self) -> str:
        open_ = ", ".join(f"{n} without {'an' if a[0] in 'aeiou' else 'a'} {a} verdict"
                          for a, n in self.undecided.items() if n)
        used = ", ".join(f"{n} {s}" for s, n in sorted(self.sources.items()))
        return (f"{self.pairs} pair(s) (strictly better on both tracks), {self.rejected} rejected (a tie or a split)"
                + (f", {open_} (label them: anyid-rt label)" if open_ else "")
                + (f"; track verdicts behind the pairs: {used}" if used else ""))


def merge_pairs(folder: "CandidatesFolder", human: dict[tuple[str, str], int], out: str | Path | None = None,
                write: bool = True) -> PairsSummary:
    """Decide every matchup (human labels win per track, automatic verdicts fill in; `pairs.merge_axis`),
    keep those with a candidate strictly better on both tracks (`pairs.dominance`) and write them, winner
    first, to `out` (default: the folder's pairs.jsonl; paths relative to the file's folder) unless not
    `write`."""
    out = Path(out) if out is not None else folder.root / PAIRS
    rel = lambda p: os.path.relpath((folder.root / p).resolve(), out.parent.resolve())  # noqa: E731
    s = PairsSummary(path=out)
    pairs, extra = [], []
    for m in folder.matchups:
        v, src = {}, {}
        for axis in AXES:
            v[axis], src[axis] = merge_axis(human.get((m.id, axis)), m.auto[axis])
            if v[axis] is None:
                s.undecided[axis] += 1
        d = dominance(v["identity"], v["prompt"])
        if d is None:
            continue
        if d == 0:
            s.rejected += 1
            continue
        for source in src.values():
            s.sources[source] = s.sources.get(source, 0) + 1
        win, lose = (m.a, m.b) if d > 0 else (m.b, m.a)
        st = folder.sets[m.set]
        pairs.append(PreferencePair(st.prompt, tuple(rel(r) for r in st.references), rel(win["video"]),
                                    rel(lose["video"]), 1, 1, st.primary))
        extra.append({"matchup": m.id, "sources": src})
    s.pairs = len(pairs)
    if write:
        write_pairs(out, pairs, extra)
    return s


@dataclass(frozen=True)
class PairSpec:
    index: int
    bucket: tuple[int, int, int]
    ref_frames: tuple[int, ...]  # latent frames per reference, in `refs` order
    refs: tuple[str, ...] = ()  # the references in the order they enter the model (the layout's rule)

    @property
    def key(self) -> tuple:
        return (self.bucket, self.ref_frames)


def _ref_pixel_frames(path: str, layout: ConditioningLayout) -> int:
    """Frames a reference keeps under the layout's reference policy (`ConditioningLayout.clip_indices`: the frame
    rate, the longest clip), from the file's header; images are 1 frame."""
    if Path(path).suffix.lower() in media.IMAGE_EXTENSIONS:
        return 1
    n, _, _ = probe_video(Path(path))
    return len(layout.clip_indices(n, probe_fps(Path(path))))


class PairDataset:
    """Preference pairs with their bucket (winner / loser clips cropped to one (frames, H, W)) and reference
    order (primary first, then the layout's order, `ConditioningLayout.reference_order`, as the engine's)."""

    def __init__(self, pairs: list[PreferencePair], buckets, layout: ConditioningLayout):
        self.pairs, self.layout = pairs, layout
        self.specs: list[PairSpec] = []
        self.skipped: list[str] = []
        for i, p in enumerate(pairs):
            (nw, hw, ww), (nl, _, _) = probe_video(Path(p.winner)), probe_video(Path(p.loser))
            b = assign_bucket(min(nw, nl), hw, ww, buckets)
            if b is None:
                self.skipped.append(f"pair {i}: clips of {min(nw, nl)} frames are shorter than every bucket")
                continue
            given = self.ordered_refs(p)
            counts = [_ref_pixel_frames(r, layout) for r in given]
            order = layout.reference_order(counts)
            frames = tuple(1 + (counts[k] - 1) // 4 for k in order)
            self.specs.append(PairSpec(i, tuple(b), frames, tuple(given[k] for k in order)))
        if not self.specs:
            raise DataError(f"no usable preference pair ({'; '.join(self.skipped[:3]) or 'empty file'})")

    def __len__(self) -> int:
        return len(self.specs)

    @staticmethod
    def ordered_refs(p: PreferencePair) -> list[str]:
        return [p.references[p.primary]] + [r for i, r in enumerate(p.references) if i != p.primary]

    def clip_pixels(self, path: str, bucket: tuple[int, int, int]) -> torch.Tensor:
        """The first F frames, resized and centre-cropped to H x W: float [3, F, H, W] in [-1, 1]."""
        f, h, w = bucket
        frames = media.read_video(path, max_frames=f).frames
        return frame_ops.to_model_range(media.crop_center_to(frames, w, h))

    def features(self, k: int, enc: Encoders):
        """(winner latent, loser latent, reference latents, prompt embedding) of spec k, through the cache."""
        spec = self.specs[k]
        p = self.pairs[spec.index]
        f, h, w = spec.bucket
        clip = lambda path: enc.latent(  # noqa: E731
            {"kind": "dpo_clip", "file": file_digest(path), "bucket": list(spec.bucket)},
            lambda: self.clip_pixels(path, spec.bucket))
        refs = []
        for j, r in enumerate(spec.refs):
            recipe = {"kind": "dpo_reference", "file": file_digest(r), "size": [h, w],
                      **self.layout.reference_policy()}
            refs.append(enc.latent(recipe, lambda r=r, j=j: prepare_reference(r, h, w, self.layout, j).pixels))
        return clip(p.winner), clip(p.loser), refs, enc.text(p.prompt)


__all__ = ["PreferencePair", "read_pairs", "write_pairs", "pareto_filter", "merge_axis", "dominance", "PairsSummary",
           "merge_pairs", "AXES", "PAIRS", "PairSpec", "PairDataset"]
