"""Shared test setup. Triton kernels run under the interpreter when there is no CUDA device: the variable
must be set before triton is first imported, which is why it happens here, at collection time."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny tensors: more threads only add overhead (and contention on shared
    runners). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def engine():
    """The tiny preset's engine (random weights, seed 0), once per module (export, serving and Triton tests)."""
    from anyid_rt.engine import Engine

    return Engine.tiny(seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model exported to ONNX once per module (tests/helpers.tiny_export)."""
    from helpers import tiny_export

    return tiny_export(tmp_path_factory)
