"""Few-step distilled models: the dmd sampler against a hand-written loop, the published schedules picked up from
tiny folders shaped like FastWan2.2-TI2V-5B (diffusers layout) and Wan2.2-TI2V-5B-Turbo (model.pt, wrapper keys),
and bad step lists refused before any compute."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from anyid_rt import Engine
from anyid_rt.plan import plan_pretrained
from anyid_rt.few_step import FASTWAN22_TI2V_5B, SAMPLING_FILE, WAN22_TI2V_5B_TURBO
from anyid_rt.request import GenerationRequest, RequestError
from anyid_rt.sampling import FlowDMD, make_sampler

H = W = 64
FRAMES = 9


@pytest.fixture(scope="module")
def tiny():
    return Engine.tiny(seed=0)


def _shift(u, s):
    return s * u / (1 + (s - 1) * u)


def test_dmd_update_matches_a_hand_written_loop():
    """x0 = x - σ·v, re-noised to the next σ with fresh noise from the same CPU generator; last step returns x0;
    σ = shift(t/1000) and the DiT is fed 1000·σ (FastVideo's warped steps: 1000, 939.67, 845.21 at shift 5)."""
    ts, shift = [1000, 757, 522], 5.0
    sampler = make_sampler("dmd", 3, shift, timesteps=ts, generator=torch.Generator().manual_seed(3))
    assert sampler.timesteps.tolist() == pytest.approx([1000.0, 939.6723, 845.2073], abs=1e-3)
    x = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    ref, gen = x.clone(), torch.Generator().manual_seed(3)
    for i, t in enumerate(sampler.timesteps):
        v = torch.tanh(x) * (1 + float(t) / 1000)  # any velocity field
        x = sampler.step(v, i, x)
        sig = [_shift(u / 1000, shift) for u in ts] + [0.0]
        x0 = ref - np.float32(sig[i]) * (torch.tanh(ref) * (1 + float(t) / 1000))
        nxt = np.float32(sig[i + 1])
        ref = x0 if i == 2 else (1 - nxt) * x0 + nxt * torch.randn(ref.shape, generator=gen)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="all 3 steps"):
        sampler.step(x, 3, x)
    turbo = make_sampler("dmd", 4, 1.0, timesteps=[1000, 750, 500, 250], generator=torch.Generator())
    assert turbo.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]  # Turbo's listed steps, fed as they are
    with pytest.raises(TypeError, match="from_timesteps"):
        FlowDMD(3, 5.0)


def test_engine_dmd_equals_the_loop_over_the_dit(tiny):
    """Text-to-video with sampler dmd and guidance 1: one DiT forward per listed step, the same latents as a loop
    written here over `dit(latent, t, context)` with the same seeded generator."""
    emb = torch.randn(1, 7, tiny.dit.cfg.text_dim, generator=torch.Generator().manual_seed(1))
    ts = [1000.0, 750.0, 500.0, 250.0]
    video = tiny.generate(prompt_embeds=emb, height=H, width=W, num_frames=FRAMES, sampler="dmd", timesteps=ts,
                          shift=1.0, guidance=1.0, seed=5, progress=False)
    assert video.stats == {"steps": 4, "dit_forwards": 4, "dit_forwards_skipped": 0, "reference_passes": 0}
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(48, 3, H // 16, W // 16, generator=gen)[None]
    sig = [t / 1000 for t in ts] + [0.0]
    with torch.inference_mode():
        for i, t in enumerate(ts):
            v = tiny.dit(x, torch.tensor([t]), [emb[0]])
            x0 = x - sig[i] * v
            x = x0 if i == 3 else (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(x.shape, generator=gen)
    torch.testing.assert_close(video.latents, x[0], rtol=1e-5, atol=1e-5)


def test_dmd_with_references_and_image(tiny):
    refs = [np.full((48, 48, 3), 100, np.uint8)]
    v = tiny.generate("A man waves.", references=refs, height=H, width=W, num_frames=5, sampler="dmd",
                      timesteps=[1000, 500], guidance=5.0, progress=False)
    assert v.stats["steps"] == 2 and v.stats["dit_forwards"] == 4  # guided: conditional + unconditional rows
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    w = tiny.generate("A man waves.", image=img, height=H, width=W, num_frames=5, sampler="dmd",
                      timesteps=[900, 600, 300], guidance=1.0, progress=False)
    assert w.stats["dit_forwards"] == 3
    pinned = tiny.encode_pixels(tiny._prepare_image(img, H, W, 5))[0, :, 0]
    torch.testing.assert_close(w.latents[:, 0], pinned)  # latent frame 0 stays the image's


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="dmd", timesteps=[1000, 1000, 500]), "strictly decreasing"),
    (dict(sampler="dmd", timesteps=[500, 750]), "strictly decreasing"),
    (dict(sampler="dmd", timesteps=[1200, 500]), "leaves \\(0, 1000\\]"),
    (dict(sampler="dmd", timesteps=[1000, 0]), "leaves \\(0, 1000\\]"),
    (dict(sampler="dmd", timesteps=[]), "non-empty list"),
    (dict(sampler="dmd"), "needs timesteps"),
    (dict(sampler="dmd", timesteps=[1000, 500], steps=4), "steps=4 disagrees with the 2 timesteps"),
    (dict(sampler="unipc", timesteps=[1000, 500]), "applies only to sampler='dmd'"),
])
def test_bad_step_lists_are_refused(tiny, kwargs, match):
    with pytest.raises(RequestError, match=match):
        tiny.generate("A woman smiles.", height=H, width=W, num_frames=FRAMES, progress=False, **kwargs)


def test_fastwan_folder_defaults(tmp_path):
    """A tiny diffusers-layout folder named as FastVideo publishes FastWan2.2-TI2V-5B (its scheduler/ is the
    base's UniPC: the name is what marks it) loads with dmd [1000, 757, 522], shift 5, guidance 1."""
    from helpers import diffusers_pipeline_folder

    folder = tmp_path / "FastWan2.2-TI2V-5B-FullAttn-Diffusers"
    diffusers_pipeline_folder(folder, seed=0)
    engine = Engine.from_pretrained(folder, dtype="fp32", backend="torch", device="cpu", progress=False)
    d = engine.defaults
    assert (d.sampler, d.steps, d.timesteps, d.shift, d.guidance) == ("dmd", 3, (1000.0, 757.0, 522.0), 5.0, 1.0)
    video = engine.generate("A woman smiles.", height=H, width=W, num_frames=FRAMES, progress=False)
    assert video.stats == {"steps": 3, "dit_forwards": 3, "dit_forwards_skipped": 0, "reference_passes": 0}
    # a timestep list of the caller's replaces the model's; the sampler can still be changed
    r = engine.check(GenerationRequest("A woman smiles.", timesteps=[1000, 500]))
    assert (r.sampler, r.steps, r.timesteps) == ("dmd", 2, (1000.0, 500.0))
    r = engine.check(GenerationRequest("A woman smiles.", sampler="euler", steps=2))
    assert (r.sampler, r.steps, r.timesteps) == ("euler", 2, None)


def test_turbo_dit_over_the_base_folder(tmp_path, tiny):
    """Turbo publishes DiT weights alone (model.pt, a training wrapper's state dict: `model.` prefix, FSDP
    pieces): loaded with dit= over the base folder, with Turbo's 4 listed steps at shift 1 and guidance 1."""
    base = tiny.save_pretrained(tmp_path / "Wan2.2-TI2V-5B")
    turbo = Engine.tiny(seed=1)  # other weights, so that the replacement is visible
    folder = tmp_path / "Wan2.2-TI2V-5B-Turbo"
    folder.mkdir()
    sd = {}
    for k, v in turbo.dit.checkpoint_state_dict().items():
        parts = k.split(".")
        if parts[0] == "blocks":  # as FSDP wraps each block
            k = ".".join(parts[:2] + ["_fsdp_wrapped_module"] + parts[2:])
        sd[f"model.{k}"] = v.clone()
    torch.save(sd, folder / "model.pt")
    # the 5B's config is read off its shapes (head_dim 128); the tiny model's head_dim needs its config.json
    (folder / "config.json").write_text((base / "config.json").read_text())
    engine = Engine.from_pretrained(base, dit=folder / "model.pt", dtype="fp32", backend="torch", device="cpu",
                                    progress=False)
    d = engine.defaults
    assert (d.sampler, d.timesteps, d.shift, d.guidance) == ("dmd", (1000.0, 750.0, 500.0, 250.0), 1.0, 1.0)
    for name, p in turbo.dit.state_dict().items():
        torch.testing.assert_close(engine.dit.state_dict()[name], p, rtol=0, atol=0)
    assert engine.generate("A woman smiles.", height=H, width=W, num_frames=FRAMES,
                           progress=False).stats["dit_forwards"] == 4
    plain = plan_pretrained(base, dtype="fp32", backend="torch", device="cpu").defaults
    assert plain.sampler == "unipc" and plain.timesteps is None


def test_sampling_file_and_published_constants(tmp_path):
    from anyid_rt.few_step import find_few_step

    (tmp_path / SAMPLING_FILE).write_text('{"sampler": "dmd", "timesteps": [999, 500], "shift": 3.0}')
    found = find_few_step(tmp_path)
    assert (found.timesteps, found.shift, found.guidance) == ((999.0, 500.0), 3.0, 1.0)
    (tmp_path / SAMPLING_FILE).write_text('{"sampler": "dmd", "timesteps": [500, 999]}')
    with pytest.raises(RequestError, match="strictly decreasing"):
        find_few_step(tmp_path)
    snapshot = tmp_path / "hub" / "models--FastVideo--FastWan2.2-TI2V-5B-FullAttn-Diffusers" / "snapshots" / "0a1b"
    snapshot.mkdir(parents=True)
    assert find_few_step(snapshot) is FASTWAN22_TI2V_5B  # a Hugging Face cache names the model above the snapshot
    assert find_few_step(tmp_path / "hub") is None
    assert FASTWAN22_TI2V_5B.timesteps == (1000, 757, 522) and FASTWAN22_TI2V_5B.shift == 5.0
    assert WAN22_TI2V_5B_TURBO.timesteps == (1000, 750, 500, 250) and WAN22_TI2V_5B_TURBO.shift == 1.0
