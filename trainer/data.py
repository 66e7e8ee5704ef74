"""Training instances and batches over ID groups (AnyID section 4.5 and appendix A).

Every clip that fits a bucket is a target once per epoch. Its instance draws N references (primary first)
from the OTHER clips of its group, each in one form (face, portrait or clip; `references.py`), fitted into
the bucket's H x W; the target segment is resized and centre-cropped to H x W. The instance's prompt is the
differential prompt of the primary reference's clip and the target clip (`prompts.py`).

Frame rates: a target segment is taken at `fps` (Table 2: 24 fps, the rate the model generates at; the frames
nearest to that timeline, `frame_ops.resample_indices`) and a clip reference at the layout's `clip_fps`, a run
of 5..`max_clip_frames` frames, as the engine keeps a user's clip (`ConditioningLayout.clip_indices`). A clip's
rate comes from meta.json ("fps") or its file's header.

Buckets: a batch must have one target shape (frames, H, W) and one reference shape signature (latent frames
per reference). The auxiliary references follow the layout's order (`ConditioningLayout.reference_order`, the
rule the engine applies too; by default images first, then clips by length, so few signatures occur). The
sampler groups instances by (bucket, signature) and draws global batches from one group.

The rest of the data pipeline has a home of its own: `groups.py` (the ID-group format on disk),
`references.py` (reference forms, the face detector, crop boxes), `prompts.py` (differential prompts),
`pairs.py` (Flow-DPO preference pairs), `cache.py` (the disk cache of latents and embeddings).
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from .. import frame_ops, media
from ..conditioning import ConditioningLayout
from .cache import file_digest
from .groups import ClipMeta, DataError, load_groups, probe_fps
from .prompts import default_threshold, differential_prompt, make_similarity
from .references import FORMS, HaarFaceDetector, RefSpec, needs_detector, reference_region, render_reference

if TYPE_CHECKING:
    from .config import DataConfig


@dataclass(frozen=True)
class InstanceSpec:
    """One training instance: a target segment of one clip and its references (primary first)."""

    index: int
    group: int
    target_clip: int
    target_frames: tuple[int, ...]
    bucket: tuple[int, int, int]
    refs: tuple[RefSpec, ...]
    prompt: str

    @property
    def key(self) -> tuple:
        """What must agree inside a batch: the target shape and every reference's latent frame count."""
        return (self.bucket, tuple(r.latent_frames for r in self.refs))


def assign_bucket(frames: int, height: int, width: int, buckets: Sequence[tuple[int, int, int]]):
    """The bucket of the nearest aspect ratio (log scale) among those with at most `frames` frames, longer
    buckets first on ties; None when every bucket is longer than the clip."""
    fits = [b for b in buckets if b[0] <= frames]
    if not fits:
        return None
    ar = math.log(width / height)
    return min(fits, key=lambda b: (round(abs(math.log(b[2] / b[1]) - ar), 6), -b[0]))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class IDGroupDataset:
    """Plans training instances over ID groups (metadata only; pixels are rendered on demand).

    `instance(i, epoch)` is a pure function of (seed, i, epoch if resample_each_epoch), so that every process
    of a data-parallel run and a resumed run see the same instances.
    """

    def __init__(self, root: str | Path, buckets: Sequence[tuple[int, int, int]], *, layout: ConditioningLayout,
                 min_references: int = 1, max_references: int = 5, form_weights=(1.0, 1.0, 1.0),
                 fps: float | None = 24.0, face_margin: float = 0.35, portrait_zoom=(0.8, 1.25),
                 similarity: str | Callable = "auto", similarity_threshold: float | None = None,
                 similarity_model: str | None = None, seed: int = 0, resample_each_epoch: bool = False,
                 detector: Callable | None = None):
        self.groups = load_groups(root)
        self.buckets = [tuple(b) for b in buckets]
        self.layout = layout
        self.min_refs, self.max_refs = min_references, min(max_references, layout.max_references)
        if not 1 <= self.min_refs <= self.max_refs:
            raise ValueError(f"need 1 <= min_references ({min_references}) <= max_references ({max_references}, "
                             f"capped by the layout's max_references {layout.max_references})")
        self.form_weights = tuple(form_weights)
        self.fps = fps
        self.face_margin, self.portrait_zoom = face_margin, tuple(portrait_zoom)
        self.similarity = (make_similarity(similarity, model=similarity_model) if isinstance(similarity, str)
                           else similarity)
        # None: the cut-off calibrated for this similarity (prompts.CALIBRATED_THRESHOLDS; the paper's 0.8 is an
        # LLM's scale)
        self.threshold = default_threshold(self.similarity) if similarity_threshold is None else similarity_threshold
        self.seed, self.resample = seed, resample_each_epoch
        self._detector = detector
        self._prompts: dict[tuple, str] = {}
        self._frames: OrderedDict[Path, tuple[int, np.ndarray]] = OrderedDict()  # path -> (first index, frames)
        self._whole: set[Path] = set()
        self._rates: dict[Path, float | None] = {}
        self.targets: list[tuple[int, int, tuple[int, int, int]]] = []  # (group, clip, bucket)
        self.skipped: list[str] = []
        for g, group in enumerate(self.groups):
            if len(group.clips) < 2:
                self.skipped.append(f"{group.name}: one clip only (references come from the other clips)")
                continue
            for c, clip in enumerate(group.clips):
                n = len(self.target_timeline(clip))
                b = assign_bucket(n, clip.height, clip.width, self.buckets)
                if b is None:
                    rate = f" at {self.fps:g} fps" if self.fps else ""
                    self.skipped.append(f"{clip.path}: {n} frames{rate}, shorter than every bucket")
                else:
                    self.targets.append((g, c, b))
        if not self.targets:
            raise DataError(f"{root}: no usable target clip ({'; '.join(self.skipped[:3])})")

    @classmethod
    def from_config(cls, data: "DataConfig", layout: ConditioningLayout, seed: int) -> "IDGroupDataset":
        """The dataset a run's [data] section describes."""
        return cls(data.root, data.buckets, layout=layout, min_references=data.min_references,
                   max_references=data.max_references, form_weights=data.form_weights, fps=data.fps,
                   face_margin=data.face_margin, portrait_zoom=data.portrait_zoom, similarity=data.similarity,
                   similarity_threshold=data.similarity_threshold, similarity_model=data.similarity_model, seed=seed,
                   resample_each_epoch=data.resample_each_epoch)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def detector(self):
        if self._detector is None:
            self._detector = HaarFaceDetector()
        return self._detector

    @property
    def detector_key(self) -> str:
        return getattr(self.detector, "key", type(self.detector).__name__)

    def clips_needing_detector(self) -> list[Path]:
        """The clips some reference may be cut from whose meta.json leaves a box out that the reference's form
        needs (a face box for a face crop; a person or face box for a portrait or clip), so the face detector
        will run on them. Empty when a dataset's boxes are complete (then OpenCV is not needed)."""
        w_face, w_portrait, w_clip = self.form_weights
        forms = (["face"] if w_face > 0 else []) + (["portrait"] if w_portrait > 0 or w_clip > 0 else [])
        sources = {(g, j) for g, c, _ in self.targets for j in range(len(self.groups[g].clips)) if j != c}
        out = []
        for g, j in sorted(sources):
            clip = self.groups[g].clips[j]
            if any(needs_detector(clip, RefSpec(j, form, (i,))) for form in forms for i in range(clip.num_frames)):
                out.append(clip.path)
        return out

    # -- frame rates --------------------------------------------------------------------------------------------
    def source_fps(self, clip: ClipMeta) -> float | None:
        """The clip's frame rate: meta.json's "fps", else its file's header (read once); None if unstated."""
        if clip.fps is not None:
            return clip.fps
        if clip.path not in self._rates:
            self._rates[clip.path] = probe_fps(clip.path)
        return self._rates[clip.path]

    def _timeline(self, clip: ClipMeta, fps: float | None) -> np.ndarray:
        """The clip's source frames at `fps` (all of them when fps or the clip's rate is None)."""
        src = self.source_fps(clip) if fps is not None else None
        if src is None:
            return np.arange(clip.num_frames, dtype=np.int64)
        return frame_ops.resample_indices(clip.num_frames, src, fps)

    def target_timeline(self, clip: ClipMeta) -> np.ndarray:
        """A target clip's source frames at the data's `fps`: the frames a target segment is cut from."""
        return self._timeline(clip, self.fps)

    def reference_timeline(self, clip: ClipMeta) -> np.ndarray:
        """A reference clip's source frames at the layout's `clip_fps`: the frames a clip segment is cut from."""
        return self._timeline(clip, self.layout.clip_fps)

    # -- planning -------------------------------------------------------------------------------------------
    def instance(self, index: int, epoch: int = 0) -> InstanceSpec:
        g, c, bucket = self.targets[index]
        group = self.groups[g]
        rng = random.Random(_seed(self.seed, "instance", index, epoch if self.resample else 0))
        clip = group.clips[c]
        timeline = self.target_timeline(clip)
        start = rng.randrange(len(timeline) - bucket[0] + 1)
        n = rng.randint(self.min_refs, self.max_refs)
        others = [j for j in range(len(group.clips)) if j != c]
        sources = rng.sample(others, n) if n <= len(others) else [rng.choice(others) for _ in range(n)]
        refs = []
        for j in sources:
            src = group.clips[j]
            form = rng.choices(FORMS, weights=self.form_weights)[0]
            if form == "clip":
                frames = self.reference_timeline(src)
                longest = (min(len(frames), self.layout.max_clip_frames) - 1) // 4 * 4 + 1
                if longest < 5:
                    form = "portrait"  # a 1-4 frame clip gives no segment; it still gives images
                else:
                    # a run of consecutive frames at clip_fps, as the engine keeps a user's clip ("window")
                    length = 4 * rng.randint(1, (longest - 1) // 4) + 1
                    s = rng.randrange(len(frames) - length + 1)
                    refs.append(RefSpec(j, form, tuple(int(i) for i in frames[s:s + length])))
                    continue
            zoom = rng.uniform(*self.portrait_zoom) if form == "portrait" else 1.0
            refs.append(RefSpec(j, form, (rng.randrange(src.num_frames),), round(zoom, 4)))
        # primary first, the auxiliaries in the layout's order (the engine's rule; by default images first, then
        # clips by length, ties in the random draw order: fewer batch shapes, same content)
        refs = [refs[k] for k in self.layout.reference_order([len(r.frames) for r in refs])]
        prompt = self.prompt_for(g, refs[0].clip, c, refs[0].form)
        target = tuple(int(i) for i in timeline[start:start + bucket[0]])
        return InstanceSpec(index, g, c, target, bucket, tuple(refs), prompt)

    def prompt_for(self, group: int, primary_clip: int, target_clip: int, form: str) -> str:
        key = (group, primary_clip, target_clip, form)
        if key not in self._prompts:
            clips = self.groups[group].clips
            self._prompts[key] = differential_prompt(clips[primary_clip].description, clips[target_clip].description,
                                                     self.similarity, self.threshold, form)
        return self._prompts[key]

    # -- pixels ---------------------------------------------------------------------------------------------
    def frames_of(self, path: Path, upto: int | None = None, start: int = 0) -> np.ndarray:
        """Frames `start` .. `upto` - 1 of a clip (the whole clip when `upto` is None), uint8 [T, H, W, 3]:
        row k is frame start + k. Only that range is kept (`media.read_frames`), so a segment late in a long clip
        costs its own frames, not the clip's up to it. The last two ranges stay decoded (121 frames of 720p are
        330 MB); with a warm latent cache nothing is decoded."""
        got = self._frames.get(path)
        whole = path in self._whole  # the cached array holds every frame of the clip
        covers = got is not None and got[0] <= start and (
            whole or (upto is not None and got[0] + len(got[1]) >= upto))
        if not covers:
            if upto is None:
                got = (0, media.read_video(path).frames.numpy())
                self._whole.add(path)
            else:
                got = (start, media.read_frames(path, range(start, upto)).numpy())
                self._whole.discard(path)
            self._frames[path] = got
            while len(self._frames) > 2:
                self._whole.discard(self._frames.popitem(last=False)[0])
        self._frames.move_to_end(path)
        first, frames = got
        return frames[start - first:None if upto is None else upto - first]

    def render_target(self, spec: InstanceSpec) -> torch.Tensor:
        """The target segment resized and centre-cropped to the bucket: float [3, F, H, W] in [-1, 1]."""
        clip = self.groups[spec.group].clips[spec.target_clip]
        first = spec.target_frames[0]
        frames = self.frames_of(clip.path, spec.target_frames[-1] + 1, first)[[i - first for i in spec.target_frames]]
        _, h, w = spec.bucket
        return frame_ops.to_model_range(media.crop_center_to(torch.from_numpy(frames), w, h))

    def crop_region(self, clip: ClipMeta, ref: RefSpec, frames: np.ndarray) -> tuple[int, int, int, int]:
        """The pixel box (x0, y0, x1, y1) a reference is cut from, with this dataset's detector and margin."""
        return reference_region(clip, ref, frames, self.detector, self.face_margin)

    def render_reference(self, spec: InstanceSpec, ref: RefSpec) -> torch.Tensor:
        """One reference cropped, fitted into the bucket's H x W and padded: float [3, T, H, W] in [-1, 1]."""
        clip = self.groups[spec.group].clips[ref.clip]
        first = min(ref.frames)
        frames = self.frames_of(clip.path, max(ref.frames) + 1, first)
        _, h, w = spec.bucket
        return render_reference(clip, ref, frames, h, w, self.layout.pad_color, self.detector, self.face_margin,
                                first=first)

    def recipe(self, spec: InstanceSpec, ref: RefSpec | None) -> dict:
        """Everything that determines a rendered tensor (the cache key, with the file's content hash)."""
        group = self.groups[spec.group]
        if ref is None:
            clip = group.clips[spec.target_clip]
            return {"kind": "target", "file": file_digest(clip.path), "frames": list(spec.target_frames),
                    "bucket": list(spec.bucket)}
        clip = group.clips[ref.clip]
        boxes = {str(i): [clip.face_boxes.get(i), clip.person_boxes.get(i)] for i in ref.frames}
        return {"kind": "reference", "file": file_digest(clip.path), "form": ref.form, "frames": list(ref.frames),
                "zoom": ref.zoom, "size": list(spec.bucket[1:]), "pad": list(self.layout.pad_color),
                "margin": self.face_margin, "boxes": boxes,
                "detector": self.detector_key if needs_detector(clip, ref) else None}


class BatchPlan:
    """The order of global micro-batches: per epoch, a seeded permutation of the instances, grouped by
    `InstanceSpec.key` (one shape per batch), chunked into global micro-batches of `global_batch` instances
    (an incomplete last chunk of a group is dropped that epoch), and the chunks shuffled.

    A position is (epoch, index of the micro-batch in the epoch); rank r of a data-parallel run takes
    `batch[r * per_rank:(r + 1) * per_rank]` of every global micro-batch.
    """

    def __init__(self, keys: Callable[[int, int], tuple], num_instances: int, global_batch: int, seed: int):
        self.keys, self.n, self.global_batch, self.seed = keys, num_instances, global_batch, seed
        self._cache: dict[int, list[list[int]]] = {}

    def epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch, 7])
            order = rng.permutation(self.n).tolist()
            by_key: OrderedDict[tuple, list[int]] = OrderedDict()
            for i in order:
                by_key.setdefault(self.keys(i, epoch), []).append(i)
            chunks = []
            for members in by_key.values():
                for s in range(0, len(members) - self.global_batch + 1, self.global_batch):
                    chunks.append(members[s:s + self.global_batch])
            perm = rng.permutation(len(chunks)).tolist()
            self._cache = {epoch: [chunks[p] for p in perm]}
        return self._cache[epoch]

    def iterate(self, start_epoch: int = 0, start_index: int = 0) -> Iterator[tuple[int, int, list[int]]]:
        """Yields (epoch, index, global micro-batch) forever from a position."""
        epoch, index = start_epoch, start_index
        empty = 0
        while True:
            batches = self.epoch(epoch)
            if not batches:
                empty += 1
                if empty > 3:
                    raise DataError(f"no global batch of {self.global_batch} instances with one shape can be "
                                    "formed; lower batch_size, use fewer buckets or more clips")
            for i in range(index, len(batches)):
                yield epoch, i, batches[i]
            epoch, index = epoch + 1, 0


__all__ = ["InstanceSpec", "assign_bucket", "IDGroupDataset", "BatchPlan"]
