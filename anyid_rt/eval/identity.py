"""Identity preservation: faces of sampled frames against every reference's face, per recogniser.

Definitions (the report's names; all cosines are of L2-normalised embeddings):
* per reference `cosine`: the mean cosine over the sampled frames in which a face was found;
  `facesim`: the same mean with each frame's cosine clipped at 0 (the ConsisID / OpenS2V FaceSim rule).
* `all_reference` ("Holi-*" in the AnyID paper): the mean over references of their `facesim`; AnyID
  averages over all references so that a model is judged on every view it was given, not only the primary.
* `primary`: the primary reference's `facesim`, the usual single-reference FaceSim.
* `worst_frame`: the lowest per-frame all-reference score, where identity drifts (a turned head, say).
* `face_rate`: the share of sampled frames with a detected face; frames without one are left out of the
  means (as the peers do), so read the means together with the rate.
A reference clip contributes one embedding: the normalised mean of its frames' embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .faces import Face, Recognizer, align_face, largest_face


@dataclass
class FaceFrames:
    """Faces of some frames of one clip: `faces[i]` belongs to frame `indices[i]` (None: no face found);
    `embeddings[name]` [n_found, D] has one row per found face, in frame order."""

    indices: list[int]
    faces: list[Face | None]
    embeddings: dict[str, np.ndarray]

    @property
    def found(self) -> list[int]:
        return [i for i, f in zip(self.indices, self.faces) if f is not None]

    @property
    def face_rate(self) -> float:
        return len(self.found) / max(len(self.indices), 1)


def detect_and_embed(frames: np.ndarray, indices: list[int], detector, recognizers: list[Recognizer],
                     pad_retry: bool = True, progress=None) -> FaceFrames:
    """Detect the largest face in each chosen frame of uint8 [T, H, W, 3] and embed it with every recogniser
    (aligned once per crop size). `progress` is an optional tqdm bar advanced once per frame."""
    faces: list[Face | None] = []
    crops: dict[int, list[np.ndarray]] = {r.spec.crop_size: [] for r in recognizers}
    for t in indices:
        face = largest_face(detector, frames[t], pad_retry)
        faces.append(face)
        if face is not None:
            for size in crops:
                crops[size].append(align_face(frames[t], face.landmarks, size))
        if progress is not None:
            progress.update(1)
    embeddings = {}
    for r in recognizers:
        c = crops[r.spec.crop_size]
        embeddings[r.spec.name] = r.embed(np.stack(c)) if c else np.zeros((0, r.dim), np.float32)
    return FaceFrames(list(indices), faces, embeddings)


def mean_embedding(e: np.ndarray) -> np.ndarray:
    """The normalised mean of normalised embeddings [n, D] -> [D] (one vector for a reference clip)."""
    m = e.mean(0)
    return m / max(float(np.linalg.norm(m)), 1e-12)


def _r(x) -> float | None:
    return None if x is None else round(float(x), 4)


def identity_scores(video: FaceFrames, refs: np.ndarray, name: str, labels: list[str], primary: int) -> dict:
    """The report block of one recogniser: `refs` [R, D] are the references' embeddings under it."""
    emb = video.embeddings[name]  # [n_found, D]
    cos = emb @ refs.T  # [n_found, R]
    found = video.found
    clipped = np.clip(cos, 0.0, None)
    n_ref = refs.shape[0]
    per_ref = []
    for r in range(n_ref):
        has = len(found) > 0
        per_ref.append({"reference": labels[r], "primary": r == primary,
                        "cosine": _r(cos[:, r].mean()) if has else None,
                        "facesim": _r(clipped[:, r].mean()) if has else None})
    row_of = {t: k for k, t in enumerate(found)}
    curve = []
    for t in video.indices:
        k = row_of.get(t)
        curve.append({"frame": t, "face": k is not None,
                      "scores": None if k is None else [_r(v) for v in cos[k]],
                      "all_reference": None if k is None else _r(clipped[k].mean())})
    per_frame = clipped.mean(1) if len(found) else None  # [n_found]
    return {
        "face_rate": _r(video.face_rate),
        "frames_with_face": len(found),
        "frames_sampled": len(video.indices),
        "all_reference": _r(clipped.mean()) if len(found) else None,  # = mean over refs of facesim
        "all_reference_cosine": _r(cos.mean()) if len(found) else None,
        "primary": per_ref[primary]["facesim"],
        "worst_frame": _r(per_frame.min()) if per_frame is not None else None,
        "per_reference": per_ref,
        "curve": curve,
    }


__all__ = ["FaceFrames", "detect_and_embed", "mean_embedding", "identity_scores"]
