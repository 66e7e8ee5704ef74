"""`anyid-rt eval` and `anyid-rt eval-suite`: a tiny suite over the bundled assets with Engine.tiny on a CPU,
resuming, an interrupted case, --compare, suite-file errors and the command line's error exits."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from anyid_rt import Engine, media
from anyid_rt.cli import main
from anyid_rt.eval import EvalConfig, EvalError, parse_suite, run_suite
from anyid_rt.media import ASSET_DIR

ASTRONAUT = ASSET_DIR / "astronaut.png"
CLIP = ASSET_DIR / "astronaut_clip.mp4"


@pytest.fixture(scope="module")
def face_video(tmp_path_factory) -> Path:
    """The astronaut moving a little (shifts and zoom): a video whose identity is known to be high."""
    img = np.asarray(Image.open(ASTRONAUT).convert("RGB"))
    frames = []
    for i in range(9):
        m = cv2.getRotationMatrix2D((128, 128), 0, 1 + 0.02 * i)
        m[:, 2] += (2 * i - 8, i - 4)
        frames.append(cv2.warpAffine(img, m, (256, 256), borderMode=cv2.BORDER_REFLECT))
    path = tmp_path_factory.mktemp("given") / "given.mp4"
    media.write_mp4(np.stack(frames), path, fps=8)
    return path


def _suite(folder: Path, face_video: Path) -> Path:
    cases = [
        {"id": "img_ref", "references": [str(ASTRONAUT)], "prompt": "Expression: a calm smile.", "seed": 0},
        {"id": "two_refs", "refs": [str(ASTRONAUT), str(CLIP)], "primary": 1, "prompt": "Action: turns the head.",
         "seed": 1, "size": "64x64", "frames": 5},
        {"id": "given", "references": [str(ASTRONAUT), str(CLIP)], "video": str(face_video)},
    ]
    path = folder / "suite.jsonl"
    path.write_text("# a tiny suite over the bundled assets\n" + "\n".join(json.dumps(c) for c in cases) + "\n\n")
    return path


@pytest.fixture(scope="module")
def tiny_engine():
    return Engine.tiny(seed=0)


class CountingEngine:
    """Engine.tiny that counts generate calls and can be told to die while writing one case's video."""

    def __init__(self, engine, fail_on: str | None = None):
        self.engine, self.calls, self.fail_on = engine, [], fail_on

    def generate(self, prompt, **kw):
        self.calls.append(prompt)
        video = self.engine.generate(prompt, **kw)
        if self.fail_on is not None and prompt == self.fail_on:
            def dying_save(path):
                Path(path).write_bytes(b"\x00" * 64)  # half a file, then the interrupt
                raise KeyboardInterrupt
            video.save = dying_save
        return video


QUICK = {"steps": 2, "frames": 5}  # the tiny model's 64x64, fewer frames and steps: seconds on a CPU


def test_suite_generates_resumes_and_leaves_nothing_half_written(tmp_path, face_video, tiny_engine):
    suite = _suite(tmp_path, face_video)
    out = tmp_path / "run"
    dying = CountingEngine(tiny_engine, fail_on="Action: turns the head.")
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, out, engine=dying, defaults=QUICK, progress=False, log=lambda s: None)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["img_ref.json", "img_ref.mp4"]
    assert not (out / "results.jsonl").exists()

    # a killed process cannot clean up: its temporaries are removed by the next run
    (out / "videos" / ".two_refs.partial-1-abcdef.mp4").write_bytes(b"\x00")
    logs: list[str] = []
    engine = CountingEngine(tiny_engine)
    rows = run_suite(suite, out, engine=engine, defaults=QUICK, progress=False, log=logs.append)
    assert engine.calls == ["Action: turns the head."]  # img_ref was not generated again
    assert any("removed 1 partial" in s for s in logs) and any("1 video(s) already generated" in s for s in logs)
    assert [r["case"] for r in rows] == ["img_ref", "two_refs", "given"]
    assert media.read_video(out / "videos" / "two_refs.mp4").frames.shape == (5, 64, 64, 3)
    assert not list(out.rglob(".*partial*"))
    given = rows[2]["summary"]
    assert given["face_rate"] == 1.0 and given["sface.all_ref"] > 0.8
    assert (out / "results.jsonl").read_text().count("\n") == 3
    md = (out / "results.md").read_text()
    assert "| case |" in md and "sface.all_ref" in md and "mean (3)" in md
    for png in ("identity.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "reports" / "two_refs.json").read_text())
    assert report["references"][1]["primary"] and report["prompt"] == "Action: turns the head."

    # a rerun generates nothing and re-evaluates nothing (reports are reused for the same settings)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "reports").iterdir()}
    again = CountingEngine(tiny_engine)
    run_suite(suite, out, engine=again, defaults=QUICK, progress=False, log=lambda s: None)
    assert again.calls == [] and mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "reports").iterdir()}

    # the same folder with another model is refused
    with pytest.raises(EvalError, match="holds videos of another run"):
        run_suite(suite, out, lora=[str(suite)], engine=again, progress=False)


def test_cli_eval_suite_tiny_and_compare(tmp_path, face_video, tiny_engine, capsys):
    suite = _suite(tmp_path, face_video)
    base, other = tmp_path / "base", tmp_path / "other"
    run_suite(suite, base, engine=tiny_engine, defaults=QUICK, progress=False, log=lambda s: None)
    # "another run" from the command line: the same cases scored with a sparser frame sampling
    assert main(["eval-suite", str(suite), "--tiny", "--out", str(other), "--steps", "2", "--frames", "5",
                 "--stride", "2", "--no-progress", "--compare", str(base)]) == 0
    text = capsys.readouterr().out
    assert "wrote 3 case(s)" in text and "compare.md" in text
    cmp_md = (other / "compare.md").read_text()
    assert "# Comparison: other vs base" in cmp_md and "delta vs base" in cmp_md and "## sface.all_ref" in cmp_md
    assert (other / "compare.png").read_bytes()[:4] == b"\x89PNG"
    a, b = ({r["case"]: r["summary"] for r in map(json.loads, (d / "results.jsonl").read_text().splitlines())}
            for d in (base, other))
    delta = b["given"]["sface.all_ref"] - a["given"]["sface.all_ref"]
    assert f"| given | {b['given']['sface.all_ref']:.3f} | {a['given']['sface.all_ref']:.3f} | {delta:+.3f} |" in cmp_md


def test_cli_eval_writes_a_report(tmp_path, face_video, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(face_video), "--ref", str(ASTRONAUT), "--ref", str(CLIP), "--out", str(out),
                 "--num-samples", "4", "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["sampled_frames"] == [0, 3, 5, 8]
    assert r["identity"]["sface"]["all_reference"] > 0.8
    assert len(r["identity"]["sface"]["per_reference"]) == 2
    assert "sface all-ref" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["VIDEO", "--ref", "/nonexistent.png"], "reference 0 (/nonexistent.png): file not found"),
    (["/nonexistent.mp4", "--ref", "REF"], "video /nonexistent.mp4: file not found"),
    (["VIDEO", "--ref", "REF", "--recognizer", "arcface=/no/w600k_r50.onnx"], "model file /no/w600k_r50.onnx"),
    (["VIDEO", "--ref", "REF", "--detector", "retina"], "expected yunet"),
    (["VIDEO", "--ref", "REF", "--clip", "/no/clip"], "folder not found"),
    (["VIDEO", "--ref", "REF", "--primary", "3"], "primary must index the 1 reference"),
])
def test_cli_eval_bad_input_exits_2_with_one_line(tmp_path, face_video, capsys, args, message):
    args = [str(face_video) if a == "VIDEO" else str(ASTRONAUT) if a == "REF" else a for a in args]
    assert main(["eval", *args, "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "references": ["ASTRO"], "prompt": "p"', "suite.jsonl:2: not valid JSON"),
    ('{"id": "a", "references": ["ASTRO"], "prompt": "p", "colour": 1}', "unknown key(s) ['colour']"),
    ('{"id": "x", "references": ["ASTRO"], "prompt": "p"}', "id 'x' already used on line 1"),
    ('{"id": "a b", "references": ["ASTRO"], "prompt": "p"}', "id must be"),
    ('{"id": "a", "references": ["missing.png"], "prompt": "p"}', "reference 0"),
    ('{"id": "a", "references": ["ASTRO"], "prompt": "p", "frames": 8}', "frames must be 4n+1"),
    ('{"id": "a", "references": ["ASTRO"], "prompt": "p", "size": "100x64"}', "multiples of 32"),
    ('{"id": "a", "references": ["ASTRO"]}', "a prompt is required"),
    ('{"id": "a", "references": ["ASTRO"], "prompt": "p", "primary": 1}', "primary must index"),
])
def test_suite_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "suite.jsonl"
    first = json.dumps({"id": "x", "references": [str(ASTRONAUT)], "prompt": "p"})
    path.write_text(first + "\n" + line.replace("ASTRO", str(ASTRONAUT)) + "\n")
    with pytest.raises(EvalError) as e:
        parse_suite(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_suite_is_checked_before_any_model_loads(tmp_path, face_video):
    suite = _suite(tmp_path, face_video)
    with pytest.raises(EvalError, match="pass --model DIR"):
        run_suite(suite, tmp_path / "o", config=EvalConfig(), progress=False)
    with pytest.raises(EvalError, match="no results.jsonl"):
        run_suite(suite, tmp_path / "o", tiny=True, compare=[tmp_path], progress=False)
    assert not (tmp_path / "o").exists()
    assert main(["eval-suite", str(suite), "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2


def test_reference_without_a_face_stops_the_suite_before_generation(tmp_path, tiny_engine):
    import skimage.data

    Image.fromarray(skimage.data.coffee()).save(tmp_path / "coffee.png")
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"id": "ok", "references": [str(ASTRONAUT)], "prompt": "p"}) + "\n" +
                     json.dumps({"id": "cup", "references": [str(ASTRONAUT), "coffee.png"], "prompt": "p"}) + "\n")
    engine = CountingEngine(tiny_engine)
    with pytest.raises(EvalError, match=r"case cup: reference 1 \(.*coffee\.png\): no face found"):
        run_suite(suite, tmp_path / "run", engine=engine, defaults=QUICK, progress=False)
    assert engine.calls == [] and not list((tmp_path / "run" / "videos").iterdir())


def test_help_and_lazy_imports(capsys):
    for command in ("eval", "eval-suite"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--recognizer SPEC" in text and "--compare OTHER_DIR" in text
    # building the parser must not load the evaluator's heavy packages (anyid-rt --help stays fast)
    code = ("import sys; from anyid_rt.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('cv2', 'onnxruntime', 'transformers', 'matplotlib') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
