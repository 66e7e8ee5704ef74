"""References for training: the three forms a reference takes, the face detector, and the crop boxes.

A training instance's references come from the OTHER clips of its ID group (AnyID section 4.5 and
appendix A); each is turned into one form:
- face: the face region of one random frame (face box from meta.json, else the face detector), squared
  and grown by `face_margin`;
- portrait: the region around the person in one random frame (the person box, else 3 x 4 face sizes
  around the face), zoomed by a random factor in `portrait_zoom` (a wider or tighter portrait);
- clip: a random segment of 4n+1 frames cropped to the union of its per-frame person regions.
Each reference is then fitted into the bucket's H x W with its aspect ratio kept and padded with the
layout's colour (as the engine does). A clip segment's frames follow the layout's frame rate
(`ConditioningLayout.clip_fps`, the frames `frame_ops.resample_indices` picks), as the engine's references do.

The detector and the box geometry live in `anyid_rt.person_crop`, shared with the engine's optional inference
crop (`ConditioningLayout.person_crop`); they are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .. import frame_ops
from ..person_crop import HaarFaceDetector, face_crop_box, portrait_box, union_box
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


def face_box(clip: ClipMeta, index: int, frame: np.ndarray, detector: Callable[[np.ndarray], Box | None]) -> Box:
    """The face box of frame `index`: from meta.json when given, else from the detector."""
    if index in clip.face_boxes:
        return clip.face_boxes[index]
    box = detector(frame)
    if box is None:
        raise NoFaceError(f"{clip.path}: no face found in frame {index} and no face box given; add "
                          f"\"face_boxes\" for this clip to meta.json (or drop the clip)")
    return box


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
