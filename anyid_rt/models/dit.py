"""The Wan2.2 TI2V-5B diffusion transformer, in plain PyTorch.

Follows `wan/modules/model.py` (facts in shared/reference/wan22-ti2v-5b.md sections 2-6) with two changes
of representation that keep the maths:
- Timesteps are *segments*: runs of tokens that share a timestep (`Segments`: token counts `lens`, values
  `t` [B, S]). Modulation is computed per segment ([B, S, 6, dim]) instead of per token ([B, L, 6, dim],
  4.3 GB of fp32 at 58k tokens). A Wan-style [B, L] timestep is run-length encoded into segments.
- The token sequence is made of *groups*: the target latent first, then extra latents (AnyID references)
  with RoPE frame indices of their own. Only the first group's velocity is returned.

One forward for every caller: `forward_tokens` takes tensors only (patchified tokens, the timestep
sinusoid, each token's segment, RoPE tables, text K/V), so the engine, the trainer, the benchmarks and the
ONNX export (export/onnx_dit.py, which traces it) run the same code; `forward_groups` turns a call's Python
layout (groups, grids, RoPE frame starts, segment lengths) into those tensors, once per layout for the tables.

Numerics follow Wan: the time embedding, modulation, norms, gates and head run in fp32, the residual stream
is fp32, the large linears run in the weights' dtype. Attention, norms and modulation go through `DiTOps`,
chosen once at construction (torch references or Triton kernels) and handed to every module's forward.

The modules and their names are the checkpoint's. For inference, `WanDiT.fuse_projections` swaps in
`FusedSelfAttention` / `FusedCrossAttention`, which compute q, k, v (and the text k, v) with one GEMM each;
`unfuse_projections` and `checkpoint_state_dict` give the checkpoint's layers and names back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import DiTConfig
from ..kernels import DiTOps, SegmentMap, dit_ops
from .linears import checkpoint_names


# ---------------------------------------------------------------------------------------------------------
# Token layout: groups, segments, RoPE
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segments:
    """Runs of tokens sharing a timestep: `lens` (python ints, same for every sample), `t` [B, S] float.
    The forward hands the kernels a `SegmentMap` of the same runs (`WanDiT.segment_map`, built once per layout)."""

    lens: tuple[int, ...]
    t: torch.Tensor

    @staticmethod
    def from_timesteps(t: torch.Tensor, num_tokens: int) -> "Segments":
        """[B] -> one segment; [B, L] -> run-length encoded over the union of every sample's change points."""
        if t.ndim == 1:
            return Segments((num_tokens,), t[:, None].float())
        if t.ndim != 2 or t.shape[1] != num_tokens:
            raise ValueError(f"timestep must be [B] or [B, L={num_tokens}], got {tuple(t.shape)}")
        change = (t[:, 1:] != t[:, :-1]).any(0)  # [L-1]
        starts = [0] + (torch.nonzero(change).flatten() + 1).tolist()
        lens = tuple(b - a for a, b in zip(starts, starts[1:] + [num_tokens]))
        return Segments(lens, t[:, starts].float())

    def check(self, num_tokens: int, batch: int) -> None:
        if sum(self.lens) != num_tokens or tuple(self.t.shape) != (batch, len(self.lens)):
            raise ValueError(f"segments {self.lens} with t {tuple(self.t.shape)} do not cover {num_tokens} "
                             f"tokens of batch {batch}")


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep sinusoid, [cos, sin] on the raw timestep (0..1000), computed in float64. [..., dim] fp32."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def rope_angles(positions: torch.Tensor, axis_dim: int, theta: float) -> torch.Tensor:
    """Angles pos * theta^(-2i/axis_dim), i < axis_dim/2, for one axis (axis_dim real channels). float64."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64, device=positions.device)
                          / axis_dim)
    return positions.to(torch.float64)[:, None] * inv[None, :]


def rope_table(grid: tuple[int, int, int], frame_start: int, cfg: DiTConfig,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [F*H*W, head_dim/2] fp32 for a token grid whose first frame sits at RoPE index frame_start."""
    f, h, w = grid
    if frame_start < 0 or frame_start + f > cfg.rope_max_positions or max(h, w) > cfg.rope_max_positions:
        raise ValueError(f"token grid {grid} at frame {frame_start} exceeds the {cfg.rope_max_positions} RoPE "
                         "positions per axis; use fewer frames or references, or a smaller size")
    cf, ch, cw = cfg.rope_split  # complex pairs per axis
    ang_f = rope_angles(torch.arange(frame_start, frame_start + f, device=device), 2 * cf, cfg.rope_theta)
    ang_h = rope_angles(torch.arange(h, device=device), 2 * ch, cfg.rope_theta)
    ang_w = rope_angles(torch.arange(w, device=device), 2 * cw, cfg.rope_theta)
    ang = torch.cat([
        ang_f[:, None, None, :].expand(f, h, w, cf),
        ang_h[None, :, None, :].expand(f, h, w, ch),
        ang_w[None, None, :, :].expand(f, h, w, cw),
    ], dim=-1).reshape(f * h * w, cf + ch + cw)  # token order f, h, w (row-major)
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope_tables(cfg: DiTConfig, grids: Sequence[tuple[int, int, int]], frame_starts: Sequence[int],
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [L, head_dim/2] fp32 of the concatenated groups, in token order."""
    tables = [rope_table(g, s, cfg, device) for g, s in zip(grids, frame_starts)]
    return torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables])


def grid_of(cfg: DiTConfig, latent: torch.Tensor) -> tuple[int, int, int]:
    """The token grid (F/pt, h/ph, w/pw) of a latent [B, in_dim, F, h, w]."""
    if latent.ndim != 5 or latent.shape[1] != cfg.in_dim:
        raise ValueError(f"latent must be [B, {cfg.in_dim}, F, h, w], got {tuple(latent.shape)}")
    pt, ph, pw = cfg.patch_size
    _, _, f, h, w = latent.shape
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent grid (F={f}, h={h}, w={w}) must be divisible by the patch {cfg.patch_size}; "
                         "the pixel height and width must be multiples of 32")
    return f // pt, h // ph, w // pw


def group_grids(cfg: DiTConfig, latents: Sequence[torch.Tensor], frame_starts: Sequence[int],
                segments: Segments) -> list[tuple[int, int, int]]:
    """The token grid of each group of a `forward_groups` call, after checking the call: one RoPE frame start
    per group, one batch size, segments covering every token."""
    if len(latents) != len(frame_starts) or not latents:
        raise ValueError("give one RoPE frame start per latent group (at least the target)")
    grids = [grid_of(cfg, z) for z in latents]
    B = latents[0].shape[0]
    if any(z.shape[0] != B for z in latents):
        raise ValueError(f"every group needs batch {B}, got {[z.shape[0] for z in latents]}")
    segments.check(sum(f * h * w for f, h, w in grids), B)
    return grids


def patchify(cfg: DiTConfig, latent: torch.Tensor) -> torch.Tensor:
    """[B, C, F, h, w] -> tokens [B, F/pt * h/ph * w/pw, C*pt*ph*pw], token order (f, h, w), channels (C, pt, ph,
    pw): the order of the patch-embedding Conv3d's flattened weight, so that the embedding is a linear map."""
    B, C, f, h, w = latent.shape
    pt, ph, pw = cfg.patch_size
    x = latent.reshape(B, C, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, f', h', w', C, pt, ph, pw]
    return x.reshape(B, (f // pt) * (h // ph) * (w // pw), C * pt * ph * pw)


def unpatchify(cfg: DiTConfig, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Velocity tokens [B, F*H*W, pt*ph*pw*C] (C fastest) -> [B, C, F*pt, H*ph, W*pw] fp32."""
    (f, h, w), (pt, ph, pw), C = grid, cfg.patch_size, cfg.out_dim
    B = tokens.shape[0]
    x = tokens.reshape(B, f, h, w, pt, ph, pw, C)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, C, f * pt, h * ph, w * pw).float()


def pad_context(cfg: DiTConfig, context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero-pad each prompt's trimmed encoder output [L_i, text_dim] (a list, or [B, L, text_dim]) to
    [B, text_len, text_dim], as the official model does: padded rows are not masked."""
    rows = list(context.unbind(0)) if isinstance(context, torch.Tensor) and context.ndim == 3 else list(context)
    out = []
    for i, c in enumerate(rows):
        if c.ndim != 2 or c.shape[1] != cfg.text_dim:
            raise ValueError(f"context {i} must be [L, text_dim={cfg.text_dim}], got {tuple(c.shape)}")
        if c.shape[0] > cfg.text_len:
            raise ValueError(f"context {i} has {c.shape[0]} rows, more than text_len={cfg.text_len}")
        out.append(F.pad(c, (0, 0, 0, cfg.text_len - c.shape[0])))
    return torch.stack(out)


# A replacement for `WanDiT.run_blocks`: (x, e, e0, segments, rope, text_kv, ops) -> x, where e [B, S, dim] is the
# time embedding (what TeaCache measures); anyid_rt/step_cache.py
BlockStack = Callable[..., torch.Tensor]


@dataclass
class TextKV:
    """Cross-attention keys and values of an embedded, zero-padded text context, one (k, v) per block.

    Computed once per prompt (`WanDiT.prepare_text`) and reused at every step: k, v are [B, text_len, H, D].
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def batch(self) -> int:
        return self.kv[0][0].shape[0]


# ---------------------------------------------------------------------------------------------------------
# Modules (names match the original checkpoint keys, so `WanModel` state dicts load by name)
# ---------------------------------------------------------------------------------------------------------

class NormWeight(nn.Module):
    """Holds a norm's parameters; the maths is done by the chosen ops."""

    def __init__(self, dim: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None


def stack_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    """One Linear computing several Linears of the same input: their weights (and biases) stacked by rows,
    in order, so that one GEMM reads the input once. Copies the weights; the originals can then be freed."""
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    return _linear(torch.cat([m.weight.detach() for m in linears]), bias, linears[0].weight.requires_grad)


def split_linear(linear: nn.Linear, n: int) -> list[nn.Linear]:
    """The `n` Linears that `stack_linears` stacked into `linear` (equal blocks of rows), each owning a copy of
    its rows, as loaded layers do."""
    weights = linear.weight.detach().chunk(n)
    biases = [None] * n if linear.bias is None else linear.bias.detach().chunk(n)
    return [_linear(w.clone(), b if b is None else b.clone(), linear.weight.requires_grad)
            for w, b in zip(weights, biases)]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no init: given
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return layer


class SelfAttention(nn.Module):
    """Self-attention over every token, with the checkpoint's three projections q, k, v (what LoRA training and
    the export run); `FusedSelfAttention` is the same maths with one GEMM for the three (what the engine runs)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = NormWeight(cfg.dim), NormWeight(cfg.dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ops: DiTOps,
                attention: Callable | None = None) -> torch.Tensor:
        # x: [B, L, dim] in the compute dtype (or FP8 rows for FP8 projections, anyid_rt/quant.py)
        return self.attend(self.q(x), self.k(x), self.v(x), rope, ops, attention)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               ops: DiTOps, attention: Callable | None = None) -> torch.Tensor:
        """The attention of projected q, k, v [B, L, dim] (before the q/k norms), through `o`: [B, L, dim].
        `attention` replaces `ops.attention` on the heads (anyid_rt/reference_kv.py: isolated references)."""
        B, L, _ = q.shape
        H, D, eps = self.cfg.num_heads, self.cfg.head_dim, self.cfg.eps
        # RMSNorm over all heads, then RoPE, in one pass: each token is rotated once, not once per query
        # block inside the attention kernel (kernels/norm.py)
        q = ops.rms_norm_rope(q, self.norm_q.weight, eps, rope, H).view(B, L, H, D)
        k = ops.rms_norm_rope(k, self.norm_k.weight, eps, rope, H).view(B, L, H, D)
        v = v.view(B, L, H, D)
        attention = attention or ops.sequence_attention or ops.attention  # sequence parallelism: all-to-alls around it
        return self.o(attention(q, k, v).reshape(B, L, H * D))  # attention: [B, L, H, D]


class FusedSelfAttention(SelfAttention):
    """`SelfAttention` with q, k and v as one GEMM: `qkv` [3*dim, dim] stacks their weights and biases (in
    that order), so the input is read once and one larger matmul replaces three; q, k, v are column blocks
    of its output (views). Made by `WanDiT.fuse_projections`, undone by `unfuse_projections`."""

    def __init__(self, attn: SelfAttention):
        nn.Module.__init__(self)  # skip SelfAttention.__init__: attn's layers are taken over, not allocated
        self.cfg = attn.cfg
        self.qkv = stack_linears([attn.q, attn.k, attn.v])
        self.o, self.norm_q, self.norm_k = attn.o, attn.norm_q, attn.norm_k

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ops: DiTOps,
                attention: Callable | None = None) -> torch.Tensor:
        return self.attend(*self.qkv(x).chunk(3, dim=-1), rope, ops, attention)  # 3 x [B, L, dim], row stride 3*dim

    def unfused(self) -> SelfAttention:
        with torch.device("meta"):  # placeholders, replaced below: nothing is allocated
            attn = SelfAttention(self.cfg)
        attn.q, attn.k, attn.v = split_linear(self.qkv, 3)
        attn.o, attn.norm_q, attn.norm_k = self.o, self.norm_q, self.norm_k
        return attn


class CrossAttention(nn.Module):
    """Attention of every token to the text: k, v project the embedded context once per prompt (`text_kv`);
    `FusedCrossAttention` projects both with one GEMM."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = NormWeight(cfg.dim), NormWeight(cfg.dim)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the text K/V projections, which are never quantised: the block's compute dtype."""
        return self.k.weight.dtype

    def text_kv(self, context: torch.Tensor, ops: DiTOps) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of an embedded context [B, text_len, dim]: [B, text_len, H, D] each."""
        return self.norm_kv(self.k(context), self.v(context), ops)

    def norm_kv(self, k: torch.Tensor, v: torch.Tensor, ops: DiTOps) -> tuple[torch.Tensor, torch.Tensor]:
        B, Lt, _ = k.shape  # projected k, v [B, text_len, dim]
        H, D = self.cfg.num_heads, self.cfg.head_dim
        k = ops.rms_norm(k, self.norm_k.weight, self.cfg.eps).view(B, Lt, H, D)
        # kept for a whole generation: contiguous, so that v pins no fused output holding the unnormed k too
        return k, v.reshape(B, Lt, H, D).contiguous()

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], ops: DiTOps) -> torch.Tensor:
        B, L, _ = x.shape
        H, D = self.cfg.num_heads, self.cfg.head_dim
        q = ops.rms_norm(self.q(x), self.norm_q.weight, self.cfg.eps).view(B, L, H, D)
        out = ops.attention(q, kv[0], kv[1])  # all text rows, padding included, no mask
        return self.o(out.reshape(B, L, H * D))


class FusedCrossAttention(CrossAttention):
    """`CrossAttention` with the text k and v as one GEMM: `kv` [2*dim, dim] stacks their weights and biases."""

    def __init__(self, attn: CrossAttention):
        nn.Module.__init__(self)  # skip CrossAttention.__init__: attn's layers are taken over, not allocated
        self.cfg = attn.cfg
        self.q = attn.q
        self.kv = stack_linears([attn.k, attn.v])
        self.o, self.norm_q, self.norm_k = attn.o, attn.norm_q, attn.norm_k

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.kv.weight.dtype

    def text_kv(self, context: torch.Tensor, ops: DiTOps) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm_kv(*self.kv(context).chunk(2, dim=-1), ops)

    def unfused(self) -> CrossAttention:
        with torch.device("meta"):  # placeholders, replaced below: nothing is allocated
            attn = CrossAttention(self.cfg)
        attn.q, (attn.k, attn.v) = self.q, split_linear(self.kv, 2)
        attn.o, attn.norm_q, attn.norm_k = self.o, self.norm_q, self.norm_k
        return attn


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.self_attn = SelfAttention(cfg)
        self.norm3 = NormWeight(cfg.dim, bias=True)  # affine LayerNorm before cross-attention
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)
        # what the two modulated LayerNorms write: None, the compute dtype; float8_e4m3fn, E4M3 rows with
        # per-token scales (kernels.fp8_quant.FP8Rows) for FP8 readers, set by quant.quantize_dit_fp8_
        self.attn_input_dtype: torch.dtype | None = None
        self.ffn_input_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor, e0: torch.Tensor, segments: SegmentMap,
                rope: tuple[torch.Tensor, torch.Tensor], text_kv: tuple[torch.Tensor, torch.Tensor],
                ops: DiTOps, attention: Callable | None = None) -> torch.Tensor:
        # x: [B, L, dim] fp32 residual stream; e0: [B, S, 6, dim] fp32 per-segment modulation
        eps, cdt = self.cfg.eps, self.cross_attn.compute_dtype
        mod = (self.modulation.float()[:, None] + e0).unbind(2)  # 6 x [B, S, dim]
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = mod
        h = ops.layernorm_modulate(x, shift_sa, scale_sa, segments, eps, self.attn_input_dtype or cdt)  # [B, L, dim]
        x = ops.gated_residual(x, self.self_attn(h, rope, ops, attention), gate_sa, segments)
        h = ops.layer_norm(x, self.norm3.weight, self.norm3.bias, eps).to(cdt)  # no modulation, no gate
        x = x + self.cross_attn(h, text_kv, ops).float()
        h = ops.layernorm_modulate(x, shift_ffn, scale_ffn, segments, eps, self.ffn_input_dtype or cdt)
        return ops.gated_residual(x, self.ffn(h), gate_ffn, segments)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.head = nn.Linear(cfg.dim, cfg.patch_numel * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, segments: SegmentMap, ops: DiTOps) -> torch.Tensor:
        # x: [B, L, dim] fp32; e: [B, S, dim] fp32, the time embedding before SiLU and projection
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # [B, S, dim] each
        h = ops.layernorm_modulate(x, shift, scale, segments, self.cfg.eps, torch.float32)
        return F.linear(h, self.head.weight.float(), self.head.bias.float())  # fp32 head, as Wan


class WanDiT(nn.Module):
    """Wan2.2 DiT. `forward(latent, timestep, context)` is the Wan call; `forward_groups` the AnyID one;
    `forward_tokens` the same forward on tensors only (what both run, and what export traces)."""

    def __init__(self, cfg: DiTConfig, backend: str = "torch", attention_quant: str | None = None):
        super().__init__()
        self.cfg = cfg
        if backend not in ("torch", "triton", "auto"):  # "auto": chosen per op by measurement (kernels/select.py)
            raise ValueError(f"WanDiT backend must be 'torch', 'triton' or 'auto' (the one for a device: "
                             f"anyid_rt.kernels.resolve_backend(backend, device)), got {backend!r}")
        self.backend = backend
        self.attention_quant = attention_quant  # None, or an 8-bit attention mode (kernels.ATTENTION_QUANT)
        self.ops = dit_ops(backend, attention_quant)
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = False
        self._layout_cache: dict[tuple, object] = {}
        # forward_tokens as replayed from CUDA graphs (anyid_rt/compiled.py, compile="cudagraphs"); None: eager
        self.step_graphs: Callable | None = None

    # -- inputs -------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.text_embedding[0].weight.dtype

    def pad_context(self, context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """`pad_context` with this model's config: [B, text_len, text_dim]."""
        return pad_context(self.cfg, context)

    def embed_text(self, context: torch.Tensor, ops: DiTOps | None = None) -> TextKV:
        """Embed a zero-padded context [B, text_len, text_dim] and project every block's cross-attention K/V."""
        ops = self.ops if ops is None else ops
        # [B, text_len, dim]: the padded rows become a constant row, attended to like the others (no mask)
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight))
        return TextKV([blk.cross_attn.text_kv(ctx, ops) for blk in self.blocks])

    def prepare_text(self, context: torch.Tensor | Sequence[torch.Tensor]) -> TextKV:
        """Pad, embed and project the text context once per prompt (a list of [L_i, text_dim] or a tensor)."""
        return self.embed_text(pad_context(self.cfg, context))

    def _cached(self, key: tuple, build):
        """A per-layout table (RoPE, segment index), built once and reused by every step of a generation. Built
        outside inference mode, as normal tensors, so that a later training forward can save them for backward."""
        if key not in self._layout_cache:
            if len(self._layout_cache) > 32:
                self._layout_cache.clear()
            with torch.inference_mode(False):
                self._layout_cache[key] = build()
        return self._layout_cache[key]

    def rope(self, grids: Sequence[tuple[int, int, int]], frame_starts: Sequence[int],
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (cos, sin) for the concatenated groups; cached per layout, never rebuilt in the step loop."""
        key = ("rope", tuple(grids), tuple(frame_starts), str(device))
        return self._cached(key, lambda: rope_tables(self.cfg, grids, frame_starts, device))

    def segment_map(self, lens: Sequence[int], device: torch.device) -> SegmentMap:
        """The kernels' token -> segment map of segment lengths `lens`; cached per layout."""
        key = ("segments", tuple(lens), str(device))
        return self._cached(key, lambda: SegmentMap.from_lens(lens, device))

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The patch embedding over patchified tokens [B, L, in_dim*pt*ph*pw] -> [B, L, dim] fp32: the Conv3d
        (stride = kernel) as the linear map it is, which also traces to one MatMul with dynamic L."""
        w = self.patch_embedding.weight  # [dim, in_dim, pt, ph, pw]
        return F.linear(patches.to(w.dtype), w.flatten(1), self.patch_embedding.bias).float()

    # -- inference-time transforms (the engine applies them; checkpoints and LoRA files keep the names) ------
    @property
    def projections_fused(self) -> bool:
        return isinstance(self.blocks[0].self_attn, FusedSelfAttention)

    @torch.no_grad()
    def fuse_projections(self) -> "WanDiT":
        """Compute self-attention q, k, v with one GEMM and the text k, v with another, in every block (in place;
        fused blocks are left as they are). The engine calls it after merging LoRAs and before FP8 quantisation,
        which then quantises the fused layers (`models.linears.fused_names`). The maths is unchanged: the same
        dot products, up to the GEMM's summation order. LoRA training (trainer/lora.py) and the ONNX export
        run the unfused model, and `checkpoint_state_dict` / `save_dit` write the unfused names."""
        for block in self.blocks:
            if not isinstance(block.self_attn, FusedSelfAttention):
                block.self_attn = FusedSelfAttention(block.self_attn)
            if not isinstance(block.cross_attn, FusedCrossAttention):
                block.cross_attn = FusedCrossAttention(block.cross_attn)
        return self

    @torch.no_grad()
    def unfuse_projections(self) -> "WanDiT":
        """Undo `fuse_projections` (in place): the checkpoint's separate q, k, v layers again, holding the same
        values (merged LoRAs included)."""
        for block in self.blocks:
            if isinstance(block.self_attn, FusedSelfAttention):
                block.self_attn = block.self_attn.unfused()
            if isinstance(block.cross_attn, FusedCrossAttention):
                block.cross_attn = block.cross_attn.unfused()
        return self

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """`state_dict()` under the checkpoint's names, in the checkpoint's order: each fused projection's
        weight and bias split into its pieces' (`models.linears.checkpoint_names`; copies, since safetensors
        refuses tensors that share memory), every other entry as `state_dict()` gives it."""
        sd = self.state_dict()
        out: dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            module, _, param = key.rpartition(".")
            pieces = checkpoint_names(module)
            if len(pieces) == 1:
                out[key] = value
                continue
            if param not in ("weight", "bias"):
                raise ValueError(f"{key}: a fused {type(self.get_submodule(module)).__name__} has no checkpoint "
                                 "form (quantised layers are not saved); save the model before quantising it")
            if param == "weight":  # the first entry of the module: every piece's weight and bias, in order
                for i, name in enumerate(pieces):
                    out[f"{name}.weight"] = value.chunk(len(pieces))[i].clone()
                    if f"{module}.bias" in sd:
                        out[f"{name}.bias"] = sd[f"{module}.bias"].chunk(len(pieces))[i].clone()
        return out

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, latent: torch.Tensor, timestep: torch.Tensor,
                context: torch.Tensor | Sequence[torch.Tensor] | TextKV) -> torch.Tensor:
        """Wan call: latent [B, 48, F, h, w], timestep [B] or [B, L] (per token), context [B, Lt, text_dim]
        or a list of [L_i, text_dim] (or a prepared TextKV). Returns the velocity [B, 48, F, h, w] fp32."""
        f, h, w = grid_of(self.cfg, latent)
        seg = Segments.from_timesteps(timestep.to(latent.device), f * h * w)
        return self.forward_groups([latent], [0], seg, context)

    def forward_groups(self, latents: Sequence[torch.Tensor], frame_starts: Sequence[int], segments: Segments,
                       context: torch.Tensor | Sequence[torch.Tensor] | TextKV,
                       block_stack: BlockStack | None = None) -> torch.Tensor:
        """AnyID call: token groups (target first, then references) with their RoPE frame starts, one
        sequence through every block; segments cover all tokens in that order. Returns the velocity of
        the first group [B, 48, F0, h0, w0] fp32. `block_stack` replaces `run_blocks` (a step cache)."""
        cfg = self.cfg
        grids = group_grids(cfg, latents, frame_starts, segments)
        B, device = latents[0].shape[0], latents[0].device
        text_kv = context if isinstance(context, TextKV) else self.prepare_text(context)
        if text_kv.batch != B:
            raise ValueError(f"context batch {text_kv.batch} != latent batch {B}")
        if block_stack is not None and self.step_graphs is not None:
            raise ValueError("a step cache decides per step whether the blocks run, which a CUDA graph of the whole "
                             "step cannot; use compile=True (not 'cudagraphs') with a cache")
        run = self.forward_tokens if self.step_graphs is None else self.step_graphs
        out = run(
            torch.cat([patchify(cfg, z) for z in latents], dim=1),  # [B, L, in_dim*pt*ph*pw]
            sinusoidal_embedding(segments.t.to(device), cfg.freq_dim),  # [B, S, freq_dim]
            self.segment_map(segments.lens, device), self.rope(grids, frame_starts, device), text_kv,
            **({} if block_stack is None else {"block_stack": block_stack}))
        f0, h0, w0 = grids[0]
        return unpatchify(cfg, out[:, :f0 * h0 * w0], grids[0])  # the target group's tokens

    def forward_tokens(self, patches: torch.Tensor, t_freq: torch.Tensor, segments: SegmentMap,
                       rope: tuple[torch.Tensor, torch.Tensor], text: TextKV | torch.Tensor,
                       ops: DiTOps | None = None, block_stack: BlockStack | None = None) -> torch.Tensor:
        """The forward on tensors only, every host-side decision of a call already in its inputs:

        patches [B, L, in_dim*pt*ph*pw]  patchified latents of every group, in sequence order (`patchify`)
        t_freq  [B, S, freq_dim] fp32    Wan's timestep sinusoid per segment (`sinusoidal_embedding`, float64
                                         on the host)
        segments                         each token's segment (index [L]; lengths where the kernels need them)
        rope    2 x [L, head_dim/2] fp32 RoPE (cos, sin) per token (`rope_tables`)
        text                             per-block cross-attention K/V (`prepare_text`, once per prompt), or
                                         the zero-padded context [B, text_len, text_dim], embedded here
        ops                              this model's ops unless given (the export traces the torch references)
        block_stack                      runs the blocks instead of `run_blocks` (same arguments plus the time
                                         embedding e): a step cache that may reuse a residual

        Returns the velocity tokens [B, L, pt*ph*pw*out_dim] fp32 of every token, (pt, ph, pw, C) order.
        """
        cfg = self.cfg
        ops = self.ops if ops is None else ops
        x = self.embed_patches(patches)  # [B, L, dim] fp32 residual stream
        # time embedding per segment (fp32): e [B, S, dim], e0 [B, S, 6, dim]
        e = _linear_fp32(self.time_embedding[2], F.silu(_linear_fp32(self.time_embedding[0], t_freq)))
        e0 = _linear_fp32(self.time_projection[1], F.silu(e)).unflatten(2, (6, cfg.dim))
        text_kv = text if isinstance(text, TextKV) else self.embed_text(text, ops)
        if block_stack is None:
            x = self.run_blocks(x, e0, segments, rope, text_kv, ops)
        else:
            x = block_stack(x, e, e0, segments, rope, text_kv, ops)
        return self.head(x, e, segments, ops)

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, segments: SegmentMap,
                   rope: tuple[torch.Tensor, torch.Tensor], text_kv: TextKV, ops: DiTOps,
                   attention_for: Callable[[int], Callable] | None = None) -> torch.Tensor:
        """Every block over the residual stream x [B, L, dim] fp32 (e0 [B, S, 6, dim]); returns the new stream.
        `attention_for(i)` gives block i's self-attention on the heads (default `ops.attention`)."""
        for i, block in enumerate(self.blocks):
            att = None if attention_for is None else attention_for(i)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, segments, rope, text_kv.kv[i], ops, att, use_reentrant=False)
            else:
                x = block(x, e0, segments, rope, text_kv.kv[i], ops, att)
        return x


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


def count_flops(cfg: DiTConfig, num_tokens: int, kv_tokens: int | None = None) -> float:
    """FLOPs (2 per multiply-add) of one forward for ONE sample, as ARCHITECTURE.md section 7 counts them.

    num_tokens queries attend to kv_tokens keys (default: the same tokens); the text K/V projections are
    computed once per prompt and not counted. 27,280 tokens give 517 TFLOP for the 5B.
    """
    L, Lk, Lt, d = num_tokens, kv_tokens or num_tokens, cfg.text_len, cfg.dim
    linears = 2 * L * d * (6 * d + 2 * cfg.ffn_dim)  # self q, k, v, o; cross q, o; ffn up and down
    attention = 4 * L * Lk * d + 4 * L * Lt * d  # scores and values, self and cross
    return float(cfg.num_layers * (linears + attention) + 2 * L * d * cfg.patch_numel * (cfg.in_dim + cfg.out_dim))


__all__ = ["WanDiT", "Segments", "TextKV", "SelfAttention", "FusedSelfAttention", "CrossAttention",
           "FusedCrossAttention", "stack_linears", "split_linear", "sinusoidal_embedding", "rope_table", "rope_tables",
           "grid_of", "group_grids", "patchify", "unpatchify", "pad_context", "count_flops"]
