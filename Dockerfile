# fedquic images (docs/cluster.md, "docker-compose cluster").
#
#   docker build --target server -t fedquic:server .    # aggregation server: no torch (~ a few hundred MB)
#   docker build -t fedquic:client .                    # training client (the default, last stage): CPU torch,
#                                                       # transformers, peft, bitsandbytes, and a tiny Llama model
#                                                       # + tokenizer built in at /opt/fedquic/model
#
# Build arguments:
#   BASE_IMAGE       Python 3.11+ image, Debian-like, with venv (default python:3.11-slim-bookworm;
#                    here: --build-arg BASE_IMAGE=local/python:3.11-bookworm)
#   TORCH_SPEC       the torch requirement, pinned to the CPU build (default torch==2.13.0+cpu). An unpinned
#                    torch from PyPI is the multi-GB CUDA build.
#   TORCH_INDEX_URL  where that build is published (default https://download.pytorch.org/whl/cpu); empty: only
#                    docker/wheels/ and PyPI. Wheels in docker/wheels/ (docker/fetch-wheels.sh) are used
#                    first, so the build needs no access to the PyTorch index when the wheel is there.
#   TINY_MODEL_SEED  seed of the tiny model built into the client image (default 0)
#
# GPU variant (a CUDA build of torch; the NVIDIA libraries come as pip wheels, so the base image stays the same;
# run with the NVIDIA container toolkit, `--gpus all`, and `fedquic client --profile gpu`):
#   docker build -t fedquic:client-gpu --build-arg TORCH_SPEC=torch==2.13.0 --build-arg TORCH_INDEX_URL= .
#   (PyPI's Linux x86_64 torch is the CUDA 12 build; or TORCH_SPEC=torch==2.13.0+cu128 with
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for a specific CUDA version)
#
# The classic builder (DOCKER_BUILDKIT=0, docker-compose 1.29) works: no BuildKit-only syntax is used.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: a virtual environment (Debian's system Python refuses pip installs, PEP 668) ------------------
FROM ${BASE_IMAGE} AS base
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/fedquic-entrypoint
RUN chmod 0755 /usr/local/bin/fedquic-entrypoint
WORKDIR /opt/fedquic
# Dependencies first (their layer depends on pyproject.toml only): EXTRAS lists the optional groups.
COPY pyproject.toml /opt/fedquic/src/pyproject.toml
COPY docker/install-deps.py /opt/fedquic/install-deps.py

# ---- server: the aggregation daemon, without torch ------------------------------------------------------
FROM base AS server
RUN python3 /opt/fedquic/install-deps.py /opt/fedquic/src/pyproject.toml
COPY README.md /opt/fedquic/src/
COPY fedquic/ /opt/fedquic/src/fedquic/
COPY common/ /opt/fedquic/src/common/
COPY transport/ /opt/fedquic/src/transport/
COPY server/ /opt/fedquic/src/server/
COPY client/ /opt/fedquic/src/client/
RUN pip install /opt/fedquic/src \
    && python3 -c "import importlib.util as u, fedquic.server.daemon; assert u.find_spec('torch') is None, 'torch'" \
    && fedquic --version
ENTRYPOINT ["fedquic-entrypoint"]
CMD ["fedquic", "--help"]

# ---- client-deps: torch (pinned CPU build) and the client extra, built apart so the wheel folder stays out
# of the final image's layers --------------------------------------------------------------------------------
FROM base AS client-deps
ARG TORCH_SPEC=torch==2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY docker/wheels/ /tmp/wheels/
RUN set -eu; \
    pip install --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"; \
    python3 /opt/fedquic/install-deps.py /opt/fedquic/src/pyproject.toml client; \
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---- client (default target): the training client and the tiny model ---------------------------------------
FROM base AS client
ARG TINY_MODEL_SEED=0
COPY --from=client-deps /opt/venv /opt/venv
COPY README.md /opt/fedquic/src/
COPY fedquic/ /opt/fedquic/src/fedquic/
COPY common/ /opt/fedquic/src/common/
COPY transport/ /opt/fedquic/src/transport/
COPY server/ /opt/fedquic/src/server/
COPY client/ /opt/fedquic/src/client/
RUN pip install "/opt/fedquic/src[client]" && fedquic --version
# The tiny Llama model and its tokenizer, built in code: no model hub at build or run time.
RUN python3 -c "import sys; from pathlib import Path; from fedquic.client.model import build_tiny_llama; \
print(build_tiny_llama(Path('/opt/fedquic/model'), seed=int(sys.argv[1])))" "$TINY_MODEL_SEED"
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
ENTRYPOINT ["fedquic-entrypoint"]
CMD ["fedquic", "--help"]
