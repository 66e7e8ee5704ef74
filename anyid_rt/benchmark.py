"""`anyid-rt bench`: end-to-end benchmark of the engine against diffusers, on the same weights, inputs, device
and run.

One run appends JSON lines to `<out>/e2e.jsonl` (default `bench/results/`), one record per measurement, each
carrying the environment (device, driver, torch / triton / diffusers versions, git commit, date):

- `ceiling`: what this device really does, measured in the same run: a large matmul (bf16 8192^3 on a GPU;
  TFLOP/s) and a device-to-device copy (GB/s, bytes read plus bytes written). MFU is also given against it.
- `stage`: text encoding (umT5-XXL at full size with random weights, conditional and empty prompt, 512
  positions each as the official code), reference encoding (VAE encode of N images and one clip), VAE decode
  untiled and tiled, and the per-prompt text K/V projection of the DiT; time and peak memory of each.
- `dit_step`: one guided denoising step (batch 2: conditional and unconditional pass) at the full shape, for
  every variant: our engine with the torch and the Triton backend, each eager and under torch.compile, with
  FP8 linears where `anyid_rt.quant` is available, and diffusers' `WanTransformer3DModel` with the fastest
  attention backend found on the machine (the baseline, measured in the same run). All variants run the SAME
  random weights (one copy, shared by storage; diffusers gets them through the key map) on the same inputs
  (noise, timestep, text context zero-padded to 512; diffusers gets per-token timesteps [B, L] as
  `expand_timesteps` builds them and the references concatenated along time). Each record gives the latency
  quantiles, achieved TFLOP/s, MFU against the dense peak and against the measured ceiling, peak memory, the
  speedup over the baseline, the relative error against our torch-backend output, and the seconds per video
  composed from measured parts (`steps` x step latency + text encode + text K/V + reference encode + decode).
- `diffusers_backend`: every diffusers attention backend tried, with its time or the reason it did not run.
- `video` (with `--full-video`): a whole `Engine.generate` measured end to end.

Timing follows `triton.testing.do_bench`: CUDA events around each repetition, median and 20/80% quantiles.
The first call of every variant (compilation, autotuning, cuDNN plan choice) is never timed with the rest:
it is reported as `first_call_s`, `--warmup` more untimed calls follow, then `--steps-timed` timed ones.
Nothing is skipped silently: a variant that cannot run here is recorded with `status: "skipped"` and the
reason (Triton or torch.compile on a CPU, diffusers not installed, FP8 without an sm89+ GPU), one that
breaks with `status: "failed"` and the error.

    anyid-rt bench                                    # 5B shapes on the GPU: 1280x704x121, + 4 images + a clip
    anyid-rt bench --cases t2v --variants diffusers,triton,triton+compile --steps-timed 3
    anyid-rt bench --preset tiny --device cpu --steps-timed 1 --warmup 0   # the whole path in seconds on a CPU
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import PRESETS, DiTConfig, ModelConfig, TextEncoderConfig, replace
from .models.dit import Segments, TextKV, WanDiT, count_flops
from .models.dit_loader import original_to_diffusers
from .models.random_weights import random_dit, random_umt5, random_vae

SCHEMA = "anyid_rt.bench/1"
RESULTS_FILE = "e2e.jsonl"
PROMPT = ("Shot type: medium close-up. Hairstyle: long wavy hair. Clothes: a blue jacket. Expression: a calm "
          "smile. Action: slowly turns the head toward the camera and waves. Background: a sunlit garden.")
FLOP_FORMULA = ("per guided step = batch x count_flops(cfg, N); count_flops = layers x (2 N d (6 d + 2 f) "
                "+ 4 N^2 d + 4 N T d) + 2 N d p (in + out): N tokens (target + references, joint attention), "
                "T = 512 text rows, d = dim, f = ffn_dim, p = patch volume; 2 FLOPs per multiply-add; the text "
                "K/V projections (once per prompt) are not counted")
VARIANT_BASES = ("torch", "triton", "diffusers")
DEFAULT_DIFFUSERS_BACKENDS = ("flash", "_flash_3", "sage", "_native_cudnn", "_native_flash", "native")
DIFFUSERS_CARRY = ("diffusers is not on the GPU machines; carry its pure-Python wheel: here `pip download "
                   "diffusers==<version> --no-deps -d .whl/`, there `python3 -m pip install -q --no-index "
                   "--no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site` (its requirements "
                   "are already installed there)")

# Dense (non-sparse) peak rates in TFLOP/s, from the vendors' datasheets (shared/reference/perf-anchors.md §10).
_DENSE_PEAKS = (  # (name fragments that must all appear, bf16, fp8)
    (("H100", "PCIE"), 756.0, 1513.0),
    (("H100",), 989.4, 1978.9),
    (("H200",), 989.4, 1978.9),
    (("H800",), 989.4, 1978.9),
    (("A100",), 312.0, None),
)


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

def summarize(times_ms: Sequence[float]) -> dict:
    """do_bench-style statistics of per-repetition times: median, 20% and 80% quantiles (linear
    interpolation, as torch.quantile), min, max, mean, and the raw times."""
    if not times_ms:
        raise ValueError("no timed repetitions to summarize")
    t = torch.tensor([float(x) for x in times_ms], dtype=torch.float64)
    med, p20, p80 = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, min_ms=t.min().item(), max_ms=t.max().item(),
                mean_ms=t.mean().item(), reps=len(t), times_ms=[round(x, 4) for x in t.tolist()])


@dataclass
class Measurement:
    """The first call (never in the statistics), the timed repetitions, and memory over all of them."""

    first_call_s: float
    warmup: int
    times_ms: list[float]
    first_result: Any = None
    mem_before_bytes: int | None = None
    peak_mem_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return summarize(self.times_ms)["median_ms"] / 1e3

    def summary(self) -> dict:
        gb = lambda b: None if b is None else round(b / 1e9, 3)  # noqa: E731
        return dict(timing=summarize(self.times_ms), first_call_s=round(self.first_call_s, 4), warmup=self.warmup,
                    mem_before_gb=gb(self.mem_before_bytes), peak_mem_gb=gb(self.peak_mem_bytes),
                    peak_over_before_gb=(None if self.peak_mem_bytes is None else
                                         gb(self.peak_mem_bytes - self.mem_before_bytes)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], *, warmup: int, reps: int, device: torch.device,
            inspect: Callable[[Any], Any] | None = lambda out: out) -> Measurement:
    """Call `fn` once untimed (wall clock, reported as first_call_s: compilation, autotuning and plan choice
    land there), `warmup` more times untimed, then `reps` timed times: CUDA events around each call on a GPU
    (no synchronisation between calls, as do_bench), perf_counter on a CPU. `inspect` maps the first call's
    output to what is kept (default: the output itself; pass a reducer for large outputs). Peak memory covers
    every call (CUDA only)."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    cuda = device.type == "cuda"
    _sync(device)
    mem_before = torch.cuda.memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    first_s = time.perf_counter() - t0
    kept = inspect(out) if inspect is not None else None
    del out
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return Measurement(first_s, warmup, times, kept, mem_before, peak)


# ---------------------------------------------------------------------------------------------------------
# FLOPs, peaks, environment
# ---------------------------------------------------------------------------------------------------------

def step_flops(cfg: DiTConfig, tokens: int, batch: int) -> float:
    """FLOPs of one guided step: `batch` samples (2 with guidance) of one forward over `tokens` tokens."""
    return batch * count_flops(cfg, tokens)


def throughput(flops: float, seconds: float, peak_tflops: float | None, ceiling_tflops: float | None) -> dict:
    """Achieved TFLOP/s and MFU against a datasheet peak and against a measured ceiling (None when unknown)."""
    tflops = flops / seconds / 1e12
    return dict(tflops=tflops, mfu_peak=None if not peak_tflops else tflops / peak_tflops,
                mfu_ceiling=None if not ceiling_tflops else tflops / ceiling_tflops)


def dense_peaks(device_name: str | None) -> dict:
    """Datasheet dense peaks (TFLOP/s) for a device name; None where the device is not in the table."""
    name = (device_name or "").upper()
    for fragments, bf16, fp8 in _DENSE_PEAKS:
        if all(f in name for f in fragments):
            return dict(bf16=bf16, fp8=fp8, source="datasheet dense peak (perf-anchors.md §10)")
    return dict(bf16=None, fp8=None, source=f"no datasheet peak known for {device_name!r}")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(override: str | None = None) -> dict:
    """Commit of the checkout this package runs from (or cwd), whether tracked files differ from it, and a
    hash of that difference, so that a result names exactly the code that produced it."""
    for where in (Path(__file__).resolve().parent.parent, Path.cwd()):
        commit = _run(["git", "rev-parse", "HEAD"], where)
        if commit:
            status = _run(["git", "status", "--porcelain", "--untracked-files=no"], where) or ""
            diff = _run(["git", "diff", "HEAD"], where) or ""
            return dict(commit=override or commit.strip(), dirty=bool(status.strip()),
                        diff_sha1=hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None)
    return dict(commit=override or os.environ.get("ANYID_RT_COMMIT"), dirty=None, diff_sha1=None,
                commit_source="--commit / ANYID_RT_COMMIT (no git checkout here)")


def environment(device: torch.device, commit: str | None = None) -> dict:
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               python=platform.python_version(), platform=platform.platform(),
               cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               torch=torch.__version__, cuda=torch.version.cuda, triton=_version("triton"),
               diffusers=_version("diffusers"), transformers=_version("transformers"), numpy=_version("numpy"),
               device=str(device), loadavg=[round(x, 2) for x in os.getloadavg()], **git_info(commit))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm",
                    "--format=csv,noheader"])
        if smi:
            parts = [p.strip() for p in smi.splitlines()[0].split(",")]
            env.update(smi_name=parts[0], driver=parts[1] if len(parts) > 1 else None,
                       power_limit=parts[2] if len(parts) > 2 else None,
                       max_sm_clock=parts[3] if len(parts) > 3 else None)
        else:
            env["driver"] = None
    else:
        env.update(device_name=f"cpu ({env['cpu']}, {env['cpu_count']} cores)", driver=None,
                   torch_threads=torch.get_num_threads())
    return env


# ---------------------------------------------------------------------------------------------------------
# Shapes and inputs
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """A benchmark shape: the target video, plus `ref_images` image references and one clip of
    `ref_clip_frames` frames (0: none), each reference encoded on its own at the target's H x W."""

    name: str
    height: int
    width: int
    frames: int
    ref_images: int = 0
    ref_clip_frames: int = 0

    def __post_init__(self) -> None:
        for what, v in (("height", self.height), ("width", self.width)):
            if v <= 0 or v % 32:
                raise ValueError(f"{what}={v} must be a positive multiple of 32 (the VAE's 16x and the 2x2 patch)")
        for what, v in (("frames", self.frames), ("ref clip frames", self.ref_clip_frames or 1)):
            if v < 1 or (v - 1) % 4:
                raise ValueError(f"{what}={v} must be 4n+1 (1, 5, ..., 121)")
        if self.ref_images < 0:
            raise ValueError(f"ref_images={self.ref_images} must be >= 0")

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frames - 1) // 4

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 16, self.width // 16

    @property
    def ref_frames(self) -> list[int]:
        """Latent frames of each reference in sequence order: the images, then the clip."""
        clip = [1 + (self.ref_clip_frames - 1) // 4] if self.ref_clip_frames else []
        return [1] * self.ref_images + clip

    def tokens(self, cfg: DiTConfig) -> int:
        pt, ph, pw = cfg.patch_size
        h, w = self.latent_hw
        return (self.latent_frames + sum(self.ref_frames)) // pt * (h // ph) * (w // pw)

    def describe(self, cfg: DiTConfig) -> dict:
        h, w = self.latent_hw
        return dict(height=self.height, width=self.width, frames=self.frames, ref_images=self.ref_images,
                    ref_clip_frames=self.ref_clip_frames,
                    latent=[cfg.in_dim, self.latent_frames, h, w],
                    ref_latents=[[cfg.in_dim, f, h, w] for f in self.ref_frames])


@dataclass
class StepInputs:
    """One guided step's inputs, for our engine and (the same tensors, laid out its way) for diffusers."""

    case: Case
    batch: int
    guidance: float
    t: float
    noise: torch.Tensor  # [1, C, F, h, w] fp32, the target latent
    refs: list[torch.Tensor]  # each [batch, C, f, h, w] fp32: row 0 the reference latent, row 1 its null latent
    frame_starts: list[int]
    segments: Segments  # (target tokens at t, reference tokens at 0)
    contexts: list[torch.Tensor]  # trimmed text embeddings [L_i, text_dim]: the prompt, then the empty prompt
    d_latent: torch.Tensor  # [batch, C, F + sum(f), h, w] in the model dtype: target and references along time
    d_timestep: torch.Tensor  # [batch, L] fp32 per-token timesteps (diffusers' expand_timesteps)
    d_context: torch.Tensor  # [batch, text_len, text_dim] zero-padded, in the model dtype


def make_step_inputs(model: WanDiT, case: Case, *, batch: int, guidance: float, t: float, prompt_tokens: int,
                     seed: int) -> StepInputs:
    """Random inputs drawn on the CPU from `seed` (the same on every device), placed on the model's device."""
    from .conditioning import ConditioningLayout, step_layout

    cfg = model.cfg
    device, dtype = model.patch_embedding.weight.device, model.compute_dtype
    g = torch.Generator().manual_seed(seed)
    h, w = case.latent_hw
    F = case.latent_frames
    noise = torch.randn(1, cfg.in_dim, F, h, w, generator=g).to(device)
    refs = [torch.randn(batch, cfg.in_dim, f, h, w, generator=g).to(device) for f in case.ref_frames]
    pt, ph, pw = cfg.patch_size
    per_frame = (h // ph) * (w // pw)
    layout = step_layout(ConditioningLayout(), (F // pt, h // ph, w // pw), case.ref_frames, per_frame,
                         image_mode=False)
    segments = layout.segments(t, batch, device)
    contexts = [torch.randn(prompt_tokens, cfg.text_dim, generator=g) * 0.5,
                torch.randn(1, cfg.text_dim, generator=g) * 0.5][:batch]
    contexts = [c.to(device=device, dtype=dtype) for c in contexts]
    # diffusers: one latent with the references after the target along time ("after" layout: RoPE frame
    # indices continue after the target, which is what a concatenation gives), t on the target tokens, 0 on
    # the reference tokens, the context zero-padded to text_len as the official model pads it
    if layout.frame_starts != [sum([F, *case.ref_frames][:i]) for i in range(len(case.ref_frames) + 1)]:
        raise RuntimeError(f"frame starts {layout.frame_starts} are not a concatenation in time")
    n_target = F // pt * per_frame
    d_latent = torch.cat([noise.expand(batch, -1, -1, -1, -1), *refs], dim=2).to(dtype)
    d_timestep = torch.cat([torch.full((batch, n_target), float(t), device=device),
                            torch.zeros(batch, layout.ref_tokens, device=device)], dim=1)
    d_context = model.pad_context(contexts).to(dtype)
    return StepInputs(case, batch, guidance, float(t), noise, refs, layout.frame_starts, segments, contexts,
                      d_latent, d_timestep, d_context)


def _guide(v: torch.Tensor, guidance: float) -> torch.Tensor:
    """v [batch, C, F, h, w]: batch 2 is (conditional, unconditional) -> v_u + g (v_c - v_u) [1, C, F, h, w]."""
    return v if v.shape[0] == 1 else v[1:] + guidance * (v[:1] - v[1:])


def ours_step(model: WanDiT, inp: StepInputs, text_kv: TextKV) -> Callable[[], torch.Tensor]:
    """One guided step of the engine: forward_groups over [target, *references] with the prepared text K/V."""
    groups = [inp.noise.expand(inp.batch, -1, -1, -1, -1), *inp.refs]

    def step() -> torch.Tensor:
        v = model.forward_groups(groups, inp.frame_starts, inp.segments, text_kv)  # [batch, C, F, h, w] fp32
        return _guide(v, inp.guidance)

    return step


def diffusers_step(model, inp: StepInputs) -> Callable[[], torch.Tensor]:
    """One guided step of diffusers' WanTransformer3DModel on the same inputs; the target frames are kept."""
    F = inp.case.latent_frames

    def step() -> torch.Tensor:
        v = model(hidden_states=inp.d_latent, timestep=inp.d_timestep, encoder_hidden_states=inp.d_context,
                  return_dict=False)[0]  # [batch, C, F + sum(f), h, w]
        return _guide(v[:, :, :F].float(), inp.guidance)

    return step


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the parity tests' measure)."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------
# Weights: one random copy, shared by every variant
# ---------------------------------------------------------------------------------------------------------

def dit_view(src: WanDiT, backend: str) -> WanDiT:
    """A second WanDiT over the same parameter storage (no copy), with its own ops backend and modules, so
    that it can be compiled or quantised without touching `src`."""
    with torch.device("meta"):
        view = WanDiT(src.cfg, backend=backend)
    view.load_state_dict(src.state_dict(), strict=True, assign=True)
    return view.eval().requires_grad_(False)


def diffusers_from_dit(src: WanDiT):
    """diffusers' WanTransformer3DModel holding `src`'s weights through the key map. Tensors whose dtype
    diffusers keeps (its `_keep_in_fp32_modules` in fp32, the rest in the compute dtype, as its loader does)
    are shared by storage; the few that differ (time projection, output projection, q/k norms: ~0.1 GB at
    5B) are converted. Returns (model, info)."""
    from diffusers import WanTransformer3DModel

    cfg = src.cfg
    device, dtype = src.patch_embedding.weight.device, src.compute_dtype
    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=cfg.rope_max_positions)
    keep = tuple(getattr(WanTransformer3DModel, "_keep_in_fp32_modules", None) or ())
    sd, shared, copied = {}, 0, 0
    for name, t in src.state_dict().items():
        dname = original_to_diffusers(name)
        want = torch.float32 if any(m in dname.split(".") for m in keep) else dtype
        if t.dtype == want:
            sd[dname], shared = t, shared + t.numel() * t.element_size()
        else:
            sd[dname] = t.to(want)
            copied += sd[dname].numel() * sd[dname].element_size()
    model.load_state_dict(sd, strict=True, assign=True)
    # the RoPE tables are non-persistent buffers, not in any state dict: build that module on the device
    with torch.device(device):
        model.rope = type(model.rope)(cfg.head_dim, cfg.patch_size, cfg.rope_max_positions)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"diffusers model tensors left unset after the weight copy: {left[:8]}")
    info = dict(shared_bytes=shared, converted_bytes=copied, keep_in_fp32=list(keep))
    return model.eval().requires_grad_(False), info


@contextlib.contextmanager
def diffusers_attention(model, backend: str):
    """Run `model` with one diffusers attention-dispatch backend; restores the global default afterwards."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.utils import logging as dlogging

    old, level = _AttentionBackendRegistry._active_backend, dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # set_attention_backend warns "experimental" on every call
    try:
        model.set_attention_backend(backend)
        yield
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(old)
        dlogging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """`torch`, `triton` or `diffusers`, optionally `+compile`, and (ours) `+fp8`."""

    base: str
    compile: bool = False
    fp8: bool = False

    @property
    def name(self) -> str:
        return self.base + ("+compile" if self.compile else "") + ("+fp8" if self.fp8 else "")

    @property
    def impl(self) -> str:
        return "diffusers" if self.base == "diffusers" else "anyid_rt"


def parse_variant(text: str) -> Variant:
    parts = [p.strip() for p in text.strip().split("+") if p.strip()]
    if not parts or parts[0] not in VARIANT_BASES:
        raise ValueError(f"variant {text!r} must start with one of {VARIANT_BASES} (e.g. triton+compile+fp8)")
    flags = set(parts[1:])
    if flags - {"compile", "fp8"} or len(flags) != len(parts) - 1:
        raise ValueError(f"variant {text!r}: only '+compile' and '+fp8' may follow the base, once each")
    if parts[0] == "diffusers" and "fp8" in flags:
        raise ValueError("variant 'diffusers+fp8' is not benchmarked: the baseline runs diffusers as shipped")
    return Variant(parts[0], "compile" in flags, "fp8" in flags)


def default_variants(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["torch", "diffusers", "triton", "torch+compile", "triton+compile", "triton+fp8",
                "triton+compile+fp8"]
    # on a CPU the Triton and compiled variants are recorded as skipped, with the reason
    return ["torch", "diffusers", "torch+fp8", "triton", "torch+compile"]


def _fp8_api():
    """(quantize_dit_fp8_, check_fp8_device) from anyid_rt.quant, or the reason FP8 is not available."""
    try:
        from .quant import check_fp8_device, quantize_dit_fp8_
    except ImportError as e:
        return None, f"quant='fp8' is not available in this build (anyid_rt.quant: {e})"
    return (quantize_dit_fp8_, check_fp8_device), None


def variant_unavailable(v: Variant, device: torch.device, args) -> str | None:
    """The reason a variant cannot run on this machine with these options, or None."""
    if v.base == "triton" and device.type != "cuda":
        if not args.triton_interpret:
            return ("the Triton backend needs a CUDA GPU (device is cpu); --triton-interpret runs it under "
                    "TRITON_INTERPRET=1 for a correctness check (timings meaningless)")
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "--triton-interpret needs TRITON_INTERPRET=1 set before Python starts (before triton is imported)"
    if v.compile:
        if args.compile == "off":
            return "torch.compile disabled (--compile off)"
        if args.compile == "auto" and device.type != "cuda":
            return ("torch.compile is skipped on a CPU by default (the inductor C++ build takes about a minute "
                    "even at tiny size); --compile on forces it, --compile-backend eager checks tracing only")
    if v.fp8:
        api, reason = _fp8_api()
        if api is None:
            return reason
        try:
            api[1](device)
        except ValueError as e:
            return str(e)
    if v.base == "diffusers":
        try:
            import diffusers  # noqa: F401
        except ImportError as e:
            return f"diffusers is not importable ({type(e).__name__}: {e}). {DIFFUSERS_CARRY}"
    return None


def _compile_kwargs(args) -> dict:
    kw: dict[str, Any] = dict(dynamic=False, backend=args.compile_backend)
    if args.compile_mode:
        kw["mode"] = args.compile_mode
    return kw


def _raise_dynamo_limits() -> None:
    """Each compiled variant x shape is one cache entry of the shared block code: allow plenty."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    cfg: ModelConfig
    env: dict
    out_file: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    t_start: float = field(default_factory=time.perf_counter)
    records: list[dict] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=dict)
    stage_note: dict[str, str] = field(default_factory=dict)
    ceiling_tflops: float | None = None
    peaks: dict = field(default_factory=dict)
    base: WanDiT | None = None
    modules: dict[Any, Any] = field(default_factory=dict)  # variant name -> module; ("chosen", case) -> backend
    vae: Any = None
    text_encoder: Any = None

    # -- bookkeeping --------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def over_budget(self) -> str | None:
        b = self.args.time_budget
        if b is not None and self.elapsed() > b:
            return f"time budget of {b:.0f} s used up ({self.elapsed():.0f} s elapsed); not run"
        return None

    def emit(self, kind: str, **fields: Any) -> dict:
        rec = dict(schema=SCHEMA, bench="e2e", kind=kind, run_id=self.run_id, preset=self.args.preset,
                   dtype=str(self.dtype).replace("torch.", ""), **fields, env=self.env)
        self.records.append(rec)
        with self.out_file.open("a") as f:
            f.write(json.dumps(rec, default=_json_default) + "\n")
        return rec

    def attempt(self, what: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
        """Run fn; an exception becomes a recorded failure (re-raised with --strict)."""
        try:
            return fn(), None
        except Exception as e:  # noqa: BLE001 - every failure is recorded with its reason, never hidden
            if self.args.strict:
                raise
            reason = f"{type(e).__name__}: {e}"
            log(f"{what} failed: {reason[:300]}")
            free_memory(self.device)
            return None, reason[:2000]


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _stage_measure(run: Run, fn, inspect=None) -> Measurement:
    return measure(fn, warmup=run.args.stage_warmup, reps=run.args.stage_repeats, device=run.device,
                   inspect=inspect)


def _shape_of(out) -> dict:
    """Shape and finiteness of the first tensor in a (nested) output: what a stage keeps of its output."""
    while isinstance(out, (list, tuple)):
        out = out[0]
    return dict(shape=list(out.shape), finite=bool(torch.isfinite(out).all()))


def bench_ceiling(run: Run) -> None:
    """Large matmul and device-to-device copy on random data, in the same run as everything else."""
    dev, cuda = run.device, run.device.type == "cuda"
    n = run.args.ceiling_n or (8192 if cuda else 512)
    mm_dtype = run.dtype if cuda else torch.float32
    copy_bytes = int((run.args.ceiling_copy_gb or (2.0 if cuda else 0.064)) * 1e9) // 4 * 4
    reps, warmup = (50, 10) if cuda else (10, 2)

    def body():
        g = torch.Generator(device=dev).manual_seed(run.args.seed)
        a = torch.randn(n, n, generator=g, device=dev).to(mm_dtype)
        b = torch.randn(n, n, generator=g, device=dev).to(mm_dtype)
        c = torch.empty(n, n, device=dev, dtype=mm_dtype)
        m_mm = measure(lambda: torch.mm(a, b, out=c), warmup=warmup, reps=reps, device=dev, inspect=None)
        del a, b, c
        src = torch.randn(copy_bytes // 4, generator=g, device=dev)
        dst = torch.empty_like(src)
        m_cp = measure(lambda: dst.copy_(src), warmup=warmup, reps=reps, device=dev, inspect=None)
        del src, dst
        return m_mm, m_cp

    res, err = run.attempt("ceiling", body)
    if err:
        run.emit("ceiling", status="failed", reason=err)
        return
    m_mm, m_cp = res
    tflops = 2 * n ** 3 / m_mm.median_s / 1e12
    gbps = 2 * copy_bytes / m_cp.median_s / 1e9
    run.ceiling_tflops = tflops
    run.emit("ceiling", status="ok", matmul=dict(n=n, dtype=str(mm_dtype).replace("torch.", ""),
                                                 flops=2 * n ** 3, tflops=tflops, **m_mm.summary()),
             copy=dict(bytes=copy_bytes, bytes_moved=2 * copy_bytes, gbps=gbps, **m_cp.summary()),
             matmul_tflops=tflops, copy_gbps=gbps, peaks=run.peaks)
    log(f"ceiling: matmul {tflops:.4g} TFLOP/s ({n}^3 {mm_dtype}), copy {gbps:.4g} GB/s")


def bench_text(run: Run) -> None:
    """Text encoding as the engine does it: the prompt and the empty prompt, each a 512-position forward."""
    a = run.args
    if a.text_encoder == "skip" or "text" not in a.stages:
        run.emit("stage", stage="text_encode", status="skipped", reason="not requested (--stages / --text-encoder)")
        return
    if run.over_budget():
        run.emit("stage", stage="text_encode", status="skipped", reason=run.over_budget())
        return
    from .models.text_encoder import TextEncoder, tiny_tokenizer

    full = run.cfg.text
    te_dtype = run.dtype if run.device.type == "cuda" else torch.float32
    mode, fallback = a.text_encoder, None
    # the weights, the largest fp32 temporary of the random init (the embedding) and 2 GB of activations
    need = sum_umt5_params(full) * te_dtype.itemsize + full.vocab_size * full.dim * 4 + 2e9
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
        model = random_umt5(cfg, dtype=te_dtype, device=run.device, seed=a.seed + 1)
        te = TextEncoder(model, tiny_tokenizer(min(cfg.vocab_size, 512)), cfg, cache_size=0)
        if path.startswith("TextEncoder.encode"):
            fn = lambda: (te.encode(PROMPT), te.encode(""))  # noqa: E731
        else:
            fn = lambda: (te._encode_batch([PROMPT]), te._encode_batch([""]))  # noqa: E731
        return te, _stage_measure(run, fn, inspect=_shape_of)

    layers = full.num_layers if mode == "full" else min(a.text_layers, full.num_layers)
    res, err = run.attempt("text encode", lambda: build_and_time(layers))
    if err and mode == "full" and "OutOfMemory" in err:
        fallback, layers = err[:300], min(a.text_layers, full.num_layers)
        res, err = run.attempt("text encode (layers)", lambda: build_and_time(layers))
    if err:
        run.emit("stage", stage="text_encode", status="failed", reason=err)
        return
    te, m = res
    scale = full.num_layers / layers
    s = m.median_s * scale
    run.stage_s["text_encode"] = s
    note = None
    if layers != full.num_layers:
        note = (f"measured with {layers} of {full.num_layers} layers at full width and scaled by "
                f"{scale:g} (embedding and final norm counted {scale:g} times: a slight overestimate)")
        run.stage_note["text_encode"] = note
    run.emit("stage", stage="text_encode", status="ok", seconds=s, measured_seconds=m.median_s,
             layers_measured=layers, layers_full=full.num_layers, estimate=note, fallback_reason=fallback,
             positions=full.text_len, prompts=2, text_dtype=str(te_dtype).replace("torch.", ""), path=path,
             output=m.first_result, **m.summary())
    log(f"text encode: {s * 1e3:.1f} ms ({layers}/{full.num_layers} layers measured)")
    if a.full_video and layers == full.num_layers:
        run.text_encoder = te
    else:
        del te
    free_memory(run.device)


def sum_umt5_params(cfg: TextEncoderConfig) -> int:
    d, inner, f = cfg.dim, cfg.num_heads * cfg.dim_kv, cfg.dim_ffn
    per_layer = 4 * d * inner + 3 * d * f + 2 * d + cfg.num_buckets * cfg.num_heads
    return cfg.vocab_size * d + cfg.num_layers * per_layer + d


def _vae_dtype(run: Run) -> torch.dtype:
    return _DTYPES[run.args.vae_dtype]


def bench_vae(run: Run, cases: list[Case]) -> None:
    """Reference encoding (when a case has references) and decode, untiled and tiled."""
    from .models.vae import VAETiling

    a = run.args
    want_refs = "refs" in a.stages and any(c.ref_frames for c in cases)
    want_decode = "decode" in a.stages
    if not (want_refs or want_decode or a.full_video):
        for st in ("reference_encode", "vae_decode", "vae_decode_tiled"):
            run.emit("stage", stage=st, status="skipped", reason="not requested (--stages)")
        return
    vae, err = run.attempt("VAE build", lambda: random_vae(run.cfg.vae, seed=a.seed + 2, dtype=_vae_dtype(run),
                                                           device=run.device))
    if err:
        for st in ("reference_encode", "vae_decode", "vae_decode_tiled"):
            run.emit("stage", stage=st, status="failed", reason=f"VAE build: {err}")
        return
    vdt = str(_vae_dtype(run)).replace("torch.", "")
    g = torch.Generator().manual_seed(a.seed + 3)
    case = next((c for c in cases if c.ref_frames), None)
    if not want_refs:
        run.emit("stage", stage="reference_encode", status="skipped",
                 reason="not requested (--stages) or no case with references")
    elif run.over_budget():
        run.emit("stage", stage="reference_encode", status="skipped", reason=run.over_budget())
    else:
        # the engine's prepared references: [3, T, H, W] in [-1, 1] on the CPU; encode moves each to the device
        pixels = [torch.rand(3, 1, case.height, case.width, generator=g) * 2 - 1 for _ in range(case.ref_images)]
        if case.ref_clip_frames:
            pixels.append(torch.rand(3, case.ref_clip_frames, case.height, case.width, generator=g) * 2 - 1)
        fn = lambda: [vae.encode(p[None].to(run.device, vae.dtype)) for p in pixels]  # noqa: E731
        m, err = run.attempt("reference encode", lambda: _stage_measure(
            run, fn, inspect=lambda out: [list(z.shape) for z in out]))
        if err:
            run.emit("stage", stage="reference_encode", status="failed", reason=err)
        else:
            run.stage_s["reference_encode"] = m.median_s
            run.emit("stage", stage="reference_encode", status="ok", seconds=m.median_s, vae_dtype=vdt,
                     references=[list(p.shape) for p in pixels], latents=m.first_result,
                     note=("VAE encode of each reference on its own, including the host-to-device copy of its "
                           "pixels; the null references (black, one per shape) are cached per shape by the "
                           "engine and not counted"), **m.summary())
            log(f"reference encode: {m.median_s:.3f} s ({len(pixels)} references)")
        del pixels
        free_memory(run.device)

    if want_decode:
        target = cases[0]
        h, w = target.latent_hw
        latent = torch.randn(1, run.cfg.vae.z_dim, target.latent_frames, h, w, generator=g).to(run.device)
        tiling = VAETiling.of(tuple(int(v) for v in a.vae_tile.split(",")))
        for stage, tile in (("vae_decode", None), ("vae_decode_tiled", tiling)):
            if run.over_budget():
                run.emit("stage", stage=stage, status="skipped", reason=run.over_budget())
                continue
            m, err = run.attempt(stage, lambda: _stage_measure(run, lambda: vae.decode(latent, tile=tile),
                                                               inspect=_shape_of))
            tile_desc = None if tile is None else dict(tile_h=tile.tile_h, tile_w=tile.tile_w, overlap=tile.overlap)
            if err:
                run.emit("stage", stage=stage, status="failed", reason=err, tiling=tile_desc)
                continue
            run.stage_s[stage] = m.median_s
            run.emit("stage", stage=stage, status="ok", seconds=m.median_s, vae_dtype=vdt, tiling=tile_desc,
                     latent=list(latent.shape), output=m.first_result,
                     note="decode to fp32 pixels on the device; the uint8 conversion and copy to the host excluded",
                     **m.summary())
            log(f"{stage}: {m.median_s:.3f} s, peak memory {m.summary()['peak_mem_gb']} GB (CUDA only)")
        del latent
    else:
        for st in ("vae_decode", "vae_decode_tiled"):
            run.emit("stage", stage=st, status="skipped", reason="not requested (--stages)")
    if a.full_video:
        run.vae = vae
    else:
        del vae
    free_memory(run.device)


def _module(run: Run, v: Variant):
    """The module of a variant, built once per run over the shared weights (cached across cases)."""
    if v.name in run.modules:
        return run.modules[v.name]
    if v.base == "diffusers":
        model, info = diffusers_from_dit(run.base)
        if v.compile:
            _raise_dynamo_limits()
            model.compile_repeated_blocks(**_compile_kwargs(run.args))
        run.modules[v.name] = (model, info)
        return run.modules[v.name]
    model = dit_view(run.base, v.base)
    if v.fp8:
        quantize, _ = _fp8_api()[0]
        quantize(model)
    if v.compile:
        _raise_dynamo_limits()
        for block in model.blocks:  # regional compilation: every block runs the same compiled code
            block.compile(**_compile_kwargs(run.args))
    run.modules[v.name] = model
    return model


def _variant_fields(v: Variant, run: Run) -> dict:
    a = run.args
    return dict(variant=v.name, impl=v.impl, backend=None if v.base == "diffusers" else v.base,
                compile=(dict(backend=a.compile_backend, mode=a.compile_mode or "default", dynamic=False,
                              scope="each transformer block (regional)") if v.compile else None),
                quant="fp8" if v.fp8 else None)


def bench_diffusers(run: Run, v: Variant, inp: StepInputs, case: Case,
                    reference: torch.Tensor | None) -> tuple[Measurement | None, dict]:
    """Try every requested attention backend (one untimed and one timed step each; the relative error of its
    output against our torch backend is recorded), then time the fastest that gives finite output. The
    compiled variant uses the backend the eager baseline chose for this case."""
    model, info = _module(run, v)
    step = diffusers_step(model, inp)
    candidates = run.args.diffusers_backends
    chosen_eager = run.modules.get(("chosen", case.name))
    if v.compile and chosen_eager:
        candidates = [chosen_eager]
    probes = []
    for name in candidates:
        if len(candidates) == 1:
            probes.append(dict(attention_backend=name, status="ok", probe_ms=None))
            break
        def probe(name=name):
            with diffusers_attention(model, name):
                return measure(step, warmup=0, reps=1, device=run.device)
        try:
            m = probe()
        except Exception as e:  # noqa: BLE001 - an unusable backend is an expected outcome, recorded
            free_memory(run.device)
            probes.append(dict(attention_backend=name, status="unavailable", reason=f"{type(e).__name__}: {e}"[:600]))
            continue
        finite = bool(torch.isfinite(m.first_result).all())
        probes.append(dict(attention_backend=name, status="ok" if finite else "non-finite output",
                           probe_ms=m.times_ms[0], first_call_s=m.first_call_s,
                           relerr_vs_torch=None if reference is None else relerr(m.first_result, reference)))
        del m
    ok = [p for p in probes if p["status"] == "ok"]
    for p in probes:
        run.emit("diffusers_backend", case=case.name, variant=v.name, **p)
    if not ok:
        return None, dict(attention_backend=None, reason="no diffusers attention backend ran: " +
                          "; ".join(f"{p['attention_backend']}: {p.get('reason', p['status'])}" for p in probes),
                          weights=info)
    best = min(ok, key=lambda p: p["probe_ms"] if p["probe_ms"] is not None else 0.0)
    if not v.compile:
        run.modules[("chosen", case.name)] = best["attention_backend"]
    with diffusers_attention(model, best["attention_backend"]):
        m = measure(step, warmup=run.args.warmup, reps=run.args.steps_timed, device=run.device)
    return m, dict(attention_backend=best["attention_backend"], weights=info,
                   backends_tried=[p["attention_backend"] for p in probes],
                   backends_ok=[p["attention_backend"] for p in ok])


def bench_case(run: Run, case: Case, variants: list[Variant]) -> None:
    a, cfg = run.args, run.cfg.dit
    batch = 2 if a.guidance != 1.0 else 1
    tokens = case.tokens(cfg)
    flops = step_flops(cfg, tokens, batch)
    shape = case.describe(cfg)
    common = dict(case=case.name, shape=shape, tokens=tokens, batch=batch, timestep=a.timestep,
                  text_len=cfg.text_len, prompt_tokens=a.prompt_tokens, flops_per_step=flops,
                  flop_formula=FLOP_FORMULA, peaks=run.peaks, ceiling_tflops=run.ceiling_tflops)

    def prepare():
        inp = make_step_inputs(run.base, case, batch=batch, guidance=a.guidance, t=a.timestep,
                               prompt_tokens=a.prompt_tokens, seed=a.seed + 10)
        kv_view = dit_view(run.base, "torch")
        return inp, measure(lambda: kv_view.prepare_text(inp.contexts), warmup=a.stage_warmup,
                            reps=a.stage_repeats, device=run.device)

    res, err = run.attempt(f"{case.name} inputs", prepare)
    if err:
        run.emit("stage", stage="text_kv_prepare", case=case.name, status="failed", reason=err)
        for v in variants:
            run.emit("dit_step", **common, **_variant_fields(v, run), status="failed", reason=f"inputs: {err}")
        return
    inp, m_kv = res
    text_kv = m_kv.first_result
    run.stage_s[f"text_kv_prepare:{case.name}"] = m_kv.median_s
    run.emit("stage", stage="text_kv_prepare", case=case.name, status="ok", seconds=m_kv.median_s,
             note="text embedding and every block's cross-attention K/V, once per prompt pair", **m_kv.summary())
    log(f"case {case.name}: {tokens} tokens, {flops / 1e12:.4g} TFLOP per guided step, target latent "
        f"{shape['latent']}, references {shape['ref_latents']}")

    # order: our torch backend first (the numerical reference), then the baseline, then the rest
    order = sorted(variants, key=lambda v: (v.name != "torch", v.name != "diffusers"))
    recs: list[dict] = []
    reference = None  # our torch-backend output, the reference for every relative error
    outputs: dict[str, torch.Tensor] = {}
    for v in order:
        base = dict(common, **_variant_fields(v, run))
        reason = variant_unavailable(v, run.device, a) or run.over_budget()
        if reason:
            recs.append(dict(base, status="skipped", reason=reason))
            log(f"  {v.name}: skipped: {reason[:160]}")
            continue
        extra: dict = {}
        if v.base == "diffusers":
            res, err = run.attempt(f"{case.name}/{v.name}", lambda: bench_diffusers(run, v, inp, case, reference))
            if res is not None:
                m, extra = res
                if m is None:
                    recs.append(dict(base, status="failed", **extra))
                    continue
        else:
            def body():
                model = _module(run, v)
                return measure(ours_step(model, inp, text_kv), warmup=a.warmup, reps=a.steps_timed,
                               device=run.device)
            m, err = run.attempt(f"{case.name}/{v.name}", body)
        if err:
            recs.append(dict(base, status="failed", reason=err))
            continue
        out = m.first_result
        if v.name == "torch":
            reference = out
        outputs[v.name] = out
        thr = throughput(flops, m.median_s, run.peaks.get("bf16"), run.ceiling_tflops)
        rec = dict(base, status="ok", **m.summary(), median_s=m.median_s, **thr,
                   finite=bool(torch.isfinite(out).all()), output_shape=list(out.shape), **extra)
        if v.fp8 and run.peaks.get("fp8"):
            rec["mfu_fp8_peak"] = thr["tflops"] / run.peaks["fp8"]
        if v.compile:
            rec["compile_s"] = max(0.0, m.first_call_s - m.median_s)
            rec["compile_note"] = "first call (compilation) excluded from the timing; compile_s = first call - median"
        recs.append(rec)
        log(f"  {v.name}: {m.median_s * 1e3:.1f} ms/step (p20 {rec['timing']['p20_ms']:.1f}, "
            f"p80 {rec['timing']['p80_ms']:.1f}), {thr['tflops']:.4g} TFLOP/s, first call {m.first_call_s:.1f} s")

    baseline = next((r for r in recs if r["variant"] == "diffusers" and r["status"] == "ok"), None)
    for r in recs:
        if r["status"] != "ok":
            continue
        if reference is not None:
            r["relerr_vs_torch"] = relerr(outputs[r["variant"]], reference)
        if baseline is not None:
            r["baseline"] = dict(variant="diffusers", attention_backend=baseline.get("attention_backend"),
                                 median_ms=baseline["timing"]["median_ms"])
            r["speedup_vs_baseline"] = baseline["median_s"] / r["median_s"]
        else:
            r["baseline"] = None
            r["baseline_reason"] = next((x.get("reason") for x in recs if x["variant"] == "diffusers"),
                                        "diffusers not in --variants")
        r["video"] = compose_video(run.stage_s, case, r["median_s"], a.steps, run.stage_note)
    for r in recs:
        run.emit("dit_step", **r)
    del outputs, reference, text_kv, inp
    free_memory(run.device)


def compose_video(stage_s: dict[str, float], case: Case, step_s: float, steps: int,
                  notes: dict[str, str] | None = None) -> dict:
    """Seconds per video composed from parts measured in this run: steps x step + text encode + text K/V +
    reference encode (cases with references) + VAE decode (untiled; tiled if the untiled one did not run)."""
    parts: dict[str, float | None] = {"text_encode": stage_s.get("text_encode"),
                                      "text_kv_prepare": stage_s.get(f"text_kv_prepare:{case.name}")}
    if case.ref_frames:
        parts["reference_encode"] = stage_s.get("reference_encode")
    decode = "vae_decode" if "vae_decode" in stage_s else "vae_decode_tiled"
    parts[decode] = stage_s.get(decode)
    missing = [k for k, val in parts.items() if val is None]
    total = None if missing else steps * step_s + sum(parts.values())
    out = dict(method=("composed from parts measured in this run: steps x guided step latency + stages; "
                       "excludes media I/O, reference preparation, the sampler update (elementwise) and the "
                       "null-reference latents (cached per shape)"),
               steps=steps, step_s=step_s, parts=parts, total_s=total)
    if missing:
        out["missing"] = missing
    if notes:
        out["notes"] = {k: v for k, v in notes.items() if k in parts}
    return out


def bench_full_video(run: Run, case: Case) -> None:
    """One Engine.generate, end to end, with the fastest of our variants measured for this case."""
    import numpy as np

    from .engine import Defaults, Engine

    a = run.args
    steps_recs = [r for r in run.records if r["kind"] == "dit_step" and r["case"] == case.name
                  and r["status"] == "ok" and r["impl"] == "anyid_rt"]
    name = a.full_video_variant or (min(steps_recs, key=lambda r: r["median_s"])["variant"] if steps_recs else None)
    reason = run.over_budget()
    if name is None:
        reason = "no variant of ours ran for this case"
    elif parse_variant(name).impl != "anyid_rt":
        reason = f"--full-video-variant {name!r}: the end-to-end run uses our engine (torch or triton variants)"
    elif run.text_encoder is None or run.vae is None:
        reason = "the full-size text encoder or the VAE did not run in this process (see their stage records)"
    if reason:
        run.emit("video", case=case.name, status="skipped", reason=reason)
        return
    v = parse_variant(name)
    model = _module(run, v)
    engine = Engine(model, run.vae, run.text_encoder, device=run.device,
                    defaults=Defaults(height=case.height, width=case.width, num_frames=case.frames, steps=a.steps,
                                      guidance=a.guidance))
    rng = np.random.default_rng(a.seed)
    refs = [rng.integers(0, 256, (1, case.height, case.width, 3), dtype=np.uint8) for _ in range(case.ref_images)]
    if case.ref_clip_frames:
        refs.append(rng.integers(0, 256, (case.ref_clip_frames, case.height, case.width, 3), dtype=np.uint8))
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    video, err = run.attempt("full video", lambda: engine.generate(
        PROMPT, references=refs or None, height=case.height, width=case.width, num_frames=case.frames,
        steps=a.steps, guidance=a.guidance, seed=a.seed, progress=False))
    if err:
        run.emit("video", case=case.name, variant=name, status="failed", reason=err)
        return
    peak = torch.cuda.max_memory_allocated(run.device) / 1e9 if run.device.type == "cuda" else None
    composed = next((r["video"]["total_s"] for r in steps_recs if r["variant"] == name), None)
    run.emit("video", case=case.name, variant=name, status="ok", method="measured end to end (Engine.generate)",
             steps=a.steps, timings=video.timings, total_s=video.timings["total"], composed_total_s=composed,
             frames=list(video.frames.shape), peak_mem_gb=peak)
    log(f"full video ({case.name}, {name}): {video.timings['total']:.1f} s "
        f"(composed estimate {composed if composed is None else round(composed, 1)} s)")


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------

_PRESET_SHAPES = {"wan2.2-ti2v-5b": (704, 1280, 121), "tiny": (64, 64, 9)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what and where")
    g.add_argument("--preset", default="wan2.2-ti2v-5b", choices=PRESETS,
                   help="model sizes (random weights): the 5B (default) or tiny (runs on a CPU in seconds)")
    g.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    g.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="DiT weights / compute dtype (default bf16 on a GPU, fp32 on a CPU)")
    g.add_argument("--cases", default="t2v,refs",
                   help="t2v: the target alone; refs: target + --refs images + one clip (default both)")
    g.add_argument("--variants", default=None,
                   help="comma list of torch|triton|diffusers[+compile][+fp8] (default: all that apply)")
    g.add_argument("--stages", default="text,refs,decode",
                   help="comma list of text,refs,decode (or 'none'); the ceiling always runs")
    g = p.add_argument_group("shape (default: the preset's, 1280x704x121 for the 5B)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--frames", type=int, help="4n+1")
    g.add_argument("--refs", type=int, default=4, help="image references in the refs case (default 4)")
    g.add_argument("--ref-clip-frames", type=int, default=None,
                   help="frames of the reference clip in the refs case (default --frames; 0: no clip)")
    g.add_argument("--prompt-tokens", type=int, default=128, help="real rows of the prompt embedding (default 128)")
    g = p.add_argument_group("timing")
    g.add_argument("--steps-timed", type=int, default=5, help="timed guided steps per variant (default 5)")
    g.add_argument("--warmup", type=int, default=1,
                   help="untimed steps after the first call, which is always untimed and reported (default 1)")
    g.add_argument("--stage-repeats", type=int, default=2, help="timed repetitions of each stage (default 2)")
    g.add_argument("--stage-warmup", type=int, default=0,
                   help="untimed repetitions of each stage after its untimed first call (default 0)")
    g.add_argument("--time-budget", type=float, default=None,
                   help="seconds; what would start after that is recorded as skipped (fit a device time limit)")
    g = p.add_argument_group("sampling (for FLOPs and seconds per video)")
    g.add_argument("--steps", type=int, default=50, help="denoising steps per video (default 50)")
    g.add_argument("--guidance", type=float, default=5.0, help="guidance scale; 1 = batch 1 (default 5)")
    g.add_argument("--timestep", type=float, default=999.0, help="the step's timestep (default 999)")
    g = p.add_argument_group("components")
    g.add_argument("--text-encoder", default="full", choices=["full", "layers", "skip"],
                   help="full umT5 (5.7B, 11.4 GB bf16), or --text-layers layers at full width scaled up")
    g.add_argument("--text-layers", type=int, default=2, help="layers measured with --text-encoder layers")
    g.add_argument("--vae-dtype", default="fp32", choices=sorted(_DTYPES),
                   help="VAE dtype (default fp32, the engine's)")
    g.add_argument("--vae-tile", default="32,32,8", help="tiled decode: tile_h,tile_w,overlap in latent pixels")
    g.add_argument("--diffusers-backends", default=",".join(DEFAULT_DIFFUSERS_BACKENDS),
                   help="diffusers attention backends to try; the fastest that runs is the baseline")
    g.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compiled variants: auto = on a GPU only")
    g.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: tracing check)")
    g.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor's default)")
    g.add_argument("--triton-interpret", action="store_true",
                   help="on a CPU, run the Triton variants under TRITON_INTERPRET=1 (correctness only)")
    g.add_argument("--full-video", action="store_true",
                   help="also run Engine.generate end to end (--steps steps) with the fastest variant")
    g.add_argument("--full-video-variant", default=None, help="variant for --full-video (default: the fastest)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="bench/results", help=f"folder; records are appended to {RESULTS_FILE}")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ceiling-n", type=int, default=None, help="matmul size of the ceiling (default 8192 GPU, 512 CPU)")
    g.add_argument("--ceiling-copy-gb", type=float, default=None, help="copy size of the ceiling (default 2 GB GPU)")
    g.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by device name)")
    g.add_argument("--commit", default=None, help="git commit to record where the checkout has no .git")
    g.add_argument("--tag", default=None, help="free text stored in every record")
    g.add_argument("--strict", action="store_true", help="raise on the first failure instead of recording it")


def _parse(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[Case], list[Variant]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device; use --device cpu --preset tiny")
    dtype = _DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    H, W, F = _PRESET_SHAPES[args.preset]
    height, width, frames = args.height or H, args.width or W, args.frames or F
    clip = frames if args.ref_clip_frames is None else args.ref_clip_frames
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not names or set(names) - {"t2v", "refs"}:
        raise ValueError(f"--cases {args.cases!r}: choose from t2v, refs")
    cases = [Case("t2v", height, width, frames) if n == "t2v" else Case("refs", height, width, frames, args.refs, clip)
             for n in dict.fromkeys(names)]
    if any(c.name == "refs" and not c.ref_frames for c in cases):
        raise ValueError("the refs case needs --refs > 0 or --ref-clip-frames > 0")
    variants = [parse_variant(v) for v in (args.variants.split(",") if args.variants else default_variants(device))
                if v.strip()]
    if len({v.name for v in variants}) != len(variants):
        raise ValueError(f"--variants lists a variant twice: {[v.name for v in variants]}")
    stages = {s.strip() for s in args.stages.split(",") if s.strip()} - {"none"}
    if stages - {"text", "refs", "decode"}:
        raise ValueError(f"--stages {args.stages!r}: choose from text, refs, decode, none")
    args.stages = stages
    args.diffusers_backends = [b.strip() for b in args.diffusers_backends.split(",") if b.strip()]
    for name, v in (("--steps-timed", args.steps_timed), ("--stage-repeats", args.stage_repeats),
                    ("--steps", args.steps), ("--text-layers", args.text_layers)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    for name, v in (("--warmup", args.warmup), ("--stage-warmup", args.stage_warmup)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    return device, dtype, cases, variants


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run: set by main(), else read off sys.argv (`anyid-rt bench ...`)."""
    if getattr(args, "bench_command", None):
        return args.bench_command
    parts = ["anyid-rt", *sys.argv[1:]] if sys.argv[1:2] == ["bench"] else sys.argv
    return " ".join(shlex.quote(x) for x in parts)


def run(args: argparse.Namespace) -> list[dict]:
    """Run the benchmark; returns the records (also appended to <out>/e2e.jsonl)."""
    device, dtype, cases, variants = _parse(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.preset(args.preset)
    env = environment(device, args.commit)
    r = Run(args, device, dtype, cfg, env, out_dir / RESULTS_FILE)
    r.peaks = dense_peaks(env.get("device_name")) if device.type == "cuda" else dict(
        bf16=None, fp8=None, source="no datasheet peak for a CPU")
    if args.peak_tflops:
        r.peaks = dict(r.peaks, bf16=args.peak_tflops, source="--peak-tflops")
    r.emit("run", command=_command_line(args), args={k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()
                                       if k not in ("func", "bench_command")},
           cases=[dict(name=c.name, tokens=c.tokens(cfg.dit), **c.describe(cfg.dit)) for c in cases],
           variants=[v.name for v in variants], tag=args.tag)
    log(f"run {r.run_id} on {env.get('device_name')} ({device}, {dtype}), commit {env.get('commit')}, "
        f"writing {r.out_file}")
    with torch.inference_mode():
        bench_ceiling(r)
        bench_text(r)
        bench_vae(r, cases)
        base, err = r.attempt("DiT build", lambda: random_dit(cfg.dit, dtype=dtype, device=device, seed=args.seed))
        if err:
            for c in cases:
                for v in variants:
                    r.emit("dit_step", case=c.name, **_variant_fields(v, r), status="failed",
                           reason=f"DiT build: {err}")
        else:
            r.base = base
            for c in cases:
                bench_case(r, c, variants)
                if args.full_video:
                    bench_full_video(r, c)
    print_summary(r.records)
    r.modules.clear()
    r.base = r.vae = r.text_encoder = None
    free_memory(device)
    return r.records


def print_summary(records: list[dict]) -> None:
    """A short table last (ceiling, stages, guided steps, videos), so the end of the output carries the numbers."""
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    lines = []
    for rec in records:
        if rec["kind"] == "ceiling" and rec["status"] == "ok":
            lines.append(f"ceiling: matmul {rec['matmul_tflops']:.4g} TFLOP/s, copy {rec['copy_gbps']:.4g} GB/s")
        elif rec["kind"] == "stage":
            name = rec["stage"] + (":" + rec["case"] if rec.get("case") else "")
            val = (f"{rec['seconds'] * 1e3:10.1f} ms  peak {fmt(rec.get('peak_mem_gb'), '.2f')} GB"
                   if rec["status"] == "ok" else f"{rec['status']}: {str(rec.get('reason'))[:90]}")
            lines.append(f"stage {name:28s} {val}")
    lines.append(f"{'case':5s} {'variant':20s} {'ms/step':>9s} {'p20-p80':>17s} {'TFLOP/s':>8s} {'MFU':>6s} "
                 f"{'vs ceil':>7s} {'speedup':>7s} {'relerr':>8s} {'s/video':>8s}")
    for rec in records:
        if rec["kind"] != "dit_step":
            continue
        if rec["status"] != "ok":
            lines.append(f"{rec['case']:5s} {rec['variant']:20s} {rec['status']}: {str(rec.get('reason'))[:100]}")
            continue
        t = rec["timing"]
        speedup = rec.get("speedup_vs_baseline")
        lines.append(f"{rec['case']:5s} {rec['variant']:20s} {t['median_ms']:9.1f} "
                     f"{t['p20_ms']:8.1f}-{t['p80_ms']:<8.1f} {rec['tflops']:8.4g} {fmt(rec['mfu_peak'], '6.1%')} "
                     f"{fmt(rec['mfu_ceiling'], '7.1%')} {fmt(speedup, '6.2f')}{'x' if speedup else ' '} "
                     f"{fmt(rec.get('relerr_vs_torch'), '8.1e')} {fmt(rec['video']['total_s'], '8.1f')}")
    for rec in records:
        if rec["kind"] == "video":
            lines.append(f"video {rec['case']}: " + (
                f"{rec['total_s']:.2f} s end to end ({rec['variant']}, {rec['steps']} steps; composed estimate "
                f"{fmt(rec['composed_total_s'], '.2f')} s)" if rec["status"] == "ok"
                else f"{rec['status']}: {str(rec.get('reason'))[:100]}"))
    print("\n".join(lines), flush=True)


def cmd_bench(args: argparse.Namespace) -> int:
    records = run(args)
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        print(f"anyid-rt bench: {len(failed)} measurement(s) failed; see 'reason' in {Path(args.out) / RESULTS_FILE}",
              file=sys.stderr)
    return 1 if failed else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on the `anyid-rt` subcommand parser."""
    p = subparsers.add_parser("bench", help="end-to-end benchmark against diffusers (see README.md, Benchmarks)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anyid-rt bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.bench_command = " ".join(shlex.quote(x) for x in ["anyid-rt", "bench",
                                                            *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_bench(args)
    except ValueError as e:
        print(f"anyid-rt bench: error: {e}", file=sys.stderr)
        return 2


__all__ = ["main", "add_parser", "run", "measure", "summarize", "Measurement", "step_flops", "throughput",
           "dense_peaks", "environment", "Case", "StepInputs", "make_step_inputs", "ours_step", "diffusers_step",
           "random_dit", "dit_view", "diffusers_from_dit", "diffusers_attention", "random_umt5", "Variant",
           "parse_variant", "compose_video", "relerr", "SCHEMA", "RESULTS_FILE"]


if __name__ == "__main__":
    sys.exit(main())
