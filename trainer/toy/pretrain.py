"""Base pretraining: text to video, full parameters, no references (design section 4.2, stage 2).

The trainer is LoRA-only, so the toy needs its own small loop for the base; it reuses the trainer's pieces:
`sample_training_timesteps`, `add_noise`, `flow_matching_loss`, `target_layout` / `train_segments`,
`make_optimizer` (with a cosine decay added here) and `sample_seed`. Clips are rendered on the fly in vectorised
batches (unlimited data, no video decoding) from the training identities only, and encoded by `ToyCodec`. The
prompt is dropped with p = 0.1 so that classifier-free guidance has an unconditional model. The result is
written with `save_dit` (original layout) and read back by `load_dit` in every later stage.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ...config import DiTConfig
from ...models.dit_loader import save_dit
from ...sampling import sample_training_timesteps
from ..common import add_noise, make_optimizer, sample_seed, target_layout, train_segments
from ..config import OptimConfig
from ..prompts import format_prompt
from ..sft import flow_matching_loss
from . import world as W
from .model import toy_defaults, toy_engine


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 6000
    batch: int = 16
    lr: float = 1e-3
    final_lr: float = 1e-4  # cosine decay from lr to final_lr after the warm-up
    warmup: int = 100
    shift: float = 1.0  # train shift; 1-2 at this resolution (section 1.2: shift 3 under-trains low noise)
    drop_prompt: float = 0.1
    seed: int = 0
    probe_every: int = 0  # calibration: call `probe(engine, step)` every N steps (0: never)


def cosine_schedule(optimizer, cfg: PretrainConfig):
    """Linear warm-up, then cosine from lr to final_lr over the remaining steps."""
    def factor(s: int) -> float:
        if s < cfg.warmup:
            return (s + 1) / cfg.warmup
        p = min(1.0, (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return (cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * p))) / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_batch(world: W.WorldConfig, train_ids: list[int], rng: np.random.Generator, n: int):
    """n random clips of training identities: (pixels [n, 3, T, H, W] in [-1, 1], prompts)."""
    ids = W.identities(world)
    ident = np.array([ids[i] for i in rng.choice(train_ids, n)])
    el = [W.random_elements(rng) for _ in range(n)]
    starts = np.array([W.start_position(rng, e, world.effective) for e in el])
    clips = W.render_clips(world, ident, el, starts)  # uint8 [n, T, H, W, 3]
    pixels = torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3) / 127.5 - 1
    return pixels, [format_prompt(e.description()) for e in el]


def pretrain(world: W.WorldConfig, dit_cfg: DiTConfig, cfg: PretrainConfig, out: str | Path,
             probe: Callable | None = None, log: Callable[[str], None] = print) -> dict:
    """Train the base from random weights; writes OUT/base (save_dit) and OUT/log.csv. Returns loss summaries."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = toy_engine(dit_cfg, toy_defaults(world.size, world.frames, cfg.shift), seed=cfg.seed)
    dit, codec, te = engine.dit, engine.vae, engine.text_encoder
    dit.requires_grad_(True).train()
    train_ids, _ = W.split(world)
    embeds: dict[str, torch.Tensor] = {}  # the frozen text encoder's output per prompt (180 distinct prompts)

    def embed(p: str) -> torch.Tensor:
        if p not in embeds:
            embeds[p] = te.encode(p)[0].float()
        return embeds[p]

    optimizer, _ = make_optimizer(list(dit.parameters()), OptimConfig(lr=cfg.lr, weight_decay=0.0))
    scheduler = cosine_schedule(optimizer, cfg)
    losses = []
    t0 = time.perf_counter()
    with open(out / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr", "seconds"])
        for step in range(cfg.steps):
            rng = np.random.default_rng([cfg.seed, step])
            pixels, prompts = training_batch(world, train_ids, rng, cfg.batch)
            g = torch.Generator().manual_seed(sample_seed(cfg.seed, "pretrain", step))
            with torch.no_grad():
                x0 = codec.encode(pixels)  # [B, 48, F, h, w]
            sigma, t = sample_training_timesteps(cfg.batch, cfg.shift, generator=g)
            eps = torch.randn(x0.shape, generator=g)
            drop = torch.rand(cfg.batch, generator=g) < cfg.drop_prompt
            ctx = [embed("" if d else p) for p, d in zip(prompts, drop.tolist())]
            xt = add_noise(x0, eps, sigma)
            sl = target_layout(engine.layout, engine.geometry, xt, [])
            loss = flow_matching_loss(dit.forward_groups([xt], sl.frame_starts, train_segments(sl, t), ctx), x0, eps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
                w.writerow([step + 1, f"{np.mean(losses[-25:]):.5f}", f"{scheduler.get_last_lr()[0]:.3g}",
                            f"{time.perf_counter() - t0:.1f}"])
                f.flush()
            if (step + 1) % 500 == 0:
                log(f"  pretrain step {step + 1}/{cfg.steps}: loss {np.mean(losses[-100:]):.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
            if probe is not None and cfg.probe_every and (step + 1) % cfg.probe_every == 0:
                dit.eval()
                probe(engine, step + 1)
                dit.train()
    dit.eval().requires_grad_(False)
    save_dit(dit, out / "base", layout="original")
    k = min(50, max(1, len(losses) // 4))
    return {"steps": cfg.steps, "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "seconds": time.perf_counter() - t0, "step_ms": 1000 * (time.perf_counter() - t0) / cfg.steps}


__all__ = ["PretrainConfig", "pretrain", "training_batch", "cosine_schedule"]
