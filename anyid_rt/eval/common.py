"""What every part of the evaluator shares: its error type and the check for optional packages (atomic writes
are `anyid_rt.files`)."""
from __future__ import annotations

import importlib.util



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


