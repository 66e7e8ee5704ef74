"""The toy evaluator: a small CNN, trained on renders from its own seed before anything is generated, that scores
generated clips (design section 5.1). It never sees the DiT, so a score cannot flatter the model.

Input: one frame per latent frame at the effective resolution (`codec.effective_frames`: exact for codec output).
Heads: the identity attributes that vary in the world, the per-frame elements (background, shot, expression), the
head centre (regression; the action follows from its displacement) and "valid" (a clean sprite is present).
Negatives for "valid": pure noise, colour-tinted noise, a background only, two sprites blended, a heavily blurred
or heavily noised sprite. Section 1.2 of the design shows why: a naive sprite check called noise a sprite.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import world as W
from .codec import effective_frames


@dataclass(frozen=True)
class EvaluatorConfig:
    steps: int = 2500
    batch: int = 64
    lr: float = 3e-3
    seed: int = 1000  # renders from a seed the world (seed 0..) does not use
    gate_samples: int = 384  # per shot size
    gate_clean: float = 0.99
    gate_noisy: float = 0.95  # at noise sigma 0.1
    gate_invalid: float = 0.95  # pure noise and background-only frames marked invalid


def head_sizes(world: W.WorldConfig) -> dict[str, int]:
    """Classification heads: the identity attributes with more than one value, the elements, valid."""
    ids = {a: n for a, n in zip(W.ATTRIBUTES, world.counts) if n > 1}
    return {**ids, "background": len(W.BACKGROUNDS), "shot": len(W.SHOTS), "expression": len(W.EXPRESSIONS),
            "valid": 2}


class ToyEvaluator(nn.Module):
    """[N, 3, E, E] in [-1, 1] -> ({head: logits [N, n]}, centre [N, 2] in units of E)."""

    def __init__(self, world: W.WorldConfig):
        super().__init__()
        E = world.effective
        self.heads_n = head_sizes(world)
        self.features = nn.Sequential(  # position matters (centre, motion), so no global pooling
            nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
            nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * (E // 2) ** 2, 128), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in self.heads_n.items()})
        self.centre = nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        h = self.features(x)
        return {k: m(h) for k, m in self.heads.items()}, self.centre(h)


def fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _to_float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).float().permute(0, 3, 1, 2) / 127.5 - 1  # uint8 [N, E, E, 3] -> [N, 3, E, E]


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)


def render_valid(world: W.WorldConfig, rng: np.random.Generator, n: int, shot: int | None = None):
    """n clean sprites at random identities, elements and positions: (frames [n, 3, E, E], targets)."""
    E = world.effective
    ident = np.stack([rng.integers(c, size=n) for c in world.counts], 1)
    el = [W.random_elements(rng) for _ in range(n)]
    if shot is not None:
        el = [W.Elements(e.background, e.action, shot, e.expression) for e in el]
    r = np.array([W._RADIUS[W.SHOTS[e.shot]] * E for e in el])
    cx, cy = rng.uniform(r + 1.5, E - r - 1.5), rng.uniform(r + 1.5, E - r - 1.5)
    bg, sh, ex = (np.array([getattr(e, k) for e in el]) for k in ("background", "shot", "expression"))
    frames = _to_float(W.render_sprites(E, ident, bg, sh, ex, cx, cy))
    targets = {**{a: torch.from_numpy(ident[:, i]) for i, a in enumerate(W.ATTRIBUTES)},
               "background": torch.from_numpy(bg), "shot": torch.from_numpy(sh), "expression": torch.from_numpy(ex),
               "centre": torch.from_numpy(np.stack([cx, cy], 1) / E).float()}
    return frames, targets


def render_invalid(world: W.WorldConfig, rng: np.random.Generator, n: int, kind: int | None = None) -> torch.Tensor:
    """n frames without one clean sprite; kind 0 noise, 1 tinted noise, 2 background only, 3 two sprites
    blended, 4 heavy blur, 5 heavy noise on a sprite (None: a random mix)."""
    E = world.effective
    kinds = rng.integers(6, size=n) if kind is None else np.full(n, kind)
    a, _ = render_valid(world, rng, n)
    b, _ = render_valid(world, rng, n)
    g = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    noise = torch.randn(n, 3, E, E, generator=g)
    bg = torch.tensor(list(W.BACKGROUNDS.values()), dtype=torch.float32)[torch.from_numpy(rng.integers(6, size=n))]
    bg = (bg / 127.5 - 1)[:, :, None, None].expand(n, 3, E, E)
    sigma = torch.from_numpy(rng.uniform(0.3, 0.8, n)).float()[:, None, None, None]
    options = [noise.clamp(-1, 1) * 0.8, (bg + sigma * noise).clamp(-1, 1), (bg + 0.05 * noise).clamp(-1, 1),
               0.5 * (a + b), _blur(_blur(a, 5), 5), (a + (sigma + 0.2) * noise).clamp(-1, 1)]
    out = torch.stack(options)[torch.from_numpy(kinds), torch.arange(n)]
    return out


def augment(x: torch.Tensor, rng: np.random.Generator, max_sigma: float = 0.15) -> torch.Tensor:
    """Pixel noise sigma <= 0.15, slight blur on a fifth, +-5 % brightness; colours keep their class."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
    soft = torch.from_numpy(rng.random(n) < 0.2)[:, None, None, None]
    x = torch.where(soft, 0.85 * x + 0.15 * _blur(x, 3), x)
    x = (x + 1) * torch.from_numpy(rng.uniform(0.95, 1.05, n)).float()[:, None, None, None] - 1
    sigma = torch.from_numpy(rng.uniform(0, max_sigma, n)).float()[:, None, None, None]
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def train_evaluator(world: W.WorldConfig, cfg: EvaluatorConfig, log=print) -> ToyEvaluator:
    torch.manual_seed(cfg.seed)
    model = ToyEvaluator(world)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    rng = np.random.default_rng([cfg.seed, world.seed])
    n_bad = cfg.batch // 4
    for step in range(cfg.steps):
        good, t = render_valid(world, rng, cfg.batch - n_bad)
        x = augment(torch.cat([good, render_invalid(world, rng, n_bad)]), rng)
        logits, centre = model(x)
        n = good.shape[0]
        valid = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n_bad, dtype=torch.long)])
        loss = F.cross_entropy(logits["valid"], valid) + 10 * F.mse_loss(centre[:n], t["centre"])
        for k in model.heads_n:
            if k != "valid":
                loss = loss + F.cross_entropy(logits[k][:n], t[k])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            log(f"  evaluator step {step}: loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def gates(model: ToyEvaluator, world: W.WorldConfig, cfg: EvaluatorConfig) -> dict:
    """Accuracy per head and shot size on clean held-out renders and at noise 0.1, and the share of noise and
    background-only frames called invalid; `passed` is True when every gate holds."""
    rng = np.random.default_rng([cfg.seed + 1, world.seed])
    out: dict = {"clean": {}, "noisy": {}}
    for s, shot in enumerate(W.SHOTS):
        x, t = render_valid(world, rng, cfg.gate_samples, shot=s)
        g = torch.Generator().manual_seed(s)
        for name, inp in (("clean", x), ("noisy", (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1))):
            logits, _ = model(inp)
            acc = {k: float((logits[k].argmax(1) == (t[k] if k != "valid" else 1)).float().mean())
                   for k in model.heads_n}
            out[name][shot] = acc
    inv = torch.cat([render_invalid(world, rng, cfg.gate_samples // 2, kind=k) for k in (0, 1, 2)])
    out["invalid"] = float((model(inv)[0]["valid"].argmax(1) == 0).float().mean())
    worst_clean = min(v for d in out["clean"].values() for v in d.values())
    worst_noisy = min(v for d in out["noisy"].values() for v in d.values())
    out["worst_clean"], out["worst_noisy"] = worst_clean, worst_noisy
    out["passed"] = bool(worst_clean >= cfg.gate_clean and worst_noisy >= cfg.gate_noisy
                         and out["invalid"] >= cfg.gate_invalid)
    return out


@torch.no_grad()
def score_video(model: ToyEvaluator, frames: torch.Tensor, identity: tuple[int, ...], elements: W.Elements,
                world: W.WorldConfig) -> dict:
    """Scores of one generated clip (uint8 [T, H, W, 3]) against the identity it should show and the target
    elements. Averaged over latent frames; an invalid frame counts as wrong on every head."""
    x = effective_frames(frames)  # [F, 3, E, E]
    logits, centre = model(x)
    probs = {k: v.softmax(1) for k, v in logits.items()}
    valid = probs["valid"].argmax(1) == 1  # [F]
    p_valid = probs["valid"][:, 1]
    want = {**dict(zip(W.ATTRIBUTES, identity)), "background": elements.background, "shot": elements.shot,
            "expression": elements.expression}
    right = {k: (probs[k].argmax(1) == want[k]) & valid for k in probs if k != "valid"}
    soft = {k: probs[k][:, want[k]] * p_valid for k in probs if k != "valid"}
    id_heads = [a for a in W.ATTRIBUTES if a in probs]
    id_right = torch.stack([right[a] for a in id_heads]).float()  # [heads, F]
    E = world.effective
    d = (centre[1] - centre[0]) * E if x.shape[0] > 1 else torch.zeros(2)
    step = W.STEP * E
    if float(d.abs().max()) < 0.5 * step:
        action = W.ACTIONS.index("still")
    elif abs(float(d[0])) >= abs(float(d[1])):
        action = W.ACTIONS.index("moving right" if d[0] > 0 else "moving left")
    else:
        action = W.ACTIONS.index("moving down" if d[1] > 0 else "moving up")
    action_ok = float(action == elements.action and bool(valid.all()))
    elem = [right[k].float().mean() for k in W.ELEMENT_HEADS]
    # diagnostic only (in no rule): identity heads read even on frames the valid head rejects, so a mushy sprite
    # in the references' colours still shows whether identity transfers at all
    raw = torch.stack([probs[a].argmax(1) == want[a] for a in id_heads]).float()
    return {"valid": float(valid.float().mean()), "id_acc": float(id_right.mean()), "id_acc_raw": float(raw.mean()),
            **{f"raw_{a}": float(r.mean()) for a, r in zip(id_heads, raw)},
            "id_exact": float(id_right.prod(0).mean()),
            "id_score": float(torch.stack([soft[a] for a in id_heads]).mean()),
            "elem_acc": float((sum(elem) + action_ok) / (len(elem) + 1)),
            "elem_score": float(torch.stack([soft[k] for k in W.ELEMENT_HEADS]).mean() * 0.75 + 0.25 * action_ok),
            **{f"acc_{a}": float(right[a].float().mean()) for a in id_heads},
            "background_pred": int(probs["background"].argmax(1)[0])}


def chance_id_acc(world: W.WorldConfig) -> float:
    """Chance level of `id_acc`: the mean over the scored attributes of 1 / (number of values)."""
    n = [c for c in world.counts if c > 1]
    return float(np.mean([1 / c for c in n]))


__all__ = ["EvaluatorConfig", "ToyEvaluator", "train_evaluator", "gates", "score_video", "head_sizes",
           "render_valid", "render_invalid", "fingerprint", "chance_id_acc"]
