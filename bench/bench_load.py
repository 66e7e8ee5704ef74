"""Memory check for loading the full-size DiT: write a random Wan2.2-TI2V-5B checkpoint in the original
sharded layout (fp32, 3 shards + index json + config.json, about 20 GB), load it with `load_dit` in bf16
on the CPU, and report load time, peak RSS and peak anonymous memory. RSS counts the file pages of the mmapped shards
that were touched (clean page cache the kernel can drop); anonymous memory is what loading really holds,
and it should equal the bf16 weights (~10 GB): no second full-size copy.

Not run in CI (it needs ~20 GB of disk and ~11 GB of memory):
    python bench/bench_load.py --dir /tmp/wan5b            # writes once, then loads
    python -m anyid_rt.bench.bench_load --dir /tmp/wan5b   # the same
    python bench/bench_load.py --dir /tmp/wan5b --keep     # keep the checkpoint for later runs
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from anyid_rt.bench.timing import RESULTS, AnonPeak, append_jsonl, environment
from anyid_rt.config import DiTConfig
from anyid_rt.models import WanDiT, load_dit


def write_random_checkpoint(folder: Path, shards: int = 3) -> None:
    cfg = DiTConfig.preset("wan2.2-ti2v-5b")
    with torch.device("meta"):
        model = WanDiT(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    keys = list(shapes)
    per = -(-len(keys) // shards)
    weight_map = {}
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in tqdm(range(shards), desc="writing shards"):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
        del part
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "ti2v", "dim": cfg.dim, "eps": cfg.eps, "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers, "text_len": cfg.text_len}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/anyid_wan5b_random"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    args = ap.parse_args()
    if not (args.dir / "config.json").exists():
        write_random_checkpoint(args.dir)
    size_gb = sum(f.stat().st_size for f in args.dir.iterdir()) / 1e9
    with AnonPeak() as anon:
        t0 = time.perf_counter()
        model = load_dit(args.dir, dtype=args.dtype, device="cpu", backend="torch")
        seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    param_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    record = dict(bench="load_dit", checkpoint_gb=round(size_gb, 2), dtype=args.dtype, params=params,
                  model_gb=round(param_gb, 2), load_s=round(seconds, 1),
                  peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
                  peak_anon_gb=round(anon.peak_bytes / 1e9, 2), **environment("cpu"))
    print(json.dumps(record, indent=2))
    append_jsonl(RESULTS / "load.jsonl", [record])
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
