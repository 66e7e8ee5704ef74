"""`anyid-rt serve` installs nothing: the Triton Python-stub environment is prepared by an explicit one-time
command (`anyid-rt serve --prepare`), and serving without it fails before anything starts, naming that
command. Fast, no server needed: the server itself is exercised in tests/test_triton_server.py."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

from anyid_rt.cli import main
from anyid_rt.export import serve as serve_mod

NUMPY_2 = int(importlib.metadata.version("numpy").split(".")[0]) >= 2


def _no_start(*args, **kwargs):
    raise AssertionError("serve started something although the stub environment is not prepared")


@pytest.mark.skipif(not NUMPY_2, reason="numpy 1.x here: the stub uses it, there is nothing to prepare")
def test_serve_without_prepared_stub_env_fails_naming_the_command(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "stub"  # the stub folder of an environment that was never prepared
    empty.mkdir()
    repo = tmp_path / "repo"
    repo.mkdir()
    # nothing may start, and nothing may be installed
    monkeypatch.setattr(serve_mod, "TritonServer", _no_start)
    monkeypatch.setattr(serve_mod.subprocess, "Popen", _no_start)
    monkeypatch.setattr(serve_mod.subprocess, "run", _no_start)
    rc = main(["serve", "--model-repository", str(repo), "--stub-dir", str(empty)])
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"anyid-rt serve --prepare --stub-dir {empty.resolve()}" in err
    assert list(empty.iterdir()) == []  # still empty: serve installed nothing


@pytest.mark.skipif(not NUMPY_2, reason="numpy 1.x here: the stub uses it, there is nothing to prepare")
def test_the_library_check_names_the_default_command(tmp_path, monkeypatch):
    monkeypatch.setattr(serve_mod, "stub_site_dir", lambda: tmp_path / "never-prepared")
    monkeypatch.setattr(serve_mod.subprocess, "Popen", _no_start)
    with pytest.raises(serve_mod.ServerError, match=r"prepare it once with: anyid-rt serve --prepare$"):
        serve_mod.require_stub_site()
    with pytest.raises(serve_mod.ServerError, match="anyid-rt serve --prepare"):
        serve_mod.TritonServer(tmp_path).start()  # the Python API checks first too


@pytest.mark.skipif(not NUMPY_2, reason="numpy 1.x here: the stub uses it, there is nothing to prepare")
def test_prepare_is_idempotent_and_serving_then_finds_it(capsys, monkeypatch):
    target = serve_mod.stub_site_dir()
    if serve_mod._numpy_major(target) != 1:
        pytest.skip(f"{target} is not prepared (`make test` runs `anyid-rt serve --prepare`)")
    monkeypatch.setattr(serve_mod.subprocess, "run", _no_start)  # already there: no pip
    assert main(["serve", "--prepare"]) == 0
    assert str(target.resolve()) in capsys.readouterr().out
    assert serve_mod.require_stub_site() == target.resolve()


def test_prepare_serves_nothing_and_serve_needs_a_repository(tmp_path, capsys):
    assert main(["serve", "--prepare", "--model-repository", str(tmp_path)]) == 2
    assert "--prepare" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "--model-repository" in capsys.readouterr().err


def test_help_documents_prepare():
    r = subprocess.run([sys.executable, "-m", "anyid_rt.cli", "serve", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "anyid-rt serve --prepare" in " ".join(r.stdout.split())
