"""The generation engine: text-to-video, image-to-video and AnyID omni-reference generation.

One `Engine` holds the DiT, the VAE and the text encoder, with the work that is done once kept out of the
step loop: prompt embeddings (cached per prompt), the text K/V of every block (once per generation),
reference latents (cached by content), null-reference latents (cached by shape) and RoPE tables (cached per
layout). Guidance runs the conditional pass and the single aggregated unconditional pass (every reference
nulled and the empty prompt together, AnyID eq. 7) as one batch of 2.

Nothing is loaded before the whole request is checked: `plan_pretrained` / `plan_tiny` resolve and check the
construction (model folder, LoRA files against the DiT's config, devices, dtypes, backend, quantisation,
optional packages) into an `EnginePlan`, which `Engine.from_plan` then builds; `generate` checks its
`GenerationRequest` (anyid_rt/request.py) and reads every reference before the first step. The CLI runs the
same checks, and prints `EnginePlan.summary()` before loading.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from . import frame_ops, media
from .denoise import denoise
from .cache import LRUCache
from .compiled import check_compile, compile_dit_
from .conditioning import LAYOUT_METADATA_KEY, ConditioningLayout, PreparedReference, StepLayout, prepare_reference
from .config import ModelConfig, TokenGeometry, dtype_name, parse_dtype
from .kernels import ATTENTION_QUANT, BACKENDS, resolve_backend
from .lora import LoraWeights, check_lora_fits, merge_lora_, read_lora
from .models.checkpoint import CheckpointError
from .models.dit import WanDiT
from .models.dit_loader import load_dit, read_dit_config, save_dit
from .models.random_weights import random_dit, random_vae
from .models.text_encoder import TextEncoder
from .models.vae import WanVAE
from .models.vae_tiling import VAETiling
from .models.vae_loader import load_vae, save_vae_original
from .few_step import FewStepModel, find_few_step
from .quant import check_fp8_device, quantize_dit_fp8_
from .files import atomic_path
from .request import (TINY_DEFAULTS, Defaults, GenerationRequest, ModelFiles, RequestError,
                      check_input_file, defaults_for, require_packages, show)
from .sampling import make_sampler
from .step_cache import CacheCalibration, calibrate, calibration_path, find_calibration, step_cache_for

QUANT_MODES = (None, "fp8")  # fp8: E4M3 linear layers in the DiT blocks (anyid_rt.quant)
_WAN22_DEFAULTS = Defaults()  # the 5B's (frozen: safe as an argument default)
# the umT5 text encoder's packages (the `text` extra), {module: pip package}; ftfy cleans every prompt
TEXT_PACKAGES = {"transformers": "transformers", "tokenizers": "tokenizers", "ftfy": "ftfy"}


@dataclass
class Video:
    """A generated video: frames uint8 [T, H, W, 3], the final target latent [48, F, H/16, W/16] (fp32,
    normalised), its fps and the time of each stage in seconds."""

    frames: torch.Tensor
    latents: torch.Tensor
    fps: int
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)  # steps, DiT forwards run and skipped (anyid_rt/denoise.py)

    def save(self, path: str | Path) -> Path:
        """Write an H.264 mp4 at the video's fps. The file is written beside `path` and renamed at the end, so
        that a failure or Ctrl-C never leaves a truncated video under that name."""
        path = Path(path)
        with atomic_path(path) as tmp:
            media.write_mp4(self.frames, tmp, self.fps)
        return path


# ---------------------------------------------------------------------------------------------------------------
# Checking a construction before anything loads
# ---------------------------------------------------------------------------------------------------------------

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
                    names: Mapping[str, str] | None = None, dit: str | Path | None = None) -> EnginePlan:
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
    dit_cfg = read_dit_config(files.dit) if lora or files.dim is None else None
    loras, layout, source = _read_loras(_lora_files(lora), dit_cfg, layout, names)
    few = find_few_step(files.folder, files.dit)
    dim = files.dim if files.dim is not None else dit_cfg.dim
    defaults = defaults_for(dim)
    cache_path = calibration_path(files.folder, files.dit if files.dit_replaced else None, [p for p, _ in loras])
    # the published curves are the unmodified TI2V-5B's (width 3072): no LoRA, no other or distilled weights
    calibration = find_calibration(cache_path, not loras and not files.dit_replaced and not few and dim == 3072)
    return EnginePlan(files, 0, device, te_device, dtype, vae_dtype, resolved, backend, quant, attention_quant,
                      loras, lora_strength, layout, source, VAETiling.of(vae_tile) if vae_tile is not None else None,
                      files.geometry, few.defaults(defaults) if few else defaults, compile, few, cache_path, calibration)


def plan_tiny(seed: int = 0, device: str | torch.device = "cpu", backend: str = "torch",
              layout: ConditioningLayout | None = None, quant: str | None = None, attention_quant: str | None = None,
              dtype: str | torch.dtype = "fp32", lora: str | Path | Sequence[str | Path] | None = None,
              lora_strength: float = 1.0, text_encoder_device: str | torch.device | None = None,
              compile: bool | str = False, names: Mapping[str, str] | None = None) -> EnginePlan:
    """`plan_pretrained` for the tiny preset (random weights from `seed`): the same checks, no folder."""
    dtype, device, te_device, resolved = _check_run(backend, quant, attention_quant, dtype, device,
                                                    text_encoder_device, compile, names)
    cfg = ModelConfig.preset("tiny")
    loras, layout, source = _read_loras(_lora_files(lora), cfg.dit, layout, names)
    cache_path = calibration_path(None, None, [p for p, _ in loras])
    return EnginePlan(None, seed, device, te_device, dtype, torch.float32, resolved, backend, quant, attention_quant,
                      loras, lora_strength, layout, source, None, cfg.geometry, TINY_DEFAULTS, compile, None,
                      cache_path, find_calibration(cache_path, published_applies=False))


class Engine:
    def __init__(self, dit: WanDiT, vae: WanVAE, text_encoder: TextEncoder, *,
                 layout: ConditioningLayout | None = None, defaults: Defaults = _WAN22_DEFAULTS,
                 device: torch.device | str = "cpu", vae_tile: VAETiling | tuple | None = None,
                 cache_size: int = 32, cache_calibration: CacheCalibration | None = None,
                 cache_path: Path | None = None):
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.layout = layout or ConditioningLayout()
        self.defaults = defaults
        self.device = torch.device(device)
        self.vae_tile = VAETiling.of(vae_tile) if vae_tile is not None else None  # spatial decode tiles
        self.reference_cache: LRUCache[str, torch.Tensor] = LRUCache(cache_size)  # latents by content / shape
        self.cache_calibration, self.cache_path = cache_calibration, cache_path  # step-cache curves, their file
        self.reuse_reference_kv = True  # isolated references: K/V once per generation (False: every step, to measure)
        self.null_reference_kv: LRUCache[tuple, object] = LRUCache(4)  # their nulled row, by shape and text

    @property
    def geometry(self) -> TokenGeometry:
        """Video size -> latent -> tokens, from the VAE's compression and the DiT's patch."""
        return TokenGeometry.of(self.dit.cfg, self.vae.cfg)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_plan(cls, plan: EnginePlan, progress: bool = False) -> "Engine":
        """Build the engine a checked `EnginePlan` describes (`progress`: progress bars while loading)."""
        if plan.files is None:  # the tiny preset: random weights
            cfg = ModelConfig.preset("tiny")
            dit = random_dit(cfg.dit, dtype=plan.dtype, device=plan.device, seed=plan.seed, backend=plan.backend,
                             attention_quant=plan.attention_quant)
        else:
            dit = load_dit(plan.files.dit, dtype=plan.dtype, device=plan.device, backend=plan.backend,
                           attention_quant=plan.attention_quant, progress=progress)
        for _, weights in plan.loras:
            merge_lora_(dit, weights, strength=plan.lora_strength)
        dit.fuse_projections()  # q, k, v as one GEMM, the text k, v as another (after the merge: same weights)
        if plan.quant == "fp8":  # after the LoRA merge: quantised weights take no delta
            quantize_dit_fp8_(dit)  # the fused layers: q, k, v share one input quantisation
        compile_dit_(dit, plan.compile)  # last: the compiled blocks read the final modules
        if plan.files is None:
            vae = random_vae(cfg.vae, seed=plan.seed, device=plan.device)
            te = TextEncoder.tiny(seed=plan.seed, dtype=plan.dtype, device=plan.text_encoder_device)
        else:
            vae = load_vae(plan.files.vae, dtype=plan.vae_dtype, device=plan.device, progress=progress)
            te = TextEncoder.from_pretrained(plan.files.text_encoder, dtype=plan.dtype,
                                             device=plan.text_encoder_device, progress=progress)
        return cls(dit, vae, te, layout=plan.layout, defaults=plan.defaults, device=plan.device,
                   vae_tile=plan.vae_tile, cache_calibration=plan.cache_calibration, cache_path=plan.cache_path)

    @classmethod
    def from_pretrained(cls, path: str | Path, lora: str | Path | Sequence[str | Path] | None = None,
                        dtype: str | torch.dtype = "bf16", backend: str = "auto", quant: str | None = None,
                        device: str | torch.device | None = None, text_encoder_device: str | None = None,
                        vae_dtype: str | torch.dtype = "fp32", lora_strength: float = 1.0,
                        layout: ConditioningLayout | None = None,
                        vae_tile: VAETiling | tuple | None = None, attention_quant: str | None = None,
                        compile: bool | str = False, progress: bool = True,
                        dit: str | Path | None = None) -> "Engine":
        """Load Wan2.2-TI2V-5B (or a smaller model of the same family) from a folder in the diffusers layout
        (`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`) or the original layout (DiT shards + index +
        config.json, `Wan2.2_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/`).

        `lora`: one or more LoRA files (ComfyUI keys) merged into the DiT at load; the conditioning layout
        in their metadata is used unless `layout` is given. `backend`: "auto" (on CUDA each op's fastest correct
        implementation, measured at its first use: kernels/select.py; torch elsewhere), "torch" or
        "triton". `text_encoder_device="cpu"` keeps the 11 GB encoder off the GPU. `quant="fp8"`
        quantises the DiT blocks' linear layers to E4M3 (after the LoRA merge; needs sm89+);
        `attention_quant="int8"` / `"int8-fp8"` selects 8-bit attention on its own (kernels/attention_8bit.py).
        `compile=True` compiles the DiT's block (one graph reused by every block, static shapes: a request
        compiles at its first step); `compile="cudagraphs"` also replays each step from a CUDA graph (CUDA
        only; anyid_rt/compiled.py). The DiT always runs q, k, v (and the text k, v) as one GEMM each.
        Everything is checked before any weight is read (`plan_pretrained`); `progress` shows loading bars.
        `dit` replaces the folder's DiT weights (a file or folder: e.g. Wan2.2-TI2V-5B-Turbo's model.pt over the
        base folder). A few-step distilled model (FastWan2.2-TI2V-5B, Turbo, or a folder with an
        anyid_sampling.json: anyid_rt/few_step.py) makes `sampler="dmd"` with its step list and guidance 1 the
        defaults.
        """
        return cls.from_plan(plan_pretrained(path, lora=lora, dtype=dtype, backend=backend, quant=quant, device=device,
                                             text_encoder_device=text_encoder_device, vae_dtype=vae_dtype,
                                             lora_strength=lora_strength, layout=layout, vae_tile=vae_tile,
                                             attention_quant=attention_quant, compile=compile, dit=dit),
                             progress=progress)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", backend: str = "torch",
             layout: ConditioningLayout | None = None, quant: str | None = None,
             attention_quant: str | None = None, dtype: str | torch.dtype = "fp32",
             lora: str | Path | Sequence[str | Path] | None = None, lora_strength: float = 1.0,
             text_encoder_device: str | torch.device | None = None, compile: bool | str = False) -> "Engine":
        """The same classes at tiny widths with random weights: runs end to end on a CPU in seconds. Its output
        is noise: the weights are random. `dtype` is that of the DiT's large layers and the text encoder (fp32
        by default); `lora` merges LoRA files trained on this preset (`anyid-rt train` with preset "tiny");
        `compile` as in `from_pretrained`."""
        return cls.from_plan(plan_tiny(seed=seed, device=device, backend=backend, layout=layout, quant=quant,
                                       attention_quant=attention_quant, dtype=dtype, lora=lora,
                                       lora_strength=lora_strength, text_encoder_device=text_encoder_device,
                                       compile=compile))

    def save_pretrained(self, folder: str | Path, layout: str = "original") -> Path:
        """Write the engine's weights as a model folder in the original Wan layout (DiT in 2 shards with an
        index, `Wan2.2_VAE.pth`, the umT5 .pth and its tokenizer) that `from_pretrained` reads back."""
        if layout != "original":
            raise ValueError("save_pretrained writes the original layout; build diffusers folders with diffusers")
        folder = Path(folder)
        save_dit(self.dit, folder, layout="original", shards=2)
        save_vae_original(self.vae, folder / "Wan2.2_VAE.pth")
        self.text_encoder.save_original(folder)
        return folder

    # -- the work done once ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """VAE latent of [3, T, H, W] pixels in [-1, 1], cached by content (or by `key`):
        [1, 48, 1 + (T-1)/4, H/16, W/16]."""
        key = key or PreparedReference(pixels, "").content_key()
        latent = self.reference_cache.get(key)
        if latent is None:
            latent = self.vae.encode(pixels[None].to(self.device, self.vae.dtype)).float()
            self.reference_cache.put(key, latent)
        return latent

    def null_latent(self, shape: torch.Size) -> torch.Tensor:
        """The null reference of a shape: the latent of black pixels (cached, by shape)."""
        return self.encode_pixels(torch.full(tuple(shape), -1.0), key=f"null:{tuple(shape)}")

    # -- generation -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompt: str | None = None, references: Sequence[Any] | None = None, primary: int = 0,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 steps: int | None = None, guidance: float | None = None, shift: float | None = None,
                 sampler: str | None = None, seed: int = 0, negative_prompt: str | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output: str | Path | None = None,
                 image: Any = None, progress: bool = True, timesteps: Sequence[float] | None = None,
                 cache: str | None = None, cache_threshold: float | None = None) -> Video:
        """Generate a video. With no references it is Wan2.2 text-to-video; with `image=` image-to-video
        (latent frame 0 pinned to the image); with `references` AnyID generation around references[primary].

        None means the engine's default (`engine.defaults`: 1280x704, 121 frames, 50 UniPC steps, guidance
        5, shift 5 for the 5B). `latents` is the initial noise [48, F, H/16, W/16] (else drawn on the CPU from
        `seed`). The unconditional pass uses the empty prompt unless `negative_prompt` is given. Every setting
        and every input file is checked, and every reference read, before the first step. `sampler="dmd"` runs a
        few-step model's `timesteps` list (its own by default), re-noising from the same seeded CPU generator.
        `cache="magcache" | "teacache"` skips the block stack on steps whose change is predicted small
        (`cache_threshold`: the published one by default, 0 never skips); `video.stats` counts the DiT forwards.
        """
        request = GenerationRequest(prompt=prompt, references=references, primary=primary, image=image,
                                    negative_prompt=negative_prompt, height=height, width=width,
                                    num_frames=num_frames, steps=steps, guidance=guidance, shift=shift,
                                    sampler=sampler, seed=seed, output=output, latents=latents,
                                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                    timesteps=timesteps, cache=cache, cache_threshold=cache_threshold)
        return self.run(request, progress=progress)

    def check(self, request: GenerationRequest, names: Mapping[str, str] | None = None) -> GenerationRequest:
        """`request` with this engine's defaults filled in, checked against its models (a RequestError naming
        the setting as `names` spells it otherwise)."""
        return request.check(self.geometry, self.defaults, names, max_references=self.layout.max_references)

    def calibrate_cache(self, requests: Sequence[GenerationRequest], save: bool = True) -> CacheCalibration:
        """Measure this model's step-cache curves on a few requests (anyid_rt/step_cache.py `calibrate`) and use
        them from now on; `save` writes them where they are read automatically (`self.cache_path`)."""
        self.cache_calibration = calibrate(self, requests)
        if save and self.cache_path is not None:
            self.cache_calibration.save(self.cache_path)
        return self.cache_calibration

    @torch.inference_mode()
    def run(self, request: GenerationRequest, progress: bool = True,
            names: Mapping[str, str] | None = None, cache_record=None) -> Video:
        """`generate` with its arguments as one `GenerationRequest`; `names` spells the settings in errors (the
        CLI passes its flag names). `progress` shows progress bars for each stage. `cache_record`: the step
        cache's recording hook while calibrating."""
        r = self.check(request, names)
        if r.cache is not None and self.cache_calibration is None and cache_record is None:  # before any compute
            step_cache_for(r, None, self.cache_path, 1, 0, False)
        geometry = self.geometry
        for name in ("prompt", "negative_prompt"):  # given embeddings must fit the DiT
            self._check_embeds(getattr(r, f"{name}_embeds"), name)
        # every input is read and checked before any compute: bad media fails without partial output
        refs = self._prepare_references(r.references, r.primary, r.height, r.width, progress)
        image_pixels = self._prepare_image(r.image, r.height, r.width, r.num_frames)
        latent_shape = geometry.latent_shape(r.num_frames, r.height, r.width)  # (F, H/16, W/16)
        generator = torch.Generator().manual_seed(r.seed)  # the initial noise, then sampler dmd's re-noising
        noise = _initial_noise(r.latents, generator, (self.dit.cfg.in_dim, *latent_shape))
        use_cfg = r.guidance != 1.0
        guidance = r.guidance
        timings: dict[str, float] = {}
        clock = _Clock(self.device, timings)

        with clock("text_encode"):
            cond = self._embed(r.prompt, r.prompt_embeds, "prompt")
            contexts = [cond]
            if use_cfg:
                contexts.append(self._embed(r.negative_prompt or "", r.negative_prompt_embeds, "negative_prompt"))
            text_kv = self.dit.prepare_text([c.to(self.device) for c in contexts])
        with clock("reference_encode"):
            ref_latents = []  # each [1 or 2, 48, f_i, h, w]
            for ref in tqdm(refs, desc="encoding references", unit="ref", disable=not (progress and refs)):
                z = self.encode_pixels(ref.pixels)
                if use_cfg:  # batch row 1 is the aggregated unconditional pass: every reference nulled
                    z = torch.cat([z, self.null_latent(ref.pixels.shape)])
                ref_latents.append(z)
            image_latent = self.encode_pixels(image_pixels) if image_pixels is not None else None

        layout = StepLayout.build(self.layout, geometry, latent_shape, [z.shape[2] for z in ref_latents],
                                  image_mode=image_latent is not None)
        schedule = make_sampler(r.sampler, r.steps, r.shift, device=self.device, timesteps=r.timesteps,
                                generator=generator)
        cache = step_cache_for(r, self.cache_calibration, self.cache_path, 2 if use_cfg else 1,
                               int(layout.target_clean_tokens > 0), image_latent is not None, cache_record)
        with clock("denoise"):
            x, stats = denoise(self.dit, noise.to(self.device)[None], ref_latents, layout, text_kv, schedule, guidance,
                               image_latent, progress, cache, self.layout.reference_attention == "isolated",
                               self.reuse_reference_kv, self.null_reference_kv)  # x: [1, 48, F, h, w] fp32
        with clock("vae_decode"):
            # [1, 3, T, H, W] in [-1, 1]
            pixels = self.vae.decode(x.to(self.vae.dtype), tile=self.vae_tile, progress=progress)
            frames = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
            frames = frames.permute(1, 2, 3, 0).contiguous().cpu()  # [T, H, W, 3]
        timings["total"] = sum(timings.values())
        video = Video(frames, x[0].float().cpu(), self.defaults.fps, timings, stats.as_dict())
        if r.output is not None:
            video.save(r.output)
        return video

    def _check_embeds(self, embeds: torch.Tensor | None, name: str) -> None:
        dim = self.dit.cfg.text_dim
        if embeds is None:
            return
        shape = tuple(getattr(embeds, "shape", ()))
        if not isinstance(embeds, torch.Tensor) or len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != 1) \
                or shape[-1] != dim:
            raise ValueError(f"{name}_embeds must be [1, L, {dim}] (the text encoder's trimmed output), got "
                             f"{shape if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")

    def _embed(self, text: str | None, embeds: torch.Tensor | None, name: str) -> torch.Tensor:
        if embeds is not None:
            return embeds[0] if embeds.ndim == 3 else embeds
        return self.text_encoder.encode(text, device=self.device)[0]

    def _prepare_references(self, references, primary, height, width, progress: bool = False
                            ) -> list[PreparedReference]:
        """Read, fit and pad every reference (checked by `GenerationRequest.check`) under the layout's reference
        policy, primary first, then the auxiliaries in the layout's order (`ConditioningLayout.reference_order`,
        the rule the trainer follows)."""
        if references is None:
            return []
        n = len(references)
        order = [primary] + [i for i in range(n) if i != primary]  # the primary reference comes first
        prepared = [prepare_reference(references[i], height, width, self.layout, i)
                    for i in tqdm(order, desc="reading references", unit="ref", disable=not progress)]
        prepared = [prepared[k] for k in self.layout.reference_order([p.num_frames for p in prepared])]
        total = sum(self.geometry.latent_frames(p.num_frames) for p in prepared)
        if total > self.dit.cfg.rope_max_positions - 64:
            raise ValueError(f"references add {total} latent frames; too many for the RoPE range")
        return prepared

    def _prepare_image(self, image, height, width, num_frames) -> torch.Tensor | None:
        if image is None:
            return None
        frames = media.load_media(image)
        if frames.shape[0] != 1:
            raise ValueError(f"image= takes one image, got {frames.shape[0]} frames; use references= for clips")
        # resize by the larger scale and centre-crop to H x W, as the official i2v preprocessing
        return frame_ops.to_model_range(media.crop_center_to(frames, width, height))  # [3, 1, H, W] in [-1, 1]


class _Clock:
    """Times stages into a dict, synchronising CUDA so that the numbers are real."""

    def __init__(self, device: torch.device, timings: dict[str, float]):
        self.device, self.timings = device, timings

    def __call__(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                clock._sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock._sync()
                clock.timings[name] = clock.timings.get(name, 0.0) + time.perf_counter() - self.t0

        return _Stage()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _initial_noise(latents: torch.Tensor | None, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must be the initial noise of shape {list(shape)} "
                             f"[48, 1 + (frames-1)/4, H/16, W/16], got {list(latents.shape)}")
        return latents.float()
    # drawn on the CPU so that a seed gives the same video on every device
    return torch.randn(shape, generator=generator)


__all__ = ["Engine", "Video", "Defaults", "TINY_DEFAULTS", "EnginePlan", "plan_pretrained", "plan_tiny",
           "check_device", "probe_request_media", "GenerationRequest", "QUANT_MODES"]
