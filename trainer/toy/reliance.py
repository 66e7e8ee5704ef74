"""Sampling-free signals of SFT learning identity (design section 5.2), logged after every SFT chunk:

- reliance gap G = (L_swap - L_true) / L_true: the held-out flow loss with references of another identity versus
  the true ones (same target, noise and t; sigma in {0.3, 0.5, 0.7, 0.9}), on unseen identities. G > 0 means the
  model uses what the references show.
- one-step identity probe: x0_hat = x_t - sigma v at sigma = 0.8, decoded by the codec and scored by the
  evaluator (identity accuracy against the references' identity).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cache import Encoders, TensorCache
from ..common import add_noise, target_layout, train_segments
from ..data import IDGroupDataset, InstanceSpec
from ..sft import SFTBatcher, flow_matching_loss
from . import world as W
from .evaluator import ToyEvaluator, score_video

SIGMAS = (0.3, 0.5, 0.7, 0.9)


@dataclass
class HeldOut:
    """Pairs of held-out instances (unseen identities) with the same reference shapes and different identities."""

    batcher: SFTBatcher
    pairs: list[tuple[InstanceSpec, InstanceSpec]]
    identities: list[tuple[int, ...]]
    elements: list[W.Elements]


def held_out(dataset: IDGroupDataset, batcher_cfg, engine, n: int, world: W.WorldConfig) -> HeldOut:
    enc = Encoders(engine.vae, engine.text_encoder, TensorCache(None), torch.device("cpu"))
    batcher = SFTBatcher(batcher_cfg, dataset, enc, torch.device("cpu"))
    specs = [dataset.instance(i) for i in range(len(dataset))]
    pairs = []
    for a in specs:
        b = next((s for s in specs if s.key == a.key and s.group != a.group and s.index > a.index), None)
        if b is not None:
            pairs.append((a, b))
        if len(pairs) == n:
            break
    ids = W.identities(world)
    identities = [ids[int(dataset.groups[a.group].name.split("_")[1])] for a, _ in pairs]
    metas = [_elements(dataset, a) for a, _ in pairs]
    return HeldOut(batcher, pairs, identities, metas)


def _elements(dataset: IDGroupDataset, spec: InstanceSpec) -> W.Elements:
    import json

    folder = dataset.groups[spec.group].clips[spec.target_clip].path.parent
    clip = json.loads((folder / "meta.json").read_text())["clips"][spec.target_clip]
    return W.Elements(**clip["toy_elements"])


@torch.no_grad()
def reliance(dit, engine, held: HeldOut, evaluator: ToyEvaluator, world: W.WorldConfig) -> dict:
    """G (overall and per sigma) and the one-step probe's identity accuracy, for the DiT as it is (LoRA active)."""
    was = dit.training
    dit.eval()
    true_l, swap_l, probe = {s: [] for s in SIGMAS}, {s: [] for s in SIGMAS}, []
    for k, (a, b) in enumerate(held.pairs):
        x0, refs, text = held.batcher.features(a)
        _, refs_b, _ = held.batcher.features(b)
        g = torch.Generator().manual_seed(10_000 + k)
        eps = torch.randn(x0.shape, generator=g)
        for s in SIGMAS + (0.8,):
            sigma = torch.tensor([s])
            xt = add_noise(x0, eps, sigma)
            out = {}
            for name, r in (("true", refs), ("swap", refs_b)):
                if s == 0.8 and name == "swap":
                    continue
                sl = target_layout(engine.layout, engine.geometry, xt, r)
                out[name] = dit.forward_groups([xt, *r], sl.frame_starts, train_segments(sl, sigma * 1000), [text])
            if s == 0.8:
                x0_hat = xt - sigma.view(-1, 1, 1, 1, 1) * out["true"]
                pixels = engine.vae.decode(x0_hat)[0]  # [3, T, H, W]
                frames = ((pixels.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                probe.append(score_video(evaluator, frames, held.identities[k], held.elements[k], world)["id_acc"])
                continue
            true_l[s].append(float(flow_matching_loss(out["true"], x0, eps)))
            swap_l[s].append(float(flow_matching_loss(out["swap"], x0, eps)))
    dit.train(was)
    lt, ls = np.mean([np.mean(v) for v in true_l.values()]), np.mean([np.mean(v) for v in swap_l.values()])
    return {"gap": float((ls - lt) / lt), "loss_true": float(lt), "loss_swap": float(ls),
            **{f"gap_{s}": float((np.mean(swap_l[s]) - np.mean(true_l[s])) / np.mean(true_l[s])) for s in SIGMAS},
            "probe_id_acc": float(np.mean(probe)), "pairs": len(held.pairs)}


__all__ = ["HeldOut", "held_out", "reliance", "SIGMAS"]
