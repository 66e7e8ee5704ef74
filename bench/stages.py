"""The parts of a video other than the denoising steps, each measured in the same run as the steps: the
device's ceiling (a large matmul and a device-to-device copy), text encoding (umT5-XXL at full size with
random weights, the prompt and the empty prompt, 512 positions each as the official code), reference
encoding (VAE encode of each reference) and VAE decode, untiled and tiled. Each stage records its time and
peak memory, or why it was skipped or failed; the seconds go into `Run.stage_s` for the composed seconds per
video."""
from __future__ import annotations

from typing import Any

import torch

from anyid_rt.config import TextEncoderConfig, dtype_name, replace
from anyid_rt.models.random_weights import random_umt5, random_vae
from anyid_rt.models.vae_tiling import VAETiling

from .run import Case, Run, free_memory, log
from .settings import PROMPT
from .timing import measure

VAE_STAGES = ("reference_encode", "vae_decode", "vae_decode_tiled")


def shape_of(out: Any) -> dict:
    """Shape and finiteness of the first tensor in a (nested) output: what a stage keeps of its output."""
    while isinstance(out, (list, tuple)):
        out = out[0]
    return dict(shape=list(out.shape), finite=bool(torch.isfinite(out).all()))


def bench_ceiling(run: Run) -> None:
    """Large matmul and device-to-device copy on random data, in the same run as everything else."""
    s, dev, cuda = run.settings, run.device, run.device.type == "cuda"
    n = s.ceiling_n or (8192 if cuda else 512)
    mm_dtype = run.dtype if cuda else torch.float32
    copy_bytes = int((s.ceiling_copy_gb or (2.0 if cuda else 0.064)) * 1e9) // 4 * 4
    reps, warmup = (50, 10) if cuda else (10, 2)

    def body():
        g = torch.Generator(device=dev).manual_seed(s.seed)
        a = torch.randn(n, n, generator=g, device=dev).to(mm_dtype)
        b = torch.randn(n, n, generator=g, device=dev).to(mm_dtype)
        c = torch.empty(n, n, device=dev, dtype=mm_dtype)
        m_mm = measure(lambda: torch.mm(a, b, out=c), warmup=warmup, reps=reps, device=dev, inspect=None)
        a = b = c = None  # free before the copy (not `del`: the timed lambda names them)
        src = torch.randn(copy_bytes // 4, generator=g, device=dev)
        dst = torch.empty_like(src)
        m_cp = measure(lambda: dst.copy_(src), warmup=warmup, reps=reps, device=dev, inspect=None)
        src = dst = None
        return m_mm, m_cp

    res, err = run.attempt("ceiling", body)
    if err:
        run.emit("ceiling", status="failed", reason=err)
        return
    m_mm, m_cp = res
    tflops = 2 * n ** 3 / m_mm.median_s / 1e12
    gbps = 2 * copy_bytes / m_cp.median_s / 1e9
    run.ceiling_tflops = tflops
    run.emit("ceiling", status="ok", matmul=dict(n=n, dtype=dtype_name(mm_dtype), flops=2 * n ** 3, tflops=tflops,
                                                 **m_mm.summary()),
             copy=dict(bytes=copy_bytes, bytes_moved=2 * copy_bytes, gbps=gbps, **m_cp.summary()),
             matmul_tflops=tflops, copy_gbps=gbps, peaks=run.peaks)
    log(f"ceiling: matmul {tflops:.4g} TFLOP/s ({n}^3 {mm_dtype}), copy {gbps:.4g} GB/s")


def umt5_params(cfg: TextEncoderConfig) -> int:
    """Parameters of a umT5 encoder of these sizes (to check that it fits before building it)."""
    d, inner, f = cfg.dim, cfg.num_heads * cfg.dim_kv, cfg.dim_ffn
    per_layer = 4 * d * inner + 3 * d * f + 2 * d + cfg.num_buckets * cfg.num_heads
    return cfg.vocab_size * d + cfg.num_layers * per_layer + d


def bench_text(run: Run) -> None:
    """Text encoding as the engine does it: the prompt and the empty prompt, each a 512-position forward.
    `--text-encoder layers` (or too little free memory for the full 5.7B encoder) measures a few layers at
    full width and scales the time up; the record says so."""
    from anyid_rt.models.text_encoder import TextEncoder, tiny_tokenizer

    s = run.settings
    if s.text_encoder == "skip" or "text" not in s.stages:
        run.emit("stage", stage="text_encode", status="skipped", reason="not requested (--stages / --text-encoder)")
        return
    if run.over_budget():
        run.emit("stage", stage="text_encode", status="skipped", reason=run.over_budget())
        return
    full = run.cfg.text
    te_dtype = run.dtype if run.device.type == "cuda" else torch.float32
    mode, fallback = s.text_encoder, None
    # the weights, the largest fp32 temporary of the random init (the embedding) and 2 GB of activations
    need = umt5_params(full) * te_dtype.itemsize + full.vocab_size * full.dim * 4 + 2e9
    if mode == "full" and run.device.type == "cuda":
        free_b, _ = torch.cuda.mem_get_info(run.device)
        if free_b < need:
            mode, fallback = "layers", f"{free_b / 1e9:.1f} GB free < {need / 1e9:.1f} GB for the full encoder"

    try:  # TextEncoder.encode cleans prompts with ftfy, as the official code; the GPU machines lack it
        import ftfy  # noqa: F401
        path = "TextEncoder.encode (cleaning, tokenising, 512-position forward, trimming)"
    except ImportError:
        path = ("tokenising, 512-position forward and trimming (TextEncoder._encode_batch); the ftfy prompt "
                "cleaning (microseconds, ftfy not installed here) excluded")

    def build_and_time(layers: int):
        cfg = full if layers == full.num_layers else replace(full, num_layers=layers)
        model = random_umt5(cfg, dtype=te_dtype, device=run.device, seed=s.seed + 1)
        te = TextEncoder(model, tiny_tokenizer(min(cfg.vocab_size, 512)), cfg, cache_size=0)
        if path.startswith("TextEncoder.encode"):
            fn = lambda: (te.encode(PROMPT), te.encode(""))  # noqa: E731
        else:
            fn = lambda: (te._encode_batch([PROMPT]), te._encode_batch([""]))  # noqa: E731
        return te, run.stage_measure(fn, inspect=shape_of)

    layers = full.num_layers if mode == "full" else min(s.text_layers, full.num_layers)
    res, err = run.attempt("text encode", lambda: build_and_time(layers))
    if err and mode == "full" and "OutOfMemory" in err:
        fallback, layers = err[:300], min(s.text_layers, full.num_layers)
        res, err = run.attempt("text encode (layers)", lambda: build_and_time(layers))
    if err:
        run.emit("stage", stage="text_encode", status="failed", reason=err)
        return
    te, m = res
    scale = full.num_layers / layers
    seconds = m.median_s * scale
    run.stage_s["text_encode"] = seconds
    note = None
    if layers != full.num_layers:
        note = (f"measured with {layers} of {full.num_layers} layers at full width and scaled by "
                f"{scale:g} (embedding and final norm counted {scale:g} times: a slight overestimate)")
        run.stage_note["text_encode"] = note
    run.emit("stage", stage="text_encode", status="ok", seconds=seconds, measured_seconds=m.median_s,
             layers_measured=layers, layers_full=full.num_layers, estimate=note, fallback_reason=fallback,
             positions=full.text_len, prompts=2, text_dtype=dtype_name(te_dtype), path=path,
             output=m.first_result, **m.summary())
    log(f"text encode: {seconds * 1e3:.1f} ms ({layers}/{full.num_layers} layers measured)")
    if s.full_video and layers == full.num_layers:
        run.text_encoder = te
    else:
        del te
    free_memory(run.device)


def _bench_reference_encode(run: Run, vae, case: Case, g: torch.Generator) -> None:
    # the engine's prepared references: [3, T, H, W] in [-1, 1] on the CPU; encode moves each to the device
    pixels = [torch.rand(3, 1, case.height, case.width, generator=g) * 2 - 1 for _ in range(case.ref_images)]
    if case.ref_clip_frames:
        pixels.append(torch.rand(3, case.ref_clip_frames, case.height, case.width, generator=g) * 2 - 1)
    fn = lambda: [vae.encode(p[None].to(run.device, vae.dtype)) for p in pixels]  # noqa: E731
    m, err = run.attempt("reference encode", lambda: run.stage_measure(
        fn, inspect=lambda out: [list(z.shape) for z in out]))
    if err:
        run.emit("stage", stage="reference_encode", status="failed", reason=err)
    else:
        run.stage_s["reference_encode"] = m.median_s
        run.emit("stage", stage="reference_encode", status="ok", seconds=m.median_s,
                 vae_dtype=dtype_name(run.vae_dtype), references=[list(p.shape) for p in pixels],
                 latents=m.first_result,
                 note=("VAE encode of each reference on its own, including the host-to-device copy of its "
                       "pixels; the null references (black, one per shape) are cached per shape by the "
                       "engine and not counted"), **m.summary())
        log(f"reference encode: {m.median_s:.3f} s ({len(pixels)} references)")
    pixels = None
    free_memory(run.device)


def _bench_decode(run: Run, vae, case: Case, g: torch.Generator) -> None:
    f, h, w = case.latent
    latent = torch.randn(1, run.cfg.vae.z_dim, f, h, w, generator=g).to(run.device)
    tiling = VAETiling.of(run.settings.vae_tile)
    for stage, tile in (("vae_decode", None), ("vae_decode_tiled", tiling)):
        if run.over_budget():
            run.emit("stage", stage=stage, status="skipped", reason=run.over_budget())
            continue
        m, err = run.attempt(stage, lambda: run.stage_measure(lambda: vae.decode(latent, tile=tile),
                                                              inspect=shape_of))
        tile_desc = None if tile is None else dict(tile_h=tile.tile_h, tile_w=tile.tile_w, overlap=tile.overlap)
        if err:
            run.emit("stage", stage=stage, status="failed", reason=err, tiling=tile_desc)
            continue
        run.stage_s[stage] = m.median_s
        run.emit("stage", stage=stage, status="ok", seconds=m.median_s, vae_dtype=dtype_name(run.vae_dtype),
                 tiling=tile_desc, latent=list(latent.shape), output=m.first_result,
                 note="decode to fp32 pixels on the device; the uint8 conversion and copy to the host excluded",
                 **m.summary())
        log(f"{stage}: {m.median_s:.3f} s, peak memory {m.peak_mem_gb} GB (CUDA only)")


def bench_vae(run: Run, cases: list[Case]) -> None:
    """Reference encoding (when a case has references) and decode of the first case, untiled and tiled."""
    s = run.settings
    want_refs = "refs" in s.stages and any(c.ref_frames for c in cases)
    want_decode = "decode" in s.stages
    if not (want_refs or want_decode or s.full_video):
        for st in VAE_STAGES:
            run.emit("stage", stage=st, status="skipped", reason="not requested (--stages)")
        return
    vae, err = run.attempt("VAE build", lambda: random_vae(run.cfg.vae, seed=s.seed + 2, dtype=run.vae_dtype,
                                                           device=run.device))
    if err:
        for st in VAE_STAGES:
            run.emit("stage", stage=st, status="failed", reason=f"VAE build: {err}")
        return
    g = torch.Generator().manual_seed(s.seed + 3)
    if not want_refs:
        run.emit("stage", stage="reference_encode", status="skipped",
                 reason="not requested (--stages) or no case with references")
    elif run.over_budget():
        run.emit("stage", stage="reference_encode", status="skipped", reason=run.over_budget())
    else:
        _bench_reference_encode(run, vae, next(c for c in cases if c.ref_frames), g)
    if want_decode:
        _bench_decode(run, vae, cases[0], g)
    else:
        for st in VAE_STAGES[1:]:
            run.emit("stage", stage=st, status="skipped", reason="not requested (--stages)")
    if s.full_video:
        run.vae = vae
    else:
        del vae
    free_memory(run.device)
