"""The settings of one `anyid-rt bench` run, typed and checked, and the run's fixed names. Imports no torch, so
that `anyid-rt bench --help` (e2e.py builds its options from these defaults) answers at once."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from anyid_rt.config import DTYPE_NAMES, PRESETS

RESULTS_FILE = "e2e.jsonl"
PROMPT = ("Shot type: medium close-up. Hairstyle: long wavy hair. Clothes: a blue jacket. Expression: a calm "
          "smile. Action: slowly turns the head toward the camera and waves. Background: a sunlit garden.")
CASE_NAMES = ("t2v", "refs")
STAGE_NAMES = ("text", "refs", "decode")
DEFAULT_DIFFUSERS_BACKENDS = ("flash", "_flash_3", "sage", "_native_cudnn", "_native_flash", "native")


@dataclass(frozen=True)
class Settings:
    """What one run measures and how: every field but `command_line` is the option of `anyid-rt bench` of
    the same name (e2e.py), whose defaults are these."""

    preset: str = "wan2.2-ti2v-5b"
    device: str | None = None  # default: cuda when available
    dtype: str | None = None  # DiT weights / compute; default bf16 on a GPU, fp32 on a CPU
    cases: tuple[str, ...] = CASE_NAMES
    variants: tuple[str, ...] | None = None  # default: every variant that applies to the device
    stages: frozenset[str] = frozenset(STAGE_NAMES)
    height: int | None = None  # default: the preset's (1280 x 704 x 121 for the 5B)
    width: int | None = None
    frames: int | None = None
    refs: int = 4
    ref_clip_frames: int | None = None  # default: `frames`; 0: no clip
    prompt_tokens: int = 128
    steps_timed: int = 5
    warmup: int = 1
    stage_repeats: int = 2
    stage_warmup: int = 0
    time_budget: float | None = None
    steps: int = 50
    guidance: float = 5.0
    timestep: float = 999.0
    text_encoder: str = "full"  # full | layers | skip
    text_layers: int = 2
    vae_dtype: str = "fp32"
    vae_tile: tuple[int, int, int] = (32, 32, 8)  # tile_h, tile_w, overlap in latent cells
    diffusers_backends: tuple[str, ...] = DEFAULT_DIFFUSERS_BACKENDS
    compile: str = "auto"  # auto (GPU only) | on | off
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    triton_interpret: bool = False
    full_video: bool = False
    full_video_variant: str | None = None
    out: Path = Path("bench/results")
    seed: int = 0
    ceiling_n: int | None = None
    ceiling_copy_gb: float | None = None
    peak_tflops: float | None = None
    commit: str | None = None
    tag: str | None = None
    strict: bool = False
    command_line: str | None = None  # the command that reproduces the run (recorded)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: choose from {', '.join(PRESETS)}")
        if not self.cases or set(self.cases) - set(CASE_NAMES) or len(set(self.cases)) != len(self.cases):
            raise ValueError(f"--cases {','.join(self.cases)!r}: choose from {', '.join(CASE_NAMES)}, each once")
        if self.stages - set(STAGE_NAMES):
            raise ValueError(f"--stages {','.join(sorted(self.stages))!r}: choose from {', '.join(STAGE_NAMES)}, none")
        for name, v in (("--steps-timed", self.steps_timed), ("--stage-repeats", self.stage_repeats),
                        ("--steps", self.steps), ("--text-layers", self.text_layers)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        for name, v in (("--warmup", self.warmup), ("--stage-warmup", self.stage_warmup), ("--refs", self.refs)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        for name, v, choices in (("--text-encoder", self.text_encoder, ("full", "layers", "skip")),
                                 ("--compile", self.compile, ("auto", "on", "off"))):
            if v not in choices:
                raise ValueError(f"{name} {v!r}: choose from {', '.join(choices)}")
        for name, v in (("--dtype", self.dtype), ("--vae-dtype", self.vae_dtype)):
            if v is not None and v not in DTYPE_NAMES:  # by name: parse_dtype would import torch
                raise ValueError(f"{name} {v!r}: choose from {', '.join(DTYPE_NAMES)}")

    def record(self) -> dict:
        """The settings as recorded in the `run` record."""
        return {k: (sorted(v) if isinstance(v, frozenset) else str(v) if isinstance(v, Path) else v)
                for k, v in asdict(self).items() if k != "command_line"}
