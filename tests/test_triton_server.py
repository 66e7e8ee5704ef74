"""A real Triton Inference Server (the nvidia-pytriton wheel's tritonserver, CPU, 127.0.0.1, free ports)
serving the tiny model repository, queried with tritonclient over HTTP and gRPC.

- The `anyid` model's frames equal `Engine.tiny(seed=0).generate(...)` with the same arguments.
- Malformed requests get an error response and the server keeps serving (a good request after each).
- Two concurrent clients both get their correct results.
- The BLS path (`anyid` calling the DiT and VAE-decoder graphs as separate models, here onnxruntime
  stand-ins for the TensorRT plans) generates what the exported graphs generate.
- `anyid-rt serve` stops the server on SIGTERM.

Skipped, not failed, only where the server cannot run on this machine for an environmental reason: the
wheel has no stub for this Python version, or the binary or its libraries cannot load. The stub's numpy<2
is a setup step (`anyid-rt serve --prepare`, which `make test` runs): without it the tests fail with the
message that names that command (tests/test_serve.py checks that message).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.http", reason="pip install \"tritonclient[all]\"")
pytest.importorskip("tritonclient.grpc", reason="pip install \"tritonclient[all]\"")
if importlib.util.find_spec("pytriton") is None:
    pytest.skip("the Triton server comes from the nvidia-pytriton wheel: pip install --no-deps nvidia-pytriton",
                allow_module_level=True)

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from anyid_rt.media import ASSET_DIR as ASSETS  # noqa: E402
from anyid_rt.export import cli as export_cli  # noqa: E402
from anyid_rt.export.serve import ServerError, TritonServer, free_port  # noqa: E402
from anyid_rt.export.triton_model import Limits  # noqa: E402
from anyid_rt.export.triton_repo import write_repository  # noqa: E402

PNG = ASSETS / "astronaut.png"
MP4 = ASSETS / "astronaut_clip.mp4"
ENVIRONMENTAL = ("error while loading shared libraries", "GLIBC", "has no Python backend stub", "Exec format error")


def start_or_skip(repo: Path, **kw) -> TritonServer:
    try:
        return TritonServer(repo, startup_timeout=240, **kw).start()
    except (ServerError, OSError) as e:
        if any(s in str(e) for s in ENVIRONMENTAL):
            pytest.skip(f"tritonserver cannot run on this machine: {e}")
        raise


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return write_repository(tmp_path_factory.mktemp("triton") / "repo", "tiny", tiny_seed=0, instances=2,
                            limits=Limits(max_references=3, max_pixels=128 * 128, max_frames=17, max_steps=8))


@pytest.fixture(scope="module")
def server(repo):
    s = start_or_skip(repo)
    yield s
    pid = s.process.pid
    s.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: the server is gone
    assert not _listening(s.http_port) and not _listening(s.grpc_port)


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------------------

def request_tensors(module, prompt="a person smiling", references=(), **scalars):
    """tritonclient InferInputs; scalars given as (value, numpy dtype, triton dtype) or plain ints / floats."""
    kinds = {"primary": (np.int32, "INT32"), "seed": (np.int64, "INT64"), "steps": (np.int32, "INT32"),
             "guidance": (np.float32, "FP32"), "height": (np.int32, "INT32"), "width": (np.int32, "INT32"),
             "num_frames": (np.int32, "INT32")}
    out = []

    def add(name, arr, dtype):
        i = module.InferInput(name, list(arr.shape), dtype)
        i.set_data_from_numpy(arr)
        out.append(i)

    if prompt is not None:
        add("prompt", np.array([prompt.encode()], dtype=object), "BYTES")
    if references:
        add("references", np.array([bytes(r) for r in references], dtype=object), "BYTES")
    for name, v in scalars.items():
        np_t, tr_t = v[1:] if isinstance(v, tuple) else kinds[name]
        add(name, np.array([v[0] if isinstance(v, tuple) else v], dtype=np_t), tr_t)
    return out


def http_infer(server, **kw) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=300)
    return client.infer("anyid", request_tensors(httpclient, **kw)).as_numpy("frames")


def grpc_infer(server, **kw) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    return client.infer("anyid", request_tensors(grpcclient, **kw), client_timeout=300).as_numpy("frames")


def expected(engine, prompt="a person smiling", references=None, **kw) -> np.ndarray:
    return engine.generate(prompt, references=references, progress=False, **kw).frames.numpy()


GOOD = dict(seed=1, steps=1, num_frames=1, height=64, width=64)


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------

def test_http_generation_equals_engine(server, engine):
    refs = [PNG.read_bytes(), MP4.read_bytes()]
    got = http_infer(server, references=refs, primary=1, seed=7, steps=2, num_frames=5, height=64, width=64,
                     guidance=5.0)
    want = expected(engine, references=[str(PNG), str(MP4)], primary=1, seed=7, steps=2, num_frames=5, height=64,
                    width=64, guidance=5.0)
    assert got.dtype == np.uint8 and got.shape == (5, 64, 64, 3)
    np.testing.assert_array_equal(got, want)


def test_grpc_generation_equals_engine(server, engine):
    got = grpc_infer(server, prompt="a dancer on a stage", seed=11, steps=2, num_frames=9)
    want = expected(engine, "a dancer on a stage", seed=11, steps=2, num_frames=9)
    assert got.shape == (9, 64, 64, 3)
    np.testing.assert_array_equal(got, want)


BAD_REQUESTS = {
    "no prompt": (dict(prompt=None, **GOOD), "no prompt"),
    "undecodable reference": (dict(references=[b"definitely not an image"], **GOOD), "reference 0"),
    "empty reference": (dict(references=[b""], **GOOD), "reference 0: empty"),
    "too many references": (dict(references=[PNG.read_bytes()] * 4, **GOOD), "at most 3"),
    "seed as INT32": (dict(GOOD, seed=(1, np.int32, "INT32")), "seed"),
    "steps as FP32": (dict(GOOD, steps=(2.0, np.float32, "FP32")), "steps"),
    "frames not 4n+1": (dict(GOOD, num_frames=6), "4n+1"),
    "height not a multiple of 32": (dict(GOOD, height=48), "multiple of 32"),
    "primary out of range": (dict(GOOD, references=[PNG.read_bytes()], primary=3), "primary"),
    "over the pixel limit": (dict(GOOD, height=256, width=256), "max_pixels"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_request_gets_an_error_and_the_server_keeps_serving(server, engine, name, protocol):
    kw, message = BAD_REQUESTS[name]
    infer = http_infer if protocol == "http" else grpc_infer
    with pytest.raises(InferenceServerException) as err:
        infer(server, **kw)
    assert message in str(err.value), str(err.value)
    np.testing.assert_array_equal(infer(server, **GOOD), expected(engine, **GOOD))


def test_two_concurrent_clients(server, engine):
    jobs = {"http": (http_infer, dict(seed=21, steps=2, num_frames=5)),
            "grpc": (grpc_infer, dict(seed=22, steps=2, num_frames=5, references=[PNG.read_bytes()]))}
    results, errors = {}, []

    def run(name):
        fn, kw = jobs[name]
        try:
            results[name] = fn(server, **kw)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    np.testing.assert_array_equal(results["http"], expected(engine, seed=21, steps=2, num_frames=5))
    np.testing.assert_array_equal(results["grpc"], expected(engine, references=[str(PNG)], seed=22, steps=2,
                                                            num_frames=5))


def test_bls_path_with_graph_models(tmp_path_factory, engine):
    """`anyid` with denoiser "bls": every DiT forward and decoder frame is a BLS request to another model
    of the repository (onnxruntime stand-ins with the TensorRT plans' tensors)."""
    from anyid_rt.export.graph_engine import onnx_engine

    graphs = tmp_path_factory.getbasetemp() / "anyid_tiny_onnx"  # shared with tests/test_export_onnx.py
    if not (graphs / "export.json").is_file():
        assert export_cli.main(["export", "onnx", "--preset", "tiny", "--out", str(graphs)]) == 0
    repo = write_repository(tmp_path_factory.mktemp("triton_bls") / "repo", "tiny", onnx=graphs)
    assert sorted(p.name for p in repo.iterdir()) == ["anyid", "anyid_dit", "anyid_vae_first", "anyid_vae_step"]
    via_graphs = onnx_engine(engine, graphs)
    s = start_or_skip(repo)
    try:
        for kw in (dict(seed=3, steps=2, num_frames=5), dict(seed=4, steps=2, num_frames=5, references=[PNG, MP4])):
            refs = kw.pop("references", None)
            got = http_infer(s, references=[r.read_bytes() for r in refs or []], **kw)
            want = via_graphs.generate("a person smiling", references=[str(r) for r in refs] if refs else None,
                                       progress=False, **kw).frames.numpy()
            np.testing.assert_array_equal(got, want)  # same graphs, same onnxruntime
            torch_frames = expected(engine, references=[str(r) for r in refs] if refs else None, **kw)
            assert np.abs(got.astype(int) - torch_frames).max() <= 1  # fp32 rounding at the uint8 boundaries
        with pytest.raises(InferenceServerException, match="reference 0"):
            http_infer(s, references=[b"garbage"], **GOOD)
        assert http_infer(s, **GOOD).shape == (1, 64, 64, 3)
    finally:
        s.stop()


def test_serve_cli_stops_on_sigterm(repo):
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "anyid_rt.export.cli", "serve", "--model-repository", str(repo),
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if _ready(http_port):
                break
            time.sleep(0.5)
        else:
            out = proc.stdout.read() if proc.poll() is not None else ""
            if any(s in out for s in ENVIRONMENTAL):
                pytest.skip(f"tritonserver cannot run on this machine: {out[-500:]}")
            pytest.fail(f"`anyid-rt serve` did not become ready:\n{out[-3000:]}")
        assert httpclient.InferenceServerClient(f"127.0.0.1:{http_port}").is_model_ready("anyid")
        # the port answers before `serve` has printed its ready line; SIGTERM only after that line, or a
        # loaded machine races the signal against serve's own readiness wait
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "tritonserver ready" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        out = "".join(seen) + proc.stdout.read()
        assert "tritonserver ready" in out and "stopping tritonserver" in out
        assert not _listening(http_port) and not _listening(grpc_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
