"""The VAE decoder as two streaming graphs whose feature cache is explicit inputs and outputs.

`WanVAE.decode` streams one latent frame at a time and carries a `FeatureCache` between frames (the last 2
input frames of every causal 3x3x3 conv, and the temporal upsamplers' state). The first latent frame runs
differently from the others (no temporal upsampling, 1 output frame instead of 4, the "Rep" marker), so the
decoder exports as two graphs:

    vae_decode_first:  latent [B, 48, 1, h, w]                -> frames [B, 3, 1, 16h, 16w], cache_out_0..K-1
    vae_decode_step:   latent [B, 48, 1, h, w], cache_0..K-1  -> frames [B, 3, 4, 16h, 16w], cache_out_0..K-1

Every cache tensor is [B, C_k, 2, h * s_k, w * s_k] (s_k = 1, 2, 4 or 8 by decoder stage), so the step graph
has fixed ranks and dynamic B, h, w. The first graph's state is normalised to that form, which changes no
result: a 1-frame cache gets a zero frame in front (the conv would have zero-padded there) and the "Rep"
marker becomes two zero frames (the second chunk's time conv zero-pads exactly there). Latent
de-normalisation (x * std + mean), `conv2`, the pixel unpatchify and the clamp to [-1, 1] are inside the
graphs: a decode is `first(z[:, :, :1])` then `step(z[:, :, i:i+1], cache)` for every later frame, and the
frames concatenate along time (`decode_streaming`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..models.vae import REP, FeatureCache, Resample, WanVAE, unpatchify
from .onnx_dit import OPSET, save_program


def _denormalise(vae: WanVAE, latent: torch.Tensor) -> torch.Tensor:
    mean, std = vae._latent_stats()
    return vae.conv2((latent.float() * std + mean).to(vae.dtype))       # [B, z, 1, h, w]


def _pixels(vae: WanVAE, y: torch.Tensor) -> torch.Tensor:
    return unpatchify(y, vae.cfg.patch_size).float().clamp(-1.0, 1.0)   # [B, 3, 1|4, H, W]


class VAEDecodeFirst(nn.Module):
    """First latent frame -> (frames [B, 3, 1, H, W], *cache) with every cache entry [B, C, 2, h', w']."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae
        # the temporal upsamplers' slots: their state after the first chunk is "Rep" (no tensor); the step
        # graph takes zeros of the shape of their input instead, captured by a pre-hook during forward
        self._rep_modules = [m for m in vae.decoder.modules() if isinstance(m, Resample) and m.mode == "upsample3d"]

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vae = self.vae
        rep_inputs: dict[int, torch.Tensor] = {}

        def grab(mod, args):  # returns None: the inputs pass through unchanged
            rep_inputs.setdefault(mod.slot, args[0])

        hooks = [m.register_forward_pre_hook(grab) for m in self._rep_modules]
        try:
            cache = FeatureCache(vae.decoder_slots)
            y = vae.decoder(_denormalise(vae, latent), cache, first_chunk=True)
        finally:
            for h in hooks:
                h.remove()
        state = []
        for k, s in enumerate(cache.slots):
            if s is REP:
                z = torch.zeros_like(rep_inputs[k][:, :, -1:])
                state.append(torch.cat([z, z], dim=2))
            elif s is None:
                raise RuntimeError(f"decoder cache slot {k} was not written by the first chunk")
            elif s.shape[2] == 1:
                state.append(torch.cat([torch.zeros_like(s), s], dim=2))
            else:
                state.append(s)
        return (_pixels(vae, y), *state)


class VAEDecodeStep(nn.Module):
    """A later latent frame and the cache -> (frames [B, 3, 4, H, W], *new cache)."""

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vae = self.vae
        if len(state) != vae.decoder_slots:
            raise ValueError(f"decode step takes {vae.decoder_slots} cache tensors, got {len(state)}")
        cache = FeatureCache(vae.decoder_slots)
        cache.slots[:] = list(state)
        y = vae.decoder(_denormalise(vae, latent), cache, first_chunk=False)
        return (_pixels(vae, y), *cache.slots)


def decode_streaming(first: Callable, step: Callable, latent: torch.Tensor) -> torch.Tensor:
    """Decode [B, 48, F, h, w] with a first-frame and a step function (torch modules, ONNX Runtime or
    TensorRT / Triton callables with the graphs' signatures) -> frames [B, 3, 1 + 4(F-1), 16h, 16w]."""
    out = first(latent[:, :, :1])
    frames, state = [out[0]], list(out[1:])
    for i in range(1, latent.shape[2]):
        out = step(latent[:, :, i:i + 1], *state)
        frames.append(out[0])
        state = list(out[1:])
    return torch.cat([torch.as_tensor(f) for f in frames], dim=2)


def cache_names(num_slots: int) -> tuple[list[str], list[str]]:
    return [f"cache_{k}" for k in range(num_slots)], [f"cache_out_{k}" for k in range(num_slots)]


def cache_layout(vae: WanVAE, h: int = 4, w: int = 6) -> list[tuple[int, int]]:
    """(channels, spatial scale) of every cache tensor: cache k is [B, C_k, 2, h * s_k, w * s_k]."""
    with torch.no_grad():
        out = VAEDecodeFirst(vae)(torch.zeros(1, vae.cfg.z_dim, 1, h, w, device=vae.device))
    return [(t.shape[1], t.shape[3] // h) for t in out[1:]]


def export_vae_decoder_onnx(vae: WanVAE, folder: str | Path, opset: int = OPSET,
                            sample_hw: tuple[int, int] = (4, 6)) -> tuple[Path, Path]:
    """Write `vae_decode_first.onnx` and `vae_decode_step.onnx` to `folder` (dynamic batch, h, w)."""
    from torch.export import Dim

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = sample_hw
    if h == w:
        raise ValueError("sample_hw needs h != w, so that the export keeps height and width as separate dims")
    z = vae.cfg.z_dim
    layout = cache_layout(vae, h, w)
    ins, outs = cache_names(len(layout))
    B, H, W = Dim("batch", min=1, max=64), Dim("height", min=2, max=1024), Dim("width", min=2, max=1024)
    latent_dims = {0: B, 3: H, 4: W}
    cache_dims = [{0: B, 3: H * s if s > 1 else H, 4: W * s if s > 1 else W} for _, s in layout]
    sample = torch.randn(2, z, 1, h, w, generator=torch.Generator().manual_seed(0)).to(vae.device)
    first, step = VAEDecodeFirst(vae).eval(), VAEDecodeStep(vae).eval()
    paths = (folder / "vae_decode_first.onnx", folder / "vae_decode_step.onnx")
    with torch.no_grad():
        state = first(sample)[1:]
        prog = torch.onnx.export(first, (sample,), dynamo=True, input_names=["latent"],
                                 output_names=["frames", *outs], dynamic_shapes=({**latent_dims},),
                                 opset_version=opset)
        save_program(prog, paths[0])
        prog = torch.onnx.export(step, (sample, *state), dynamo=True, input_names=["latent", *ins],
                                 output_names=["frames", *outs], dynamic_shapes=(latent_dims, tuple(cache_dims)),
                                 opset_version=opset)
        save_program(prog, paths[1])
    return paths


__all__ = ["VAEDecodeFirst", "VAEDecodeStep", "decode_streaming", "cache_layout", "cache_names",
           "export_vae_decoder_onnx"]
