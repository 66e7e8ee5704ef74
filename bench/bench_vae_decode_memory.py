"""Peak memory of a full-size Wan2.2 VAE decode at 1280x704 on the CPU (fp32), 2 latent frames (1 + 4 output
frames): the second chunk is the steady state every later chunk repeats, so its peak is the decode's peak
apart from the output buffer (121 frames x 3 x 704 x 1280 x 4 B = 1.31 GB, not included). CPU convolutions
use their own workspaces, so a GPU figure (bench/bench_vae.py) will differ.

Run: python bench/bench_vae_decode_memory.py none        (untiled)
     python bench/bench_vae_decode_memory.py 22,40,8     (2x2 tiles of 22x40 latent pixels, overlap 8)
Appends to bench/results/vae_decode_memory.jsonl. Takes ~15-20 min per run on 2 CPU cores.
"""
import json, subprocess, sys, time, threading
from pathlib import Path

import torch
from anyid_rt.config import VAEConfig
from anyid_rt.models.random_weights import random_vae
from anyid_rt.models.vae import VAETiling

tile = sys.argv[1] if len(sys.argv) > 1 else "none"
torch.set_num_threads(2)
vae = random_vae(VAEConfig(), seed=0)
weights_gb = sum(p.numel() * 4 for p in vae.parameters()) / 1e9
peak = [0]
def sample():
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.2)
base = peak[0]
z = torch.randn(1, 48, 2, 44, 80)
t0 = time.time()
with torch.inference_mode():
    out = vae.decode(z, tile=None if tile == "none" else VAETiling.of(tuple(int(v) for v in tile.split(","))))
sec = time.time() - t0
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                        cwd=Path(__file__).parent).stdout.strip()
row = dict(bench="vae_decode_memory", device="cpu", dtype="fp32", tile=tile, out_shape=list(out.shape),
           weights_gb=round(weights_gb, 2), base_anon_gb=round(base / 1e9, 2), peak_anon_gb=round(peak[0] / 1e9, 2),
           activation_peak_gb=round((peak[0] - base) / 1e9, 2), seconds=round(sec, 1), torch=torch.__version__,
           commit=commit, date=time.strftime("%Y-%m-%d %H:%M:%S"))
print(json.dumps(row))
with open(Path(__file__).parent / "results" / "vae_decode_memory.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
