"""Run `Engine.generate` with the DiT forward and the VAE decode going through exported graphs.

`GraphDiT` and `GraphVAE` stand in for `WanDiT` and `WanVAE` inside an `Engine` (they provide what
`Engine.generate` uses: `cfg`, `prepare_text`, `forward_groups`; `cfg`, `dtype`, `encode`, `decode`), and call
the graphs through plain functions of tensors. The same code serves three back ends:

- onnxruntime sessions (`onnx_engine`): the CPU check that the exported graphs generate the same video as
  the PyTorch engine;
- TensorRT engines called from a Triton Python model through BLS (`export/triton_model.py`);
- anything else with the graphs' signatures.

The text encoder, the VAE encoder (references, once per reference) and the sampler stay in PyTorch: they
run once per request or are a few element-wise ops per step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import DiTConfig
from ..engine import Engine
from ..models.dit import Segments, grid_of, pad_context, unpatchify
from ..models.vae import WanVAE
from .onnx_dit import DIT_INPUTS, dit_inputs
from .onnx_vae import decode_streaming

DiTCall = Callable[[dict[str, torch.Tensor]], torch.Tensor]


class GraphDiT:
    """The denoiser of an `Engine`, run through `call(inputs) -> velocity tokens` (the `DiTStep` graph)."""

    def __init__(self, cfg: DiTConfig, call: DiTCall):
        self.cfg = cfg
        self.call = call

    def prepare_text(self, context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The zero-padded context [B, text_len, text_dim]; its K/V are computed inside the graph."""
        return pad_context(self.cfg, context)

    def forward_groups(self, latents: Sequence[torch.Tensor], frame_starts: Sequence[int], segments: Segments,
                       context: torch.Tensor | Sequence[torch.Tensor], block_stack: Callable | None = None) -> torch.Tensor:
        if block_stack is not None:  # the graph holds the whole block stack: nothing can be skipped or replaced
            raise ValueError("a step cache (cache=) needs the PyTorch DiT: the exported graph runs every block")
        grid = grid_of(self.cfg, latents[0])
        tokens = self.call(dit_inputs(self.cfg, latents, frame_starts, segments, context))
        return unpatchify(self.cfg, tokens.to(latents[0].device), grid)


class GraphVAE:
    """A `WanVAE` whose decode runs through the first-frame and step graphs; encode stays in PyTorch."""

    def __init__(self, vae: WanVAE, first: Callable, step: Callable):
        self.vae, self.first, self.step = vae, first, step
        self.cfg = vae.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(frames)

    def decode(self, latent: torch.Tensor, tile=None, progress: bool = False) -> torch.Tensor:
        if tile is not None:
            raise ValueError("spatial tiling is not available with the exported decoder graphs; the decoder "
                             "streams one latent frame at a time, build a plan for the resolution instead")
        from tqdm.auto import tqdm

        with tqdm(total=latent.shape[2], desc="VAE decode", unit="latent frame", disable=not progress) as bar:
            def counted(call: Callable) -> Callable:
                def run(*tensors):
                    out = call(*tensors)
                    bar.update(1)
                    return out
                return run

            return decode_streaming(counted(self.first), counted(self.step), latent.float())


def graph_engine(base: Engine, dit_call: DiTCall, vae_first: Callable, vae_step: Callable) -> Engine:
    """An Engine sharing `base`'s text encoder, VAE encoder, layout and defaults, with the DiT and the VAE
    decoder replaced by graph calls."""
    if base.layout.reference_attention != "joint":
        raise ValueError(f"reference_attention={base.layout.reference_attention!r}: the exported DiT graphs run joint "
                         "attention only; serve this model with the PyTorch engine (a triton-repo without --onnx / --engines)")
    return Engine(GraphDiT(base.dit.cfg, dit_call), GraphVAE(base.vae, vae_first, vae_step), base.text_encoder,
                  layout=base.layout, defaults=base.defaults, device=base.device)


# ---------------------------------------------------------------------------------------------------------
# onnxruntime back end
# ---------------------------------------------------------------------------------------------------------

def ort_session(path: str | Path, threads: int = 0):
    """An onnxruntime CPU session. Graph optimisation stays at the basic level: ORT's extended fusions
    rewrite FP8 DequantizeLinear + MatMul into an integer kernel that has no FP8 variant."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("onnxruntime is not installed: pip install onnxruntime (or anyid_rt[export])") from e
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_dit_call(session) -> DiTCall:
    def call(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {k: inputs[k].detach().cpu().numpy() for k in DIT_INPUTS}
        return torch.from_numpy(session.run(None, feed)[0])
    return call


def ort_graph_call(session) -> Callable:
    names = [i.name for i in session.get_inputs()]

    def call(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feed))
    return call


def onnx_engine(base: Engine, folder: str | Path, dit_file: str = "dit.onnx") -> Engine:
    """`base` with its DiT and VAE decoder running the exported graphs in `folder` through onnxruntime."""
    folder = Path(folder)
    dit = ort_session(folder / dit_file)
    first, step = ort_session(folder / "vae_decode_first.onnx"), ort_session(folder / "vae_decode_step.onnx")
    return graph_engine(base, ort_dit_call(dit), ort_graph_call(first), ort_graph_call(step))


__all__ = ["GraphDiT", "GraphVAE", "graph_engine", "onnx_engine", "ort_session", "ort_dit_call", "ort_graph_call"]
