"""Deterministic random weights for the three networks: the one source used by `Engine.tiny`, the tests,
the benchmarks and the kernel cross-compiler.

Every tensor is drawn from a seeded generator in a fixed order and scaled the way the modules initialise
themselves (so activations keep a sane magnitude through 30 blocks), and nothing is left at a trivial value
(zero biases, unit norms) that would let a parity test pass for the wrong reason. Large models are made
directly on the target device from the meta device: no CPU copy of 10 GB.
"""
from __future__ import annotations

import math

import torch

from ..config import DiTConfig, TextEncoderConfig, VAEConfig
from .dit import WanDiT
from .dit_loader import keep_fp32
from .vae import WanVAE


def _fill_dit_(name: str, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """In-place random values for a DiT tensor (fp32), at the scales the modules initialise themselves with:
    linears and convs N(0, 1/(3 fan_in)) (the standard deviation of PyTorch's default kaiming-uniform init),
    biases N(0, 0.01^2), norm weights 1 + N(0, 0.05^2), modulation tables N(0, 1/dim). A larger weight scale
    makes a random 2-block DiT chaotic: one FP8 rounding flip then moves its output by percents."""
    t.normal_(generator=g)
    if name.endswith("modulation"):
        return t.div_(t.shape[-1] ** 0.5)
    if ".norm" in name:
        return t.mul_(0.05).add_(1.0) if name.endswith("weight") else t.mul_(0.01)
    if name.endswith("bias"):
        return t.mul_(0.01)
    return t.div_(math.sqrt(3 * t[0].numel()))


def random_dit(cfg: DiTConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               seed: int = 0, backend: str = "torch", attention_quant: str | None = None) -> WanDiT:
    """A WanDiT with deterministic random weights made directly on `device`, in the dtypes `load_dit` gives:
    `dtype` for the large layers, fp32 for the norms, modulation, time embedding and head (`keep_fp32`)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = WanDiT(cfg, backend=backend, attention_quant=attention_quant)
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():  # fixed order: the same weights for the same seed
        t = _fill_dit_(name, torch.empty(p.shape, dtype=torch.float32, device=device), g)
        sd[name] = t if (dtype == torch.float32 or keep_fp32(name)) else t.to(dtype)
        del t
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_vae(cfg: VAEConfig | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> WanVAE:
    """A WanVAE with deterministic random weights (drawn on the CPU, so equal on every device): convs
    N(0, 1/fan_in), biases N(0, 0.01^2), gammas 1 + N(0, 0.05^2)."""
    with torch.device("meta"):
        vae = WanVAE(cfg)
    vae = vae.to_empty(device=device)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                v = 1.0 + 0.05 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.01 * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
            p.copy_(v)
    return vae.to(dtype).eval().requires_grad_(False)


def random_umt5(cfg: TextEncoderConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int = 0):
    """transformers' UMT5EncoderModel with deterministic random weights made on `device` (5.7B params,
    11.4 GB in bf16 at full size): norms 1 + N(0, 0.1^2), embedding and relative bias N(0, 1), the rest
    N(0, 1/fan_in). Needs transformers."""
    from transformers import UMT5EncoderModel

    from .text_encoder_loader import umt5_config

    device = torch.device(device)
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(cfg))
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight
        t = torch.empty(p.shape, dtype=torch.float32, device=device).normal_(generator=g)
        if name.endswith("layer_norm.weight"):
            t.mul_(0.1).add_(1.0)
        elif not (name.endswith("relative_attention_bias.weight") or name == "shared.weight"):
            t.div_(p.shape[1] ** 0.5)
        tensors[name] = t.to(dtype)
        del t
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    model.set_input_embeddings(model.shared)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"umT5 tensors left unset: {left[:8]}")
    return model.eval().requires_grad_(False)


__all__ = ["random_dit", "random_vae", "random_umt5"]
