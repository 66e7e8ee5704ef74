"""bench/gpu_validate.py, the one GPU command, kept runnable on a CPU: its dry run (every section at toy sizes,
from a checkout that is not installed, as on the GPU machines), its budget, failure handling and watchdog,
and the collection of the `gpu` tests without the packages the GPU machines lack."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_validate.py"
FILES = ["gpu_validate.json", "gpu_validate.log"]


def _site_packages() -> str:
    return ":".join(p for p in sys.path if p.endswith("site-packages"))


def _bare_env() -> dict:
    """The packages without this checkout's editable install (python -S skips the .pth files that map it)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return env | {"PYTHONPATH": _site_packages()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; on a GPU run the script itself")
def test_dry_run_runs_every_section_from_a_bare_checkout(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path,
                          env=_bare_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == FILES  # nothing else, no temporary left
    doc = json.loads((out / "gpu_validate.json").read_text())
    names = [name for name, *_ in _sections()]
    assert list(doc["sections"]) == names and doc["dry_run"] and doc["finished"]
    for name, sec in doc["sections"].items():
        assert sec["status"] in ("ok", "skipped"), (name, sec.get("reason"), sec.get("traceback"))
        assert sec["status"] == "ok" or sec["reason"], name
    assert doc["sections"]["env"]["result"]["package"].startswith("mapped from the checkout")
    norms = doc["sections"]["norms"]["result"]
    assert all(norms[op]["ok"] and norms[op]["written"] for op in ("layernorm_modulate", "rms_norm_rope"))
    assert doc["sections"]["attention"]["result"]["self"]["checks"]["triton"]["ok"]
    assert doc["sections"]["dit"]["result"]["auto"]["choices"]  # the DiT under `auto` chose per shape class
    # the summary is printed last, one line per section, and ends the log too
    tail = proc.stdout.strip().splitlines()[-len(names):]
    assert [line.split("] ", 1)[1].split()[0] for line in tail] == names
    assert (out / "gpu_validate.log").read_text().strip().splitlines()[-1] == proc.stdout.strip().splitlines()[-1]


def _sections():
    from anyid_rt.bench import gpu_validate_sections

    return gpu_validate_sections.SECTIONS


FAKE = """
import sys, time
from anyid_rt.bench import gpu_validate as G, gpu_validate_sections as S

def ok(ctx, rec):
    rec["x"] = 1
    return "fine"

def missing(ctx, rec):
    raise S.NotAvailable("no such feature")

def wrong(ctx, rec):
    rec["error"] = 0.5
    raise S.CheckFailed("error 0.5 > bound 0.1")

def boom(ctx, rec):
    raise ZeroDivisionError("boom")

def slow(ctx, rec):
    time.sleep(float(sys.argv[3]))
    return "slept"

S.SECTIONS = (("ok", ok, 0, 0), ("missing", missing, 0, 0), ("wrong", wrong, 0, 0), ("boom", boom, 0, 0),
              ("slow", slow, 0, 0), ("late", ok, 0, 10**6), ("after", ok, 0, 0))
sys.exit(G.main(["--out", sys.argv[1], "--budget", sys.argv[2], "--grace", "1", "--dry-run"]))
"""


def _fake_run(tmp_path, budget: float, sleep: float):
    script = tmp_path / "fake.py"
    script.write_text(textwrap.dedent(FAKE))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), str(budget), str(sleep)],
                          capture_output=True, text=True, timeout=300)
    return proc, json.loads((tmp_path / "out" / "gpu_validate.json").read_text())


def test_failures_are_recorded_and_the_next_section_runs(tmp_path):
    proc, doc = _fake_run(tmp_path, budget=300, sleep=0)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a section failed
    s = doc["sections"]
    assert s["ok"]["status"] == "ok" and s["ok"]["result"] == {"x": 1} and s["ok"]["headline"] == "fine"
    assert s["missing"]["status"] == "skipped" and s["missing"]["reason"] == "not available: no such feature"
    assert s["wrong"]["status"] == "failed" and s["wrong"]["result"] == {"error": 0.5}
    assert s["wrong"]["reason"] == "check failed: error 0.5 > bound 0.1" and "traceback" not in s["wrong"]
    assert s["boom"]["status"] == "failed" and "ZeroDivisionError: boom" in s["boom"]["traceback"]
    assert s["slow"]["status"] == "ok"
    assert s["late"]["status"] == "skipped" and "past the 300 s budget" in s["late"]["reason"]
    assert s["after"]["status"] == "ok"  # a section that fits still runs after one that did not
    assert len(doc["summary"]) == 7 and sorted(p.name for p in (tmp_path / "out").iterdir()) == FILES


def test_watchdog_ends_an_overrunning_section(tmp_path):
    proc, doc = _fake_run(tmp_path, budget=12, sleep=120)  # the sections before it end within seconds
    assert proc.returncode == 3, proc.stdout + proc.stderr
    s = doc["sections"]
    assert s["slow"]["status"] == "failed" and "watchdog ended the process" in s["slow"]["reason"]
    assert s["after"]["status"] == "skipped" and s["after"]["reason"].startswith("not reached")
    assert doc["finished"] and proc.stdout.strip().splitlines()[-1].split("] ", 1)[1].startswith("after")


def test_gpu_tests_collect_without_the_packages_the_gpu_machines_lack(tmp_path):
    """The GPU machines have no av, diffusers or ftfy (nor tritonclient, tensorrt, modelopt): `pytest -m gpu`
    must still collect every test module (one import error aborts the whole run)."""
    (tmp_path / "block_gpu_absent.py").write_text(
        "import sys\nfor name in ('av', 'diffusers', 'ftfy', 'tritonclient', 'tensorrt', 'modelopt'):\n"
        "    sys.modules[name] = None  # import raises ModuleNotFoundError, find_spec returns None\n")
    import os

    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "block_gpu_absent", "--collect-only", "-q",
                           "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "error" not in proc.stdout.splitlines()[-1].lower()
