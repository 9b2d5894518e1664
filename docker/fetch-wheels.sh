#!/usr/bin/env bash
# Put the pinned CPU torch wheel into docker/wheels/ for `docker build` (the Dockerfile installs torch
# from that folder first). Use it where the build cannot reach PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu) itself; this host's pip (its index, find-links or cache) fetches it.
#
#   docker/fetch-wheels.sh                       # torch==2.13.0+cpu for CPython 3.11, x86_64
#   TORCH_SPEC=torch==2.13.0+cpu PY=3.12 docker/fetch-wheels.sh
#   PIP=/path/to/pip docker/fetch-wheels.sh      # default: .venv/bin/pip, else python3 -m pip
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
TORCH_INDEX_URL=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
PY=${PY:-3.11}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
if [ -n "${PIP:-}" ]; then pip=($PIP); elif [ -x .venv/bin/pip ]; then pip=(.venv/bin/pip); else pip=(python3 -m pip); fi
idx=()
[ -n "$TORCH_INDEX_URL" ] && idx=(--extra-index-url "$TORCH_INDEX_URL")
mkdir -p docker/wheels
# --no-deps: torch's own dependencies are small and come from PyPI during the build.
"${pip[@]}" download --no-deps --only-binary=:all: --python-version "$PY" --platform "$PLATFORM" \
    "${idx[@]}" --dest docker/wheels "$TORCH_SPEC"
ls -l docker/wheels/*.whl
