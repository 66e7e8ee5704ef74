"""The compiled engine (anyid_rt/compiled.py): regional torch.compile of the DiT block, CUDA graphs of the step.

On a CPU: the block traces to one graph with no breaks, with the real argument types (SegmentMap, RoPE tables,
text K/V, DiTOps) for every kernel backend, fused or not, FP8 or not; one compiled graph serves every block and
a generation compiles once; the compiled engine's output equals the eager one within fp32 rounding. The CUDA
graph step is checked on a GPU (marker `gpu`).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from anyid_rt import Engine
from anyid_rt.cli import main
from anyid_rt.compiled import RECOMPILE_LIMIT, check_compile, compile_dit_
from anyid_rt.config import DiTConfig
from anyid_rt.models.linears import fused_names
from anyid_rt.models.random_weights import random_dit
from anyid_rt.quant import FP8_TARGETS, quantize_dit_fp8_
from anyid_rt.request import RequestError

from helpers import relerr

CFG = DiTConfig.preset("tiny")
SIZE = dict(height=64, width=64, num_frames=5)  # 2 latent frames of 4 x 4 tokens


def block_call(dit, L: int = 16):
    """A block's arguments as WanDiT.forward_tokens passes them, for L tokens in two segments."""
    g = torch.Generator().manual_seed(0)
    text = dit.prepare_text([torch.randn(5, CFG.text_dim, generator=g), torch.randn(3, CFG.text_dim, generator=g)])
    x = torch.randn(2, L, CFG.dim, generator=g)  # fp32 residual stream
    e0 = torch.randn(2, 2, 6, CFG.dim, generator=g)  # per-segment modulation
    return x, e0, dit.segment_map((L - 7, 7), x.device), dit.rope([(2, 2, L // 4)], [0], x.device), text.kv[0], dit.ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", ["checkpoint", "fused", "fused fp8"])
def test_block_has_no_graph_breaks(backend, variant):
    dit = random_dit(CFG, seed=0, backend=backend)
    if variant != "checkpoint":
        dit.fuse_projections()
    if variant == "fused fp8":
        quantize_dit_fp8_(dit, fused_names(FP8_TARGETS), use_scaled_mm=False)
    with torch.no_grad():
        explained = torch._dynamo.explain(dit.blocks[0])(*block_call(dit))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_engine_equals_eager_and_compiles_once():
    """Engine.tiny(compile=True): the velocity of every step comes from one compiled block graph shared by both
    blocks, compiled at the first step and never again in the generation; another request size compiles one
    more graph. The video's latents equal the eager engine's within fp32 rounding."""
    eager = Engine.tiny(seed=0).generate("a prompt", steps=2, progress=False, **SIZE)
    torch._dynamo.reset()
    counters.clear()
    engine = Engine.tiny(seed=0, compile=True)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT
    video = engine.generate("a prompt", steps=2, progress=False, **SIZE)  # 2 steps x 2 blocks, one compile
    assert counters["stats"]["unique_graphs"] == 1
    assert relerr(video.latents, eager.latents) <= 1e-5
    engine.generate("a prompt", steps=1, progress=False, height=64, width=96, num_frames=5)
    assert counters["stats"]["unique_graphs"] == 2  # a new size: one more graph, for both blocks


def test_compile_is_checked_before_loading(monkeypatch, tmp_path):
    with pytest.raises(RequestError, match=r"compile='cudagraphs' needs a CUDA device \(CUDA graphs\), the DiT is "
                                           r"on cpu; compile without CUDA graphs there"):
        Engine.tiny(compile="cudagraphs")
    with pytest.raises(RequestError, match=r"compile='max-autotune' is not one of False, True or 'cudagraphs'"):
        Engine.tiny(compile="max-autotune")
    with pytest.raises(RequestError, match="is not one of"):
        Engine.tiny(compile=1)
    monkeypatch.setattr("anyid_rt.compiled._cxx_compiler", lambda: None)
    with pytest.raises(RequestError, match=r"compile: on a CPU, Inductor compiles the blocks to C\+\+ and needs a "
                                           r"C\+\+ compiler"):
        check_compile(True, torch.device("cpu"))
    check_compile(False, torch.device("cpu"))  # not compiling needs nothing
    # the CLI names its flag, and refuses before any weight is read (exit code 2)
    assert main(["generate", "--tiny", "--prompt", "p", "--compile", "--out", str(tmp_path / "v.mp4")]) == 2
    assert main(["generate", "--tiny", "--prompt", "p", "--compile", "cudagraphs", "--device", "cpu",
                 "--out", str(tmp_path / "v.mp4")]) == 2
    assert not (tmp_path / "v.mp4").exists()


def test_compile_dit_needs_a_known_mode():
    dit = random_dit(CFG, seed=0)
    assert compile_dit_(dit, False) is dit and dit.step_graphs is None
    with pytest.raises(RequestError, match="is not one of"):
        compile_dit_(dit, "default")


@pytest.mark.gpu
def test_cudagraph_step_equals_eager_on_gpu():
    """compile="cudagraphs": one captured step per layout, replayed at every step and by the next request of
    the same layout; the latents equal the eager engine's within the bf16 GEMMs' rounding (fp32 here: 1e-5)."""
    eager = Engine.tiny(seed=0, device="cuda").generate("a prompt", steps=3, progress=False, **SIZE)
    engine = Engine.tiny(seed=0, device="cuda", compile="cudagraphs")
    video = engine.generate("a prompt", steps=3, progress=False, **SIZE)
    graphs = engine.dit.step_graphs.graphs
    assert len(graphs) == 1 and graphs.misses == 1 and graphs.hits == 2
    assert relerr(video.latents, eager.latents) <= 1e-5
    again = engine.generate("a prompt", steps=3, progress=False, **SIZE)
    assert len(graphs) == 1 and torch.equal(again.latents, video.latents)
