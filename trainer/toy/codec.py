"""ToyCodec: a fixed, exact codec with the Wan2.2 VAE's contract, standing in for the VAE in the toy world.

encode: pixels [B, 3, T, H, W] in [-1, 1], T = 4n+1 -> latents [B, 48, 1 + n, H/16, W/16]
    1. causal temporal mean: frame 0 alone, then each chunk of 4 frames averaged (Wan's causal 4x);
    2. 4x4 average pool (the effective resolution H/4 x W/4);
    3. pixel_unshuffle(4): each 4x4 block of effective pixels x 3 colours -> 48 channels (16x spatial);
    4. times `scale` (2.0: toy clips then have latents of about unit scale, like Wan's normalised ones).
decode is the exact inverse on clips that are constant over each 4x4 block and each causal chunk (the toy
renderer draws only such clips), and the orthogonal projection's adjoint elsewhere; clamped to [-1, 1].

It has no learned weights, so identity "fails" only for the model's reasons, never for a blurry decoder. It
holds one frozen nn.Parameter (the scale) because the engine reads `next(vae.parameters()).dtype` and the
trainer's cache fingerprints `state_dict()`. What it does not test: WanVAE numerics and real latent statistics
(the VAE has its own parity tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import VAEConfig

BLOCK = 4  # effective pixel = 4 x 4 pixels; then 4 x 4 effective pixels per latent cell


class ToyCodec(nn.Module):
    def __init__(self, scale: float = 2.0):
        super().__init__()
        # the tiny preset's VAEConfig: z_dim 48, 16x spatial, 4x temporal (what TokenGeometry reads)
        self.cfg = VAEConfig.preset("tiny")
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @staticmethod
    def _check(x: torch.Tensor, what: str, channels: int, multiple: int) -> None:
        if x.ndim != 5 or x.shape[1] != channels:
            raise ValueError(f"ToyCodec.{what} takes [B, {channels}, T, H, W], got {list(x.shape)}")
        if x.shape[3] % multiple or x.shape[4] % multiple:
            raise ValueError(f"ToyCodec.{what}: height and width must be multiples of {multiple}, got "
                             f"{x.shape[3]} x {x.shape[4]}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, "encode", 3, BLOCK * BLOCK)
        B, _, T, H, W = x.shape
        if (T - 1) % 4:
            raise ValueError(f"ToyCodec.encode needs 4n+1 frames (frame 0, then chunks of 4), got {T}")
        x = x.to(self.dtype)
        chunks = x[:, :, 1:].reshape(B, 3, (T - 1) // 4, 4, H, W).mean(3)
        x = torch.cat([x[:, :, :1], chunks], 2)  # [B, 3, F, H, W]
        Fr = x.shape[2]
        x = F.avg_pool2d(x.permute(0, 2, 1, 3, 4).reshape(B * Fr, 3, H, W), BLOCK)  # [B F, 3, H/4, W/4]
        z = F.pixel_unshuffle(x, BLOCK)  # [B F, 48, H/16, W/16]
        return (z.reshape(B, Fr, 48, H // 16, W // 16).permute(0, 2, 1, 3, 4) * self.scale).contiguous()

    def decode(self, z: torch.Tensor, tile=None, progress: bool = False) -> torch.Tensor:
        """Latents [B, 48, F, h, w] -> pixels [B, 3, 1 + 4(F-1), 16h, 16w] in [-1, 1]. `tile` and `progress` are
        the VAE's arguments; a toy clip needs neither (there is nothing to stream)."""
        if tile is not None:
            raise ValueError("ToyCodec.decode takes no spatial tiles (engine vae_tile must be None)")
        self._check(z, "decode", 48, 1)
        B, _, Fr, h, w = z.shape
        x = F.pixel_shuffle((z.to(self.dtype) / self.scale).permute(0, 2, 1, 3, 4).reshape(B * Fr, 48, h, w), BLOCK)
        x = x.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)  # [B F, 3, 16h, 16w]
        x = x.reshape(B, Fr, 3, 16 * h, 16 * w).permute(0, 2, 1, 3, 4)
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, 2)], 2)
        return x.clamp(-1, 1).contiguous()


def effective_frames(pixels: torch.Tensor) -> torch.Tensor:
    """One frame per latent frame at the effective resolution: uint8 or float frames [T, H, W, 3] -> float
    [F, 3, H/4, W/4] in [-1, 1] (frame 0, then the mean of each chunk of 4, 4x4 block means): exactly the frames
    `ToyCodec.decode` drew, and what the evaluator reads."""
    x = pixels.float()
    if pixels.dtype == torch.uint8:
        x = x / 127.5 - 1
    x = x.permute(3, 0, 1, 2)[None]  # [1, 3, T, H, W]
    T = x.shape[2]
    chunks = x[:, :, 1:].reshape(1, 3, (T - 1) // 4, 4, *x.shape[3:]).mean(3)
    x = torch.cat([x[:, :, :1], chunks], 2)[0].permute(1, 0, 2, 3)  # [F, 3, H, W]
    return F.avg_pool2d(x, BLOCK)


__all__ = ["ToyCodec", "effective_frames", "BLOCK"]
