"""Fused projections (WanDiT.fuse_projections): self-attention q, k, v as one GEMM, the text k, v as another.

The fused model computes what the unfused one computes; checkpoints, LoRA files, LoRA training and the ONNX
export keep the checkpoint's separate layers and names; the engine fuses after the LoRA merge and FP8
quantises the fused layers.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from anyid_rt import Engine
from anyid_rt.config import DiTConfig
from anyid_rt.export.onnx_dit import DiTStep
from anyid_rt.lora import LoraWeights, check_lora_fits, merge_lora_
from anyid_rt.models import CheckpointError, Segments, load_dit, save_dit
from anyid_rt.models.dit import FusedCrossAttention, FusedSelfAttention
from anyid_rt.models.linears import BLOCK_LINEARS, TEXT_KV_LINEARS, checkpoint_names, fused_names
from anyid_rt.models.random_weights import random_dit
from anyid_rt.quant import FP8_TARGETS, FP8Linear, quantize_dit_fp8_
from anyid_rt.trainer.lora import inject_lora, lora_to_weights

from helpers import relerr

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = DiTConfig.preset("tiny")
B, F, H, W = 2, 3, 4, 6  # latent grid: (H/2)(W/2) = 6 tokens per frame


def call(seed: int = 0):
    """A forward_groups call with a reference group and image-to-video-like segments (three segments)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(B, 48, F, H, W, generator=g)
    ref = torch.randn(B, 48, 1, H, W, generator=g)
    per_frame = (H // 2) * (W // 2)
    segs = Segments((per_frame, (F - 1) * per_frame, per_frame), torch.tensor([[0.0, 640.0, 0.0], [0.0, 320.0, 0.0]]))
    ctx = [torch.randn(n, CFG.text_dim, generator=g) for n in (7, 11)]
    return [latent, ref], [0, F], segs, ctx


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_forward_equals_unfused(backend):
    """Same velocity with the fused GEMMs (their q, k, v and text v are strided column blocks of one output,
    which the Triton norms and attention read as they are) as with the checkpoint's separate layers."""
    dit = random_dit(CFG, seed=0, backend=backend)
    args = call()
    with torch.no_grad():
        want = dit.forward_groups(*args)
        dit.fuse_projections()
        got = dit.forward_groups(*args)
    assert dit.projections_fused
    assert relerr(got, want) <= 1e-6


def test_fused_layers_stack_the_pieces_and_unfuse_back():
    dit = random_dit(CFG, seed=1)
    before = dit.state_dict()
    dit.fuse_projections().fuse_projections()  # fusing twice changes nothing
    block = dit.blocks[1]
    assert isinstance(block.self_attn, FusedSelfAttention) and isinstance(block.cross_attn, FusedCrossAttention)
    assert not hasattr(block.self_attn, "q") and not hasattr(block.cross_attn, "k")
    qkv = block.self_attn.qkv
    assert isinstance(qkv, nn.Linear) and qkv.weight.shape == (3 * CFG.dim, CFG.dim)
    assert torch.equal(qkv.weight, torch.cat([before[f"blocks.1.self_attn.{x}.weight"] for x in "qkv"]))
    assert torch.equal(qkv.bias, torch.cat([before[f"blocks.1.self_attn.{x}.bias"] for x in "qkv"]))
    assert torch.equal(block.cross_attn.kv.weight,
                       torch.cat([before[f"blocks.1.cross_attn.{x}.weight"] for x in "kv"]))
    after = dit.unfuse_projections().state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(type(m) is nn.Linear for n, m in dit.named_modules() if n.endswith((".q", ".k", ".v")))
    # each unfused layer owns its rows again (no view of a stacked weight: safetensors needs that)
    assert after["blocks.0.self_attn.k.weight"].untyped_storage().nbytes() == CFG.dim * CFG.dim * 4


def test_checkpoint_names_and_save_round_trip(tmp_path):
    """A fused model saves the checkpoint's keys, in the checkpoint's order; loading them back gives the
    same weights and the same forward."""
    dit = random_dit(CFG, seed=2)
    want = dit.state_dict()
    dit.fuse_projections()
    assert all(".qkv." in k or ".kv." in k or k in want for k in dit.state_dict())
    sd = dit.checkpoint_state_dict()
    assert list(sd) == list(want) and all(torch.equal(sd[k], want[k]) for k in want)
    save_dit(dit, tmp_path / "dit", shards=2)
    loaded = load_dit(tmp_path / "dit", dtype=torch.float32, backend="torch")
    assert not loaded.projections_fused
    got = loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    args = call(1)
    with torch.no_grad():
        assert relerr(loaded.forward_groups(*args), dit.forward_groups(*args)) <= 1e-6


def test_engine_fuses_and_saves_the_split_keys(tmp_path):
    engine = Engine.tiny(seed=0)
    assert engine.dit.projections_fused
    folder = engine.save_pretrained(tmp_path / "model")
    keys = set()
    for f in folder.glob("diffusion_pytorch_model-*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys |= set(st.keys())
    assert {"blocks.0.self_attn.q.weight", "blocks.1.cross_attn.v.bias"} <= keys
    assert not any(".qkv." in k or ".kv." in k for k in keys)
    again = Engine.from_pretrained(folder, dtype="fp32", backend="torch", device="cpu", progress=False)
    a, b = engine.dit.checkpoint_state_dict(), again.dit.checkpoint_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _lora(dit: nn.Module, names: list[str], seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    mods = dict(dit.named_modules())
    down = {n: torch.randn(4, mods[n].in_features, generator=g) * 0.1 for n in names}
    up = {n: torch.randn(mods[n].out_features, 4, generator=g) * 0.1 for n in names}
    return LoraWeights(down, up, {n: 8.0 for n in names})


def test_lora_merges_into_the_fused_rows():
    """A LoRA names the checkpoint's layers; merged into a fused model it lands in its piece's rows, exactly as
    merging it before fusing would."""
    names = ["blocks.0.self_attn.k", "blocks.1.self_attn.v", "blocks.0.cross_attn.v", "blocks.1.ffn.2"]
    lora = _lora(random_dit(CFG, seed=3), names)
    first = random_dit(CFG, seed=3)
    merge_lora_(first, lora)
    first.fuse_projections()
    then = random_dit(CFG, seed=3).fuse_projections()
    merge_lora_(then, lora)
    a, b = first.state_dict(), then.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = random_dit(CFG, seed=3).fuse_projections().state_dict()
    d = CFG.dim
    changed = (a["blocks.0.self_attn.qkv.weight"] != base["blocks.0.self_attn.qkv.weight"]).any(1)  # per row
    assert changed[d:2 * d].all() and not changed[:d].any() and not changed[2 * d:].any()  # k's rows only
    wrong = LoraWeights({"blocks.0.self_attn.q": torch.zeros(4, d + 1)}, {"blocks.0.self_attn.q": torch.zeros(d, 4)},
                        {"blocks.0.self_attn.q": 4.0})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q: LoRA 64x65 vs weight \(64, 64\)"):
        check_lora_fits(then, wrong)


def test_lora_training_unfuses_and_keeps_the_checkpoint_keys():
    """Training adapts the separate q, k, v (the engine's DiT is fused: inject_lora unfuses it), so trained
    LoRA files carry the checkpoint's module names."""
    dit = Engine.tiny(seed=0).dit
    names = inject_lora(dit, rank=2, alpha=2.0, seed=0)
    assert not dit.projections_fused
    assert {n.split(".", 2)[2] for n in names} == set(BLOCK_LINEARS)
    assert set(lora_to_weights(dit).modules) == set(names)


def test_export_runs_the_unfused_model():
    """The ONNX graph names one MatMul per checkpoint layer: DiTStep unfuses a fused DiT."""
    dit = random_dit(CFG, seed=4).fuse_projections()
    step = DiTStep(dit)
    assert step.dit is dit and not dit.projections_fused
    assert isinstance(dit.blocks[0].self_attn.q, nn.Linear)


def test_fp8_quantises_the_fused_layers():
    """The FP8 engine quantises q, k, v as one layer (one input quantisation, the same per-channel weight
    scales as three layers) and leaves the text k, v in high precision."""
    assert fused_names(FP8_TARGETS) == ("self_attn.qkv", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0",
                                        "ffn.2")
    unfused = random_dit(CFG, seed=5)
    quantize_dit_fp8_(unfused, use_scaled_mm=False)
    fused = random_dit(CFG, seed=5).fuse_projections()
    quantize_dit_fp8_(fused, fused_names(FP8_TARGETS), use_scaled_mm=False)
    block = fused.blocks[0]
    assert isinstance(block.self_attn.qkv, FP8Linear) and type(block.cross_attn.kv) is nn.Linear
    assert torch.equal(block.self_attn.qkv.weight_scale.flatten(),
                       torch.cat([unfused.blocks[0].self_attn.get_submodule(x).weight_scale.flatten() for x in "qkv"]))
    args = call(2)
    with torch.no_grad():
        assert relerr(fused.forward_groups(*args), unfused.forward_groups(*args)) <= 1e-6
    engine = Engine.tiny(seed=0, quant="fp8")
    assert isinstance(engine.dit.blocks[1].self_attn.qkv, FP8Linear)
    assert type(engine.dit.blocks[1].cross_attn.kv) is nn.Linear


def test_fused_name_lists():
    assert fused_names(BLOCK_LINEARS) == ("self_attn.qkv", "self_attn.o", "cross_attn.q", "cross_attn.kv",
                                          "cross_attn.o", "ffn.0", "ffn.2")
    assert fused_names(("cross_attn.q", "ffn.0")) == ("cross_attn.q", "ffn.0")
    with pytest.raises(ValueError, match=r"self_attn\.q is part of the fused self_attn\.qkv, but "
                                         r"\[.self_attn\.v.\] are not"):
        fused_names(("self_attn.q", "self_attn.k"))
    assert checkpoint_names("blocks.7.self_attn.qkv") == ("blocks.7.self_attn.q", "blocks.7.self_attn.k",
                                                          "blocks.7.self_attn.v")
    assert checkpoint_names("blocks.7.cross_attn.kv") == tuple(f"blocks.7.{n}" for n in TEXT_KV_LINEARS)
    assert checkpoint_names("blocks.7.cross_attn.q") == ("blocks.7.cross_attn.q",)
