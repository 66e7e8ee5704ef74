"""Parallel generation (anyid_rt/parallel.py) on gloo: sequence (Ulysses) and guidance parallelism give the final
latents of one process, within fp32 rounding, for text-to-video, references with a clip and image-to-video; the
tiled VAE decode split over ranks gives the same frames; a bad request fails on every rank, before loading."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from anyid_rt.config import ModelConfig, ParallelConfig, replace
from anyid_rt.engine import Engine
from anyid_rt.media import ASSET_DIR
from anyid_rt.request import RequestError
from anyid_rt.parallel import free_port

pytestmark = pytest.mark.usefixtures("one_thread")

REFS = [str(ASSET_DIR / "astronaut.png"), str(ASSET_DIR / "astronaut_clip.mp4")]
CASES = {  # name -> generate() arguments; 3 steps of UniPC, guidance 5 (batch of 2) unless said
    "t2v": dict(prompt="a man walks", steps=3, seed=1),
    "refs_clip": dict(prompt="smiles", references=REFS, primary=0, steps=3, seed=2),
    "i2v": dict(prompt="turns", image=REFS[0], steps=3, seed=3),
    "t2v_no_guidance": dict(prompt="a man walks", steps=3, seed=1, guidance=1.0),
}
TILE = (2, 2, 1)  # the tiny latent is 4 x 4: 9 overlapping tiles, so every rank decodes several
TOL = 1e-5  # fp32: the sharded GEMMs and the head-split attention sum in another order than one process


def _run_cases(engine: Engine, cases: dict) -> dict:
    return {name: engine.generate(**kw, progress=False) for name, kw in cases.items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from anyid_rt import cli, parallel
    from anyid_rt.models.random_weights import random_dit

    results: dict = {}
    try:
        if world == 2:
            # Ulysses over 2 ranks (3 target frames: shards of 2 and 1 frames), then guidance over 2 ranks
            seq = Engine.tiny(seed=0, parallel=ParallelConfig(sequence=2), vae_tile=TILE)
            for name, v in _run_cases(seq, CASES).items():
                results[f"seq2/{name}"] = (v.latents, v.frames)
            z = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():  # the decode's tiles split over the ranks, and one process's tiled decode
                results["decode"] = (parallel.decode(seq.vae, z, TILE), seq.vae.decode(z, tile=TILE))
            cfg = Engine.tiny(seed=0, parallel=ParallelConfig(cfg=True))
            cases = {k: v for k, v in CASES.items() if k != "t2v_no_guidance"}
            for name, v in _run_cases(cfg, cases).items():
                results[f"cfg/{name}"] = (v.latents, v.frames)
            # a bad request on one rank fails every rank, with that rank's message
            for key, kw in {"missing_ref": dict(references=[REFS[0]] if rank == 0 else ["/nonexistent.png"]),
                            "cfg_guidance_1": dict(guidance=1.0)}.items():
                try:
                    cfg.generate("x", steps=1, progress=False, **kw)
                    results[key] = None
                except ValueError as e:
                    results[key] = str(e)
            # last (it leaves the process group): the CLI in this job, under torchrun's environment; rank 0
            # alone writes the video and reports
            out_video = Path(out) / "cli.mp4"
            with contextlib.redirect_stdout(io.StringIO()) as said:
                code = cli.main(["generate", "--tiny", "--prompt", "x", "--steps", "2", "--no-progress",
                                 "--sequence-parallel", "2", "--vae-tile", "2", "2", "--out", str(out_video)])
            results["cli"] = (code, said.getvalue(), out_video.is_file())
        else:
            # guidance x Ulysses 2 on the engine; Ulysses over 4 ranks on a DiT with 4 heads
            both = Engine.tiny(seed=0, parallel=ParallelConfig(sequence=2, cfg=True), vae_tile=TILE)
            for name, v in _run_cases(both, {"refs_clip": CASES["refs_clip"]}).items():
                results[f"seq2cfg/{name}"] = (v.latents, v.frames)
            dit = random_dit(_four_heads(), seed=0)
            ctx = parallel.ParallelContext.join(ParallelConfig(sequence=4), torch.device("cpu"))
            with torch.no_grad():
                results["seq4/dit"] = parallel.ParallelDiT(dit, ctx).forward_groups(*_dit_inputs(dit))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        parallel.shutdown()


def _four_heads():
    return replace(ModelConfig.preset("tiny").dit, dim=64, num_heads=4)


def _dit_inputs(dit):
    """A target of 5 latent frames and a 2-frame reference (7 frames over 4 ranks: 2, 2, 2, 1), per-token
    timesteps (reference at t=0) and a batch of 2 prompts."""
    from anyid_rt.models.dit import Segments

    g = torch.Generator().manual_seed(0)
    target, ref = torch.randn(2, 48, 5, 4, 6, generator=g), torch.randn(2, 48, 2, 4, 6, generator=g)
    t = torch.tensor([[700.0, 0.0], [300.0, 0.0]])
    segments = Segments((5 * 2 * 3, 2 * 2 * 3), t)
    text = dit.prepare_text([torch.randn(7, dit.cfg.text_dim, generator=g), torch.randn(3, dit.cfg.text_dim,
                                                                                          generator=g)])
    return [target, ref], [0, 5], segments, text


def _spawn(world: int, tmp_path: Path) -> list[dict]:
    mp.start_processes(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    untiled, tiled = Engine.tiny(seed=0), Engine.tiny(seed=0, vae_tile=TILE)
    return {"untiled": _run_cases(untiled, CASES), "tiled": _run_cases(tiled, CASES)}


def _compare(ranks: list[dict], single: dict, prefix: str, names, tiled: bool) -> None:
    for name in names:
        ref = single["tiled" if tiled else "untiled"][name]
        lat0, frames0 = ranks[0][f"{prefix}/{name}"]
        for r in ranks[1:]:  # every rank ends with the same latents and frames (one sampler step on the same v)
            assert torch.equal(r[f"{prefix}/{name}"][0], lat0) and torch.equal(r[f"{prefix}/{name}"][1], frames0)
        err = (lat0 - ref.latents).abs().max().item()
        print(f"{prefix}/{name}: max |latent - one process| = {err:.2e} (|latent| max {ref.latents.abs().max():.2f})")
        assert err < TOL, (prefix, name, err)
        # the frames: uint8 of the same decode; a latent difference of 1e-6 may flip a rounding at most
        assert (frames0.int() - ref.frames.int()).abs().max() <= 1, (prefix, name)


def test_two_ranks_sequence_and_guidance_parallel_equal_one_process(tmp_path, single):
    ranks = _spawn(2, tmp_path)
    _compare(ranks, single, "seq2", CASES, tiled=True)
    _compare(ranks, single, "cfg", [k for k in CASES if k != "t2v_no_guidance"], tiled=False)
    for r in ranks:  # the split decode: the same sums; 1 ulp where three or four tiles overlap (summation order)
        split, one = r["decode"]
        err = (split - one).abs().max().item()
        print(f"tiled decode split over 2 ranks: max |frames - one process| = {err:.1e}")
        assert err <= 2.5e-7 and one.abs().max() > 0.1
    # rank 1's unreadable reference fails both ranks, before any step, with its message
    assert "rank 1 failed" in ranks[0]["missing_ref"] and "nonexistent.png" in ranks[0]["missing_ref"]
    assert "nonexistent.png" in ranks[1]["missing_ref"]
    for r in ranks:
        assert "guidance 1 has no unconditional pass" in r["cfg_guidance_1"]
    (code0, said0, wrote0), (code1, said1, _) = ranks[0]["cli"], ranks[1]["cli"]
    assert code0 == code1 == 0 and wrote0 and said1 == ""  # one video, rank 0 speaks
    assert "parallel: sequence (Ulysses) x2 = 2 processes" in said0 and said0.count("wrote ") == 1


def test_four_ranks_sequence_times_guidance_and_four_way_ulysses(tmp_path, single):
    ranks = _spawn(4, tmp_path)
    _compare(ranks, single, "seq2cfg", ["refs_clip"], tiled=True)
    from anyid_rt.models.random_weights import random_dit

    dit = random_dit(_four_heads(), seed=0)
    with torch.no_grad():
        ref = dit.forward_groups(*_dit_inputs(dit))
    for r in ranks:
        err = (r["seq4/dit"] - ref).abs().max().item()
        print(f"seq4/dit: max |v - one process| = {err:.2e}")
        assert err < TOL


def test_tiled_frames_differ_from_untiled_so_the_decode_comparison_means_something(single):
    # the tiled single-process frames differ from the untiled ones (seams): a split decode that ignored the
    # tiling would not pass the tiled comparisons
    a, b = single["tiled"]["t2v"], single["untiled"]["t2v"]
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.frames, b.frames)


@pytest.mark.parametrize("config, world, match", [
    (ParallelConfig(sequence=4), "4", r"2 attention heads.*divisor of 2: 2"),
    (ParallelConfig(sequence=2), "3", r"needs 2 processes .* has 3: launch with torchrun --nproc-per-node 2"),
    (ParallelConfig(sequence=2, cfg=True), None, r"needs 4 processes .* has 1"),
])
def test_bad_parallel_settings_fail_before_loading(monkeypatch, config, world, match):
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setattr("anyid_rt.engine.random_dit", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(RequestError, match=match):
        Engine.tiny(parallel=config)


def test_parallel_config_and_compile_errors(monkeypatch):
    with pytest.raises(ValueError, match="parallelises nothing"):
        ParallelConfig(sequence=1, cfg=False)
    with pytest.raises(ValueError, match="int >= 1"):
        ParallelConfig(sequence=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RequestError, match="compile=True is not supported with parallel"):
        Engine.tiny(parallel=ParallelConfig(sequence=2), compile=True)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anyid_rt.cli", "generate", "--tiny", "--prompt", "x", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_cli_checks_parallel_flags_before_torch():
    bad = _cli("--cfg-parallel", "--guidance", "1")
    assert bad.returncode == 2 and "guidance 1 has no unconditional pass" in bad.stderr
    alone = _cli("--sequence-parallel", "2", env={"WORLD_SIZE": "1"})
    assert alone.returncode == 2 and "torchrun --nproc-per-node 2" in alone.stderr
