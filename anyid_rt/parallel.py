"""Parallel generation on torch.distributed: Ulysses sequence parallelism and guidance parallelism.

    torchrun --nproc-per-node 4 -m anyid_rt.cli generate --tiny --prompt "..." --sequence-parallel 2 --cfg-parallel

A job of S x (2 if cfg else 1) processes (`ParallelConfig`, anyid_rt/config.py) runs one generation; every
rank holds the whole model and the whole latent, and each denoising step is split like this:

- Guidance (cfg): the engine's batch of 2 (conditional row 0, unconditional row 1) is split by row: cfg rank c
  computes row c alone, and the two velocities are all-gathered after the step, so that every rank combines
  them and takes the same sampler step (identical latents on every rank, with no broadcast).
- Sequence (Ulysses): the token sequence (target frames, then reference frames) is cut into S runs of whole
  latent frames (`frame_shards`; the first ranks take one frame more when the count does not divide). Every
  per-token op (patch embedding, modulation, norms, RoPE, cross-attention to the whole text, FFN, head) runs on
  the rank's own tokens. Around each self-attention one all-to-all turns q, k, v from token shards of every
  head into every token of H/S heads, and a second one turns the output back (`SequenceAttention`); the
  reference tokens and the text K/V take part like any others.
- The VAE decode's spatial tiles are dealt round-robin over all ranks and their weighted sums all-reduced
  (`decode`); without tiling every rank decodes the whole video (there is no exact split of the causal decode
  by frames).

Failures: `agree` runs a check on every rank and, when any rank fails, raises on every rank with the failing
rank's message (a reference missing on one node fails everywhere before the model loads). A failure inside a
step (out of memory, ...) ends that process, and torchrun then stops the others and prints its error.
Rank = cfg_rank * S + sequence_rank, so that the S ranks of a sequence group are neighbours (one node).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from .conditioning import ConditioningLayout
from .config import ParallelConfig
from .models.dit import Segments, TextKV, WanDiT, group_grids, patchify, sinusoidal_embedding, unpatchify
from .models.vae import WanVAE
from .request import GenerationRequest, RequestError, show


def env_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    rank = int(os.environ.get("RANK", "0"))
    return rank, int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", str(rank)))


def join_process_group(device: torch.device) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), if not joined
    yet: NCCL for CUDA devices, gloo for CPUs."""
    if dist.is_initialized():
        return
    rank, world, local = env_ranks()
    if "MASTER_ADDR" not in os.environ or world < 2:
        raise ValueError("parallel generation runs under torchrun (no process group here, WORLD_SIZE="
                         f"{os.environ.get('WORLD_SIZE', 'unset')}): launch it with torchrun --nproc-per-node N")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)


def free_port() -> int:
    """A free TCP port on this machine: MASTER_PORT for a one-machine job started from Python
    (torch.multiprocessing) rather than by torchrun, as the tests and bench/bench_parallel.py do."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_plan(config: ParallelConfig, num_heads: int, compile: bool | str, device: torch.device,
               text_encoder_device: torch.device, layout: ConditioningLayout,
               names=None) -> tuple[torch.device, torch.device]:
    """Check a parallel generation before anything loads: the config's type, the heads against S, the job's
    process count (torchrun's WORLD_SIZE) against S x (2 if cfg); returns this rank's (device, text encoder
    device): an unnumbered cuda is its LOCAL_RANK's GPU. `names` spells the settings (the CLI's flags)."""
    if not isinstance(config, ParallelConfig):
        raise RequestError(f"parallel must be a ParallelConfig(sequence=S, cfg=bool), got {type(config).__name__}",
                           "parallel")
    if names:
        flags = f"{names['sequence_parallel']} {config.sequence}" + (f" {names['cfg_parallel']}" if config.cfg else "")
        seq_flag = names["sequence_parallel"]
    else:
        flags, seq_flag = f"parallel={config}", "ParallelConfig.sequence"
    try:
        config.check_heads(num_heads, seq_flag)
        config.check_world(env_ranks()[1], flags)
    except ValueError as e:
        raise RequestError(str(e), "parallel") from e
    if layout.reference_attention == "isolated":  # target-only steps against cached K/V: not sharded yet
        raise RequestError(f"isolated reference attention (this LoRA's or layout's) is not supported with {flags} "
                           "yet; run it in one process", "parallel")
    if compile:
        raise RequestError(f"{show(names, 'compile', compile)} is not supported with {flags} yet (the compiled and "
                           "graphed step has no collectives); drop one of them", "compile")

    def own_gpu(d: torch.device) -> torch.device:  # one GPU per process: torchrun's LOCAL_RANK
        return torch.device("cuda", env_ranks()[2]) if d.type == "cuda" and d.index is None else d

    return own_gpu(device), own_gpu(text_encoder_device)


def frame_shards(frames: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) latent frames of each of `parts` ranks: whole frames, as even as possible (the first
    frames % parts ranks take one more). Every rank needs at least one frame."""
    if frames < parts:
        raise ValueError(f"{frames} latent frames (target and references) cannot be shared by {parts} sequence "
                         "ranks (at least one frame each): use fewer sequence ranks or more frames")
    base, extra = divmod(frames, parts)
    stops = [(r + 1) * base + min(r + 1, extra) for r in range(parts)]
    return list(zip([0] + stops[:-1], stops))


def agree(check: Callable[[], object], group: dist.ProcessGroup | None = None):
    """Run `check` on every rank of `group`; if it raised on any rank, raise on every rank, with the message of
    the first failing rank (ValueError, the CLI's exit code 2, when that rank's error was one). Returns the
    check's result on this rank."""
    result, error = None, None
    try:
        result = check()
    except Exception as e:  # noqa: BLE001 (reported to every rank below, then raised)
        error = e
    messages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else (type(error).__name__, str(error),
                                                                 isinstance(error, ValueError)), group=group)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, (kind, text, is_value) = failed[0]
        if error is not None and rank == dist.get_rank(group):
            raise error
        raise (ValueError if is_value else RuntimeError)(f"rank {rank} failed ({kind}): {text}")
    return result


def _all_to_all(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
    """all_to_all_single along dim 0 with per-rank row counts (uneven shards); differentiable when grad is on
    (training: its backward is the reverse all-to-all)."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    if torch.is_grad_enabled() and x.requires_grad:
        from torch.distributed.nn.functional import all_to_all_single

        return all_to_all_single(out, x.contiguous(), list(recv), list(send), group=group)
    dist.all_to_all_single(out, x.contiguous(), list(recv), list(send), group=group)
    return out


class SequenceAttention:
    """Ulysses self-attention of one sequence group, for `DiTOps.sequence_attention`.

    q, k, v arrive as this rank's tokens of every head, [B, Lr, H, D]; one all-to-all (q, k and v stacked)
    makes them every token of this rank's H/S heads, [B, L, H/S, D]; the model's own attention op runs on
    those, and a second all-to-all returns the output to [B, Lr, H, D]. `counts` are the token counts of the
    group's ranks, in rank order (= sequence order).
    """

    def __init__(self, attention: Callable, group, counts: Sequence[int], rank: int):
        self.attention, self.group, self.counts, self.rank = attention, group, list(counts), rank

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        S, Lr = len(self.counts), self.counts[self.rank]
        B, _, H, D = q.shape
        Hs = H // S
        x = torch.stack([q, k, v])  # [3, B, Lr, H, D]
        # head chunk j goes to rank j: [S, Lr, 3, B, Hs, D], rows (j, token)
        x = x.view(3, B, Lr, S, Hs, D).permute(3, 2, 0, 1, 4, 5).reshape(S * Lr, 3, B, Hs, D)
        x = _all_to_all(x, [Lr] * S, self.counts, self.group)  # [L, 3, B, Hs, D], tokens in sequence order
        q, k, v = x.permute(1, 2, 0, 3, 4).unbind(0)  # 3 x [B, L, Hs, D]
        y = self.attention(q, k, v)  # [B, L, Hs, D]
        y = _all_to_all(y.transpose(0, 1), self.counts, [Lr] * S, self.group)  # [S*Lr, B, Hs, D], rows (j, token)
        return y.view(S, Lr, B, Hs, D).permute(2, 1, 0, 3, 4).reshape(B, Lr, H, D)  # heads back in order


class _GatherRows(torch.autograd.Function):
    """Concatenate along dim 1 each rank's x [B, counts[r], C] (uneven: padded to the largest for the gather).
    Backward keeps this rank's rows of the gradient: every rank computes the same loss from the gathered rows,
    so the gradient each rank's parameters receive is its own tokens' share, and the shares add up to the
    whole over the group (the trainer's gradient averaging sums them, trainer/dist.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
        ctx.rows = (sum(counts[:rank]), counts[rank])
        padded = torch.nn.functional.pad(x, (0, 0, 0, max(counts) - x.shape[1]))
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:, :n] for p, n in zip(parts, counts)], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start, n = ctx.rows
        return grad[:, start:start + n], None, None, None


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a parallel generation: its rank and its sequence and guidance groups."""

    config: ParallelConfig
    rank: int
    device: torch.device
    sequence_group: dist.ProcessGroup | None  # the S ranks sharing one row's tokens; None when S == 1
    sequence_rank: int
    cfg_group: dist.ProcessGroup | None  # the 2 ranks holding the two rows of one token shard; None without cfg
    cfg_rank: int

    @staticmethod
    def join(config: ParallelConfig, device: torch.device, replicas: int = 1) -> "ParallelContext":
        """Join torchrun's process group and make the sequence and guidance groups (every rank creates every
        group, in the same order, as torch.distributed requires). `replicas`: data-parallel copies of the
        layout (training: each group of S consecutive ranks shares its samples), rank = replica x size + ...."""
        join_process_group(device)
        if dist.get_world_size() % replicas:
            raise ValueError(f"{dist.get_world_size()} processes do not hold {replicas} copies of {config}")
        config.check_world(dist.get_world_size() // replicas)
        S, rank, size = config.sequence, dist.get_rank(), config.world_size
        rows = 2 if config.cfg else 1
        seq_groups = [dist.new_group([r * size + c * S + j for j in range(S)]) for r in range(replicas)
                      for c in range(rows)] if S > 1 else None
        cfg_groups = [dist.new_group([r * size + s, r * size + S + s]) for r in range(replicas)
                      for s in range(S)] if config.cfg else None
        replica, (c, s) = rank // size, divmod(rank % size, S)
        return ParallelContext(config, rank, device, seq_groups[replica * rows + c] if seq_groups else None, s,
                               cfg_groups[replica * S + s] if cfg_groups else None, c)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class ParallelDiT:
    """`WanDiT.forward_groups` over a parallel job: the same call and result ([B, 48, F, h, w] fp32, B = 2 with
    guidance parallelism), each rank computing its row and its frames."""

    def __init__(self, dit: WanDiT, ctx: ParallelContext):
        ctx.config.check_heads(dit.cfg.num_heads)
        self.dit, self.ctx = dit, ctx

    def check(self, check: Callable[[], GenerationRequest], probe: Callable[[GenerationRequest], None],
              names=None) -> GenerationRequest:
        """The engine's request check (`check`), the guidance against `cfg`, and the probe of its files
        (`probe`), agreed over every rank (`agree`)."""
        def run() -> GenerationRequest:
            r = check()
            self.ctx.config.check_guidance(r.guidance, (names or {}).get("cfg_parallel", "ParallelConfig.cfg"))
            probe(r)
            return r

        return agree(run)

    def decoder(self, vae: WanVAE) -> Callable[..., torch.Tensor]:
        """`vae.decode` over the whole job (`decode`)."""
        return partial(decode, vae)

    def forward_groups(self, latents: Sequence[torch.Tensor], frame_starts: Sequence[int], segments: Segments,
                       context: TextKV | Sequence[torch.Tensor]) -> torch.Tensor:
        dit, ctx, cfg = self.dit, self.ctx, self.dit.cfg
        grids = group_grids(cfg, latents, frame_starts, segments)
        text_kv = context if isinstance(context, TextKV) else dit.prepare_text(context)  # per step in training
        device, t = latents[0].device, segments.t
        if ctx.config.cfg:  # this rank's row of the batch of 2 (0: conditional, 1: unconditional)
            if latents[0].shape[0] != 2:
                raise ValueError(f"guidance parallelism splits a batch of 2 (conditional, unconditional), got "
                                 f"batch {latents[0].shape[0]}")
            row = slice(ctx.cfg_rank, ctx.cfg_rank + 1)
            latents, t = [z[row] for z in latents], t[row]
            text_kv = TextKV([(k[row], v[row]) for k, v in text_kv.kv])
        per_frame = {h * w for _, h, w in grids}
        if len(per_frame) != 1:
            raise ValueError(f"sequence parallelism shards whole latent frames, so every group needs the target's "
                             f"frame size; got grids {grids}")
        hw = per_frame.pop()
        shards = frame_shards(sum(f for f, _, _ in grids), ctx.config.sequence)
        counts = [(b - a) * hw for a, b in shards]
        a, b = (i * hw for i in shards[ctx.sequence_rank])  # this rank's tokens [a, b)
        patches = torch.cat([patchify(cfg, z) for z in latents], dim=1)[:, a:b]  # [B', Lr, in_dim*pt*ph*pw]
        cos, sin = dit.rope(grids, frame_starts, device)
        ops = dit.ops
        if ctx.sequence_group is not None:
            ops = replace(ops, sequence_attention=SequenceAttention(ops.attention, ctx.sequence_group, counts,
                                                                    ctx.sequence_rank))
        out = dit.forward_tokens(patches, sinusoidal_embedding(t.to(device), cfg.freq_dim),
                                 dit.segment_map(_local_lens(segments.lens, a, b), device), (cos[a:b], sin[a:b]),
                                 text_kv, ops)  # [B', Lr, pt*ph*pw*out_dim]
        f0, h0, w0 = grids[0]
        target = f0 * h0 * w0  # only the target's velocity is gathered
        if ctx.sequence_group is not None:
            mine = [max(0, min(stop * hw, target) - start * hw) for start, stop in shards]  # target tokens per rank
            out = _GatherRows.apply(out[:, :mine[ctx.sequence_rank]], mine, ctx.sequence_rank, ctx.sequence_group)
        out = out[:, :target]
        if ctx.cfg_group is not None:  # [2, L0, C]: row 0 conditional, row 1 unconditional, on both ranks
            rows = [torch.empty_like(out) for _ in range(2)]
            dist.all_gather(rows, out.contiguous(), group=ctx.cfg_group)
            out = torch.cat(rows)
        return unpatchify(cfg, out, grids[0])


def _local_lens(lens: Sequence[int], a: int, b: int) -> tuple[int, ...]:
    """Segment lengths restricted to tokens [a, b): every segment kept (empty ones as 0), so that each token's
    segment index, and with it its row of the per-segment modulation, stays the global one."""
    out, start = [], 0
    for n in lens:
        out.append(max(0, min(start + n, b) - max(start, a)))
        start += n
    return tuple(out)


def decode(vae: WanVAE, latent: torch.Tensor, tile, progress: bool = False) -> torch.Tensor:
    """`WanVAE.decode` over the whole job: with a tiling, rank r decodes tiles r, r + N, ... and the weighted
    sums are all-reduced, giving every rank the frames one process gets (a pixel covered by at most two tiles is
    summed in the same order; where more tiles overlap, up to fp32 rounding). Without one, every rank decodes
    the whole latent (the causal decode has no exact split by frames)."""
    if tile is None:
        return vae.decode(latent, progress=progress)
    out, weight_sum = vae.decode_tiles(latent, tile, part=(dist.get_rank(), dist.get_world_size()),
                                       progress=progress)
    dist.all_reduce(out)
    dist.all_reduce(weight_sum)
    return vae.blend_tiles(out, weight_sum, tile)


__all__ = ["ParallelContext", "ParallelDiT", "SequenceAttention", "agree", "check_plan", "decode",
           "env_ranks", "frame_shards", "free_port", "join_process_group", "shutdown"]
