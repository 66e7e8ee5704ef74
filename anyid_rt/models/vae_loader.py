"""Loading and saving the Wan2.2 VAE (`models/vae.py`): layout detection, config from shapes, diagnostics.

`load_vae` reads the original layout (`Wan2.2_VAE.pth`, or any file with its key names) or the diffusers
layout (`AutoencoderKLWan`, renamed at load time to the original names: reference section 10.3) through
`CheckpointReader`. The config comes from a diffusers config.json when there is one, checked against the
tensor shapes, or from the shapes alone. A checkpoint of something else (a Wan2.1 VAE, a DiT, a text
encoder) fails with an error that says what it looks like.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import VAEConfig, parse_dtype
from ..request import ORIGINAL_VAE
from .checkpoint import CheckpointError, CheckpointReader, describe_keys, load_into
from .vae import WanVAE


_RESNET_PARTS = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
                 ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def _resnet_part(tail: str) -> str:
    for theirs, ours in _RESNET_PARTS:
        if tail.startswith(theirs):
            return ours + tail[len(theirs):]
    return tail


# whole-prefix renames; the numbered blocks below need arithmetic on their indices
_PREFIXES = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."} | {
    f"{side}.{theirs}": f"{side}.{ours}" for side in ("encoder", "decoder")
    for theirs, ours in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2."),
                         ("mid_block.attentions.0.", "middle.1."))}
_MIDDLE_RESNET = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)")
# encoder.down_blocks.i.{resnets.j|downsampler}.* and decoder.up_blocks.i.{resnets.j|upsampler}.*
_STAGE = re.compile(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)|\2sampler)\.(.+)")


def diffusers_to_original_key(key: str, num_res_blocks: int) -> str:
    """Rename a diffusers `AutoencoderKLWan` (is_residual=True) key to the original Wan2.2 name (reference
    section 10.3). Unknown keys come back unchanged, so the loader reports them as unexpected."""
    for theirs, ours in _PREFIXES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    if m := _MIDDLE_RESNET.fullmatch(key):  # the middle is resnet, attention, resnet
        return f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_part(m[3])}"
    m = _STAGE.fullmatch(key)
    if m is None or (m[1], m[2]) not in (("encoder", "down"), ("decoder", "up")):
        return key
    stage = f"{m[1]}.{m[2]}samples.{m[3]}.{m[2]}samples"
    if m[4] is not None:
        return f"{stage}.{m[4]}.{_resnet_part(m[5])}"
    # the resampler follows the residual blocks: num_res_blocks of them down, one more up
    return f"{stage}.{num_res_blocks + (m[2] == 'up')}.{m[5]}"


_HINTS = {"a Wan DiT (transformer) checkpoint": "; load it with load_dit",
          "a full-pipeline single file": "; extract the VAE weights (or pass the vae/ folder)"}


def _describe(keys: set[str]) -> str:
    """What a checkpoint that is not a Wan2.2 VAE looks like, for the error message."""
    what = describe_keys(keys)
    return what + _HINTS.get(what, "")


def detect_vae_layout(keys, where: str | Path | None = None) -> str:
    """'original' (encoder.conv1.weight, conv1.weight, decoder.upsamples...) or 'diffusers' (encoder.conv_in.weight,
    quant_conv.weight, decoder.up_blocks...); a CheckpointError saying what it looks like otherwise."""
    keys = set(keys)
    if "encoder.conv_in.weight" in keys or "quant_conv.weight" in keys or any(k.startswith("decoder.up_blocks.")
                                                                             for k in keys):
        return "diffusers"
    if "encoder.conv1.weight" in keys or "conv1.weight" in keys or any(k.startswith("decoder.upsamples.")
                                                                     for k in keys):
        return "original"
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointError(f"{where or 'checkpoint'}: not a Wan VAE checkpoint: it looks like {_describe(keys)} "
                          f"(keys like {sample})")


_WAN21_HINT = ("it looks like a Wan2.1 VAE (z_dim 16, 3 input channels, no residual down/up stages); anyid_rt "
               "needs the Wan2.2 VAE (Wan2.2_VAE.pth: z_dim 48, 12 patchified input channels)")


def _config_fields_from_shapes(shape: dict[str, tuple[int, ...]], where: Path) -> dict:
    """Every structural VAEConfig field, read off tensor shapes keyed by original names."""
    need = ["encoder.conv1.weight", "conv2.weight", "decoder.conv1.weight"]
    if any(k not in shape for k in need):
        raise CheckpointError(f"{where}: cannot read the VAE config off the tensors, missing "
                              f"{[k for k in need if k not in shape]}")
    base_dim, cin = shape["encoder.conv1.weight"][:2]
    z_dim = shape["conv2.weight"][0]
    if not any(k.startswith("encoder.downsamples.0.downsamples.") for k in shape) or cin == 3:
        raise CheckpointError(f"{where}: {_WAN21_HINT}")
    if cin != 12:
        raise CheckpointError(f"{where}: encoder input has {cin} channels; the Wan2.2 VAE takes 12 (3 colours "
                              "patchified 2x2)")
    stages = sorted({int(m[1]) for k in shape if (m := re.match(r"encoder\.downsamples\.(\d+)\.downsamples\.", k))})
    nrb = len({int(m[1]) for k in shape
               if (m := re.match(r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.", k))})
    dim_mult = []
    for i in stages:
        k = f"encoder.downsamples.{i}.downsamples.0.residual.2.weight"
        if k not in shape or shape[k][0] % base_dim:
            raise CheckpointError(f"{where}: cannot read the width of encoder stage {i} ({k})")
        dim_mult.append(shape[k][0] // base_dim)
    temporal = [f"encoder.downsamples.{i}.downsamples.{nrb}.time_conv.weight" in shape for i in stages[:-1]]
    dec0 = shape["decoder.conv1.weight"][0]
    if dec0 % dim_mult[-1]:
        raise CheckpointError(f"{where}: decoder width {dec0} is not a multiple of dim_mult[-1]={dim_mult[-1]}")
    return dict(base_dim=base_dim, decoder_base_dim=dec0 // dim_mult[-1], z_dim=z_dim, dim_mult=tuple(dim_mult),
                num_res_blocks=nrb, temporal_downsample=tuple(temporal), in_channels=3, patch_size=2)


def _config_fields_from_json(cfg_path: Path) -> dict | None:
    """The VAEConfig fields of a diffusers `AutoencoderKLWan` config.json, or None if it describes another class."""
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable config.json: {e}") from e
    if raw.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan" or "z_dim" not in raw:
        return None
    if not raw.get("is_residual", False) or raw.get("z_dim") == 16:
        raise CheckpointError(f"{cfg_path}: {_WAN21_HINT}")
    if raw.get("attn_scales"):
        raise CheckpointError(f"{cfg_path}: attn_scales={raw['attn_scales']} is not supported (Wan2.2 has none)")
    p = raw.get("patch_size") or 1
    base = raw.get("base_dim", 96)
    fields = dict(base_dim=base, decoder_base_dim=raw.get("decoder_base_dim") or base, z_dim=raw["z_dim"],
                  dim_mult=tuple(raw.get("dim_mult", (1, 2, 4, 4))), num_res_blocks=raw.get("num_res_blocks", 2),
                  temporal_downsample=tuple(raw.get("temperal_downsample", (False, True, True))),
                  in_channels=raw.get("in_channels", 3) // (p * p), patch_size=p)
    if "latents_mean" in raw and "latents_std" in raw:
        fields.update(latents_mean=tuple(raw["latents_mean"]), latents_std=tuple(raw["latents_std"]))
    return fields


def _resolve(path: Path) -> Path:
    """A file, a diffusers vae/ folder, a pipeline folder (use its vae/) or an original Wan folder (use
    Wan2.2_VAE.pth)."""
    if path.is_dir():
        if (path / ORIGINAL_VAE).is_file():
            return path / ORIGINAL_VAE
        if (path / "vae").is_dir():
            return path / "vae"
    return path


def _make_config(fields: dict, where: Path) -> VAEConfig:
    try:
        return VAEConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the checkpoint describes an unsupported VAE config {fields}: {e}") from e


def load_vae(path: str | Path, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu",
             config: VAEConfig | None = None, progress: bool = False) -> WanVAE:
    """Load the Wan2.2 VAE from the original layout (`Wan2.2_VAE.pth`, or any .pth / .safetensors with the
    original keys, or the Wan model folder holding it) or the diffusers layout (a folder with config.json and
    diffusion_pytorch_model.safetensors, or a pipeline folder with vae/).

    The config comes from `config` if given, else from a diffusers config.json (checked against the tensor
    shapes), else from the tensor shapes (latent mean/std then default to Wan2.2's). The model is built on
    the meta device and filled one tensor at a time (`progress`: a progress bar); it is returned in eval mode
    without gradients.
    """
    dtype = parse_dtype(dtype)
    path = Path(path)
    src = _resolve(path)
    reader = CheckpointReader(src)
    keys = set(reader.keys())
    layout = detect_vae_layout(keys, reader.file)
    folder = src if src.is_dir() else src.parent
    if layout == "diffusers":
        nrb_guess = len({m[1] for k in keys if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
        if nrb_guess == 0 and any(re.match(r"encoder\.down_blocks\.\d+\.norm1\.", k) for k in keys):
            raise CheckpointError(f"{src}: {_WAN21_HINT}")
        nrb = config.num_res_blocks if config is not None else nrb_guess
        to_orig = lambda k: diffusers_to_original_key(k, nrb)  # noqa: E731
    else:
        to_orig = lambda k: k  # noqa: E731
    shape = {to_orig(k): tuple(reader.shape(k)) for k in keys}
    if config is None:
        fields = _config_fields_from_shapes(shape, src)
        cfg_path = folder / "config.json"
        json_fields = _config_fields_from_json(cfg_path) if cfg_path.is_file() else None
        if json_fields is not None:
            bad = [f"{k}: config.json {json_fields[k]} vs tensors {v}" for k, v in fields.items()
                   if json_fields[k] != v]
            if bad:
                raise CheckpointError(f"{cfg_path} does not match the tensor shapes of {src}: " + "; ".join(bad))
            fields = json_fields
        elif fields["z_dim"] != len(VAEConfig().latents_mean):
            raise CheckpointError(f"{src}: z_dim {fields['z_dim']} has no known latent mean/std; pass config=")
        config = _make_config(fields, src)
    with torch.device("meta"):
        vae = WanVAE(config)
    load_into(vae, reader, to_orig, dtype, device, what="Wan2.2 VAE", progress=progress)
    return vae.eval().requires_grad_(False)


def save_vae_original(vae: WanVAE, path: str | Path) -> None:
    """Write the state dict with the original keys: safetensors for a `.safetensors` path, torch.save else."""
    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)

__all__ = ["load_vae", "save_vae_original", "detect_vae_layout", "diffusers_to_original_key"]
