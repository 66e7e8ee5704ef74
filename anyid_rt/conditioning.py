"""AnyID conditioning: the conditioning layout, reference preparation, and the token layout of a step.

The paper (shared/seeds/001, section 4) fixes that each reference is fitted into H x W with its aspect ratio
kept, padded, VAE-encoded on its own, concatenated with the noisy target along time and given timestep 0.
It leaves open where the references sit in time, the padding colour, the longest reference clip and the
null reference. `ConditioningLayout` makes those choices explicit; it is saved in every LoRA's metadata and
read back by the engine, so that a model always runs with the layout it was trained with.

The layout also holds the reference policy, the one rule by which the trainer builds its references and the
engine prepares a user's: the longest clip (`max_clip_frames`), the frame rate clips are resampled to
(`clip_fps`, Table 2's 24 fps), what a longer clip keeps (`long_clip`), whether references are cut to the
person (`person_crop`) and the order of the auxiliary references (`aux_order`). Metadata written before a
field existed reads back with the behaviour of its time (`LEGACY_DEFAULTS`), so an old LoRA keeps running as
it did; a new LoRA records the policy it was trained with. docs/conditioning.md has the details.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import frame_ops, media
from .config import TokenGeometry
from .models.dit import Segments
from .person_crop import DetectorUnavailable, HaarFaceDetector, person_region

LAYOUT_METADATA_KEY = "anyid.conditioning_layout"
AUX_ORDERS = ("length", "given")
# What a field absent from a LoRA's layout metadata means: the behaviour of the runtime that wrote the metadata,
# before the field existed (native frame rate, long clips subsampled, no crop at inference), so that an old LoRA
# runs as it did. The auxiliary order is the one old LoRAs were trained with (the trainer always sorted them by
# length; inference kept the caller's order, which the model had never been trained on).
LEGACY_DEFAULTS: dict[str, Any] = {"clip_fps": None, "long_clip": "subsample", "person_crop": False,
                                   "aux_order": "length", "reference_attention": "joint"}
REFERENCE_ATTENTION = ("joint", "isolated")
# The fields that decide a reference's pixels (cache keys of prepared references)
REFERENCE_POLICY_FIELDS = ("pad_color", "max_clip_frames", "clip_fps", "long_clip", "person_crop")


@dataclass(frozen=True)
class ConditioningLayout:
    """Where references go and how they are made. Defaults are the runtime's (documented) choices.

    placement: "after" puts the references after the target in RoPE time (their frame indices continue
        after the target's last latent frame); "before" puts them first and shifts the target.
    pad_color: RGB 0..255 of the bands around a reference fitted into H x W.
    max_clip_frames: longest reference clip in frames (4n+1), at `clip_fps`: the trainer draws clip segments
        of 5..max_clip_frames frames and the engine keeps at most this many. 33 frames (1.4 s at 24 fps) is the
        trainer's longest clip since it was written (the paper gives no reference length); old LoRAs recorded
        121 and keep it.
    max_references: most references per generation.
    null_reference: the unconditional stand-in for each reference; "black" is the VAE latent of black
        pixels of the same shape (the paper's choice).
    clip_fps: the frame rate reference clips are resampled to (source frames nearest to its timeline,
        `frame_ops.resample_indices`); 24.0 is the paper's (Table 2, FPS 24), the rate Wan2.2 generates at.
        None keeps each clip's own rate (the behaviour before this field; metadata without it reads as None).
    long_clip: what a clip longer than max_clip_frames (at clip_fps) keeps: "window", the centred run of
        max_clip_frames consecutive frames (the rate the model was trained at is kept; training draws such
        runs); "subsample", max_clip_frames frames spread over the whole clip (a ~10 s clip arrives at ~3x
        the longest motion seen in training; the behaviour before this field).
    person_crop: cut each reference at inference to the region around the person, as training cut its
        portraits and clips (`person_crop.person_region`, OpenCV's Haar face detector; refused with a clear
        error when OpenCV is missing). False (default): references are used as given, so crop them yourself.
        The trainer always cuts its references from whole clips, whatever this says.
    aux_order: the order of the auxiliary references after the primary: "length" (images first, then clips
        by frame count, ties in the given order; the trainer's order, which keeps batch shapes few) or
        "given" (as listed; the trainer then keeps its random draw order). Order changes the output (RoPE
        positions follow it), so training and inference follow this one rule (`reference_order`).
    reference_attention: "joint" (the paper's: every token attends to every token) or "isolated" (reference
        tokens attend only to reference tokens and, in cross-attention, the text; target tokens attend to the target
        and the references). Isolated reference tokens depend on nothing that changes during sampling, so the
        engine runs them through the blocks once per generation and every step reuses their keys and values
        (anyid_rt/reference_kv.py). A model must be trained with the mode it runs: metadata without the field
        reads as "joint".
    """

    placement: str = "after"
    pad_color: tuple[int, int, int] = (0, 0, 0)
    max_clip_frames: int = 33
    max_references: int = 8
    null_reference: str = "black"
    clip_fps: float | None = 24.0
    long_clip: str = "window"
    person_crop: bool = False
    aux_order: str = "length"
    reference_attention: str = "joint"

    def __post_init__(self) -> None:
        if self.placement not in ("after", "before"):
            raise ValueError(f"ConditioningLayout.placement must be 'after' or 'before', got {self.placement!r}")
        if len(self.pad_color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.pad_color):
            raise ValueError(f"ConditioningLayout.pad_color must be three ints in 0..255, got {self.pad_color!r}")
        if self.max_clip_frames < 1 or (self.max_clip_frames - 1) % 4:
            raise ValueError(f"ConditioningLayout.max_clip_frames must be 4n+1, got {self.max_clip_frames}")
        if self.max_references < 1:
            raise ValueError(f"ConditioningLayout.max_references must be >= 1, got {self.max_references}")
        if self.null_reference != "black":
            raise ValueError(f"ConditioningLayout.null_reference supports only 'black', got {self.null_reference!r}")
        if self.clip_fps is not None:
            if isinstance(self.clip_fps, bool) or not isinstance(self.clip_fps, (int, float)) \
                    or not math.isfinite(self.clip_fps) or self.clip_fps <= 0:
                raise ValueError(f"ConditioningLayout.clip_fps must be a positive frame rate or None, got "
                                 f"{self.clip_fps!r}")
            object.__setattr__(self, "clip_fps", float(self.clip_fps))
        if self.long_clip not in frame_ops.LONG_CLIP_MODES:
            raise ValueError(f"ConditioningLayout.long_clip must be one of {frame_ops.LONG_CLIP_MODES}, got "
                             f"{self.long_clip!r}")
        if not isinstance(self.person_crop, bool):
            raise ValueError(f"ConditioningLayout.person_crop must be true or false, got {self.person_crop!r}")
        if self.aux_order not in AUX_ORDERS:
            raise ValueError(f"ConditioningLayout.aux_order must be one of {AUX_ORDERS}, got {self.aux_order!r}")
        if self.reference_attention not in REFERENCE_ATTENTION:
            raise ValueError(f"ConditioningLayout.reference_attention must be one of {REFERENCE_ATTENTION}, got "
                             f"{self.reference_attention!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ConditioningLayout":
        """The layout stored in LoRA metadata; a field the metadata lacks (written before the field existed)
        takes its `LEGACY_DEFAULTS` value, the behaviour of that time, not today's default."""
        try:
            raw: dict[str, Any] = json.loads(text)
        except ValueError as e:
            raise ValueError(f"conditioning layout metadata is not JSON: {text[:80]!r}") from e
        unknown = set(raw) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"conditioning layout metadata has unknown fields {sorted(unknown)}; "
                             "it was written by a newer anyid_rt")
        if "pad_color" in raw:
            raw["pad_color"] = tuple(raw["pad_color"])
        return cls(**{**LEGACY_DEFAULTS, **raw})

    def clip_indices(self, num_frames: int, src_fps: float | None = None) -> np.ndarray:
        """The source frames a clip of `num_frames` frames at `src_fps` (None: unknown, taken as clip_fps) keeps as
        a reference under this policy (`frame_ops.select_frames`): non-decreasing int64 indices, 4n+1 of them."""
        return frame_ops.select_frames(num_frames, self.max_clip_frames, src_fps=src_fps, fps=self.clip_fps,
                                       long_clip=self.long_clip)

    def reference_order(self, frame_counts: Sequence[int]) -> list[int]:
        """The order references enter the model, as positions into `frame_counts` (the pixel frames of each
        reference, primary first): the primary stays first; the auxiliaries follow by frame count (a stable
        sort: images first, ties in the given order) with aux_order "length", or as given."""
        if not frame_counts:
            return []
        aux = list(range(1, len(frame_counts)))
        if self.aux_order == "length":
            aux.sort(key=lambda i: frame_counts[i])
        return [0, *aux]

    def reference_policy(self) -> dict[str, Any]:
        """The fields that decide a prepared reference's pixels, JSON-ready (part of a cache key)."""
        d = asdict(self)
        return {k: list(d[k]) if k == "pad_color" else d[k] for k in REFERENCE_POLICY_FIELDS}

    def check_requirements(self) -> None:
        """Refuse early what this layout needs and the installation lacks (OpenCV for person_crop)."""
        if self.person_crop:
            face_detector()

    def frame_starts(self, target_frames: int, ref_frames: Sequence[int]) -> list[int]:
        """RoPE frame index of the first latent frame of [target, ref_0, ref_1, ...]."""
        starts, cursor = [], 0
        if self.placement == "after":
            cursor = target_frames
            for n in ref_frames:
                starts.append(cursor)
                cursor += n
            return [0] + starts
        for n in ref_frames:
            starts.append(cursor)
            cursor += n
        return [cursor] + starts


@dataclass
class PreparedReference:
    """One reference after fitting, padding and trimming: pixels [3, T, H, W] in [-1, 1] (T = 4n+1)."""

    pixels: torch.Tensor
    source: str  # a short description for errors and logs

    @property
    def num_frames(self) -> int:
        return self.pixels.shape[1]

    def content_key(self) -> str:
        h = hashlib.sha1()
        h.update(str(tuple(self.pixels.shape)).encode())
        h.update(memoryview(self.pixels.detach().to(torch.float32).contiguous().cpu().numpy()).cast("B"))
        return h.hexdigest()


_DETECTOR: list[HaarFaceDetector] = []  # built once per process, on first use


def face_detector() -> HaarFaceDetector:
    """The detector `person_crop` uses: the trainer's (OpenCV's Haar cascade, same parameters)."""
    if not _DETECTOR:
        try:
            _DETECTOR.append(HaarFaceDetector())
        except DetectorUnavailable as e:
            raise DetectorUnavailable(f"this conditioning layout has person_crop on (references are cut to the "
                                      f"person, as in training), which needs the face detector: {e}") from e
    return _DETECTOR[0]


def load_reference(ref: Any, height: int, width: int, layout: ConditioningLayout, *,
                   max_source_frames: int | None = None, max_seconds: float | None = None,
                   detector: Callable[[np.ndarray], Any] | None = None) -> torch.Tensor:
    """One reference under the layout's policy, as uint8 [T, H, W, 3] (T = 4n+1 <= max_clip_frames): the frames
    `layout.clip_indices` keeps (resampled to clip_fps, a long clip's centred window or spread), cut to the
    person when `person_crop` (the union of the per-frame portrait boxes; `detector` defaults to
    `face_detector()`), fitted into H x W and padded. Without the crop a video is decoded streaming and fitted as
    it decodes (memory: the kept, fitted frames); with it the kept frames are held at their own size until the
    crop box is known. `max_source_frames` / `max_seconds` bound the source clip (`media.load_clip`)."""
    select = dict(fps=layout.clip_fps, long_clip=layout.long_clip, max_source_frames=max_source_frames,
                  max_seconds=max_seconds)
    if not layout.person_crop:
        return media.load_clip(ref, layout.max_clip_frames, (height, width), layout.pad_color, **select)
    detector = detector or face_detector()
    frames = media.load_clip(ref, layout.max_clip_frames, **select).numpy()  # uint8 [T, h, w, 3]
    box = person_region(frames, detector)
    if box is None:
        raise media.MediaError(f"person_crop is on but no face was found in its {len(frames)} frame(s); cut it to "
                               "the person yourself, or use a layout with person_crop off")
    x0, y0, x1, y1 = box
    crop = np.ascontiguousarray(frames[:, y0:y1, x0:x1])
    fit = frame_ops.check_fit(height, width, layout.pad_color)
    return torch.from_numpy(frame_ops.fitted(crop, fit, frame_ops.fit_box(y1 - y0, x1 - x0, height, width)))


def prepare_reference(ref: Any, height: int, width: int, layout: ConditioningLayout, index: int,
                      detector: Callable[[np.ndarray], Any] | None = None) -> PreparedReference:
    """Load one reference (path, bytes of a file, PIL image, array or tensor) under the layout's reference policy
    (`load_reference`: the frames it keeps, the optional person crop, fitted and padded to H x W)."""
    try:
        frames = load_reference(ref, height, width, layout, detector=detector)  # uint8 [T, H, W, 3]
    except media.MediaError as e:
        raise media.MediaError(f"reference {index}: {e}") from e
    pixels = frame_ops.to_model_range(frames)  # [3, T, H, W] in [-1, 1]
    if isinstance(ref, media.InMemoryFile):  # not str(ref): a file sent as bytes can be megabytes long
        desc = f"in-memory {type(ref).__name__}"
    else:
        desc = str(ref) if isinstance(ref, str) or hasattr(ref, "__fspath__") else type(ref).__name__
    return PreparedReference(pixels, desc)


@dataclass
class StepLayout:
    """What stays fixed over the denoising loop: the groups' RoPE starts and the segment lengths.

    Token order in the sequence is always [target, ref_0, ref_1, ...] (only RoPE positions say "before" or
    "after"), with the target split in two segments in image-to-video mode (frame 0 is clean).
    """

    frame_starts: list[int]
    seg_lens: tuple[int, ...]
    target_clean_tokens: int  # tokens of the target at t=0 (image-to-video: latent frame 0)
    ref_tokens: int

    @classmethod
    def build(cls, layout: ConditioningLayout, geometry: TokenGeometry, target: Sequence[int],
              ref_latent_frames: Sequence[int], image_mode: bool) -> "StepLayout":
        """The layout of a step over a target latent of (F, h, w) cells and references of the same h x w with
        `ref_latent_frames` frames each; `image_mode` keeps the target's first frame clean (image-to-video).
        Frame starts are in token frames (latent frames for Wan's temporal patch of 1)."""
        f, gh, gw = geometry.token_grid(target)
        per_frame = gh * gw
        ref_frames = [geometry.token_grid((n, target[1], target[2]))[0] for n in ref_latent_frames]
        if image_mode and f < 2:
            raise ValueError("image-to-video needs at least 5 frames (2 latent frames): frame 0 is the image")
        clean = per_frame if image_mode else 0
        n_target = f * per_frame
        n_ref = sum(ref_frames) * per_frame
        lens = ([clean] if clean else []) + [n_target - clean] + ([n_ref] if n_ref else [])
        return cls(layout.frame_starts(f, ref_frames), tuple(lens), clean, n_ref)

    def segments(self, t: float, batch: int, device: torch.device, target_only: bool = False) -> Segments:
        """The step's segments over [target, refs] (`target_only`: over the target's tokens alone)."""
        values = []
        if self.target_clean_tokens:
            values.append(0.0)
        values.append(float(t))
        lens = self.seg_lens
        if self.ref_tokens and not target_only:
            values.append(0.0)
        elif self.ref_tokens:
            lens = lens[:-1]
        return Segments(lens, torch.tensor([values] * batch, dtype=torch.float32, device=device))

    def reference_segments(self, batch: int, device: torch.device) -> Segments:
        """The references' tokens alone, all at t = 0 (the isolated reference pass)."""
        return Segments((self.ref_tokens,), torch.zeros(batch, 1, device=device))

    @property
    def target_tokens(self) -> int:
        return sum(self.seg_lens) - self.ref_tokens
