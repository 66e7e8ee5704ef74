"""Checking a whole engine construction before anything loads: `plan_pretrained` / `plan_tiny` resolve the
model folder (or the tiny preset), every LoRA file (read, and checked against the DiT's config), devices,
dtypes, backend, quantisation, compilation, parallelism, a few-step model's schedule, the step-cache curves and
the optional packages into an `EnginePlan`, which `Engine.from_plan` (anyid_rt/engine.py) builds. The CLI prints
`EnginePlan.summary()` before loading; `probe_request_media` reads the first frame of every input of a request.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from . import media, parallel as par
from .compiled import check_compile
from .conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from .config import ModelConfig, ParallelConfig, TokenGeometry, dtype_name, parse_dtype
from .few_step import FewStepModel, find_few_step
from .kernels import ATTENTION_QUANT, BACKENDS, resolve_backend
from .lora import LoraWeights, check_lora_fits, read_lora
from .models.checkpoint import CheckpointError
from .models.dit import WanDiT
from .models.dit_loader import read_dit_config
from .models.vae_tiling import VAETiling
from .quant import check_fp8_device
from .request import (TINY_DEFAULTS, Defaults, GenerationRequest, ModelFiles, RequestError,
                      check_input_file, defaults_for, require_packages, show)
from .step_cache import CacheCalibration, calibration_path, find_calibration, step_cache_for

QUANT_MODES = (None, "fp8")  # fp8: E4M3 linear layers in the DiT blocks (anyid_rt.quant)
# the umT5 text encoder's packages (the `text` extra), {module: pip package}; ftfy cleans every prompt
TEXT_PACKAGES = {"transformers": "transformers", "tokenizers": "tokenizers", "ftfy": "ftfy"}


def check_device(device: str | torch.device | None, field: str = "device",
                 names: Mapping[str, str] | None = None) -> torch.device:
    """A usable torch device (None: cuda when available, else cpu); a RequestError that names the fix if the
    device does not exist here (no CUDA, an index past the GPUs there are)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RequestError(f"{show(names, field, device)}: not a device ({e}); use cpu, cuda or cuda:N", field) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise RequestError(f"{show(names, field, device)}: CUDA is not available here (torch {torch.__version__}, "
                               f"{build}, sees no GPU); use {show(names, field, 'cpu')}", field)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RequestError(f"{show(names, field, device)}: there are only {torch.cuda.device_count()} GPU(s) "
                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1})", field)
    elif dev.type != "cpu":
        raise RequestError(f"{show(names, field, device)}: unsupported device type {dev.type!r}; use cpu or cuda",
                           field)
    return dev


@dataclass(frozen=True)
class EnginePlan:
    """An engine's construction, resolved and checked before any weight is read (`plan_pretrained`,
    `plan_tiny`); `Engine.from_plan` builds it. `summary()` is one line saying what will run."""

    files: ModelFiles | None  # the model folder's parts; None for the tiny preset's random weights
    seed: int  # tiny preset: the seed of the random weights
    device: torch.device
    text_encoder_device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    backend: str  # resolved: torch, triton, or auto (on CUDA: chosen per op by measurement)
    backend_asked: str  # as asked: auto, torch or triton
    quant: str | None
    attention_quant: str | None
    loras: tuple[tuple[Path, LoraWeights], ...]
    lora_strength: float
    layout: ConditioningLayout
    layout_source: str  # "default", "given" or the LoRA file it was read from
    vae_tile: VAETiling | None
    geometry: TokenGeometry  # the video-size rules of the model to be loaded
    defaults: Defaults  # its generation defaults
    compile: bool | str = False  # True: regional torch.compile of the blocks; "cudagraphs": and the step graphed
    parallel: ParallelConfig | None = None  # sequence / guidance parallelism over a torchrun job (parallel.py)
    few_step: FewStepModel | None = None  # the distilled model's sampling the folder names (anyid_rt/few_step.py)
    cache_path: Path | None = None  # where this model's step-cache curves live (anyid_rt/step_cache.py)
    cache_calibration: CacheCalibration | None = None  # read from there, or the published TI2V-5B ones

    def summary(self) -> str:
        model = self.files.describe() if self.files else f"tiny preset (random weights, seed {self.seed})"
        backend = self.backend + (" (auto)" if self.backend_asked == "auto" and self.backend != "auto" else "")
        te = "" if self.text_encoder_device == self.device else f", text encoder on {self.text_encoder_device}"
        lora = "".join(f", LoRA {p.name}" for p, _ in self.loras)
        layout = " ".join(f"{k}={v}" for k, v in asdict(self.layout).items())
        return (f"model {model}{lora} | device {self.device}{te} | dtype {dtype_name(self.dtype)} (VAE "
                f"{dtype_name(self.vae_dtype)}) | backend {backend}, attention {self.attention_quant or 'unquantised'}"
                f" | quantisation {self.quant or 'none'} | layout ({self.layout_source}): {layout}"
                + (f" | compile {'on' if self.compile is True else self.compile}" if self.compile else "")
                + (f" | parallel: {self.parallel.describe()}" if self.parallel else "")
                + (f" | few-step {self.few_step.describe()}" if self.few_step else ""))

    def check(self, request: GenerationRequest, names: Mapping[str, str] | None = None,
              probe_media: bool = True) -> GenerationRequest:
        """`request` checked against the model to be built (sizes, defaults, the layout's reference cap);
        `probe_media` also decodes the first frame of every reference / image file and finds an H.264 encoder
        when the request writes a video, so that a broken file fails before the model loads."""
        r = request.check(self.geometry, self.defaults, names, max_references=self.layout.max_references)
        if r.cache is not None:  # a step cache needs this model's curves: refused before the model loads
            step_cache_for(r, self.cache_calibration, self.cache_path, 1, 0, False)
        if probe_media:
            probe_request_media(r, names)
        if r.references:  # e.g. a layout with person_crop and no OpenCV: refused before the model loads
            self.layout.check_requirements()
        return r


def probe_request_media(request: GenerationRequest, names: Mapping[str, str] | None = None) -> None:
    """Decode the first frame of every reference and image file of a request, and check that a video can be
    written; a RequestError naming the file otherwise."""
    for i, ref in enumerate(request.references or []):
        if isinstance(ref, (str, Path)):
            try:
                media.load_media(ref, max_frames=1)
            except media.MediaError as e:
                raise RequestError(f"reference {i} ({show(names, 'references')}): {e}", "references") from e
    if isinstance(request.image, (str, Path)):
        try:
            media.load_media(request.image, max_frames=1)
        except media.MediaError as e:
            raise RequestError(f"{show(names, 'image')}: {e}", "image") from e
    if request.output is not None:
        try:
            media.h264_encoder()
        except media.MediaError as e:
            raise RequestError(f"{show(names, 'output', str(request.output))}: {e}", "output") from e


def _lora_files(lora) -> list[Path]:
    return [Path(lora)] if isinstance(lora, (str, Path)) else [Path(f) for f in (lora or [])]


def _check_modes(backend: str, quant: str | None, attention_quant: str | None,
                 names: Mapping[str, str] | None) -> None:
    if backend not in BACKENDS:
        raise RequestError(f"{show(names, 'backend', backend)} is not one of {', '.join(BACKENDS)}", "backend")
    if quant not in QUANT_MODES:
        raise RequestError(f"quant={quant!r} is not one of {QUANT_MODES}", "quant")
    if attention_quant not in ATTENTION_QUANT:
        raise RequestError(f"attention_quant={attention_quant!r} is not one of {ATTENTION_QUANT}", "attention_quant")


def _resolve_backend(backend: str, device: torch.device, names: Mapping[str, str] | None) -> str:
    resolved = resolve_backend(backend, device)
    if resolved == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RequestError(f"{show(names, 'backend', backend)} needs a CUDA device: on a CPU, Triton kernels run only "
                           "in the (slow) interpreter, with TRITON_INTERPRET=1 set; use the torch backend", "backend")
    return resolved


def _read_loras(files: list[Path], dit_cfg, layout: ConditioningLayout | None, names: Mapping[str, str] | None
                ) -> tuple[tuple[tuple[Path, LoraWeights], ...], ConditioningLayout, str]:
    """Read every LoRA file and check it against a DiT of config `dit_cfg` built on the meta device (no weights);
    the layout: `layout` if given, else the LoRAs' (which must agree), else the default."""
    out, lora_layout, source = [], None, "default"
    meta = None
    for f in files:
        check_input_file(f, "lora", names, what="LoRA")
        try:
            weights = read_lora(f)
            if meta is None:
                with torch.device("meta"):
                    meta = WanDiT(dit_cfg)
            check_lora_fits(meta, weights)
        except CheckpointError as e:
            msg = str(e).removeprefix(f"{f}: ")  # read_lora's messages start with the path, named here already
            raise CheckpointError(f"{show(names, 'lora', str(f))}: {msg}") from e
        if LAYOUT_METADATA_KEY in weights.metadata:
            found = ConditioningLayout.from_json(weights.metadata[LAYOUT_METADATA_KEY])
            if lora_layout is not None and found != lora_layout:
                raise CheckpointError(f"LoRA {f} was trained with layout {found}, another LoRA with "
                                      f"{lora_layout}; merge LoRAs trained with the same layout")
            lora_layout, source = found, f"from {f.name}"
        out.append((f, weights))
    if layout is not None:
        if lora_layout is not None or out:  # a LoRA runs with the attention it was trained with, never another
            trained = (lora_layout or ConditioningLayout.from_json("{}")).reference_attention
            if layout.reference_attention != trained:
                raise CheckpointError(f"layout reference_attention={layout.reference_attention!r}, but the LoRA was "
                                      f"trained with {trained!r}: train a LoRA that way (anyid-rt train, [layout])")
        return tuple(out), layout, "given"
    return tuple(out), lora_layout or ConditioningLayout(), source


def _check_run(backend, quant, attention_quant, dtype, device, text_encoder_device, compile,
               names) -> tuple[torch.dtype, torch.device, torch.device, str]:
    """The checks every plan makes: modes, dtype, devices, backend, FP8 and compile support, the text encoder's
    packages. Returns (dtype, device, text encoder device, resolved backend)."""
    _check_modes(backend, quant, attention_quant, names)
    dtype = parse_dtype(dtype, show(names, "dtype"))
    device = check_device(device, "device", names)
    te_device = check_device(text_encoder_device, "text_encoder_device", names) if text_encoder_device else device
    resolved = _resolve_backend(backend, device, names)
    if quant == "fp8":
        check_fp8_device(device)
    check_compile(compile, device, names)
    require_packages(TEXT_PACKAGES, "the umT5 text encoder", "text")
    return dtype, device, te_device, resolved


def plan_pretrained(path: str | Path, lora: str | Path | Sequence[str | Path] | None = None,
                    dtype: str | torch.dtype = "bf16", backend: str = "auto", quant: str | None = None,
                    device: str | torch.device | None = None, text_encoder_device: str | None = None,
                    vae_dtype: str | torch.dtype = "fp32", lora_strength: float = 1.0,
                    layout: ConditioningLayout | None = None, vae_tile: VAETiling | tuple | None = None,
                    attention_quant: str | None = None, compile: bool | str = False,
                    parallel: ParallelConfig | None = None, names: Mapping[str, str] | None = None,
                    dit: str | Path | None = None) -> EnginePlan:
    """Check everything `Engine.from_pretrained` will need, reading no weight: the folder's four parts, every
    LoRA file (read, and checked against the DiT's config), the devices, dtypes, backend, quantisation,
    compilation and the text encoder's packages. Raises a RequestError (or CheckpointError) naming the setting
    as `names` spells it."""
    vae_dtype = parse_dtype(vae_dtype, show(names, "vae_dtype"))
    files = ModelFiles.find(path, names)
    if dit is not None:  # DiT weights published alone (Wan2.2-TI2V-5B-Turbo's model.pt) over the base's parts
        files = files.with_dit(dit, names)
    dtype, device, te_device, resolved = _check_run(backend, quant, attention_quant, dtype, device,
                                                    text_encoder_device, compile, names)
    dit_cfg = read_dit_config(files.dit) if lora or parallel or files.dim is None else None
    loras, layout, source = _read_loras(_lora_files(lora), dit_cfg, layout, names)
    if parallel is not None:
        device, te_device = par.check_plan(parallel, dit_cfg.num_heads, compile, device, te_device, layout, names)
    few = find_few_step(files.folder, files.dit)
    dim = files.dim if files.dim is not None else dit_cfg.dim
    defaults = defaults_for(dim)
    cache_path = calibration_path(files.folder, files.dit if files.dit_replaced else None, [p for p, _ in loras])
    # the published curves are the unmodified TI2V-5B's (width 3072): no LoRA, no other or distilled weights
    calibration = find_calibration(cache_path, not loras and not files.dit_replaced and not few and dim == 3072)
    return EnginePlan(files, 0, device, te_device, dtype, vae_dtype, resolved, backend, quant, attention_quant,
                      loras, lora_strength, layout, source, VAETiling.of(vae_tile) if vae_tile is not None else None,
                      files.geometry, few.defaults(defaults) if few else defaults, compile, parallel, few, cache_path,
                      calibration)


def plan_tiny(seed: int = 0, device: str | torch.device = "cpu", backend: str = "torch",
              layout: ConditioningLayout | None = None, quant: str | None = None, attention_quant: str | None = None,
              dtype: str | torch.dtype = "fp32", lora: str | Path | Sequence[str | Path] | None = None,
              lora_strength: float = 1.0, text_encoder_device: str | torch.device | None = None,
              compile: bool | str = False, vae_tile: VAETiling | tuple | None = None,
              parallel: ParallelConfig | None = None, names: Mapping[str, str] | None = None) -> EnginePlan:
    """`plan_pretrained` for the tiny preset (random weights from `seed`): the same checks, no folder."""
    dtype, device, te_device, resolved = _check_run(backend, quant, attention_quant, dtype, device,
                                                    text_encoder_device, compile, names)
    cfg = ModelConfig.preset("tiny")
    loras, layout, source = _read_loras(_lora_files(lora), cfg.dit, layout, names)
    if parallel is not None:
        device, te_device = par.check_plan(parallel, cfg.dit.num_heads, compile, device, te_device, layout, names)
    cache_path = calibration_path(None, None, [p for p, _ in loras])
    return EnginePlan(None, seed, device, te_device, dtype, torch.float32, resolved, backend, quant, attention_quant,
                      loras, lora_strength, layout, source, VAETiling.of(vae_tile) if vae_tile is not None else None,
                      cfg.geometry, TINY_DEFAULTS, compile, parallel, None, cache_path,
                      find_calibration(cache_path, published_applies=False))


__all__ = ["EnginePlan", "plan_pretrained", "plan_tiny", "check_device", "probe_request_media", "QUANT_MODES",
           "TEXT_PACKAGES"]
