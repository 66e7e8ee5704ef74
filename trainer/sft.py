"""Supervised LoRA training of the omni-referenced model (AnyID section 4.2).

    anyid-rt train sft sft.toml          (torchrun --nproc_per_node N ... for data parallel)

Per sample: a target clip latent x0 (VAE), its references' latents (each encoded on its own, at t = 0), a
differential prompt. The references are placed in the token sequence per the conditioning layout
(`forward_groups`: target first, references with their own RoPE frame starts). With probability
`null_prob` every condition is nulled together: each reference becomes the latent of black pixels of the
same shape and the prompt becomes empty (the unconditional state of AnyID eq. 7).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import parse_dtype
from ..engine import Engine
from ..sampling import sample_training_timesteps
from . import dist as dist_utils
from .cache import Encoders, TensorCache
from .common import (GroupsForward, LoopResult, add_noise, build_engine, check_geometry, make_optimizer, start_run,
                     restore, run_loop, sample_seed, stack_refs, target_layout, train_segments, validate)
from .config import SFTConfig, to_dict
from .data import BatchPlan, IDGroupDataset, InstanceSpec
from .lora import inject_lora, lora_metadata, lora_parameters, save_trained_lora
from .preflight import check_sft


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss on the target tokens (AnyID eq. 6, Wan's convention):

        x_t = (1 - sigma) x0 + sigma eps,   L = mean || v_theta(x_t, y, t, c) - (eps - x0) ||^2

    `velocity` is the DiT output for the target group only (forward_groups drops the reference tokens), so
    the references never enter the loss. Mean over every element (= mean of per-sample means).
    """
    return torch.mean((velocity.float() - (eps - x0).float()) ** 2)


class SFTBatcher:
    """Turns instance indices into model inputs: cached latents and prompt embeddings, per-sample noise,
    timestep and null condition drawn from generators seeded by the sample's global position."""

    def __init__(self, cfg: SFTConfig, dataset: IDGroupDataset, encoders: Encoders, device: torch.device):
        self.cfg, self.dataset, self.enc, self.device = cfg, dataset, encoders, device
        self._empty = None

    def features(self, spec: InstanceSpec) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        ds = self.dataset
        x0 = self.enc.latent(ds.recipe(spec, None), lambda: ds.render_target(spec))
        refs = [self.enc.latent(ds.recipe(spec, r), lambda r=r: ds.render_reference(spec, r)) for r in spec.refs]
        return x0, refs, self.enc.text(spec.prompt)

    def empty_prompt(self) -> torch.Tensor:
        if self._empty is None:
            self._empty = self.enc.text("")
        return self._empty

    def __call__(self, indices: list[int], positions: list[int], step: int, micro: int, epoch: int):
        cfg = self.cfg
        specs = [self.dataset.instance(i, epoch) for i in indices]
        x0s, eps, sig, ts, refs_rows, ctx, nulls = [], [], [], [], [], [], []
        for spec, pos in zip(specs, positions):
            x0, refs, text = self.features(spec)
            g = torch.Generator().manual_seed(sample_seed(cfg.seed, "sft", step, micro, pos))
            sigma, t = sample_training_timesteps(1, cfg.train_shift, generator=g)
            null = bool(torch.rand(1, generator=g).item() < cfg.null_prob)
            e = torch.randn(x0.shape, generator=g).to(self.device)
            if null:  # every condition nulled together: black-pixel references and the empty prompt
                _, h, w = spec.bucket
                refs = [self.enc.null_latent((3, len(r.frames), h, w)) for r in spec.refs]
                text = self.empty_prompt()
            x0s.append(x0), eps.append(e), sig.append(sigma), ts.append(t), refs_rows.append(refs)
            ctx.append(text), nulls.append(null)
        x0 = torch.cat(x0s)
        e = torch.cat(eps)
        sigma, t = torch.cat(sig).to(self.device), torch.cat(ts).to(self.device)
        refs = stack_refs(refs_rows)
        return x0, e, sigma, t, refs, ctx, nulls


def train_sft(cfg: SFTConfig, *, stop_after: int | None = None, dataset: IDGroupDataset | None = None,
              engine: Engine | None = None) -> LoopResult:
    """Run (or resume) SFT; returns the per-step history and the final LoRA path (OUTPUT/lora.safetensors).

    The config is checked completely first (`preflight.check_sft`: paths, packages, device, resume), so a
    bad setting stops the run before any model is loaded. `stop_after=k` stops after step k as if the run
    were interrupted there (used to test resume). `dataset` may be given to reuse one already built (its
    settings must match cfg.data). `engine` replaces the model cfg.model names (e.g. the toy identity world's,
    `anyid_rt.trainer.toy`); its DiT receives the LoRA, and the LoRA metadata names it (`engine_name`).
    """
    checks = check_sft(cfg, dataset, None if engine is None else engine.dit)
    info, out, base_model = start_run(cfg, checks, "sft", checks.dataset.skipped, engine)
    engine = engine or build_engine(cfg.model, checks.dtype, info.device, cfg.layout)
    check_geometry(engine, cfg.model)
    dit = engine.dit
    dataset = checks.dataset
    targets = inject_lora(dit, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.seed)
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    dit.train()
    cache_dir = cfg.data.cache_dir or str(out / "cache")
    encoders = Encoders(engine.vae, engine.text_encoder, TensorCache(cache_dir if cfg.data.cache else None),
                        info.device)
    batcher = SFTBatcher(cfg, dataset, encoders, info.device)
    model = dist_utils.wrap(GroupsForward(dit, dist_utils.sequence_parallel(dit, info),
                                          cfg.layout.reference_attention == "isolated"), info, cfg.sharding)
    optimizer, scheduler = make_optimizer(lora_parameters(dit), cfg.optim)
    state = checks.resume
    if state is not None:
        restore(state, dit, optimizer, scheduler, checks.resume_path)
    plan = BatchPlan(lambda i, e: dataset.instance(i, e).key, len(dataset), cfg.batch_size * info.data_world,
                     cfg.seed)
    layout, geometry = cfg.layout, engine.geometry
    metadata = lora_metadata(dit, layout=layout, base_model=base_model, targets=cfg.lora.targets, stage="sft",
                             extra={"anyid.similarity": dataset.similarity.name,
                                    "anyid.null_prob": repr(cfg.null_prob), "anyid.train_shift": repr(cfg.train_shift)})
    if info.is_main:
        print(f"  {len(targets)} LoRA modules (rank {cfg.lora.rank}, alpha {cfg.lora.alpha}), "
              f"{len(lora_parameters(dit)) // 2} x 2 tensors, {info.world_size} process(es)"
              + (f", resuming from {checks.resume_path}" if state else ""), flush=True)

    def micro_step(indices, positions, step, micro, epoch):
        x0, eps, sigma, t, refs, ctx, nulls = batcher(indices, positions, step, micro, epoch)
        xt = add_noise(x0, eps, sigma)
        sl = target_layout(layout, geometry, xt, refs)
        v = model([xt, *refs], sl.frame_starts, train_segments(sl, t), ctx)
        loss = flow_matching_loss(v, x0, eps)
        return loss, {"loss": loss.detach(), "null_fraction": torch.tensor(sum(nulls) / len(nulls)),
                      "sigma": sigma.mean()}

    save_dtype = parse_dtype(cfg.lora.save_dtype, "lora.save_dtype")

    def write_lora(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        save_trained_lora(dit, path, metadata, dtype=save_dtype, tensors=tensors)

    def validation(step: int) -> None:
        validate(engine, dit, layout, cfg.validation, cfg.data.buckets[0], out / "validation" / f"step_{step:08d}.mp4")

    try:
        return run_loop(cfg=cfg, info=info, dit=dit, model=model, plan=plan, micro_step=micro_step,
                        optimizer=optimizer, scheduler=scheduler, metric_names=["loss", "null_fraction", "sigma"],
                        write_lora=write_lora, final_lora=out / "lora.safetensors", resume_state=state,
                        validation=validation if cfg.validation.every else None,
                        validate_every=cfg.validation.every, max_grad_norm=cfg.optim.max_grad_norm,
                        config_json=json.dumps(to_dict(cfg)), stop_after=stop_after, progress_desc="sft")
    finally:
        dit.gradient_checkpointing = False


__all__ = ["train_sft", "flow_matching_loss", "SFTBatcher"]
