"""AnyID conditioning: the conditioning layout, reference preparation, and the token layout of a step.

The paper (shared/seeds/001, section 4) fixes that each reference is fitted into H x W with its aspect ratio
kept, padded, VAE-encoded on its own, concatenated with the noisy target along time and given timestep 0.
It leaves open where the references sit in time, the padding colour, the longest reference clip and the
null reference. `ConditioningLayout` makes those choices explicit; it is saved in every LoRA's metadata and
read back by the engine, so that a model always runs with the layout it was trained with.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from . import frame_ops, media
from .config import TokenGeometry
from .models.dit import Segments

LAYOUT_METADATA_KEY = "anyid.conditioning_layout"


@dataclass(frozen=True)
class ConditioningLayout:
    """Where references go and how they are made. Defaults are the runtime's (documented) choices.

    placement: "after" puts the references after the target in RoPE time (their frame indices continue
        after the target's last latent frame); "before" puts them first and shifts the target.
    pad_color: RGB 0..255 of the bands around a reference fitted into H x W.
    max_clip_frames: longest reference clip in frames (4n+1); longer clips are subsampled to it.
    max_references: most references per generation.
    null_reference: the unconditional stand-in for each reference; "black" is the VAE latent of black
        pixels of the same shape (the paper's choice).
    """

    placement: str = "after"
    pad_color: tuple[int, int, int] = (0, 0, 0)
    max_clip_frames: int = 121
    max_references: int = 8
    null_reference: str = "black"

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ConditioningLayout":
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
        return cls(**raw)

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


def prepare_reference(ref: Any, height: int, width: int, layout: ConditioningLayout, index: int) -> PreparedReference:
    """Load one reference (path, bytes of a file, PIL image, array or tensor), keep the frames of the 4n+1 clip
    rule and fit and pad each to H x W. A video is decoded streaming (`media.load_clip`): memory holds the kept,
    fitted frames only, whatever the clip's length."""
    try:
        frames = media.load_clip(ref, layout.max_clip_frames, (height, width), layout.pad_color)  # uint8 [T, H, W, 3]
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

    def segments(self, t: float, batch: int, device: torch.device) -> Segments:
        values = []
        if self.target_clean_tokens:
            values.append(0.0)
        values.append(float(t))
        if self.ref_tokens:
            values.append(0.0)
        return Segments(self.seg_lens, torch.tensor([values] * batch, dtype=torch.float32, device=device))
