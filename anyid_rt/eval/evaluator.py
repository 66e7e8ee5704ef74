"""`evaluate(video, references)`: one report with identity, element consistency, prompt following and motion.

    from anyid_rt.eval import EvalConfig, Evaluator
    ev = Evaluator(EvalConfig())                       # models are loaded once
    report = ev.evaluate("out.mp4", ["face.jpg", "clip.mp4"], primary=0, prompt="...")
    report["identity"]["sface"]["all_reference"]       # the offline proxy of Holi-Arc / Holi-Cur

The whole request is checked (files, packages, specs, settings) before a model is loaded; bad input raises
EvalError (a ValueError) with a one-line message.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .common import EvalError, require
from .faces import PRESETS, DetectorSpec, RecognizerSpec, check_face_models

REPORT_VERSION = 1


@dataclass
class EvalConfig:
    """What to measure and how.

    stride: every k-th frame is scored (identity, elements, prompt); num_samples: or N frames spread evenly
    over the video (ConsisID uses 16, OpenS2V 32), which overrides stride. ref_max_frames: frames of a
    reference clip used for its embeddings (spread evenly). clip / dino: local transformers folders (None:
    not measured). motion_short_side / motion_step: the optical-flow working size and frame step.
    copy_paste_identity / copy_paste_motion: a video whose all-reference identity (first recogniser) is at
    least the former while its mean flow is below the latter is flagged."""

    detector: DetectorSpec = field(default_factory=DetectorSpec)
    recognizers: tuple[RecognizerSpec, ...] = (PRESETS["sface"],)
    stride: int = 1
    num_samples: int | None = None
    ref_max_frames: int = 16
    clip: str | None = None
    dino: str | None = None
    device: str = "cpu"
    motion_short_side: int = 256
    motion_step: int = 1
    copy_paste_identity: float = 0.5
    copy_paste_motion: float = 0.1

    def check(self) -> None:
        """Validate settings, files and packages without loading anything."""
        for key in ("stride", "ref_max_frames", "motion_short_side", "motion_step"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EvalError(f"{key} must be a positive int, got {v!r}")
        if self.num_samples is not None and (isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int)
                                             or self.num_samples < 1):
            raise EvalError(f"num_samples must be a positive int or None, got {self.num_samples!r}")
        if not self.recognizers:
            raise EvalError("at least one face recogniser is needed")
        require("cv2", "opencv-python-headless<5", "the evaluator (face detection, optical flow)")
        check_face_models(self.detector, list(self.recognizers))
        from .embeddings import check_model_folder

        if self.clip is not None:
            check_model_folder(self.clip, "clip")
        if self.dino is not None:
            check_model_folder(self.dino, "dino")

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "detector":
                v = v.to_dict()
            elif f.name == "recognizers":
                v = [r.to_dict() for r in v]
            out[f.name] = v
        return out


@dataclass
class ReferenceData:
    """One reference, as the metrics need it: its frame count, its faces (FaceFrames: detections and
    embeddings per recogniser) and its normalised mean CLIP / DINO image features by model name."""

    label: str
    frames: int
    faces: Any
    features: dict[str, np.ndarray]


def sample_indices(n_frames: int, stride: int = 1, num_samples: int | None = None) -> list[int]:
    """The frames scored: every `stride`-th from 0, or `num_samples` spread evenly over [0, n_frames - 1]."""
    if num_samples is not None:
        return sorted({int(round(x)) for x in np.linspace(0, n_frames - 1, min(num_samples, n_frames))})
    return list(range(0, n_frames, stride))


def _label(x: Any, i: int, what: str) -> str:
    return str(x) if isinstance(x, (str, Path)) else f"{what} {i} ({type(x).__name__})"


def check_inputs(video: Any, references: Sequence[Any], primary: int) -> None:
    """Paths exist and have a supported extension; the primary index is valid (before any model is loaded)."""
    from ..media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    def check_file(x: Any, what: str) -> None:  # in-memory media are checked when they are read
        if isinstance(x, (str, Path)):
            p = Path(x)
            if not p.is_file():
                raise EvalError(f"{what}: file not found")
            if p.suffix.lower() not in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
                raise EvalError(f"{what}: unsupported file type {p.suffix!r}; supported: "
                                f"{' '.join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)}")

    check_file(video, f"video {video}")
    if not references:
        raise EvalError("at least one reference (--ref) is needed")
    for i, r in enumerate(references):
        check_file(r, f"reference {i} ({r})")
    if isinstance(primary, bool) or not isinstance(primary, int) or not 0 <= primary < len(references):
        raise EvalError(f"primary must index the {len(references)} reference(s), got {primary!r}")


def _frames(x: Any, what: str) -> tuple[np.ndarray, float | None]:
    from .. import media

    fps = None
    if isinstance(x, (str, Path)) and Path(x).suffix.lower() in media.VIDEO_EXTENSIONS:
        data = media.read_video(x)
        frames, fps = data.frames, data.fps
    else:
        frames = media.load_media(x)
    frames = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise EvalError(f"{what}: no frames")
    return frames, fps


class Evaluator:
    """Holds the loaded models; `evaluate` may be called for many videos."""

    def __init__(self, config: EvalConfig | None = None):
        from .faces import Recognizer, make_detector

        self.config = config or EvalConfig()
        self.config.check()
        self.detector = make_detector(self.config.detector)
        self.recognizers = [Recognizer(s) for s in self.config.recognizers]
        self.clip = self.dino = None
        if self.config.clip is not None or self.config.dino is not None:
            from .embeddings import ImageEmbedder

            if self.config.clip is not None:
                self.clip = ImageEmbedder(self.config.clip, "clip", self.config.device)
            if self.config.dino is not None:
                self.dino = ImageEmbedder(self.config.dino, "dino", self.config.device)

        self._models: dict | None = None
        self._ref_cache: dict[tuple[str, int], ReferenceData] = {}

    def models(self) -> dict:
        """Which model files were used (paths, SHA-256, specs), computed once."""
        from .faces import sha256

        if self._models is not None:
            return self._models
        self._models = {
            "detector": {**self.config.detector.to_dict(), "model": str(self.detector.model),
                         "sha256": sha256(Path(self.detector.model))},
            "recognizers": {r.spec.name: {**r.spec.to_dict(), "model": str(r.model), "sha256": sha256(r.model),
                                          "dim": r.dim} for r in self.recognizers},
            "clip": None if self.clip is None else str(self.clip.folder),
            "dino": None if self.dino is None else str(self.dino.folder),
        }
        return self._models

    def references(self, references: Sequence[Any], progress=None) -> list[ReferenceData]:
        """Load each reference, find and embed its faces (and its CLIP / DINO features when configured). A
        reference in which no face is found raises EvalError naming it. Results for file paths are cached (by
        path and mtime; embeddings only, not frames), so a suite whose cases share an ID group reads it once
        and can check every reference before generating anything."""
        from .identity import detect_and_embed

        cfg = self.config
        out = []
        for i, r in enumerate(references):
            label = _label(r, i, "reference")
            key = (str(Path(r).resolve()), Path(r).stat().st_mtime_ns) if isinstance(r, (str, Path)) else None
            if key is not None and key in self._ref_cache:
                out.append(self._ref_cache[key])
                continue
            frames = _frames(r, f"reference {i} ({label})")[0]
            idx = sample_indices(len(frames), num_samples=cfg.ref_max_frames)
            faces = detect_and_embed(frames, idx, self.detector, self.recognizers, cfg.detector.pad_retry, progress)
            if not faces.found:
                raise EvalError(f"reference {i} ({label}): no face found in its {len(idx)} sampled frame(s) by the "
                                f"{cfg.detector.kind} detector; every reference must show the face")
            feats = {}
            for name, emb in (("clip", self.clip), ("dino", self.dino)):
                if emb is not None:  # the normalised mean image feature of the sampled frames
                    m = emb.images(frames[idx]).mean(0)
                    feats[name] = m / max(float(np.linalg.norm(m)), 1e-12)
            data = ReferenceData(label, len(frames), faces, feats)
            if key is not None:
                self._ref_cache[key] = data
            out.append(data)
        return out

    def evaluate(self, video: Any, references: Sequence[Any], primary: int = 0, prompt: str | None = None,
                 progress: bool = False) -> dict:
        """Score `video` (a path or uint8 [T, H, W, 3] frames) against `references` (paths, images, arrays)."""
        from tqdm.auto import tqdm

        from .identity import detect_and_embed, identity_scores, mean_embedding
        from .motion import copy_paste_guard, motion_report

        cfg = self.config
        check_inputs(video, references, primary)
        frames, fps = _frames(video, f"video {_label(video, 0, 'video')}")
        labels = [_label(r, i, "reference") for i, r in enumerate(references)]
        indices = sample_indices(len(frames), cfg.stride, cfg.num_samples)
        total = len(indices) + max(len(frames) - 1, 0) // cfg.motion_step
        bar = tqdm(total=total, desc="evaluating", unit="frame", disable=not progress)
        try:
            # references first: one without a face makes every identity score meaningless
            refs_data = self.references(references)
            ref_faces = [d.faces for d in refs_data]
            video_faces = detect_and_embed(frames, indices, self.detector, self.recognizers, cfg.detector.pad_retry,
                                           bar)
            identity = {}
            for r in self.recognizers:
                name = r.spec.name
                refs = np.stack([mean_embedding(rf.embeddings[name]) for rf in ref_faces])  # [R, D]
                identity[name] = identity_scores(video_faces, refs, name, labels, primary)
            motion = motion_report(frames, cfg.motion_short_side, cfg.motion_step, bar)
        finally:
            bar.close()
        first = identity[self.recognizers[0].spec.name]
        guard = copy_paste_guard(first["all_reference"], motion["flow_mean"], cfg.copy_paste_identity,
                                 cfg.copy_paste_motion)
        elements, prompt_scores = self._embeddings(frames[indices], refs_data, primary, prompt)
        t, h, w = frames.shape[:3]
        return {
            "version": REPORT_VERSION,
            "video": _label(video, 0, "video"),
            "frames": t, "height": h, "width": w, "fps": fps,
            "sampled_frames": indices,
            "references": [{"reference": labels[i], "primary": i == primary, "frames": d.frames,
                            "frames_sampled": len(d.faces.indices), "frames_with_face": len(d.faces.found)}
                           for i, d in enumerate(refs_data)],
            "prompt": prompt,
            "face_rate": round(video_faces.face_rate, 4),
            "no_face": not video_faces.found,
            "faces": [None if f is None else {"frame": t_, **f.to_dict()}
                      for t_, f in zip(video_faces.indices, video_faces.faces)],
            "identity": identity,
            "motion": motion,
            "copy_paste": guard,
            "elements": elements,
            "prompt_following": prompt_scores,
            "models": self.models(),
            "config": cfg.to_dict(),
        }

    def _embeddings(self, sampled: np.ndarray, refs_data: list[ReferenceData], primary: int, prompt: str | None):
        elements: dict[str, Any] = {}
        clip_frames = None
        for name, emb in (("clip", self.clip), ("dino", self.dino)):
            if emb is None:
                elements[name] = None
                continue
            f = emb.images(sampled)  # [n, D]
            if name == "clip":
                clip_frames = f
            refs = np.stack([d.features[name] for d in refs_data])  # [R, D]
            cos = f @ refs.T  # [n, R]
            elements[name] = {"primary": round(float(cos[:, primary].mean()), 4),
                              "per_reference": [round(float(c), 4) for c in cos.mean(0)],
                              "curve": [round(float(c), 4) for c in cos[:, primary]]}
        prompt_scores = None
        if prompt is not None and self.clip is not None:
            text = self.clip.text(prompt)  # [D]
            cos = clip_frames @ text  # [n]
            prompt_scores = {"clip_text": round(float(cos.mean()), 4),
                             "curve": [round(float(c), 4) for c in cos]}
        return elements, prompt_scores


def evaluate(video: Any, references: Sequence[Any], primary: int = 0, prompt: str | None = None,
             config: EvalConfig | None = None, progress: bool = False) -> dict:
    """One-shot `Evaluator(config).evaluate(...)`; the inputs are checked before the models load."""
    check_inputs(video, references, primary)
    return Evaluator(config).evaluate(video, references, primary, prompt, progress)


__all__ = ["EvalConfig", "Evaluator", "evaluate", "sample_indices", "check_inputs", "REPORT_VERSION"]
