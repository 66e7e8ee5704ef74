"""One `anyid-rt bench` run, typed: its settings (the command line, parsed and checked), the benchmark cases
(shapes), and the run itself: the device, the model sizes, the environment, the measured stage times, and the
sink that writes every record as one JSON line of `<out>/e2e.jsonl` (schema `anyid_rt.bench/1`, read by
bench/report.py)."""
from __future__ import annotations

import gc
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from anyid_rt.config import DiTConfig, ModelConfig, TokenGeometry, dtype_name, parse_dtype
from anyid_rt.engine import TINY_DEFAULTS, Defaults
from anyid_rt.models.text_encoder import TextEncoder
from anyid_rt.models.vae import WanVAE

from .report import SCHEMA
from .settings import RESULTS_FILE, Settings
from .timing import Measurement, append_jsonl, dense_peaks, environment, measure

# the shape a preset generates by default (1280 x 704 x 121 for the 5B), from the engine's generation defaults
PRESET_DEFAULTS = {"wan2.2-ti2v-5b": Defaults(), "tiny": TINY_DEFAULTS}

T = TypeVar("T")


@dataclass(frozen=True)
class Case:
    """A benchmark shape: the target video, plus `ref_images` image references and one clip of
    `ref_clip_frames` frames (0: none), each reference encoded on its own at the target's H x W."""

    name: str
    geometry: TokenGeometry
    height: int
    width: int
    frames: int
    ref_images: int = 0
    ref_clip_frames: int = 0

    def __post_init__(self) -> None:
        self.geometry.check(self.height, self.width, self.frames)
        if self.ref_clip_frames:
            try:
                self.geometry.check(self.height, self.width, self.ref_clip_frames)
            except ValueError as e:
                raise ValueError(f"reference clip: {e}") from None
        if self.ref_images < 0 or self.ref_clip_frames < 0:
            raise ValueError(f"ref_images={self.ref_images}, ref_clip_frames={self.ref_clip_frames} must be >= 0")

    @property
    def latent(self) -> tuple[int, int, int]:
        """(F, h, w) of the target latent."""
        return self.geometry.latent_shape(self.frames, self.height, self.width)

    @property
    def ref_frames(self) -> list[int]:
        """Latent frames of each reference in sequence order: the images, then the clip."""
        clip = [self.geometry.latent_frames(self.ref_clip_frames)] if self.ref_clip_frames else []
        return [1] * self.ref_images + clip

    @property
    def tokens(self) -> int:
        """Tokens of one sample: the target and every reference (joint attention)."""
        _, h, w = self.latent
        return sum(self.geometry.tokens((f, h, w)) for f in [self.latent[0], *self.ref_frames])

    def describe(self, dit: DiTConfig) -> dict:
        f, h, w = self.latent
        return dict(height=self.height, width=self.width, frames=self.frames, ref_images=self.ref_images,
                    ref_clip_frames=self.ref_clip_frames, latent=[dit.in_dim, f, h, w],
                    ref_latents=[[dit.in_dim, rf, h, w] for rf in self.ref_frames])


def make_cases(settings: Settings, cfg: ModelConfig) -> list[Case]:
    default = PRESET_DEFAULTS[settings.preset]
    height, width = settings.height or default.height, settings.width or default.width
    frames = settings.frames or default.num_frames
    clip = frames if settings.ref_clip_frames is None else settings.ref_clip_frames
    cases = [Case("t2v", cfg.geometry, height, width, frames) if name == "t2v" else
             Case("refs", cfg.geometry, height, width, frames, settings.refs, clip) for name in settings.cases]
    if any(c.name == "refs" and not c.ref_frames for c in cases):
        raise ValueError("the refs case needs --refs > 0 or --ref-clip-frames > 0")
    return cases


@dataclass(frozen=True)
class VideoEstimate:
    """Seconds per video composed from parts measured in the same run."""

    steps: int
    step_s: float
    parts: dict[str, float | None]
    total_s: float | None  # None when a part is missing: never a silent partial sum
    missing: list[str]
    notes: dict[str, str]

    METHOD = ("composed from parts measured in this run: steps x guided step latency + stages; excludes media "
              "I/O, reference preparation, the sampler update (elementwise) and the null-reference latents "
              "(cached per shape)")

    def record(self) -> dict:
        out = dict(method=self.METHOD, steps=self.steps, step_s=self.step_s, parts=self.parts, total_s=self.total_s)
        if self.missing:
            out["missing"] = self.missing
        if self.notes:
            out["notes"] = self.notes
        return out


def compose_video(stage_s: dict[str, float], case: Case, step_s: float, steps: int,
                  notes: dict[str, str] | None = None) -> VideoEstimate:
    """steps x step + text encode + text K/V + reference encode (cases with references) + VAE decode
    (untiled; tiled if the untiled one did not run)."""
    parts: dict[str, float | None] = {"text_encode": stage_s.get("text_encode"),
                                      "text_kv_prepare": stage_s.get(f"text_kv_prepare:{case.name}")}
    if case.ref_frames:
        parts["reference_encode"] = stage_s.get("reference_encode")
    decode = "vae_decode" if "vae_decode" in stage_s else "vae_decode_tiled"
    parts[decode] = stage_s.get(decode)
    missing = [k for k, val in parts.items() if val is None]
    total = None if missing else steps * step_s + sum(parts.values())
    return VideoEstimate(steps, step_s, parts, total, missing, {k: v for k, v in (notes or {}).items() if k in parts})


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Run:
    """The state of one run: where it measures, what it has measured so far, and its record sink."""

    settings: Settings
    device: torch.device
    dtype: torch.dtype
    cfg: ModelConfig
    env: dict
    peaks: dict  # datasheet dense peaks (TFLOP/s) of the device, for MFU
    out_file: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    t_start: float = field(default_factory=time.perf_counter)
    records: list[dict] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=dict)  # stage (":case" for per-case ones) -> seconds
    stage_note: dict[str, str] = field(default_factory=dict)  # stage -> how its seconds were estimated
    ceiling_tflops: float | None = None
    # kept for the whole-video run (--full-video) when the stages built them at full size
    vae: WanVAE | None = None
    text_encoder: TextEncoder | None = None

    @classmethod
    def start(cls, settings: Settings) -> "Run":
        device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu --preset tiny")
        dtype = parse_dtype(settings.dtype or ("bf16" if device.type == "cuda" else "fp32"), "--dtype")
        env = environment(device, settings.commit)
        peaks = dense_peaks(env.get("device_name")) if device.type == "cuda" else dict(
            bf16=None, fp8=None, source="no datasheet peak for a CPU")
        if settings.peak_tflops:
            peaks = dict(peaks, bf16=settings.peak_tflops, source="--peak-tflops")
        return cls(settings, device, dtype, ModelConfig.preset(settings.preset), env, peaks,
                   Path(settings.out) / RESULTS_FILE)

    @property
    def vae_dtype(self) -> torch.dtype:
        return parse_dtype(self.settings.vae_dtype, "--vae-dtype")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self) -> str | None:
        b = self.settings.time_budget
        if b is not None and self.elapsed() > b:
            return f"time budget of {b:.0f} s used up ({self.elapsed():.0f} s elapsed); not run"
        return None

    def emit(self, kind: str, **fields: Any) -> dict:
        """Record one measurement (or skip, or failure): appended to the file at once, so that a run that
        dies later keeps what it measured."""
        rec = dict(schema=SCHEMA, bench="e2e", kind=kind, run_id=self.run_id, preset=self.settings.preset,
                   dtype=dtype_name(self.dtype), **fields, env=self.env)
        self.records.append(rec)
        append_jsonl(self.out_file, [rec])
        return rec

    def attempt(self, what: str, fn: Callable[[], T]) -> tuple[T | None, str | None]:
        """(fn(), None), or (None, the reason) when it raises: a failure is recorded, never hidden, and
        re-raised with --strict."""
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 - every failure is recorded with its reason, never hidden
            if self.settings.strict:
                raise
            reason = f"{type(e).__name__}: {e}"
            log(f"{what} failed: {reason[:300]}")
            free_memory(self.device)
            return None, reason[:2000]

    def stage_measure(self, fn: Callable[[], Any], inspect: Callable[[Any], Any] | None = None) -> Measurement:
        """A stage's measurement: --stage-warmup untimed and --stage-repeats timed calls after the first."""
        return measure(fn, warmup=self.settings.stage_warmup, reps=self.settings.stage_repeats, device=self.device,
                       inspect=inspect)
