"""Sharded training (trainer/dist.py): two gloo processes with FSDP2 over the frozen base and the LoRA (gradient
checkpointing on) train SFT and Flow-DPO as one process does on the same global batch; a distributed checkpoint
written by the two processes resumes on one process and continues identically; with sequence_parallel = 2 the
two processes split each sample's tokens and train as one process does on the same samples."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from anyid_rt.parallel import free_port
from anyid_rt.trainer.config import ConfigError, OptimConfig
from anyid_rt.trainer.synthetic import make_id_groups, make_preference_pairs
from test_trainer_dist import config as sft_config
from test_trainer_dpo import config as dpo_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _worker(rank: int, world: int, port: int, runs: dict, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from anyid_rt.trainer import dist as dist_utils
    from anyid_rt.trainer.dpo import train_dpo
    from anyid_rt.trainer.sft import train_sft

    try:
        results = {}
        for name, cfg in runs.items():
            r = (train_sft if name.startswith("sft") else train_dpo)(cfg)
            results[name] = (r.lora_state, r.history)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist_utils.shutdown()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two-process runs: FSDP (batch 1 per process) and sequence-parallel (one sample per step), and their
    configs."""
    tmp = tmp_path_factory.mktemp("fsdp")
    root = make_id_groups(tmp / "data", groups=2, clips=3, face_boxes="all")
    pairs = make_preference_pairs(tmp / "pairs", pairs=4, dominated=2)
    sft = replace(sft_config(root, tmp / "sft2", batch_size=1), sharding="fsdp", gradient_checkpointing=True,
                  checkpoint_every=2)
    # Adam's eps at 1e-6: a LoRA element whose DPO gradient is ~0 would otherwise move by up to lr in the
    # direction of its float noise, which differs between a batch of 2 and two batches of 1
    dpo = dpo_config(pairs, tmp / "dpo2", batch_size=1, max_steps=2, sharding="fsdp", gradient_checkpointing=True,
                     optim=OptimConfig(lr=1e-3, eps=1e-6))
    sft_sp = replace(sft, output_dir=str(tmp / "sft_sp"), sharding="ddp", sequence_parallel=2, checkpoint_every=0,
                     max_steps=2)
    dpo_sp = replace(dpo, output_dir=str(tmp / "dpo_sp"), sharding="ddp", sequence_parallel=2)
    runs = dict(sft=sft, dpo=dpo, sft_sp=sft_sp, dpo_sp=dpo_sp)
    mp.start_processes(_worker, args=(2, free_port(), runs, str(tmp)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return dict(tmp=tmp, root=root, pairs=pairs, ranks=ranks, **runs)


def _init_lora(cfg) -> dict:
    from anyid_rt.engine import Engine
    from anyid_rt.trainer.lora import inject_lora, lora_state_dict

    dit = Engine.tiny(seed=0).dit
    inject_lora(dit, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.seed)
    return lora_state_dict(dit)


def _update_error(a: dict, b: dict, init: dict) -> tuple[float, float]:
    """(|update_a - update_b| / |update_b|, max |update_a - update_b| / max |update_b|) of two trained LoRAs from
    the same start. Adam divides by sqrt(v): float-order differences in the averaged gradients show as ~1e-6
    noise, and as up to lr on the few elements whose gradient is ~0; another batch differs everywhere by ~lr."""
    assert a.keys() == b.keys() == init.keys() and len(a) == 40
    da = torch.cat([(a[k] - init[k]).flatten() for k in sorted(init)])
    db = torch.cat([(b[k] - init[k]).flatten() for k in sorted(init)])
    assert db.norm() > 1e-3  # the LoRA was trained: equality is not trivial
    return ((da - db).norm() / db.norm()).item(), ((da - db).abs().max() / db.abs().max()).item()


def _assert_same_training(what: str, stage: str, run: tuple[dict, list], one, cfg) -> None:
    """A two-process run's (LoRA, history) against the one-process result `one` of the same samples."""
    lora, history = run
    rel, peak = _update_error(lora, one.lora_state, _init_lora(cfg))
    print(f"{what} vs one process: LoRA updates differ by {rel:.2e} (norm), {peak:.2e} (max); losses "
          f"{[round(h['loss'], 6) for h in history]} vs {[round(h['loss'], 6) for h in one.history]}")
    # the largest element difference is checked for SFT; DPO's (beta 500) reaches a few 1e-3 on elements whose
    # gradient is near 0 even with eps 1e-6, so there the norm (observed <= 6e-5) carries the check
    assert rel < 1e-3 and (stage == "dpo" or peak < 1e-2)
    # DPO's beta multiplies the policy's error differences: the ~1e-6 update noise above moves its second loss
    # by up to ~5e-5 (relative); a wrong gradient sum moves it by the step's whole change (6e-2)
    for a, b in zip(history, one.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5 if stage == "sft" else 1e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_fsdp_sft_and_dpo_equal_one_process_on_the_global_batch(runs):
    from anyid_rt.trainer.dpo import train_dpo
    from anyid_rt.trainer.sft import train_sft

    r0, r1 = runs["ranks"]
    for stage in ("sft", "dpo"):  # every rank ends with the same (gathered) LoRA and logged losses
        assert all(torch.equal(r0[stage][0][k], r1[stage][0][k]) for k in r0[stage][0])
        assert [h["loss"] for h in r0[stage][1]] == [h["loss"] for h in r1[stage][1]]
    tmp = runs["tmp"]
    one_sft = train_sft(replace(runs["sft"], output_dir=str(tmp / "sft1"), batch_size=2, sharding="ddp",
                                gradient_checkpointing=False, checkpoint_every=0))
    one_dpo = train_dpo(replace(runs["dpo"], output_dir=str(tmp / "dpo1"), batch_size=2, sharding="ddp",
                                gradient_checkpointing=False))
    for stage, one in (("sft", one_sft), ("dpo", one_dpo)):
        _assert_same_training(f"{stage}: FSDP x2", stage, r0[stage], one, runs[stage])


def test_distributed_checkpoint_resumes_on_another_process_count(runs):
    from anyid_rt.trainer.common import SHARDS_DIR
    from anyid_rt.trainer.sft import train_sft

    ckpt = Path(runs["sft"].output_dir) / "checkpoints" / "step_00000002"
    assert (ckpt / SHARDS_DIR / ".metadata").is_file() and (ckpt / "lora.safetensors").is_file()
    # written by two processes at batch 1, resumed by one at batch 2 (the same global batch): step 3 as before
    resumed = train_sft(replace(runs["sft"], output_dir=str(runs["tmp"] / "resumed"), batch_size=2,
                                resume=str(ckpt), checkpoint_every=0))
    lora, history = runs["ranks"][0]["sft"]
    assert resumed.step == 3 and [h["step"] for h in resumed.history] == [3]
    assert resumed.history[0]["loss"] == pytest.approx(history[2]["loss"], rel=1e-6)
    rel, peak = _update_error(resumed.lora_state, lora, _init_lora(runs["sft"]))
    print(f"resume 2 -> 1 process: LoRA updates after step 3 differ by {rel:.2e} (norm), {peak:.2e} (max)")
    assert rel < 1e-3 and peak < 1e-2
    # a sharded checkpoint is refused by a replicated run, naming the setting
    with pytest.raises(ConfigError, match="sharding"):
        train_sft(replace(runs["sft"], output_dir=str(runs["tmp"] / "other"), resume=str(ckpt), sharding="ddp"))


def test_sequence_parallel_training_equals_one_process_on_the_same_samples(runs):
    from anyid_rt.trainer.dpo import train_dpo
    from anyid_rt.trainer.sft import train_sft

    r0, r1 = runs["ranks"]
    tmp = runs["tmp"]
    for stage, train in (("sft", train_sft), ("dpo", train_dpo)):
        cfg = runs[f"{stage}_sp"]
        one = train(replace(cfg, output_dir=str(tmp / f"{stage}_sp1"), sequence_parallel=1))
        lora, history = r0[f"{stage}_sp"]
        assert all(torch.equal(lora[k], r1[f"{stage}_sp"][0][k]) for k in lora)  # the group stays identical
        _assert_same_training(f"{stage}: sequence parallel x2", stage, (lora, history), one, cfg)


@pytest.mark.parametrize("world, change, match", [
    ("3", dict(sequence_parallel=2), r"sequence_parallel = 2: must divide the 3 processes"),
    ("4", dict(sequence_parallel=4), r"sequence_parallel = 4: must divide the DiT's 2 attention heads"),
    ("2", dict(sequence_parallel=2, sharding="fsdp"), r"not supported with sharding = \"fsdp\" yet"),
    ("2", dict(sharding="fsdp", validation_every=2), r"validation videos are not made by sharded runs"),
])
def test_bad_distributed_settings_fail_before_loading(runs, monkeypatch, world, change, match):
    from anyid_rt.media import ASSET_DIR
    from anyid_rt.trainer.config import ValidationConfig
    from anyid_rt.trainer.preflight import check_sft

    monkeypatch.setenv("WORLD_SIZE", world)
    every = change.pop("validation_every", 0)
    with pytest.raises(ConfigError, match=match):
        cfg = replace(runs["sft"], output_dir=str(runs["tmp"] / "bad"), sharding="ddp", resume="none",
                      validation=ValidationConfig(every=every, prompt="x", references=(str(ASSET_DIR / "astronaut.png"),))
                      if every else runs["sft"].validation)
        check_sft(replace(cfg, **change))
