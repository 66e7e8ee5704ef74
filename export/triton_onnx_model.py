"""Triton Python-backend model that runs one exported ONNX graph with onnxruntime (CPU).

`anyid-rt export triton-repo --onnx DIR` puts the DiT and VAE-decoder graphs in the repository as models
with exactly the tensors their TensorRT plans have, each served by this file (copied as `model.py`, the
graph beside it as `model.onnx`). It is the stand-in for `platform: "tensorrt_plan"` where there is no GPU
(and no onnxruntime backend, as in the nvidia-pytriton wheel's server): the `anyid` model's BLS path then
runs end to end on a CPU. One request = one graph call; no batching (max_batch_size 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from anyid_rt.export.graph_engine import ort_session

        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort_session(path, threads=int(params.get("ort_threads", "0") or 0))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                feed = {}
                for name in self.inputs:
                    t = pb_utils.get_input_tensor_by_name(request, name)
                    if t is None:
                        raise ValueError(f"missing input {name!r}")
                    feed[name] = t.as_numpy()
                values = self.session.run(self.outputs, feed)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, v) for n, v in zip(self.outputs, values)]))
            except Exception as e:  # noqa: BLE001 - report per request, keep serving
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
        return responses
