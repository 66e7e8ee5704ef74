"""Write a Triton Inference Server model repository for anyid_rt.

    repo/
      anyid/config.pbtxt, anyid/1/model.py        whole generation (Python backend, `triton_model.py`)
      anyid_dit/        (with --engines or --onnx)  the DiT denoising forward (`DiTStep` graph)
      anyid_vae_first/  (with --engines or --onnx)  VAE decoder, first latent frame
      anyid_vae_step/   (with --engines or --onnx)  VAE decoder, later latent frames (explicit cache)

Without graphs, `anyid` runs the PyTorch engine (`denoiser: "torch"`). With `engines=DIR` (dit.plan,
vae_decode_first.plan, vae_decode_step.plan from `anyid-rt export trt`, beside the ONNX graphs they were
built from) the three graph models are `platform: "tensorrt_plan"` and `anyid` calls them through BLS
(`denoiser: "bls"`). With `onnx=DIR` the same three models are Python-backend onnxruntime stand-ins
(`triton_onnx_model.py`) with the same tensors: the BLS path on a CPU-only server.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from ..config import PRESETS
from .triton_model import Limits

HERE = Path(__file__).parent
GRAPHS = {  # model name -> (graph file stem, plan file)
    "anyid_dit": ("dit", "dit.plan"),
    "anyid_vae_first": ("vae_decode_first", "vae_decode_first.plan"),
    "anyid_vae_step": ("vae_decode_step", "vae_decode_step.plan"),
}
_ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64", 6: "TYPE_INT32", 10: "TYPE_FP16", 16: "TYPE_BF16", 2: "TYPE_UINT8"}

ANYID_INPUTS = [  # name, type, dims, optional, comment
    ("prompt", "TYPE_STRING", "[ 1 ]", False, "the (differential) prompt, UTF-8"),
    ("references", "TYPE_STRING", "[ -1 ]", True, "encoded image / video files, one per element (0 or more)"),
    ("primary", "TYPE_INT32", "[ 1 ]", True, "index of the primary reference (default 0)"),
    ("seed", "TYPE_INT64", "[ 1 ]", True, "noise seed (default 0)"),
    ("steps", "TYPE_INT32", "[ 1 ]", True, "denoising steps (default: the preset's)"),
    ("guidance", "TYPE_FP32", "[ 1 ]", True, "guidance scale; 1 disables the unconditional pass"),
    ("height", "TYPE_INT32", "[ 1 ]", True, "pixels, a multiple of 32"),
    ("width", "TYPE_INT32", "[ 1 ]", True, "pixels, a multiple of 32"),
    ("num_frames", "TYPE_INT32", "[ 1 ]", True, "4n+1"),
]


def _q(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameters(items: Sequence[tuple[str, str, str]]) -> str:
    out = []
    for key, value, comment in items:
        out.append(f"# {comment}\nparameters {{ key: {_q(key)} value: {{ string_value: {_q(value)} }} }}")
    return "\n".join(out)


def _io(kind: str, items) -> str:
    rows = []
    for name, dtype, dims, optional, comment in items:
        opt = " optional: true" if optional else ""
        rows.append(f"  # {comment}\n  {{ name: {_q(name)} data_type: {dtype} dims: {dims}{opt} }}")
    return f"{kind} [\n" + ",\n".join(rows) + "\n]"


def anyid_config(params: Sequence[tuple[str, str, str]], kind: str, instances: int) -> str:
    return f"""# anyid: the whole AnyID generation in one request (Python backend, model.py = anyid_rt/export/triton_model.py).
name: "anyid"
backend: "python"

# max_batch_size 0: requests are not batched by Triton. One request is a whole generation whose tensors
# (frames, references) have request-specific shapes, and the engine already batches what can be batched
# (the conditional and unconditional passes run as one batch of 2). Dims below are the full shapes.
max_batch_size: 0

{_io("input", ANYID_INPUTS)}

{_io("output", [("frames", "TYPE_UINT8", "[ -1, -1, -1, 3 ]", False, "uint8 video [T, H, W, 3]")])}

# Each instance is a separate Python process with its own engine (weights loaded once per instance).
# Triton sends a request to a free instance; more instances serve concurrent requests in parallel at the
# cost of memory (one 5B engine is about 20 GB in bf16 with the text encoder).
instance_group [ {{ count: {instances} kind: {kind} }} ]

{_parameters(params)}
"""


def _graph_io(onnx_path: Path) -> tuple[list, list]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}

    def rows(values, skip=()):
        out = []
        for v in values:
            if v.name in skip:
                continue
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append((v.name, _ONNX_TO_TRITON[t.elem_type], "[ " + ", ".join(map(str, dims)) + " ]", False,
                        "dims as in the graph; -1 is dynamic"))
        return out

    return rows(m.graph.input, inits), rows(m.graph.output)


def graph_config(name: str, onnx_path: Path, platform: str) -> str:
    inputs, outputs = _graph_io(onnx_path)
    if platform == "tensorrt_plan":
        head = f"""name: {_q(name)}
platform: "tensorrt_plan"
# One GPU instance. With no `profile` field the instance holds every optimisation profile of the plan
# (one per bucket) and the TensorRT backend picks one whose ranges contain the request's shapes; add
# e.g. `profile: ["0"]` to pin an instance group to one bucket.
instance_group [ {{ count: 1 kind: KIND_GPU }} ]"""
    else:
        head = f"""name: {_q(name)}
backend: "python"
# onnxruntime on the CPU (model.py = anyid_rt/export/triton_onnx_model.py): the stand-in for the TensorRT
# plan of the same graph, with the same tensors, for servers without a GPU.
instance_group [ {{ count: 1 kind: KIND_CPU }} ]"""
    return f"""# {name}: exported graph {onnx_path.name} (anyid-rt export onnx), called by `anyid` through BLS.
{head}

# max_batch_size 0: the graph's batch dimension is part of its dims (the DiT runs guidance as batch 2).
max_batch_size: 0

{_io("input", inputs)}

{_io("output", outputs)}
"""


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # plans and graphs are large: a hard link when on the same file system
    except OSError:
        shutil.copy2(src, dst)


def _add_graph_models(repo: Path, graphs_dir: Path, platform: str) -> None:
    for name, (stem, plan) in GRAPHS.items():
        onnx_path = graphs_dir / f"{stem}.onnx"
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path} not found: `anyid-rt export onnx --out {graphs_dir}` writes it "
                                    "(the repository reads the graph's tensors from it)")
        version = repo / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        if platform == "tensorrt_plan":
            plan_path = graphs_dir / plan
            if not plan_path.is_file():
                raise FileNotFoundError(f"{plan_path} not found: build it with `anyid-rt export trt --onnx {onnx_path}`")
            _link_or_copy(plan_path, version / "model.plan")
        else:
            _link_or_copy(onnx_path, version / "model.onnx")
            data = graphs_dir / f"{stem}.onnx.data"  # external weights keep the name the graph refers to
            if data.is_file():
                _link_or_copy(data, version / data.name)
            shutil.copy2(HERE / "triton_onnx_model.py", version / "model.py")
        (repo / name / "config.pbtxt").write_text(graph_config(name, onnx_path, platform))


def write_repository(out: str | Path, preset: str = "tiny", model_folder: str | Path | None = None, *,
                     tiny_seed: int = 0, device: str | None = None, dtype: str = "bf16", lora: Sequence[str] = (),
                     layout_json: str = "", instances: int = 1, engines: str | Path | None = None,
                     onnx: str | Path | None = None, limits: Limits | None = None, torch_threads: int = 0,
                     text_encoder_device: str = "") -> Path:
    """Write the repository to `out` (created; existing model folders of the same names are replaced)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset != "tiny" and not model_folder:
        raise ValueError(f"preset {preset!r} needs --model FOLDER (the Wan2.2-TI2V-5B weights)")
    if engines and onnx:
        raise ValueError("give either engines= (TensorRT plans) or onnx= (CPU stand-ins), not both")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    graphs_dir = Path(engines or onnx) if (engines or onnx) else None
    if graphs_dir is not None and not layout_json and (graphs_dir / "export.json").is_file():
        # the graphs were exported with a conditioning layout (a LoRA's): the model must prepare inputs alike
        layout_json = json.loads((graphs_dir / "export.json").read_text()).get("layout", "")
    device = device or ("cpu" if preset == "tiny" else "cuda")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    limits = limits or (Limits(max_pixels=256 * 256, max_frames=33, max_steps=50) if preset == "tiny" else Limits())
    out = Path(out)
    denoiser = "bls" if (engines or onnx) else "torch"
    folder = str(Path(model_folder).resolve()) if model_folder else ""
    params = [
        ("preset", preset, "model preset: tiny (random weights, CPU) or wan2.2-ti2v-5b"),
        ("model_folder", folder, "weights folder (original or diffusers layout); relative paths are relative to "
                                 "this model's directory; empty for the tiny preset"),
        ("tiny_seed", str(tiny_seed), "tiny preset only: the seed of Engine.tiny(seed), i.e. of its random weights"),
        ("device", device, "cpu, cuda (the instance's GPU) or auto (from the instance kind)"),
        ("dtype", dtype, "DiT and text-encoder dtype for the PyTorch path: bf16, fp16 or fp32"),
        ("text_encoder_device", text_encoder_device, "e.g. cpu to keep the 11 GB umT5 encoder off the GPU"),
        ("lora", ",".join(str(Path(p).resolve()) for p in lora), "comma-separated LoRA files merged at load"),
        ("layout", layout_json, "conditioning layout JSON (from the graphs' export.json with --engines / --onnx); "
                                "empty: the LoRA's metadata or the default"),
        ("denoiser", denoiser, "torch: PyTorch DiT and VAE in this process; bls: the anyid_dit / anyid_vae_* "
                               "models of this repository"),
        ("dit_model", "anyid_dit", "bls: the DiT model"),
        ("vae_first_model", "anyid_vae_first", "bls: the decoder's first-frame model"),
        ("vae_step_model", "anyid_vae_step", "bls: the decoder's step model"),
        ("torch_threads", str(torch_threads), "CPU threads for torch in this instance; 0 keeps torch's default"),
    ] + [(f, str(getattr(limits, f)), f"request limit: {f.replace('_', ' ')}") for f in Limits.__dataclass_fields__]
    version = out / "anyid" / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HERE / "triton_model.py", version / "model.py")
    kind = "KIND_GPU" if device == "cuda" else "KIND_CPU"
    (out / "anyid" / "config.pbtxt").write_text(anyid_config(params, kind, instances))
    for name in GRAPHS:
        if denoiser == "torch" and (out / name).is_dir():
            shutil.rmtree(out / name)  # a stale graph model would load for nothing
    if engines:
        _add_graph_models(out, Path(engines), "tensorrt_plan")
    elif onnx:
        _add_graph_models(out, Path(onnx), "python")
    return out


__all__ = ["write_repository", "anyid_config", "graph_config", "GRAPHS", "ANYID_INPUTS"]
