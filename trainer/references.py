"""References for training: the three forms a reference takes, the face detector, and the crop boxes.

A training instance's references come from the OTHER clips of its ID group (AnyID section 4.5 and
appendix A); each is turned into one form:
- face: the face region of one random frame (face box from meta.json, else the face detector), squared
  and grown by `face_margin`;
- portrait: the region around the person in one random frame (the person box, else 3 x 4 face sizes
  around the face), zoomed by a random factor in `portrait_zoom` (a wider or tighter portrait);
- clip: a random segment of 4n+1 frames cropped to the union of its per-frame person regions.
Each reference is then fitted into the bucket's H x W with its aspect ratio kept and padded with the
layout's colour (as the engine does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import frame_ops, media
from .groups import Box, ClipMeta, DataError

FORMS = ("face", "portrait", "clip")


class NoFaceError(DataError):
    """No face box in meta.json for a frame and the detector found none."""


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


def reference_region(clip: ClipMeta, ref: RefSpec, frames: np.ndarray, detector: Callable[[np.ndarray], Box | None],
                     face_margin: float, first: int = 0) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) a reference is cut from; `frames` is uint8 [T, H, W, 3] of its clip from
    frame `first` on (row k is frame first + k)."""
    _, H, W, _ = frames.shape
    if ref.form == "face":
        i = ref.frames[0]
        return face_crop_box(face_box(clip, i, frames[i - first], detector), face_margin, H, W)
    boxes = []
    for i in ref.frames:
        person = clip.person_boxes.get(i)
        face = None if person is not None else _face_or_none(clip, i, frames[i - first], detector)
        if person is None and face is None:
            continue
        boxes.append(portrait_box(face, person, ref.zoom, H, W))
    if not boxes:
        raise NoFaceError(f"{clip.path}: no face or person found in frames {ref.frames[0]}..{ref.frames[-1]} "
                          "and no boxes given; add \"face_boxes\" or \"person_boxes\" to meta.json")
    return tuple(int(v) for v in union_box(boxes))


def _face_or_none(clip: ClipMeta, index: int, frame: np.ndarray, detector) -> Box | None:
    try:
        return face_box(clip, index, frame, detector)
    except NoFaceError:
        return None


def render_reference(clip: ClipMeta, ref: RefSpec, frames: np.ndarray, height: int, width: int,
                     pad_color: Sequence[int], detector: Callable[[np.ndarray], Box | None],
                     face_margin: float, first: int = 0) -> torch.Tensor:
    """One reference cropped from its clip's frames (from frame `first` on), fitted into H x W and padded:
    float [3, T, H, W] in [-1, 1]."""
    x0, y0, x1, y1 = reference_region(clip, ref, frames, detector, face_margin, first)
    crop = frames[[i - first for i in ref.frames], y0:y1, x0:x1]
    return frame_ops.fit_and_pad(torch.from_numpy(np.ascontiguousarray(crop)), height, width, pad_color)


def needs_detector(clip: ClipMeta, ref: RefSpec) -> bool:
    """Whether cutting this reference consults the face detector (some frame has no box in meta.json)."""
    if ref.form == "face":
        return ref.frames[0] not in clip.face_boxes
    return any(i not in clip.person_boxes and i not in clip.face_boxes for i in ref.frames)


__all__ = ["FORMS", "NoFaceError", "RefSpec", "HaarFaceDetector", "face_box", "face_crop_box", "portrait_box",
           "union_box", "reference_region", "render_reference", "needs_detector"]
