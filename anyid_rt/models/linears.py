"""Which linear layers of the DiT are treated specially, by role: the one list for LoRA, FP8 and the export.

Block names are relative to a block (`blocks.{i}.<name>`); the others are names in the whole `WanDiT`.
Each consumer picks from these on purpose:

- LoRA (trainer/lora.py `DEFAULT_TARGETS`) adapts every `BLOCK_LINEARS` layer (the AnyID / DiffSynth set).
- The FP8 engine (quant.py `FP8_TARGETS`) quantises `BLOCK_LINEARS` except `TEXT_KV_LINEARS`: the engine
  runs those once per prompt (`WanDiT.prepare_text`), so FP8 would save nothing and only cost accuracy.
- The FP8 / INT8 Q/DQ graph (export/qdq.py `QUANTIZED`) quantises all of `BLOCK_LINEARS`: the exported
  step computes the text K/V inside the graph on every call, so there they are per-step work.
- `HIGH_PRECISION_LINEARS` stay in high precision everywhere: their error reaches every token through the
  time embedding or the output (modelopt's Wan recipe excludes the same layers).

`FUSED_LINEARS` are the inference-time fusions (`WanDiT.fuse_projections`, applied by the engine after any
LoRA merge): the projections of one input run as one GEMM over their stacked weights. The names above stay
the names of record: checkpoints and LoRA files keep them (`checkpoint_names` maps a fused module back to its
pieces), LoRA training and the ONNX export run the unfused model, and the FP8 engine quantises the fused
layers (`fused_names` of its targets), so q, k and v share one quantisation of their input.
"""
from __future__ import annotations

from typing import Sequence

SELF_ATTN_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
CROSS_ATTN_LINEARS = ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")
FFN_LINEARS = ("ffn.0", "ffn.2")

# every nn.Linear inside a block, in forward order
BLOCK_LINEARS = SELF_ATTN_LINEARS + CROSS_ATTN_LINEARS + FFN_LINEARS

# the cross-attention projections of the text context: per prompt in the engine, per call in an exported graph
TEXT_KV_LINEARS = ("cross_attn.k", "cross_attn.v")

# outside the blocks, in the order an exported graph runs them; the patch embedding is a Conv3d in the model
# and a MatMul on patch tokens in the graph
HIGH_PRECISION_LINEARS = ("patch_embedding", "time_embedding.0", "time_embedding.2", "time_projection.1",
                          "text_embedding.0", "text_embedding.2", "head.head")

# fused name -> its pieces, whose weights it stacks (rows) in this order
FUSED_LINEARS = {"self_attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
                 "cross_attn.kv": TEXT_KV_LINEARS}


def fused_names(names: Sequence[str]) -> tuple[str, ...]:
    """Block-relative linear names as a fused block has them: a fusion whose pieces are all in `names` takes
    the place of its first piece. A fusion with only some pieces in `names` is an error: one GEMM is one layer."""
    out = []
    for name in names:
        fused = next((f for f, pieces in FUSED_LINEARS.items() if name in pieces), None)
        if fused is None:
            out.append(name)
            continue
        missing = [p for p in FUSED_LINEARS[fused] if p not in names]
        if missing:
            raise ValueError(f"{name} is part of the fused {fused}, but {missing} are not in {list(names)}: "
                             "a fused projection is one layer; list all of its pieces or none")
        if fused not in out:
            out.append(fused)
    return tuple(out)


def checkpoint_names(name: str) -> tuple[str, ...]:
    """The checkpoint module names that a model's module `name` computes: the pieces of a fused projection
    (`blocks.3.self_attn.qkv` -> `blocks.3.self_attn.q`, `.k`, `.v`, each owning an equal block of rows of the
    fused weight, in this order), else `name` itself."""
    for fused, pieces in FUSED_LINEARS.items():
        if name == fused or name.endswith("." + fused):
            prefix = name[:len(name) - len(fused)]
            return tuple(prefix + p for p in pieces)
    return (name,)


__all__ = ["SELF_ATTN_LINEARS", "CROSS_ATTN_LINEARS", "FFN_LINEARS", "BLOCK_LINEARS", "TEXT_KV_LINEARS",
           "HIGH_PRECISION_LINEARS", "FUSED_LINEARS", "fused_names", "checkpoint_names"]
