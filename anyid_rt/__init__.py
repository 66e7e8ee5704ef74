"""anyid_rt: inference runtime and minimal trainer for identity-preserving video generation
(the AnyID method on Wan2.2-TI2V-5B).

    import anyid_rt
    engine = anyid_rt.Engine.from_pretrained("Wan2.2-TI2V-5B", dtype="bf16")
    video = engine.generate("...", references=["face.jpg", "clip.mp4"], primary=0)
    video.save("out.mp4")
"""
from .conditioning import ConditioningLayout
from .config import DiTConfig, ModelConfig, TextEncoderConfig, VAEConfig
from .engine import Defaults, Engine, Video

__version__ = "0.1.0"
__all__ = ["Engine", "Video", "Defaults", "ConditioningLayout", "DiTConfig", "VAEConfig", "TextEncoderConfig",
           "ModelConfig", "__version__"]
