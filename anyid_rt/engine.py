"""The generation engine: text-to-video, image-to-video and AnyID omni-reference generation.

One `Engine` holds the DiT, the VAE and the text encoder, with the work that is done once kept out of the
step loop: prompt embeddings (cached per prompt), the text K/V of every block (once per generation),
reference latents (cached by content), null-reference latents (cached by shape) and RoPE tables (cached per
layout). Guidance runs the conditional pass and the single aggregated unconditional pass (every reference
nulled and the empty prompt together, AnyID eq. 7) as one batch of 2.

Nothing is loaded before the whole request is checked: `plan_pretrained` / `plan_tiny` (anyid_rt/plan.py)
resolve and check the construction into an `EnginePlan`, which `Engine.from_plan` then builds; `generate`
checks its `GenerationRequest` (anyid_rt/request.py) and reads every reference before the first step. The CLI
runs the same checks, and prints `EnginePlan.summary()` before loading.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from . import frame_ops, media, parallel as par
from .denoise import denoise
from .cache import LRUCache
from .compiled import compile_dit_
from .conditioning import ConditioningLayout, PreparedReference, StepLayout, prepare_reference
from .config import ModelConfig, ParallelConfig, TokenGeometry
from .lora import merge_lora_
from .models.dit import WanDiT
from .models.dit_loader import load_dit, save_dit
from .models.random_weights import random_dit, random_vae
from .models.text_encoder import TextEncoder
from .models.vae import WanVAE
from .models.vae_tiling import VAETiling
from .models.vae_loader import load_vae, save_vae_original
from .quant import quantize_dit_fp8_
from .files import atomic_path
from .request import (TINY_DEFAULTS, Defaults, GenerationRequest, RequestError,
                      show)
from .plan import EnginePlan, plan_pretrained, plan_tiny, probe_request_media
from .sampling import make_sampler
from .step_cache import CacheCalibration, calibrate, step_cache_for

_WAN22_DEFAULTS = Defaults()  # the 5B's (frozen: safe as an argument default)


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

class Engine:
    def __init__(self, dit: WanDiT, vae: WanVAE, text_encoder: TextEncoder, *,
                 layout: ConditioningLayout | None = None, defaults: Defaults = _WAN22_DEFAULTS,
                 device: torch.device | str = "cpu", vae_tile: VAETiling | tuple | None = None,
                 cache_size: int = 32, cache_calibration: CacheCalibration | None = None,
                 cache_path: Path | None = None, parallel: par.ParallelContext | None = None):
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.layout = layout or ConditioningLayout()
        self.defaults = defaults
        self.device = torch.device(device)
        self.vae_tile = VAETiling.of(vae_tile) if vae_tile is not None else None  # spatial decode tiles
        self.reference_cache: LRUCache[str, torch.Tensor] = LRUCache(cache_size)  # latents by content / shape
        self.cache_calibration, self.cache_path = cache_calibration, cache_path  # step-cache curves, their file
        self.reuse_reference_kv = True  # isolated references: K/V once per generation (False: every step, to measure)
        self.null_reference_kv: LRUCache[tuple, object] = LRUCache(4)  # their nulled row, by shape and text
        # this rank's share of a parallel generation (anyid_rt/parallel.py); None: one process
        self.parallel = par.ParallelDiT(dit, parallel) if parallel is not None else None

    @property
    def geometry(self) -> TokenGeometry:
        """Video size -> latent -> tokens, from the VAE's compression and the DiT's patch."""
        return TokenGeometry.of(self.dit.cfg, self.vae.cfg)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_plan(cls, plan: EnginePlan, progress: bool = False) -> "Engine":
        """Build the engine a checked `EnginePlan` describes (`progress`: progress bars while loading)."""
        # a parallel job's ranks meet before any weight is read (a missing rank fails here, not after the load)
        ctx = par.ParallelContext.join(plan.parallel, plan.device) if plan.parallel is not None else None
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
                   vae_tile=plan.vae_tile, cache_calibration=plan.cache_calibration, cache_path=plan.cache_path,
                   parallel=ctx)

    @classmethod
    def from_pretrained(cls, path: str | Path, lora: str | Path | Sequence[str | Path] | None = None,
                        dtype: str | torch.dtype = "bf16", backend: str = "auto", quant: str | None = None,
                        device: str | torch.device | None = None, text_encoder_device: str | None = None,
                        vae_dtype: str | torch.dtype = "fp32", lora_strength: float = 1.0,
                        layout: ConditioningLayout | None = None,
                        vae_tile: VAETiling | tuple | None = None, attention_quant: str | None = None,
                        compile: bool | str = False, parallel: ParallelConfig | None = None,
                        progress: bool = True, dit: str | Path | None = None) -> "Engine":
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
        `parallel=ParallelConfig(sequence=S, cfg=True)` spreads each generation over the processes of a torchrun
        job (anyid_rt/parallel.py, docs/distributed.md); every rank calls `generate` with the same request.
        Everything is checked before any weight is read (`plan_pretrained`); `progress` shows loading bars.
        `dit` replaces the folder's DiT weights (a file or folder: e.g. Wan2.2-TI2V-5B-Turbo's model.pt over the
        base folder). A few-step distilled model (FastWan2.2-TI2V-5B, Turbo, or a folder with an
        anyid_sampling.json: anyid_rt/few_step.py) makes `sampler="dmd"` with its step list and guidance 1 the
        defaults.
        """
        return cls.from_plan(plan_pretrained(path, lora=lora, dtype=dtype, backend=backend, quant=quant, device=device,
                                             text_encoder_device=text_encoder_device, vae_dtype=vae_dtype,
                                             lora_strength=lora_strength, layout=layout, vae_tile=vae_tile,
                                             attention_quant=attention_quant, compile=compile, parallel=parallel,
                                             dit=dit),
                             progress=progress)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", backend: str = "torch",
             layout: ConditioningLayout | None = None, quant: str | None = None,
             attention_quant: str | None = None, dtype: str | torch.dtype = "fp32",
             lora: str | Path | Sequence[str | Path] | None = None, lora_strength: float = 1.0,
             text_encoder_device: str | torch.device | None = None, compile: bool | str = False,
             vae_tile: VAETiling | tuple | None = None, parallel: ParallelConfig | None = None) -> "Engine":
        """The same classes at tiny widths with random weights: runs end to end on a CPU in seconds. Its output
        is noise: the weights are random. `dtype` is that of the DiT's large layers and the text encoder (fp32
        by default); `lora` merges LoRA files trained on this preset (`anyid-rt train` with preset "tiny");
        `compile`, `vae_tile` and `parallel` as in `from_pretrained`."""
        return cls.from_plan(plan_tiny(seed=seed, device=device, backend=backend, layout=layout, quant=quant,
                                       attention_quant=attention_quant, dtype=dtype, lora=lora,
                                       lora_strength=lora_strength, text_encoder_device=text_encoder_device,
                                       compile=compile, vae_tile=vae_tile, parallel=parallel))

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
        if self.parallel is not None and request.cache is not None:  # the same on every rank: all fail alike
            raise RequestError(f"{show(names, 'cache')} does not combine with parallel generation yet (the step cache "
                               "has no collectives); drop one of them", "cache")
        # parallel: every rank checks the request and probes its files; a failure on one fails all, with its message
        r = self.check(request, names) if self.parallel is None else self.parallel.check(
            lambda: self.check(request, names), lambda r: probe_request_media(r, names), names)
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
                               self.reuse_reference_kv, self.null_reference_kv,
                               None if self.parallel is None else self.parallel.forward_groups)  # x: [1, 48, F, h, w]
        with clock("vae_decode"):
            # [1, 3, T, H, W] in [-1, 1]
            decode = self.vae.decode if self.parallel is None else self.parallel.decoder(self.vae)
            pixels = decode(x.to(self.vae.dtype), tile=self.vae_tile, progress=progress)
            frames = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
            frames = frames.permute(1, 2, 3, 0).contiguous().cpu()  # [T, H, W, 3]
        timings["total"] = sum(timings.values())
        video = Video(frames, x[0].float().cpu(), self.defaults.fps, timings, stats.as_dict())
        if r.output is not None and (self.parallel is None or self.parallel.ctx.is_main):  # rank 0 writes it
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


__all__ = ["Engine", "Video", "Defaults", "TINY_DEFAULTS", "GenerationRequest"]
