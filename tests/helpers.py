"""Builders shared by the tests: oracles from diffusers at tiny sizes with random (non-zero) weights."""
from __future__ import annotations

import torch

from anyid_rt.config import DiTConfig


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error measure of the parity tests."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def noisy_(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: diffusers zero-inits some weights, which would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def diffusers_dit(cfg: DiTConfig, seed: int = 0):
    """diffusers' WanTransformer3DModel with the Wan2.2-5B structure at the widths of `cfg`."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, rope_max_seq_len=cfg.rope_max_positions)
    return noisy_(model, seed=seed).eval()
