"""The Triton model's request parsing (export/triton_model.py), without a server: a request is validated
completely before the engine runs, its references are decoded to exactly what the engine makes of the same
files, and the limits on bytes and reference length (config.pbtxt parameters) refuse a request with a clear
error. tests/test_triton_server.py runs the same model inside a real tritonserver."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV is not installed (the GPU machines lack it)")

from anyid_rt.conditioning import prepare_reference
from anyid_rt.export import cli as export_cli
from anyid_rt.export.triton_model import EngineSpec, Limits, RequestError, limits_from, parameters, parse_request
from anyid_rt.export.triton_repo import write_repository
from anyid_rt.media import ASSET_DIR

PNG = ASSET_DIR / "astronaut.png"
MP4 = ASSET_DIR / "astronaut_clip.mp4"


@pytest.fixture(scope="module")
def spec(engine) -> EngineSpec:
    return EngineSpec.of(engine)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    """200 frames at 24 fps (8.3 s) of 96 x 160: longer than the layout's 33 frames, so its centred 33 are kept."""
    path = tmp_path_factory.mktemp("clips") / "long.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 160, 96, "yuv420p"
        for i in range(200):
            f = np.zeros((96, 160, 3), np.uint8)
            f[..., 0] = i
            f[:, (i * 3) % 150:(i * 3) % 150 + 10, 1] = 255
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))
    return path


def request(prompt="a person smiling", references=(), **scalars):
    """`get(name)` over a request's tensors, as the model reads them from Triton."""
    kinds = {"primary": np.int32, "seed": np.int64, "steps": np.int32, "guidance": np.float32, "height": np.int32,
             "width": np.int32, "num_frames": np.int32}
    tensors = {"prompt": np.array([prompt.encode()], dtype=object)}
    if references:
        tensors["references"] = np.array([bytes(r) for r in references], dtype=object)
    tensors.update({k: np.array([v], dtype=kinds[k]) for k, v in scalars.items()})
    return tensors.get


def test_references_are_what_the_engine_makes_of_the_files(engine, spec, long_clip):
    files = [PNG, MP4, long_clip]
    for size in ((64, 64), (32, 96)):
        kw = parse_request(request(references=[f.read_bytes() for f in files], height=size[0], width=size[1]),
                           Limits(), spec)
        # the 9-frame clip is 8 fps: 25 frames at the layout's 24 fps
        assert [r.shape for r in kw["references"]] == [(n, *size, 3) for n in (1, 25, 33)]
        for i, (got, f) in enumerate(zip(kw["references"], files)):  # the engine takes the decoded frames as is
            want = prepare_reference(str(f), *size, engine.layout, i).pixels
            assert torch.equal(prepare_reference(got, *size, engine.layout, i).pixels, want), (f, size)
    kw = parse_request(request(references=[MP4.read_bytes()]), Limits(), spec)  # no size: the engine's default
    assert kw["references"][0].shape == (25, spec.height, spec.width, 3)


def test_request_limits(spec, long_clip):
    clip = long_clip.read_bytes()
    garbage = b"\x00" * 5000  # would fail to decode: an error about it means the check before decoding missed

    def refused(limits, match, **kw):
        with pytest.raises(RequestError, match=match):
            parse_request(request(**kw), limits, spec)

    refused(Limits(max_request_bytes=8000), "10017 bytes of prompt and references, more than max_request_bytes=8000",
            prompt="a" * 17, references=[garbage, garbage])
    refused(Limits(max_reference_bytes=4999), "reference 1: 5000 bytes, more than max_reference_bytes=4999",
            references=[garbage[:10], garbage])
    refused(Limits(), "reference 0: empty", references=[b""])
    refused(Limits(max_references=1), "at most 1", references=[garbage, garbage])
    refused(Limits(), "height=48 must be a positive multiple of 32", references=[garbage], height=48)
    refused(Limits(), "num_frames=6 must be 4n\\+1", references=[garbage], num_frames=6)
    refused(Limits(max_frames=5), "num_frames=9 is more than max_frames=5")  # the engine's default counts too
    refused(Limits(max_steps=5), "steps=6 is more than max_steps=5")
    refused(Limits(max_pixels=64 * 32), "64x64 is more than max_pixels=2048")
    # the clip's length, stated by its container (refused before decoding) and decoded
    refused(Limits(max_reference_frames=199), r"reference 1: .*more than 199 frames.*max_reference_frames=199",
            references=[PNG.read_bytes(), clip])
    refused(Limits(max_reference_seconds=8), r"reference 0: .*lasts 8.33 s.*max_reference_seconds=8", references=[clip])
    refused(Limits(), "reference 0: .*not an image or video", references=[garbage])
    kw = parse_request(request(references=[clip]), Limits(max_reference_frames=200, max_reference_seconds=9), spec)
    assert kw["references"][0].shape[0] == 33


def test_limits_are_repository_config(tmp_path):
    """The limits travel as config.pbtxt parameters (written by `anyid-rt export triton-repo`) and parse back."""
    def read_limits(repo):
        text = (repo / "anyid" / "config.pbtxt").read_text()
        found = re.findall(r'parameters \{ key: "(\w+)" value: \{ string_value: "([^"]*)" \} \}', text)
        return limits_from(parameters({"parameters": {k: {"string_value": v} for k, v in found}}))

    limits = Limits(max_request_bytes=12345, max_reference_seconds=7, max_reference_frames=99)
    assert read_limits(write_repository(tmp_path / "a", "tiny", limits=limits)) == limits
    assert export_cli.main(["export", "triton-repo", "--preset", "tiny", "--out", str(tmp_path / "b"),
                            "--max-request-bytes", "4096", "--max-reference-seconds", "30"]) == 0
    got = read_limits(tmp_path / "b")
    assert (got.max_request_bytes, got.max_reference_seconds, got.max_pixels) == (4096, 30, 256 * 256)
