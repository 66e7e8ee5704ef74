"""End-to-end benchmark, as a script: the same as `anyid-rt bench` (all the logic is in anyid_rt/benchmark.py,
so that the installed package can run it without this folder).

    python bench/bench_e2e.py --help
    python bench/bench_e2e.py --cases t2v --steps-timed 3                     # on a GPU machine
    python bench/bench_e2e.py --preset tiny --device cpu --steps-timed 1 --warmup 0
    python bench/report.py                                                    # tables and plots of the records
"""
import sys

from anyid_rt.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
