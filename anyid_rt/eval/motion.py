"""Motion: dense optical flow (OpenCV Farneback) between consecutive frames, and the copy-paste guard.

A model can score a high face similarity by pasting the reference into every frame; such a video barely
moves. The flow is computed on grey frames resized so that the short side is `short_side` pixels (256 by
default: magnitudes are comparable across resolutions, and the cost is a few ms per pair), and reported in
pixels per frame at that size. `mean` is the average over frame pairs of the mean magnitude over the frame,
so a still background lowers it: a head moving in front of a fixed camera gives a small but non-zero value.
"""
from __future__ import annotations

import numpy as np

# Farneback parameters: a 3-level pyramid halving each time, 15-pixel windows, 3 iterations, degree-5
# polynomial expansion with sigma 1.2 (OpenCV's documented defaults for this use).
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def working_size(h: int, w: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side at `short_side` (never upscaled), aspect kept."""
    s = min(1.0, short_side / min(h, w))
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def flow_magnitudes(frames: np.ndarray, short_side: int = 256, step: int = 1, progress=None) -> np.ndarray:
    """Mean optical-flow magnitude of each pair (t, t + step) of uint8 [T, H, W, 3] frames, in pixels per frame
    at the working size: float [ceil((T - 1) / step)] (empty for a single frame)."""
    import cv2

    t_count, h, w = frames.shape[:3]
    hh, ww = working_size(h, w, short_side)

    def grey(t: int) -> np.ndarray:
        g = cv2.cvtColor(np.ascontiguousarray(frames[t]), cv2.COLOR_RGB2GRAY)
        return g if (hh, ww) == (h, w) else cv2.resize(g, (ww, hh), interpolation=cv2.INTER_AREA)

    out = []
    prev = grey(0)
    for t in range(step, t_count, step):
        cur = grey(t)
        flow = cv2.calcOpticalFlowFarneback(prev, cur, None, **FARNEBACK)  # [h, w, 2] (dx, dy)
        out.append(float(np.linalg.norm(flow, axis=-1).mean()) / step)
        prev = cur
        if progress is not None:
            progress.update(1)
    return np.asarray(out, np.float64)


def motion_report(frames: np.ndarray, short_side: int = 256, step: int = 1, progress=None) -> dict:
    mags = flow_magnitudes(frames, short_side, step, progress)
    hh, ww = working_size(*frames.shape[1:3], short_side)
    return {
        "flow_mean": round(float(mags.mean()), 4) if len(mags) else None,
        "flow_max": round(float(mags.max()), 4) if len(mags) else None,
        "curve": [round(float(m), 4) for m in mags],
        "unit": f"pixels per frame at {ww}x{hh}",
        "step": step,
    }


def copy_paste_guard(identity: float | None, flow_mean: float | None, min_identity: float,
                     max_motion: float) -> dict:
    """Flag a video whose identity is high while it hardly moves (likely a pasted reference)."""
    flagged = identity is not None and flow_mean is not None and identity >= min_identity \
        and flow_mean < max_motion
    reason = (f"identity {identity:.3f} >= {min_identity} while mean flow {flow_mean:.3f} < {max_motion}: the "
              f"video barely moves; it may copy the reference" if flagged else None)
    return {"flagged": bool(flagged), "reason": reason, "identity": identity, "flow_mean": flow_mean,
            "min_identity": min_identity, "max_motion": max_motion}


__all__ = ["flow_magnitudes", "motion_report", "copy_paste_guard", "working_size", "FARNEBACK"]
