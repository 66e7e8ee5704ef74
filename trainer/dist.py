"""Data parallelism: torchrun + DistributedDataParallel or FSDP2 (NCCL on GPUs, gloo on CPUs).

    torchrun --nproc_per_node 8 -m anyid_rt.trainer.cli sft sft.toml

Every process builds the same model and the same LoRA (seeded init; DDP also broadcasts rank 0's
parameters at wrap time), reads the same global micro-batch order and takes its own slice of it, and
DDP averages the LoRA gradients. Because every per-sample random draw (timestep, noise, null condition)
is seeded by the sample's global position, N processes with batch b compute the same update as one
process with batch N*b (up to float summation order); tests/test_trainer_dist.py checks this with two
gloo processes. Only rank 0 writes checkpoints, logs and validation videos.

`sharding = "fsdp"` (RunConfig) shards instead of replicating: FSDP2 (`fully_shard`) per DiT block and on the
DiT itself, over the frozen base weights and the LoRA alike, so each of N processes holds 1/N of the weights,
of the LoRA and of its AdamW state, and all-gathers one block's weights at a time (again in the backward,
with gradient checkpointing). The weights compute in their stored dtypes (bf16 base weights with
mixed_precision = "bf16", fp32 norms, modulation and LoRA masters: the DiT's own numerics) and the LoRA
gradients are reduce-scattered in fp32. Checkpoints are then distributed (`torch.distributed.checkpoint`:
every rank writes its shards of the LoRA and the optimizer state, `save_shards`), and load at any process
count, one included (`load_shards`), so a run resumes exactly on another number of GPUs.
"""
from __future__ import annotations

import contextlib
import warnings
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
    sequence: int = 1  # sequence-parallel group size: S consecutive ranks share their samples' tokens

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which slice of each global micro-batch this process trains on (its sequence group's)."""
        return self.rank // self.sequence

    @property
    def data_world(self) -> int:
        """How many slices a global micro-batch is cut into: processes / S."""
        return self.world_size // self.sequence

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


def init_distributed(device: str = "auto", sequence: int = 1) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); a single process when WORLD_SIZE is unset or 1. `sequence`: S of the
    run's sequence parallelism (RunConfig.sequence_parallel)."""
    rank, world, local = env_ranks()
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev, sequence)


SHARDING = ("ddp", "fsdp")  # RunConfig.sharding: replicate the model and average gradients, or shard it (FSDP2)


def wrap(module: nn.Module, info: DistInfo, sharding: str = "ddp") -> nn.Module:
    """DDP around a module whose trainable parameters are the LoRA's (frozen base weights are not synced:
    they are equal by construction), or with sharding = "fsdp" the module with its DiT (`module.dit`) sharded
    in place (`shard_`). A single process gets the module back unchanged."""
    if not info.distributed:
        return module
    if sharding == "fsdp":
        shard_(module.dit)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(module, device_ids=ids)  # the DiT registers no buffers


def sequence_parallel(dit: nn.Module, info: DistInfo):
    """The DiT's forward sharded over each group of S consecutive ranks (Ulysses, anyid_rt/parallel.py), with
    the collectives differentiable; None when S = 1. Every rank of a group computes the same loss from the
    gathered velocity, and its parameters receive their own tokens' share of the gradient: `run_loop` scales
    the loss by S so that the mean over all processes (DDP) is the sum over a group, averaged over groups."""
    if info.sequence == 1:
        return None
    from ..config import ParallelConfig
    from ..parallel import ParallelContext, ParallelDiT

    ctx = ParallelContext.join(ParallelConfig(sequence=info.sequence), info.device, replicas=info.data_world)
    return ParallelDiT(dit, ctx)


def shard_(dit: nn.Module) -> None:
    """FSDP2 over a DiT (LoRA injected): each block is one unit and its cross-attention another (all-gathered for
    their forward and again for their backward, freed after), the DiT the root unit (embeddings, time
    projection, head). The DiT's calls go
    through `forward_groups`, registered as a forward method so that the root's weights are gathered too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # no param_dtype: every weight computes in its stored dtype (Wan's fp32 norms and modulation stay fp32);
    # the LoRA gradients (fp32 masters) are reduce-scattered in fp32
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in dit.blocks:
        # the text K/V are projected once per forward, before the blocks run (`WanDiT.embed_text`): the
        # cross-attention is a unit of its own, gathered for that call too
        fully_shard(block.cross_attn, mp_policy=policy)
        register_fsdp_forward_method(block.cross_attn, "text_kv")
        fully_shard(block, mp_policy=policy)
    fully_shard(dit, mp_policy=policy)
    register_fsdp_forward_method(dit, "forward_groups")


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of (possibly sharded) tensors. Sharded ones are all-gathered: every rank must call it."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().cpu().clone() for k, v in tensors.items()}


def grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The global L2 norm of the gradients (over every rank's shards when sharded), clipping them to `max_norm`
    when it is > 0."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(norm.full_tensor() if is_sharded(norm) else norm)


def save_shards(folder, dit: nn.Module, lora: dict[str, torch.Tensor], optimizer) -> None:
    """Write the LoRA tensors (sharded or not) and the optimizer state as a distributed checkpoint: every rank
    writes its own shards into `folder` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"lora": lora, "optimizer": get_optimizer_state_dict(dit, optimizer)}, checkpoint_id=str(folder),
             no_dist=not dist.is_initialized())  # one process: no process group needed


def load_shards(folder, dit: nn.Module, lora: dict[str, torch.Tensor], optimizer) -> None:
    """Load a `save_shards` checkpoint written at any process count into this run's LoRA tensors (in place: they
    are views of the parameters) and optimizer; DCP reshards to the current layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"lora": lora, "optimizer": get_optimizer_state_dict(dit, optimizer)}  # a fresh AdamW gets zero state
    with warnings.catch_warnings():  # one process, no process group: DCP says it assumes so, as asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=not dist.is_initialized())
    set_optimizer_state_dict(dit, optimizer, state["optimizer"])


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def no_sync(module: nn.Module, sync: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2, on `module.dit`) on the micro-batches before
    the last of a gradient-accumulation step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    dit = getattr(module, "dit", None)
    if hasattr(dit, "set_requires_gradient_sync"):
        return _fsdp_no_sync(dit)
    return contextlib.nullcontext()


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
           "resolve_device", "SHARDING", "shard_", "is_sharded", "full_tensors", "grad_norm", "save_shards",
           "load_shards", "sequence_parallel"]
