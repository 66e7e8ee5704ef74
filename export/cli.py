"""`anyid-rt export {onnx,trt,triton-repo}` and `anyid-rt serve`.

    anyid-rt export onnx --preset tiny --out out/onnx --check
    anyid-rt export onnx --model Wan2.2-TI2V-5B --lora anyid.safetensors --dtype bf16 --quantize fp8 --out out/onnx
    anyid-rt export trt --onnx out/onnx --preset wan2.2-ti2v-5b --precision fp8 --bucket 1280x704
    anyid-rt export triton-repo --preset tiny --out out/repo
    anyid-rt serve --prepare                     # once per environment (the server stub's numpy<2)
    anyid-rt serve --model-repository out/repo

`anyid_rt.cli` registers these with `add_parser(subparsers)` and `add_serve_parser(subparsers)`; the module
also runs alone: `python -m anyid_rt.export.cli export onnx ...`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import PRESETS


# ---------------------------------------------------------------------------------------------------------
# export onnx
# ---------------------------------------------------------------------------------------------------------

def _load_engine(args):
    from ..engine import Engine

    if args.model:
        dtype = args.dtype or "bf16"
        return Engine.from_pretrained(args.model, lora=args.lora, dtype=dtype, backend="torch", device=args.device,
                                      vae_dtype="fp32")
    if args.preset != "tiny":
        raise ValueError(f"preset {args.preset!r} needs --model FOLDER (the Wan2.2-TI2V-5B weights)")
    if args.lora:
        raise ValueError("--lora needs --model (LoRA files merge into real weights)")
    engine = Engine.tiny(seed=args.seed, device=args.device or "cpu")
    if args.dtype == "bf16":
        import torch

        engine.dit.to(dtype=torch.bfloat16)
    return engine


def check_dit(dit, path: Path, layouts=((2, 2, 3), ((1, 2, 3),)), batch: int = 2) -> float:
    """Max |ONNX Runtime - PyTorch `forward_groups`| over a layout (target grid, reference grids)."""
    import torch

    from ..models.dit import Segments, unpatchify
    from .graph_engine import ort_dit_call, ort_session
    from .onnx_dit import dit_inputs

    target, refs = layouts
    g = torch.Generator().manual_seed(1)
    pt, ph, pw = dit.cfg.patch_size
    lat = [torch.randn(batch, dit.cfg.in_dim, f * pt, h * ph, w * pw, generator=g) for f, h, w in (target, *refs)]
    n = target[0] * target[1] * target[2]
    r = sum(a * b * c for a, b, c in refs)
    t = torch.rand(batch, 1, generator=g) * 1000
    seg = Segments((n, r), torch.cat([t, torch.zeros(batch, 1)], 1)) if r else Segments((n,), t)
    starts = [0] + [target[0] + sum(f for f, _, _ in refs[:i]) for i in range(len(refs))]
    ctx = [torch.randn(7, dit.cfg.text_dim, generator=g) for _ in range(batch)]
    device = dit.patch_embedding.weight.device
    with torch.no_grad():
        ref = dit.forward_groups([z.to(device) for z in lat], starts, seg, ctx).float().cpu()
    out = ort_dit_call(ort_session(path))(dit_inputs(dit.cfg, lat, starts, seg, ctx))
    return float((unpatchify(dit.cfg, out, target) - ref).abs().max())


def cmd_export_onnx(args) -> int:
    import torch

    from .onnx_dit import export_dit_onnx
    from .onnx_vae import cache_layout, export_vae_decoder_onnx

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    if not parts <= {"dit", "vae"}:
        raise ValueError(f"--parts takes dit and/or vae, got {args.parts!r}")
    engine = _load_engine(args)
    manifest = {"preset": args.preset, "model": str(args.model or ""), "lora": [str(p) for p in args.lora or []],
                "dtype": str(engine.dit.compute_dtype).replace("torch.", ""), "opset": args.opset,
                "layout": engine.layout.to_json(), "files": {}}
    t0 = time.perf_counter()
    if "dit" in parts:
        path = export_dit_onnx(engine.dit, out / "dit.onnx", opset=args.opset)
        manifest["files"]["dit"] = path.name
        print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
        if args.check:
            err = check_dit(engine.dit, path)
            manifest["check_dit_max_abs_error"] = err
            print(f"  onnxruntime vs PyTorch forward_groups: max |error| {err:.3g}")
        if args.quantize != "none":
            manifest["quantization"] = _quantize(args, engine, path, out)
            manifest["files"]["dit_quantized"] = f"dit.{args.quantize}.onnx"
    if "vae" in parts:
        t1 = time.perf_counter()
        first, step = export_vae_decoder_onnx(engine.vae, out, opset=args.opset)
        manifest["files"].update(vae_first=first.name, vae_step=step.name)
        manifest["vae_cache"] = cache_layout(engine.vae)
        print(f"wrote {first} and {step} ({time.perf_counter() - t1:.0f} s)")
        if args.check:
            from .graph_engine import ort_graph_call, ort_session
            from .onnx_vae import decode_streaming

            z = torch.randn(1, engine.vae.cfg.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(2))
            got = decode_streaming(ort_graph_call(ort_session(first)), ort_graph_call(ort_session(step)), z)
            err = float((got - engine.vae.decode(z.to(engine.vae.device)).cpu()).abs().max())
            manifest["check_vae_max_abs_error"] = err
            print(f"  onnxruntime vs PyTorch decode: max |error| {err:.3g}")
    (out / "export.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {out / 'export.json'}")
    return 0


def _quantize(args, engine, dit_path: Path, out: Path) -> dict:
    from .qdq import CALIBRATION_PROMPTS, calibrate_engine, quantize_modelopt, run_calibration, save_qdq

    prompts = (Path(args.calib_prompts).read_text().splitlines() if args.calib_prompts else CALIBRATION_PROMPTS)
    prompts = [p for p in prompts if p.strip()][: args.calib_size]
    refs = args.calib_ref if args.calib_ref is not None else _bundled_refs()
    kw = dict(steps=args.calib_steps, height=args.calib_height, width=args.calib_width, num_frames=args.calib_frames)
    target = out / f"dit.{args.quantize}.onnx"
    t0 = time.perf_counter()
    if args.quantizer == "modelopt":
        if args.quantize != "fp8":
            raise ValueError("--quantizer modelopt writes fp8; use --quantizer builtin for int8")
        samples = []
        run_calibration(engine, prompts, refs, on_inputs=lambda x: samples.append({k: v.cpu() for k, v in x.items()}),
                        **kw)
        quantize_modelopt(dit_path, target, samples)
        summary = {"quantizer": "modelopt", "samples": len(samples)}
    else:
        amax = calibrate_engine(engine, prompts, refs, **kw)
        summary = {"quantizer": "builtin", **save_qdq(dit_path, target, amax, args.quantize)}
        print(f"  {len(summary['quantized'])} linears quantised, high precision: {', '.join(summary['high_precision'])}")
    print(f"wrote {target} ({args.quantize}, {len(prompts)} calibration prompts x {args.calib_steps} steps, "
          f"{time.perf_counter() - t0:.0f} s)")
    return {"format": args.quantize, "prompts": len(prompts), **summary}


def _bundled_refs() -> list[str]:
    from ..media import ASSET_DIR

    return [str(ASSET_DIR / "astronaut.png"), str(ASSET_DIR / "astronaut_clip.mp4")]


# ---------------------------------------------------------------------------------------------------------
# export trt
# ---------------------------------------------------------------------------------------------------------

def _graphs(onnx_arg: str, precision: str) -> list[Path]:
    p = Path(onnx_arg)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"--onnx {p}: no such file or folder (write it with `anyid-rt export onnx`)")
    dit = p / "dit.fp8.onnx" if precision == "fp8" else p / "dit.onnx"
    found = [f for f in (dit, p / "vae_decode_first.onnx", p / "vae_decode_step.onnx") if f.is_file()]
    if not found:
        raise FileNotFoundError(f"{p} holds none of dit.onnx, dit.fp8.onnx, vae_decode_*.onnx")
    if precision == "fp8" and dit not in found:
        raise FileNotFoundError(f"{dit} not found: export it with `anyid-rt export onnx --quantize fp8`")
    return found


def cmd_export_trt(args) -> int:
    from .trt import Bucket, build_engine, graph_kind, plan_name, profiles_for

    buckets = [Bucket.parse(b) for b in args.bucket] if args.bucket else None
    for graph in _graphs(args.onnx, args.precision):
        kind = graph_kind(graph)
        profiles = profiles_for(graph, args.preset, buckets)
        # the VAE decoder has no Q/DQ: an FP8 build uses bf16 there
        precision = "bf16" if (kind != "dit" and args.precision == "fp8") else args.precision
        plan = Path(args.out) / plan_name(kind) if args.out else graph.with_name(plan_name(kind))
        print(f"{graph.name}: {kind}, {len(profiles)} profile(s), {precision}")
        for i, prof in enumerate(profiles):
            first = next(iter(prof))
            print(f"  profile {i}: {first} min {prof[first][0]} opt {prof[first][1]} max {prof[first][2]}")
        if args.print_profiles:
            continue
        t0 = time.perf_counter()
        timing = Path(args.timing_cache) if args.timing_cache else graph.with_name("timing.cache")
        build_engine(graph, plan, profiles, precision=precision, timing_cache=timing, workspace_gb=args.workspace_gb)
        print(f"wrote {plan} ({time.perf_counter() - t0:.0f} s; timing cache {timing})")
    return 0


# ---------------------------------------------------------------------------------------------------------
# export triton-repo, serve
# ---------------------------------------------------------------------------------------------------------

def cmd_export_triton_repo(args) -> int:
    from .triton_model import Limits
    from .triton_repo import write_repository

    defaults = Limits() if args.preset != "tiny" else Limits(max_pixels=256 * 256, max_frames=33, max_steps=50)
    limits = Limits(**{f: getattr(args, f) if getattr(args, f) is not None else getattr(defaults, f)
                       for f in Limits.__dataclass_fields__})
    repo = write_repository(args.out, args.preset, args.model, tiny_seed=args.seed, device=args.device,
                            dtype=args.dtype, lora=args.lora or (), instances=args.instances, engines=args.engines,
                            onnx=args.onnx, limits=limits, torch_threads=args.torch_threads,
                            text_encoder_device=args.text_encoder_device or "")
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    print(f"wrote {repo}: {', '.join(models)}")
    print(f"serve it with: anyid-rt serve --model-repository {repo}")
    return 0


def cmd_serve(args) -> int:
    from .serve import prepare_stub_site, serve

    if args.prepare:
        if args.model_repository:
            print("anyid-rt serve: error: --prepare is the one-time setup and serves nothing; run it without "
                  "--model-repository, then serve", file=sys.stderr)
            return 2
        folder = prepare_stub_site(args.stub_dir)
        print(f"the Triton Python backend stub's numpy<2 is ready in {folder}" if folder else
              "this environment's numpy is 1.x, which the Triton Python backend stub uses: nothing to prepare")
        return 0
    if not args.model_repository:
        print("anyid-rt serve: error: the following arguments are required: --model-repository", file=sys.stderr)
        return 2
    return serve(args.model_repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port, log_file=args.log_file, startup_timeout=args.startup_timeout,
                 log_verbose=args.log_verbose, extra_args=args.server_arg or (), stub_dir=args.stub_dir)


def _guard(func):
    """Missing optional packages and server failures end with their message, not a traceback."""
    def run(args) -> int:
        from .qdq import MissingDependency
        from .serve import ServerError

        try:
            return func(args)
        except (MissingDependency, ServerError) as e:
            print(f"anyid-rt: error: {e}", file=sys.stderr)
            return 2
    return run


# ---------------------------------------------------------------------------------------------------------
# argparse
# ---------------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export` (with `onnx`, `trt`, `triton-repo`) on an argparse subparsers object."""
    ex = subparsers.add_parser("export", help="export ONNX graphs, TensorRT engines, a Triton model repository")
    sub = ex.add_subparsers(dest="export_command", required=True)

    o = sub.add_parser("onnx", help="DiT denoising forward and VAE decoder as ONNX (opset 18+)")
    o.add_argument("--preset", choices=PRESETS, default="tiny")
    o.add_argument("--model", help="weights folder (original or diffusers layout); the tiny preset needs none")
    o.add_argument("--lora", action="append", default=None, help="LoRA file(s), merged before export/quantisation")
    o.add_argument("--seed", type=int, default=0, help="tiny preset: seed of the random weights (Engine.tiny)")
    o.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="weights of the exported DiT (default: fp32 for tiny, bf16 with --model); the VAE stays fp32")
    o.add_argument("--device", default=None, help="where to trace (cpu, cuda); default cpu for tiny")
    o.add_argument("--parts", default="dit,vae", help="dit, vae or dit,vae (default)")
    o.add_argument("--opset", type=int, default=18)
    o.add_argument("--out", default="out/onnx")
    o.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch and print the errors")
    o.add_argument("--quantize", choices=["none", "fp8", "int8"], default="none",
                   help="also write dit.<fmt>.onnx with Q/DQ on the block linears (post-training, max calibration)")
    o.add_argument("--quantizer", choices=["modelopt", "builtin"], default="modelopt",
                   help="modelopt (nvidia-modelopt's ONNX PTQ) or builtin (the same recipe without modelopt)")
    o.add_argument("--calib-prompts", help="text file, one calibration prompt per line (default: 8 built in)")
    o.add_argument("--calib-ref", action="append", default=None, help="calibration reference(s) (default: bundled)")
    o.add_argument("--calib-size", type=int, default=8, help="calibration prompts used")
    o.add_argument("--calib-steps", type=int, default=8, help="denoising steps per calibration prompt")
    o.add_argument("--calib-height", type=int, default=None)
    o.add_argument("--calib-width", type=int, default=None)
    o.add_argument("--calib-frames", type=int, default=None)
    o.set_defaults(func=_guard(cmd_export_onnx))

    t = sub.add_parser("trt", help="TensorRT engines from the ONNX graphs (needs `pip install tensorrt`)")
    t.add_argument("--onnx", required=True, help="a graph, or the folder of `export onnx` (builds all three)")
    t.add_argument("--preset", choices=PRESETS, default="wan2.2-ti2v-5b")
    t.add_argument("--precision", choices=["bf16", "fp8", "fp32"], default="bf16")
    t.add_argument("--bucket", action="append", default=None, metavar="WxH[:FRAMES][:REFS]",
                   help="served shapes, one profile each, e.g. 1280x704:5-121-121:5-35 (frames min-opt-max, "
                        "reference latent frames opt-max); default: the preset's")
    t.add_argument("--out", default=None, help="folder for the plans (default: beside the graphs)")
    t.add_argument("--timing-cache", default=None, help="timing cache file (default: timing.cache beside the graph)")
    t.add_argument("--workspace-gb", type=float, default=16.0)
    t.add_argument("--print-profiles", action="store_true", help="print the profiles and stop (no TensorRT needed)")
    t.set_defaults(func=_guard(cmd_export_trt))

    r = sub.add_parser("triton-repo", help="a Triton Inference Server model repository (model `anyid`)")
    r.add_argument("--preset", choices=PRESETS, default="tiny")
    r.add_argument("--model", help="weights folder for the 5B")
    r.add_argument("--out", required=True)
    r.add_argument("--lora", action="append", default=None)
    r.add_argument("--seed", type=int, default=0, help="tiny preset: seed of Engine.tiny's random weights")
    r.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cpu for tiny, cuda otherwise")
    r.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    r.add_argument("--text-encoder-device", default=None)
    r.add_argument("--instances", type=int, default=1, help="model instances (processes) of `anyid`")
    r.add_argument("--torch-threads", type=int, default=0)
    r.add_argument("--engines", help="folder with dit.plan, vae_decode_*.plan and their ONNX: BLS to TensorRT")
    r.add_argument("--onnx", help="folder of `export onnx`: BLS to onnxruntime stand-ins (CPU)")
    for f in ("max_references", "max_request_bytes", "max_reference_bytes", "max_reference_frames",
              "max_reference_seconds", "max_pixels", "max_frames", "max_steps"):
        r.add_argument("--" + f.replace("_", "-"), dest=f, type=int, default=None)
    r.set_defaults(func=_guard(cmd_export_triton_repo))
    return ex


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on an argparse subparsers object."""
    s = subparsers.add_parser(
        "serve", help="run Triton Inference Server (from nvidia-pytriton) on a repository",
        description="Run the nvidia-pytriton wheel's tritonserver on a model repository. Once per environment "
                    "first: `anyid-rt serve --prepare` (the server's Python backend stub needs a numpy<2 of its "
                    "own where this environment has numpy 2; that command installs it with pip, serving never "
                    "installs anything and fails naming that command until it has run).")
    s.add_argument("--model-repository", help="the folder of `anyid-rt export triton-repo` (required to serve)")
    s.add_argument("--prepare", action="store_true",
                   help="one-time setup, then exit: pip-install the numpy<2 the Python backend stub needs into "
                        "the stub folder (a no-op where numpy is 1.x or it is already there)")
    s.add_argument("--stub-dir", default=None,
                   help="the stub's numpy<2 folder, for --prepare and for serving (default: "
                        "<environment>/share/anyid_rt/triton-stub-py3.X)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--log-file", default=None, help="server log (default: a temporary file, printed on start)")
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    s.add_argument("--server-arg", action="append", default=None, help="extra tritonserver argument (repeat)")
    s.set_defaults(func=_guard(cmd_serve))
    return s


def main(argv: list[str] | None = None) -> int:
    """`python -m anyid_rt.export.cli export ... | serve ...`: the same commands as `anyid-rt`."""
    from anyid_rt.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
