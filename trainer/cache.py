"""Disk cache of VAE latents and prompt embeddings, keyed by content hash, so repeated epochs do not re-encode.

A key is the sha1 of a JSON recipe that fixes the tensor completely: the source file's content hash, the
frame indices, crop parameters and output size, and a fingerprint of the encoder's weights (so a cache built
with one VAE is never read with another). Entries are safetensors files `cache_dir/<kind>/<k[:2]>/<k>.safetensors`
written atomically (a temporary file of a unique name, then os.replace), so concurrent data-parallel processes
can share a cache folder and an interrupted write leaves no half file behind.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_path


def recipe_key(recipe: dict) -> str:
    return hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha1 of a file's bytes (a source clip's part of a recipe), remembered per (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def module_fingerprint(module: nn.Module) -> str:
    """A cheap identity of a network's weights: names, shapes, dtypes and the first / last 16 values of every
    tensor (hashing all 5B parameters would take longer than it saves)."""
    h = hashlib.sha1(type(module).__name__.encode())
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]).float().cpu().numpy().tobytes() if flat.numel() else b""
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample)
    return h.hexdigest()[:16]


class TensorCache:
    """`get(kind, recipe)` / `put(kind, recipe, tensors)`; a None root keeps nothing (every get misses)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, recipe: dict) -> Path:
        k = recipe_key(recipe)
        return self.root / kind / k[:2] / f"{k}.safetensors"

    def get(self, kind: str, recipe: dict) -> dict[str, torch.Tensor] | None:
        if self.root is None:
            self.misses += 1
            return None
        p = self.path(kind, recipe)
        if not p.is_file():
            self.misses += 1
            return None
        from safetensors.torch import load_file

        try:
            out = load_file(str(p))
        except Exception:  # noqa: BLE001 - a damaged entry is re-computed, never trusted
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, kind: str, recipe: dict, tensors: dict[str, torch.Tensor]) -> None:
        if self.root is None:
            return
        from safetensors.torch import save_file

        with atomic_path(self.path(kind, recipe)) as tmp:  # a unique name per writer; removed if interrupted
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


class Encoders:
    """The frozen VAE and text encoder behind a cache: `latent(recipe, render)` and `text(prompt)`.

    `render()` is called only on a miss and returns pixels [3, T, H, W] in [-1, 1]; latents come back as
    fp32 [1, 48, F, h, w] on `device`, prompt embeddings as [L, dim] on `device`.
    """

    def __init__(self, vae, text_encoder, cache: TensorCache, device: torch.device):
        self.vae, self.text_encoder, self.cache, self.device = vae, text_encoder, cache, torch.device(device)
        self.vae_fp = module_fingerprint(vae)
        self.text_fp = module_fingerprint(text_encoder.model)
        self._null: dict[tuple, torch.Tensor] = {}
        self.encoded = 0  # VAE calls made (misses that were computed)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += 1
        return self.vae.encode(pixels[None].to(self.vae.device, self.vae.dtype)).float()

    def latent(self, recipe: dict, render) -> torch.Tensor:
        recipe = {**recipe, "vae": self.vae_fp}
        hit = self.cache.get("latent", recipe)
        if hit is not None:
            return hit["latent"].to(self.device)
        z = self.encode_pixels(render())
        self.cache.put("latent", recipe, {"latent": z})
        return z.to(self.device)

    def null_latent(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The null reference of a pixel shape [3, T, H, W]: the latent of black pixels (kept in memory)."""
        shape = tuple(shape)
        if shape not in self._null:
            self._null[shape] = self.latent({"kind": "null", "shape": list(shape)},
                                            lambda: torch.full(shape, -1.0)).to(self.device)
        return self._null[shape]

    def text(self, prompt: str) -> torch.Tensor:
        recipe = {"kind": "text", "prompt": prompt, "encoder": self.text_fp}
        hit = self.cache.get("text", recipe)
        if hit is not None:
            return hit["embedding"].to(self.device)
        e = self.text_encoder.encode(prompt)[0].float()
        self.cache.put("text", recipe, {"embedding": e})
        return e.to(self.device)


__all__ = ["TensorCache", "Encoders", "recipe_key", "file_digest", "module_fingerprint"]
