"""What every part of the evaluator shares: its error type, atomic writes and the check for optional packages."""
from __future__ import annotations

import importlib.util
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class EvalError(ValueError):
    """Bad evaluation input (a missing file, a reference without a face, a model that is not what its spec
    says, ...). The message is one line that names the culprit; the CLI prints it and exits with code 2."""


# Packages of the `eval` extra (and the optional transformers), with the module each one provides.
EXTRA_HINT = 'pip install -e ".[eval]"'


def require(module: str, package: str, why: str) -> None:
    """Raise EvalError unless `module` can be imported (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise EvalError(f"{why} needs the `{package}` package, which is not installed; install the eval extra "
                        f"({EXTRA_HINT})")


def _tmp_name(path: Path) -> Path:
    # Keep the suffix last so that writers that pick a format by extension (PyAV, matplotlib) still work; the
    # leading dot and the ".partial" marker keep such files out of `glob("*.mp4")`-style listings of results.
    return path.with_name(f".{path.stem}.partial-{os.getpid()}-{uuid.uuid4().hex[:6]}{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` (os.replace is atomic on one
    file system), on any error or interrupt it is deleted. So a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
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
