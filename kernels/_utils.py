"""Helpers shared by the Triton kernels: interpreter detection, device-family config choice, row tiling."""
from __future__ import annotations

import os

import torch
import triton

# Read once, at import: TRITON_INTERPRET must be set before triton is imported (tests/conftest.py does so on
# machines without CUDA), and the kernels pick a single small config under the interpreter because it runs
# every program in Python (autotuning there would take minutes and measure nothing).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"



def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of the CUDA device the kernels run on; None for CPU tensors (the interpreter)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def config_family(device: torch.device) -> str:
    """Which autotune list a device gets, by the shared memory one program may use: "sm90" (H100/H200, 227 KB),
    "sm80" (A100, 163 KB) or "sm8x" (sm86/sm89: RTX 30xx/40xx, A10, L4, L40S, 99 KB); "sm80" on a CPU."""
    capability = device_capability(device)
    if capability is None or capability == (8, 0):
        return "sm80"
    return "sm90" if capability[0] >= 9 else "sm8x"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (programs for persistent reductions); 2 under the interpreter."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_tiling(n_cols: int, elem_budget: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_R rows, BLOCK_N cols, num_warps) for a row-wise kernel holding whole rows in registers.

    BLOCK_N is the next power of two of the width (masked tail), so the width is limited to 64K columns.
    Narrow rows are packed several to a program so that each program still moves about `elem_budget`
    elements: 4K on a GPU (one 3072-wide DiT row per program, 8 warps), 16K under the interpreter, where
    a program's fixed cost is Python overhead rather than latency.
    """
    block_n = triton.next_power_of_2(n_cols)
    if block_n > 65536:
        raise ValueError(f"row width {n_cols} is above the 65536 columns a row-wise kernel holds in registers")
    budget = elem_budget or (16384 if INTERPRET else 4096)
    block_r = max(1, min(64, budget // block_n))
    num_warps = 4 if block_n * block_r <= 2048 else 8 if block_n * block_r <= 8192 else 16
    return block_r, block_n, num_warps


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """View x [..., N] as [M, N] with a unit column stride; copies only when no such view exists."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def check_triton_device(t: torch.Tensor) -> None:
    """Triton kernels take CUDA tensors; CPU tensors only under the interpreter (tests)."""
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"the Triton kernels need CUDA tensors, got one on {t.device}; use backend='torch' "
                           "(or set TRITON_INTERPRET=1 before importing triton, for tests)")

