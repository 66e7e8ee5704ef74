"""SFT: the loss overfits one batch, null conditions, exact resume, checkpoints, config files.
(The command line and the config checks before a run: tests/test_trainer_cli.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anyid_rt.conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from anyid_rt.config import DiTConfig
from anyid_rt.engine import Engine
from anyid_rt.lora import read_lora
from anyid_rt.models.dit import WanDiT
from anyid_rt.trainer.cache import Encoders, TensorCache
from anyid_rt.trainer.common import (Checkpoints, add_noise, build_engine, make_optimizer, read_log,
                                     target_layout, train_segments)
from anyid_rt.trainer.config import (ConfigError, DataConfig, LoraConfig, ModelSource, OptimConfig, SFTConfig,
                                     ValidationConfig, load_config)
from anyid_rt.trainer.data import IDGroupDataset
from anyid_rt.trainer.lora import inject_lora, lora_parameters
from anyid_rt.trainer.sft import SFTBatcher, flow_matching_loss, train_sft
from anyid_rt.trainer.synthetic import make_id_groups


pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_id_groups(tmp_path_factory.mktemp("idg"), groups=2, clips=3, face_boxes="all")


def config(root, out, **kw) -> SFTConfig:
    data = dict(root=str(root), buckets=((9, 64, 64),), min_references=1, max_references=2, similarity="jaccard")
    data.update(kw.pop("data", {}))
    base = dict(output_dir=str(out), model=ModelSource(preset="tiny"), data=DataConfig(**data),
                lora=LoraConfig(rank=4, alpha=4.0, save_dtype="fp32"), optim=OptimConfig(lr=1e-3),
                max_steps=4, checkpoint_every=2, log_every=1, mixed_precision="fp32", gradient_checkpointing=False,
                batch_size=1, grad_accum=1, progress=False, null_prob=0.3, layout=ConditioningLayout(max_clip_frames=5))
    base.update(kw)
    return SFTConfig(**base)


def test_flow_matching_loss_formula():
    g = torch.Generator().manual_seed(0)
    v, x0, eps = (torch.randn(2, 48, 3, 4, 4, generator=g) for _ in range(3))
    want = sum(((v[i] - (eps[i] - x0[i])) ** 2).mean() for i in range(2)) / 2
    torch.testing.assert_close(flow_matching_loss(v, x0, eps), want)


def test_overfits_one_batch(root, tmp_path):
    """Fixed inputs (one batch, one noise draw): the LoRA drives the flow-matching loss below half its start.
    The DiT is 256 wide: the tiny preset's 64-wide stream cannot span the head's 192 outputs per token, which
    puts a floor of about 2/3 of the initial loss under any fit of its frozen head."""
    cfg = config(root, tmp_path, null_prob=0.0, data={"cache": False})
    engine = build_engine(cfg.model, torch.float32, torch.device("cpu"), cfg.layout)
    torch.manual_seed(0)
    dit = WanDiT(DiTConfig(dim=256, ffn_dim=512, freq_dim=32, num_heads=2, num_layers=2, text_dim=32))
    dit.requires_grad_(False)
    inject_lora(dit, rank=8, alpha=8.0)
    dataset = IDGroupDataset.from_config(cfg.data, cfg.layout, cfg.seed)
    enc = Encoders(engine.vae, engine.text_encoder, TensorCache(None), torch.device("cpu"))
    batcher = SFTBatcher(cfg, dataset, enc, torch.device("cpu"))
    x0, eps, sigma, t, refs, ctx, nulls = batcher([0, 3], [0, 1], 0, 0, 0)
    assert not any(nulls) and refs
    xt = add_noise(x0, eps, sigma)
    sl = target_layout(cfg.layout, engine.geometry, xt, refs)
    opt, _ = make_optimizer(lora_parameters(dit), OptimConfig(lr=1e-2))
    losses = []
    for _ in range(60):
        loss = flow_matching_loss(dit.forward_groups([xt, *refs], sl.frame_starts, train_segments(sl, t), ctx), x0, eps)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    print(f"overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f} in 60 steps")
    assert losses[-1] < 0.5 * losses[0]


def test_null_condition_replaces_every_condition(root, tmp_path):
    engine = build_engine(ModelSource(preset="tiny"), torch.float32, torch.device("cpu"), None)
    enc = Encoders(engine.vae, engine.text_encoder, TensorCache(None), torch.device("cpu"))
    cfg1 = config(root, tmp_path, null_prob=1.0)
    ds = IDGroupDataset.from_config(cfg1.data, cfg1.layout, cfg1.seed)
    spec = ds.instance(2)
    x0_n, eps_n, _, _, refs_n, ctx_n, nulls = SFTBatcher(cfg1, ds, enc, torch.device("cpu"))([2], [0], 0, 0, 0)
    assert nulls == [True]
    for r, z in zip(spec.refs, refs_n):
        assert torch.equal(z, engine.vae.encode(torch.full((1, 3, len(r.frames), 64, 64), -1.0)))
    assert torch.equal(ctx_n[0], engine.text_encoder.encode("")[0])
    x0, eps, _, _, refs, ctx, nulls = SFTBatcher(config(root, tmp_path, null_prob=0.0), ds, enc,
                                                 torch.device("cpu"))([2], [0], 0, 0, 0)
    assert nulls == [False] and torch.equal(x0, x0_n) and torch.equal(eps, eps_n)  # same target and noise
    assert torch.equal(ctx[0], engine.text_encoder.encode(spec.prompt)[0]) and spec.prompt
    assert not torch.equal(refs[0], refs_n[0])


def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(root, tmp_path):
    kw = dict(max_steps=4, checkpoint_every=2, grad_accum=2, gradient_checkpointing=True, null_prob=0.5,
              validation=ValidationConfig(every=2, prompt="Expression: a smile.", steps=2,
                                          references=(str(ROOT / "anyid_rt/assets/astronaut.png"),)))
    a = train_sft(config(root, tmp_path / "a", **kw))
    b1 = train_sft(config(root, tmp_path / "b", **kw), stop_after=2)
    assert b1.step == 2 and b1.lora_path is None
    assert not (tmp_path / "b" / "lora.safetensors").exists()
    ck = Checkpoints(tmp_path / "b").latest()
    assert ck.name == "step_00000002" and (ck / "lora.safetensors").is_file()
    state = Checkpoints.load(ck)
    assert state["step"] == 2 and state["optimizer"]["state"] and set(state["rng"]) >= {"torch", "numpy", "python"}
    b2 = train_sft(config(root, tmp_path / "b", **kw))  # resume = "auto": picks up step 2
    assert b2.step == 4 and b2.history[0]["step"] == 3
    fa, fb = load_file(str(a.lora_path)), load_file(str(b2.lora_path))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)  # bit for bit
    ups = [v for k, v in fa.items() if k.endswith("lora_up.weight")]
    assert any(v.abs().max() > 0 for v in ups)  # training moved the LoRA
    la, lb = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 4
    assert [h["loss"] for h in a.history[2:]] == [h["loss"] for h in b2.history]
    assert (tmp_path / "a" / "validation" / "step_00000002.mp4").is_file()
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    meta = read_lora(a.lora_path).metadata
    assert meta["anyid.stage"] == "sft"
    assert ConditioningLayout.from_json(meta[LAYOUT_METADATA_KEY]) == ConditioningLayout(max_clip_frames=5)
    assert meta["anyid.similarity"] == "jaccard"


def test_model_folder_source(tmp_path):
    folder = Engine.tiny(seed=3).save_pretrained(tmp_path / "model")
    engine = build_engine(ModelSource(path=str(folder)), torch.float32, torch.device("cpu"), None)
    want = Engine.tiny(seed=3).dit.state_dict()
    got = engine.dit.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ModelSource(path=str(folder)).name == "model"


def test_bf16_needs_cuda(root, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train_sft(config(root, tmp_path, mixed_precision="bf16"))


def test_config_files(tmp_path):
    toml = tmp_path / "sft.toml"
    toml.write_text('output_dir = "out"\nmax_steps = 7\n[model]\npreset = "tiny"\n[data]\nroot = "d"\n'
                    'buckets = [[9, 64, 64]]\n[lora]\nrank = 16\n[layout]\nplacement = "before"\n'
                    'pad_color = [1, 2, 3]\n')
    cfg = load_config(toml, SFTConfig, ["optim.lr=5e-5", "data.similarity=jaccard"])
    assert cfg.max_steps == 7 and cfg.lora.rank == 16 and cfg.lora.alpha == 128.0 and cfg.optim.lr == 5e-5
    assert cfg.layout == ConditioningLayout(placement="before", pad_color=(1, 2, 3))
    assert cfg.data.buckets == ((9, 64, 64),) and cfg.data.similarity == "jaccard"
    assert cfg.null_prob == 0.1 and cfg.train_shift == 5.0 and cfg.optim.weight_decay == 1e-3  # AnyID Table 2
    js = tmp_path / "sft.json"
    tiny = {"preset": "tiny"}
    for body, match in [({"model": tiny, "data": {"root": "d"}, "lr": 1}, "^lr: unknown key"),
                        ({"model": tiny, "data": {"root": "d"}, "max_steps": "ten"},
                         '^max_steps = "ten": must be an integer$'),
                        ({"model": tiny, "data": {"root": "d", "buckets": [[8, 64, 64]]}},
                         r"^\[data\] buckets\[0\] = \[8, 64, 64\]: .*num_frames=8 must be 4n\+1"),
                        ({"model": tiny, "data": {"root": "d", "buckets": [[9, 64, 60]]}},
                         r"^\[data\] buckets\[0\] = \[9, 64, 60\]: .*width=60 must be a positive multiple of 32"),
                        ({"data": {"root": "d"}, "model": {"preset": "tiny", "path": "x"}},
                         r"^\[model\]: .*exactly one"),
                        ({"data": {"root": "d"}}, r"^\[model\]: a config needs a \[model\] section"),
                        ({"model": tiny, "data": {"root": "d"}, "lora": {"save_dtype": "fp8"}},
                         r'^\[lora\] save_dtype = "fp8": must be one of \[.bf16., .fp16., .fp32.\]'),
                        ({"model": tiny, "layout": {"placement": "middle"}, "data": {"root": "d"}},
                         r"^\[layout\]: .*placement"),
                        ({"model": tiny}, r"^\[data\]: ")]:
        js.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=match):
            load_config(js, SFTConfig)
