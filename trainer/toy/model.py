"""The toy engine: the project's real `Engine`, `WanDiT` and tiny umT5, with `ToyCodec` in the VAE's place.

TOY_DIT (dim 192, 4 layers, about 2.8 M parameters) is the benchmark's DiT; SMOKE_DIT (dim 64, 2 layers) the
CI smoke's (it claims nothing, so its rank-deficient head is acceptable there). text_len 32: the toy prompts are
20 tokens, and the Wan default of 512 padded rows would double every step at these sizes (design section 1.1).
TOY_LAYOUT keeps reference clips at their own 8 fps and at most 5 frames (one clip of the world); everything else
is the runtime's default conditioning layout.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ...conditioning import ConditioningLayout
from ...config import DiTConfig
from ...engine import Engine
from ...lora import merge_lora_, read_lora
from ...models.dit_loader import load_dit
from ...models.random_weights import random_dit
from ...models.text_encoder import TextEncoder
from ...request import Defaults
from .codec import ToyCodec

# dim >= 192: the head maps each token (a 2x2 patch of 48-channel cells) to 192 values through a Linear(dim, 192);
# with dim 128 its output has rank 128, so 64 directions of the noise can never be predicted and every sample keeps
# them (measured: dim 128 drew colour-tinted noise after 3,000 steps, as the design's probe did).
TOY_DIT = DiTConfig(dim=192, ffn_dim=768, freq_dim=64, num_heads=6, num_layers=4, text_dim=32, text_len=32)
SMOKE_DIT = DiTConfig(dim=64, ffn_dim=256, freq_dim=32, num_heads=2, num_layers=2, text_dim=32, text_len=32)
TOY_LAYOUT = ConditioningLayout(max_clip_frames=5, clip_fps=None)
TEXT_SEED = 0  # the frozen random umT5 is the same in every stage and run


def toy_defaults(size: int, frames: int, shift: float, steps: int = 16, guidance: float = 3.0) -> Defaults:
    """Generation defaults at the world's size: UniPC, sample shift = the train shift (Wan's 5 is for 720p)."""
    return Defaults(height=size, width=size, num_frames=frames, steps=steps, guidance=guidance, shift=shift, fps=8)


def toy_engine(dit_cfg: DiTConfig, defaults: Defaults, base: str | Path | None = None, seed: int = 0,
               loras: tuple[str | Path, ...] = ()) -> Engine:
    """The toy engine, fp32 on the CPU: random DiT weights (seed) or a pretrained base folder (`save_dit`
    layout, read back by the real loader), LoRA files merged in order (SFT, then DPO) with `merge_lora_`."""
    if base is None:
        dit = random_dit(dit_cfg, seed=seed)
    else:
        dit = load_dit(base, dtype=torch.float32, backend="torch")
        if dit.cfg != dit_cfg:
            raise ValueError(f"{base}: its DiT config {dit.cfg} is not the preset's {dit_cfg}; rerun the pretrain "
                             "stage for this preset")
    for f in loras:
        merge_lora_(dit, read_lora(f))
    dit.eval().requires_grad_(False)
    return Engine(dit, ToyCodec(), TextEncoder.tiny(seed=TEXT_SEED), layout=TOY_LAYOUT, defaults=defaults)


__all__ = ["TOY_DIT", "SMOKE_DIT", "TOY_LAYOUT", "toy_defaults", "toy_engine"]
