"""Builders shared by the tests: oracles from diffusers at tiny sizes with random (non-zero) weights."""
from __future__ import annotations

from pathlib import Path

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


def diffusers_vae(cfg, seed: int = 0, scale: float = 0.03, wan21: bool = False):
    """diffusers' AutoencoderKLWan, Wan2.2 structure (is_residual) or Wan2.1's, at the widths of a VAEConfig."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    if wan21:  # Wan2.1: z_dim 16, no patchify, no residual stages
        model = AutoencoderKLWan(base_dim=cfg.base_dim, z_dim=16, num_res_blocks=cfg.num_res_blocks)
    else:
        p = cfg.patch_size
        model = AutoencoderKLWan(
            base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
            num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample), is_residual=True,
            in_channels=cfg.in_channels * p * p, out_channels=cfg.in_channels * p * p, patch_size=p,
            scale_factor_temporal=cfg.temporal_compression, scale_factor_spatial=cfg.spatial_compression,
            latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std))
    # 0.03 keeps ~97% of the decoded pixels inside the [-1, 1] clamp, so decode comparisons mean something
    return noisy_(model, scale=scale, seed=seed).eval()


def tiny_export(tmp_path_factory) -> Path:
    """The tiny engine's graphs, exported once per session (shared by the ONNX, TensorRT and Triton tests)."""
    from anyid_rt.export import cli as export_cli

    out = tmp_path_factory.getbasetemp() / "anyid_tiny_onnx"
    if not (out / "export.json").is_file():
        assert export_cli.main(["export", "onnx", "--preset", "tiny", "--seed", "0", "--out", str(out), "--check"]) == 0
    return out


def diffusers_pipeline_folder(folder, seed: int = 0):
    """A whole tiny Wan2.2 pipeline in the diffusers layout (WanPipeline, expand_timesteps=True)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from anyid_rt.config import ModelConfig
    from anyid_rt.models.text_encoder import TextEncoder

    cfg = ModelConfig.preset("tiny")
    te = TextEncoder.tiny(seed=seed)
    pipe = WanPipeline(tokenizer=te.tokenizer, text_encoder=te.model, vae=diffusers_vae(cfg.vae, seed),
                       transformer=diffusers_dit(cfg.dit, seed),
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=5.0), expand_timesteps=True)
    pipe.save_pretrained(folder)
    return pipe
