"""Flow-DPO: the loss formula, log 2 at initialisation, learning a synthetic preference, the SFT merge."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from anyid_rt.conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from anyid_rt.engine import Engine
from anyid_rt.lora import merge_lora_, read_lora
from anyid_rt.trainer.config import DPOConfig, LoraConfig, ModelSource, OptimConfig
from anyid_rt.trainer.dist import DistInfo
from anyid_rt.trainer.dpo import build_dpo, evaluate_dpo, flow_dpo_loss, train_dpo
from anyid_rt.trainer.lora import (inject_lora, load_lora_weights_, lora_disabled, lora_metadata, lora_modules,
                                   save_trained_lora)
from anyid_rt.trainer.synthetic import make_preference_pairs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    # 4 learnable pairs (clean winner, degraded loser) and 2 whose labels fail the Pareto filter
    return make_preference_pairs(tmp_path_factory.mktemp("pairs"), pairs=4, dominated=2)


def config(pairs, out, **kw) -> DPOConfig:
    base = dict(output_dir=str(out), model=ModelSource(preset="tiny"), pairs=str(pairs), buckets=((9, 64, 64),),
                lora=LoraConfig(rank=8, alpha=8.0, save_dtype="fp32"), optim=OptimConfig(lr=1e-3), beta=500.0,
                max_steps=16, checkpoint_every=0, log_every=1, mixed_precision="fp32", gradient_checkpointing=False,
                batch_size=2, grad_accum=1, progress=False)
    base.update(kw)
    return DPOConfig(**base)


def test_flow_dpo_loss_matches_eq_3_4():
    pw, pl, rw, rl = (torch.tensor([v]) for v in (1.0, 3.0, 2.0, 1.0))
    loss, logits = flow_dpo_loss(pw, pl, rw, rl, beta=0.5)
    # S+ = 1 - 2 = -1, S- = 3 - 1 = 2, logit = -0.5 * (-1 - 2) = 1.5
    assert logits.item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.rand(5, generator=g) for _ in range(4))
    loss, logits = flow_dpo_loss(a, b, c, d, beta=7.0)
    torch.testing.assert_close(loss, -F.logsigmoid(-7.0 * ((a - c) - (b - d))).mean())
    # a policy that lowers the winner's error relative to the reference is rewarded: logits > 0
    assert flow_dpo_loss(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0]),
                         1.0)[1].item() > 0


def test_dpo_loss_is_log2_at_init_and_training_raises_implicit_accuracy(pairs, tmp_path):
    cfg = config(pairs, tmp_path / "run")
    engine, layout, data, batcher, _, total = build_dpo(cfg, DistInfo())
    assert total == 6 and len(data) == 4  # the Pareto filter dropped the two dominated pairs
    # image; image + a 9-frame clip at 8 fps, 25 frames at the layout's 24 fps (7 latent frames)
    assert [s.ref_frames for s in data.specs] == [(1,), (1, 7), (1,), (1, 7)]
    before = evaluate_dpo(engine.dit, layout, batcher, cfg.beta)
    # fresh LoRA (up = 0): policy == reference bit for bit, so every margin is 0 and the loss is log 2
    assert before["margin"] == 0.0 and before["accuracy"] == 0.0
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-7)

    result = train_dpo(cfg)
    first = result.history[0]
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-7) and first["reward_margin"] == 0.0
    assert first["mse_winner"] == first["ref_mse_winner"]
    load_lora_weights_(engine.dit, read_lora(result.lora_path))
    after = evaluate_dpo(engine.dit, layout, batcher, cfg.beta)  # noise / timesteps not seen in training
    print(f"dpo: implicit accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, margin "
          f"{before['margin']:.3f} -> {after['margin']:.3f}, loss {before['loss']:.4f} -> {after['loss']:.4f}")
    assert after["accuracy"] >= 0.75 and after["margin"] > 0 and after["loss"] < math.log(2)
    with lora_disabled(engine.dit):  # the reference is untouched by training
        assert evaluate_dpo(engine.dit, layout, batcher, cfg.beta)["margin"] == 0.0
    meta = read_lora(result.lora_path).metadata
    assert meta["anyid.stage"] == "dpo" and float(meta["anyid.dpo_beta"]) == 500.0


def test_starts_from_the_merged_sft_lora(pairs, tmp_path):
    """The SFT LoRA is merged into the base; the reference prediction (LoRA off) is that merged model, and the
    SFT LoRA's layout becomes the run's layout."""
    layout = ConditioningLayout(placement="before")
    sft_engine = Engine.tiny(seed=0)
    inject_lora(sft_engine.dit, rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(sft_engine.dit).values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.1)
    sft_path = save_trained_lora(sft_engine.dit, tmp_path / "sft.safetensors",
                                 lora_metadata(sft_engine.dit, layout=layout, base_model="tiny(seed=0)"))
    cfg = config(pairs, tmp_path / "run", sft_lora=str(sft_path), max_steps=1)
    engine, run_layout, data, batcher, _, _ = build_dpo(cfg, DistInfo())
    assert run_layout == layout and read_lora(sft_path).metadata[LAYOUT_METADATA_KEY] == layout.to_json()
    merged = Engine.tiny(seed=0).dit
    merge_lora_(merged, read_lora(sft_path))
    x = torch.randn(1, 48, 3, 4, 4, generator=g)
    ctx = [torch.randn(5, 32, generator=g)]
    with torch.no_grad(), lora_disabled(engine.dit):
        ref = engine.dit(x, torch.tensor([500.0]), ctx)
    torch.testing.assert_close(ref, merged(x, torch.tensor([500.0]), ctx))
    base = Engine.tiny(seed=0).dit
    with torch.no_grad():
        assert (ref - base(x, torch.tensor([500.0]), ctx)).abs().max() > 1e-3  # the merge changed the model
    result = train_dpo(cfg)
    meta = read_lora(result.lora_path).metadata
    assert meta["anyid.apply_after"] == "sft.safetensors" and "sft.safetensors" in meta["anyid.base_model"]
    assert ConditioningLayout.from_json(meta[LAYOUT_METADATA_KEY]) == layout
