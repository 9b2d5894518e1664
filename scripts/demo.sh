#!/usr/bin/env bash
# Install (if needed) and run the local demo: a server and 3 clients on loopback, 3 rounds.
# Extra arguments go to `fedquic demo` (see `.venv/bin/fedquic demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/fedquic demo "$@"
