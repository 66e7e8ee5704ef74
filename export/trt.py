"""TensorRT engines from the exported graphs: optimisation profiles from resolution / frame / reference
buckets, bf16 or FP8 (Q/DQ) precision, a persistent timing cache.

A bucket is what a deployment serves: one output resolution, a range of frame counts, and a most
reference latent frames (an image is 1 latent frame, a clip of 4n+1 frames n+1). Each bucket becomes one
optimisation profile of the DiT plan with min / opt / max over the target tokens N (frames), the reference
tokens R (0 .. the bucket's most), the batch (1 without guidance, 2 with) and the segment count S (1: plain
t2v, 2: t2v with references or i2v, 3: i2v with references). The VAE decoder plans get one profile per
resolution (batch 1 .. 2). Triton selects a profile per model instance (`instance_group { profile: [...] }`).

`tensorrt` is imported only when an engine is built; without it the error names the install command.
Precision: a bf16 graph (exported with --dtype bf16: its own casts keep the norms, modulation and head in
fp32, as the PyTorch engine) builds strongly typed, for "bf16" and for "fp8" (its Q/DQ nodes then carry
the FP8). An fp32 graph builds weakly typed: "bf16" lets TensorRT pick bf16 kernels (BuilderFlag.BF16),
"fp8" enables FP8 + BF16. "fp8" needs a graph with Q/DQ nodes (`export onnx --quantize fp8`) and
TensorRT >= 10.2; "fp32" is the reference build.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import DiTConfig, VAEConfig
from .qdq import MissingDependency

PRECISIONS = ("bf16", "fp8", "fp32")
TRT_INSTALL = ("TensorRT is not installed: pip install tensorrt (TensorRT 10.2 or newer for FP8; the wheel must "
               "match the CUDA driver), or build with trtexec from the TensorRT container: see the README, Export and serving")


def require_tensorrt():
    """Import tensorrt, or raise MissingDependency naming `pip install tensorrt`."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependency(TRT_INSTALL) from e
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise MissingDependency(f"TensorRT {getattr(trt, '__version__', '?')} is too old: pip install 'tensorrt>=10.2' "
                                "(explicit-batch networks, BF16, FP8)")
    return trt


@dataclass(frozen=True)
class Bucket:
    """A served shape range: pixel height x width, frame counts (4n+1) min..max with an optimum, and the
    most / typical reference latent frames."""

    height: int
    width: int
    min_frames: int = 5
    opt_frames: int = 121
    max_frames: int = 121
    max_ref_frames: int = 35  # 4 images + one 121-frame clip (ARCHITECTURE.md section 7)
    opt_ref_frames: int = 5  # 5 images

    def __post_init__(self) -> None:
        if self.height % 32 or self.width % 32 or self.height <= 0 or self.width <= 0:
            raise ValueError(f"bucket {self.height}x{self.width}: height and width must be positive multiples of 32")
        for f in (self.min_frames, self.opt_frames, self.max_frames):
            if f < 1 or (f - 1) % 4:
                raise ValueError(f"bucket frame counts must be 4n+1, got {f}")
        if not self.min_frames <= self.opt_frames <= self.max_frames:
            raise ValueError(f"bucket frames need min <= opt <= max, got {self.min_frames}/{self.opt_frames}/"
                             f"{self.max_frames}")
        if not 0 <= self.opt_ref_frames <= self.max_ref_frames:
            raise ValueError(f"bucket reference frames need 0 <= opt <= max, got {self.opt_ref_frames}/"
                             f"{self.max_ref_frames}")

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        """'WxH' or 'WxH:FRAMES' or 'WxH:MIN-OPT-MAX' with an optional ':REFMAX' or ':REFOPT-REFMAX' (reference
        latent frames), e.g. '1280x704:5-121-121:5-35'."""
        parts = text.split(":")
        try:
            w, h = (int(v) for v in parts[0].lower().split("x"))
            kw = {}
            if len(parts) > 1:
                f = [int(v) for v in parts[1].split("-")]
                kw.update(zip(("min_frames", "opt_frames", "max_frames"), f if len(f) == 3 else (f[0], f[0], f[0])))
            if len(parts) > 2:
                r = [int(v) for v in parts[2].split("-")]
                kw.update(zip(("opt_ref_frames", "max_ref_frames"), r if len(r) == 2 else (min(r[0], 5), r[0])))
            if len(parts) > 3:
                raise ValueError("too many fields")
        except ValueError as e:
            raise ValueError(f"bad bucket {text!r}: write WxH[:FRAMES or MIN-OPT-MAX][:REFMAX or REFOPT-REFMAX] "
                             f"({e})") from None
        return cls(height=h, width=w, **kw)

    def latent_grid(self, frames: int) -> tuple[int, int, int]:
        """Latent (F, h, w) of an output of this size."""
        return 1 + (frames - 1) // 4, self.height // 16, self.width // 16


# default buckets per preset: the 5B's official 1280x704 and its portrait, the tiny model's 64x64
DEFAULT_BUCKETS = {
    "wan2.2-ti2v-5b": (Bucket(704, 1280), Bucket(1280, 704)),
    "tiny": (Bucket(64, 64, min_frames=1, opt_frames=9, max_frames=17, max_ref_frames=8, opt_ref_frames=2),),
}

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def dit_profile(cfg: DiTConfig, bucket: Bucket, max_batch: int = 2) -> Profile:
    """The DiT plan's optimisation profile for a bucket (input names and ranks of `DiTStep`)."""
    pt, ph, pw = cfg.patch_size
    per_frame = (bucket.height // 16 // ph) * (bucket.width // 16 // pw)  # tokens per latent frame

    def n_tokens(frames: int) -> int:
        return (bucket.latent_grid(frames)[0] // pt) * per_frame

    n = (n_tokens(bucket.min_frames), n_tokens(bucket.opt_frames), n_tokens(bucket.max_frames))
    r = (0, bucket.opt_ref_frames * per_frame, bucket.max_ref_frames * per_frame)
    b = (1, max_batch, max_batch)
    s = (1, 2, 3)
    cp, half = cfg.in_dim * cfg.patch_numel, cfg.head_dim // 2

    def shapes(*dims) -> tuple[Shape, Shape, Shape]:
        return tuple(tuple(d[i] if isinstance(d, tuple) else d for d in dims) for i in range(3))

    return {
        "tokens": shapes(b, n, cp), "ref_tokens": shapes(b, r, cp), "t_freq": shapes(b, s, cfg.freq_dim),
        "seg_index": shapes(n), "ref_seg_index": shapes(r), "rope_cos": shapes(n, half), "rope_sin": shapes(n, half),
        "ref_rope_cos": shapes(r, half), "ref_rope_sin": shapes(r, half), "context": shapes(b, cfg.text_len, cfg.text_dim),
    }


def vae_profile(vae_cfg: VAEConfig, cache: Sequence[tuple[int, int]], bucket: Bucket, step: bool,
                max_batch: int = 2) -> Profile:
    """A decoder plan's profile: latent [B, z, 1, h, w] and, for the step graph, every cache tensor
    [B, C_k, 2, h*s_k, w*s_k] (`onnx_vae.cache_layout`)."""
    _, h, w = bucket.latent_grid(1)
    b = (1, 1, max_batch)
    prof: Profile = {"latent": tuple((bb, vae_cfg.z_dim, 1, h, w) for bb in b)}
    if step:
        for k, (c, sc) in enumerate(cache):
            prof[f"cache_{k}"] = tuple((bb, c, 2, h * sc, w * sc) for bb in b)
    return prof


def check_profile(profile: Profile, onnx_inputs: dict[str, Shape | list]) -> None:
    """Every graph input has a profile entry of its rank whose static dims agree with the graph, and
    min <= opt <= max. `onnx_inputs`: name -> dims (ints, or strings / None for dynamic ones)."""
    missing = sorted(set(onnx_inputs) - set(profile))
    extra = sorted(set(profile) - set(onnx_inputs))
    if missing or extra:
        raise ValueError(f"profile does not match the graph: missing {missing}, unknown {extra}")
    for name, dims in onnx_inputs.items():
        lo, opt, hi = profile[name]
        if not len(lo) == len(opt) == len(hi) == len(dims):
            raise ValueError(f"{name}: profile ranks {len(lo)}/{len(opt)}/{len(hi)} != graph rank {len(dims)}")
        for i, d in enumerate(dims):
            if not lo[i] <= opt[i] <= hi[i]:
                raise ValueError(f"{name} dim {i}: need min <= opt <= max, got {lo[i]}/{opt[i]}/{hi[i]}")
            if isinstance(d, int) and d > 0 and not lo[i] == opt[i] == hi[i] == d:
                raise ValueError(f"{name} dim {i} is {d} in the graph, the profile gives {lo[i]}/{opt[i]}/{hi[i]}")
    # named dims must agree across inputs: 'tokens' is one value everywhere, '2*height' twice 'height'
    for j, which in enumerate(("min", "opt", "max")):
        values: dict[str, int] = {}
        for name, dims in onnx_inputs.items():
            for i, d in enumerate(dims):
                if not isinstance(d, str) or not d:
                    continue
                k, _, sym = d.rpartition("*")
                factor = int(k) if k.isdigit() else 1
                sym = sym if k.isdigit() or not k else d
                v = profile[name][j][i]
                if v % factor or values.setdefault(sym, v // factor) != v // factor:
                    raise ValueError(f"{which} shapes disagree on dim {sym!r}: {name} dim {i} is {v} ({d}), "
                                     f"another input has {sym} = {values[sym]}")


def onnx_input_dims(path: str | Path) -> dict[str, list]:
    """Graph input name -> dims (int or the dim's symbolic name), read without the weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input if i.name not in inits}


def graph_kind(path: str | Path) -> str:
    """'dit', 'vae_first' or 'vae_step', from the graph's inputs."""
    names = set(onnx_input_dims(path))
    if "tokens" in names:
        return "dit"
    if names == {"latent"}:
        return "vae_first"
    if "latent" in names and "cache_0" in names:
        return "vae_step"
    raise ValueError(f"{path}: not a graph written by `anyid-rt export onnx` (inputs {sorted(names)[:5]})")


def _onnx_facts(path: Path) -> tuple[bool, bool]:
    """(has Q/DQ nodes, has bf16 initializers) of a graph, without loading the weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    bf16 = any(t.data_type == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer)
    return qdq, bf16


def build_engine(onnx_path: str | Path, plan_path: str | Path, profiles: Sequence[Profile], precision: str = "bf16",
                 timing_cache: str | Path | None = None, workspace_gb: float = 16.0,
                 builder_optimization_level: int = 3) -> Path:
    """Build and serialise a TensorRT engine. Each profile is checked against the graph's inputs first; the
    timing cache is read if present and written back after the build (it makes rebuilds minutes faster)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX graph not found: {onnx_path} (write it with `anyid-rt export onnx`)")
    if not profiles:
        raise ValueError("give at least one optimisation profile")
    dims = onnx_input_dims(onnx_path)
    for p in profiles:
        check_profile(p, dims)
    has_qdq, is_bf16 = _onnx_facts(onnx_path)
    if precision == "fp8" and not has_qdq:
        raise ValueError(f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes: FP8 needs the quantised graph "
                         "(anyid-rt export onnx --quantize fp8)")
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # a bf16 graph carries its own precision (fp32 islands, bf16 matmuls, FP8 Q/DQ): build it strongly typed
    strongly_typed = is_bf16 and precision in ("bf16", "fp8")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external weight files beside the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = builder_optimization_level
    if not strongly_typed:
        if precision in ("bf16", "fp8"):
            config.set_flag(trt.BuilderFlag.BF16)
        if precision == "fp8":
            config.set_flag(trt.BuilderFlag.FP8)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


def profiles_for(onnx_path: str | Path, preset: str, buckets: Sequence[Bucket] | None = None,
                 vae_cache: Sequence[tuple[int, int]] | None = None) -> list[Profile]:
    """The profiles of a graph written by `export onnx` (kind read from its inputs) for the buckets."""
    from ..config import ModelConfig

    cfg = ModelConfig.preset(preset)
    buckets = list(buckets or DEFAULT_BUCKETS[preset])
    kind = graph_kind(onnx_path)
    if kind == "dit":
        return [dit_profile(cfg.dit, b) for b in buckets]
    if kind == "vae_step" and vae_cache is None:
        vae_cache = cache_layout_from_onnx(onnx_path)
    seen, out = set(), []
    for b in buckets:  # one profile per resolution
        if (b.height, b.width) not in seen:
            seen.add((b.height, b.width))
            out.append(vae_profile(cfg.vae, vae_cache or [], b, step=kind == "vae_step"))
    return out


def cache_layout_from_onnx(path: str | Path) -> list[tuple[int, int]]:
    """(channels, spatial scale) of every cache input of a decode-step graph, from its dim expressions
    ('height', '2*height', ...) as the exporter writes them."""
    dims = onnx_input_dims(path)
    out = []
    k = 0
    while f"cache_{k}" in dims:
        d = dims[f"cache_{k}"]
        h = str(d[3])
        scale = int(h.split("*")[0]) if "*" in h else 1
        out.append((int(d[1]), scale))
        k += 1
    return out


def plan_name(kind: str) -> str:
    return {"dit": "dit.plan", "vae_first": "vae_decode_first.plan", "vae_step": "vae_decode_step.plan"}[kind]


__all__ = ["Bucket", "DEFAULT_BUCKETS", "PRECISIONS", "TRT_INSTALL", "require_tensorrt", "dit_profile",
           "vae_profile", "check_profile", "onnx_input_dims", "graph_kind", "build_engine", "profiles_for",
           "cache_layout_from_onnx", "plan_name"]
