"""Few-step distilled checkpoints: their published sampling schedules, and how a model folder names one.

A distilled model runs the `dmd` sampler (anyid_rt/sampling.py `FlowDMD`): at each listed timestep the DiT's
velocity gives a clean estimate x0 = x - σ·v, which is re-noised to the next listed timestep with fresh noise,
without guidance. What differs between checkpoints is the list and how a listed value becomes σ. Both published
rules are one formula here, σ = shift(t / 1000) with the flow shift s·u / (1 + (s - 1)·u), and the DiT is fed
1000·σ:

- FastWan2.2-TI2V-5B (FastVideo, hao-ai-lab/FastVideo @ 2f3d407): `FastWan2_2_TI2V_5B_Config` in
  fastvideo/configs/pipelines/wan.py sets `dmd_denoising_steps = [1000, 757, 522]` and `flow_shift = 5.0`, and
  inherits `warp_denoising_step = True`: the listed value indexes the shifted 1000-entry training grid
  (fastvideo/mlx_runtime/wan22_sample.py, `build_wan22_dmd_schedule`), which is σ = shift_5(t / 1000), so the DiT
  sees t = 1000, 939.7, 845.2. Guidance is distilled away (3 forwards per video). FastVideo recognises the
  checkpoint by its Hugging Face name (`fastvideo/registry.py`); the diffusers folder itself carries the base's
  UniPC scheduler config, so the folder name is what says so here too.
- Wan2.2-TI2V-5B-Turbo (quanhaol/Wan2.2-TI2V-5B-Turbo @ 26d5995): configs/inference/wan22.yaml lists
  `denoising_step_list [1000, 750, 500, 250]`; pipeline/wan22_fewstep_inference.py feeds those values to the DiT
  as they are, without warping (`Wan22FewstepInferencePipeline`), and takes σ from the nearest entry of a
  1000-entry shift-8 grid, i.e. σ ≈ t / 1000 (within 5e-4): shift 1 here, σ = t / 1000 exactly. No guidance
  (the README: "eliminating the need for the CFG trick"). The weights are published as full DiT weights
  (`model.pt` on the Hugging Face model quanhaol/Wan2.2-TI2V-5B-Turbo, a torch state dict saved from the
  training wrapper: keys carry a `model.` prefix), with no VAE or text encoder: load it over the base folder
  with `dit=`.

A folder also says so with an `anyid_sampling.json` beside the weights (`SAMPLING_FILE`), for any other distilled
model: `{"sampler": "dmd", "timesteps": [1000, 750, 500, 250], "shift": 1.0, "guidance": 1.0}`.

This module imports no torch: the CLI resolves a folder's defaults before loading anything.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .request import Defaults, RequestError

SAMPLING_FILE = "anyid_sampling.json"
MAX_TIMESTEP = 1000


@dataclass(frozen=True)
class FewStepModel:
    """A distilled checkpoint's published sampling: its timestep list, the shift that maps a listed value t to
    σ = shift(t / 1000), and guidance 1 (distilled away). `source` says where the values come from."""

    name: str
    timesteps: tuple[float, ...]
    shift: float
    source: str
    guidance: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "timesteps", check_timesteps(self.timesteps, f"{self.name} timesteps"))
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"{self.name}: shift must be a number > 0, got {self.shift!r}")

    def defaults(self, base: Defaults) -> Defaults:
        """`base` (the model size's defaults) with this model's sampler, steps, timesteps, shift and guidance."""
        return replace(base, sampler="dmd", steps=len(self.timesteps), timesteps=self.timesteps, shift=self.shift,
                       guidance=self.guidance)

    def describe(self) -> str:
        ts = ", ".join(f"{t:g}" for t in self.timesteps)
        return f"{self.name}: dmd [{ts}] shift {self.shift:g}, guidance {self.guidance:g} ({self.source})"


def check_timesteps(timesteps: Any, what: str = "timesteps") -> tuple[float, ...]:
    """A few-step list: at least one number, strictly decreasing, each in (0, 1000]. Raises a RequestError."""
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence) or not timesteps:
        raise RequestError(f"{what} must be a non-empty list of numbers, e.g. [1000, 750, 500, 250], got "
                           f"{timesteps!r}", "timesteps")
    out = []
    for t in timesteps:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise RequestError(f"{what}: {t!r} is not a finite number", "timesteps")
        if not 0 < t <= MAX_TIMESTEP:
            raise RequestError(f"{what}: {t:g} leaves (0, {MAX_TIMESTEP}] (t = 1000 is pure noise; t = 0 would be a "
                               "step that changes nothing)", "timesteps")
        out.append(float(t))
    if any(b >= a for a, b in zip(out, out[1:])):
        raise RequestError(f"{what} must be strictly decreasing (noisiest first), got {list(timesteps)}", "timesteps")
    return tuple(out)


FASTWAN22_TI2V_5B = FewStepModel("FastWan2.2-TI2V-5B", (1000, 757, 522), 5.0,
                                 "hao-ai-lab/FastVideo fastvideo/configs/pipelines/wan.py, warped steps")
WAN22_TI2V_5B_TURBO = FewStepModel("Wan2.2-TI2V-5B-Turbo", (1000, 750, 500, 250), 1.0,
                                   "quanhaol/Wan2.2-TI2V-5B-Turbo configs/inference/wan22.yaml, unwarped steps")
TURBO_WEIGHTS = "model.pt"  # the file the Turbo model publishes


def read_sampling_file(path: Path) -> FewStepModel:
    """The schedule an `anyid_sampling.json` names."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RequestError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("sampler") != "dmd" or "timesteps" not in raw:
        raise RequestError(f"{path}: expected {{\"sampler\": \"dmd\", \"timesteps\": [...], \"shift\": s, "
                           f"\"guidance\": g}}, got {raw!r}")
    unknown = set(raw) - {"sampler", "timesteps", "shift", "guidance"}
    if unknown:
        raise RequestError(f"{path}: unknown fields {sorted(unknown)}")
    try:
        return FewStepModel(path.parent.name, tuple(raw["timesteps"]), float(raw.get("shift", 1.0)), str(path),
                            float(raw.get("guidance", 1.0)))
    except (TypeError, ValueError) as e:
        raise RequestError(f"{path}: {e}") from e


def find_few_step(folder: Path, dit: Path | None = None) -> FewStepModel | None:
    """The few-step schedule a model folder (and a DiT file given in place of its own) says it runs, or None.

    In order: an `anyid_sampling.json` beside the DiT or in the folder; Turbo's published DiT file (`model.pt` in
    a folder whose path holds "turbo" and "ti2v-5b"); a folder whose path names FastWan2.2-TI2V-5B (the name is all
    that marks it, as in FastVideo's registry)."""
    places = [p for p in (dit.parent if dit is not None and dit.is_file() else dit, folder) if p is not None]
    for place in places:
        if (place / SAMPLING_FILE).is_file():
            return read_sampling_file(place / SAMPLING_FILE)
    for place in places:
        # every component of the path: a Hugging Face cache holds a model under models--Org--Name/snapshots/<hash>
        name = "/".join(place.absolute().parts).lower()
        if "turbo" in name and "ti2v-5b" in name and (place / TURBO_WEIGHTS).is_file():
            return WAN22_TI2V_5B_TURBO
        if "fastwan2.2-ti2v-5b" in name:
            return FASTWAN22_TI2V_5B
    return None


__all__ = ["FewStepModel", "FASTWAN22_TI2V_5B", "WAN22_TI2V_5B_TURBO", "SAMPLING_FILE", "TURBO_WEIGHTS",
           "check_timesteps", "find_few_step", "read_sampling_file"]
