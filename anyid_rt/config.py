"""Typed configuration for every network, with named presets.

`wan2.2-ti2v-5b` is the released model (facts in shared/reference/wan22-ti2v-5b.md); `tiny` uses the same
classes at small widths with random weights so that everything runs in seconds on a CPU. Each dataclass
validates itself on construction, so a bad value fails where it is written, not deep inside a forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # annotations only
    import torch

# torch is imported where a dtype is needed, not here: the CLI reads presets and checks video sizes with this
# module before anything heavy is imported (`anyid-rt --help` and a request's checks stay fast).

PRESETS = ("wan2.2-ti2v-5b", "tiny")

# Per-channel latent statistics of the Wan2.2 VAE (vae2_2.py; identical in diffusers' vae22 config).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


# The weight/compute dtypes the runtime supports, by the names users write (CLI flags, configs, LoRA metadata).
DTYPE_NAMES = ("bf16", "fp16", "fp32")
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def _dtypes() -> dict:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def __getattr__(name: str):
    # DTYPES ({name: torch dtype}) is built on first use, so that importing this module does not import torch
    if name == "DTYPES":
        return _dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_dtype(dtype: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """A torch dtype from a name (`bf16`, `fp16`, `fp32` or the torch spellings) or a dtype; `what` names the
    setting in the error (e.g. "--vae-dtype")."""
    import torch

    DTYPES = _dtypes()
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported {what} {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ValueError(f"unsupported {what} {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a supported dtype (`bf16`, `fp16`, `fp32`): the inverse of `parse_dtype`."""
    for name, d in _dtypes().items():
        if d == dtype:
            return name
    raise ValueError(f"dtype {dtype} is not supported; use bf16, fp16 or fp32")


@dataclass(frozen=True)
class DiTConfig:
    """The Wan2.2 DiT (`WanModel`, model_type ti2v)."""

    dim: int = 3072
    ffn_dim: int = 14336
    freq_dim: int = 256  # width of the sinusoidal timestep embedding
    num_heads: int = 24
    num_layers: int = 30
    in_dim: int = 48  # latent channels
    out_dim: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w)
    text_len: int = 512  # the context is zero-padded to this many rows
    text_dim: int = 4096
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024  # RoPE tables cover positions 0..1023 per axis

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and v <= 0:
                raise ValueError(f"DiTConfig.{f.name} must be positive, got {v}")
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig.dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim={self.head_dim} must be even and >= 6 for the 3-axis RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"DiTConfig.freq_dim={self.freq_dim} must be even")
        if len(self.patch_size) != 3:
            raise ValueError(f"DiTConfig.patch_size must be (t, h, w), got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs per head for (frame, height, width): [c - 2(c//3), c//3, c//3] with c = head_dim/2."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    @property
    def patch_numel(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    @classmethod
    def preset(cls, name: str) -> "DiTConfig":
        return ModelConfig.preset(name).dit


@dataclass(frozen=True)
class VAEConfig:
    """The Wan2.2 VAE (`Wan2_2_VAE`): 16x spatial, 4x temporal compression, 48 latent channels."""

    z_dim: int = 48
    base_dim: int = 160  # encoder width; stages use base_dim * dim_mult
    decoder_base_dim: int = 256
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    patch_size: int = 2  # pixel patchify before the encoder (3 -> 12 channels)
    latents_mean: tuple[float, ...] = WAN22_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN22_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("z_dim", "base_dim", "decoder_base_dim", "num_res_blocks", "in_channels", "patch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VAEConfig.{name} must be positive, got {getattr(self, name)}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"VAEConfig.temporal_downsample needs {len(self.dim_mult) - 1} flags (one per down stage), "
                f"got {len(self.temporal_downsample)}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"VAEConfig.latents_mean/std need {self.z_dim} values each, got "
                             f"{len(self.latents_mean)}/{len(self.latents_std)}")
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("VAEConfig.latents_std must be positive")

    @property
    def spatial_compression(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        return ModelConfig.preset(name).vae


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5-XXL encoder (transformers `UMT5EncoderModel`); the tiny preset is a random tiny umT5."""

    vocab_size: int = 256384  # umT5's SentencePiece vocabulary
    dim: int = 4096  # d_model, also the DiT's text_dim
    dim_kv: int = 64  # per-head width; num_heads * dim_kv = dim
    num_heads: int = 64
    dim_ffn: int = 10240  # gated-GELU hidden width
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets; umT5 has a bias table in every layer, T5 only in the first
    max_distance: int = 128  # relative distance beyond which all positions share the last bucket
    text_len: int = 512  # tokenizer max_length; the output is trimmed to the real length

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"TextEncoderConfig.{f.name} must be positive, got {getattr(self, f.name)}")

    @classmethod
    def preset(cls, name: str) -> "TextEncoderConfig":
        return ModelConfig.preset(name).text


@dataclass(frozen=True)
class TokenGeometry:
    """From a video's size to the DiT's tokens: the one place that does this arithmetic and checks sizes.

    The VAE turns T frames of H x W pixels into 1 + (T-1)/temporal latent frames of H/spatial x W/spatial
    cells (frame 0 is encoded alone, then chunks of `temporal` frames); the DiT cuts the latent into patches
    of (pt, ph, pw) cells, one token each. For Wan2.2-TI2V-5B that is 16x spatial, 4x temporal and a
    (1, 2, 2) patch: H and W multiples of 32, T = 4n+1, and 1280 x 704 x 121 frames give 31 x 22 x 40 tokens.
    """

    spatial: int  # pixels per latent cell along H and W (VAEConfig.spatial_compression)
    temporal: int  # video frames per latent frame after the first (VAEConfig.temporal_compression)
    patch: tuple[int, int, int]  # latent cells per token, (t, h, w) (DiTConfig.patch_size)

    @classmethod
    def of(cls, dit: DiTConfig, vae: VAEConfig) -> "TokenGeometry":
        return cls(vae.spatial_compression, vae.temporal_compression, tuple(dit.patch_size))

    @property
    def pixel_multiple(self) -> tuple[int, int]:
        """(H, W) pixels per token: a video's height and width must be multiples of these (32, 32)."""
        return self.spatial * self.patch[1], self.spatial * self.patch[2]

    def size_problem(self, height, width, num_frames) -> tuple[str, object, str] | None:
        """The first size that does not fit, as (setting, value, what is wrong and a valid value near it), or
        None. Callers render the setting in their own terms (`height=100` in Python, `--height 100` in the CLI)."""
        def number(v) -> float | None:  # a finite real number to suggest a value near, else None
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            return float(v) if ok else None

        for name, v, m in (("height", height, self.pixel_multiple[0]), ("width", width, self.pixel_multiple[1])):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % m:
                near = max(m, round((number(v) or m) / m) * m)
                kind = "" if isinstance(v, int) and not isinstance(v, bool) else f"an int (got {type(v).__name__}), "
                return name, v, (f"must be {kind}a positive multiple of {m} (the VAE's {self.spatial}x and the "
                                 f"DiT's {self.patch[1]}x{self.patch[2]} patch), e.g. {near}")
        t = self.temporal
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % t:
            near = t * max(0, round(((number(num_frames) or 1) - 1) / t)) + 1
            kind = "" if isinstance(num_frames, int) and not isinstance(num_frames, bool) else \
                f"an int (got {type(num_frames).__name__}), "
            return "num_frames", num_frames, f"must be {kind}{t}n+1 (1, {1 + t}, {1 + 2 * t}, ..., 121), e.g. {near}"
        return None

    def check(self, height: int, width: int, num_frames: int) -> None:
        """Raise a ValueError naming the setting and a valid value near it if a video size does not fit."""
        problem = self.size_problem(height, width, num_frames)
        if problem is not None:
            name, value, text = problem
            raise ValueError(f"{name}={value!r} {text}")

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip of `num_frames` (4n+1) video frames."""
        return 1 + (num_frames - 1) // self.temporal

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(F, h, w) of the latent of a video: (1 + (T-1)/4, H/16, W/16) for Wan2.2."""
        return self.latent_frames(num_frames), height // self.spatial, width // self.spatial

    def token_grid(self, latent: Sequence[int]) -> tuple[int, int, int]:
        """A latent's (F, h, w) -> its token grid (F/pt, h/ph, w/pw); the latent must divide into patches."""
        (f, h, w), (pt, ph, pw) = latent, self.patch
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent grid (F={f}, h={h}, w={w}) must be divisible by the DiT's patch {self.patch}; "
                             f"the pixel height and width must be multiples of {self.pixel_multiple}")
        return f // pt, h // ph, w // pw

    def tokens(self, latent: Sequence[int]) -> int:
        """Tokens of a latent of (F, h, w) cells."""
        f, h, w = self.token_grid(latent)
        return f * h * w


@dataclass(frozen=True)
class ModelConfig:
    """All three networks of one preset; the text encoder's width must feed the DiT's text_dim."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        if self.text.dim != self.dit.text_dim:
            raise ValueError(f"text encoder width {self.text.dim} != DiT text_dim {self.dit.text_dim}")
        if self.vae.z_dim != self.dit.in_dim or self.vae.z_dim != self.dit.out_dim:
            raise ValueError(f"VAE z_dim {self.vae.z_dim} must equal the DiT in_dim/out_dim "
                             f"({self.dit.in_dim}/{self.dit.out_dim})")

    @property
    def geometry(self) -> TokenGeometry:
        return TokenGeometry.of(self.dit, self.vae)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return _PRESET_CONFIGS[name]


# The presets, in one table: the released 5B, and the same classes at tiny widths (random weights; a CPU runs
# the whole engine in seconds).
_PRESET_CONFIGS = {
    "wan2.2-ti2v-5b": ModelConfig(),
    "tiny": ModelConfig(
        DiTConfig(dim=64, ffn_dim=128, freq_dim=32, num_heads=2, num_layers=2, text_dim=32),
        VAEConfig(base_dim=8, decoder_base_dim=16, num_res_blocks=1),
        TextEncoderConfig(vocab_size=512, dim=32, dim_kv=8, num_heads=4, dim_ffn=64, num_layers=2)),
}


@dataclass(frozen=True)
class ParallelConfig:
    """How one generation is spread over the processes of a torchrun job (anyid_rt/parallel.py, docs/distributed.md).

    sequence: S, the Ulysses group size: each of S ranks holds the tokens of a run of whole latent frames and
        an all-to-all swaps them for a slice of the heads around every self-attention (num_heads % S == 0).
    cfg: guidance parallelism: the conditional and the unconditional pass on two ranks (or two groups of S),
        combined after every step. Needs guidance != 1.
    The job has S x (2 if cfg else 1) processes; rank = cfg_rank * S + sequence_rank.
    """

    sequence: int = 1
    cfg: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sequence, bool) or not isinstance(self.sequence, int) or self.sequence < 1:
            raise ValueError(f"ParallelConfig.sequence must be an int >= 1, got {self.sequence!r}")
        if self.sequence == 1 and not self.cfg:
            raise ValueError("ParallelConfig(sequence=1, cfg=False) parallelises nothing: ask for sequence >= 2 "
                             "and/or cfg=True, or pass parallel=None for one process")

    @property
    def world_size(self) -> int:
        return self.sequence * (2 if self.cfg else 1)

    def describe(self) -> str:
        parts = ([f"sequence (Ulysses) x{self.sequence}"] if self.sequence > 1 else []) + (["guidance x2"] if self.cfg
                                                                                            else [])
        return f"{' and '.join(parts)} = {self.world_size} processes"

    def check_world(self, world_size: int, flags: str = "") -> None:
        """The job's process count must be S x (2 if cfg else 1); `flags` spells the request in the message."""
        if world_size != self.world_size:
            asked = flags or f"parallel={self}"
            raise ValueError(f"{asked} needs {self.world_size} processes ({self.describe()}), but this job has "
                             f"{world_size}: launch with torchrun --nproc-per-node {self.world_size} (or change the "
                             "parallel settings to fit the job)")

    def check_heads(self, num_heads: int, flag: str = "sequence") -> None:
        """Ulysses gives each rank num_heads / S whole heads."""
        if num_heads % self.sequence:
            fits = [s for s in range(2, num_heads + 1) if num_heads % s == 0]
            raise ValueError(f"{flag}={self.sequence}: the DiT has {num_heads} attention heads, which do not split "
                             f"evenly over {self.sequence} ranks; use a divisor of {num_heads}: "
                             f"{', '.join(map(str, fits))}")

    def check_guidance(self, guidance: float, flag: str = "cfg") -> None:
        if self.cfg and guidance == 1.0:
            raise ValueError(f"{flag}: guidance parallelism runs the unconditional pass on its own ranks, but "
                             "guidance 1 has no unconditional pass; drop it or raise the guidance scale")


__all__ = ["PRESETS", "DTYPES", "DTYPE_NAMES", "parse_dtype", "dtype_name", "DiTConfig",  # noqa: F822 (DTYPES: lazy)
           "VAEConfig", "TextEncoderConfig", "TokenGeometry", "ModelConfig", "ParallelConfig", "replace", "WAN22_LATENTS_MEAN",
           "WAN22_LATENTS_STD"]
