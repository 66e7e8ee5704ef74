"""The engine: text-to-video parity with a loop of diffusers' Wan components, image-to-video, AnyID
references, guidance batching, caches, LoRA, both folder layouts, and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anyid_rt import frame_ops, media
from anyid_rt.conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from anyid_rt.engine import Engine
from anyid_rt.lora import LoraWeights, merge_lora_, save_lora
from anyid_rt.models import CheckpointError
from anyid_rt.sampling import make_sampler

from helpers import diffusers_pipeline_folder, relerr

H = W = 64
FRAMES = 9
STEPS = 3


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "diffusers"
    pipe = diffusers_pipeline_folder(folder, seed=0)
    return folder, pipe


@pytest.fixture(scope="module")
def engine(pipeline):
    return Engine.from_pretrained(pipeline[0], dtype="fp32", vae_dtype="fp32", backend="torch", device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return Engine.tiny(seed=0)


def _image(seed=0, h=48, w=80):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _noise(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(48, 1 + (FRAMES - 1) // 4, H // 16, W // 16, generator=g)


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_text_to_video_matches_a_diffusers_component_loop(pipeline, engine, sampler):
    """Our engine against a loop of diffusers' WanPipeline components (umT5 prompt encoding, the
    WanTransformer3DModel with per-token timesteps, AutoencoderKLWan decode), same noise, fp32; the step
    rule is our sampler in both (it is checked against diffusers' schedulers in test_sampling.py)."""
    _, pipe = pipeline
    prompt, noise, g = "a woman walks on the beach", _noise(), 5.0
    video = engine.generate(prompt, height=H, width=W, num_frames=FRAMES, steps=STEPS, guidance=g,
                            sampler=sampler, latents=noise, progress=False)

    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, negative_prompt="", do_classifier_free_guidance=True,
                                          max_sequence_length=512)
        x = noise[None].clone()
        schedule = make_sampler(sampler, STEPS, 5.0)
        tokens = x.shape[2] * (H // 32) * (W // 32)
        for i, t in enumerate(schedule.timesteps):
            ts = torch.full((1, tokens), float(t))
            vc = pipe.transformer(x, ts, cond, return_dict=False)[0]
            vu = pipe.transformer(x, ts, uncond, return_dict=False)[0]
            x = schedule.step(vu + g * (vc - vu), i, x)
        std = torch.tensor(pipe.vae.config.latents_std).view(1, 48, 1, 1, 1)
        mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 48, 1, 1, 1)
        pixels = pipe.vae.decode(x * std + mean, return_dict=False)[0].clamp(-1, 1)
    want = ((pixels[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)

    assert relerr(video.latents, x[0]) <= 1e-4
    assert video.frames.shape == (FRAMES, H, W, 3) and video.frames.dtype == torch.uint8
    assert (video.frames.int() - want.int()).abs().max() <= 1  # rounding at .5 only


def test_original_layout_gives_the_same_video(engine, tmp_path):
    folder = engine.save_pretrained(tmp_path / "original")
    other = Engine.from_pretrained(folder, dtype="fp32", backend="torch", device="cpu")
    kw = dict(height=H, width=W, num_frames=FRAMES, steps=2, seed=3, progress=False)
    a, b = engine.generate("a man", **kw), other.generate("a man", **kw)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)


def test_seed_reproducible_and_latents_override(tiny):
    a = tiny.generate("x", seed=1, steps=2, progress=False)
    b = tiny.generate("x", seed=1, steps=2, progress=False)
    c = tiny.generate("x", seed=2, steps=2, progress=False)
    assert torch.equal(a.frames, b.frames) and not torch.equal(a.latents, c.latents)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(48, 3, 4, 4, generator=g)
    d = tiny.generate("x", latents=noise, seed=999, steps=2, progress=False)
    assert torch.equal(d.latents, a.latents)  # the seed draws exactly this noise on the CPU


def test_guidance_one_is_the_conditional_pass_only(tiny):
    v = tiny.generate("x", guidance=1.0, steps=2, progress=False)
    # with guidance 1 the unconditional prompt must not matter
    w = tiny.generate("x", guidance=1.0, steps=2, negative_prompt="anything at all", progress=False)
    assert torch.equal(v.latents, w.latents)
    u = tiny.generate("x", guidance=5.0, steps=2, negative_prompt="anything at all", progress=False)
    assert not torch.equal(u.latents, v.latents)


def test_references_batch_of_two_equals_two_separate_passes(tiny):
    """The guided batch [cond with refs, uncond with null refs + empty prompt] equals two batch-1 passes."""
    refs = [_image(1), _image(2, 64, 40)]
    prepared = tiny._prepare_references(refs, 0, H, W)
    from anyid_rt.conditioning import StepLayout

    zs = [tiny.encode_pixels(p.pixels) for p in prepared]
    nulls = [tiny.null_latent(p.pixels.shape) for p in prepared]
    layout = StepLayout.build(tiny.layout, tiny.geometry, (3, 4, 4), [z.shape[2] for z in zs], image_mode=False)
    x = _noise()[None]
    ctx = tiny.text_encoder.encode(["hello", ""])
    seg2 = layout.segments(500, 2, torch.device("cpu"))
    seg1 = layout.segments(500, 1, torch.device("cpu"))
    with torch.no_grad():
        both = tiny.dit.forward_groups([x.expand(2, -1, -1, -1, -1)] + [torch.cat([z, n]) for z, n in zip(zs, nulls)],
                                       layout.frame_starts, seg2, ctx)
        cond = tiny.dit.forward_groups([x] + zs, layout.frame_starts, seg1, ctx[:1])
        unc = tiny.dit.forward_groups([x] + nulls, layout.frame_starts, seg1, ctx[1:])
    torch.testing.assert_close(both[:1], cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1:], unc, rtol=1e-5, atol=1e-6)
    # the null reference is the latent of black pixels of the same shape
    black = tiny.vae.encode(torch.full((1, 3, 1, H, W), -1.0))
    torch.testing.assert_close(nulls[0], black)


def test_references_change_the_video_and_primary_comes_first(tiny):
    refs = [_image(1), _image(2)]
    kw = dict(steps=2, progress=False, seed=0)
    plain = tiny.generate("p", **kw)
    a = tiny.generate("p", references=refs, primary=0, **kw)
    b = tiny.generate("p", references=refs, primary=1, **kw)
    c = tiny.generate("p", references=refs[::-1], primary=0, **kw)
    assert not torch.equal(plain.latents, a.latents)
    assert not torch.equal(a.latents, b.latents)
    assert torch.equal(b.latents, c.latents)  # primary=1 of [r1, r2] is the same request as [r2, r1]


def test_reference_clip_and_placement(tiny, tmp_path):
    clip = (np.random.default_rng(0).integers(0, 255, (13, 40, 56, 3))).astype(np.uint8)
    kw = dict(steps=2, progress=False)
    after = tiny.generate("p", references=[_image(1), clip], **kw)
    before = Engine(tiny.dit, tiny.vae, tiny.text_encoder, layout=ConditioningLayout(placement="before"),
                    defaults=tiny.defaults).generate("p", references=[_image(1), clip], **kw)
    assert not torch.equal(after.latents, before.latents)


def test_reference_cache_hits(tiny):
    tiny.reference_cache.clear()
    refs = [_image(5)]
    tiny.generate("p", references=refs, steps=1, progress=False)
    misses = tiny.reference_cache.misses
    assert misses == 2  # the reference and its null
    tiny.generate("q", references=[_image(5)], steps=1, progress=False)
    assert tiny.reference_cache.misses == misses and tiny.reference_cache.hits >= 2


def test_image_to_video_pins_frame_zero(tiny):
    img = _image(3, 64, 64)
    v = tiny.generate("p", image=img, steps=2, progress=False)
    z = tiny.encode_pixels(frame_ops.to_model_range(media.crop_center_to(img, W, H)))
    torch.testing.assert_close(v.latents[:, :1], z[0])
    with pytest.raises(ValueError, match="num_frames >= 5"):
        tiny.generate("p", image=img, num_frames=1, progress=False)


def test_timings_and_save(tiny, tmp_path):
    out = tmp_path / "v.mp4"
    v = tiny.generate("p", steps=1, output=out, progress=False)
    assert set(v.timings) >= {"text_encode", "reference_encode", "denoise", "vae_decode", "total"}
    assert out.exists()
    frames, fps, codec = media.read_video(out)
    assert frames.shape[0] == FRAMES and fps == 24 and codec == "h264"


def test_prompt_embeds_replace_the_prompt(tiny):
    emb = tiny.text_encoder.encode("hello")[0][None]
    a = tiny.generate("hello", steps=1, progress=False)
    b = tiny.generate(prompt_embeds=emb, steps=1, progress=False)
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        tiny.generate(prompt_embeds=torch.zeros(1, 3, 7), steps=1, progress=False)


def test_lora_merge_and_layout_metadata(pipeline, engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    names = ["blocks.0.self_attn.q", "blocks.1.ffn.2"]
    weights = engine.dit.checkpoint_state_dict()  # the engine runs q, k, v fused; LoRA names the checkpoint's
    down = {n: torch.randn(4, weights[f"{n}.weight"].shape[1], generator=g) * 0.1 for n in names}
    up = {n: torch.randn(weights[f"{n}.weight"].shape[0], 4, generator=g) * 0.1 for n in names}
    layout = ConditioningLayout(placement="before", pad_color=(255, 255, 255))
    lora = LoraWeights(down, up, {n: 8.0 for n in names}, {LAYOUT_METADATA_KEY: layout.to_json()})
    save_lora(lora, tmp_path / "l.safetensors")
    merged = Engine.from_pretrained(pipeline[0], lora=tmp_path / "l.safetensors", dtype="fp32", backend="torch")
    assert merged.layout == layout
    w0 = weights["blocks.0.self_attn.q.weight"]
    w1 = merged.dit.checkpoint_state_dict()["blocks.0.self_attn.q.weight"]
    torch.testing.assert_close(w1, w0 + 2.0 * up[names[0]] @ down[names[0]], rtol=1e-5, atol=1e-6)
    bad = LoraWeights({"blocks.9.self_attn.q": down[names[0]]}, {"blocks.9.self_attn.q": up[names[0]]}, {})
    with pytest.raises(CheckpointError, match="does not fit"):
        merge_lora_(engine.dit, bad)


# -- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt=None), TypeError, "prompt must be a str"),
    (dict(prompt=123), TypeError, "prompt must be a str"),
    (dict(height=60), ValueError, "multiple of 32"),
    (dict(width=100), ValueError, "multiple of 32"),
    (dict(num_frames=8), ValueError, "4n\\+1"),
    (dict(steps=0), ValueError, "steps"),
    (dict(guidance=0.5), ValueError, "guidance"),
    (dict(sampler="ddim"), ValueError, "sampler"),
    (dict(references=[]), ValueError, "empty list"),
    (dict(references="a.png"), TypeError, "must be a list"),
    (dict(references=[np.zeros((8, 8, 3), np.uint8)] * 9), ValueError, "at most 8"),
    (dict(references=[np.zeros((8, 8, 3), np.uint8)], primary=1), ValueError, "primary=1 is out of range"),
    (dict(references=["/nonexistent/face.jpg"]), ValueError, "reference 0"),
    (dict(latents=torch.zeros(48, 2, 4, 4)), ValueError, "latents must be"),
    (dict(output="x.avi"), ValueError, ".mp4"),
    (dict(height=64.0), ValueError, r"height=64.0 must be an int \(got float\), .* e.g. 64$"),
    (dict(num_frames=10.0), ValueError, r"num_frames=10.0 must be an int .* e.g. 9$"),
    (dict(primary=2), ValueError, "primary=2 selects a reference, but none is given"),
    (dict(prompt="  "), ValueError, "prompt is empty and nothing else conditions the video"),
    (dict(prompt_embeds=torch.zeros(1, 3, 32)), ValueError, "give prompt or prompt_embeds, not both"),
    (dict(image="/nonexistent/i.png"), FileNotFoundError, "image='/nonexistent/i.png' \\(image\\): file not found"),
])
def test_bad_input(tiny, tmp_path, kwargs, error, match):
    kwargs = {"prompt": "p", **kwargs}
    prompt = kwargs.pop("prompt")
    with pytest.raises(error, match=match):
        tiny.generate(prompt, steps=kwargs.pop("steps", 1), progress=False, **kwargs)


def test_empty_prompt_with_references_keeps_the_primary(tiny):
    """With references an empty differential prompt is a request: "as the primary reference"."""
    v = tiny.generate("", references=[_image(1)], steps=1, progress=False)
    assert v.frames.shape == (FRAMES, H, W, 3)


def test_output_folder_must_be_creatable(tiny, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="cannot create the folder .*a_file is a file"):
        tiny.generate("p", steps=1, output=tmp_path / "a_file" / "v.mp4", progress=False)


def test_unreadable_reference_leaves_no_output(tiny, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "x.mp4"
    with pytest.raises(media.MediaError, match="reference 1"):
        tiny.generate("p", references=[_image(0), str(bad)], output=out, progress=False)
    assert not out.exists()


def test_from_pretrained_checks_everything_before_loading(tmp_path, monkeypatch, tiny):
    """Model folder parts, LoRA files (read and fitted against the DiT's config) and devices are checked
    before any weight is read: the loaders are replaced by ones that fail the test."""
    import anyid_rt.engine as engine_module

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before the request was refused")

    folder = tiny.save_pretrained(tmp_path / "model")
    for name in ("load_dit", "load_vae", "random_dit"):
        monkeypatch.setattr(engine_module, name, no_loading)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="lora='.*garbage.safetensors': not a readable safetensors LoRA"):
        Engine.from_pretrained(folder, lora=garbage, dtype="fp32", device="cpu")
    name = "blocks.0.self_attn.q"
    save_lora(LoraWeights({name: torch.ones(4, 3072)}, {name: torch.ones(3072, 4)}, {name: 4.0}),
              tmp_path / "big.safetensors")
    for make in (lambda: Engine.from_pretrained(folder, lora=tmp_path / "big.safetensors", device="cpu"),
                 lambda: Engine.tiny(lora=tmp_path / "big.safetensors")):
        with pytest.raises(CheckpointError, match="big.safetensors': LoRA does not fit the model"):
            make()
    with pytest.raises(FileNotFoundError, match="lora='/nonexistent.safetensors' \\(LoRA\\): file not found"):
        Engine.from_pretrained(folder, lora="/nonexistent.safetensors", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available here"):
            Engine.from_pretrained(folder, device="cuda")
        with pytest.raises(ValueError, match="device='cuda': CUDA is not available here"):
            Engine.tiny(device="cuda")
    (folder / "Wan2.2_VAE.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks the VAE \(Wan2.2_VAE.pth\)"):
        Engine.from_pretrained(folder, device="cpu")


def test_loaders_name_the_file_they_looked_at(tmp_path, tiny):
    """Called directly (not through the engine's checks), the loaders still say which file is wrong."""
    from anyid_rt.models import TextEncoder, load_dit
    from anyid_rt.models.vae_loader import save_vae_original

    only_vae = tmp_path / "only_vae"
    only_vae.mkdir()
    save_vae_original(tiny.vae, only_vae / "Wan2.2_VAE.pth")
    with pytest.raises(CheckpointError, match=r"Wan2.2_VAE.pth: not a Wan DiT checkpoint: it looks like a Wan VAE"):
        load_dit(only_vae)
    folder = tiny.save_pretrained(tmp_path / "model")
    (folder / "models_t5_umt5-xxl-enc-bf16.pth").unlink()  # config.json there is the DiT's, not umT5's
    with pytest.raises(FileNotFoundError, match="has no models_t5_umt5-xxl-enc-bf16.pth"):
        TextEncoder.from_pretrained(folder)


def test_quant_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="quant"):
        Engine.from_pretrained(tmp_path, quant="int4")
    with pytest.raises(FileNotFoundError, match="neither a diffusers"):
        Engine.from_pretrained(tmp_path)
