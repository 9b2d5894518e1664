#!/usr/bin/env bash
# Create .venv and install fedquic with the client, dev and report extras (idempotent).
#
#   PYTHON=python3.11 ./scripts/install.sh     # choose the interpreter (3.10+)
#   TORCH_SPEC="" ./scripts/install.sh         # keep a torch you installed yourself (e.g. a CUDA build)
#
# By default torch is pinned to the 2.13.0 CPU build: an unpinned torch resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet $TORCH_SPEC -e '.[client,dev,report]'
.venv/bin/fedquic --version
