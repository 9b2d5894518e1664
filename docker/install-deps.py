"""Install a project's dependencies (and optional extras) from its pyproject.toml, without the project itself.

    python3 install-deps.py path/to/pyproject.toml [EXTRA ...]

Used by the Dockerfile so that the dependency layers depend on pyproject.toml only, not on the source.
Requirements already satisfied (e.g. a pinned torch installed before) are kept: pip's default upgrade
strategy leaves them alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _loads(text: str) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10 (e.g. a CUDA base image's system Python): tomli
        subprocess.check_call([sys.executable, "-m", "pip", "install", "tomli"])
        import tomli as tomllib
    return tomllib.loads(text)


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = _loads(pyproject.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"install-deps: no optional dependency group {extra!r} in {pyproject}")
        reqs += optional[extra]
    return reqs


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    reqs = requirements(Path(argv[0]), argv[1:])
    print("installing:", " ".join(reqs), flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", *reqs])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
