"""The compiled DiT: regional torch.compile of the transformer block, and CUDA graphs of the whole step.

`compile_dit_(dit, mode)` is what `Engine.from_pretrained(..., compile=True | "cudagraphs")` applies, last,
after the LoRA merge, the projection fusion and any FP8 quantisation:

- **Regional compile.** Each block is compiled with `nn.Module.compile`. The blocks share one code object and
  dynamo inlines built-in modules (parameters are graph inputs, guarded by shape and dtype, not by
  identity), so the first block compiles and the other blocks reuse that graph: one compile of one block,
  not of 30 (tests/test_compile.py counts them). The block loop, embeddings and head stay eager. The block
  compiles to one graph with no breaks (every argument is a tensor, a tuple of tensors, a `SegmentMap` or
  the `DiTOps`; the Triton kernels are torch.library ops that Inductor calls as they are).
- **Static shapes** (`dynamic=False`). A request's shapes are the same at every step, so a generation
  compiles at its first step and never again; a request of another shape (size, frames, references, batch
  of guidance) compiles once more. Dynamo keeps `RECOMPILE_LIMIT` variants per code object (torch's
  default is 8); past that, new shapes run the block eagerly, with torch's warning.
- **CUDA graphs** (`mode="cudagraphs"`, CUDA only). On top of the compiled blocks, `WanDiT.forward_tokens`
  (every block, the time embedding and the head) is captured into one CUDA graph per call layout and
  replayed (`StepGraphs`): one launch per denoising step instead of a few hundred, which matters where the
  step is short (small sizes, few-step models). The graphs share one memory pool, holding one step's
  activations; `StepGraphs.capacity` layouts are kept (least recently used dropped).

On a CPU, Inductor compiles the blocks to C++ (it needs a C++ compiler: `check_compile`, which the engine
runs before loading anything); the compiled engine's output equals the eager one within fp32 rounding.
"""
from __future__ import annotations

import os
import shutil
from typing import Mapping

import torch

from .cache import LRUCache
from .kernels import SegmentMap, dit_ops
from .models.dit import TextKV, WanDiT
from .request import RequestError, show

COMPILE_MODES = (False, True, "cudagraphs")
# compiled variants of the block kept per code object: one per request shape (size x frames x references x
# guidance batch); torch's default of 8 would leave a server with more shapes running eagerly
RECOMPILE_LIMIT = 64


def check_compile(mode: bool | str, device: torch.device, names: Mapping[str, str] | None = None) -> None:
    """Raise a RequestError, naming the setting as `names` spells it and the fix, unless `mode` can compile a
    DiT on `device`: a known mode, CUDA graphs only on CUDA, torch >= 2.5, a C++ compiler for a CPU."""
    asked = show(names, "compile") if mode is True else show(names, "compile", mode)  # --compile is on
    if mode not in COMPILE_MODES or isinstance(mode, int) and not isinstance(mode, bool):
        raise RequestError(f"{asked} is not one of False, True or 'cudagraphs'", "compile")
    if not mode:
        return
    if _torch_version() < (2, 5):
        raise RequestError(f"{asked} needs torch >= 2.5 (torch {torch.__version__} would compile each block on "
                           "its own instead of one graph for all); upgrade torch, or do not compile", "compile")
    if mode == "cudagraphs" and device.type != "cuda":
        raise RequestError(f"{asked} needs a CUDA device (CUDA graphs), the DiT is on {device}; compile without "
                           "CUDA graphs there", "compile")
    if device.type == "cpu" and not _cxx_compiler():
        raise RequestError(f"{asked}: on a CPU, Inductor compiles the blocks to C++ and needs a C++ compiler (g++ "
                           "or clang++ on PATH, or $CXX); install one, or do not compile", "compile")


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def compile_dit_(dit: WanDiT, mode: bool | str = True) -> WanDiT:
    """Compile `dit` for inference, in place (module docstring): every block with `nn.Module.compile` (static
    shapes), and with mode "cudagraphs" the step replayed from CUDA graphs. Call after the weights are final
    (LoRA merged, projections fused, FP8 swapped in): the compiled graph reads the modules as they are at the
    first call. mode False leaves the model as it is."""
    check_compile(mode, next(dit.parameters()).device)
    if not mode:
        return dit
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    # under backend "auto" the ops' candidates are timed as they will run: the norms' torch references
    # compiled (kernels/select.py); the torch and triton backends ignore the flag
    dit.ops = dit_ops(dit.backend, dit.attention_quant, compiled=True)
    for block in dit.blocks:
        block.compile(dynamic=False)
    if mode == "cudagraphs":
        dit.step_graphs = StepGraphs(dit)
    return dit


class _Graph:
    """One captured step: its input buffers (fixed addresses), the tensors last copied into them, its output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output
        self.sources: list[torch.Tensor | None] = [None] * len(inputs)

    def replay(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        for i, (buffer, t) in enumerate(zip(self.inputs, inputs)):
            if i < 2:  # the latent tokens and the timesteps: new at every step
                buffer.copy_(t)
            elif t is not self.sources[i]:  # the layout tables (segments, RoPE) and the text K/V: cached tensors,
                buffer.copy_(t)  # never written in place, the same objects at every step of a generation
                self.sources[i] = t
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the graph's output


class StepGraphs:
    """`WanDiT.forward_tokens` replayed from CUDA graphs, one per call layout (the shapes and dtypes of its
    inputs and the segment lengths), at most `capacity` of them. Called as `forward_tokens` is, with the
    text as a `TextKV`; the first call of a layout runs the step eagerly once (compiling the blocks, timing
    `auto` ops and Triton configs, outside the capture) and captures it, every call replays."""

    def __init__(self, dit: WanDiT, capacity: int = 4):
        self.dit = dit
        self.graphs: LRUCache[tuple, _Graph] = LRUCache(capacity)
        self.pool = torch.cuda.graph_pool_handle()  # shared: steps run one at a time, outputs are copied out

    def __call__(self, patches: torch.Tensor, t_freq: torch.Tensor, segments: SegmentMap,
                 rope: tuple[torch.Tensor, torch.Tensor], text: TextKV) -> torch.Tensor:
        if not isinstance(text, TextKV):
            raise TypeError("the CUDA-graph step takes the text as a TextKV (WanDiT.prepare_text)")
        # patches [B, L, Cp], t_freq [B, S, F], segment index [L], RoPE 2 x [L, D/2], text K/V per block
        inputs = [patches, t_freq, segments.index, *rope, *(t for kv in text.kv for t in kv)]
        key = (tuple((tuple(t.shape), t.dtype, t.device) for t in inputs), segments.lens)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(inputs, segments.lens, len(text.kv))
            self.graphs.put(key, graph)
        return graph.replay(inputs)

    def _capture(self, inputs: list[torch.Tensor], lens: tuple[int, ...] | None, blocks: int) -> _Graph:
        static = [t.clone() for t in inputs]  # the graph reads its inputs here; refilled before each replay

        def step() -> torch.Tensor:
            kv = TextKV([(static[5 + 2 * i], static[6 + 2 * i]) for i in range(blocks)])
            return self.dit.forward_tokens(static[0], static[1], SegmentMap(static[2], lens),
                                           (static[3], static[4]), kv)

        # warm up on a side stream, as capture requires: Inductor compiles, auto ops and Triton autotune time
        # their candidates and cuBLAS creates its workspace here, none of which may happen under capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = step()
        return _Graph(graph, static, output)


__all__ = ["COMPILE_MODES", "RECOMPILE_LIMIT", "check_compile", "compile_dit_", "StepGraphs"]
