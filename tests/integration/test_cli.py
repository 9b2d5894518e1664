"""The command line: every subcommand has --help, and the server side never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


@pytest.mark.parametrize("cmd", [[], ["server"], ["client"], ["demo"], ["certs"], ["certs", "init"]])
def test_help(cmd: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedquic", *cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: fedquic" in proc.stdout


def test_server_code_imports_without_torch() -> None:
    code = BLOCK_TORCH + (
        "import fedquic.server.daemon, fedquic.cli; from fedquic.cli import main; main(['server', '--help'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_server_refuses_missing_certificates_clearly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "fedquic", "server", "--certs", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "fedquic certs init" in proc.stderr


def test_certs_init_and_issue(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "pki"
    assert subprocess.run([sys.executable, "-m", "fedquic", "certs", "init", str(d)]).returncode == 0
    assert (
        subprocess.run([sys.executable, "-m", "fedquic", "certs", "issue", "edge-1", "--dir", str(d)]).returncode == 0
    )
    assert (d / "ca.pem").is_file() and (d / "clients" / "edge-1.pem").is_file()
    fq = [sys.executable, "-m", "fedquic", "certs"]
    assert subprocess.run([*fq, "revoke", "edge-1", "--dir", str(d)], timeout=60).returncode == 0
    listing = subprocess.run([*fq, "list", "--dir", str(d)], capture_output=True, text=True, timeout=60).stdout
    assert "edge-1" in listing and "revoked" in listing
    assert subprocess.run([*fq, "revoke", "nobody", "--dir", str(d)], timeout=60).returncode != 0
    assert (d / "server.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--rounds", "0"], "rounds"),
        (["--uplink", "int9"], "unknown encoding"),
        (["--downlink", "topk0"], "topk_ratio"),
    ],
)
def test_server_refuses_bad_config_with_one_clear_line(tmp_path, flags: list[str], says: str) -> None:  # type: ignore[no-untyped-def]
    from fedquic.transport.pki import init_dev_pki

    init_dev_pki(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "fedquic", "server", "--certs", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "invalid configuration" in proc.stderr and says in proc.stderr
    assert "Traceback" not in proc.stderr
