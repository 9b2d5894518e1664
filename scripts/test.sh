#!/usr/bin/env bash
# Install (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
# Without arguments: everything except tests marked slow (about 5 minutes on 2 cores); `.ci/run` adds those.
if [ "$#" -eq 0 ]; then
    exec .venv/bin/pytest -m "not slow"
fi
exec .venv/bin/pytest "$@"
