"""Peak memory of a full-size Wan2.2 VAE decode at 1280x704 on the CPU (fp32), 2 latent frames (1 + 4 output
frames): the second chunk is the steady state every later chunk repeats, so its peak is the decode's peak
apart from the output buffer (121 frames x 3 x 704 x 1280 x 4 B = 1.31 GB, not included). CPU convolutions
use their own workspaces, so a GPU figure (bench/bench_vae.py) will differ.

Run: python bench/bench_vae_decode_memory.py none        (untiled; or python -m anyid_rt.bench.bench_vae_decode_memory)
     python bench/bench_vae_decode_memory.py 22,40,8     (2x2 tiles of 22x40 latent pixels, overlap 8)
Appends to bench/results/vae_decode_memory.jsonl. Takes ~15-20 min per run on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from anyid_rt.bench.timing import RESULTS, AnonPeak, append_jsonl, environment
from anyid_rt.config import VAEConfig
from anyid_rt.models.random_weights import random_vae
from anyid_rt.models.vae_tiling import VAETiling


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tile", nargs="?", default="none", help="none, or tile_h,tile_w,overlap in latent pixels")
    tile = ap.parse_args(argv).tile
    torch.set_num_threads(2)
    vae = random_vae(VAEConfig(), seed=0)
    weights_gb = sum(p.numel() * 4 for p in vae.parameters()) / 1e9
    z = torch.randn(1, 48, 2, 44, 80)
    tiling = None if tile == "none" else VAETiling.of(tuple(int(v) for v in tile.split(",")))
    with torch.inference_mode(), AnonPeak(interval=0.05) as anon:
        t0 = time.perf_counter()  # one decode of ~15 minutes: a single wall-clock reading
        out = vae.decode(z, tile=tiling)
        seconds = time.perf_counter() - t0
    row = dict(bench="vae_decode_memory", tile=tile, out_shape=list(out.shape), weights_gb=round(weights_gb, 2),
               base_anon_gb=round(anon.base_bytes / 1e9, 2), peak_anon_gb=round(anon.peak_bytes / 1e9, 2),
               activation_peak_gb=round((anon.peak_bytes - anon.base_bytes) / 1e9, 2), seconds=round(seconds, 1),
               dtype="fp32", **environment("cpu"))
    print(json.dumps(row))
    append_jsonl(RESULTS / "vae_decode_memory.jsonl", [row])
    return row


if __name__ == "__main__":
    main()
