"""The toy identity world (anyid_rt.trainer.toy, issue 19): codec exactness, the world's rules, the evaluator's
gates and the smoke preset end to end through the real engine and trainers. CI asserts plumbing, gates and loss
direction only; the learning claims are the benchmark's (bench/results/toy)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from anyid_rt.trainer.toy import world as W
from anyid_rt.trainer.toy.codec import ToyCodec, effective_frames
from anyid_rt.trainer.toy.model import SMOKE_DIT, toy_defaults, toy_engine
from anyid_rt.trainer.toy.run import ToyRun, preset
from anyid_rt.trainer.toy.stats import bootstrap_ci, compare, sign_test

SMOKE = preset("smoke")


def _clips(cfg: W.WorldConfig, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = W.identities(cfg)
    el = [W.random_elements(rng) for _ in range(n)]
    starts = np.array([W.start_position(rng, e, cfg.effective) for e in el])
    ident = np.array([ids[i] for i in rng.integers(len(ids), size=n)])
    return W.render_clips(cfg, ident, el, starts), ident, el


def _pixels(clips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3) / 127.5 - 1


# -- codec ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 96])
def test_codec_is_exact_on_world_clips(size):
    cfg = W.WorldConfig(size=size, frames=9)
    x = _pixels(_clips(cfg, 6)[0])
    codec = ToyCodec()
    z = codec.encode(x)
    assert z.shape == (6, 48, 3, size // 16, size // 16)
    assert (codec.decode(z) - x).abs().max() <= 1e-5
    assert (codec.encode(codec.decode(z)) - z).abs().max() <= 1e-5
    assert 0.5 < float(z.std()) < 2.0  # about unit scale, like Wan's normalised latents
    # off the manifold it is a projection: encode(decode(encode(x))) = encode(x) for any x in range
    r = torch.rand(2, 3, 5, size, size) * 2 - 1
    assert (codec.encode(codec.decode(codec.encode(r))) - codec.encode(r)).abs().max() <= 1e-5


def test_codec_contract_errors_and_engine_paths(tmp_path):
    codec = ToyCodec()
    with pytest.raises(ValueError, match="4n\\+1"):
        codec.encode(torch.zeros(1, 3, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        codec.encode(torch.zeros(1, 4, 5, 64, 64))
    with pytest.raises(ValueError, match="multiples of 16"):
        codec.encode(torch.zeros(1, 3, 5, 40, 64))
    with pytest.raises(ValueError, match="48"):
        codec.decode(torch.zeros(1, 16, 2, 4, 4))
    assert [p.requires_grad for p in codec.parameters()] == [False]  # one frozen parameter: the engine reads it
    engine = toy_engine(SMOKE_DIT, toy_defaults(64, 5, 1.5, steps=2))
    ref = np.zeros((40, 30, 3), np.uint8)
    video = engine.generate("Shot type: close shot. Background: red.", references=[ref], seed=0, progress=False)
    assert video.frames.shape == (5, 64, 64, 3) and video.latents.shape == (48, 2, 4, 4)
    from anyid_rt.trainer.cache import Encoders, TensorCache

    enc = Encoders(engine.vae, engine.text_encoder, TensorCache(tmp_path), torch.device("cpu"))
    x = _pixels(_clips(W.WorldConfig(size=64), 1)[0])[0]
    assert torch.equal(enc.latent({"kind": "t"}, lambda: x), codec.encode(x[None]))


# -- world ---------------------------------------------------------------------------------------------------------
def test_world_is_deterministic_and_holds_every_value_in_training():
    cfg = W.WorldConfig()
    a, b = _clips(cfg, 4, seed=3)[0], _clips(cfg, 4, seed=3)[0]
    assert np.array_equal(a, b)
    train, unseen = W.split(cfg)
    assert (train, unseen) == W.split(cfg) and len(unseen) == 72 and not set(train) & set(unseen)
    ids = W.identities(cfg)
    for k, n in enumerate(cfg.counts):
        assert all(sum(ids[i][k] == v for i in train) >= 10 for v in range(n))
    sk, bg = np.array(list(W.SKINS.values()), float), np.array(list(W.BACKGROUNDS.values()), float)
    d = np.linalg.norm(sk[:, None] - sk[None], axis=-1)
    assert d[d > 0].min() >= 80 and np.linalg.norm(sk[:, None] - bg[None], axis=-1).min() >= 80


def test_prompts_name_no_identity_and_tokenize():
    from anyid_rt.models.text_encoder import tiny_tokenizer
    from anyid_rt.trainer.prompts import format_prompt

    tok = tiny_tokenizer()
    identity_words = {w for v in (W.SHAPES, W.SKINS, W.EYES, W.MARKS) for w in v} - {"none"}
    for bg in range(6):
        for act in range(5):
            for shot in range(2):
                for ex in range(3):
                    p = format_prompt(W.Elements(bg, act, shot, ex).description())
                    assert not identity_words & set(p.lower().replace(".", " ").replace(":", " ").split())
                    ids = tok(p)["input_ids"]
                    unk = [w for w, i in zip(tok.convert_ids_to_tokens(ids), ids) if i == tok.unk_token_id]
                    assert len(ids) <= 32 and ids.count(tok.unk_token_id) == 1, (p, unk)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`anyid-rt toy run --preset smoke`, once for the module (1-3 minutes on 2 cores)."""
    from anyid_rt.cli import main

    out = tmp_path_factory.mktemp("toy") / "smoke"
    torch_threads = torch.get_num_threads()
    try:
        assert main(["toy", "run", "--preset", "smoke", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    return out


def test_world_on_disk_reads_through_the_trainer(smoke_run):
    from anyid_rt.trainer.data import IDGroupDataset
    from anyid_rt.trainer.groups import load_groups
    from anyid_rt.trainer.toy.model import TOY_LAYOUT

    groups = load_groups(smoke_run / "world" / "train")
    assert len(groups) == 18 and all(len(g.clips) == 3 for g in groups)

    def no_detector(frame):
        raise AssertionError("the toy world has exact boxes: no detector may run")

    ds = IDGroupDataset(smoke_run / "world" / "train", [(5, 64, 64)], layout=TOY_LAYOUT, max_references=3,
                        fps=None, similarity="jaccard", detector=no_detector)
    forms = set()
    for i in range(len(ds)):
        spec = ds.instance(i)
        for r in spec.refs:
            forms.add(r.form)
            ref = ds.render_reference(spec, r)
            assert ref.shape == (3, len(r.frames), 64, 64)
    assert forms == {"face", "portrait", "clip"}
    cases = W.read_cases(smoke_run / "world", "unseen")
    assert len(cases) == SMOKE.eval.cases and all(c.swap != c.index for c in cases)
    assert all((smoke_run / "world" / r).is_file() for c in cases for r in c.references)


# -- evaluator -----------------------------------------------------------------------------------------------------
def test_evaluator_gates_oracle_and_swapped_identity(smoke_run):
    from anyid_rt.trainer.toy.evaluator import chance_id_acc, render_invalid, score_video

    report = json.loads((smoke_run / "report.json").read_text())
    assert report["evaluator"]["gates"]["passed"] and report["evaluator"]["gates"]["invalid"] >= 0.95
    run = ToyRun(SMOKE, smoke_run)
    model = run.load_evaluator()
    clips, ident, el = _clips(SMOKE.world, 8, seed=5)
    oracle = [score_video(model, torch.from_numpy(c), tuple(i), e, SMOKE.world) for c, i, e in zip(clips, ident, el)]
    assert np.mean([s["id_acc"] for s in oracle]) >= 0.9 and np.mean([s["valid"] for s in oracle]) == 1.0
    wrong = [tuple((v + 1) % n for v, n in zip(i, SMOKE.world.counts)) for i in ident]  # every attribute wrong
    swapped = [score_video(model, torch.from_numpy(c), w, e, SMOKE.world) for c, w, e in zip(clips, wrong, el)]
    assert np.mean([s["id_acc"] for s in swapped]) <= chance_id_acc(SMOKE.world)
    noise = render_invalid(SMOKE.world, np.random.default_rng(0), 32, kind=0)
    assert (model(noise)[0]["valid"].argmax(1) == 0).float().mean() >= 0.95
    assert report["eval"]["arms"]["oracle"]["id_acc"] >= 0.9
    frames = torch.from_numpy(clips[0])
    assert effective_frames(frames).shape == (2, 3, 16, 16)


# -- the smoke preset end to end -----------------------------------------------------------------------------------
def test_smoke_run_plumbing_losses_and_loras(smoke_run):
    from anyid_rt.lora import read_lora

    report = json.loads((smoke_run / "report.json").read_text())

    def finite(v):
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        if isinstance(v, list):
            return all(finite(x) for x in v)
        return not isinstance(v, float) or math.isfinite(v)

    assert finite(report)
    assert report["verdicts"]["a"]["verdict"] in ("pass", "fail", "inconclusive")
    # the base's loss falls: measured 0.78-0.82 x at 120-300 smoke steps (the design's 0.7 assumed latents with
    # more predictable content; here x0 has variance ~1.7, so the flow loss starts near 2.7 and has a high floor)
    assert report["pretrain"]["loss_last"] <= 0.88 * report["pretrain"]["loss_first"]
    assert set(report["eval"]["arms"]) >= {"oracle", "base", "sft", "null", "swap"}
    sft_log = (smoke_run / "sft" / "log.csv").read_text().splitlines()
    assert len(sft_log) > 2 and len(report["sft"]["curve"]) == SMOKE.sft.steps // SMOKE.sft.chunk + 1
    assert read_lora(smoke_run / "sft" / "lora.safetensors").metadata["anyid.base_model"].startswith("dit(dim=64")
    base = toy_engine(SMOKE_DIT, toy_defaults(64, 5, 1.5), base=smoke_run / "pretrain" / "base")
    loras = [smoke_run / "sft" / "lora.safetensors"]
    if (smoke_run / "dpo" / "lora.safetensors").is_file():
        loras.append(smoke_run / "dpo" / "lora.safetensors")
        assert report["dpo"]["fit"]["accuracy"] >= 0.6  # DPO fits its own pairs (smoke lr 1e-3)
        assert report["dpo"]["loss_last"] < report["dpo"]["loss_first"]
    merged = toy_engine(SMOKE_DIT, toy_defaults(64, 5, 1.5), base=smoke_run / "pretrain" / "base", loras=loras)
    delta = sum(float((a - b).abs().sum()) for a, b in zip(merged.dit.parameters(), base.dit.parameters()))
    assert delta > 0  # the LoRAs changed the weights they were merged into
    assert (smoke_run / "report.md").read_text().startswith("# Toy identity benchmark")
    assert (smoke_run / "sheet.png").stat().st_size > 1000


def test_rerun_skips_finished_stages(smoke_run):
    run = ToyRun(SMOKE, smoke_run, log=lambda s: None)
    run.all()
    assert run.skipped == ["world", "evaluator", "pretrain", "sft", "pairs", "dpo", "eval"]


# -- statistics ----------------------------------------------------------------------------------------------------
def test_sign_test_and_bootstrap():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert abs(sign_test(9, 1) - 22 / 1024) < 1e-12  # 2 * (1 + 10) / 2^10
    lo, hi = bootstrap_ci(np.full(50, 0.3))
    assert lo == hi == pytest.approx(0.3)
    c = compare([0.2] * 40, [0.5] * 30 + [0.2] * 10)
    assert (c.wins, c.ties, c.losses) == (30, 10, 0) and c.ci_low > 0.15 and c.p_sign < 1e-6
    with pytest.raises(ValueError):
        compare([1, 2], [1])


def test_shift1_preset_is_bench_with_shift_one():
    """The first lever of the design note (train and sample shift 1.0) changes nothing else of the bench preset;
    an unknown preset names the known ones."""
    from dataclasses import replace

    from anyid_rt.trainer.toy.run import preset

    bench, lever = preset("bench"), preset("bench-shift1")
    assert lever.pretrain.shift == 1.0 and bench.pretrain.shift != 1.0
    assert replace(lever, name="bench", pretrain=replace(lever.pretrain, shift=bench.pretrain.shift)) == bench
    with pytest.raises(ValueError, match="smoke, bench, bench-shift1"):
        preset("large")
