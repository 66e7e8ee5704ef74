"""The networks: Wan2.2 DiT, Wan2.2 VAE, umT5 text encoder, and their checkpoint loaders."""
from .checkpoint import CheckpointError
from .dit import Segments, TextKV, WanDiT
from .dit_loader import load_dit, save_dit
from .text_encoder import TextEncoder
from .vae import VAETiling, WanVAE, load_vae, save_vae_original

__all__ = ["CheckpointError", "Segments", "TextKV", "WanDiT", "load_dit", "save_dit", "TextEncoder", "VAETiling",
           "WanVAE", "load_vae", "save_vae_original"]
