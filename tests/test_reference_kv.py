"""Isolated reference attention: the two-call attention against a dense-mask oracle, the cached engine (reference
K/V computed once) against the uncached isolated forward over whole generations, LoRAs running with the
attention they were trained with (a joint LoRA never uses the K/V cache), the trainer's forward, and export
refusing what its graphs cannot run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anyid_rt import Engine
from anyid_rt.conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from anyid_rt.config import ModelConfig
from anyid_rt.lora import LoraWeights, save_lora
from anyid_rt.models.checkpoint import CheckpointError
from anyid_rt.models.dit import Segments, count_flops
from anyid_rt.reference_kv import isolated_forward
from anyid_rt.step_cache import CacheCalibration

ISOLATED = ConditioningLayout(reference_attention="isolated")
KW = dict(height=64, width=64, num_frames=5, steps=4, progress=False)
REFS = [np.full((48, 40, 3), 120, np.uint8), np.random.default_rng(1).integers(0, 255, (5, 64, 48, 3), np.uint8)]


@pytest.fixture(scope="module")
def isolated():
    return Engine.tiny(seed=0, layout=ISOLATED)


def _masked_attention(n_target: int):
    """The oracle: one attention over every token with a dense mask (reference queries see reference keys only)."""
    def attend(q, k, v):  # [B, L, H, D]
        L = q.shape[1]
        allowed = torch.ones(L, L, dtype=torch.bool)
        allowed[n_target:, :n_target] = False
        scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / q.shape[-1] ** 0.5
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("bhlm,bmhd->blhd", p, v.float()).to(q.dtype)
    return attend


def test_isolated_forward_equals_a_masked_attention_oracle(isolated):
    dit, g = isolated.dit, torch.Generator().manual_seed(0)
    target = torch.randn(2, 48, 2, 4, 4, generator=g)
    refs = [torch.randn(2, 48, 1, 4, 4, generator=g), torch.randn(2, 48, 2, 4, 4, generator=g)]
    seg = Segments((8, 4, 8), torch.tensor([[700.0, 0.0, 0.0]] * 2))
    ctx = [torch.randn(5, dit.cfg.text_dim, generator=g), torch.randn(3, dit.cfg.text_dim, generator=g)]
    with torch.inference_mode():
        got = isolated_forward(dit, [target, *refs], [0, 2, 3], seg, ctx)
        oracle = dit.forward_groups(
            [target, *refs], [0, 2, 3], seg, ctx,
            lambda x, e, e0, s, r, kv, ops: dit.run_blocks(x, e0, s, r, kv, ops, lambda i: _masked_attention(8)))
        joint = dit.forward_groups([target, *refs], [0, 2, 3], seg, ctx)
    torch.testing.assert_close(got, oracle, rtol=1e-5, atol=1e-5)
    assert (got - joint).abs().max() > 1e-3  # isolation changes the result: the test can tell them apart


@pytest.mark.parametrize("extra", [dict(), dict(guidance=1.0, image=np.full((64, 64, 3), 60, np.uint8))])
def test_cached_engine_equals_uncached_isolated_generation(isolated, extra):
    """Whole generations: the references' K/V computed once (one reference pass, the steps over the target's
    tokens alone) give the latents of the isolated forward over every token at every step, within fp32 rounding."""
    cached = isolated.generate("A man waves.", references=REFS, seed=3, **KW, **extra)
    isolated.reuse_reference_kv = False
    try:
        full = isolated.generate("A man waves.", references=REFS, seed=3, **KW, **extra)
    finally:
        isolated.reuse_reference_kv = True
    assert cached.stats["reference_passes"] == 1 and full.stats["reference_passes"] == 0
    assert cached.stats["dit_forwards"] == full.stats["dit_forwards"]
    torch.testing.assert_close(cached.latents, full.latents, rtol=1e-5, atol=2e-5)


def test_cached_engine_with_references_placed_before_and_a_step_cache():
    layout = ConditioningLayout(reference_attention="isolated", placement="before")
    engine = Engine.tiny(seed=0, layout=layout)
    engine.cache_calibration = CacheCalibration(4, ((1.0, 1.0), (0.9, 0.99), (0.99, 0.99), (0.99, 0.99)), (1.0,), "t")
    a = engine.generate("A man waves.", references=REFS[:1], cache="magcache", cache_threshold=0.05, **KW)
    engine.reuse_reference_kv = False
    b = engine.generate("A man waves.", references=REFS[:1], cache="magcache", cache_threshold=0.05, **KW)
    assert a.stats["dit_forwards_skipped"] == b.stats["dit_forwards_skipped"] > 0  # rows skip apart: row subsets
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=2e-5)


def _lora(path, layout: ConditioningLayout | None):
    name, g = "blocks.1.self_attn.v", torch.Generator().manual_seed(0)
    meta = {} if layout is None else {LAYOUT_METADATA_KEY: layout.to_json()}
    save_lora(LoraWeights({name: torch.randn(4, 64, generator=g) * 0.02}, {name: torch.randn(64, 4, generator=g) * 0.02},
                          {name: 4.0}, meta), path)
    return path


def test_a_lora_runs_with_the_attention_it_was_trained_with(tmp_path):
    joint = _lora(tmp_path / "joint.safetensors", ConditioningLayout())
    legacy = _lora(tmp_path / "legacy.safetensors", None)
    iso = _lora(tmp_path / "iso.safetensors", ISOLATED)
    for f in (joint, legacy):
        with pytest.raises(CheckpointError, match="trained with 'joint'"):
            Engine.tiny(lora=f, layout=ISOLATED)
    with pytest.raises(CheckpointError, match="trained with 'isolated'"):
        Engine.tiny(lora=iso, layout=ConditioningLayout())
    j = Engine.tiny(lora=joint)
    assert j.layout.reference_attention == "joint"
    assert j.generate("A man waves.", references=REFS[:1], **KW).stats["reference_passes"] == 0
    assert ConditioningLayout.from_json('{"placement": "after"}').reference_attention == "joint"  # old metadata
    i = Engine.tiny(lora=iso)
    assert i.layout.reference_attention == "isolated"
    assert i.generate("A man waves.", references=REFS[:1], **KW).stats["reference_passes"] == 1
    with pytest.raises(ValueError, match="reference_attention must be one of"):
        ConditioningLayout(reference_attention="sparse")


def test_trainer_forward_and_config_follow_the_layout(isolated):
    from anyid_rt.trainer.common import GroupsForward
    from anyid_rt.trainer.config import SFTConfig
    from anyid_rt.trainer.config_io import from_dict

    dit, g = isolated.dit, torch.Generator().manual_seed(1)
    latents = [torch.randn(1, 48, 2, 4, 4, generator=g), torch.randn(1, 48, 1, 4, 4, generator=g)]
    seg, ctx = Segments((8, 4), torch.tensor([[500.0, 0.0]])), [torch.randn(4, dit.cfg.text_dim, generator=g)]
    with torch.no_grad():
        torch.testing.assert_close(GroupsForward(dit, isolated=True)(latents, [0, 2], seg, ctx),
                                   isolated_forward(dit, latents, [0, 2], seg, ctx))
    cfg = from_dict(SFTConfig, {"model": {"preset": "tiny"}, "data": {"root": "x"},
                                "layout": {"reference_attention": "isolated"}})
    assert cfg.layout.reference_attention == "isolated"


def test_export_refuses_isolated_graphs(isolated):
    from anyid_rt.export.graph_engine import graph_engine

    with pytest.raises(ValueError, match="joint attention only"):
        graph_engine(isolated, None, None, None)


def test_flop_model_of_the_kv_cache():
    """ARCHITECTURE.md section 7: 1,759 TFLOP per forward at 58,080 tokens, 827 with the reference K/V reused."""
    cfg = ModelConfig.preset("wan2.2-ti2v-5b").dit
    joint, cached = count_flops(cfg, 58080), count_flops(cfg, 27280, 58080)
    assert round(joint / 1e12) == 1759 and abs(cached / 1e12 - 827) < 1.5 and cached / joint < 0.5  # 826.1


def test_nulled_reference_kv_is_computed_once_per_shape(isolated):
    """The unconditional row's reference pass (black references, empty prompt) is the same for every generation of
    a shape: the second generation takes it from the cache and still equals the uncached isolated forward."""
    isolated.null_reference_kv.clear()
    isolated.generate("A man waves.", references=REFS, seed=3, **KW)
    b = isolated.generate("A woman runs.", references=REFS, seed=4, **KW)
    assert isolated.null_reference_kv.info().hits == 1 and isolated.null_reference_kv.info().misses == 1
    isolated.reuse_reference_kv = False
    try:
        full = isolated.generate("A woman runs.", references=REFS, seed=4, **KW)
    finally:
        isolated.reuse_reference_kv = True
    torch.testing.assert_close(b.latents, full.latents, rtol=1e-5, atol=2e-5)
