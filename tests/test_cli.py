"""The command line: generate, demo, errors, and --help of every command (fast, importing nothing heavy).
Request checks, Ctrl-C and honoured flags: tests/test_cli_requests.py."""
from __future__ import annotations

import subprocess
import sys

import pytest

from anyid_rt import media
from anyid_rt.cli import main
from anyid_rt.media import ASSET_DIR as ASSETS


def test_generate_tiny_with_references(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--tiny", "--prompt", "Expression: smiling.", "--ref", str(ASSETS / "astronaut.png"),
               "--ref", str(ASSETS / "astronaut_clip.mp4"), "--primary", "1", "--steps", "2", "--out", str(out),
               "--no-progress", "--timings-json", str(tmp_path / "t.json")])
    assert rc == 0
    frames, fps, codec = media.read_video(out)
    assert frames.shape == (9, 64, 64, 3) and fps == 24 and codec == "h264"
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "denoise" in text
    assert (tmp_path / "t.json").exists()


def test_demo_writes_the_video_and_says_it_is_noise(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    assert media.read_video(out).frames.shape[0] == 9
    text = capsys.readouterr().out
    assert "random weights" in text and "--model" in text and str(out) in text


@pytest.mark.parametrize("args, message", [
    (["--frames", "8"], "4n+1"),
    (["--height", "100"], "multiple of 32"),
    (["--ref", "/nonexistent.png"], "reference 0"),
])
def test_generate_bad_input_exits_2_with_the_reason(tmp_path, capsys, args, message):
    rc = main(["generate", "--tiny", "--prompt", "p", "--out", str(tmp_path / "x.mp4"), "--no-progress", *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "p"], "one of the arguments --model --tiny is required"),
    (["generate", "--tiny"], "the following arguments are required: --prompt"),
])
def test_missing_required_flags_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2  # as every bad request (the README promises 2)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["generate"], ["demo"], ["bench"], ["train"], ["train", "sft"],
                                     ["export"], ["export", "onnx"], ["export", "trt"], ["export", "triton-repo"],
                                     ["serve"], ["eval"]])
def test_help(command):
    r = subprocess.run([sys.executable, "-m", "anyid_rt.cli", *command, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "usage: anyid-rt" in r.stdout


# what `--help` must not import: they take seconds (torch alone 1.5-3 s on a 2-core machine), the help < 1 s
HEAVY = ("torch", "transformers", "onnx", "triton", "anyid_rt.engine", "anyid_rt.models", "anyid_rt.media")


def test_help_imports_nothing_heavy():
    """Building the parser and printing the help of every command the parser owns imports none of HEAVY (the
    `bench` tool parses its own arguments in its module, which is tooling)."""
    code = f"""
import contextlib, io, sys
from anyid_rt.cli import build_parser
commands = [[], ["generate"], ["demo"], ["export"], ["export", "onnx"], ["export", "trt"],
            ["export", "triton-repo"], ["serve"], ["train"], ["train", "sft"], ["train", "dpo"], ["eval"]]
for c in commands:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(c + ["--help"])
        except SystemExit as e:
            assert e.code == 0, c
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"--help imported {r.stdout.strip()}"


def test_bench_help_imports_nothing_heavy():
    """`anyid-rt bench --help` loads the tool's module by name, which builds its options from torch-free settings."""
    code = f"""
import contextlib, io, sys
from anyid_rt.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["bench", "--help"])
    except SystemExit as e:
        assert e.code == 0
assert "--steps-timed" in out.getvalue()
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"bench --help imported {r.stdout.strip()}"
