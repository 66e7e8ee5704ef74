"""anyid_rt.bench: the benchmarks and measurement tools (setup.py maps this folder to `anyid_rt.bench`).

Tooling, not runtime: nothing in anyid_rt/, kernels/, export/ or trainer/ imports it; the `anyid-rt bench`
subcommand loads it by name when it runs. Every script here runs both ways, `python bench/bench_x.py` and
`python -m anyid_rt.bench.bench_x`.

    timing.py        the one timing harness: measure / summarize / Measurement, peak memory, environment record
    settings.py      the typed settings of an `anyid-rt bench` run (no torch: `--help` is instant)
    run.py           benchmark cases and the record sink of a run
    baseline.py      diffusers' WanTransformer3DModel on our weights, its attention backends, one step's inputs
    stages.py        the measured ceiling (matmul, copy), text encoding, reference encoding, VAE decode
    e2e.py           `anyid-rt bench`: the command line
    video.py         the run's measurement sequence: ceiling, stages, guided steps, whole videos
    report.py        tables and plots of the records in bench/results/
    cross_compile.py ptxas resource reports of every Triton kernel for a GPU that is not here
    bench_*.py       kernel, VAE, loading and FP8 benchmarks (scripts)

This file imports nothing: a kernel benchmark must be able to set TRITON_INTERPRET before triton is imported.
"""
