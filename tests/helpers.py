"""Helpers shared by the tests: oracles from diffusers at tiny sizes with random (non-zero) weights, fresh
seeds and self-calibrating tolerances for the kernel tests, and the official Wan2.2 i2v image sizing (an oracle
for `media.crop_center_to`; the runtime takes the size from the caller)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch

from anyid_rt.bench.baseline import relerr  # noqa: F401 - one measure for the parity tests and the benchmark
from anyid_rt.config import DiTConfig
from anyid_rt.kernels.select import calibrated_bound


# Kernel tests (tests/test_<op>.py): fresh random seeds and tolerances that calibrate themselves.
def fresh_seed() -> int:
    """Seed torch's RNG from ANYID_TEST_SEED if set, else randomly; return the seed for failure messages."""
    seed = int(os.environ.get("ANYID_TEST_SEED", torch.seed() % 2**31))
    torch.manual_seed(seed)
    return seed


def assert_calibrated(out: torch.Tensor, out_ref: torch.Tensor, out_pt: torch.Tensor, what: str,
                      factor: float = 2.0, rel_floor: float = 1e-5) -> None:
    """Flash-attention's rule: max|out - ref| <= factor * max|pt - ref| + atol, the bound of
    `kernels.select.calibrated_bound` (the rule kernel selection applies), with a report of the worst element.

    out_ref is the reference in fp32, out_pt the same reference at the kernel's precision. atol is the
    rounding noise of a trivial fp32 operation on the reference ((ref + 0.3 - 0.3) - ref) or, if larger,
    rel_floor * max(1, max|ref|): the fp32 accumulation-order floor, which governs only where out_pt is
    itself exact (fp32 runs, fp32 outputs), since the low-precision error is orders of magnitude above it.
    """
    bound, pt_err, atol = calibrated_bound(out_ref, out_pt, factor, rel_floor)
    err = (out.double() - out_ref.double()).abs()
    worst = err.max().item() if err.numel() else 0.0
    if not worst <= bound:  # also fails on NaN
        idx = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(err, nan=float("inf")).argmax(), err.shape))
        n_bad = int((~(err <= bound)).sum())
        raise AssertionError(f"{what}: max error {worst:.3e} > bound {bound:.3e} (= {factor} x torch low-precision "
                             f"error {pt_err:.3e} + atol {atol:.3e}); {n_bad}/{err.numel()} elements over, worst at "
                             f"{idx}: got {out[idx].item():.6g}, reference {out_ref[idx].item():.6g}")


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


def check_against_fake_quant(err_emul: float, err_fp32: float, scale: float) -> None:
    """A Q/DQ graph in onnxruntime against its PyTorch emulation (`export.qdq.fake_quant`): they do the same
    arithmetic and agree to fp32 rounding (~1e-6) unless an activation sits within ~1e-7 of a quantisation
    boundary, where the fp32 rounding upstream moves it to the neighbouring level (measured: one such flip
    moves the output by ~1e-3). Either way the difference must stay far below the quantisation error itself
    (`err_fp32`, the graph against the unquantised model; `scale`, the output's max |value|)."""
    assert err_emul < 2e-3 * scale
    assert err_emul < 0.25 * err_fp32


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


# Official Wan2.2 TI2V image sizing (wan/utils/utils.py `best_output_size` and the i2v preprocessing). Test-only:
# the runtime takes height and width from the caller and crops with `media.crop_center_to`.
def best_output_size(w: int, h: int, dw: int = 32, dh: int = 32, max_area: int = 1280 * 704) -> tuple[int, int]:
    """Official Wan2.2 `best_output_size`: (ow, oh), multiples of (dw, dh) with ow * oh <= max_area and the
    aspect ratio closest to w / h (width-first candidate wins only when strictly closer). For extreme aspect
    ratios where a candidate rounds to zero (the official code divides by zero) the other candidate is used, and if
    both do, one block high (wide input) or one block wide (tall input)."""
    for name, v in (("w", w), ("h", h), ("dw", dw), ("dh", dh), ("max_area", max_area)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"best_output_size: {name} must be a positive int, got {v!r}")
    ratio = w / h
    ow = (max_area * ratio) ** 0.5
    oh = max_area / ow
    cands = []
    ow1 = int(ow // dw * dw)  # width first
    if ow1 > 0:
        oh1 = int(max_area / ow1 // dh * dh)
        if oh1 > 0:
            cands.append((ow1, oh1))
    oh2 = int(oh // dh * dh)  # height first
    if oh2 > 0:
        ow2 = int(max_area / oh2 // dw * dw)
        if ow2 > 0:
            cands.append((ow2, oh2))
    if not cands:  # extreme aspect ratio: one block high (wide input) or one block wide (tall input)
        size = (max_area // dh // dw * dw, dh) if w > h else (dw, max_area // dw // dh * dh)
        if 0 in size:
            raise ValueError(f"no {dw}x{dh}-aligned size fits in area {max_area}")
        return size
    if len(cands) == 1:
        return cands[0]
    (a_w, a_h), (b_w, b_h) = cands
    r1, r2 = a_w / a_h, b_w / b_h
    return cands[0] if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio) else cands[1]


def wan_i2v_image(image, max_area: int = 1280 * 704, dw: int = 32, dh: int = 32) -> torch.Tensor:
    """The whole official TI2V image preprocessing: best_output_size, crop_center_to, [-1, 1].
    Returns float32 [3, 1, oh, ow] (first frame of a clip)."""
    from anyid_rt.media import crop_center_to, load_media, to_model_range

    frames = load_media(image, max_frames=1)
    ow, oh = best_output_size(frames.shape[2], frames.shape[1], dw, dh, max_area)
    return to_model_range(crop_center_to(frames, ow, oh))


def sigint_default() -> None:
    """Popen's preexec_fn for tests that press Ctrl-C: a shell's background job starts its children with SIGINT
    ignored, and Python then never raises KeyboardInterrupt; the child gets the default back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
