"""The DiT's denoising forward as a graph of tensors only, for ONNX / TensorRT.

`WanDiT.forward_groups` takes Python ints (segment lengths, per-group grids, RoPE frame starts); those do
not export as dynamic dimensions. `DiTStep` reuses the WanDiT's modules and weights unchanged and moves
every Python-int decision to the host, as tensors:

    input           shape                     what (host side: `dit_inputs`)
    tokens          [B, N, Cp]                patchified noisy target latent, Cp = 48*1*2*2 = 192
    ref_tokens      [B, R, Cp]                patchified reference latents, concatenated (R may be 0)
    t_freq          [B, S, freq_dim] fp32     Wan's timestep sinusoid of each segment (computed in float64
                                              on the host: TensorRT has no float64)
    seg_index       [N] int64                 segment of each target token
    ref_seg_index   [R] int64                 segment of each reference token
    rope_cos/sin    [N, head_dim/2] fp32      RoPE tables of the target tokens (`WanDiT.rope`)
    ref_rope_cos/sin [R, head_dim/2] fp32     RoPE tables of the reference tokens
    context         [B, text_len, text_dim]   zero-padded text encoder output
    -> velocity     [B, N, Cp]                velocity tokens of the target, (pt, ph, pw, C) order (fp32)

Target and reference inputs are separate so that every dimension is a free input dimension (N, R, B):
the output length is N by construction, and a TensorRT optimisation profile gives N and R their own
ranges (resolution x frames buckets, reference-count buckets). Modulation is per segment ([B, S, 6, dim])
and picked per token with a Gather on `seg_index`; the text K/V are recomputed inside the graph each call
(2 x 512 x dim^2 per block: about 0.1% of a 5B forward at 27k tokens), which keeps the graph's inputs few.

Numerics follow the WanDiT's torch path: fp32 time embedding, modulation, norms, gates, residual stream
and head; the large linears in the weights' dtype (export a bf16 model for a bf16 graph).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DiTConfig
from ..kernels.attention import attention_ref
from ..kernels.norm import layer_norm_ref, rms_norm_ref
from ..models.dit import Segments, WanDiT, rope_table, sinusoidal_embedding

DIT_INPUTS = ("tokens", "ref_tokens", "t_freq", "seg_index", "ref_seg_index", "rope_cos", "rope_sin",
              "ref_rope_cos", "ref_rope_sin", "context")
DIT_OUTPUTS = ("velocity",)
OPSET = 18


# ---------------------------------------------------------------------------------------------------------
# Host side: the Python-int layout -> graph tensors, and back
# ---------------------------------------------------------------------------------------------------------

def patchify_tokens(latent: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, F, h, w] -> [B, F/pt * h/ph * w/pw, C*pt*ph*pw], token order (f, h, w), channels (C, pt, ph, pw):
    the order of the patch-embedding Conv3d's flattened weight, so that the conv becomes a linear."""
    B, C, f, h, w = latent.shape
    pt, ph, pw = patch
    x = latent.reshape(B, C, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)                                  # [B, f', h', w', C, pt, ph, pw]
    return x.reshape(B, (f // pt) * (h // ph) * (w // pw), C * pt * ph * pw)


def grid_of(cfg: DiTConfig, latent: torch.Tensor) -> tuple[int, int, int]:
    pt, ph, pw = cfg.patch_size
    if latent.ndim != 5 or latent.shape[1] != cfg.in_dim:
        raise ValueError(f"latent must be [B, {cfg.in_dim}, F, h, w], got {tuple(latent.shape)}")
    _, _, f, h, w = latent.shape
    if f % pt or h % ph or w % pw:
        raise ValueError(f"latent grid (F={f}, h={h}, w={w}) is not divisible by the patch {cfg.patch_size}")
    return f // pt, h // ph, w // pw


def pad_context(cfg: DiTConfig, context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, text_len, text_dim] zero-padded context from [B, L, text_dim] or a list of [L_i, text_dim]."""
    rows = list(context.unbind(0)) if isinstance(context, torch.Tensor) and context.ndim == 3 else list(context)
    out = []
    for i, c in enumerate(rows):
        if c.ndim != 2 or c.shape[1] != cfg.text_dim or c.shape[0] > cfg.text_len:
            raise ValueError(f"context {i} must be [L <= {cfg.text_len}, {cfg.text_dim}], got {tuple(c.shape)}")
        out.append(F.pad(c.float(), (0, 0, 0, cfg.text_len - c.shape[0])))
    return torch.stack(out)


def dit_inputs(cfg: DiTConfig, latents: Sequence[torch.Tensor], frame_starts: Sequence[int], segments: Segments,
               context: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The graph inputs of one `forward_groups(latents, frame_starts, segments, context)` call (fp32 / int64,
    on the latents' device). Needs only the config: no weights, so a TensorRT/Triton client can call it."""
    if len(latents) != len(frame_starts) or not latents:
        raise ValueError("give one RoPE frame start per latent group (at least the target)")
    grids = [grid_of(cfg, z) for z in latents]
    B, device = latents[0].shape[0], latents[0].device
    sizes = [f * h * w for f, h, w in grids]
    if sum(segments.lens) != sum(sizes) or tuple(segments.t.shape) != (B, len(segments.lens)):
        raise ValueError(f"segments {segments.lens} with t {tuple(segments.t.shape)} do not cover {sum(sizes)} "
                         f"tokens of batch {B}")
    seg = torch.repeat_interleave(torch.arange(len(segments.lens), device=device),
                                  torch.tensor(segments.lens, device=device))  # [L] int64
    tables = [rope_table(g, s, cfg, device) for g, s in zip(grids, frame_starts)]
    cos, sin = torch.cat([c for c, _ in tables]), torch.cat([s for _, s in tables])  # [L, D/2]
    n = sizes[0]
    refs = [patchify_tokens(z.float(), cfg.patch_size) for z in latents[1:]]
    ref_tokens = torch.cat(refs, 1) if refs else latents[0].new_zeros(B, 0, cfg.in_dim * cfg.patch_numel).float()
    ctx = pad_context(cfg, context).to(device)
    if ctx.shape[0] != B:
        raise ValueError(f"context batch {ctx.shape[0]} != latent batch {B}")
    return {
        "tokens": patchify_tokens(latents[0].float(), cfg.patch_size),
        "ref_tokens": ref_tokens,
        "t_freq": sinusoidal_embedding(segments.t.to(device), cfg.freq_dim),
        "seg_index": seg[:n].contiguous(), "ref_seg_index": seg[n:].contiguous(),
        "rope_cos": cos[:n].contiguous(), "rope_sin": sin[:n].contiguous(),
        "ref_rope_cos": cos[n:].contiguous(), "ref_rope_sin": sin[n:].contiguous(),
        "context": ctx,
    }


def unpatchify_tokens(cfg: DiTConfig, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Velocity tokens [B, F*H*W, pt*ph*pw*C] (C fastest) -> [B, C, F*pt, H*ph, W*pw] fp32 (as WanDiT.unpatchify)."""
    (f, h, w), (pt, ph, pw), C = grid, cfg.patch_size, cfg.out_dim
    x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, C)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(tokens.shape[0], C, f * pt, h * ph, w * pw).float()


# ---------------------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------------------

def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), layer.weight.float(), layer.bias.float())


class DiTStep(nn.Module):
    """`WanDiT.forward_groups` with tensor inputs (see the module docstring). Holds the WanDiT's modules
    (same parameters, not copies) and always runs the torch reference ops, whatever the DiT's backend."""

    def __init__(self, dit: WanDiT):
        super().__init__()
        self.dit = dit
        self.cfg = dit.cfg

    def forward(self, tokens: torch.Tensor, ref_tokens: torch.Tensor, t_freq: torch.Tensor,
                seg_index: torch.Tensor, ref_seg_index: torch.Tensor, rope_cos: torch.Tensor,
                rope_sin: torch.Tensor, ref_rope_cos: torch.Tensor, ref_rope_sin: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        dit, cfg = self.dit, self.cfg
        cdt = dit.compute_dtype
        n = tokens.shape[1]
        # patch embedding as a linear over patchified tokens: [B, L, Cp] -> [B, L, dim] fp32 residual stream
        w = dit.patch_embedding.weight
        x = F.linear(torch.cat([tokens, ref_tokens], 1).to(cdt), w.reshape(w.shape[0], -1),
                     dit.patch_embedding.bias).float()
        seg = torch.cat([seg_index, ref_seg_index])                              # [L]
        rope = (torch.cat([rope_cos, ref_rope_cos]), torch.cat([rope_sin, ref_rope_sin]))  # 2 x [L, D/2]

        # time embedding per segment, fp32: e [B, S, dim], e0 [B, S, 6, dim]
        e = _linear_fp32(dit.time_embedding[2], F.silu(_linear_fp32(dit.time_embedding[0], t_freq)))
        e0 = _linear_fp32(dit.time_projection[1], F.silu(e)).unflatten(2, (6, cfg.dim))
        ctx = dit.text_embedding(context.to(cdt))                                # [B, text_len, dim]

        for blk in dit.blocks:
            x = self._block(blk, x, e0, seg, rope, ctx)

        # head on the target tokens only
        x = x[:, :n]
        shift, scale = (dit.head.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # [B, S, dim] each
        h = self._modulate(x, shift, scale, seg_index, torch.float32)
        return F.linear(h, dit.head.head.weight.float(), dit.head.head.bias.float())     # [B, N, Cp] fp32

    # -- pieces of one block, per-token modulation through Gather on the segment index ----------------------
    def _modulate(self, x, shift, scale, seg, dtype):
        """LayerNorm (no affine, fp32) * (1 + scale[seg]) + shift[seg]; x [B, L, dim], shift/scale [B, S, dim]."""
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=self.cfg.eps)
        return (normed * (1 + scale[:, seg]) + shift[:, seg]).to(dtype)

    def _block(self, blk, x, e0, seg, rope, ctx):
        cfg = self.cfg
        cdt = blk.ffn[0].weight.dtype
        shift_sa, scale_sa, gate_sa, shift_ffn, scale_ffn, gate_ffn = (blk.modulation.float()[:, None] + e0).unbind(2)
        h = self._modulate(x, shift_sa, scale_sa, seg, cdt)                      # [B, L, dim]
        x = x + self._self_attn(blk.self_attn, h, rope).float() * gate_sa[:, seg]
        h = layer_norm_ref(x, blk.norm3.weight, blk.norm3.bias, cfg.eps).to(cdt)
        x = x + self._cross_attn(blk.cross_attn, h, ctx).float()
        h = self._modulate(x, shift_ffn, scale_ffn, seg, cdt)
        return x + blk.ffn(h).float() * gate_ffn[:, seg]

    def _self_attn(self, m, x, rope):
        B, L, _ = x.shape
        H, D, eps = self.cfg.num_heads, self.cfg.head_dim, self.cfg.eps
        q = rms_norm_ref(m.q(x), m.norm_q.weight, eps).view(B, L, H, D)
        k = rms_norm_ref(m.k(x), m.norm_k.weight, eps).view(B, L, H, D)
        v = m.v(x).view(B, L, H, D)
        return m.o(attention_ref(q, k, v, rope, rope).reshape(B, L, H * D))

    def _cross_attn(self, m, x, ctx):
        B, L, _ = x.shape
        Lt = ctx.shape[1]
        H, D, eps = self.cfg.num_heads, self.cfg.head_dim, self.cfg.eps
        q = rms_norm_ref(m.q(x), m.norm_q.weight, eps).view(B, L, H, D)
        k = rms_norm_ref(m.k(ctx), m.norm_k.weight, eps).view(B, Lt, H, D)
        v = m.v(ctx).view(B, Lt, H, D)
        return m.o(attention_ref(q, k, v).reshape(B, L, H * D))


def run_dit_step(step: DiTStep, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return step(*(inputs[k] for k in DIT_INPUTS))


# ---------------------------------------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------------------------------------

def sample_inputs(cfg: DiTConfig, batch: int = 2, target_grid=(2, 2, 3), ref_grids=((1, 2, 3),),
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random graph inputs of a layout (target grid and reference grids in tokens) with the AnyID segments:
    target at t, references at 0. Used to trace the export and to check it."""
    g = generator or torch.Generator().manual_seed(0)
    pt, ph, pw = cfg.patch_size

    def latent(grid):
        f, h, w = grid
        return torch.randn(batch, cfg.in_dim, f * pt, h * ph, w * pw, generator=g)

    latents = [latent(target_grid)] + [latent(r) for r in ref_grids]
    n = target_grid[0] * target_grid[1] * target_grid[2]
    r = sum(a * b * c for a, b, c in ref_grids)
    lens = (n, r) if r else (n,)
    t = torch.rand(batch, 1, generator=g) * 1000
    seg_t = torch.cat([t, torch.zeros(batch, 1)], 1) if r else t
    starts, cursor = [0], target_grid[0]
    for f, _, _ in ref_grids:
        starts.append(cursor)
        cursor += f
    ctx = [torch.randn(int(k), cfg.text_dim, generator=g) for k in torch.randint(3, 12, (batch,), generator=g)]
    return dit_inputs(cfg, latents, starts, Segments(lens, seg_t), ctx)


def dit_dynamic_shapes() -> dict[str, dict[int, object]]:
    """torch.export dynamic dims: batch B, target tokens N, reference tokens R, segments S."""
    from torch.export import Dim

    B, N, R, S = Dim("batch", min=1, max=64), Dim("tokens", min=1), Dim("ref_tokens", min=0), Dim("segments", min=1, max=64)
    return {"tokens": {0: B, 1: N}, "ref_tokens": {0: B, 1: R}, "t_freq": {0: B, 1: S}, "seg_index": {0: N},
            "ref_seg_index": {0: R}, "rope_cos": {0: N}, "rope_sin": {0: N}, "ref_rope_cos": {0: R},
            "ref_rope_sin": {0: R}, "context": {0: B}}


def export_dit_onnx(dit: WanDiT, path: str | Path, opset: int = OPSET, sample: dict | None = None) -> Path:
    """Export `DiTStep(dit)` to `path` (weights in `path.data` when they exceed protobuf's 2 GB) with
    dynamic batch, target tokens, reference tokens and segment count. Returns the path."""
    if opset < 18:
        raise ValueError(f"opset {opset} is too old: use 18 or newer (LayerNormalization, Reduce* with axes inputs)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = DiTStep(dit).eval()
    sample = sample or sample_inputs(dit.cfg)
    args = tuple(sample[k].to(dit.patch_embedding.weight.device) for k in DIT_INPUTS)
    with torch.no_grad():
        prog = torch.onnx.export(step, args, dynamo=True, input_names=list(DIT_INPUTS),
                                 output_names=list(DIT_OUTPUTS), dynamic_shapes=dit_dynamic_shapes(),
                                 opset_version=opset)
    _name_linears(prog.model, dit)
    save_program(prog, path)
    return path


_LINEAR_FX = re.compile(r"aten\.linear\.default\]\(args = \(%\w+, %\w+, %(\w+)\)")


def _name_linears(model, dit: WanDiT) -> None:
    """Give the graph the checkpoint's names: initializers lose the `dit.` prefix of the wrapper, and every
    linear's MatMul becomes `<module>/MatMul` with its (transposed, [in, out]) weight `<module>.weight_t`.
    The exporter records each node's FX call (`pkg.torch.onnx.fx_node`), whose bias argument names the
    module. TensorRT layer names, the Q/DQ pass and modelopt's node filters all key on these names."""
    params = {"p_dit_" + name.replace(".", "_"): name for name, _ in dit.named_parameters()}
    for value in list(model.graph.initializers.values()):
        if value.name.startswith("dit."):
            value.name = value.name[len("dit."):]
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        m = _LINEAR_FX.search(node.metadata_props.get("pkg.torch.onnx.fx_node", ""))
        bias = params.get(m[1]) if m else None
        if bias is None or not bias.endswith(".bias"):
            continue  # e.g. a bias cast to fp32 in a bf16 graph: left unnamed (and unquantised)
        module = bias[: -len(".bias")]
        node.name = f"{module}/{node.op_type}"
        weight = node.inputs[1]
        if weight is not None and weight.is_initializer() and not weight.name.startswith(module):
            weight.name = f"{module}.weight_t"


def save_program(prog, path: Path) -> None:
    """Save an ONNXProgram; large models keep their weights in one external file beside the graph."""
    big = sum(t.const_value.nbytes for t in prog.model.graph.initializers.values()
              if t.const_value is not None) > (1 << 30)
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    prog.save(str(path), external_data=big)


__all__ = ["DiTStep", "DIT_INPUTS", "DIT_OUTPUTS", "dit_inputs", "patchify_tokens", "unpatchify_tokens",
           "pad_context", "sample_inputs", "export_dit_onnx", "run_dit_step", "save_program"]
