#!/usr/bin/env bash
# bench/gpu.sh: the GPU benchmark in one command, under 5 minutes, each stage with its own timeout
# (bench/gpu.py does the measuring; docs/performance.md, "GPU (bench/gpu.sh)").
#
#   bash bench/gpu.sh [--device cuda|cpu] [--quick]   -> $OUT/gpu.json, gpu.log, pytest_cuda.log
#   bash bench/gpu.sh --fetch-wheels   # where pip reaches PyPI: .whl/ for a GPU host without it
#
# Environment: PYTHON (an interpreter with torch; default python3), OUT (default
# bench/results/gpu), BENCH_DEVICE (default cuda), WHEELS (default .whl), GPU_BENCH_TOTAL_S
# (default 290: the stages' timeouts are cut to what is left of it).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DEVICE=${BENCH_DEVICE:-cuda}
QUICK=()
FETCH=0
while (($#)); do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --quick) QUICK=(--quick); shift ;;
    --fetch-wheels) FETCH=1; shift ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
WHEELS=${WHEELS:-$ROOT/.whl}
REQS=$ROOT/bench/gpu-requirements.txt
PY=${PYTHON:-python3}

if ((FETCH)); then
  # The GPU host runs Python 3.12 on x86-64 and reaches no registry: fetch its wheels here.
  mkdir -p "$WHEELS"
  if [ "$WHEELS" = "$ROOT/.whl" ] && [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null
  then
    echo '/.whl/' >> .git/info/exclude
  fi
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" -r "$REQS"
fi

OUT=${OUT:-$ROOT/bench/results/gpu}
TOTAL=${GPU_BENCH_TOTAL_S:-290}
SITE=${GPU_BENCH_SITE:-${TMPDIR:-/tmp}/bluesky-ptychopinn-gpu-site}
NEED="import numpy, scipy, h5py, safetensors, pydantic, rich, bluesky, ophyd, event_model, pytest"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

has_torch() {  # the interpreter imports torch, and sees a GPU unless --device cpu
  if [ "$DEVICE" = cpu ]; then
    "$1" -c "import torch" 2>/dev/null
  else
    "$1" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null
  fi
}

setup_env() {
  # 1. torch: use the interpreter's own (on the GPU host python3 holds CUDA torch; it is itself a
  #    venv, so a venv made from it would not see that torch). Only without one: a venv with
  #    --system-site-packages and pip install torch (needs a package index).
  if ! has_torch "$PY"; then
    local venv=${TMPDIR:-/tmp}/bluesky-ptychopinn-gpu-venv
    echo "$PY: no torch$([ "$DEVICE" = cpu ] || echo ' seeing a GPU'): venv $venv + pip install torch"
    python3 -m venv --system-site-packages "$venv" && PY=$venv/bin/python
    has_torch "$PY" || timeout 240 "$PY" -m pip install -q torch \
      || echo "pip install torch failed (no package index?)"
  fi
  # 2. the package's other dependencies, into a --target folder on PYTHONPATH (the package itself
  #    runs from the working tree: PYTHONPATH starts with the repository root).
  if ! "$PY" -c "$NEED" 2>/dev/null; then
    mkdir -p "$SITE"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (offline)"
      timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
        --target "$SITE" "$WHEELS"/*.whl || echo "wheel install failed"
    else
      echo "no wheels in $WHEELS: installing bench/gpu-requirements.txt from the package index"
      timeout 120 "$PY" -m pip install -q --retries 1 --timeout 15 --no-deps --upgrade \
        --target "$SITE" -r "$REQS" || echo "pip install failed (no package index?)"
    fi
  fi
  if ! "$PY" -c "$NEED" 2>/dev/null && [ -n "${VIRTUAL_ENV:-}${venv:-}" ]; then
    echo "still missing imports: pip install -e .[test] into $PY's environment"
    timeout 150 "$PY" -m pip install -q -e ".[test]" || echo "pip install -e .[test] failed"
  fi
  "$PY" -c "$NEED" || echo "WARNING: imports still fail; the stages will record their errors"
  "$PY" -c "import sys, torch; print(sys.executable, 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'available', torch.cuda.is_available())" || true
}

budget() {  # a stage's timeout: what it asks for, cut to what is left of the total
  local want=$1 left=$((TOTAL - SECONDS - 5))
  ((left < want)) && want=$left
  ((want < 5)) && want=5
  echo "$want"
}

run_stage() {
  local name=$1 want=$2 t rc why
  if ((TOTAL - SECONDS < 15)); then
    echo "== stage $name not run: the ${TOTAL} s total is spent"
    "$PY" bench/gpu.py --out "$OUT" --record-error "$name" "not run: the ${TOTAL} s total was spent"
    return
  fi
  t=$(budget "$want")
  echo "== $(date +%T) stage $name (timeout ${t} s, ${SECONDS} s elapsed)"
  timeout -k 10 "$t" "$PY" bench/gpu.py --stage "$name" --device "$DEVICE" "${QUICK[@]}" \
    --out "$OUT" --budget-s $((t - 5))
  rc=$?
  if ((rc != 0)); then
    why="exited with status $rc"
    ((rc == 124 || rc == 137)) && why="killed by its ${t} s timeout"
    "$PY" bench/gpu.py --out "$OUT" --record-error "$name" "$why (see gpu.log)"
  fi
}

main() {
  echo "bench/gpu.sh on ${HOSTNAME:-?} $(date '+%F %T'): device $DEVICE ${QUICK[*]}, out $OUT"
  command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi
  echo "cores: $(nproc)"
  setup_env
  echo "environment ready after ${SECONDS} s"
  "$PY" bench/gpu.py --out "$OUT" --note setup_s "$SECONDS" --note python "$PY" \
    --note command "bench/gpu.sh --device $DEVICE ${QUICK[*]}"
  run_stage info 20
  run_stage tests 60
  run_stage network 80
  run_stage refiner 40
  run_stage live 55
  "$PY" bench/gpu.py --out "$OUT" --note total_s "$SECONDS"
  echo "== summary (${SECONDS} s in all; $OUT/gpu.json)"
  "$PY" bench/gpu.py --out "$OUT" --summary
}

mkdir -p "$OUT"
rm -f "$OUT/gpu.json" "$OUT/pytest_cuda.log"
main 2>&1 | tee "$OUT/gpu.log"
