#!/usr/bin/env bash
# Sets up .venv with nnunet-ext (editable, with test and benchmark tools) next to stock nnU-Net from
# the package registry; with --demo, then runs the CPU demo (synthetic dataset -> plan -> train ->
# predict -> Dice).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "nnunet-ext needs Python >= 3.10 (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# nnunetv2 pulls torch (the registry build, which runs on CPU too) and torchvision; see README "Installing".
# torch's CUDA wheels are hundreds of MB: resume interrupted downloads rather than fail.
.venv/bin/python -m pip install --quiet --retries 10 --resume-retries 20 -e ".[test,bench]"
# The tests compare our Mamba with the real mamba_ssm: fetch its source once (not built; CPU-only).
(cd tests && ../.venv/bin/python -c 'import mamba_ssm_reference as r; r.fetch()')
.venv/bin/nnunet-ext list

if [ "${1:-}" = "--demo" ]; then
  .venv/bin/nnunet-ext demo
fi
