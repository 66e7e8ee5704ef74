"""Trainer LoRA: module swap, enable / disable / merge, the saved file in the engine and in diffusers' loader."""
from __future__ import annotations

import json

import pytest
import torch

from safetensors.torch import load_file

from anyid_rt import media
from anyid_rt.conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from anyid_rt.config import DiTConfig
from anyid_rt.engine import Engine
from anyid_rt.lora import merge_lora_, read_lora
from anyid_rt.models.dit import WanDiT
from anyid_rt.models.dit_loader import diffusers_to_original, original_to_diffusers
from anyid_rt.trainer.lora import (LoraLinear, inject_lora, load_lora_weights_, lora_disabled, lora_metadata,
                                   lora_modules, lora_parameters, merge_lora, remove_lora, save_trained_lora,
                                   set_lora_enabled, unmerge_lora)

from helpers import diffusers_dit, relerr


pytestmark = pytest.mark.usefixtures("one_thread")


CFG = DiTConfig.preset("tiny")


def inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 48, 3, 4, 6, generator=g)
    ctx = [torch.randn(n, CFG.text_dim, generator=g) for n in (7, 11)[:batch]]
    return latent, torch.tensor([900.0, 250.0][:batch]), ctx


def randomize_up_(dit, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(dit).values():
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * std)


def fresh_dit(seed=0):
    torch.manual_seed(seed)
    return WanDiT(CFG).eval()


def test_inject_is_exact_at_init_and_keeps_state_dict_keys():
    dit = fresh_dit()
    keys = set(dit.state_dict())
    x, t, ctx = inputs()
    with torch.no_grad():
        want = dit(x, t, ctx)
    names = inject_lora(dit, rank=4, alpha=8.0)
    assert len(names) == 10 * CFG.num_layers
    assert {n.split(".", 2)[2] for n in names} == {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                   "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                                                   "ffn.0", "ffn.2"}
    lora_keys = {k for k in dit.state_dict() if ".lora_" in k}
    assert set(dit.state_dict()) - lora_keys == keys  # base weights keep their names (LoraLinear owns them)
    trainable = [n for n, p in dit.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_down" in n or ".lora_up" in n for n in trainable)
    assert len(lora_parameters(dit)) == 2 * len(names)
    m = dit.blocks[0].self_attn.q
    assert isinstance(m, LoraLinear) and m.scale == 2.0 and torch.count_nonzero(m.lora_up) == 0
    assert m.lora_down.abs().max() > 0  # kaiming, not zero
    with torch.no_grad():
        assert torch.equal(dit(x, t, ctx), want)  # up = 0: bit-identical to the base model


def test_enable_disable_merge_unmerge_remove():
    dit = fresh_dit()
    x, t, ctx = inputs()
    with torch.no_grad():
        base = dit(x, t, ctx)
        w0 = dit.blocks[1].ffn[2].weight.clone()
    inject_lora(dit, rank=4, alpha=4.0)
    randomize_up_(dit)
    with torch.no_grad():
        active = dit(x, t, ctx)
        assert relerr(active, base) > 1e-3  # the LoRA does something
        with lora_disabled(dit):
            assert torch.equal(dit(x, t, ctx), base)  # the DPO reference: the same model, LoRA off
        assert torch.equal(dit(x, t, ctx), active)  # re-enabled after the block
        set_lora_enabled(dit, False)
        assert torch.equal(dit(x, t, ctx), base)
        set_lora_enabled(dit, True)
        merge_lora(dit)
        assert relerr(dit(x, t, ctx), active) < 1e-5
        with pytest.raises(RuntimeError, match="unmerge"):
            set_lora_enabled(dit, False)
        unmerge_lora(dit)
        assert torch.allclose(dit.blocks[1].ffn[2].weight, w0, atol=1e-6)
        m = dit.blocks[1].ffn[2]
        want = w0 + m.scale * m.lora_up @ m.lora_down
        remove_lora(dit, merge=True)
        assert type(dit.blocks[1].ffn[2]) is torch.nn.Linear and not lora_modules(dit)
        torch.testing.assert_close(dit.blocks[1].ffn[2].weight, want, rtol=1e-5, atol=1e-6)
        assert relerr(dit(x, t, ctx), active) < 1e-5


def test_gradients_reach_only_the_lora():
    dit = fresh_dit()
    inject_lora(dit, rank=2, alpha=2.0)
    x, t, ctx = inputs()
    dit(x, t, ctx).square().mean().backward()
    ups = [m.lora_up.grad for m in lora_modules(dit).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)  # B gets gradient first (A does once B != 0)
    assert all(p.grad is None for n, p in dit.named_parameters() if ".lora_" not in n)


def test_target_patterns():
    dit = fresh_dit()
    names = inject_lora(dit, 2, 2.0, targets=[r"blocks\.\d+\.self_attn\.q", r"blocks\.1\.ffn\.0"])
    assert names == ["blocks.0.self_attn.q", "blocks.1.self_attn.q", "blocks.1.ffn.0"]
    with pytest.raises(ValueError, match="already holds LoRA"):
        inject_lora(dit, 2, 2.0)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        inject_lora(fresh_dit(), 2, 2.0, targets=[r"blocks\.\d+\.attn1\.to_q"])
    with pytest.raises(ValueError, match="rank"):
        inject_lora(fresh_dit(), 0, 2.0)


def test_saved_lora_in_the_engine_matches_the_in_memory_model(tmp_path):
    """Engine.from_pretrained(folder, lora=file) reproduces the trained in-memory model (and its layout)."""
    layout = ConditioningLayout(placement="before", pad_color=(16, 16, 16))
    trained = Engine.tiny(seed=0, layout=layout)
    folder = trained.save_pretrained(tmp_path / "model")  # the base weights, before injection
    inject_lora(trained.dit, rank=4, alpha=8.0)
    randomize_up_(trained.dit, std=0.1)
    meta = lora_metadata(trained.dit, layout=layout, base_model="tiny(seed=0)")
    path = save_trained_lora(trained.dit, tmp_path / "lora.safetensors", meta)
    lora = read_lora(path)
    assert lora.metadata["anyid.lora_rank"] == "4" and float(lora.metadata["anyid.lora_alpha"]) == 8.0
    assert json.loads(lora.metadata["anyid.lora_targets"]) and lora.metadata["anyid.base_model"] == "tiny(seed=0)"
    assert ConditioningLayout.from_json(lora.metadata[LAYOUT_METADATA_KEY]) == layout
    assert all(k.startswith("diffusion_model.blocks.") for k in load_file(str(path)))

    loaded = Engine.from_pretrained(folder, lora=path, dtype="fp32", backend="torch", device="cpu")
    assert loaded.layout == layout
    refs = [str(media.ASSET_DIR / "astronaut.png")]
    kw = dict(references=refs, steps=2, seed=3, progress=False)
    want = trained.generate("a smile", **kw).latents  # LoRA active, not merged
    got = loaded.generate("a smile", **kw).latents
    assert relerr(got, want) < 1e-4
    base = Engine.tiny(seed=0, layout=layout)
    merge_lora_(base.dit, lora)  # the same through anyid_rt.lora directly
    assert relerr(base.generate("a smile", **kw).latents, want) < 1e-4
    with lora_disabled(trained.dit):  # and the file is not a no-op
        assert relerr(trained.generate("a smile", **kw).latents, want) > 1e-3


def test_load_lora_weights_round_trip(tmp_path):
    a, b = fresh_dit(), fresh_dit()
    inject_lora(a, 4, 4.0)
    inject_lora(b, 4, 4.0)
    randomize_up_(a)
    path = save_trained_lora(a, tmp_path / "l.safetensors", {})
    load_lora_weights_(b, read_lora(path))
    x, t, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(a(x, t, ctx), b(x, t, ctx))
    c = fresh_dit()
    inject_lora(c, 2, 4.0)
    with pytest.raises(ValueError, match="rank"):
        load_lora_weights_(c, read_lora(path))


def test_saved_keys_load_in_diffusers_wan_lora_converter(tmp_path):
    """diffusers' WanLoraLoaderMixin.lora_state_dict converts our ComfyUI keys (alpha folded in); the converted
    LoRA merged into diffusers' WanTransformer3DModel gives our DiT's output with the LoRA active."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    oracle = diffusers_dit(CFG, seed=0)
    ours = WanDiT(CFG).eval()
    ours.load_state_dict({diffusers_to_original(k): v for k, v in oracle.state_dict().items()})
    inject_lora(ours, rank=4, alpha=6.0)  # scale 1.5: checks that alpha / rank is applied
    randomize_up_(ours, std=0.1)
    path = save_trained_lora(ours, tmp_path / "lora.safetensors", {"anyid.stage": "sft"})

    converted = WanLoraLoaderMixin.lora_state_dict(str(path))
    converted = {k.removeprefix("transformer."): v for k, v in converted.items()}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in converted)
    modules = {k.rsplit(".lora_", 1)[0] for k in converted}
    assert modules == {original_to_diffusers(n + ".weight").removesuffix(".weight") for n in lora_modules(ours)}
    named = dict(oracle.named_modules())
    with torch.no_grad():
        for name in modules:
            w = named[name].weight
            w += converted[f"{name}.lora_B.weight"].float() @ converted[f"{name}.lora_A.weight"].float()

    x, t, ctx = inputs()
    padded = torch.zeros(2, CFG.text_len, CFG.text_dim)
    for i, c in enumerate(ctx):
        padded[i, :len(c)] = c
    with torch.no_grad():
        want = ours(x, t, ctx)
        got = oracle(x, t, padded, return_dict=False)[0]
        with lora_disabled(ours):
            base = ours(x, t, ctx)
    assert relerr(got, want) <= 1e-4
    assert relerr(base, want) > 1e-3  # the LoRA matters, so the comparison can fail
