#!/usr/bin/env bash
# One call on a GPU machine: the `gpu` tests, then every kernel benchmark, all written into one folder.
#
#   bash bench/gpu_suite.sh [OUT_DIR]      (default: $OUT if set, else bench/results/gpu_run)
#
# OUT_DIR receives: env.txt (nvidia-smi, versions), pytest-gpu.log + .xml, bench_*.log, bench_*.jsonl, bench_*.png.
# Every step runs even if an earlier one fails; the exit status is non-zero if any failed.
# The GPU machines have no network: where anyid_rt is not installed, the package mapping of setup.py
# (anyid_rt.kernels -> kernels/, anyid_rt.bench -> bench/, ...) is rebuilt as a folder of symlinks on PYTHONPATH
# instead of pip.
# Knobs: PYTHON (interpreter), BENCH_ATTENTION_ARGS, BENCH_MODULATION_ARGS (extra arguments), e.g.
#   BENCH_ATTENTION_ARGS="--mode fwd --no-sweep" bash bench/gpu_suite.sh /tmp/run   (a quicker run)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/bench/results/gpu_run}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ] && "$REPO/.venv/bin/python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    PY="$REPO/.venv/bin/python"
  else
    PY="$(command -v python3 || command -v python)"
  fi
fi

# Run from a neutral folder: the repo's own anyid_rt/ must not shadow the mapped package.
cd "$OUT_DIR"
if ! "$PY" -c "import anyid_rt.kernels, anyid_rt.bench" 2>/dev/null; then
  SHIM="$(mktemp -d)"
  mkdir "$SHIM/anyid_rt"
  for entry in "$REPO"/anyid_rt/*; do ln -s "$entry" "$SHIM/anyid_rt/"; done
  for sub in kernels export trainer bench; do ln -s "$REPO/$sub" "$SHIM/anyid_rt/$sub"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import anyid_rt.kernels, anyid_rt.bench" || { echo "cannot import anyid_rt.kernels, anyid_rt.bench" >&2; exit 1; }
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git -C "$REPO" rev-parse HEAD 2>/dev/null
  git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null
  nvidia-smi 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

failed=()
step() {  # step NAME CMD...: run, tee its output to NAME.log, remember a failure
  local name="$1"; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

step pytest-gpu "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml "$OUT_DIR/pytest-gpu.xml" "$REPO/tests"
# shellcheck disable=SC2086  # the extra arguments are meant to split
step bench_attention "$PY" "$REPO/bench/bench_attention.py" --out "$OUT_DIR" ${BENCH_ATTENTION_ARGS:-}
# shellcheck disable=SC2086
step bench_modulation "$PY" "$REPO/bench/bench_modulation.py" --compile --out "$OUT_DIR" ${BENCH_MODULATION_ARGS:-}

if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]} (logs in $OUT_DIR)"
  exit 1
fi
echo "all steps passed; results in $OUT_DIR"
