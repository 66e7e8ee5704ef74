"""The newcomer's path through the CLI: every request is checked before any model loads, every flag takes effect
or is refused with exit code 2 and a one-line reason naming the flag, nothing is left half-written on failure
or Ctrl-C (exit 130), and missing optional packages are named before any work.

"Before any model loads" is shown two ways, neither by timing: checks that need no torch fail before the
engine module is even imported (a subprocess looks at sys.modules), and the others run with the one loading
function, `Engine.from_plan`, replaced by one that fails the test if called.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anyid_rt import media
from anyid_rt.cli import main
from anyid_rt.conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from anyid_rt.engine import Engine
from anyid_rt.lora import LoraWeights, read_lora, save_lora
from anyid_rt.media import ASSET_DIR as ASSETS
from helpers import sigint_default

PNG, CLIP = str(ASSETS / "astronaut.png"), str(ASSETS / "astronaut_clip.mp4")


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is built: every CLI path loads through Engine.from_plan."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the request was refused")

    monkeypatch.setattr(Engine, "from_plan", classmethod(refuse))


def _lora(path: Path, dim: int = 64, layout: ConditioningLayout | None = None, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    name = "blocks.0.self_attn.q"
    meta = {LAYOUT_METADATA_KEY: layout.to_json()} if layout else {}
    save_lora(LoraWeights({name: torch.randn(4, dim, generator=g)}, {name: torch.randn(dim, 4, generator=g)},
                          {name: 4.0}, meta), path)
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A real model folder in the original layout (the tiny preset's sizes)."""
    return Engine.tiny(seed=0).save_pretrained(tmp_path_factory.mktemp("models") / "tiny_model")


def _generate(tmp_path, *args) -> list[str]:
    return ["generate", "--prompt", "a smile", "--out", str(tmp_path / "x.mp4"), "--no-progress", *args]


# -- item 1, 2, 10: refused before any loading, naming the flag -------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--tiny", "--frames", "10"], "--frames 10 must be 4n+1"),
    (["--tiny", "--height", "100"], "--height 100 must be a positive multiple of 32"),
    (["--tiny", "--width", "0"], "--width 0 must be a positive multiple of 32"),
    (["--tiny", "--steps", "0"], "--steps 0 must be an int >= 1"),
    (["--tiny", "--guidance", "0.5"], "--guidance 0.5 must be >= 1"),
    (["--tiny", "--shift", "0"], "--shift 0.0 must be a number > 0"),
    (["--tiny", "--ref", "/nonexistent.png"], "--ref /nonexistent.png (reference 0): file not found"),
    (["--tiny", "--image", "/nonexistent.png"], "--image /nonexistent.png (image): file not found"),
    (["--tiny", "--primary", "3"], "--primary 3 selects a reference, but none is given (add --ref)"),
    (["--tiny", "--ref", PNG, "--primary", "1"], "--primary 1 is out of range for 1 references"),
    (["--tiny", "--lora", "/nonexistent.safetensors"], "--lora /nonexistent.safetensors (LoRA): file not found"),
    (["--tiny", "--negative-prompt", "blurry", "--guidance", "1"], "--negative-prompt has no effect with --guidance 1"),
    (["--tiny", "--image", PNG, "--frames", "1"], "--image (image-to-video) needs --frames >= 5"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: model folder not found"),
])
def test_bad_request_refused_before_loading(tmp_path, capsys, no_load, args, message):
    assert main(_generate(tmp_path, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anyid-rt generate: error: ") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no partial file, no folder


def test_paths_checked_before_loading(tmp_path, capsys, no_load):
    (tmp_path / "a_file").write_text("x")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    cases = [
        (["--tiny", "--out", str(tmp_path / "a_file" / "v.mp4")], "--out", "a_file is a file"),
        (["--tiny", "--out", str(tmp_path / "v.avi")], "--out", "must end in .mp4"),
        (["--tiny", "--timings-json", str(tmp_path / "a_file" / "t.json")], "--timings-json", "a_file is a file"),
        (["--tiny", "--ref", PNG, "--ref", str(broken)], "reference 1 (--ref)", "not a readable image"),
        (["--tiny", "--ref", str(notes)], "reference 0 (--ref)", "unsupported file type '.txt'"),
        (["--tiny", "--ref", str(tmp_path)], "--ref", "is a folder, not a file"),
    ]
    for args, flag, message in cases:
        assert main(["generate", "--prompt", "p", "--no-progress", *args]) == 2, args
        err = capsys.readouterr().err
        assert flag in err and message in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "broken.png", "notes.txt"]


def test_model_folders_name_the_missing_file(tmp_path, capsys, no_load, tiny_folder):
    import shutil

    only_vae = tmp_path / "only_vae"
    only_vae.mkdir()
    shutil.copy(tiny_folder / "Wan2.2_VAE.pth", only_vae)
    no_umt5 = tmp_path / "no_umt5"
    shutil.copytree(tiny_folder, no_umt5)
    (no_umt5 / "models_t5_umt5-xxl-enc-bf16.pth").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, wanted in [(only_vae, ["the DiT weights (diffusion_pytorch_model", "models_t5_umt5-xxl-enc-bf16.pth",
                                       "google/umt5-xxl/", "it holds Wan2.2_VAE.pth"]),
                           (no_umt5, ["lacks the umT5 text encoder (models_t5_umt5-xxl-enc-bf16.pth)"]),
                           (empty, ["is neither a diffusers pipeline folder", "it is empty"])]:
        assert main(["generate", "--model", str(folder), "--prompt", "p", "--out", str(tmp_path / "v.mp4")]) == 2
        err = capsys.readouterr().err
        assert f"--model {folder}" in err and all(w in err for w in wanted), err


def test_lora_files_checked_against_the_model_before_loading(tmp_path, capsys, no_load, tiny_folder):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    big = _lora(tmp_path / "big.safetensors", dim=3072)  # a 5B LoRA
    for args, message in [(["--tiny", "--lora", str(garbage)], "not a readable safetensors LoRA"),
                          (["--tiny", "--lora", str(big)], "does not fit the model"),
                          (["--model", str(tiny_folder), "--lora", str(big)], "does not fit the model")]:
        assert main(_generate(tmp_path, *args)) == 2
        err = capsys.readouterr().err
        assert f"--lora {args[-1]}: " in err and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_device_without_cuda_is_one_line(tmp_path, capsys, no_load):
    for args in (["--tiny", "--device", "cuda"], ["--tiny", "--text-encoder-device", "cuda:1"]):
        assert main(_generate(tmp_path, *args)) == 2
        err = capsys.readouterr().err.strip()
        assert "CUDA is not available here" in err and "use --" in err and "\n" not in err
    assert main(_generate(tmp_path, "--tiny", "--device", "gpu0")) == 2
    assert "--device gpu0: not a device" in capsys.readouterr().err


def test_checks_that_need_no_torch_run_before_it_is_imported(tmp_path):
    """Flags, sizes and paths are refused before the engine module (and torch) is imported."""
    (tmp_path / "a_file").write_text("x")
    requests = [
        ["--tiny", "--height", "100"], ["--tiny", "--frames", "8"], ["--tiny", "--ref", "/nonexistent.png"],
        ["--tiny", "--lora", "/nonexistent.safetensors"], ["--tiny", "--primary", "2"],
        ["--tiny", "--out", str(tmp_path / "a_file" / "v.mp4")], ["--model", str(tmp_path)],
        ["--tiny", "--negative-prompt", "x", "--guidance", "1"],
    ]
    code = f"""
import sys
from anyid_rt.cli import main
codes = [main(["generate", "--prompt", "p", *args]) for args in {requests!r}]
print(codes, sorted(m for m in ("torch", "transformers", "anyid_rt.engine") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{[2] * len(requests)} []"
    assert len(r.stderr.strip().splitlines()) == len(requests)  # one line each


def test_exit_codes_through_the_entry_point(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "anyid_rt.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=tmp_path)
    r = run("generate", "--tiny", "--prompt", "p", "--frames", "8")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "anyid-rt generate: error: --frames 8 must be 4n+1 (1, 5, 9, ..., 121), e.g. 9"]
    assert run("generate", "--prompt", "p").returncode == 2  # neither --model nor --tiny
    assert run("generate", "--tiny").returncode == 2  # no --prompt
    assert not (tmp_path / "out").exists()


def test_empty_prompt(tmp_path, capsys, no_load):
    assert main(["generate", "--tiny", "--prompt", "  ", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "--prompt is empty and nothing else conditions the video" in capsys.readouterr().err


# -- item 2: flags honoured with --tiny ---------------------------------------------------------------------------

def test_tiny_honours_dtype_lora_backend_and_devices(tmp_path, capsys):
    layout = ConditioningLayout(placement="before")
    lora = _lora(tmp_path / "tiny_lora.safetensors", layout=layout)
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--tiny", "--prompt", "p", "--steps", "1", "--dtype", "bf16", "--backend", "torch",
               "--lora", str(lora), "--device", "cpu", "--text-encoder-device", "cpu", "--out", str(out),
               "--no-progress"])
    assert rc == 0 and out.is_file()
    start = capsys.readouterr().out.splitlines()[0]
    assert start.startswith("anyid-rt generate: model tiny preset") and "dtype bf16" in start
    assert "LoRA tiny_lora.safetensors" in start and "backend torch" in start
    assert "layout (from tiny_lora.safetensors): placement=before" in start
    # and the plan that line describes is the engine that ran
    base = Engine.tiny(seed=0)
    e = Engine.tiny(seed=0, dtype="bf16", lora=lora, text_encoder_device="cpu")
    assert e.layout == layout and e.dit.blocks[0].self_attn.qkv.weight.dtype == torch.bfloat16
    assert e.text_encoder.dtype == torch.bfloat16 and e.dit.head.head.weight.dtype == torch.float32
    lw = read_lora(lora)
    n = "blocks.0.self_attn.q"
    # merged as load_dit + LoRA would: the bf16 base weight plus the fp32 delta, rounded to bf16
    w16 = base.dit.checkpoint_state_dict()[f"{n}.weight"].to(torch.bfloat16)  # q's rows of the fused qkv
    want = (w16.float() + lw.scale(n) * lw.up[n] @ lw.down[n]).to(torch.bfloat16)
    assert torch.equal(e.dit.checkpoint_state_dict()[f"{n}.weight"], want)


# -- item 9: one line at the start, load time, progress bars --------------------------------------------------------

def test_start_line_load_time_and_progress_bars(tmp_path, capsys, tiny_folder):
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", str(tiny_folder), "--prompt", "p", "--ref", PNG, "--steps", "1",
                 "--device", "cpu", "--dtype", "fp32", "--out", str(out), "--timings-json",
                 str(tmp_path / "t" / "timings.json")]) == 0
    text = capsys.readouterr()
    lines = text.out.splitlines()
    assert lines[0] == (f"anyid-rt generate: model {tiny_folder} (original layout) | device cpu | dtype fp32 (VAE fp32)"
                        " | backend torch (auto), attention unquantised | quantisation none | layout (default): "
                        "placement=after pad_color=(0, 0, 0) max_clip_frames=33 max_references=8 null_reference=black "
                        "clip_fps=24.0 long_clip=window person_crop=False aux_order=length reference_attention=joint")
    assert lines[1].startswith("loaded in ") and lines[1].endswith(" s")
    for bar in ("loading DiT", "loading Wan2.2 VAE", "loading umT5 text encoder", "reading references",
                "encoding references", "denoising", "VAE decode"):
        assert bar in text.err, bar
    assert json.loads((tmp_path / "t" / "timings.json").read_text())["total"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "v.mp4"]


# -- item 1, 9: nothing half-written, Ctrl-C ------------------------------------------------------------------------

def test_failed_write_leaves_no_partial_video(tmp_path, monkeypatch):
    def write_then_fail(frames, path, fps, **kw):
        Path(path).write_bytes(b"half a video")
        raise OSError("disk full")

    monkeypatch.setattr(media, "write_mp4", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        Engine.tiny(seed=0).generate("p", steps=1, output=tmp_path / "sub" / "v.mp4", progress=False)
    assert list((tmp_path / "sub").iterdir()) == []


def test_ctrl_c_exits_130_with_one_line_and_no_partial_output(tmp_path):
    out = tmp_path / "v.mp4"
    p = subprocess.Popen([sys.executable, "-u", "-m", "anyid_rt.cli", "generate", "--tiny", "--prompt", "p",
                          "--steps", "2000", "--out", str(out), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    try:
        lines = []
        while not any(line.startswith("loaded in") for line in lines):  # interrupted inside the denoising loop
            line = p.stdout.readline()
            assert line, f"the command ended early: {p.stderr.read()}"
            lines.append(line)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130
    assert err.strip().splitlines() == ["anyid-rt generate: interrupted; no partial output was left"]
    assert list(tmp_path.iterdir()) == []


# -- item 4, 6: export -------------------------------------------------------------------------------------------

def _fake_5b_folder(path: Path) -> Path:
    """File names and config.json of the original 5B layout, empty weights: enough for the checks and for
    `export triton-repo`, which reads no weights (the server loads them)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "ti2v", "dim": 3072}))
    for f in ("diffusion_pytorch_model.safetensors", "Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        (path / f).write_bytes(b"")
    (path / "google" / "umt5-xxl").mkdir(parents=True)
    (path / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    return path


def _parameters(config: Path) -> dict[str, str]:
    import re

    return dict(re.findall(r'parameters \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}',
                           config.read_text()))


def test_triton_repo_takes_the_preset_of_the_model(tmp_path, capsys, tiny_folder):
    big = _fake_5b_folder(tmp_path / "Wan2.2-TI2V-5B")
    assert main(["export", "triton-repo", "--model", str(big), "--out", str(tmp_path / "repo")]) == 0
    params = _parameters(tmp_path / "repo" / "anyid" / "config.pbtxt")
    assert params["preset"] == "wan2.2-ti2v-5b" and params["device"] == "cuda"
    assert int(params["max_pixels"]) == 1280 * 704 and int(params["max_frames"]) == 121
    assert "preset wan2.2-ti2v-5b | device cuda" in capsys.readouterr().out
    # a model folder of the tiny preset's sizes gets the tiny preset; a contradicting --preset is refused
    assert main(["export", "triton-repo", "--model", str(tiny_folder), "--out", str(tmp_path / "small")]) == 0
    assert _parameters(tmp_path / "small" / "anyid" / "config.pbtxt")["preset"] == "tiny"
    capsys.readouterr()
    for args, message in [(["--model", str(big), "--preset", "tiny"], "--preset tiny does not match --model"),
                          (["--model", str(big), "--seed", "3"], "--seed picks the tiny preset's random weights"),
                          (["--preset", "wan2.2-ti2v-5b"], "--preset wan2.2-ti2v-5b needs --model"),
                          (["--onnx", str(tmp_path)], f"--onnx {tmp_path} lacks dit.onnx"),
                          (["--max-frames", "0"], "--max-frames 0 must be >= 1")]:
        assert main(["export", "triton-repo", "--out", str(tmp_path / "refused"), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_export_onnx_missing_package_is_named_before_any_work(tmp_path, capsys, monkeypatch, no_load):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # importlib.util.find_spec then reports it missing
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "export onnx needs onnxscript" in err and 'pip install -e ".[export]"' in err
    assert not out.exists()  # no empty output folder left behind


@pytest.mark.parametrize("args, message", [
    (["--calib-steps", "2"], "--calib-steps has no effect without --quantize"),
    (["--quantizer", "builtin"], "--quantizer has no effect without --quantize"),
    (["--quantize", "int8", "--quantizer", "modelopt"], "--quantizer modelopt writes fp8"),
    (["--quantize", "fp8", "--parts", "vae"], "add dit to --parts"),
    (["--opset", "17"], "--opset 17 is too old"),
    (["--seed", "1", "--model", "MODEL"], "--seed picks the tiny preset's random weights"),
])
def test_export_onnx_refuses_flags_that_would_do_nothing(tmp_path, capsys, no_load, tiny_folder, args, message):
    args = [str(tiny_folder) if a == "MODEL" else a for a in args]
    assert main(["export", "onnx", "--out", str(tmp_path / "onnx"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


def test_export_trt_takes_the_preset_of_the_graphs(tmp_path, capsys):
    (tmp_path / "dit.onnx").write_bytes(b"")
    (tmp_path / "export.json").write_text(json.dumps({"preset": "tiny"}))
    assert main(["export", "trt", "--onnx", str(tmp_path), "--preset", "wan2.2-ti2v-5b", "--print-profiles"]) == 2
    assert "says they were exported at the tiny preset" in capsys.readouterr().err


def test_bench_report_without_matplotlib(tmp_path, capsys, monkeypatch):
    from anyid_rt.bench import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "the plots need matplotlib" in err and 'pip install -e ".[bench]"' in err
    assert not (tmp_path / "report").exists()
