#!/usr/bin/env bash
# Download, into .whl/, the wheels that the device machine (Python 3.12, x86-64, no network)
# lacks for flyp, at exact pinned versions: open_clip_torch (it ships open_clip_train, whose
# train_one_epoch benchmarks/gpu_check.py runs) and its needs that are not installed there (ftfy,
# wcwidth), plus timm, which is there in an unknown version while open_clip needs timm>=1.0.17.
# Everything else flyp and its tests import (torch, torchvision, transformers, safetensors,
# scikit-learn, matplotlib, pyyaml, regex, tqdm, h5py, scipy, tensorboard, pytest, pytest-xdist,
# pytest-timeout) is in the device image (/work/.library/device/KINDS.md); wandb is not, and the
# W&B tests skip there. The default model's weight packages (~106 MB) are left behind:
# benchmarks/gpu_check.sh deselects their tests there.
# PINS are the versions this checkout's .venv runs, what the tests passed with
# (tests/test_gpu_check.py fails when they drift apart); the script says so if they differ here.
# Run from the repository root:  bash benchmarks/gpu_fetch_wheels.sh   (it git-ignores .whl
# through .git/info/exclude); then carry ".whl" in the device run.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=${1:-.whl}

declare -A PINS=([open_clip_torch]=3.3.0 [ftfy]=6.3.1 [wcwidth]=0.9.5 [timm]=1.0.31)
exclude=$(git rev-parse --git-path info/exclude)  # keeps .whl out of git, yet it travels (carry)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

specs=()
for name in open_clip_torch ftfy wcwidth timm; do
  here=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
  [ -n "$here" ] && [ "$here" != "${PINS[$name]}" ] &&
    echo "note: $name is $here in $PY, pinned ${PINS[$name]}: fetching the pin" >&2
  specs+=("$name==${PINS[$name]}")
done
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" "${specs[@]}"
ls -l "$DEST"
echo "total: $(du -sk "$DEST" | cut -f1) KiB for ${specs[*]}"
