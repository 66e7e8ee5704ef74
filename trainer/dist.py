"""Data parallelism: torchrun + DistributedDataParallel (NCCL on GPUs, gloo on CPUs).

    torchrun --nproc_per_node 8 -m anyid_rt.trainer.cli sft sft.toml

Every process builds the same model and the same LoRA (seeded init; DDP also broadcasts rank 0's
parameters at wrap time), reads the same global micro-batch order and takes its own slice of it, and
DDP averages the LoRA gradients. Because every per-sample random draw (timestep, noise, null condition)
is seeded by the sample's global position, N processes with batch b compute the same update as one
process with batch N*b (up to float summation order); tests/test_trainer_dist.py checks this with two
gloo processes. Only rank 0 writes checkpoints, logs and validation videos.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import env_ranks, shutdown  # one home for torchrun's environment and leaving the group


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); a single process when WORLD_SIZE is unset or 1."""
    rank, world, local = env_ranks()
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around a module whose trainable parameters are the LoRA's (frozen base weights are not synced:
    they are equal by construction). A single process gets the module back unchanged."""
    if not info.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)  # the DiT registers no buffers


def no_sync(module: nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on the micro-batches before the last of a gradient-accumulation step."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def mean_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a float tensor over processes (for logging); identity on one process."""
    if not info.distributed:
        return values
    out = values.detach().clone().to(info.device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / info.world_size).to(values.device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


__all__ = ["DistInfo", "env_ranks", "init_distributed", "shutdown", "wrap", "no_sync", "mean_over_ranks", "barrier",
           "resolve_device"]
