"""The networks: Wan2.2 DiT, Wan2.2 VAE, umT5 text encoder, and their checkpoint loaders."""
from .checkpoint import CheckpointError, CheckpointReader
from .dit import Segments, TextKV, WanDiT
from .dit_loader import load_dit, save_dit
from .text_encoder import TextEncoder
from .text_encoder_loader import load_umt5
from .vae import WanVAE
from .vae_tiling import VAETiling
from .vae_loader import load_vae, save_vae_original

__all__ = ["CheckpointError", "CheckpointReader", "Segments", "TextKV", "WanDiT", "load_dit", "save_dit",
           "TextEncoder", "load_umt5", "VAETiling", "WanVAE", "load_vae", "save_vae_original"]
