"""The region around the person that a reference is cut to: the face detector and the crop boxes.

Training cuts every reference from its clip around the person (AnyID section 4.5: a face crop, a portrait
around the person, or a clip segment cropped to its unified person region; `anyid_rt.trainer.references`).
A model trained that way may be given uncropped photos at inference; `ConditioningLayout(person_crop=True)`
cuts them the way training cut its portraits and clips (`person_region`), with the same detector. Boxes are
(x0, y0, x1, y1) in pixels of the frame.

The detector is OpenCV's frontal-face Haar cascade (opencv-python-headless 4.x ships it; 5.x ships none).
OpenCV is optional: without it `HaarFaceDetector()` raises `DetectorUnavailable`, a ValueError whose message
says what to install, so a request that asks for a crop is refused before any work, never silently uncropped.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
OPENCV_HINT = "pip install 'opencv-python-headless<5'"


class DetectorUnavailable(ImportError, ValueError):
    """The face detector cannot be built here (OpenCV or its cascade file is missing). An ImportError (a missing
    optional package) and a ValueError (a request the installation cannot serve: the CLI's exit code 2)."""


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade. Called on an RGB uint8 [H, W, 3] frame, returns the largest face."""

    name = "haar"

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: int = 16):
        try:
            import cv2
        except ImportError as e:
            raise DetectorUnavailable(f"the face detector needs OpenCV ({e}): {OPENCV_HINT}") from e
        path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
        if not path.is_file():
            raise DetectorUnavailable(f"{path} is missing; opencv-python-headless 5.x ships no Haar cascades: "
                                      f"{OPENCV_HINT}")
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


def clip_box(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
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
    return clip_box((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), height, width)


def portrait_box(face: Box | None, person: Box | None, zoom: float, height: int, width: int) -> tuple[int, ...]:
    """The region around the person: the person box if known, else 3 face widths x 4 face heights with the
    face in the upper part; scaled by `zoom` about its centre (zoom > 1 is a wider portrait)."""
    if person is not None:
        x0, y0, x1, y1 = person
    else:
        if face is None:
            raise ValueError("portrait_box needs a face or a person box")
        fx0, fy0, fx1, fy1 = face
        fw, fh = fx1 - fx0, fy1 - fy0
        cx = (fx0 + fx1) / 2
        x0, x1 = cx - 1.5 * fw, cx + 1.5 * fw
        y0, y1 = fy0 - 0.6 * fh, fy0 + 3.4 * fh
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * zoom, (y1 - y0) * zoom
    return clip_box((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), height, width)


def union_box(boxes: Sequence[Sequence[float]]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def person_region(frames: np.ndarray, detector: Callable[[np.ndarray], Box | None],
                  zoom: float = 1.0) -> tuple[int, int, int, int] | None:
    """The box (x0, y0, x1, y1) an inference reference is cut to: the union over its frames (uint8 [T, H, W, 3])
    of the portrait box around each frame's face, as training cuts portraits (one frame) and clip segments
    (the union), at the mean of training's random zoom (1.0). Frames where no face is found add nothing;
    None when no frame has a face."""
    _, H, W, _ = frames.shape
    boxes = []
    for frame in frames:
        face = detector(frame)
        if face is not None:
            boxes.append(portrait_box(face, None, zoom, H, W))
    if not boxes:
        return None
    return tuple(int(v) for v in union_box(boxes))


__all__ = ["Box", "OPENCV_HINT", "DetectorUnavailable", "HaarFaceDetector", "clip_box", "face_crop_box",
           "portrait_box", "union_box", "person_region"]
