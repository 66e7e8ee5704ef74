"""FP8 quality, speed, and the byte / FLOP model that predicts the speed.

Quality (any device): per-layer cosine similarity and relative error of FP8 against bf16 at the 5B's
linear shapes with production-like activations (outlier channels), and full sampling runs (tiny and a
mid-size random model) comparing final latents (cosine) and decoded frames (PSNR) with the unquantised run
from the same noise.

Prediction (no device): `predict` is the README's model of the FP8 speed-up per block linear and per DiT
forward at the 5B shapes (GEMM time from FLOPs at a bf16 rate and an FP8 speed-up factor, activation
quantisation from bytes moved at a copy bandwidth), for the eager quantisation this engine had before and
for the one-pass / fused quantisation it has now.

Speed (CUDA): `--layers-speed` times each block linear at M = 2 x 27,280 tokens (bf16 `F.linear`; FP8Linear
with the eager and with the one-pass quantiser; `_scaled_mm` alone on rows quantised beforehand, which is
what the fused adaptive LayerNorm hands ffn.0 and q/k/v; the quantisers alone) and the adaptive LayerNorm
writing bf16 vs FP8 rows. `--speed` times one DiT forward, batch 2, bf16 against quant="fp8" with fused
inputs, without them, and with the eager quantiser, over one random copy of the weights made on the GPU.

    python bench/bench_fp8.py --quality              # CPU is fine   (or python -m anyid_rt.bench.bench_fp8)
    python bench/bench_fp8.py --calibration          # max vs modelopt weight scales (needs nvidia-modelopt)
    python bench/bench_fp8.py --predict              # the model's table, no device
    python bench/bench_fp8.py --layers-speed --speed --blocks 30   # on an H100/H200
Results are appended to bench/results/fp8.jsonl (measured and predicted side by side for the speed runs).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from anyid_rt.bench.baseline import dit_view
from anyid_rt.bench.timing import RESULTS, append_jsonl, environment, measure
from anyid_rt.config import DiTConfig
from anyid_rt.engine import Engine
from anyid_rt.kernels import SegmentMap
from anyid_rt.kernels.fp8_quant import E4M3, quantize_rows_fp8, quantize_rows_fp8_ref
from anyid_rt.kernels.modulation import layernorm_modulate
from anyid_rt.models import Segments, WanDiT
from anyid_rt.models.random_weights import random_dit
from anyid_rt.quant import FP8Linear, cosine, modelopt_weight_amax, psnr, quantize_dit_fp8_


def production_like_activations(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Modulated LayerNorm outputs with a few outlier channels, as DiT activations have (amplitude ~30).
    Also the FP8 tests' input (tests/test_quant.py)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    scale = 1 + 0.5 * torch.randn(width, generator=g)
    shift = 0.2 * torch.randn(width, generator=g)
    x = x * scale + shift
    outliers = torch.randperm(width, generator=g)[:8]
    x[:, outliers] *= 30
    return x


def record(row: dict, device: str) -> None:
    append_jsonl(RESULTS / "fp8.jsonl", [{**row, **environment(device)}])
    print(json.dumps(row))


def layer_quality(device: str) -> None:
    for out_f, in_f in [(3072, 3072), (14336, 3072), (3072, 14336)]:
        g = torch.Generator().manual_seed(1)
        lin = nn.Linear(in_f, out_f).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        x = production_like_activations(1024, in_f, seed=2).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
            bf16 = lin(x).float()
            fp8 = FP8Linear.from_linear(lin)(x).float()
        record(dict(bench="fp8_layer", shape=[out_f, in_f], tokens=1024, cos_fp8_vs_bf16=round(cosine(fp8, bf16), 6),
                    rel_fp8_vs_bf16=round(((fp8 - bf16).norm() / bf16.norm()).item(), 5),
                    rel_bf16_vs_fp32=round(((bf16 - ref).norm() / ref.norm()).item(), 5)), device)


def run_quality(device: str) -> None:
    layer_quality(device)
    kw = dict(steps=8, seed=3, progress=False)
    for name in ("tiny", "mid"):
        make = (lambda q, a: Engine.tiny(seed=0, device=device, quant=q, attention_quant=a)) if name == "tiny" \
            else (lambda q, a: _mid_engine(device, q, a))
        base = make(None, None).generate("a woman smiles", **kw)
        for quant, attn in (("fp8", None), (None, "int8"), (None, "int8-fp8"), ("fp8", "int8-fp8")):
            other = make(quant, attn).generate("a woman smiles", **kw)
            record(dict(bench="fp8_sampling", model=name, steps=8, quant=quant, attention_quant=attn,
                        latent_cos=round(cosine(base.latents, other.latents), 6),
                        frames_psnr_db=round(psnr(base.frames, other.frames), 2)), device)


def _mid_engine(device: str, quant: str | None, attention_quant: str | None = None,
                calibration: str = "max") -> Engine:
    tiny = Engine.tiny(seed=0, device=device)
    cfg = DiTConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=6, text_dim=tiny.dit.cfg.text_dim, freq_dim=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = WanDiT(cfg, attention_quant=attention_quant).to(device).eval().requires_grad_(False)
    if quant == "fp8":
        quantize_dit_fp8_(dit, calibration=calibration)
    return Engine(dit, tiny.vae, tiny.text_encoder, defaults=tiny.defaults, device=device)


def run_calibration(device: str, tokens: int = 256) -> None:
    """FP8 weight scales from max calibration against modelopt's PyTorch PTQ (`calibration="modelopt"`):
    per layer at the 5B's widths (weights N(0, 0.02), production-like activations), weight and output error
    against bf16; then full 8-step sampling runs (tiny, mid-size) against the unquantised run."""
    for out_f, in_f in [(3072, 3072), (14336, 3072), (3072, 14336)]:
        g = torch.Generator().manual_seed(1)
        lin = nn.Linear(in_f, out_f).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        x = production_like_activations(tokens, in_f, seed=2).to(device=device, dtype=torch.bfloat16)
        amax = {"max": None, "modelopt": modelopt_weight_amax([lin])[0]}
        with torch.no_grad():
            bf16 = lin(x).float()
            row = dict(bench="fp8_calibration_layer", shape=[out_f, in_f], tokens=tokens)
            for name, a in amax.items():
                fp8 = FP8Linear.from_linear(lin, weight_amax=a)
                w, w_ref = fp8.weight_q.float() * fp8.weight_scale.t(), lin.weight.float()
                y = fp8(x).float()
                row[name] = dict(weight_rel=round(((w - w_ref).norm() / w_ref.norm()).item(), 5),
                                 output_rel=round(((y - bf16).norm() / bf16.norm()).item(), 5),
                                 output_cos=round(cosine(y, bf16), 6))
        record(row, device)
    kw = dict(steps=8, seed=3, progress=False)
    for name in ("tiny", "mid"):
        def make(quant, calibration="max", name=name):
            if name == "mid":
                return _mid_engine(device, quant, calibration=calibration)
            engine = Engine.tiny(seed=0, device=device)
            if quant:
                quantize_dit_fp8_(engine.dit, calibration=calibration)
            return engine
        base = make(None).generate("a woman smiles", **kw)
        for calibration in ("max", "modelopt"):
            other = make("fp8", calibration).generate("a woman smiles", **kw)
            record(dict(bench="fp8_calibration_sampling", model=name, steps=8, calibration=calibration,
                        latent_cos=round(cosine(base.latents, other.latents), 6),
                        frames_psnr_db=round(psnr(base.frames, other.frames), 2)), device)


# ----------------------------------------------------------------------------------------------------------
# The byte / FLOP model (README, "FP8 inference")
# ----------------------------------------------------------------------------------------------------------
EAGER_BYTES = 45  # per bf16 element: .float() 2+4, .abs() 4+4, .amax() 4, .float() 2+4, / 4+4, .clamp() 4+4, cast 4+1
ONE_PASS_BYTES = 3  # read bf16, write E4M3 (plus 4 bytes per row for the scale, negligible)
FUSED_BYTES = -1  # the adaptive LayerNorm writes E4M3 instead of bf16: one byte per element less than bf16


@dataclass(frozen=True)
class LayerRole:
    """The linear layers of a block that share one input, as `Block.forward` runs them."""

    name: str
    k: int  # input features
    n: int  # output features of each layer
    count: int  # layers reading the same input (q, k, v: 3)
    fused_input: bool  # the input comes from the adaptive LayerNorm, which writes FP8 rows directly


def block_roles(cfg: DiTConfig) -> tuple[LayerRole, ...]:
    d, f = cfg.dim, cfg.ffn_dim
    return (LayerRole("self_attn.q,k,v", d, d, 3, True), LayerRole("self_attn.o", d, d, 1, False),
            LayerRole("cross_attn.q", d, d, 1, False), LayerRole("cross_attn.o", d, d, 1, False),
            LayerRole("ffn.0", d, f, 1, True), LayerRole("ffn.2", f, d, 1, False))


def predict(cfg: DiTConfig | None = None, tokens: int = 27_280, batch: int = 2, bf16_tflops: float = 790.0,
            fp8_speedup: tuple[float, float] = (1.6, 1.9), copy_tb_s: float = 4.3,
            attention_tflops: tuple[float, float] = (400.0, 600.0), other_ms_per_block: float = 4.0) -> dict:
    """Predicted milliseconds per block linear and seconds per DiT forward, bf16 vs FP8 (eager quantisation as
    before; one-pass + fused quantisation as now). GEMMs at `bf16_tflops` and `fp8_speedup` times that;
    quantisation at `copy_tb_s`; the forward adds attention (self + cross, at `attention_tflops`) and the
    norms / modulation / residuals (`other_ms_per_block` at 27,280 tokens, scaled with the tokens).
    A model, not a measurement: `--layers-speed` and `--speed` measure what it predicts."""
    cfg = cfg or DiTConfig()
    M = tokens * batch
    ms = lambda flop_or_bytes, rate: flop_or_bytes / rate * 1e3  # noqa: E731
    slow, fast = fp8_speedup
    layers, total = [], dict(bf16=0.0, fp8_gemm_slow=0.0, fp8_gemm_fast=0.0, quant_eager=0.0, quant_now=0.0)
    for r in block_roles(cfg):
        gemm = ms(2 * M * r.k * r.n * r.count, bf16_tflops * 1e12)
        eager = ms(M * r.k * EAGER_BYTES * r.count, copy_tb_s * 1e12)  # each layer quantised its own copy
        now = ms(M * r.k * (FUSED_BYTES if r.fused_input else ONE_PASS_BYTES), copy_tb_s * 1e12)  # once
        row = dict(layer=r.name, k=r.k, n=r.n, count=r.count, gemm_bf16_ms=gemm, gemm_fp8_ms=(gemm / fast, gemm / slow),
                   quant_eager_ms=eager, quant_now_ms=now,
                   speedup_eager=(gemm / (gemm / slow + eager), gemm / (gemm / fast + eager)),
                   speedup_now=(gemm / (gemm / slow + now), gemm / (gemm / fast + now)))
        layers.append(row)
        for key, v in (("bf16", gemm), ("fp8_gemm_slow", gemm / slow), ("fp8_gemm_fast", gemm / fast),
                       ("quant_eager", eager), ("quant_now", now)):
            total[key] += v
    attn_flop = batch * (4 * tokens * tokens * cfg.dim + 4 * tokens * cfg.text_len * cfg.dim)  # per block
    other = other_ms_per_block * tokens / 27_280
    forward = {}
    for rate in attention_tflops:
        rest = cfg.num_layers * (ms(attn_flop, rate * 1e12) + other) / 1e3  # seconds
        bf16 = rest + cfg.num_layers * total["bf16"] / 1e3
        now = tuple(rest + cfg.num_layers * (total[g] + total["quant_now"]) / 1e3
                    for g in ("fp8_gemm_slow", "fp8_gemm_fast"))
        eager = tuple(rest + cfg.num_layers * (total[g] + total["quant_eager"]) / 1e3
                      for g in ("fp8_gemm_slow", "fp8_gemm_fast"))
        forward[f"attention_{rate:g}_tflops"] = dict(bf16_s=bf16, fp8_now_s=now, fp8_eager_s=eager,
                                                     speedup_now=(bf16 / now[0], bf16 / now[1]),
                                                     speedup_eager=(bf16 / eager[0], bf16 / eager[1]))
    return dict(inputs=dict(tokens=tokens, batch=batch, blocks=cfg.num_layers, bf16_tflops=bf16_tflops,
                            fp8_speedup=list(fp8_speedup), copy_tb_s=copy_tb_s,
                            attention_tflops=list(attention_tflops), other_ms_per_block=other_ms_per_block,
                            bytes_per_element=dict(eager=EAGER_BYTES, one_pass=ONE_PASS_BYTES, fused=FUSED_BYTES)),
                layers=layers, block=total, forward=forward)


def print_prediction(p: dict) -> None:
    r2 = lambda v: "-".join(f"{x:.2f}" for x in sorted(v)) if isinstance(v, tuple) else f"{v:.2f}"  # noqa: E731
    print(json.dumps(p["inputs"]))
    print("| layer | K -> N | GEMM bf16 ms | GEMM fp8 ms | quant. eager ms | quant. now ms | speed-up eager | now |")
    for r in p["layers"]:
        print(f"| {r['layer']} | {r['k']} -> {r['n']} (x{r['count']}) | {r2(r['gemm_bf16_ms'])} | "
              f"{r2(r['gemm_fp8_ms'])} | {r2(r['quant_eager_ms'])} | {r['quant_now_ms']:+.3f} | "
              f"{r2(r['speedup_eager'])} | {r2(r['speedup_now'])} |")
    b = p["block"]
    print(f"per block: bf16 {b['bf16']:.2f} ms; fp8 GEMMs {b['fp8_gemm_fast']:.2f}-{b['fp8_gemm_slow']:.2f} ms; "
          f"quantisation eager {b['quant_eager']:.2f} ms, now {b['quant_now']:.2f} ms")
    for k, f in p["forward"].items():
        print(f"forward, {k}: bf16 {f['bf16_s']:.2f} s; fp8 now {r2(f['fp8_now_s'])} s ({r2(f['speedup_now'])}x); "
              f"eager {r2(f['fp8_eager_s'])} s ({r2(f['speedup_eager'])}x)")


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------
def _ms(fn, device: str, reps: int) -> float:
    return measure(fn, warmup=2, reps=reps, device=device, inspect=None).timing.median_ms


def layer_speed(device: str, tokens: int = 2 * 27_280, cfg: DiTConfig | None = None, reps: int = 10) -> list[dict]:
    """Each block linear role at M = `tokens` rows (the DiT's batch x tokens): milliseconds of bf16 `F.linear`,
    FP8Linear with the eager quantiser (as before) and with the one-pass kernel, `_scaled_mm` alone on rows
    quantised beforehand (the fused input), the two quantisers alone; and the adaptive LayerNorm writing bf16
    rows, FP8 rows, and bf16 rows quantised by the kernel. Records carry the model's prediction beside them.
    On a CPU (tests, small sizes) the kernels run under the Triton interpreter: a smoke run, not a timing."""
    cfg = cfg or DiTConfig()
    pred = {r["layer"]: r for r in predict(cfg, tokens=tokens, batch=1)["layers"]}
    with torch.no_grad():
        rows = [_layer_row(role, pred[role.name], tokens, device, reps) for role in block_roles(cfg)]
        rows.append(_modulate_row(cfg.dim, tokens, device, reps))
    return rows


def _layer_row(role: LayerRole, pred: dict, tokens: int, device: str, reps: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    lin = nn.Linear(role.k, role.n).to(device, torch.bfloat16)
    nn.init.normal_(lin.weight, std=0.02, generator=g)
    x = production_like_activations(tokens, role.k, seed=1).to(device, torch.bfloat16)
    eager, one_pass = (FP8Linear.from_linear(lin, backend=b) for b in ("torch", "triton"))
    pre = one_pass.quantize(x)
    t = dict(bf16=_ms(lambda: F.linear(x, lin.weight, lin.bias), device, reps),
             fp8_eager=_ms(lambda: eager(x), device, reps),
             fp8_one_pass=_ms(lambda: one_pass(x), device, reps),
             fp8_prequantised=_ms(lambda: one_pass(pre), device, reps),
             quant_eager=_ms(lambda: quantize_rows_fp8_ref(x), device, reps),
             quant_one_pass=_ms(lambda: quantize_rows_fp8(x), device, reps))
    flop = 2 * tokens * role.k * role.n
    one_pass_bytes = tokens * role.k * ONE_PASS_BYTES
    cos = cosine(one_pass(x).float(), F.linear(x, lin.weight, lin.bias).float())
    return dict(bench="fp8_layer_speed", layer=role.name, k=role.k, n=role.n, tokens=tokens,
                ms={k: round(v, 4) for k, v in t.items()},
                gemm_tflops=dict(bf16=round(flop / t["bf16"] / 1e9, 1),
                                 fp8=round(flop / t["fp8_prequantised"] / 1e9, 1)),
                quant_one_pass_tb_s=round(one_pass_bytes / t["quant_one_pass"] / 1e9, 3),
                cos_fp8_vs_bf16=round(cos, 6),
                predicted_ms=dict(bf16=round(pred["gemm_bf16_ms"] / pred["count"], 4),
                                  fp8_gemm=[round(v / pred["count"], 4) for v in pred["gemm_fp8_ms"]],
                                  quant_eager=round(pred["quant_eager_ms"] / pred["count"], 4),
                                  quant_one_pass=round(one_pass_bytes / 4.3e9, 4)))


def _modulate_row(dim: int, tokens: int, device: str, reps: int) -> dict:
    """The adaptive LayerNorm before q/k/v and ffn.0: [1, tokens, dim] fp32 residual, one segment."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, tokens, dim, device=device, generator=g)
    shift, scale = torch.randn(2, 1, 1, dim, device=device, generator=g)
    seg = SegmentMap.from_lens((tokens,), device)

    def modulate(dtype):
        return layernorm_modulate(x, shift, scale, seg, 1e-6, dtype)

    t = dict(bf16=_ms(lambda: modulate(torch.bfloat16), device, reps),
             fp8_fused=_ms(lambda: modulate(E4M3), device, reps),
             bf16_then_quant=_ms(lambda: quantize_rows_fp8(modulate(torch.bfloat16)), device, reps))
    # bytes per element: read fp32 x (4) + write bf16 (2) / E4M3 (1); unfused adds the quantiser's 2 + 1
    per_byte_ms = tokens * dim / 4.3e9
    return dict(bench="fp8_modulate_speed", tokens=tokens, dim=dim, ms={k: round(v, 4) for k, v in t.items()},
                predicted_ms=dict(bf16=round(6 * per_byte_ms, 4), fp8_fused=round(5 * per_byte_ms, 4),
                                  bf16_then_quant=round(9 * per_byte_ms, 4)))


FORWARD_VARIANTS = ("bf16", "fp8", "fp8-unfused", "fp8-eager")  # fp8: the engine's path


def forward_speed(blocks: int = 30, token_counts: tuple[int, ...] = (27_280, 58_080), reps: int = 3,
                  variants: tuple[str, ...] = FORWARD_VARIANTS) -> list[dict]:
    """One DiT forward, batch 2, Triton backend, projections fused as the engine runs them, random bf16
    weights made on the GPU once; every variant is a view of them (bench/baseline.py `dit_view`), the FP8
    ones quantised in place: `fp8` the engine's path (one-pass quantiser, adaptive LayerNorms writing FP8
    rows), `fp8-unfused` without the fused inputs, `fp8-eager` with the eager quantiser and no fused inputs
    (the path before one-pass quantisation)."""
    if not torch.cuda.is_available():
        raise RuntimeError("--speed needs a CUDA GPU")
    cfg = DiTConfig(num_layers=blocks)
    base = random_dit(cfg, dtype=torch.bfloat16, device="cuda", backend="triton")
    models: dict[str, WanDiT] = {}
    for name in variants:
        view = dit_view(base, "triton").fuse_projections()  # as the engine runs it: one qkv GEMM
        models[name] = view
        if name == "bf16":
            continue
        quantize_dit_fp8_(view, backend="torch" if name == "fp8-eager" else None)
        if name != "fp8":
            for block in view.blocks:
                block.attn_input_dtype = block.ffn_input_dtype = None
    kv = base.prepare_text([torch.randn(100, cfg.text_dim, device="cuda", dtype=torch.bfloat16)] * 2)
    return [_forward_row(models, kv, cfg, tokens, reps) for tokens in token_counts]


def _forward_row(models: dict[str, WanDiT], kv, cfg: DiTConfig, tokens: int, reps: int) -> dict:
    """The target (31 latent frames of 704 x 1280: 27,280 tokens) plus, above that, a reference group of
    880-token frames (58,080 = 31 + 35 frames), one segment per group, batch 2."""
    lat = [torch.randn(2, 48, 31, 44, 80, device="cuda")]
    if tokens > 27_280:
        lat.append(torch.randn(2, 48, (tokens - 27_280) // 880, 44, 80, device="cuda"))
    n = [z.shape[2] * 22 * 40 for z in lat]
    seg = Segments(tuple(n), torch.tensor([[500.0] + [0.0] * (len(n) - 1)] * 2, device="cuda"))
    starts = [0, 31][:len(lat)]
    times, outs = {}, {}
    for name, model in models.items():
        with torch.no_grad():
            m = measure(lambda: model.forward_groups(lat, starts, seg, kv), warmup=1, reps=reps, device="cuda",  # noqa: B023
                        inspect=lambda o: o.float())
        times[name], outs[name] = m.median_s, m.first_result
    pred = predict(cfg, tokens=sum(n), batch=2)["forward"]
    return dict(bench="fp8_speed", tokens=sum(n), batch=2, blocks=cfg.num_layers,
                seconds={k: round(v, 4) for k, v in times.items()},
                speedup_vs_bf16={k: round(times["bf16"] / v, 3) for k, v in times.items() if k != "bf16"},
                cos_vs_bf16={k: round(cosine(o, outs["bf16"]), 6) for k, o in outs.items() if k != "bf16"},
                predicted={k: dict(bf16_s=round(v["bf16_s"], 3), speedup_now=[round(x, 3) for x in v["speedup_now"]],
                                   speedup_eager=[round(x, 3) for x in v["speedup_eager"]]) for k, v in pred.items()},
                timing="median of --reps CUDA-event-timed forwards after an untimed first call and one warm-up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--calibration", action="store_true",
                    help="FP8 weight scales: max calibration against modelopt's PTQ (needs nvidia-modelopt)")
    ap.add_argument("--predict", action="store_true", help="print the byte / FLOP model's table (no device)")
    ap.add_argument("--layers-speed", action="store_true", help="time each block linear and the quantisers")
    ap.add_argument("--speed", action="store_true", help="time DiT forwards, bf16 against the FP8 variants")
    ap.add_argument("--blocks", type=int, default=30, help="DiT blocks in the forward speed run (30 = full 5B)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[27_280, 58_080], help="tokens per sample (--speed)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if not (args.quality or args.calibration or args.predict or args.layers_speed or args.speed):
        ap.error("choose --quality, --calibration, --predict, --layers-speed and/or --speed")
    if args.predict:
        print_prediction(predict())
    if args.quality:
        run_quality(args.device)
    if args.calibration:
        run_calibration(args.device)
    if args.layers_speed:
        for row in layer_speed(args.device, reps=args.reps):
            record(row, args.device)
    if args.speed:
        for row in forward_speed(args.blocks, tuple(args.tokens), args.reps):
            record(row, "cuda")


if __name__ == "__main__":
    main()
