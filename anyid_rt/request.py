"""What a user asks for, checked before any work: generation settings, model folders, paths, optional packages.

Every front end (`Engine.generate` / `Engine.from_pretrained` in Python, the `anyid-rt` CLI, the export commands)
describes a request with the types here and checks it completely before a model is loaded or a step runs, so
that a typo costs a fraction of a second instead of a model load, and nothing is half-written:

- `GenerationRequest`: the arguments of `Engine.generate`; `check()` tests the prompt, sizes, steps, guidance,
  shift, sampler, seed, the primary index, the reference / image paths and the output path.
- `ModelFiles.find(folder)`: the layout of a model folder and where its DiT, VAE, text encoder and tokenizer are,
  from file names alone; a missing part is reported with the file expected.
- `check_input_file`, `check_output_path`, `atomic_path`: inputs exist, an output's folder can be made, and an
  output file appears whole or not at all (written beside its final name and renamed at the end).
- `require_packages`: optional packages, found without importing them.

This module does not import torch, so the CLI runs these checks before it imports the engine. Messages name a
setting the way the caller spells it: `names` maps Python argument names to CLI flags, so that the same check
says `num_frames=10 must be 4n+1` in Python and `--frames 10 must be 4n+1` on the command line.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import DiTConfig, TokenGeometry, VAEConfig
from .files import atomic_path

SAMPLERS = ("unipc", "euler", "dpm++", "dmd")  # the names `sampler=` takes (anyid_rt.sampling builds them)
# The step caches `cache=` takes (anyid_rt/step_cache.py) and their published TI2V-5B thresholds, in that order:
# MagCache E006K2R02 (MagCache4Wan2.2/README.md), TeaCache 0.26 (LightX2V wan_ti2v_tea_720p.json)
CACHE_MODES = ("magcache", "teacache")
PUBLISHED_CACHE_THRESHOLDS = (0.06, 0.26)

# The original Wan2.2 layout's file names (the diffusers layout uses transformer/, vae/, text_encoder/, tokenizer/).
ORIGINAL_VAE = "Wan2.2_VAE.pth"
ORIGINAL_UMT5 = "models_t5_umt5-xxl-enc-bf16.pth"
ORIGINAL_TOKENIZER = "google/umt5-xxl"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")  # any one makes a tokenizer folder
DIT_WEIGHTS = "diffusion_pytorch_model*.safetensors, with its .safetensors.index.json when sharded"


# ---------------------------------------------------------------------------------------------------------------
# Errors and names
# ---------------------------------------------------------------------------------------------------------------

class RequestError(ValueError):
    """A request that cannot run. `field` is the setting at fault (its Python argument name, or None); the
    message names it as the caller spells it and says how to fix it. The CLI prints it and exits with code 2."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class RequestTypeError(RequestError, TypeError):
    """A setting of the wrong Python type (a TypeError too)."""


class RequestFileError(RequestError, FileNotFoundError):
    """A file or folder the request names does not exist (a FileNotFoundError too)."""


_NO_VALUE = object()


def show(names: Mapping[str, str] | None, field: str, value: Any = _NO_VALUE) -> str:
    """A setting as the caller spells it: `--frames 10` where `names` maps num_frames to --frames, else the
    Python argument `num_frames=10` (`num_frames` without a value)."""
    flag = (names or {}).get(field)
    if value is _NO_VALUE:
        return flag or field
    return f"{flag} {value}" if flag else f"{field}={value!r}"


# ---------------------------------------------------------------------------------------------------------------
# Optional packages, input files, output paths
# ---------------------------------------------------------------------------------------------------------------

def missing_packages(modules: Sequence[str]) -> list[str]:
    """The importable top-level module names among `modules` that are not installed (none is imported)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require_packages(modules: Mapping[str, str], why: str, extra: str) -> None:
    """Raise a RequestError naming every missing package of {module: pip package} and the extra that has them."""
    missing = [pkg for module, pkg in modules.items() if module in missing_packages([module])]
    if missing:
        raise RequestError(f"{why} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                           f"installed: pip install -e \".[{extra}]\" (the `{extra}` extra)")


def check_input_file(path: str | Path, field: str, names: Mapping[str, str] | None = None, *,
                     what: str = "file") -> Path:
    """`path` must be an existing file; `what` describes it in the error (e.g. "reference 0")."""
    p = Path(path)
    label = show(names, field, str(path)) + (f" ({what})" if what != "file" else "")
    if not p.exists():
        raise RequestFileError(f"{label}: file not found", field)
    if not p.is_file():
        raise RequestError(f"{label}: is a folder, not a file", field)
    if not os.access(p, os.R_OK):
        raise RequestError(f"{label}: not readable (permissions)", field)
    return p


def check_output_path(path: str | Path, field: str, names: Mapping[str, str] | None = None, *,
                      suffix: str | None = None, folder: bool = False) -> Path:
    """An output the request will write: a file ending in `suffix`, or a `folder`. Its parent folders need not
    exist, but the nearest one that does must be a writable folder (not a file), so that the output can be
    written when the work is done. Nothing is created here."""
    p = Path(path)
    label = show(names, field, str(path))
    if suffix is not None and p.suffix.lower() != suffix:
        raise RequestError(f"{label} must end in {suffix}", field)
    if folder:
        if p.exists() and not p.is_dir():
            raise RequestError(f"{label}: is a file; name a folder (it is created if missing)", field)
        parent = p
    else:
        if p.is_dir():
            raise RequestError(f"{label}: is a folder; name the file to write, e.g. {p / ('out' + (suffix or ''))}",
                               field)
        parent = p.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise RequestError(f"{label}: cannot create the folder {parent}: {existing} is a file", field)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RequestError(f"{label}: cannot write into {existing} (permissions)", field)
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------------------------

def _has_weights(folder: Path, patterns=("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pth")) -> bool:
    return folder.is_dir() and any(any(folder.glob(p)) for p in patterns)


def has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    return "it holds " + ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class ModelFiles:
    """Where the parts of a model folder are, found from file names alone (no weights are read).

    layout: "diffusers" (transformer/, vae/, text_encoder/, tokenizer/) or "original" (DiT shards + index +
        config.json, Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/).
    dit, vae, text_encoder: what `load_dit`, `load_vae` and `TextEncoder.from_pretrained` read.
    dit_config: the DiT's config.json ({} when there is none).
    """

    folder: Path
    layout: str
    dit: Path
    vae: Path
    text_encoder: Path
    dit_config: dict

    @classmethod
    def find(cls, folder: str | Path, names: Mapping[str, str] | None = None, field: str = "path") -> "ModelFiles":
        p = Path(folder)
        label = show(names, field, str(folder))
        if not p.exists():
            raise RequestFileError(f"{label}: model folder not found", field)
        if not p.is_dir():
            raise RequestError(f"{label}: is a file; pass the model folder (original or diffusers layout)", field)
        if (p / "transformer").is_dir() or (p / "model_index.json").is_file():
            parts = {
                "the DiT (transformer/ with config.json and weights)": _has_weights(p / "transformer"),
                "the VAE (vae/ with its weights)": _has_weights(p / "vae"),
                "the umT5 text encoder (text_encoder/ with config.json and weights)":
                    _has_weights(p / "text_encoder") and (p / "text_encoder" / "config.json").is_file(),
                f"the tokenizer (tokenizer/ with one of {', '.join(TOKENIZER_FILES)})": has_tokenizer(p / "tokenizer"),
            }
            found = cls(p, "diffusers", p / "transformer", p / "vae", p, _read_json(p / "transformer" / "config.json"))
        elif any((p / f).exists() for f in (ORIGINAL_VAE, ORIGINAL_UMT5, ORIGINAL_TOKENIZER, "config.json")) \
                or _has_weights(p, ("*.safetensors", "*.safetensors.index.json")):
            parts = {
                f"the DiT weights ({DIT_WEIGHTS})": _has_weights(p, ("*.safetensors", "*.safetensors.index.json")),
                f"the VAE ({ORIGINAL_VAE})": (p / ORIGINAL_VAE).is_file(),
                f"the umT5 text encoder ({ORIGINAL_UMT5})": (p / ORIGINAL_UMT5).is_file(),
                f"the tokenizer ({ORIGINAL_TOKENIZER}/)": has_tokenizer(p / ORIGINAL_TOKENIZER),
            }
            found = cls(p, "original", p, p / ORIGINAL_VAE, p, _read_json(p / "config.json"))
        else:
            raise RequestFileError(
                f"{label} is neither a diffusers pipeline folder (transformer/, vae/, text_encoder/, tokenizer/) nor "
                f"an original Wan2.2 folder ({DIT_WEIGHTS}, config.json, {ORIGINAL_VAE}, {ORIGINAL_UMT5}, "
                f"{ORIGINAL_TOKENIZER}/); {_listing(p)}", field)
        missing = [part for part, ok in parts.items() if not ok]
        if missing:
            raise RequestFileError(f"{label} looks like the {found.layout} layout but lacks " + "; ".join(missing)
                                   + f" ({_listing(p)})", field)
        return found

    @property
    def dim(self) -> int | None:
        """The DiT width from its config.json (None without one)."""
        c = self.dit_config
        if "num_attention_heads" in c and "attention_head_dim" in c:
            return int(c["num_attention_heads"]) * int(c["attention_head_dim"])
        return int(c["dim"]) if "dim" in c else None

    @property
    def geometry(self) -> TokenGeometry:
        """The token geometry the folder's model will have: its DiT patch (from config.json) and the Wan2.2 VAE's
        compression. The engine checks again with the loaded models."""
        patch = tuple(self.dit_config.get("patch_size") or DiTConfig.patch_size)
        return TokenGeometry(VAEConfig().spatial_compression, VAEConfig().temporal_compression, patch)

    def describe(self) -> str:
        return f"{self.folder} ({self.layout} layout)" + (f", DiT {self.dit}" if self.dit_replaced else "")

    @property
    def dit_replaced(self) -> bool:
        return self.dit not in (self.folder, self.folder / "transformer")

    def with_dit(self, dit: str | Path, names: Mapping[str, str] | None = None) -> "ModelFiles":
        """These parts with the DiT weights at `dit` instead of the folder's (a file or a folder, any layout: e.g. a
        distilled checkpoint published as DiT weights alone, such as Wan2.2-TI2V-5B-Turbo's model.pt); its
        config.json, when there is one beside it, replaces the folder's."""
        p = Path(dit)
        if not p.exists():
            raise RequestFileError(f"{show(names, 'dit', str(dit))}: DiT weights not found", "dit")
        if p.is_dir() and not _has_weights(p, ("*.safetensors", "*.safetensors.index.json", "*.pt", "*.pth")):
            raise RequestFileError(f"{show(names, 'dit', str(dit))}: holds no DiT weights ({_listing(p)})", "dit")
        cfg = (p if p.is_dir() else p.parent) / "config.json"
        return replace(self, dit=p, dit_config=_read_json(cfg))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RequestError(f"{path}: unreadable JSON ({e})") from e
    return raw if isinstance(raw, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Defaults:
    """Generation defaults of a preset (the 5B's are the official TI2V-5B / AnyID settings)."""

    height: int = 704  # pixels, a multiple of 32 (VAE 16x times the 2x2 patch)
    width: int = 1280
    num_frames: int = 121  # 4n + 1: the VAE's first frame alone, then chunks of 4
    steps: int = 50
    guidance: float = 5.0  # classifier-free guidance scale; 1 runs the conditional row only
    shift: float = 5.0  # flow-matching timestep shift
    sampler: str = "unipc"
    fps: int = 24  # of the written video; Wan2.2-TI2V-5B is trained at 24
    timesteps: tuple[float, ...] | None = None  # a few-step model's list for sampler "dmd" (anyid_rt/few_step.py)


TINY_DEFAULTS = Defaults(height=64, width=64, num_frames=9, steps=6)


def preset_for(dim: int | None) -> str:
    """The preset whose sizes a DiT of width `dim` has: "tiny" for test-sized models (< 1024), else the 5B's
    (also when the width is unknown: a folder without config.json)."""
    return "tiny" if dim is not None and dim < 1024 else "wan2.2-ti2v-5b"


def defaults_for(dim: int | None) -> Defaults:
    """The defaults of a DiT of width `dim`: the 5B's, or the tiny preset's for test-sized models (< 1024)."""
    return TINY_DEFAULTS if preset_for(dim) == "tiny" else Defaults()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_path(x) -> bool:
    return isinstance(x, (str, Path)) or hasattr(x, "__fspath__")


@dataclass(frozen=True)
class GenerationRequest:
    """The arguments of `Engine.generate` (None: the engine's default). `check` resolves the defaults and tests
    everything that needs no model: what is wrong is raised before any weight is read or any step runs."""

    prompt: str | None = None
    references: Sequence[Any] | None = None
    primary: int = 0
    image: Any = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    sampler: str | None = None
    seed: int = 0
    output: str | Path | None = None
    latents: Any = None  # a tensor [48, F, H/16, W/16] (shape checked by the engine)
    prompt_embeds: Any = None  # tensors [1, L, text_dim] (checked by the engine)
    negative_prompt_embeds: Any = None
    timesteps: Any = None  # sampler "dmd": the listed timesteps, strictly decreasing in (0, 1000]
    cache: str | None = None  # step cache: "magcache" | "teacache" (anyid_rt/step_cache.py)
    cache_threshold: float | None = None  # >= 0 (0: never skip); None: the published threshold of the mode

    def with_defaults(self, defaults: Defaults) -> "GenerationRequest":
        # timesteps belong to sampler "dmd" only: `_check_sampling` fills them when that sampler is chosen
        return replace(self, **{f.name: getattr(defaults, f.name) for f in fields(Defaults)
                                if f.name in self.__dataclass_fields__ and f.name != "timesteps"
                                and getattr(self, f.name) is None})

    def check(self, geometry: TokenGeometry, defaults: Defaults, names: Mapping[str, str] | None = None,
              max_references: int | None = None) -> "GenerationRequest":
        """Fill the defaults and raise a RequestError (TypeError / FileNotFoundError variants) for the first
        problem, naming it as `names` spells it. Returns the request with the defaults filled in."""
        r = self.with_defaults(defaults)
        r._check_text(names)
        problem = geometry.size_problem(r.height, r.width, r.num_frames)
        if problem is not None:
            field, value, text = problem
            raise RequestError(f"{show(names, field, value)} {text}", field)
        if not _is_int(r.steps) or r.steps < 1:
            raise RequestError(f"{show(names, 'steps', r.steps)} must be an int >= 1", "steps")
        if not _is_real(r.guidance) or r.guidance < 1:
            raise RequestError(f"{show(names, 'guidance', r.guidance)} must be >= 1 (1 disables guidance and its "
                               "second pass)", "guidance")
        if not _is_real(r.shift) or r.shift <= 0:
            raise RequestError(f"{show(names, 'shift', r.shift)} must be a number > 0", "shift")
        if r.sampler not in SAMPLERS:
            raise RequestError(f"{show(names, 'sampler', r.sampler)} is not one of {', '.join(SAMPLERS)}", "sampler")
        r = self._check_sampling(r, defaults, names)
        r = self._check_cache(r, names)
        if not _is_int(r.seed):
            raise RequestTypeError(f"seed must be an int, got {type(r.seed).__name__}", "seed")
        r._check_references(names, max_references)
        if r.image is not None:
            if r.num_frames < 5:
                raise RequestError(f"{show(names, 'image')} (image-to-video) needs {show(names, 'num_frames')} >= 5 "
                                   f"(got {show(names, 'num_frames', r.num_frames)}): frame 0 is the image", "image")
            if _is_path(r.image):
                check_input_file(r.image, "image", names, what="image")
        if r.output is not None:
            check_output_path(r.output, "output", names, suffix=".mp4")
        return r

    def _check_sampling(self, r: "GenerationRequest", defaults: Defaults, names) -> "GenerationRequest":
        """Sampler "dmd" runs a timestep list (given, or the few-step model's own), one step per entry; a list given
        with another sampler is refused rather than ignored."""
        if r.sampler != "dmd":
            if self.timesteps is not None:
                raise RequestError(f"{show(names, 'timesteps')} applies only to {show(names, 'sampler', 'dmd')}; "
                                   f"drop it or choose that sampler", "timesteps")
            return r
        from .few_step import check_timesteps

        given = self.timesteps if self.timesteps is not None else defaults.timesteps
        if given is None:
            raise RequestError(f"{show(names, 'sampler', 'dmd')} needs {show(names, 'timesteps')} (e.g. [1000, 750, "
                               "500, 250]): this model names no few-step list (docs/fewer-forwards.md)", "timesteps")
        ts = check_timesteps(list(given), show(names, "timesteps"))
        if self.steps is not None and self.steps != len(ts):
            raise RequestError(f"{show(names, 'steps', self.steps)} disagrees with the {len(ts)} timesteps of "
                               f"{show(names, 'sampler', 'dmd')} (one step per listed timestep); drop it", "steps")
        return replace(r, timesteps=ts, steps=len(ts))

    def _check_cache(self, r: "GenerationRequest", names) -> "GenerationRequest":
        """A step cache and its threshold (the mode's published one when not given); a threshold without a cache,
        or a cache on a few-step sampler (its thresholds are calibrated for 50-step schedules), is refused."""
        if r.cache is None:
            if r.cache_threshold is not None:
                raise RequestError(f"{show(names, 'cache_threshold', r.cache_threshold)} needs {show(names, 'cache')} "
                                   "(magcache or teacache)", "cache_threshold")
            return r
        if r.cache not in CACHE_MODES:
            raise RequestError(f"{show(names, 'cache', r.cache)} is not one of {', '.join(CACHE_MODES)}", "cache")
        if r.sampler == "dmd":
            raise RequestError(f"{show(names, 'cache', r.cache)} does not apply to {show(names, 'sampler', 'dmd')}: "
                               "a few-step model changes a lot at every step and the cache thresholds are calibrated "
                               "for 50-step schedules; drop the cache", "cache")
        threshold = PUBLISHED_CACHE_THRESHOLDS[CACHE_MODES.index(r.cache)] if r.cache_threshold is None \
            else r.cache_threshold
        if not _is_real(threshold) or threshold < 0:
            raise RequestError(f"{show(names, 'cache_threshold', threshold)} must be a number >= 0 (0 never skips a "
                               "step)", "cache_threshold")
        return replace(r, cache_threshold=float(threshold))

    def _check_text(self, names) -> None:
        if self.prompt_embeds is None:
            if not isinstance(self.prompt, str):
                raise RequestTypeError(f"prompt must be a str (or pass prompt_embeds=), got "
                                       f"{type(self.prompt).__name__}", "prompt")
            if not self.prompt.strip() and self.references is None and self.image is None:
                # with references an empty differential prompt means "as the primary reference"; without any
                # condition there is nothing to generate from
                raise RequestError(f"{show(names, 'prompt')} is empty and nothing else conditions the video: describe "
                                   "it, e.g. \"A woman smiles in a sunlit garden.\"", "prompt")
        elif self.prompt is not None:
            raise RequestError("give prompt or prompt_embeds, not both (prompt_embeds replaces the prompt)", "prompt")
        if self.negative_prompt is not None:
            if not isinstance(self.negative_prompt, str):
                raise RequestTypeError(f"negative_prompt must be a str or None, got "
                                       f"{type(self.negative_prompt).__name__}", "negative_prompt")
            if self.negative_prompt_embeds is not None:
                raise RequestError("give negative_prompt or negative_prompt_embeds, not both", "negative_prompt")

    def _check_references(self, names, max_references: int | None) -> None:
        refs = self.references
        if refs is None:
            if self.primary != 0:
                raise RequestError(f"{show(names, 'primary', self.primary)} selects a reference, but none is given "
                                   f"(add {show(names, 'references')})", "primary")
            return
        if _is_path(refs) or isinstance(refs, (bytes, bytearray)) or not isinstance(refs, Sequence):
            raise RequestTypeError("references must be a list (paths, PIL images, arrays or tensors); "
                                   f"got {type(refs).__name__}", "references")
        n = len(refs)
        if n == 0:
            raise RequestError("references is an empty list; pass references=None for text-to-video", "references")
        if max_references is not None and n > max_references:
            raise RequestError(f"{n} references given; this layout takes at most {max_references} "
                               "(ConditioningLayout.max_references). Drop some references or raise the cap",
                               "references")
        if not _is_int(self.primary) or not 0 <= self.primary < n:
            raise RequestError(f"{show(names, 'primary', self.primary)} is out of range for {n} references "
                               f"(0..{n - 1})", "primary")
        for i, ref in enumerate(refs):
            if _is_path(ref):
                check_input_file(ref, "references", names, what=f"reference {i}")


__all__ = ["RequestError", "RequestTypeError", "RequestFileError", "GenerationRequest", "ModelFiles", "Defaults",
           "TINY_DEFAULTS", "defaults_for", "preset_for", "SAMPLERS", "CACHE_MODES", "PUBLISHED_CACHE_THRESHOLDS",
           "show", "require_packages", "missing_packages",
           "check_input_file", "check_output_path", "atomic_path", "write_text_atomic", "has_tokenizer",
           "ORIGINAL_VAE", "ORIGINAL_UMT5", "ORIGINAL_TOKENIZER", "TOKENIZER_FILES"]
