"""Every Triton kernel the DiT launches compiles for A100 (sm80), Ada (sm89) and Hopper (sm90) with at least one
config that fits the GPU's shared memory, and uses the tensor-core instructions it is meant to.

No GPU is needed: `anyid_rt.bench.cross_compile` compiles through Triton and ptxas for a chosen target in a
process without TRITON_INTERPRET (this test process runs the interpreter on a CPU, so it starts one). Each
architecture costs about half a minute of ptxas on two cores: the default run checks the inference kernels
for Hopper (sm90, the production GPU); sm80, sm89 and the training kernels carry the `slow` marker
(`pytest -m slow tests/test_cross_compile.py`).
"""
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from anyid_rt.bench.cross_compile import KERNEL_MODULES, SHARED_LIMIT, compile_only, launch_checks_for  # noqa: E402
from anyid_rt.kernels import _utils  # noqa: E402


def _cross_compile(tmp_path, arch: int, cases: list[str]) -> tuple[list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, "-m", "anyid_rt.bench.cross_compile", "--arch", str(arch), "--case",
                           *cases, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "kernel_resources.jsonl").read_text().splitlines()]
    assert (tmp_path / "kernel_resources.md").read_text().count("\n| ") == len(records) + 1  # + the header
    return records, proc.stdout


def _variant(r: dict) -> str:
    flags = sorted(k for k, v in r["constants"].items() if v is True)
    return r["kernel"] + ("[" + ",".join(flags) + "]" if flags else "")


def _check_runnable(records: list[dict], arch: int) -> dict[str, list[dict]]:
    """No config fails to compile, and every kernel variant has one that fits the shared memory."""
    errors = [r for r in records if r["error"]]
    assert not errors, [(r["kernel"], r["constants"], r["error"][:300]) for r in errors]
    by_variant = defaultdict(list)
    for r in records:
        assert r["arch"] == arch and r["registers"] > 0, r
        by_variant[_variant(r)].append(r)
    for variant, configs in by_variant.items():
        fitting = [c for c in configs if c["fits_shared"]]
        assert fitting, f"sm{arch}: no config of {variant} fits {SHARED_LIMIT[arch]} B of shared memory: " + \
            str([(c["constants"], c["num_warps"], c["num_stages"], c["shared_bytes"]) for c in configs])
        assert all(c["programs_per_sm"] >= 1 for c in fitting)
    return by_variant


# sm89's 99 KB of shared memory is what the sm80 (A100, 163 KB) configs would exceed; sm90 is the production GPU
@pytest.mark.parametrize("arch", [pytest.param(80, marks=pytest.mark.slow), pytest.param(89, marks=pytest.mark.slow),
                                  90])
def test_inference_kernels_fit(tmp_path, arch):
    records, out = _cross_compile(tmp_path, arch, ["forward", "int8 attention", "int8-fp8 attention"])
    by_variant = _check_runnable(records, arch)
    kernels = {r["kernel"] for r in records}
    assert {"_attn_fwd_kernel", "_norm_fwd_kernel", "_ln_modulate_fwd_kernel", "_gated_residual_fwd_kernel",
            "_attn8_fwd_kernel", "_quant_int8_kernel", "_kv_stats_kernel"} <= kernels
    # the DiT's self- and cross-attention run the kernel without RoPE (q and k are rotated in the q/k norm)
    assert "_attn_fwd_kernel" in by_variant and not any(v.startswith("_attn_fwd_kernel[") and "ROPE" in v
                                                         for v in by_variant)
    assert "_norm_fwd_kernel[IS_RMS,ROPE]" in by_variant
    mma = {m for r in by_variant["_attn_fwd_kernel"] for m in r["mma"]}
    mma8 = {m for r in records if r["kernel"] == "_attn8_fwd_kernel" for m in r["mma"]}
    if arch == 90:  # Hopper's warpgroup MMA, for bf16, INT8 and FP8 operands
        assert any(m.startswith("wgmma") and m.endswith("bf16.bf16") for m in mma), mma
        assert any(m.startswith("wgmma") and "s8.s8" in m for m in mma8), mma8
        assert any(m.startswith("wgmma") and "e4m3.e4m3" in m for m in mma8), mma8
    else:
        assert any(m.startswith("mma ") and "bf16.bf16" in m for m in mma), mma
        assert any("s8.s8" in m for m in mma8), mma8
    if arch == 80:  # FP8 P @ V needs sm89: the runtime refuses it with the fix in the message
        assert "int8-fp8 attention: refused by the runtime" in out and "use pv='bf16'" in out
        assert not any("e4m3" in m for m in mma8)
    else:
        assert any("e4m3.e4m3" in m for m in mma8), mma8


@pytest.mark.slow
def test_training_kernels_fit_hopper(tmp_path):
    records, _ = _cross_compile(tmp_path, 90, ["backward"])
    by_variant = _check_runnable(records, 90)
    for kernel in ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_delta_kernel", "_norm_bwd_kernel",
                   "_ln_modulate_bwd_kernel", "_gated_residual_bwd_kernel"):
        assert any(v.split("[")[0] == kernel for v in by_variant), (kernel, sorted(by_variant))
    assert "_norm_bwd_kernel[IS_RMS,ROPE]" in by_variant


@pytest.mark.skipif(not _utils.INTERPRET, reason="only meaningful where the kernels run under the interpreter")
def test_refuses_under_the_interpreter():
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        with compile_only(90):
            pass


def test_launch_checks_answer_for_the_target_and_are_restored():
    """The tool steers the launchers only inside its context: the kernels' own functions come back after."""
    from anyid_rt.kernels import attention_8bit

    cpu, originals = torch.device("cpu"), (_utils.device_capability, _utils.check_triton_device)
    bound = {m: (getattr(m, "device_capability", None), getattr(m, "check_triton_device", None))
             for m in KERNEL_MODULES}
    with launch_checks_for((8, 9)):
        assert _utils.device_capability(cpu) == (8, 9) and attention_8bit.device_capability(cpu) == (8, 9)
        assert _utils.config_family(cpu) == "sm8x"  # the configs of the target, through the module's own lookup
        for module in KERNEL_MODULES:
            if hasattr(module, "check_triton_device"):
                assert module.check_triton_device(torch.zeros(1)) is None
    assert (_utils.device_capability, _utils.check_triton_device) == originals
    assert {m: (getattr(m, "device_capability", None), getattr(m, "check_triton_device", None))
            for m in KERNEL_MODULES} == bound
    assert _utils.device_capability(cpu) is None and _utils.config_family(cpu) == "sm80"


def test_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="arch 75 is not one of"):
        with compile_only(75):
            pass
