"""The generation engine: text-to-video, image-to-video and AnyID omni-reference generation.

One `Engine` holds the DiT, the VAE and the text encoder, with the work that is done once kept out of the
step loop: prompt embeddings (cached per prompt), the text K/V of every block (once per generation),
reference latents (cached by content), null-reference latents (cached by shape) and RoPE tables (cached per
layout). Guidance runs the conditional pass and the single aggregated unconditional pass (every reference
nulled and the empty prompt together, AnyID eq. 7) as one batch of 2.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from . import media
from .cache import LRUCache
from .conditioning import LAYOUT_METADATA_KEY, ConditioningLayout, PreparedReference, StepLayout, prepare_reference
from .config import ModelConfig, TokenGeometry, parse_dtype
from .kernels import resolve_backend
from .lora import merge_lora_, read_lora
from .models.checkpoint import CheckpointError
from .models.dit import WanDiT
from .models.dit_loader import load_dit, save_dit
from .models.random_weights import random_dit, random_vae
from .models.text_encoder import TextEncoder
from .models.vae import VAETiling, WanVAE
from .models.vae_loader import load_vae, save_vae_original
from .quant import check_fp8_device, quantize_dit_fp8_
from .sampling import SAMPLERS, make_sampler

QUANT_MODES = (None, "fp8")  # fp8: E4M3 linear layers in the DiT blocks (anyid_rt.quant)


@dataclass
class Video:
    """A generated video: frames uint8 [T, H, W, 3], the final target latent [48, F, H/16, W/16] (fp32,
    normalised), its fps and the time of each stage in seconds."""

    frames: torch.Tensor
    latents: torch.Tensor
    fps: int
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write an H.264 mp4 at the video's fps."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        media.write_mp4(self.frames, path, self.fps)
        return path


@dataclass(frozen=True)
class Defaults:
    """Generation defaults of a preset (the 5B's are the official TI2V-5B / AnyID settings)."""

    height: int = 704
    width: int = 1280
    num_frames: int = 121
    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    sampler: str = "unipc"
    fps: int = 24


TINY_DEFAULTS = Defaults(height=64, width=64, num_frames=9, steps=6)


class Engine:
    def __init__(self, dit: WanDiT, vae: WanVAE, text_encoder: TextEncoder, *,
                 layout: ConditioningLayout | None = None, defaults: Defaults = Defaults(),
                 device: torch.device | str = "cpu", vae_tile: VAETiling | tuple | None = None,
                 cache_size: int = 32):
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.layout = layout or ConditioningLayout()
        self.defaults = defaults
        self.device = torch.device(device)
        self.vae_tile = VAETiling.of(vae_tile) if vae_tile is not None else None  # spatial decode tiles
        self.reference_cache: LRUCache[str, torch.Tensor] = LRUCache(cache_size)  # latents by content / shape

    @property
    def geometry(self) -> TokenGeometry:
        """Video size -> latent -> tokens, from the VAE's compression and the DiT's patch."""
        return TokenGeometry.of(self.dit.cfg, self.vae.cfg)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, lora: str | Path | Sequence[str | Path] | None = None,
                        dtype: str | torch.dtype = "bf16", backend: str = "auto", quant: str | None = None,
                        device: str | torch.device | None = None, text_encoder_device: str | None = None,
                        vae_dtype: str | torch.dtype = "fp32", lora_strength: float = 1.0,
                        layout: ConditioningLayout | None = None,
                        vae_tile: VAETiling | tuple | None = None, attention_quant: str | None = None) -> "Engine":
        """Load Wan2.2-TI2V-5B (or a smaller model of the same family) from a folder in the diffusers layout
        (`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`) or the original layout (DiT shards + index +
        config.json, `Wan2.2_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`, `google/umt5-xxl/`).

        `lora`: one or more LoRA files (ComfyUI keys) merged into the DiT at load; the conditioning layout
        in their metadata is used unless `layout` is given. `backend`: "auto" (Triton on CUDA), "torch" or
        "triton". `text_encoder_device="cpu"` keeps the 11 GB encoder off the GPU. `quant="fp8"`
        quantises the DiT blocks' linear layers to E4M3 (after the LoRA merge; needs sm89+);
        `attention_quant="int8"` / `"int8-fp8"` selects 8-bit attention on its own (kernels/attention_8bit.py).
        """
        if quant not in QUANT_MODES:
            raise ValueError(f"quant={quant!r} is not one of {QUANT_MODES}")
        dtype, vae_dtype = parse_dtype(dtype, "dtype"), parse_dtype(vae_dtype, "vae_dtype")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder not found: {path}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backend = resolve_backend(backend, device)
        if (path / "transformer").is_dir():  # diffusers layout
            vae_path, te_path = path / "vae", path
        elif (path / "Wan2.2_VAE.pth").exists():  # original layout
            vae_path, te_path = path / "Wan2.2_VAE.pth", path
        else:
            raise FileNotFoundError(f"{path} is neither a diffusers pipeline folder (transformer/, vae/, "
                                    "text_encoder/, tokenizer/) nor an original Wan2.2 folder (Wan2.2_VAE.pth, "
                                    "models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, DiT shards)")
        dit = load_dit(path, dtype=dtype, device=device, backend=backend, attention_quant=attention_quant)
        lora_layout = None
        for f in ([lora] if isinstance(lora, (str, Path)) else list(lora or [])):
            weights = read_lora(f)
            merge_lora_(dit, weights, strength=lora_strength)
            if LAYOUT_METADATA_KEY in weights.metadata:
                found = ConditioningLayout.from_json(weights.metadata[LAYOUT_METADATA_KEY])
                if lora_layout is not None and found != lora_layout:
                    raise CheckpointError(f"LoRA {f} was trained with layout {found}, another LoRA with "
                                          f"{lora_layout}; merge LoRAs trained with the same layout")
                lora_layout = found
        if quant == "fp8":  # after the LoRA merge: quantised weights take no delta
            check_fp8_device(device)
            quantize_dit_fp8_(dit)
        vae = load_vae(vae_path, dtype=vae_dtype, device=device)
        te = TextEncoder.from_pretrained(te_path, dtype=dtype, device=text_encoder_device or device)
        defaults = Defaults() if dit.cfg.dim >= 1024 else TINY_DEFAULTS
        return cls(dit, vae, te, layout=layout or lora_layout, defaults=defaults, device=device, vae_tile=vae_tile)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", backend: str = "torch",
             layout: ConditioningLayout | None = None, quant: str | None = None,
             attention_quant: str | None = None) -> "Engine":
        """The same classes at tiny widths with random weights (fp32): runs end to end on a CPU in seconds.
        Its output is noise: the weights are random."""
        cfg = ModelConfig.preset("tiny")
        device = torch.device(device)
        dit = random_dit(cfg.dit, device=device, seed=seed, backend=resolve_backend(backend, device),
                         attention_quant=attention_quant)
        if quant not in QUANT_MODES:
            raise ValueError(f"quant={quant!r} is not one of {QUANT_MODES}")
        if quant == "fp8":
            check_fp8_device(device)
            quantize_dit_fp8_(dit)
        vae = random_vae(cfg.vae, seed=seed, device=device)
        te = TextEncoder.tiny(seed=seed, device=device)
        return cls(dit, vae, te, layout=layout, defaults=TINY_DEFAULTS, device=device)

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
                 image: Any = None, progress: bool = True) -> Video:
        """Generate a video. With no references it is Wan2.2 text-to-video; with `image=` image-to-video
        (latent frame 0 pinned to the image); with `references` AnyID generation around references[primary].

        None means the engine's default (`engine.defaults`: 1280x704, 121 frames, 50 UniPC steps, guidance
        5, shift 5 for the 5B). `latents` is the initial noise [48, F, H/16, W/16] (else drawn on the CPU from
        `seed`). The unconditional pass uses the empty prompt unless `negative_prompt` is given.
        """
        d = self.defaults
        pick = lambda value, default: default if value is None else value  # noqa: E731
        height, width, num_frames = pick(height, d.height), pick(width, d.width), pick(num_frames, d.num_frames)
        steps, guidance, shift = pick(steps, d.steps), pick(guidance, d.guidance), pick(shift, d.shift)
        sampler = pick(sampler, d.sampler)
        geometry = self.geometry
        _check_request(geometry, prompt, prompt_embeds, negative_prompt, height, width, num_frames, steps, guidance,
                       shift, sampler, seed, output)
        # every input is read and checked before any compute: bad media fails without partial output
        refs = self._prepare_references(references, primary, height, width)
        image_pixels = self._prepare_image(image, height, width, num_frames)
        latent_shape = geometry.latent_shape(num_frames, height, width)  # (F, H/16, W/16)
        noise = _initial_noise(latents, seed, (self.dit.cfg.in_dim, *latent_shape))
        use_cfg = guidance != 1.0
        timings: dict[str, float] = {}
        clock = _Clock(self.device, timings)

        with clock("text_encode"):
            cond = self._embed(prompt, prompt_embeds, "prompt")
            contexts = [cond]
            if use_cfg:
                contexts.append(self._embed(negative_prompt or "", negative_prompt_embeds, "negative_prompt"))
            text_kv = self.dit.prepare_text([c.to(self.device) for c in contexts])
        with clock("reference_encode"):
            ref_latents = [self.encode_pixels(r.pixels) for r in refs]  # each [1, 48, f_i, h, w]
            if use_cfg:  # batch row 1 is the aggregated unconditional pass: every reference nulled
                ref_latents = [torch.cat([z, self.null_latent(r.pixels.shape)]) for z, r in zip(ref_latents, refs)]
            image_latent = self.encode_pixels(image_pixels) if image_pixels is not None else None

        layout = StepLayout.build(self.layout, geometry, latent_shape, [z.shape[2] for z in ref_latents],
                                  image_mode=image_latent is not None)
        schedule = make_sampler(sampler, steps, shift, device=self.device)
        batch = 2 if use_cfg else 1
        x = noise.to(self.device)[None]  # [1, 48, F, h, w] fp32
        if image_latent is not None:
            x[:, :, :1] = image_latent
        with clock("denoise"):
            for i, t in enumerate(tqdm(schedule.timesteps, desc="denoising", disable=not progress)):
                segments = layout.segments(float(t), batch, self.device)
                v = self.dit.forward_groups([x.expand(batch, -1, -1, -1, -1), *ref_latents], layout.frame_starts,
                                            segments, text_kv)  # [batch, 48, F, h, w] fp32
                if use_cfg:
                    v = v[1:] + guidance * (v[:1] - v[1:])
                x = schedule.step(v, i, x)
                if image_latent is not None:  # re-pin the clean first frame, as the official i2v loop
                    x[:, :, :1] = image_latent
        with clock("vae_decode"):
            pixels = self.vae.decode(x.to(self.vae.dtype), tile=self.vae_tile)  # [1, 3, T, H, W] in [-1, 1]
            frames = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
            frames = frames.permute(1, 2, 3, 0).contiguous().cpu()  # [T, H, W, 3]
        timings["total"] = sum(timings.values())
        video = Video(frames, x[0].float().cpu(), d.fps, timings)
        if output is not None:
            video.save(output)
        return video

    def _embed(self, text: str | None, embeds: torch.Tensor | None, name: str) -> torch.Tensor:
        dim = self.dit.cfg.text_dim
        if embeds is not None:
            e = embeds[0] if embeds.ndim == 3 else embeds
            if embeds.ndim not in (2, 3) or (embeds.ndim == 3 and embeds.shape[0] != 1) or e.shape[-1] != dim:
                raise ValueError(f"{name}_embeds must be [1, L, {dim}] (the text encoder's trimmed output), "
                                 f"got {tuple(embeds.shape)}")
            return e
        return self.text_encoder.encode(text, device=self.device)[0]

    def _prepare_references(self, references, primary, height, width) -> list[PreparedReference]:
        if references is None:
            return []
        if isinstance(references, (str, Path)) or not isinstance(references, Sequence):
            raise TypeError("references must be a list (paths, PIL images, arrays or tensors); "
                            f"got {type(references).__name__}")
        n, cap = len(references), self.layout.max_references
        if n == 0:
            raise ValueError("references is an empty list; pass references=None for text-to-video")
        if n > cap:
            raise ValueError(f"{n} references given; this layout takes at most {cap} (ConditioningLayout."
                             "max_references). Drop some references or raise the cap")
        if not isinstance(primary, int) or not 0 <= primary < n:
            raise ValueError(f"primary={primary!r} is out of range for {n} references (0..{n - 1})")
        order = [primary] + [i for i in range(n) if i != primary]  # the primary reference comes first
        prepared = [prepare_reference(references[i], height, width, self.layout, i) for i in order]
        total = sum(self.geometry.latent_frames(p.num_frames) for p in prepared)
        if total > self.dit.cfg.rope_max_positions - 64:
            raise ValueError(f"references add {total} latent frames; too many for the RoPE range")
        return prepared

    def _prepare_image(self, image, height, width, num_frames) -> torch.Tensor | None:
        if image is None:
            return None
        if num_frames < 5:
            raise ValueError("image-to-video needs num_frames >= 5: frame 0 is the image")
        frames = media.load_media(image)
        if frames.shape[0] != 1:
            raise ValueError(f"image= takes one image, got {frames.shape[0]} frames; use references= for clips")
        # resize by the larger scale and centre-crop to H x W, as the official i2v preprocessing
        return media.to_model_range(media.crop_center_to(frames, width, height))  # [3, 1, H, W] in [-1, 1]


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


def _check_request(geometry: TokenGeometry, prompt, prompt_embeds, negative_prompt, height, width, num_frames, steps,
                   guidance, shift, sampler, seed, output) -> None:
    if prompt_embeds is None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str (or pass prompt_embeds=), got {type(prompt).__name__}")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a str or None, got {type(negative_prompt).__name__}")
    geometry.check(height, width, num_frames)  # H, W multiples of 32 and 4n+1 frames for Wan2.2
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 1:
        raise ValueError(f"guidance={guidance!r} must be >= 1 (1 disables guidance and its second pass)")
    if not isinstance(shift, (int, float)) or shift <= 0:
        raise ValueError(f"shift={shift!r} must be > 0")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if output is not None and Path(output).suffix.lower() != ".mp4":
        raise ValueError(f"output={output!r} must end in .mp4")


def _initial_noise(latents: torch.Tensor | None, seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    if latents is not None:
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must be the initial noise of shape {list(shape)} "
                             f"[48, 1 + (frames-1)/4, H/16, W/16], got {list(latents.shape)}")
        return latents.float()
    # drawn on the CPU so that a seed gives the same video on every device
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


__all__ = ["Engine", "Video", "Defaults", "TINY_DEFAULTS"]
