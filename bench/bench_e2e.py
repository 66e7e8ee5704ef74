"""End-to-end benchmark, as a script: the same as `anyid-rt bench` (the code is bench/e2e.py, the package
`anyid_rt.bench`, which the `anyid-rt` command loads when its `bench` subcommand runs).

    python bench/bench_e2e.py --help                                          # or python -m anyid_rt.bench.bench_e2e
    python bench/bench_e2e.py --cases t2v --steps-timed 3                     # on a GPU machine
    python bench/bench_e2e.py --preset tiny --device cpu --steps-timed 1 --warmup 0
    python bench/report.py                                                    # tables and plots of the records
"""
import sys

from anyid_rt.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
