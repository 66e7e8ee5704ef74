"""Atomic writes: every output of the project (videos, reports, checkpoints, exported graphs, model repositories)
is written under a temporary name beside its final one and renamed when complete, so that a failure or Ctrl-C never
leaves a half-written file under the final name."""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def partial_name(path: Path) -> Path:
    # The suffix stays last, so that writers that pick a format by extension (PyAV, ONNX) still work; the leading
    # dot and ".partial" keep the temporary out of listings such as glob("*.mp4").
    return path.with_name(f".{path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`, renamed onto `path` when the block succeeds and deleted when it
    fails or is interrupted, so that no half-written output is ever left under the final name. With `folder`
    the temporary is a folder whose entries then replace those of the same names in `path` (other entries of
    an existing `path` stay)."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder:
            path.mkdir(exist_ok=True)
            for entry in sorted(tmp.iterdir()):
                target = path / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(entry, target)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def remove_partials(folder: Path) -> int:
    """Delete the temporaries a killed run (SIGKILL: no `finally`) left in `folder`; returns how many."""
    n = 0
    if folder.is_dir():
        for p in folder.glob(".*.partial-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


__all__ = ["atomic_path", "partial_name", "write_text_atomic", "write_json_atomic", "remove_partials"]
