"""What SFT and Flow-DPO share: the model, the optimizer, the loop, checkpoints, logs and validation.

The loop (`run_loop`) is the same for both: it walks a `BatchPlan` of global micro-batches from a saved
position, takes this process's slice, calls the stage's `micro_step` (which returns a loss and detached
metrics), accumulates gradients (DDP syncs on the last micro-batch only), clips, steps AdamW and the
scheduler, logs, writes atomic checkpoints and validation videos.

Exact resume. Every random draw of a sample (timestep, noise, null condition) comes from a generator seeded
by (seed, stage, step, micro-batch, position in the global batch), and the data order is a pure function of
(seed, epoch). A checkpoint holds the LoRA, AdamW and scheduler state, the RNG states (torch, CUDA, numpy,
python) and the data position, so a run interrupted after checkpoint k and resumed computes bit for bit what
the uninterrupted run computes (on a CPU; GPU kernels may not be deterministic).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..conditioning import ConditioningLayout, StepLayout
from ..reference_kv import isolated_forward
from ..config import TokenGeometry
from ..engine import Engine
from ..files import atomic_path, write_text_atomic
from ..models.dit import Segments, WanDiT
from . import dist as dist_utils
from .cache import module_fingerprint
from .config import ConfigError, ModelSource, OptimConfig, RunConfig, ValidationConfig, to_dict
from .data import BatchPlan
from .lora import load_lora_state_dict_, lora_parameters, lora_state_dict

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
SHARDS_DIR = "shards"  # sharding = "fsdp": the distributed checkpoint (LoRA and AdamW shards) in a checkpoint


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

def check_precision(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The base weights' dtype for a run; bf16 needs CUDA (no silent fp32 fallback)."""
    if mixed_precision == "bf16":
        if device.type != "cuda":
            raise ValueError(f"mixed_precision = \"bf16\" needs a CUDA device (the run is on {device}); "
                             "set mixed_precision = \"fp32\" to train on the CPU")
        return torch.bfloat16
    return torch.float32


def build_engine(src: ModelSource, dtype: torch.dtype, device: torch.device,
                 layout: ConditioningLayout | None) -> Engine:
    """The engine (DiT + VAE + text encoder) a run trains on: a preset with random weights or a model folder.
    Base weights are stored in `dtype` except the layers Wan keeps in fp32 (norms, modulation, time embedding,
    head)."""
    if src.preset is not None:
        return Engine.tiny(seed=src.seed or 0, device=device, backend=src.backend, layout=layout, dtype=dtype,
                           text_encoder_device=src.text_encoder_device)
    return Engine.from_pretrained(src.path, dtype=dtype, backend=src.backend, device=device,
                                  text_encoder_device=src.text_encoder_device, layout=layout)


def engine_name(engine: Engine) -> str:
    """The base model's name in LoRA metadata when a run is handed a built engine instead of `ModelSource`: its
    DiT's size and a fingerprint of its weights (taken before any LoRA is injected), so a LoRA names the weights
    it was trained on."""
    c = engine.dit.cfg
    return f"dit(dim={c.dim}, layers={c.num_layers}, weights={module_fingerprint(engine.dit)})"


def check_geometry(engine: Engine, src: ModelSource) -> None:
    """The loaded model cuts pixels into tokens as the config's sizes were checked for (`ModelSource.geometry`)."""
    if engine.geometry != src.geometry:
        raise ConfigError("model.path", f"this model's geometry {engine.geometry} is not Wan2.2-TI2V-5B's "
                          f"{src.geometry}, which the trainer's sizes were checked against", src.path)


def start_run(cfg: RunConfig, checks, stage: str, skipped: Sequence[str],
              engine: Engine | None) -> tuple[dist_utils.DistInfo, Path, str]:
    """What SFT and DPO do once their config is checked (`checks`, preflight.Checks): join the process group; on
    the main process print the run's line and the first inputs skipped, and write OUTPUT/config.json. Returns
    (the process group, the output folder, the base model's name for the LoRA metadata: cfg.model's, or the
    handed engine's)."""
    info = dist_utils.init_distributed(cfg.model.device, cfg.sequence_parallel)
    out = Path(cfg.output_dir)
    if info.is_main:
        print(checks.summary(cfg, stage), flush=True)
        for s in skipped[:5]:
            print(f"  skipped: {s}")
        write_text_atomic(out / "config.json", json.dumps(to_dict(cfg), indent=2))
    return info, out, cfg.model.name if engine is None else engine_name(engine)


class GroupsForward(nn.Module):
    """`dit.forward_groups` as a module's forward, so that DistributedDataParallel can wrap it. `sequence`: the
    same call sharded over a sequence-parallel group (`dist.sequence_parallel`); `isolated`: the layout's isolated
    reference attention (anyid_rt/reference_kv.py), trained as the engine runs it. The trainer's preflight refuses
    the two together."""

    def __init__(self, dit: WanDiT, sequence=None, isolated: bool = False):
        super().__init__()
        self.dit, self.sequence, self.isolated = dit, sequence, isolated

    def forward(self, latents: list[torch.Tensor], frame_starts: list[int], segments: Segments,
                context: list[torch.Tensor]) -> torch.Tensor:
        if self.isolated and len(latents) > 1:
            return isolated_forward(self.dit, latents, frame_starts, segments, context)
        # looked up per call: FSDP2 wraps dit.forward_groups after this module is built
        run = self.dit.forward_groups if self.sequence is None else self.sequence.forward_groups
        return run(latents, frame_starts, segments, context)


def target_layout(layout: ConditioningLayout, geometry: TokenGeometry, target: torch.Tensor,
                  refs: list[torch.Tensor]) -> StepLayout:
    """Token layout of [noisy target [B, C, F, h, w], references...] (no image-to-video frame)."""
    return StepLayout.build(layout, geometry, target.shape[2:], [r.shape[2] for r in refs], image_mode=False)


def train_segments(sl: StepLayout, t: torch.Tensor) -> Segments:
    """Per-sample timesteps: the target's t [B], the references' 0 (AnyID section 4.2)."""
    cols = [t.float()] + ([torch.zeros_like(t, dtype=torch.float32)] if sl.ref_tokens else [])
    return Segments(sl.seg_lens, torch.stack(cols, dim=1))


def sample_seed(*parts) -> int:
    """A 63-bit seed from any hashable description (e.g. seed, stage, step, micro-batch, position)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified-flow forward process x_t = (1 - sigma) x0 + sigma eps (sigma [B], broadcast)."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - s) * x0 + s * eps


# ---------------------------------------------------------------------------------------------------------
# Optimizer, RNG, checkpoints, logs
# ---------------------------------------------------------------------------------------------------------

def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig):
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    warm = cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove_dir(path: Path) -> None:
    """Rename a folder out of the way, then delete it: an interrupted delete leaves no half checkpoint under a
    name that resume would pick."""
    gone = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


class Checkpoints:
    """`OUTPUT/checkpoints/step_00000100/{state.pt, lora.safetensors}`; `OUTPUT/checkpoints/latest` names the
    newest. A checkpoint folder is written under a temporary name and renamed into place (os.replace), and
    `latest` is replaced atomically, so a crash or Ctrl-C mid-write never leaves a half checkpoint that resume
    picks (and the temporary folder is removed)."""

    def __init__(self, output_dir: str | Path, keep: int = 3):
        self.dir = Path(output_dir) / CHECKPOINT_DIR
        self.keep = keep

    def save(self, step: int, state: dict, write_lora: Callable[[Path], None]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".step_{step:08d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            torch.save(state, tmp / "state.pt")
            write_lora(tmp / "lora.safetensors")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._publish(tmp, final)

    def save_sharded(self, step: int, state: dict, write_lora: Callable[[Path], None],
                     write_shards: Callable[[Path], None], info: dist_utils.DistInfo) -> Path:
        """`save` for a sharded run, called by every rank: each writes its shards (`write_shards`, into
        SHARDS_DIR) into one temporary folder, then rank 0 adds `state` (no tensors of the LoRA or optimizer)
        and the whole LoRA file and renames the folder into place."""
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".step_{step:08d}.tmp"  # one name for every rank (no pid)
        if info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        dist_utils.barrier(info)
        write_shards(tmp / SHARDS_DIR)
        dist_utils.barrier(info)
        if info.is_main:
            torch.save(state, tmp / "state.pt")
            write_lora(tmp / "lora.safetensors")
            self._publish(tmp, final)
        dist_utils.barrier(info)
        return final

    def _publish(self, tmp: Path, final: Path) -> Path:
        """Rename a written checkpoint folder into place, point `latest` at it and drop the oldest."""
        if final.exists():  # the same step again (a resumed run re-saving): replace it whole
            _remove_dir(final)
        os.replace(tmp, final)
        write_text_atomic(self.dir / LATEST_FILE, final.name + "\n")
        done = sorted(p for p in self.dir.glob("step_*") if p.is_dir())
        for old in done[:-self.keep]:
            _remove_dir(old)
        return final

    def latest(self) -> Path | None:
        f = self.dir / LATEST_FILE
        if f.is_file():
            p = self.dir / f.read_text().strip()
            if (p / "state.pt").is_file():
                return p
        done = sorted(p for p in self.dir.glob("step_*") if (p / "state.pt").is_file())
        return done[-1] if done else None

    @staticmethod
    def load(path: str | Path) -> dict:
        path = Path(path)
        f = path / "state.pt" if path.is_dir() else path
        if not f.is_file():
            raise FileNotFoundError(f"no checkpoint state at {f}")
        return torch.load(f, map_location="cpu", weights_only=True)


class MetricLog:
    """CSV log (`OUTPUT/log.csv`, one row per logged step) and, optionally, TensorBoard (`OUTPUT/tb`).
    On resume, rows after the resumed step (written before the interruption) are dropped."""

    def __init__(self, output_dir: str | Path, fields: list[str], resume_step: int | None, tensorboard: bool):
        self.path = Path(output_dir) / "log.csv"
        self.fields = ["step", "epoch", "lr", "grad_norm", "seconds"] + fields
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_path(self.path) as tmp:  # the kept rows (or just the header) replace the old log whole
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        self._f = open(self.path, "a", newline="")  # each row is appended and flushed whole
        self._w = csv.DictWriter(self._f, fieldnames=self.fields, extrasaction="ignore")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard = true needs the tensorboard package (pip install tensorboard); "
                                  "the CSV log needs nothing") from e
            self.tb = SummaryWriter(str(Path(output_dir) / "tb"))

    def write(self, row: dict) -> None:
        self._w.writerow(row)
        self._f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_log(output_dir: str | Path) -> list[dict]:
    with open(Path(output_dir) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------

def validate(engine: Engine, dit: WanDiT, layout: ConditioningLayout, cfg: ValidationConfig,
             default_size: tuple[int, int, int], path: Path) -> Path:
    """A video from the in-memory model (LoRA active) through the engine, written to `path`."""
    f, h, w = default_size
    val = Engine(dit, engine.vae, engine.text_encoder, layout=layout, defaults=engine.defaults, device=engine.device)
    was_training = dit.training
    dit.eval()
    try:
        with atomic_path(path) as tmp:
            val.generate(cfg.prompt, references=list(cfg.references), primary=cfg.primary,
                         height=cfg.height or h, width=cfg.width or w, num_frames=cfg.num_frames or f,
                         steps=cfg.steps, guidance=cfg.guidance, shift=cfg.shift, seed=cfg.seed, output=tmp,
                         progress=False)
    finally:
        dit.train(was_training)  # the DiT builds its RoPE tables outside inference mode, so reuse is safe
    return path


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

@dataclass
class LoopResult:
    """What a run returns: final step, per-step metrics (this process's view, averaged over processes),
    the output folder and the final LoRA file (None when the run stopped early)."""

    step: int
    history: list[dict] = field(default_factory=list)
    output_dir: Path | None = None
    lora_path: Path | None = None
    checkpoint: Path | None = None
    lora_state: dict[str, torch.Tensor] = field(default_factory=dict)  # final LoRA tensors (CPU copies)


MicroStep = Callable[[list[int], list[int], int, int, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def run_loop(*, cfg: RunConfig, info: dist_utils.DistInfo, dit: WanDiT, model: nn.Module, plan: BatchPlan,
             micro_step: MicroStep, optimizer, scheduler, metric_names: list[str],
             write_lora: Callable[[Path, dict[str, torch.Tensor]], None], final_lora: Path, resume_state: dict | None,
             validation: Callable[[int], None] | None, validate_every: int, max_grad_norm: float, config_json: str,
             stop_after: int | None = None, progress_desc: str = "train") -> LoopResult:
    """The shared training loop. `micro_step(indices, positions, step, micro, epoch)` computes the mean loss
    of this process's slice of a global micro-batch (positions: each sample's place in the global batch).
    `write_lora(path, tensors)` writes the whole LoRA `tensors` (gathered from every rank when sharded)."""
    params = lora_parameters(dit)
    sharded = cfg.sharding == "fsdp"  # distributed checkpoints (also on one process: they load at any count)
    step, epoch, index = 0, 0, 0
    if resume_state is not None:
        step, (epoch, index) = resume_state["step"], resume_state["position"]
    ckpt = Checkpoints(cfg.output_dir, cfg.keep_checkpoints)
    log = MetricLog(cfg.output_dir, metric_names, step if resume_state else None, cfg.tensorboard) \
        if info.is_main else None
    result = LoopResult(step, output_dir=Path(cfg.output_dir))
    it = plan.iterate(epoch, index)
    per_rank = cfg.batch_size
    accum = cfg.accumulation(info.data_world)  # grad_accum, or what reaches effective_batch (default 64)
    window: list[dict] = []
    bar = tqdm(total=cfg.max_steps, initial=step, desc=progress_desc, disable=not (cfg.progress and info.is_main))
    t0 = time.perf_counter()
    try:
        while step < cfg.max_steps:
            sums: dict[str, float] = {}
            for micro in range(accum):
                epoch, index, batch = next(it)
                lo = info.data_rank * per_rank  # a sequence group's ranks share one slice
                mine, positions = batch[lo:lo + per_rank], list(range(lo, lo + per_rank))
                with dist_utils.no_sync(model, sync=micro == accum - 1):
                    loss, metrics = micro_step(mine, positions, step, micro, epoch)
                    (loss * info.sequence / accum).backward()  # x S: see dist.sequence_parallel
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / accum
            grad_norm = dist_utils.grad_norm(params, max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            names = sorted(sums)
            avg = dist_utils.mean_over_ranks(torch.tensor([sums[k] for k in names], dtype=torch.float64), info)
            row = {"step": step, "epoch": epoch, "lr": lr, "grad_norm": grad_norm,
                   **{k: float(v) for k, v in zip(names, avg.tolist())}}
            result.history.append(row)
            window.append(row)
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.4g}" for k in metric_names[:3] if k in row})
            if log is not None and (step % cfg.log_every == 0 or step == cfg.max_steps):
                agg = {k: sum(r[k] for r in window) / len(window) for k in metric_names if k in row}
                log.write({**row, **agg, "seconds": round(time.perf_counter() - t0, 3)})
                window = []
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
                lora = lora_state_dict(dit)
                full = dist_utils.full_tensors(lora)  # a collective when sharded
                state = {"step": step, "position": (epoch, index + 1), "scheduler": scheduler.state_dict(),
                         "rng": rng_state(), "config": config_json}
                if sharded:
                    result.checkpoint = ckpt.save_sharded(
                        step, {**state, "sharded": True}, lambda p: write_lora(p, full),
                        lambda d: dist_utils.save_shards(d, dit, lora, optimizer), info)
                elif info.is_main:
                    state.update(lora=full, optimizer=optimizer.state_dict())
                    result.checkpoint = ckpt.save(step, state, lambda p: write_lora(p, full))
                dist_utils.barrier(info)
            if validation is not None and validate_every and step % validate_every == 0:
                if info.is_main:
                    validation(step)
                dist_utils.barrier(info)
            if stop_after is not None and step >= stop_after and step < cfg.max_steps:
                result.step = step
                result.lora_state = dist_utils.full_tensors(lora_state_dict(dit))
                return result  # a simulated interruption: no final LoRA
        result.lora_state = dist_utils.full_tensors(lora_state_dict(dit))
        if info.is_main:
            write_lora(final_lora, result.lora_state)  # save_trained_lora writes atomically
            result.lora_path = final_lora
        dist_utils.barrier(info)
        result.step = step
        return result
    finally:
        bar.close()
        if log is not None:
            log.close()


def restore(state: dict, dit: nn.Module, optimizer, scheduler, path: Path | None = None) -> None:
    """Load a checkpoint's LoRA, AdamW, scheduler and RNG states into a freshly built run (a sharded
    checkpoint's LoRA and AdamW shards from its folder `path`, at this run's process count)."""
    if state.get("sharded"):
        dist_utils.load_shards(Path(path) / SHARDS_DIR, dit, lora_state_dict(dit), optimizer)
    else:
        load_lora_state_dict_(dit, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def stack_refs(per_sample: Iterable[list[torch.Tensor]]) -> list[torch.Tensor]:
    """[[ref_0, ref_1, ...] per sample] -> [ref_0 batch, ref_1 batch, ...] (every sample the same shapes)."""
    rows = list(per_sample)
    return [torch.cat([r[j] for r in rows]) for j in range(len(rows[0]))] if rows and rows[0] else []


__all__ = ["build_engine", "check_precision", "check_geometry", "engine_name", "GroupsForward", "target_layout", "train_segments",
           "sample_seed", "add_noise", "make_optimizer", "rng_state", "set_rng_state", "Checkpoints", "MetricLog",
           "read_log", "validate", "LoopResult", "run_loop", "restore", "stack_refs"]
