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
"""
from __future__ import annotations

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

__all__ = ["SELF_ATTN_LINEARS", "CROSS_ATTN_LINEARS", "FFN_LINEARS", "BLOCK_LINEARS", "TEXT_KV_LINEARS",
           "HIGH_PRECISION_LINEARS"]
