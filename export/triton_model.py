"""Triton Inference Server Python-backend model `anyid`: one request = one whole generation.

`anyid-rt export triton-repo` copies this file into the model repository as `anyid/1/model.py`. The
model's `config.pbtxt` parameters choose how it runs:

- `denoiser: "torch"`: an `anyid_rt.Engine` in this process (`Engine.tiny(tiny_seed)` for the tiny preset,
  `Engine.from_pretrained(model_folder, lora=..., dtype=...)` for the 5B).
- `denoiser: "bls"`: the text encoder, the reference VAE encoder and the sampler run here; every DiT
  forward and every VAE-decoder frame is a BLS request to the models named by `dit_model`,
  `vae_first_model` and `vae_step_model` in the same repository (TensorRT plans from `anyid-rt export trt`,
  or any model with the same tensors).

Requests: `prompt` (BYTES [1], required), `references` (BYTES [n], one encoded image or video file each,
optional), `primary`, `steps`, `height`, `width`, `num_frames` (INT32 [1]), `seed` (INT64 [1]), `guidance`
(FP32 [1]), all optional (the engine's defaults). Response: `frames` (UINT8 [T, H, W, 3]). A malformed
request (missing prompt, undecodable reference, too many references, values out of range) gets an error
response; the model keeps serving.

A request is validated completely before the engine runs: sizes, counts and bytes first, then every reference is
decoded (`anyid_rt.conditioning.load_reference`, the engine's own) to exactly what the engine makes of the file:
only the frames its layout's reference policy keeps, each fitted to the working size as it arrives. A reference
therefore costs the memory of its fitted frames (at most the layout's `max_clip_frames`), not of the clip;
`Limits` bound the bytes and the length (frames and seconds) of what a request may ask the server to decode.

The model imports anyid_rt from the Python environment of the stub: `anyid-rt serve` puts the serving
environment's site-packages on the stub's path (export/serve.py); in a Triton container, `pip install
anyid_rt` into the container's Python instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

try:
    import triton_python_backend_utils as pb_utils  # provided by the Python backend stub
except ImportError:  # imported outside Triton: the request parsing below is plain Python
    pb_utils = None

from anyid_rt.request import RequestError  # a request the model refuses; the message goes back to the client


@dataclass(frozen=True)
class Limits:
    """Per-request bounds that protect a shared server (config.pbtxt parameters of the same names).

    max_request_bytes bounds the prompt and all references together, max_reference_bytes each reference file;
    max_reference_frames / max_reference_seconds bound the length of a reference clip, by what its container states
    (before decoding) and by what decodes. Memory does not grow with a clip's length; decoding time does."""

    max_references: int = 8
    max_request_bytes: int = 256 << 20
    max_reference_bytes: int = 64 << 20
    max_reference_frames: int = 2000
    max_reference_seconds: int = 120
    max_pixels: int = 1280 * 704
    max_frames: int = 121
    max_steps: int = 100


@dataclass(frozen=True)
class EngineSpec:
    """What request parsing needs to know of the engine: its defaults, its size check and its layout's reference
    policy (a reference is decoded at the working size to what `conditioning.prepare_reference` would make of it)."""

    height: int
    width: int
    num_frames: int
    steps: int
    layout: Any  # anyid_rt.conditioning.ConditioningLayout: the reference policy (clip length, frame rate, crop)
    geometry: Any  # anyid_rt.config.TokenGeometry: .check(height, width, num_frames)

    @classmethod
    def of(cls, engine) -> "EngineSpec":
        d = engine.defaults
        return cls(d.height, d.width, d.num_frames, d.steps, engine.layout, engine.geometry)


SCALARS = {"primary": np.int32, "seed": np.int64, "steps": np.int32, "guidance": np.float32, "height": np.int32,
           "width": np.int32, "num_frames": np.int32}


# ---------------------------------------------------------------------------------------------------------
# Request parsing (no Triton needed)
# ---------------------------------------------------------------------------------------------------------

def decode_reference(data: bytes, index: int, limits: Limits, spec: EngineSpec, height: int, width: int):
    """An encoded image or video -> the frames the engine uses: uint8 [T, height, width, 3], T = 4n+1 (the clip
    rule's frames, each fitted and padded as it decodes; memory is the result's, whatever the clip's length)."""
    from anyid_rt import media
    from anyid_rt.conditioning import load_reference

    try:
        return load_reference(bytes(data), height, width, spec.layout, max_source_frames=limits.max_reference_frames,
                              max_seconds=limits.max_reference_seconds)
    except media.ClipTooLong as e:
        raise RequestError(f"reference {index}: {e} (this server's max_reference_frames="
                           f"{limits.max_reference_frames}, max_reference_seconds={limits.max_reference_seconds})") from e
    except media.MediaError as e:
        raise RequestError(f"reference {index}: {e}") from e


def _scalar(name: str, value: np.ndarray | None):
    if value is None:
        return None
    a = np.asarray(value)
    if a.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got shape {list(a.shape)}")
    if a.dtype != SCALARS[name]:
        raise RequestError(f"{name} must be {np.dtype(SCALARS[name]).name}, got {a.dtype}")
    return a.reshape(()).item()


def parse_request(get: Callable[[str], np.ndarray | None], limits: Limits, spec: EngineSpec) -> dict[str, Any]:
    """Keyword arguments of `Engine.generate` from a request's tensors (`get(name)` -> array or None), the request
    validated completely: cheap checks first (prompt, counts, bytes, scalars, sizes), then every reference decoded
    to the working size (`decode_reference`)."""
    prompt = get("prompt")
    if prompt is None:
        raise RequestError("the request has no prompt: send a BYTES tensor 'prompt' of shape [1]")
    prompt = np.asarray(prompt, dtype=object).reshape(-1)
    if prompt.size != 1:
        raise RequestError(f"prompt must hold exactly one string, got {prompt.size}")
    p = prompt[0]
    try:
        text = p.decode("utf-8") if isinstance(p, (bytes, bytearray)) else str(p)
    except UnicodeDecodeError as e:
        raise RequestError(f"prompt is not valid UTF-8 ({e})") from e
    kw: dict[str, Any] = {"prompt": text}
    refs = get("references")
    refs = [] if refs is None else list(np.asarray(refs, dtype=object).reshape(-1))
    if len(refs) > limits.max_references:
        raise RequestError(f"{len(refs)} references sent; this model takes at most {limits.max_references}")
    for i, r in enumerate(refs):
        if not isinstance(r, (bytes, bytearray)) or len(r) == 0:
            raise RequestError(f"reference {i}: empty; send the bytes of an image or video file")
        if len(r) > limits.max_reference_bytes:
            raise RequestError(f"reference {i}: {len(r)} bytes, more than max_reference_bytes="
                               f"{limits.max_reference_bytes}")
    total = len(text.encode("utf-8")) + sum(len(r) for r in refs)
    if total > limits.max_request_bytes:
        raise RequestError(f"the request holds {total} bytes of prompt and references, more than "
                           f"max_request_bytes={limits.max_request_bytes}")
    for name in SCALARS:
        v = _scalar(name, get(name))
        if v is not None:
            kw[name] = v
    if "primary" in kw and not 0 <= kw["primary"] < max(1, len(refs)):
        raise RequestError(f"primary={kw['primary']} is out of range for {len(refs)} references")
    if kw.get("steps", spec.steps) > limits.max_steps:
        raise RequestError(f"steps={kw.get('steps', spec.steps)} is more than max_steps={limits.max_steps}")
    height, width = kw.get("height", spec.height), kw.get("width", spec.width)
    num_frames = kw.get("num_frames", spec.num_frames)
    if num_frames > limits.max_frames:
        raise RequestError(f"num_frames={num_frames} is more than max_frames={limits.max_frames}")
    if height * width > limits.max_pixels:
        raise RequestError(f"{width}x{height} is more than max_pixels={limits.max_pixels}")
    try:
        spec.geometry.check(height, width, num_frames)
    except ValueError as e:
        raise RequestError(str(e)) from e
    kw["references"] = [decode_reference(r, i, limits, spec, height, width) for i, r in enumerate(refs)] or None
    if "primary" in kw and not refs:
        kw.pop("primary")
    return kw


def parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def limits_from(params: dict[str, str]) -> Limits:
    kw = {}
    for f in Limits.__dataclass_fields__:
        if params.get(f, "").strip():
            try:
                kw[f] = int(params[f])
            except ValueError as e:
                raise ValueError(f"config parameter {f}={params[f]!r} must be an int") from e
    return Limits(**kw)


# ---------------------------------------------------------------------------------------------------------
# Engine construction
# ---------------------------------------------------------------------------------------------------------

def _device(params: dict[str, str], args: dict) -> str:
    device = params.get("device", "auto") or "auto"
    if device == "auto":
        device = "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"
    if device == "cuda":
        device = f"cuda:{args.get('model_instance_device_id', '0')}"
    return device


def build_engine(params: dict[str, str], model_dir: Path, device: str, bls: Callable | None = None):
    """The engine a config describes. `bls(model_name, input_names, output_names)` returns a function of
    tensors calling another model of the repository (only used with `denoiser: "bls"`)."""
    import torch

    from anyid_rt.conditioning import ConditioningLayout
    from anyid_rt.config import ModelConfig
    from anyid_rt.engine import Defaults, Engine

    threads = int(params.get("torch_threads", "0") or 0)
    if threads:
        torch.set_num_threads(threads)
    preset = params.get("preset", "tiny")
    folder = params.get("model_folder", "")
    if folder and not Path(folder).is_absolute():
        folder = str(model_dir / folder)
    loras = [s for s in params.get("lora", "").split(",") if s.strip()]
    layout = ConditioningLayout.from_json(params["layout"]) if params.get("layout") else None
    denoiser = params.get("denoiser", "torch")
    if denoiser not in ("torch", "bls"):
        raise ValueError(f"config parameter denoiser={denoiser!r} must be 'torch' or 'bls'")
    if preset == "tiny" and not folder:
        base = Engine.tiny(seed=int(params.get("tiny_seed", "0") or 0), device=device, layout=layout)
    elif not folder:
        raise ValueError(f"preset {preset!r} needs the parameter model_folder (the Wan2.2-TI2V-5B weights)")
    elif denoiser == "torch":
        base = Engine.from_pretrained(folder, lora=loras or None, dtype=params.get("dtype", "bf16") or "bf16",
                                      device=device, layout=layout,
                                      text_encoder_device=params.get("text_encoder_device") or None)
    else:  # the DiT lives in the TensorRT plan (LoRA merged at export): load only the VAE and text encoder
        from anyid_rt.models import TextEncoder, load_vae

        vae = load_vae(folder, device=device)
        te = TextEncoder.from_pretrained(folder, dtype=params.get("dtype", "bf16") or "bf16",
                                         device=params.get("text_encoder_device") or device)
        base = Engine(_ConfigOnly(ModelConfig.preset(preset).dit), vae, te, layout=layout, defaults=Defaults(),
                      device=device)
    if denoiser == "torch":
        return base
    from anyid_rt.export.graph_engine import graph_engine
    from anyid_rt.export.onnx_dit import DIT_INPUTS, DIT_OUTPUTS
    from anyid_rt.export.onnx_vae import cache_names

    if bls is None:
        raise ValueError("denoiser 'bls' runs inside Triton only")
    slots = base.vae.decoder_slots
    ins, outs = cache_names(slots)
    dit = bls(params.get("dit_model", "anyid_dit"), list(DIT_INPUTS), list(DIT_OUTPUTS))
    first = bls(params.get("vae_first_model", "anyid_vae_first"), ["latent"], ["frames", *outs])
    step = bls(params.get("vae_step_model", "anyid_vae_step"), ["latent", *ins], ["frames", *outs])
    return graph_engine(base, lambda inputs: dit(*(inputs[k] for k in DIT_INPUTS))[0], first, step)


class _ConfigOnly:
    """The `dit` of a BLS engine before `graph_engine` replaces it: only its config is read."""

    def __init__(self, cfg):
        self.cfg = cfg


def _bls_caller(model_name: str, input_names: list[str], output_names: list[str]) -> Callable:
    """A function of torch tensors that runs `model_name` through BLS. GPU tensors travel by DLPack (no
    copy); CPU tensors as numpy arrays."""
    import torch
    from torch.utils.dlpack import from_dlpack, to_dlpack

    def to_pb(name: str, t: torch.Tensor):
        t = t.contiguous()
        return pb_utils.Tensor.from_dlpack(name, to_dlpack(t)) if t.is_cuda else pb_utils.Tensor(name, t.numpy())

    def from_pb(t) -> torch.Tensor:
        return torch.from_numpy(t.as_numpy()) if t.is_cpu() else from_dlpack(t.to_dlpack())

    def call(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        request = pb_utils.InferenceRequest(model_name=model_name, requested_output_names=output_names,
                                            inputs=[to_pb(n, t) for n, t in zip(input_names, tensors)])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"BLS call to {model_name} failed: {response.error().message()}")
        return tuple(from_pb(pb_utils.get_output_tensor_by_name(response, n)) for n in output_names)

    return call


# ---------------------------------------------------------------------------------------------------------
# The Triton model
# ---------------------------------------------------------------------------------------------------------

class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = parameters(config)
        self.limits = limits_from(params)
        model_dir = Path(args["model_repository"])
        self.engine = build_engine(params, model_dir, _device(params, args), bls=_bls_caller)
        self.spec = EngineSpec.of(self.engine)

    def execute(self, requests: list) -> list:
        return [self._one(r) for r in requests]

    def _one(self, request):
        def get(name: str):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        try:
            kwargs = parse_request(get, self.limits, self.spec)
            video = self.engine.generate(progress=False, **kwargs)
            frames = video.frames.numpy()  # uint8 [T, H, W, 3]
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("frames", frames)])
        except (ValueError, TypeError) as e:  # RequestError, MediaError and the engine's argument checks
            return _error(f"{type(e).__name__}: {e}", "INVALID_ARG")
        except Exception as e:  # noqa: BLE001 - any failure of one request must not stop the server
            return _error(f"internal error: {type(e).__name__}: {e}", "INTERNAL")

    def finalize(self) -> None:
        self.engine = None


def _error(message: str, code: str):
    err_cls = pb_utils.TritonError
    code_value = getattr(err_cls, code, None)
    err = err_cls(message, code_value) if code_value is not None else err_cls(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=err)
