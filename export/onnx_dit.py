"""The DiT's denoising forward as a graph of tensors only, for ONNX / TensorRT.

The graph is `WanDiT.forward_tokens` itself, traced: `DiTStep` is a thin module around the WanDiT (same
modules and weights) that splits and joins its inputs, and `dit_inputs` is the host side of one
`forward_groups` call, built with the model's own helpers (models/dit.py):

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
and picked per token by a Gather on the segment index (the torch references' form); the text K/V are
recomputed inside the graph each call (2 x 512 x dim^2 per block: about 0.1% of a 5B forward at 27k
tokens), which keeps the graph's inputs few.

Numerics are the WanDiT's torch path: fp32 time embedding, modulation, norms, gates, residual stream and
head; the large linears in the weights' dtype (export a bf16 model for a bf16 graph).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import DiTConfig
from ..kernels import SegmentMap, dit_ops
from ..models.dit import (Segments, WanDiT, group_grids, pad_context, patchify, rope_tables,
                          sinusoidal_embedding)

DIT_INPUTS = ("tokens", "ref_tokens", "t_freq", "seg_index", "ref_seg_index", "rope_cos", "rope_sin",
              "ref_rope_cos", "ref_rope_sin", "context")
DIT_OUTPUTS = ("velocity",)
OPSET = 18


def dit_inputs(cfg: DiTConfig, latents: Sequence[torch.Tensor], frame_starts: Sequence[int], segments: Segments,
               context: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The graph inputs of one `forward_groups(latents, frame_starts, segments, context)` call (fp32 / int64,
    on the latents' device). Needs only the config: no weights, so a TensorRT/Triton client can call it."""
    grids = group_grids(cfg, latents, frame_starts, segments)
    B, device = latents[0].shape[0], latents[0].device
    n = grids[0][0] * grids[0][1] * grids[0][2]  # target tokens
    seg = SegmentMap.from_lens(segments.lens, device).index  # [L] int64
    cos, sin = rope_tables(cfg, grids, frame_starts, device)  # [L, D/2] each
    tokens = torch.cat([patchify(cfg, z.float()) for z in latents], dim=1)  # [B, L, Cp]
    ctx = pad_context(cfg, context).float().to(device)
    if ctx.shape[0] != B:
        raise ValueError(f"context batch {ctx.shape[0]} != latent batch {B}")
    return {
        "tokens": tokens[:, :n].contiguous(), "ref_tokens": tokens[:, n:].contiguous(),
        "t_freq": sinusoidal_embedding(segments.t.to(device), cfg.freq_dim),
        "seg_index": seg[:n].contiguous(), "ref_seg_index": seg[n:].contiguous(),
        "rope_cos": cos[:n].contiguous(), "rope_sin": sin[:n].contiguous(),
        "ref_rope_cos": cos[n:].contiguous(), "ref_rope_sin": sin[n:].contiguous(),
        "context": ctx,
    }


class DiTStep(nn.Module):
    """`WanDiT.forward_tokens` with the graph's inputs (see the module docstring). Holds the WanDiT (same
    parameters, not copies) and runs the torch reference ops whatever the DiT's backend: they trace to plain
    ONNX operators, where the Triton kernels would need plugins.

    The graph has one MatMul per checkpoint linear (`blocks.3.self_attn.q/MatMul`): TensorRT's layer names,
    the Q/DQ pass (one weight scale per layer, as modelopt's recipe) and modelopt's node filters key on those
    names. So a DiT whose projections the engine fused is unfused here, in place (`unfuse_projections`)."""

    def __init__(self, dit: WanDiT):
        super().__init__()
        self.dit = dit.unfuse_projections()
        self.ops = dit_ops("torch")

    def forward(self, tokens: torch.Tensor, ref_tokens: torch.Tensor, t_freq: torch.Tensor,
                seg_index: torch.Tensor, ref_seg_index: torch.Tensor, rope_cos: torch.Tensor,
                rope_sin: torch.Tensor, ref_rope_cos: torch.Tensor, ref_rope_sin: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        rope = (torch.cat([rope_cos, ref_rope_cos]), torch.cat([rope_sin, ref_rope_sin]))  # 2 x [N + R, D/2]
        out = self.dit.forward_tokens(torch.cat([tokens, ref_tokens], 1), t_freq,
                                      SegmentMap(torch.cat([seg_index, ref_seg_index])), rope, context, self.ops)
        return out[:, :tokens.shape[1]]  # [B, N, Cp] fp32: the target's velocity tokens


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

    B, N, R = Dim("batch", min=1, max=64), Dim("tokens", min=1), Dim("ref_tokens", min=0)
    S = Dim("segments", min=1, max=64)
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


__all__ = ["DiTStep", "DIT_INPUTS", "DIT_OUTPUTS", "dit_inputs", "sample_inputs", "export_dit_onnx", "run_dit_step",
           "save_program"]
