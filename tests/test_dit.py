"""The DiT against diffusers' WanTransformer3DModel (tiny widths, random weights, fp32), and its loaders."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyid_rt.config import DiTConfig
from anyid_rt.models import CheckpointError, Segments, WanDiT, load_dit, save_dit
from anyid_rt.models.dit import count_flops, patchify
from anyid_rt.models.dit_loader import diffusers_to_original, original_to_diffusers

from helpers import diffusers_dit, relerr

CFG = DiTConfig.preset("tiny")
B, F, H, W = 2, 3, 4, 6  # latent grid; tokens per frame = (H/2)(W/2) = 6
TOKENS_PER_FRAME = (H // 2) * (W // 2)
TOL = 1e-4


@pytest.fixture(scope="module")
def oracle():
    return diffusers_dit(CFG, seed=0)


@pytest.fixture(scope="module")
def folders(oracle, tmp_path_factory):
    """The oracle saved in the diffusers layout, and converted to the original sharded layout and a repack."""
    root = tmp_path_factory.mktemp("dit")
    oracle.save_pretrained(root / "diffusers")
    sd = load_file(root / "diffusers" / "diffusion_pytorch_model.safetensors")
    original = {diffusers_to_original(k): v for k, v in sd.items()}
    model = WanDiT(CFG)
    model.load_state_dict(original)  # strict: every key of the original layout maps onto our modules
    save_dit(model, root / "original", layout="original", shards=3)
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, str(root / "repack.safetensors"))
    return root


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(B, 48, F, H, W, generator=g)
    lens = [7, 11]
    ctx = [torch.randn(n, CFG.text_dim, generator=g) for n in lens]
    padded = torch.zeros(B, CFG.text_len, CFG.text_dim)
    for i, c in enumerate(ctx):
        padded[i, :len(c)] = c
    return latent, ctx, padded


@pytest.mark.parametrize("layout", ["diffusers", "original", "repack.safetensors"])
def test_scalar_timestep_matches_diffusers(oracle, folders, layout):
    # a single-file repack has no config.json; its widths are tiny, not Wan's head_dim 128, so pass the config
    config = CFG if layout.endswith(".safetensors") else None
    model = load_dit(folders / layout, dtype=torch.float32, backend="torch", config=config)
    latent, ctx, padded = inputs()
    t = torch.tensor([999.0, 241.0])
    with torch.no_grad():
        want = oracle(latent, t, padded, return_dict=False)[0]
        got = model(latent, t, ctx)
    assert got.shape == (B, 48, F, H, W) and got.dtype == torch.float32
    assert relerr(got, want) <= TOL


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_per_token_timestep_frame0_clean_matches_diffusers(oracle, folders, layout):
    """Wan's image-to-video call: latent frame 0 at t=0, every other token at t (diffusers expand_timesteps)."""
    model = load_dit(folders / layout, dtype=torch.float32, backend="torch")
    latent, ctx, padded = inputs(1)
    t = torch.full((B, F * TOKENS_PER_FRAME), 732.0)
    t[:, :TOKENS_PER_FRAME] = 0
    with torch.no_grad():
        want = oracle(latent, t, padded, return_dict=False)[0]
        got = model(latent, t, padded)
    assert relerr(got, want) <= TOL


@pytest.mark.parametrize("placement", ["after", "before"])
def test_reference_groups_match_one_long_latent(oracle, folders, placement):
    """Reference latents as extra groups with their own RoPE frame indices equal, on the target tokens, one
    latent with the references concatenated in time and per-token t = 0 on them (diffusers as oracle)."""
    model = load_dit(folders / "original", dtype=torch.float32, backend="torch")
    latent, ctx, padded = inputs(2)
    g = torch.Generator().manual_seed(3)
    refs = [torch.randn(B, 48, 1, H, W, generator=g), torch.randn(B, 48, 2, H, W, generator=g)]
    ref_frames = sum(r.shape[2] for r in refs)
    n_target, n_ref = F * TOKENS_PER_FRAME, ref_frames * TOKENS_PER_FRAME
    t = 415.0
    if placement == "after":
        long = torch.cat([latent, *refs], dim=2)
        tt = torch.cat([torch.full((B, n_target), t), torch.zeros(B, n_ref)], dim=1)
        starts = [0, F, F + 1]
        target = slice(0, F)
    else:
        long = torch.cat([*refs, latent], dim=2)
        tt = torch.cat([torch.zeros(B, n_ref), torch.full((B, n_target), t)], dim=1)
        starts = [ref_frames, 0, 1]
        target = slice(ref_frames, ref_frames + F)
    segs = Segments((n_target, n_ref), torch.tensor([[t, 0.0]] * B))
    with torch.no_grad():
        want = oracle(long, tt, padded, return_dict=False)[0][:, :, target]
        got = model.forward_groups([latent, *refs], starts, segs, ctx)
    assert got.shape == latent.shape
    assert relerr(got, want) <= TOL


def test_prepared_text_kv_equals_raw_context(folders):
    model = load_dit(folders / "original", dtype=torch.float32)
    latent, ctx, _ = inputs(4)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        assert torch.equal(model(latent, t, model.prepare_text(ctx)), model(latent, t, ctx))


def test_segments_run_length_encoding():
    t = torch.tensor([[0, 0, 5, 5, 5, 7], [0, 0, 5, 5, 6, 7]], dtype=torch.float32)
    seg = Segments.from_timesteps(t, 6)
    assert seg.lens == (2, 2, 1, 1)
    assert seg.t.tolist() == [[0, 5, 5, 7], [0, 5, 6, 7]]
    assert Segments.from_timesteps(torch.tensor([3.0, 4.0]), 6).lens == (6,)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, L=6\]"):
        Segments.from_timesteps(torch.zeros(2, 5), 6)


def test_patch_embedding_as_a_linear_equals_the_conv():
    """forward_tokens embeds patchified tokens with the Conv3d's weight as a matrix (what export traces too)."""
    torch.manual_seed(0)
    model = WanDiT(CFG)
    latent = torch.randn(B, 48, F, H, W)
    with torch.no_grad():
        conv = model.patch_embedding(latent).flatten(2).transpose(1, 2)  # [B, F*h*w, dim], tokens (f, h, w)
        linear = model.embed_patches(patchify(CFG, latent))
    torch.testing.assert_close(linear, conv, rtol=1e-5, atol=1e-6)


def test_layout_tables_built_in_inference_serve_training():
    """RoPE and segment tables are cached per layout; built under inference_mode (the engine), they are
    normal tensors that a later training forward of the same layout can save for backward."""
    torch.manual_seed(0)
    model = WanDiT(CFG)
    latent, ctx, _ = inputs(8)
    t = torch.tensor([300.0, 600.0])
    with torch.inference_mode():
        model(latent, t, ctx)
    model(latent, t, ctx).square().mean().backward()
    assert len(model._layout_cache) == 2  # one RoPE table and one segment map for this layout


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = WanDiT(CFG).train()
    latent, ctx, _ = inputs(5)
    t = torch.tensor([300.0, 600.0])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(latent, t, ctx).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_weights_keep_fp32_modulation(folders):
    model = load_dit(folders / "original", dtype="bf16")
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.time_projection[1].weight.dtype == torch.float32
    ref = load_dit(folders / "original", dtype=torch.float32)
    latent, ctx, _ = inputs(6)
    t = torch.tensor([900.0, 100.0])
    with torch.no_grad():
        assert relerr(model(latent, t, ctx), ref(latent, t, ctx)) < 0.05


def test_key_renames_round_trip(oracle):
    for k in oracle.state_dict():
        assert original_to_diffusers(diffusers_to_original(k)) == k


def test_flop_formula_matches_the_budget():
    full = DiTConfig.preset("wan2.2-ti2v-5b")
    assert abs(count_flops(full, 27280) / 1e12 - 517) < 1.5
    assert abs(count_flops(full, 58080) / 1e12 - 1759) < 1.5
    assert abs(count_flops(full, 27280, 58080) / 1e12 - 827) < 1.5


# -- bad input -------------------------------------------------------------------------------------------

def test_bad_latent_and_context_shapes():
    model = WanDiT(CFG)
    t = torch.tensor([1.0])
    ctx = [torch.randn(3, CFG.text_dim)]
    with pytest.raises(ValueError, match="latent must be"):
        model(torch.randn(1, 16, 1, 4, 4), t, ctx)  # a Wan2.1-width latent
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 48, 1, 5, 4), t, ctx)
    with pytest.raises(ValueError, match="text_dim"):
        model(torch.randn(1, 48, 1, 4, 4), t, [torch.randn(3, CFG.text_dim + 1)])
    with pytest.raises(ValueError, match="more than text_len"):
        model(torch.randn(1, 48, 1, 4, 4), t, [torch.randn(CFG.text_len + 1, CFG.text_dim)])
    with pytest.raises(ValueError, match="context batch"):
        model(torch.randn(2, 48, 1, 4, 4), torch.tensor([1.0, 2.0]), ctx)
    with pytest.raises(ValueError, match="RoPE"):
        model.forward_groups([torch.randn(1, 48, 1, 4, 4)], [1024], Segments((4,), torch.zeros(1, 1)), ctx)
    with pytest.raises(ValueError, match="backend"):
        WanDiT(CFG, backend="cuda")  # not a backend ("auto" is one: chosen per op, kernels/select.py)


def test_missing_key_is_named(folders, tmp_path):
    sd = load_file(folders / "diffusers" / "diffusion_pytorch_model.safetensors")
    del sd["blocks.1.attn2.norm_k.weight"]
    (tmp_path / "config.json").write_text((folders / "diffusers" / "config.json").read_text())
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.cross_attn\.norm_k\.weight"):
        load_dit(tmp_path, dtype=torch.float32)


def test_unexpected_key_is_named(folders, tmp_path):
    sd = load_file(folders / "repack.safetensors")
    sd["model.diffusion_model.img_emb.proj.0.weight"] = torch.ones(3)
    save_file(sd, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): img_emb\.proj\.0\.weight"):
        load_dit(tmp_path / "x.safetensors", dtype=torch.float32, config=CFG)


def test_repack_without_config_needs_one_when_widths_are_not_wan(folders):
    with pytest.raises(CheckpointError, match="pass config="):
        load_dit(folders / "repack.safetensors")


def test_checkpoint_of_another_model(tmp_path):
    save_file({"encoder.conv1.weight": torch.ones(4, 12, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan DiT checkpoint"):
        load_dit(tmp_path / "vae.safetensors")


def test_config_that_does_not_fit_the_tensors(folders, tmp_path):
    for f in (folders / "original").iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["ffn_dim"] = 256
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ffn_dim: config 256 vs tensors 128"):
        load_dit(tmp_path)


def test_missing_path_and_bad_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "nope")
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_dit(tmp_path, dtype="int8")


def test_triton_backend_matches_torch_backend():
    """The whole forward with the Triton kernels (interpreter on a CPU, fp32) against the torch references,
    with a reference group and I2V-style segments; and the gradients the trainer takes through them."""
    torch.manual_seed(0)
    ref = WanDiT(CFG, backend="torch")
    tri = WanDiT(CFG, backend="triton")
    tri.load_state_dict(ref.state_dict())
    latent, ctx, _ = inputs(7)
    extra = torch.randn(B, 48, 1, H, W)
    segs = Segments((TOKENS_PER_FRAME, (F - 1) * TOKENS_PER_FRAME, TOKENS_PER_FRAME),
                    torch.tensor([[0.0, 640.0, 0.0], [0.0, 320.0, 0.0]]))
    outs = []
    for model in (ref, tri):
        model.zero_grad()
        out = model.forward_groups([latent, extra], [0, F], segs, ctx)
        out.square().mean().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert relerr(outs[1][0], outs[0][0]) <= 1e-5
    # all gradients as one vector: per-tensor maxima of ~1e-6 are dominated by fp32 summation order
    g_tri, g_ref = (torch.cat([g.flatten() for g in o[1]]) for o in outs)
    assert relerr(g_tri, g_ref) <= 1e-5
