"""Step caching: skip the DiT's block stack on steps whose change is predicted small, and reuse the last residual.

The block stack maps the embedded tokens x to x + r; on a skipped step the engine adds the residual r of the last
step that ran (kept per batch row: the conditional and the unconditional pass decide and cache separately, as the
published implementations keep even and odd calls apart). Patch embedding, time embedding and head always run.
Two published criteria, each with a calibration curve of the model:

- MagCache (Zehong-Ma/MagCache @ df81cb1, MagCache4Wan2.2/magcache_generate.py; arXiv 2506.09045): the ratio
  γ_i = mean over tokens of ||r_i|| / ||r_{i-1}|| is calibrated once per model. Per row, the product of the ratios
  since the last computed step gives the accumulated ratio; the error adds |1 - product|; a step is skipped while
  the error stays below the threshold and at most K = 2 steps in a row are skipped; the first 20% of steps always
  run (retention ratio 0.2). TI2V-5B's published setting is E006K2R02 (threshold 0.06), 1.97x on an L20 (10 min 39 s
  -> 5 min 24 s); its published curves (text-to-video and image-to-video, 50 steps) ship here. Another step count
  takes the curve by nearest-neighbour resampling, as the reference code does.
- TeaCache (ali-vilab/TeaCache; for TI2V-5B ModelTC/LightX2V @ f8aee98, configs/caching/teacache/
  wan_ti2v_tea_720p.json and lightx2v/models/networks/wan/infer/feature_caching/transformer_infer.py): the relative
  L1 change of the time embedding between consecutive calls, rescaled by a calibrated polynomial, accumulates; a
  step is skipped while the sum stays below the threshold (published: 0.26), the first step and the last always
  run. The time embedding here is the target tokens' (every token shares it in Wan's text-to-video, which is what
  LightX2V measures); both rows see the same timestep, so they decide alike.

`cache_threshold=0` never skips (the rescaled TeaCache distance can be negative for tiny changes, so 0 is defined
as off rather than left to the sign of a polynomial): the output is bit-identical to running without a cache.

Calibration (`calibrate`, `anyid-rt calibrate-cache`) runs a few prompts without skipping and records both curves;
the JSON is written beside the LoRA (`<lora>.cache.json`) or in the model folder (`anyid_cache.json`) and read
automatically by the engine. The published curves apply to the unmodified TI2V-5B only: a LoRA or another DiT
needs its own, and asking for a cache without one is refused.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .files import atomic_path
from .models.dit import TextKV
from .request import CACHE_MODES, RequestError

MAGCACHE_K = 2  # most consecutive skips per row
MAGCACHE_RETENTION = 0.2  # fraction of first steps that always run
CALIBRATION_FILE = "anyid_cache.json"  # in a model folder; a LoRA's is "<lora stem>.cache.json" beside it


@dataclass(frozen=True)
class CacheCalibration:
    """A model's caching curves, measured at `steps` steps.

    mag_ratios: per step (conditional, unconditional) γ_i = mean ||r_i|| / ||r_{i-1}||, γ_0 = 1 (MagCache);
        `mag_ratios_image` the same for image-to-video where measured separately (None: use mag_ratios).
    tea_coefficients: polynomial, highest degree first, from the time embedding's relative L1 change to the
        output's (TeaCache's rescaling).
    """

    steps: int
    mag_ratios: tuple[tuple[float, float], ...]
    tea_coefficients: tuple[float, ...]
    source: str
    mag_ratios_image: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("mag_ratios", "mag_ratios_image"):
            curve = getattr(self, name)
            if curve is None:
                continue
            curve = tuple((float(c), float(u)) for c, u in curve)
            if len(curve) != self.steps or not all(math.isfinite(v) and v > 0 for row in curve for v in row):
                raise ValueError(f"CacheCalibration.{name} needs {self.steps} positive (cond, uncond) pairs")
            object.__setattr__(self, name, curve)
        coeffs = tuple(float(c) for c in self.tea_coefficients)
        if not coeffs or not all(math.isfinite(c) for c in coeffs):
            raise ValueError("CacheCalibration.tea_coefficients must be finite numbers")
        object.__setattr__(self, "tea_coefficients", coeffs)

    def ratios(self, steps: int, image: bool) -> np.ndarray:
        """[steps, 2] γ for a run of `steps` steps: the curve, nearest-neighbour resampled if measured at another
        step count (MagCache's `nearest_interp`)."""
        curve = np.asarray(self.mag_ratios_image if image and self.mag_ratios_image else self.mag_ratios)
        if steps == len(curve):
            return curve
        if steps == 1:
            return curve[-1:]
        idx = np.round(np.arange(steps) * (len(curve) - 1) / (steps - 1)).astype(int)
        return curve[idx]

    def to_json(self) -> str:
        return json.dumps({"steps": self.steps, "mag_ratios": self.mag_ratios, "tea_coefficients": self.tea_coefficients,
                           "source": self.source, "mag_ratios_image": self.mag_ratios_image}, indent=1)

    def save(self, path: str | Path) -> Path:
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "CacheCalibration":
        try:
            raw = json.loads(Path(path).read_text())
            return cls(int(raw["steps"]), tuple(map(tuple, raw["mag_ratios"])), tuple(raw["tea_coefficients"]),
                       str(raw.get("source", path)),
                       tuple(map(tuple, raw["mag_ratios_image"])) if raw.get("mag_ratios_image") else None)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a cache calibration written by anyid-rt calibrate-cache ({e})") from e


# Published for Wan2.2-TI2V-5B, 50 steps (the file's "source" cites them): MagCache's text-to-video and
# image-to-video ratios (MagCache4Wan2.2/magcache_generate.py, with gamma_0 = 1 for step 0 as the reference code
# prepends it) and LightX2V's TeaCache coefficients (wan_ti2v_tea_720p.json "coefficients"[1], use_ret_steps
# false), shipped in the format `anyid-rt calibrate-cache` writes
PUBLISHED_TI2V_5B = CacheCalibration.load(Path(__file__).resolve().parent / "assets" / "cache_ti2v_5b.json")


# ---------------------------------------------------------------------------------------------------------------
# The decision and the block-stack replacement
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Row:
    residual: torch.Tensor | None = None  # [L, dim] fp32: block-stack output minus input at its last computed step
    ratio: float = 1.0  # MagCache: product of γ since the last computed step
    skips: int = 0  # MagCache: steps skipped since then
    err: float = 0.0  # MagCache: accumulated |1 - ratio|; TeaCache: accumulated rescaled distance
    prev_e: torch.Tensor | None = None  # TeaCache: the time embedding at the previous call


@dataclass
class StepCache:
    """The per-generation state of a step cache over `rows` batch rows (row 0 conditional, row 1 unconditional).

    Call `begin(i)` before step i's DiT call and pass `block_stack` to `WanDiT.forward_groups`; `skipped` then
    holds the rows that reused their residual. `target_segment`: the index of the target tokens' segment (whose
    time embedding TeaCache measures)."""

    mode: str
    threshold: float
    steps: int
    rows: int
    calibration: CacheCalibration
    target_segment: int
    image: bool = False
    step: int = -1
    skipped: list[int] = field(default_factory=list)
    record: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None  # calibration: step, row, r, e

    def __post_init__(self) -> None:
        if self.mode not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.mode!r}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"cache_threshold must be a number >= 0, got {self.threshold!r}")
        self._rows = [_Row() for _ in range(self.rows)]
        self._gamma = self.calibration.ratios(self.steps, self.image)  # [steps, 2]
        self._poly = np.poly1d(self.calibration.tea_coefficients)

    def begin(self, step: int) -> None:
        self.step, self.skipped = step, []

    def _skip(self, r: int, e: torch.Tensor) -> bool:
        """Whether row r reuses its residual at this step (the published rule; state updated as it does)."""
        row, i = self._rows[r], self.step
        if self.mode == "magcache":
            if i < int(self.steps * MAGCACHE_RETENTION) or row.residual is None:
                return False
            row.ratio *= float(self._gamma[i, r])
            row.skips += 1
            row.err += abs(1.0 - row.ratio)
            if self.threshold > 0 and row.err < self.threshold and row.skips <= MAGCACHE_K:
                return True
            row.ratio, row.skips, row.err = 1.0, 0, 0.0
            return False
        prev, row.prev_e = row.prev_e, e
        if i < 1 or i >= self.steps - 1 or prev is None or row.residual is None:
            row.err = 0.0
            return False
        row.err += float(self._poly(float((e - prev).abs().mean() / prev.abs().mean())))
        if self.threshold > 0 and row.err < self.threshold:
            return True
        row.err = 0.0
        return False

    def block_stack(self, run_blocks: Callable, x: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, segments, rope,
                    text_kv: TextKV, ops) -> torch.Tensor:
        """`run_blocks(x, e0, segments, rope, text_kv, ops, rows=None)` (the DiT's block stack over the batch
        `rows`) with the rows that skip this step adding their cached residual instead.
        x: [rows, L, dim] fp32; e: [rows, S, dim]; e0: [rows, S, 6, dim]."""
        te = e[:, self.target_segment].float()  # [rows, dim]: the target tokens' time embedding
        skip = [self._skip(r, te[r].clone()) for r in range(self.rows)]
        run = [r for r in range(self.rows) if not skip[r]]
        self.skipped = [r for r in range(self.rows) if skip[r]]
        if len(run) == self.rows:  # the common path: the whole batch, exactly as without a cache
            out = run_blocks(x, e0, segments, rope, text_kv, ops)
        else:
            out = torch.empty_like(x)
            if run:
                idx = torch.tensor(run, device=x.device)
                sub_kv = TextKV([(k[idx], v[idx]) for k, v in text_kv.kv])
                out[idx] = run_blocks(x[idx], e0[idx], segments, rope, sub_kv, ops, rows=run)
            for r in self.skipped:
                out[r] = x[r] + self._rows[r].residual
        for r in run:
            self._rows[r].residual = out[r] - x[r]
            if self.record is not None:
                self.record(self.step, r, self._rows[r].residual, te[r])
        return out


def step_cache_for(request, calibration: CacheCalibration | None, where: Path | None, rows: int,
                   target_segment: int, image: bool, record=None) -> StepCache | None:
    """The step cache a checked GenerationRequest asks for (None without `cache=`), over `rows` batch rows; a
    RequestError naming `anyid-rt calibrate-cache` when the model has no curves."""
    if request.cache is None:
        return None
    if calibration is None and record is not None:  # a calibration run: threshold 0 skips nothing, no curve read
        calibration = CacheCalibration(request.steps, ((1.0, 1.0),) * request.steps, (0.0,), "none (calibrating)")
    if calibration is None:
        raise RequestError(f"cache={request.cache!r} needs this model's caching curves, and there are none "
                           f"{'at ' + str(where) if where else 'for random weights without a LoRA'}: the published "
                           "ones hold for the unmodified Wan2.2-TI2V-5B only. Measure them with `anyid-rt "
                           "calibrate-cache` (or Engine.calibrate_cache)", "cache")
    return StepCache(request.cache, request.cache_threshold, request.steps, rows, calibration, target_segment, image,
                     record=record)


def magcache_skips(calibration: CacheCalibration, steps: int, threshold: float,
                   image: bool = False) -> list[list[int]]:
    """The steps each row (conditional, unconditional) skips under MagCache: its rule reads only the curve, so
    this is exact for the model the curve was measured on (e.g. the published TI2V-5B curve at 0.06)."""
    cache = StepCache("magcache", threshold, steps, 2, calibration, 0, image)
    skips: list[list[int]] = [[], []]
    for i in range(steps):
        cache.begin(i)
        for r in range(2):
            if cache._skip(r, torch.zeros(())):
                skips[r].append(i)
            else:
                cache._rows[r].residual = torch.zeros(())  # computed: a residual exists from here on
    return skips


# ---------------------------------------------------------------------------------------------------------------
# Where a model's curves are, and measuring them
# ---------------------------------------------------------------------------------------------------------------

def calibration_path(folder: Path | None, dit: Path | None, loras: Sequence[Path]) -> Path | None:
    """Where the curves of a model belong: beside its (first) LoRA, beside DiT weights given in place of the
    folder's, or in the model folder; None for random weights without a LoRA."""
    if loras:
        return Path(loras[0]).with_suffix(".cache.json")
    if dit is not None:
        return (dit if dit.is_dir() else dit.parent) / CALIBRATION_FILE
    return None if folder is None else Path(folder) / CALIBRATION_FILE


def find_calibration(path: Path | None, published_applies: bool) -> CacheCalibration | None:
    """The curves at `path` if measured, else the published TI2V-5B ones when they apply (the unmodified base
    DiT), else None (a cache then asks for `anyid-rt calibrate-cache`)."""
    if path is not None and path.is_file():
        return CacheCalibration.load(path)
    return PUBLISHED_TI2V_5B if published_applies else None


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def calibrate(engine, requests: Sequence, degree: int = 4, progress: bool = False) -> CacheCalibration:
    """Measure both curves on `requests` (GenerationRequests with the same step count; a few prompts suffice):
    each runs without skipping while every block-stack residual r_i is recorded. MagCache's γ_i is the mean over
    tokens of ||r_i|| / ||r_{i-1}||, averaged over the requests, per row (a request without guidance has one row,
    used for both); TeaCache's polynomial (`degree`, lower if there are too few points) is fitted from the time
    embedding's relative L1 change to the residual's between consecutive steps."""
    from dataclasses import replace

    checked = [engine.check(replace(r, cache="magcache", cache_threshold=0.0)) for r in requests]
    if not checked or len({r.steps for r in checked}) != 1 or checked[0].steps < 3:
        raise ValueError("calibrate needs requests with one common step count of at least 3")
    steps = checked[0].steps
    curves, xs, ys = [], [], []
    for r in checked:
        gamma = np.ones((steps, 2))
        prev: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(i: int, row: int, res: torch.Tensor, e: torch.Tensor) -> None:
            if row in prev:
                p_res, p_e = prev[row]
                gamma[i, row] = float((res.norm(dim=-1) / p_res.norm(dim=-1)).mean())
                xs.append(_rel_l1(e, p_e))
                ys.append(_rel_l1(res, p_res))
            prev[row] = (res.clone(), e.clone())

        engine.run(r, progress=progress, cache_record=record)
        if r.guidance == 1.0:
            gamma[:, 1] = gamma[:, 0]
        curves.append(gamma)
    deg = max(1, min(degree, len(xs) - 1))
    coeffs = np.polyfit(np.asarray(xs), np.asarray(ys), deg)
    mean = np.mean(curves, axis=0)
    return CacheCalibration(steps, tuple(map(tuple, mean.tolist())), tuple(coeffs.tolist()),
                            f"anyid-rt calibrate-cache: {len(checked)} request(s), {steps} steps")


__all__ = ["StepCache", "CacheCalibration", "PUBLISHED_TI2V_5B", "MAGCACHE_K", "MAGCACHE_RETENTION",
           "CALIBRATION_FILE", "find_calibration", "calibrate", "magcache_skips"]
