"""The networks: Wan2.2 DiT, Wan2.2 VAE, umT5 text encoder, and their checkpoint loaders."""
from .checkpoint import CheckpointError
from .dit import Segments, TextKV, WanDiT
from .dit_loader import load_dit, save_dit

__all__ = ["CheckpointError", "Segments", "TextKV", "WanDiT", "load_dit", "save_dit"]
