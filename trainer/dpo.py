"""Flow-DPO: human-centric preference tuning (AnyID section 4.4, eq. 3-4).

    anyid-rt train dpo dpo.toml

Starts from the SFT LoRA merged into the base weights (`anyid_rt.lora.merge_lora_`) and trains a fresh
LoRA on preference pairs. The reference model is the same network with the LoRA disabled (the merged SFT
weights), so no second copy of the weights is held. Winner and loser of a pair share the noise and the
timestep, as in Diffusion-DPO and the Flow-DPO code (yifan123/flow_grpo `train_sd3_dpo.py`).

Using the result: the DPO LoRA is a delta on top of base + SFT, so load both, in that order:
`Engine.from_pretrained(model, lora=[sft_lora, dpo_lora])`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..conditioning import LAYOUT_METADATA_KEY, ConditioningLayout
from ..config import TokenGeometry, parse_dtype
from ..engine import Engine
from ..lora import LoraWeights, merge_lora_, read_lora
from ..sampling import sample_training_timesteps
from . import dist as dist_utils
from .cache import Encoders, TensorCache
from .common import (GroupsForward, LoopResult, add_noise, build_engine, check_geometry, make_optimizer, start_run,
                     restore, run_loop, sample_seed, stack_refs, target_layout, train_segments, validate)
from .config import DPOConfig, to_dict
from .data import BatchPlan
from .lora import inject_lora, lora_disabled, lora_metadata, lora_parameters, save_trained_lora
from .pairs import PairDataset
from .preflight import Checks, check_dpo


def flow_dpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                  beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-DPO (AnyID eq. 3-4; Liu et al. 2025, arXiv 2501.13918; Diffusion-DPO, Wallace et al. 2023):

        S(z_t, t, c, theta) = ||v_theta(z_t, t, c) - v_t||^2 - ||v_ref(z_t, t, c) - v_t||^2          (4)
        L_Flow-DPO(theta) = -log sigmoid( -beta * ( S(z_t^+, t, c, theta) - S(z_t^-, t, c, theta) ) )   (3)

    z^+ is the winner, z^- the loser, noised with the same noise and t; v_t = eps - x0 is the velocity target.
    The inputs are per-pair squared errors, each the MEAN over the latent's elements [B] (a sum would scale
    the right beta by 1 / numel). Returns (mean loss, logits = -beta (S^+ - S^-) [B]); the logits are the
    implicit reward margin of each pair (winner minus loser) and `logits > 0` its implicit accuracy.
    With policy = reference (a fresh LoRA), S^+ = S^- = 0 and the loss is log 2.
    """
    s_w = policy_w - ref_w
    s_l = policy_l - ref_l
    logits = -beta * (s_w - s_l)
    return -F.logsigmoid(logits).mean(), logits


def load_sft_into(dit, lora: str | Path | LoraWeights) -> ConditioningLayout | None:
    """Merge an SFT LoRA (a file, or weights already read) into the base weights; returns the layout stored in
    it (None if absent)."""
    weights = lora if isinstance(lora, LoraWeights) else read_lora(lora)
    merge_lora_(dit, weights)
    if LAYOUT_METADATA_KEY in weights.metadata:
        return ConditioningLayout.from_json(weights.metadata[LAYOUT_METADATA_KEY])
    return None


def dpo_forward(model, dit, layout: ConditioningLayout, geometry: TokenGeometry, xw, xl, x0w, x0l, eps, t, refs, ctx):
    """Policy (LoRA on, with grad) and reference (LoRA off, no grad) squared errors of winner and loser,
    run as one batch of 2B each: returns (policy_w, policy_l, ref_w, ref_l), each [B]."""
    B = xw.shape[0]
    latents = torch.cat([xw, xl])
    refs2 = [torch.cat([r, r]) for r in refs]
    sl = target_layout(layout, geometry, latents, refs2)
    seg = train_segments(sl, torch.cat([t, t]))
    target = torch.cat([eps - x0w, eps - x0l])
    v = model([latents, *refs2], sl.frame_starts, seg, ctx + ctx)
    err = ((v.float() - target) ** 2).flatten(1).mean(1)
    with torch.no_grad(), lora_disabled(dit):  # through `model`: sharded as the policy pass is
        v_ref = model([latents, *refs2], sl.frame_starts, seg, ctx + ctx)
        ref_err = ((v_ref.float() - target) ** 2).flatten(1).mean(1)
    return err[:B], err[B:], ref_err[:B], ref_err[B:]


class DPOBatcher:
    def __init__(self, cfg: DPOConfig, data: PairDataset, enc: Encoders, device: torch.device, stage: str = "dpo"):
        self.cfg, self.data, self.enc, self.device, self.stage = cfg, data, enc, device, stage

    def __call__(self, indices: list[int], positions: list[int], step: int, micro: int, epoch: int):
        xw, xl, eps, sig, ts, rows, ctx = [], [], [], [], [], [], []
        for k, pos in zip(indices, positions):
            w, l_, refs, text = self.data.features(k, self.enc)
            g = torch.Generator().manual_seed(sample_seed(self.cfg.seed, self.stage, step, micro, pos))
            sigma, t = sample_training_timesteps(1, self.cfg.train_shift, generator=g)
            e = torch.randn(w.shape, generator=g).to(self.device)  # shared by winner and loser
            xw.append(w), xl.append(l_), eps.append(e), sig.append(sigma), ts.append(t), rows.append(refs)
            ctx.append(text)
        return (torch.cat(xw), torch.cat(xl), torch.cat(eps), torch.cat(sig).to(self.device),
                torch.cat(ts).to(self.device), stack_refs(rows), ctx)


@torch.no_grad()
def evaluate_dpo(dit, layout: ConditioningLayout, batcher: DPOBatcher, beta: float, draws: int = 4,
                 seed_offset: int = 10 ** 6) -> dict[str, float]:
    """Implicit accuracy and reward margin of the current LoRA against the reference (LoRA off) on every pair,
    over `draws` noise / timestep draws that training does not use (steps offset by `seed_offset`)."""
    logits = []
    geometry = TokenGeometry.of(dit.cfg, batcher.enc.vae.cfg)
    for d in range(draws):
        for k in range(len(batcher.data)):
            x0w, x0l, eps, sigma, t, refs, ctx = batcher([k], [0], seed_offset + d, 0, 0)
            model = GroupsForward(dit, isolated=layout.reference_attention == "isolated")
            pw, pl, rw, rl = dpo_forward(model, dit, layout, geometry, add_noise(x0w, eps, sigma),
                                         add_noise(x0l, eps, sigma), x0w, x0l, eps, t, refs, ctx)
            logits.append(flow_dpo_loss(pw, pl, rw, rl, beta)[1])
    z = torch.cat(logits)
    return {"accuracy": float((z > 0).float().mean()), "margin": float(z.mean()),
            "loss": float(-F.logsigmoid(z).mean())}


def build_dpo(cfg: DPOConfig, info: dist_utils.DistInfo, checks: Checks | None = None, engine: Engine | None = None):
    """Engine with the SFT LoRA merged and a fresh LoRA injected, the pair data and the batcher (after the
    config's checks, `preflight.check_dpo`, unless they are given). `engine`: a built base engine to use instead
    of the model cfg.model names (its DiT is changed in place)."""
    checks = checks or check_dpo(cfg, None if engine is None else engine.dit)
    engine = engine or build_engine(cfg.model, checks.dtype, info.device, cfg.layout)
    check_geometry(engine, cfg.model)
    if checks.sft_lora is not None:
        load_sft_into(engine.dit, checks.sft_lora)
    layout = engine.layout = checks.layout
    data = checks.pairs
    targets = inject_lora(engine.dit, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.seed)
    out = Path(cfg.output_dir)
    cache_dir = cfg.cache_dir or str(out / "cache")
    enc = Encoders(engine.vae, engine.text_encoder, TensorCache(cache_dir if cfg.cache else None), info.device)
    return engine, layout, data, DPOBatcher(cfg, data, enc, info.device), targets, checks.pairs_total


def train_dpo(cfg: DPOConfig, *, stop_after: int | None = None, engine: Engine | None = None) -> LoopResult:
    """Run (or resume) Flow-DPO; the LoRA lands in OUTPUT/lora.safetensors (apply it after the SFT LoRA).
    The config is checked completely before any model is loaded (`preflight.check_dpo`). `engine`: a built base
    engine instead of the model cfg.model names (the LoRA metadata then names it, `engine_name`)."""
    checks = check_dpo(cfg, None if engine is None else engine.dit)
    # the base's name is taken before the SFT merge changes the weights
    info, out, name = start_run(cfg, checks, "dpo", checks.pairs.skipped, engine)
    engine, layout, data, batcher, targets, total = build_dpo(cfg, info, checks, engine)
    dit = engine.dit
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    dit.train()
    model = dist_utils.wrap(GroupsForward(dit, dist_utils.sequence_parallel(dit, info),
                                          layout.reference_attention == "isolated"), info, cfg.sharding)
    optimizer, scheduler = make_optimizer(lora_parameters(dit), cfg.optim)
    state = checks.resume
    if state is not None:
        restore(state, dit, optimizer, scheduler, checks.resume_path)
    plan = BatchPlan(lambda k, e: data.specs[k].key, len(data), cfg.batch_size * info.data_world, cfg.seed)
    base = name + (f" + {Path(cfg.sft_lora).name}" if cfg.sft_lora else "")
    metadata = lora_metadata(dit, layout=layout, base_model=base, targets=cfg.lora.targets, stage="dpo",
                             extra={"anyid.dpo_beta": repr(cfg.beta),
                                    "anyid.apply_after": Path(cfg.sft_lora).name if cfg.sft_lora else ""})
    if info.is_main:
        print(f"  {len(data)} pairs ({total} in the file, {'Pareto-filtered' if cfg.pareto_filter else 'unfiltered'}), "
              f"beta {cfg.beta}, {len(targets)} LoRA modules (rank {cfg.lora.rank}), SFT LoRA: "
              f"{cfg.sft_lora or 'none'}, {info.world_size} process(es)"
              + (f", resuming from {checks.resume_path}" if state else ""), flush=True)

    def micro_step(indices, positions, step, micro, epoch):
        x0w, x0l, eps, sigma, t, refs, ctx = batcher(indices, positions, step, micro, epoch)
        pw, pl, rw, rl = dpo_forward(model, dit, layout, engine.geometry, add_noise(x0w, eps, sigma),
                                     add_noise(x0l, eps, sigma), x0w, x0l, eps, t, refs, ctx)
        loss, logits = flow_dpo_loss(pw, pl, rw, rl, cfg.beta)
        dpo = loss.detach()
        if cfg.sft_weight:
            loss = loss + cfg.sft_weight * pw.mean()
        return loss, {"loss": loss.detach(), "dpo_loss": dpo, "reward_margin": logits.detach().mean(),
                      "accuracy": (logits.detach() > 0).float().mean(), "mse_winner": pw.detach().mean(),
                      "mse_loser": pl.detach().mean(), "ref_mse_winner": rw.mean(), "ref_mse_loser": rl.mean()}

    save_dtype = parse_dtype(cfg.lora.save_dtype, "lora.save_dtype")

    def write_lora(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        save_trained_lora(dit, path, metadata, dtype=save_dtype, tensors=tensors)

    def validation(step: int) -> None:
        validate(engine, dit, layout, cfg.validation, cfg.buckets[0], out / "validation" / f"step_{step:08d}.mp4")

    try:
        return run_loop(cfg=cfg, info=info, dit=dit, model=model, plan=plan, micro_step=micro_step,
                        optimizer=optimizer, scheduler=scheduler,
                        metric_names=["loss", "dpo_loss", "reward_margin", "accuracy", "mse_winner", "mse_loser",
                                      "ref_mse_winner", "ref_mse_loser"],
                        write_lora=write_lora, final_lora=out / "lora.safetensors", resume_state=state,
                        validation=validation if cfg.validation.every else None, validate_every=cfg.validation.every,
                        max_grad_norm=cfg.optim.max_grad_norm, config_json=json.dumps(to_dict(cfg)),
                        stop_after=stop_after, progress_desc="dpo")
    finally:
        dit.gradient_checkpointing = False


__all__ = ["flow_dpo_loss", "train_dpo", "build_dpo", "evaluate_dpo", "dpo_forward", "DPOBatcher",
           "load_sft_into"]
