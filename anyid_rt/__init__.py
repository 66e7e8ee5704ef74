"""anyid_rt: inference runtime and minimal trainer for identity-preserving video generation
(the AnyID method on Wan2.2-TI2V-5B).

    import anyid_rt
    engine = anyid_rt.Engine.from_pretrained("Wan2.2-TI2V-5B", dtype="bf16")
    video = engine.generate("...", references=["face.jpg", "clip.mp4"], primary=0)
    video.save("out.mp4")
"""
from importlib import import_module

__version__ = "0.1.0"
__all__ = ["Engine", "Video", "Defaults", "ConditioningLayout", "DiTConfig", "VAEConfig", "TextEncoderConfig",
           "ModelConfig", "ParallelConfig", "__version__"]

# The public names are imported on first use (PEP 562): `import anyid_rt` alone, and so the `anyid-rt` CLI
# (its --help, its checks of a request), must not pay for importing torch and the models.
_HOMES = {"Engine": ".engine", "Video": ".engine", "Defaults": ".engine", "ConditioningLayout": ".conditioning",
          "DiTConfig": ".config", "VAEConfig": ".config", "TextEncoderConfig": ".config", "ModelConfig": ".config",
          "ParallelConfig": ".config"}


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
