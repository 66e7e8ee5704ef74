"""Frames in memory: the uint8 [T, H, W, 3] checks, the model's [-1, 1] range, fit-and-pad geometry and the 4n+1
clip rule. No file or codec I/O here: `anyid_rt.media` reads and writes files and calls these."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch


class MediaError(ValueError):
    """A reference or output file / array could not be used; the message says what was wrong and what works."""


class Fit(NamedTuple):
    """Where kept frames go: fitted inside height x width, centred, padded with `pad` (RGB)."""

    height: int
    width: int
    pad: tuple[int, int, int]


def check_max_frames(max_frames) -> None:
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                   or max_frames < 1):
        raise ValueError(f"max_frames must be a positive int or None, got {max_frames!r}")


def writable(a: np.ndarray) -> np.ndarray:
    """Contiguous and writable (torch warns on read-only numpy memory such as np.asarray(PIL image))."""
    return np.ascontiguousarray(a) if a.flags.writeable else np.array(a, order="C")


def check_frames(frames, what: str = "frames") -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(writable(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{what} must be a uint8 tensor [T, H, W, 3], got {type(frames).__name__}")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"{what} must be uint8 [T, H, W, 3], got {str(frames.dtype).replace('torch.', '')} "
                         f"{list(frames.shape)} (load_media converts other forms)")
    if 0 in frames.shape:
        raise MediaError(f"{what} of shape {list(frames.shape)} is empty")
    return frames.cpu()


def to_model_range(frames) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1], as `TF.to_tensor(x).sub_(0.5).div_(0.5)`."""
    frames = check_frames(frames)
    return frames.permute(3, 0, 1, 2).float().div(255).sub_(0.5).div_(0.5)


def _resize(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if frame.shape[0] == height and frame.shape[1] == width:
        return frame
    return np.array(Image.fromarray(frame).resize((width, height), Image.LANCZOS))


def fit_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Where an h x w frame lands when fitted inside height x width with its aspect ratio kept:
    (top, left, new_h, new_w). The scale is min(height / h, width / w); sizes are rounded, at least 1."""
    scale = min(height / h, width / w)
    nh = min(height, max(1, round(h * scale)))
    nw = min(width, max(1, round(w * scale)))
    return (height - nh) // 2, (width - nw) // 2, nh, nw


def check_fit(height, width, pad_value) -> Fit:
    if not (isinstance(height, int) and isinstance(width, int)) or height < 1 or width < 1:
        raise ValueError(f"height and width must be positive ints, got {height!r} x {width!r}")
    if isinstance(pad_value, (int, np.integer)):
        pad_value = (int(pad_value),) * 3
    pad = tuple(pad_value)
    if len(pad) != 3 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in pad):
        raise ValueError(f"pad_value must be an int or 3 ints in [0, 255], got {pad_value!r}")
    return Fit(height, width, tuple(int(v) for v in pad))


def canvas(n: int, fit: Fit) -> np.ndarray:
    """uint8 [n, height, width, 3] of the pad colour."""
    out = np.empty((n, fit.height, fit.width, 3), np.uint8)
    out[:] = fit.pad
    return out


def paste(dst: np.ndarray, frame: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Resize one uint8 [h, w, 3] frame into its `fit_box` place on a canvas frame [height, width, 3]."""
    top, left, nh, nw = box
    dst[top:top + nh, left:left + nw] = _resize(frame, nw, nh)


def fitted(frames: np.ndarray, fit: Fit, box: tuple[int, int, int, int]) -> np.ndarray:
    """uint8 [T, h, w, 3] -> uint8 [T, height, width, 3]: each frame fitted and padded."""
    out = canvas(len(frames), fit)
    for i in range(len(frames)):
        paste(out[i], frames[i], box)
    return out


def fit_and_pad(frames, height: int, width: int, pad_value: int | Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """Fit a clip inside height x width keeping its aspect ratio, centre it, pad with `pad_value` (RGB, 0..255).

    Input uint8 [T, H, W, 3]; output float32 [3, T, height, width] in [-1, 1] (`to_model_range`). Resizing is
    PIL LANCZOS per frame (antialiased; the filter the official Wan i2v preprocessing uses); a frame already at the
    target size is copied unchanged. Placement is `fit_box` (an odd leftover puts the extra padding row/column
    at the bottom/right). `load_clip(..., size=...)` does the same to each frame while a video decodes."""
    frames = check_frames(frames)
    fit = check_fit(height, width, pad_value)
    _, h, w, _ = frames.shape
    return to_model_range(torch.from_numpy(fitted(frames.numpy(), fit, fit_box(h, w, height, width))))


def clip_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """The frames a clip of `num_frames` frames keeps as a reference of at most `max_frames` frames: increasing
    int64 indices, 4n+1 of them.

    Rule: let m be the largest 4n+1 <= max_frames. If T = num_frames <= max_frames, the first 4*floor((T-1)/4)+1
    frames (drops at most 3 frames from the end; the frame rate is kept). If T > max_frames, m frames spread
    uniformly, round(linspace(0, T-1, m)) (first and last frame kept; the step is > 1, so no index repeats). A
    1-frame clip stays 1 frame."""
    check_max_frames(max_frames)
    if max_frames is None:
        raise ValueError("max_frames is required")
    if num_frames < 1:
        raise MediaError("the clip has zero frames")
    if num_frames <= max_frames:
        return np.arange((num_frames - 1) // 4 * 4 + 1, dtype=np.int64)
    m = (max_frames - 1) // 4 * 4 + 1
    return np.round(np.linspace(0, num_frames - 1, m)).astype(np.int64)


LONG_CLIP_MODES = ("window", "subsample")


def check_fps(fps, name: str = "fps") -> None:
    """A frame rate is a positive finite number, or None (no resampling)."""
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps)
                            or fps <= 0):
        raise ValueError(f"{name} must be a positive frame rate or None, got {fps!r}")


def resample_indices(num_frames: int, src_fps: float, fps: float) -> np.ndarray:
    """The source frames of a clip of `num_frames` frames at `src_fps` that show a timeline at `fps`: frame k of
    the result is the source frame nearest to time k / fps, floor(k * src_fps / fps + 1/2) (clamped to the last
    frame), for every k whose time lies inside the clip (k / fps < num_frames / src_fps). Non-decreasing int64
    indices; a faster source drops frames, a slower one repeats them (nearest neighbour, never blends)."""
    if num_frames < 1:
        raise MediaError("the clip has zero frames")
    for name, v in (("src_fps", src_fps), ("fps", fps)):
        if v is None:
            raise ValueError(f"{name} must be a positive frame rate, got None")
        check_fps(v, name)
    step = float(src_fps) / float(fps)  # source frames per output frame
    n = max(1, int(np.ceil(num_frames / step - 1e-9)))  # outputs whose time lies inside the clip
    return np.minimum(np.floor(np.arange(n) * step + 0.5), num_frames - 1).astype(np.int64)


def select_frames(num_frames: int, max_frames: int, *, src_fps: float | None = None, fps: float | None = None,
                  long_clip: str = "subsample") -> np.ndarray:
    """The source frames a clip keeps as a reference: the one selection rule of training and inference.

    1. The timeline: with `fps` and a known `src_fps`, the frames `resample_indices` picks (the clip at `fps`);
       otherwise every frame (the clip's own rate; frames in memory carry no rate and are taken as they are).
    2. The 4n+1 rule over that timeline, at most `max_frames` (m = the largest 4n+1 <= max_frames): a timeline
       of at most max_frames frames keeps its first 4*floor((n-1)/4)+1; a longer one keeps m frames, either
       "subsample" (spread uniformly over the whole clip, `clip_indices`: the effective rate drops) or "window"
       (the centred run of m consecutive frames: the rate is kept, the rest of the clip is cut).
    Returns non-decreasing int64 source indices (repeats only where a slow clip is resampled up). With
    fps=None and long_clip="subsample" this is exactly `clip_indices`."""
    check_max_frames(max_frames)
    if max_frames is None:
        raise ValueError("max_frames is required")
    if long_clip not in LONG_CLIP_MODES:
        raise ValueError(f"long_clip must be one of {LONG_CLIP_MODES}, got {long_clip!r}")
    if num_frames < 1:
        raise MediaError("the clip has zero frames")
    timeline = (resample_indices(num_frames, src_fps, fps) if fps is not None and src_fps
                else np.arange(num_frames, dtype=np.int64))
    n = len(timeline)
    if n <= max_frames or long_clip == "subsample":
        return timeline[clip_indices(n, max_frames)]
    m = (max_frames - 1) // 4 * 4 + 1
    start = (n - m) // 2
    return timeline[start:start + m]


def to_4n_plus_1(frames, max_frames: int):
    """Make a clip 4n+1 frames long with at most `max_frames` frames (time is dim 0; tensor or numpy array): the
    frames `clip_indices` selects (a leading slice, a view, when the clip is not longer than `max_frames`)."""
    check_max_frames(max_frames)
    if max_frames is None:
        raise ValueError("max_frames is required")
    if not isinstance(frames, (torch.Tensor, np.ndarray)):
        raise TypeError(f"frames must be a tensor or numpy array, got {type(frames).__name__}")
    t = frames.shape[0] if frames.ndim else 0
    idx = clip_indices(t, max_frames)
    if t <= max_frames:
        return frames[:len(idx)]
    return frames[torch.from_numpy(idx)] if isinstance(frames, torch.Tensor) else frames[idx]


__all__ = ["MediaError", "Fit", "check_frames", "to_model_range", "fit_box", "check_fit", "fit_and_pad", "clip_indices",
           "to_4n_plus_1", "LONG_CLIP_MODES", "check_fps", "resample_indices", "select_frames"]
