"""`anyid-rt export {onnx,trt,triton-repo}` and `anyid-rt serve`.

    anyid-rt export onnx --preset tiny --out out/onnx --check
    anyid-rt export onnx --model Wan2.2-TI2V-5B --lora anyid.safetensors --dtype bf16 --quantize fp8 --out out/onnx
    anyid-rt export trt --onnx out/onnx --preset wan2.2-ti2v-5b --precision fp8 --bucket 1280x704
    anyid-rt export triton-repo --preset tiny --out out/repo
    anyid-rt serve --prepare                     # once per environment (the server stub's numpy<2)
    anyid-rt serve --model-repository out/repo

`anyid_rt.cli` registers these with `add_parser(subparsers)` and `add_serve_parser(subparsers)`; the module
also runs alone: `python -m anyid_rt.export.cli export onnx ...`.

As for `generate`, every command checks its whole request first (flags, the preset against the model folder,
every path, the optional packages it will need), then prints one line saying what it will do, and writes its
outputs beside their final place, moved there at the end: a failure or Ctrl-C leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import PRESETS

# Python argument -> the flag that sets it, for the request checks' messages
EXPORT_NAMES = {"path": "--model", "lora": "--lora", "dtype": "--dtype", "device": "--device", "output": "--out",
                "text_encoder_device": "--text-encoder-device", "backend": "--backend"}


def _preset(args, files) -> str:
    """The preset a command works at: the tiny preset's random weights without --model; with --model, the one
    whose sizes the folder's DiT has (an explicit --preset must agree)."""
    from ..request import RequestError, preset_for

    if files is None:
        preset = args.preset or "tiny"
        if preset != "tiny":
            raise RequestError(f"--preset {preset} needs --model FOLDER (the Wan2.2-TI2V-5B weights); only the tiny "
                               "preset runs on random weights", "preset")
        return preset
    if getattr(args, "seed", None) is not None:
        raise RequestError("--seed picks the tiny preset's random weights; --model has its own: drop --seed", "seed")
    found = preset_for(files.dim)
    if args.preset is not None and args.preset != found:
        raise RequestError(f"--preset {args.preset} does not match --model {args.model}: its DiT "
                           f"(dim {files.dim or 'unknown'}) has the {found} preset's sizes; drop --preset", "preset")
    return found


def _plan(args, files, **kw):
    """The engine's checked plan (devices, LoRAs against the model, packages), nothing loaded yet."""
    from ..plan import plan_pretrained, plan_tiny

    if files is None:
        return plan_tiny(seed=args.seed or 0, device=args.device or "cpu", lora=args.lora,
                         dtype=args.dtype or "fp32", names=EXPORT_NAMES, **kw)
    return plan_pretrained(files.folder, lora=args.lora, dtype=args.dtype or "bf16", device=args.device,
                           names=EXPORT_NAMES, **kw)


def _refuse_unused(args, flags: dict[str, str], because: str) -> None:
    """Refuse each flag of {dest: --flag} that was given although `because` makes it do nothing."""
    from ..request import RequestError

    given = [flag for dest, flag in flags.items() if getattr(args, dest) is not None]
    if given:
        raise RequestError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect {because}")


_CALIB = {"quantizer": "--quantizer", "calib_prompts": "--calib-prompts", "calib_ref": "--calib-ref",
          "calib_size": "--calib-size", "calib_steps": "--calib-steps", "calib_height": "--calib-height",
          "calib_width": "--calib-width", "calib_frames": "--calib-frames"}


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


def _check_export_onnx(args):
    """Everything `export onnx` needs, checked before torch is imported: (model files or None, preset, parts)."""
    from ..request import ModelFiles, RequestError, check_input_file, check_output_path, require_packages

    parts = set(args.parts.split(","))
    if not parts or not parts <= {"dit", "vae"}:
        raise RequestError(f"--parts takes dit and/or vae (comma-separated), got {args.parts!r}", "parts")
    if args.opset < 18:
        raise RequestError(f"--opset {args.opset} is too old: use 18 or newer (LayerNormalization, Reduce* with axes "
                           "inputs)", "opset")
    files = ModelFiles.find(args.model, EXPORT_NAMES) if args.model else None
    preset = _preset(args, files)
    check_output_path(args.out, "output", EXPORT_NAMES, folder=True)
    for f in args.lora or []:
        check_input_file(f, "lora", EXPORT_NAMES, what="LoRA")
    if args.quantize == "none":
        _refuse_unused(args, _CALIB, "without --quantize fp8|int8")
    else:
        if "dit" not in parts:
            raise RequestError("--quantize writes dit.<fmt>.onnx from the DiT graph: add dit to --parts", "quantize")
        args.quantizer = args.quantizer or ("modelopt" if args.quantize == "fp8" else "builtin")
        if args.quantizer == "modelopt" and args.quantize != "fp8":
            raise RequestError("--quantizer modelopt writes fp8; use --quantizer builtin for int8", "quantizer")
        if args.calib_prompts:
            check_input_file(args.calib_prompts, "calib_prompts", {"calib_prompts": "--calib-prompts"})
        for f in args.calib_ref or []:
            check_input_file(f, "calib_ref", {"calib_ref": "--calib-ref"}, what="calibration reference")
        for name, default in (("calib_size", 8), ("calib_steps", 8)):
            value = getattr(args, name) if getattr(args, name) is not None else default
            if value < 1:
                raise RequestError(f"--{name.replace('_', '-')} {value} must be >= 1", name)
            setattr(args, name, value)
        if args.quantizer == "modelopt":
            require_packages({"onnxruntime": "onnxruntime"}, "--quantizer modelopt", "export")
            require_packages({"modelopt": "nvidia-modelopt"}, "--quantizer modelopt (or use --quantizer builtin, the "
                             "same FP8 layers without modelopt)", "modelopt")
            from .modelopt_qdq import check_graph_dtype

            try:  # modelopt runs the graph in onnxruntime: a bf16 graph needs its CUDA provider
                check_graph_dtype(args.dtype or ("fp32" if files is None else "bf16"))
            except ValueError as e:
                raise RequestError(str(e), "quantizer") from None
    require_packages({"onnx": "onnx", "onnxscript": "onnxscript"}, "export onnx", "export")
    if args.check:
        require_packages({"onnxruntime": "onnxruntime"}, "--check", "export")
    return files, preset, parts


def cmd_export_onnx(args) -> int:
    from ..files import atomic_path

    files, preset, parts = _check_export_onnx(args)  # no torch yet: a bad flag fails at once
    import torch
    from tqdm.auto import tqdm

    from ..engine import Engine
    from .onnx_dit import export_dit_onnx
    from .onnx_vae import cache_layout, export_vae_decoder_onnx

    plan = _plan(args, files, backend="torch", **({} if files is None else {"vae_dtype": "fp32"}))
    if plan.layout.reference_attention != "joint":  # the graph is forward_tokens: every token attends to every one
        from ..request import RequestError

        raise RequestError(f"--lora was trained with reference_attention={plan.layout.reference_attention!r}, which the "
                           "exported DiT graph (joint attention) does not run: serve it with the PyTorch engine "
                           "(anyid-rt export triton-repo without --onnx / --engines)", "lora")
    print(f"anyid-rt export onnx: {plan.summary()} | parts {','.join(sorted(parts))}, opset {args.opset}"
          + (f", {args.quantize} Q/DQ ({args.quantizer})" if args.quantize != "none" else ""), flush=True)
    t0 = time.perf_counter()
    engine = Engine.from_plan(plan, progress=True)
    print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    out = Path(args.out)
    manifest = {"preset": preset, "model": str(args.model or ""), "lora": [str(p) for p in args.lora or []],
                "dtype": str(engine.dit.compute_dtype).replace("torch.", ""), "opset": args.opset,
                "layout": engine.layout.to_json(), "files": {}}
    stages = [s for s in ("dit", "dit check", "quantize", "vae", "vae check") if s.split()[0] in parts
              and (not s.endswith("check") or args.check) and (s != "quantize" or args.quantize != "none")]
    stages = [s for s in stages if s != "quantize" or "dit" in parts]
    # written into a sibling folder and moved into --out at the end: nothing half-written is left behind
    with atomic_path(out, folder=True) as tmp, tqdm(total=len(stages), desc="export onnx", unit="stage") as bar:
        def stage(name: str):
            bar.set_postfix_str(name)

        if "dit" in parts:
            stage("dit")
            t1 = time.perf_counter()
            path = export_dit_onnx(engine.dit, tmp / "dit.onnx", opset=args.opset)
            manifest["files"]["dit"] = path.name
            bar.update()
            tqdm.write(f"wrote {out / path.name} ({time.perf_counter() - t1:.0f} s)")
            if args.check:
                stage("dit check")
                err = check_dit(engine.dit, path)
                manifest["check_dit_max_abs_error"] = err
                bar.update()
                tqdm.write(f"  onnxruntime vs PyTorch forward_groups: max |error| {err:.3g}")
            if args.quantize != "none":
                stage("quantize")
                manifest["quantization"] = _quantize(args, engine, path, tmp, out)
                manifest["files"]["dit_quantized"] = f"dit.{args.quantize}.onnx"
                bar.update()
        if "vae" in parts:
            stage("vae")
            t1 = time.perf_counter()
            first, step = export_vae_decoder_onnx(engine.vae, tmp, opset=args.opset)
            manifest["files"].update(vae_first=first.name, vae_step=step.name)
            manifest["vae_cache"] = cache_layout(engine.vae)
            bar.update()
            tqdm.write(f"wrote {out / first.name} and {out / step.name} ({time.perf_counter() - t1:.0f} s)")
            if args.check:
                from .graph_engine import ort_graph_call, ort_session
                from .onnx_vae import decode_streaming

                stage("vae check")
                z = torch.randn(1, engine.vae.cfg.z_dim, 3, 4, 6, generator=torch.Generator().manual_seed(2))
                got = decode_streaming(ort_graph_call(ort_session(first)), ort_graph_call(ort_session(step)), z)
                err = float((got - engine.vae.decode(z.to(engine.vae.device)).cpu()).abs().max())
                manifest["check_vae_max_abs_error"] = err
                bar.update()
                tqdm.write(f"  onnxruntime vs PyTorch decode: max |error| {err:.3g}")
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {out / 'export.json'} ({time.perf_counter() - t0:.0f} s in all)")
    return 0


def _quantize(args, engine, dit_path: Path, folder: Path, out: Path) -> dict:
    from .qdq import CALIBRATION_PROMPTS, calibrate_engine, run_calibration, save_qdq

    prompts = (Path(args.calib_prompts).read_text().splitlines() if args.calib_prompts else CALIBRATION_PROMPTS)
    prompts = [p for p in prompts if p.strip()][: args.calib_size]
    refs = args.calib_ref if args.calib_ref is not None else _bundled_refs()
    kw = dict(steps=args.calib_steps, height=args.calib_height, width=args.calib_width, num_frames=args.calib_frames)
    target = folder / f"dit.{args.quantize}.onnx"
    t0 = time.perf_counter()
    if args.quantizer == "modelopt":
        samples = []
        run_calibration(engine, prompts, refs, on_inputs=lambda x: samples.append({k: v.cpu() for k, v in x.items()}),
                        **kw)
        from .modelopt_qdq import quantize_modelopt

        # modelopt's intermediate and temporary graphs stay in a folder of its own, removed even on failure
        summary = {"quantizer": "modelopt", "samples": len(samples), **quantize_modelopt(dit_path, target, samples)}
    else:
        amax = calibrate_engine(engine, prompts, refs, **kw)
        summary = {"quantizer": "builtin", **save_qdq(dit_path, target, amax, args.quantize)}
    print(f"  {len(summary['quantized'])} linears quantised, high precision: "
          f"{', '.join(summary['high_precision'])}")
    print(f"wrote {out / target.name} ({args.quantize}, {len(prompts)} calibration prompts x {args.calib_steps} "
          f"steps, {time.perf_counter() - t0:.0f} s)")
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


def _exported_preset(graphs: list[Path]) -> str | None:
    """The preset recorded by `export onnx` in the export.json beside the graphs (None without one)."""
    manifest = graphs[0].parent / "export.json"
    if not manifest.is_file():
        return None
    try:
        preset = json.loads(manifest.read_text()).get("preset")
    except (OSError, ValueError):
        return None
    return preset if preset in PRESETS else None


def cmd_export_trt(args) -> int:
    from ..files import atomic_path
    from ..request import RequestError, check_output_path
    from .trt import Bucket, build_engine, graph_kind, plan_name, profiles_for, require_tensorrt

    graphs = _graphs(args.onnx, args.precision)
    exported = _exported_preset(graphs)
    if args.preset is not None and exported is not None and args.preset != exported:
        raise RequestError(f"--preset {args.preset} does not match the graphs: {graphs[0].parent / 'export.json'} "
                           f"says they were exported at the {exported} preset; drop --preset", "preset")
    preset = args.preset or exported or "wan2.2-ti2v-5b"
    buckets = [Bucket.parse(b) for b in args.bucket] if args.bucket else None
    if args.print_profiles:
        _refuse_unused(args, {"out": "--out", "timing_cache": "--timing-cache", "workspace_gb": "--workspace-gb"},
                       "with --print-profiles (nothing is built)")
    elif args.workspace_gb is not None and args.workspace_gb <= 0:
        raise RequestError(f"--workspace-gb {args.workspace_gb} must be > 0", "workspace_gb")
    if not args.print_profiles:
        if args.out:
            check_output_path(args.out, "out", {"out": "--out"}, folder=True)
        if args.timing_cache:
            check_output_path(args.timing_cache, "timing_cache", {"timing_cache": "--timing-cache"})
        require_tensorrt()  # before anything is written
    print(f"anyid-rt export trt: {len(graphs)} graph(s) from {Path(args.onnx)} | preset {preset}"
          + (" (from export.json)" if args.preset is None and exported else "") + f" | precision {args.precision}"
          + (f" | buckets {', '.join(args.bucket)}" if args.bucket else " | the preset's buckets"), flush=True)
    for graph in graphs:
        kind = graph_kind(graph)
        profiles = profiles_for(graph, preset, buckets)
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
        with atomic_path(plan) as tmp:  # a build cut short leaves no plan that looks complete
            build_engine(graph, tmp, profiles, precision=precision, timing_cache=timing,
                         workspace_gb=16.0 if args.workspace_gb is None else args.workspace_gb)
        print(f"wrote {plan} ({time.perf_counter() - t0:.0f} s; timing cache {timing})")
    return 0


# ---------------------------------------------------------------------------------------------------------
# export triton-repo, serve
# ---------------------------------------------------------------------------------------------------------

TINY_LIMITS = dict(max_pixels=256 * 256, max_frames=33, max_steps=50)  # the tiny preset's CPU-sized requests


def _check_graphs_folder(folder: str, flag: str, suffix: str) -> None:
    """A folder of `export onnx` (suffix .onnx) or `export trt` (.plan, beside the ONNX it was built from)."""
    from ..request import RequestFileError

    p = Path(folder)
    if not p.is_dir():
        raise RequestFileError(f"{flag} {folder}: no such folder (write it with `anyid-rt export "
                               f"{'trt' if suffix == '.plan' else 'onnx'}`)", flag)
    need = ["dit", "vae_decode_first", "vae_decode_step"]
    missing = [n + suffix for n in need if not (p / (n + suffix)).is_file()]
    if suffix == ".plan":  # the plans' inputs and outputs are read from the ONNX graphs they were built from
        missing += [n + ".onnx" for n in need if not (p / (n + ".onnx")).is_file()]
    if missing:
        raise RequestFileError(f"{flag} {folder} lacks {', '.join(missing)}", flag)


def cmd_export_triton_repo(args) -> int:
    import shutil

    from ..files import atomic_path
    from ..request import ModelFiles, RequestError, check_input_file, check_output_path
    from .triton_model import Limits

    # the whole request first: a repository the server would reject, or a 5B on the tiny preset's CPU settings,
    # is refused here rather than found out when serving
    files = ModelFiles.find(args.model, EXPORT_NAMES) if args.model else None
    preset = _preset(args, files)
    if files is None:  # the served tiny model is Engine.tiny(seed) in fp32 on --device (export/triton_model.py)
        _refuse_unused(args, {"lora": "--lora", "dtype": "--dtype", "text_encoder_device": "--text-encoder-device"},
                       "on the tiny preset's server model (Engine.tiny in fp32); they apply with --model")
    check_output_path(args.out, "output", EXPORT_NAMES, folder=True)
    for f in args.lora or []:
        check_input_file(f, "lora", EXPORT_NAMES, what="LoRA")
    if args.engines and args.onnx:
        raise RequestError("give either --engines (TensorRT plans) or --onnx (CPU stand-ins), not both", "engines")
    if args.engines:
        _check_graphs_folder(args.engines, "--engines", ".plan")
    if args.onnx:
        _check_graphs_folder(args.onnx, "--onnx", ".onnx")
    if args.instances < 1:
        raise RequestError(f"--instances {args.instances} must be >= 1", "instances")
    if args.torch_threads < 0:
        raise RequestError(f"--torch-threads {args.torch_threads} must be >= 0 (0: torch's default)", "torch_threads")
    for f in Limits.__dataclass_fields__:
        if getattr(args, f) is not None and getattr(args, f) < 1:
            raise RequestError(f"--{f.replace('_', '-')} {getattr(args, f)} must be >= 1", f)
    device = args.device or ("cpu" if preset == "tiny" else "cuda")  # the server's device, not this machine's
    defaults = Limits(**TINY_LIMITS) if preset == "tiny" else Limits()
    limits = Limits(**{f: getattr(args, f) if getattr(args, f) is not None else getattr(defaults, f)
                       for f in Limits.__dataclass_fields__})
    from .triton_repo import GRAPHS, write_repository

    denoiser = "TensorRT plans (BLS)" if args.engines else "onnxruntime graphs (BLS)" if args.onnx else "PyTorch"
    model = files.describe() if files else f"tiny preset (random weights, seed {args.seed or 0})"
    dtype = args.dtype or "bf16"
    print(f"anyid-rt export triton-repo: model {model} | preset {preset} | device {device} | "
          f"dtype {dtype if files else 'fp32'} | "
          f"denoiser {denoiser} | {args.instances} instance(s) | limits {limits.max_pixels} pixels, "
          f"{limits.max_frames} frames, {limits.max_steps} steps", flush=True)
    out = Path(args.out)
    with atomic_path(out, folder=True) as tmp:  # moved into --out at the end: no half-written repository
        write_repository(tmp, preset, args.model, tiny_seed=args.seed or 0, device=device, dtype=dtype,
                         lora=args.lora or (), instances=args.instances, engines=args.engines, onnx=args.onnx,
                         limits=limits, torch_threads=args.torch_threads,
                         text_encoder_device=args.text_encoder_device or "")
        if not (args.engines or args.onnx):  # a stale graph model left in --out would load for nothing
            for name in GRAPHS:
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
    models = sorted(p.name for p in out.iterdir() if (p / "config.pbtxt").is_file())
    print(f"wrote {out}: {', '.join(models)}")
    print(f"serve it with: anyid-rt serve --model-repository {out}")
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

    o = sub.add_parser("onnx", help="DiT denoising forward and VAE decoder as ONNX (opset 18+)",
                       description="Export the DiT step and the VAE decoder as ONNX graphs into --out. torch.export "
                                   "traces each graph: 80-100 s on a 2-core CPU even at the tiny preset, three "
                                   "quarters of it the VAE decoder's two graphs (--parts dit alone: about 20 s).")
    o.add_argument("--preset", choices=PRESETS, default=None,
                   help="tiny (random weights; the default without --model); with --model the folder's own")
    o.add_argument("--model", help="weights folder (original or diffusers layout); the tiny preset needs none")
    o.add_argument("--lora", action="append", default=None, help="LoRA file(s), merged before export/quantisation")
    o.add_argument("--seed", type=int, default=None, help="tiny preset: seed of the random weights (default 0)")
    o.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="weights of the exported DiT (default: fp32 for tiny, bf16 with --model); the VAE stays fp32")
    o.add_argument("--device", default=None, help="where to trace (cpu, cuda); default cpu for tiny")
    o.add_argument("--parts", default="dit,vae", help="dit, vae or dit,vae (default)")
    o.add_argument("--opset", type=int, default=18)
    o.add_argument("--out", default="out/onnx")
    o.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch and print the errors")
    o.add_argument("--quantize", choices=["none", "fp8", "int8"], default="none",
                   help="also write dit.<fmt>.onnx with Q/DQ on the block linears (post-training, max calibration)")
    o.add_argument("--quantizer", choices=["modelopt", "builtin"], default=None,
                   help="with --quantize: modelopt (nvidia-modelopt's ONNX PTQ, fp8 only; the fp8 default) or builtin "
                        "(the same recipe without modelopt; the int8 default)")
    o.add_argument("--calib-prompts", help="text file, one calibration prompt per line (default: 8 built in)")
    o.add_argument("--calib-ref", action="append", default=None, help="calibration reference(s) (default: bundled)")
    o.add_argument("--calib-size", type=int, default=None, help="calibration prompts used (default 8)")
    o.add_argument("--calib-steps", type=int, default=None, help="denoising steps per calibration prompt (default 8)")
    o.add_argument("--calib-height", type=int, default=None)
    o.add_argument("--calib-width", type=int, default=None)
    o.add_argument("--calib-frames", type=int, default=None)
    o.set_defaults(func=_guard(cmd_export_onnx))

    t = sub.add_parser("trt", help="TensorRT engines from the ONNX graphs (needs `pip install tensorrt`)")
    t.add_argument("--onnx", required=True, help="a graph, or the folder of `export onnx` (builds all three)")
    t.add_argument("--preset", choices=PRESETS, default=None,
                   help="whose buckets to build (default: the preset in the graphs' export.json, else wan2.2-ti2v-5b)")
    t.add_argument("--precision", choices=["bf16", "fp8", "fp32"], default="bf16")
    t.add_argument("--bucket", action="append", default=None, metavar="WxH[:FRAMES][:REFS]",
                   help="served shapes, one profile each, e.g. 1280x704:5-121-121:5-35 (frames min-opt-max, "
                        "reference latent frames opt-max); default: the preset's")
    t.add_argument("--out", default=None, help="folder for the plans (default: beside the graphs)")
    t.add_argument("--timing-cache", default=None, help="timing cache file (default: timing.cache beside the graph)")
    t.add_argument("--workspace-gb", type=float, default=None, help="builder workspace in GB (default 16)")
    t.add_argument("--print-profiles", action="store_true", help="print the profiles and stop (no TensorRT needed)")
    t.set_defaults(func=_guard(cmd_export_trt))

    r = sub.add_parser("triton-repo", help="a Triton Inference Server model repository (model `anyid`)")
    r.add_argument("--preset", choices=PRESETS, default=None,
                   help="tiny (random weights, CPU, small requests; the default without --model); with --model the "
                        "folder's own (wan2.2-ti2v-5b for the 5B: CUDA, up to 1280x704 x 121 frames)")
    r.add_argument("--model", help="weights folder (the 5B); the server loads it from this path")
    r.add_argument("--out", required=True, help="repository folder (created; models of the same names replaced)")
    r.add_argument("--lora", action="append", default=None, help="with --model: LoRA file(s) merged at load")
    r.add_argument("--seed", type=int, default=None,
                   help="tiny preset: seed of Engine.tiny's random weights (default 0)")
    r.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="the server's device (default: cpu for tiny, cuda otherwise)")
    r.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="with --model: DiT and text-encoder weights (default bf16)")
    r.add_argument("--text-encoder-device", default=None,
                   help="with --model: e.g. cpu to keep umT5 off the server's GPU")
    r.add_argument("--instances", type=int, default=1, help="model instances (processes) of `anyid`")
    r.add_argument("--torch-threads", type=int, default=0, help="CPU threads per instance (0: torch's default)")
    r.add_argument("--engines", help="folder with dit.plan, vae_decode_*.plan and their ONNX: BLS to TensorRT")
    r.add_argument("--onnx", help="folder of `export onnx`: BLS to onnxruntime stand-ins (CPU)")
    from .triton_model import Limits  # numpy only: the parser stays light

    for f in Limits.__dataclass_fields__:
        r.add_argument("--" + f.replace("_", "-"), dest=f, type=int, default=None,
                       help="per-request limit (default: the preset's)")
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
