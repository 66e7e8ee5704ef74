"""FP8 quality and speed.

Quality (any device): per-layer cosine similarity and relative error of FP8 against bf16 at the 5B's
linear shapes with production-like activations (outlier channels), and full sampling runs (tiny and a
mid-size random model) comparing final latents (cosine) and decoded frames (PSNR) with the unquantised run
from the same noise.

Speed (CUDA): one DiT forward, batch 2, at 27,280 and 58,080 tokens, bf16 against quant="fp8", same
random weights, same inputs, same run.

    python bench/bench_fp8.py --quality              # CPU is fine   (or python -m anyid_rt.bench.bench_fp8)
    python bench/bench_fp8.py --speed --layers 30    # on an H100/H200
Results are appended to bench/results/fp8.jsonl.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from anyid_rt.bench.timing import RESULTS, append_jsonl, environment, measure
from anyid_rt.config import DiTConfig
from anyid_rt.engine import Engine
from anyid_rt.models import Segments, WanDiT
from anyid_rt.quant import FP8Linear, cosine, psnr, quantize_dit_fp8_


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


def _mid_engine(device: str, quant: str | None, attention_quant: str | None = None) -> Engine:
    tiny = Engine.tiny(seed=0, device=device)
    cfg = DiTConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=6, text_dim=tiny.dit.cfg.text_dim, freq_dim=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dit = WanDiT(cfg, attention_quant=attention_quant).to(device).eval().requires_grad_(False)
    if quant == "fp8":
        quantize_dit_fp8_(dit)
    return Engine(dit, tiny.vae, tiny.text_encoder, defaults=tiny.defaults, device=device)


def run_speed(layers: int, reps: int) -> None:
    assert torch.cuda.is_available(), "--speed needs a CUDA GPU"
    cfg = DiTConfig(num_layers=layers)
    for tokens_frames in ((31, 0), (31, 35)):  # 27,280 and 58,080 tokens (refs: 4 images + 31-frame clip)
        times = {}
        for quant in (None, "fp8"):
            torch.manual_seed(0)
            dit = WanDiT(cfg, backend="triton").to("cuda", torch.bfloat16).eval().requires_grad_(False)
            if quant:
                quantize_dit_fp8_(dit)
            f, r = tokens_frames
            lat = [torch.randn(2, 48, f, 44, 80, device="cuda")] + ([torch.randn(2, 48, r, 44, 80, device="cuda")]
                                                                   if r else [])
            n = [z.shape[2] * 22 * 40 for z in lat]
            seg = Segments(tuple(n), torch.tensor([[500.0] + [0.0] * (len(n) - 1)] * 2, device="cuda"))
            kv = dit.prepare_text([torch.randn(100, 4096, device="cuda", dtype=torch.bfloat16)] * 2)
            with torch.no_grad():
                m = measure(lambda: dit.forward_groups(lat, [0, f][:len(lat)], seg, kv), warmup=1, reps=reps,
                            device="cuda", inspect=None)
            times[quant or "bf16"] = m.median_s
            del dit
            torch.cuda.empty_cache()
        record(dict(bench="fp8_speed", tokens=sum(n), batch=2, layers=layers, seconds_bf16=round(times["bf16"], 4),
                    seconds_fp8=round(times["fp8"], 4), speedup=round(times["bf16"] / times["fp8"], 3),
                    timing="median of --reps CUDA-event-timed forwards after an untimed first call and one warm-up"),
               "cuda")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--layers", type=int, default=30, help="DiT blocks in the speed run (30 = full 5B)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if not (args.quality or args.speed):
        ap.error("choose --quality and/or --speed")
    if args.quality:
        run_quality(args.device)
    if args.speed:
        run_speed(args.layers, args.reps)


if __name__ == "__main__":
    main()
