"""The docker-compose cluster (docker-compose.yml, Dockerfile, docker/entrypoint.sh).

* The compose file validates (``docker-compose config`` where the binary exists, else PyYAML) and has the
  expected topology: certificates, a server with a healthcheck and a published metrics port, three clients with
  their own data partition and certificate.
* Every service's command line is a real ``fedquic`` invocation: each one goes through the CLI's own parser.
* The same topology runs here as local processes: the compose commands and environments, with the container
  paths mapped to a temporary directory and ``server`` to 127.0.0.1, through the same entrypoint.
* ``slow``: a real ``docker-compose up`` in containers, on the private engine of ``../shared/tools/docker-up.sh``
  (skipped, saying why, where that engine cannot start).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedquic.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
SHARED_TOOLS = REPO.parent / "shared" / "tools"
CLIENTS = ("client-1", "client-2", "client-3")

# Container paths and where the local run puts them.
CONTAINER_DIRS = ("/certs", "/results", "/opt/fedquic/model")


# -- loading -------------------------------------------------------------------------------------------------


def _compose_binary() -> str | None:
    return shutil.which("docker-compose")


def load_compose() -> dict[str, Any]:
    """The compose file as docker-compose resolves it (``config``), else as PyYAML reads it; skip if neither."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read docker-compose.yml")
    binary = _compose_binary()
    if binary is not None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDQUIC_", "COMPOSE_"))}
        proc = subprocess.run(
            [binary, "-f", str(COMPOSE_FILE), "config"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, f"docker-compose config rejected the file:\n{proc.stderr}"
        return yaml.safe_load(proc.stdout)
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert str(data.get("version", "")).startswith(("2", "3")), "compose file format must be 2.x or 3.x"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def _as_list(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(x) for x in command]


def fedquic_commands(service: dict[str, Any]) -> list[list[str]]:
    """The ``fedquic ...`` command lines of a service: its command, or each part of an ``sh -c "a && b"``."""
    argv = _as_list(service["command"])
    if argv[:2] == ["sh", "-c"]:
        assert len(argv) == 3, argv
        parts = [shlex.split(p) for p in argv[2].split("&&")]
    else:
        parts = [argv]
    for p in parts:
        assert p and p[0] == "fedquic", f"not a fedquic command line: {p}"
    return parts


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# -- the compose file -----------------------------------------------------------------------------------------


def test_compose_topology(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"certs", "server", *CLIENTS}
    # certs is a one-shot that `up` must not start (its exit would end `up --abort-on-container-exit`)
    assert services["certs"].get("profiles") == ["setup"]
    server = services["server"]
    assert server["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert _env(server)["FEDQUIC_METRICS__HOST"] == "0.0.0.0"
    assert any(str(p).endswith("9464") or "9464" in json.dumps(p) for p in server["ports"]), server["ports"]
    assert any("4433" in json.dumps(p) and "udp" in json.dumps(p) for p in server["ports"]), server["ports"]
    # the server waits for every client's done file: the list must name exactly the clients
    assert sorted(_env(server)["FEDQUIC_WAIT_FOR"].split()) == [f"/results/{c}/compose.done" for c in CLIENTS]
    tasks, seeds, certs = set(), set(), set()
    for name in CLIENTS:
        svc = services[name]
        dep = svc["depends_on"]
        assert "server" in dep and (not isinstance(dep, dict) or dep["server"]["condition"] == "service_healthy")
        (argv,) = fedquic_commands(svc)
        assert _opt(argv, "--client-id") == name
        tasks.add(_opt(argv, "--task"))
        seeds.add(_opt(argv, "--data-seed"))
        certs.add((_opt(argv, "--cert"), _opt(argv, "--key")))
        assert _opt(argv, "--run-dir") == f"/results/{name}"
        assert _env(svc)["FEDQUIC_DONE_FILE"] == f"/results/{name}/compose.done"
        assert _env(svc)["FEDQUIC_LINGER_FOR"] == _env(server)["FEDQUIC_DONE_FILE"]
        volumes = json.dumps(svc["volumes"])
        assert "/results" in volumes and "/certs" in volumes
    assert len(tasks) == len(seeds) == len(certs) == len(CLIENTS), "each client needs its own data and certificate"


def test_every_command_parses_with_the_fedquic_cli(compose: dict[str, Any]) -> None:
    parser = build_parser()
    seen: dict[str, list[str]] = {}
    for name, svc in compose["services"].items():
        for argv in fedquic_commands(svc):
            try:
                args = parser.parse_args(argv[1:])
            except SystemExit as exc:  # argparse reports the bad flag on stderr
                pytest.fail(f"service {name}: `{shlex.join(argv)}` is not a valid fedquic command ({exc})")
            seen.setdefault(name, []).append(args.func.__name__)
    assert seen["certs"][0] == "cmd_certs_init" and seen["certs"].count("cmd_certs_issue") == len(CLIENTS)
    assert seen["server"] == ["cmd_server"]
    for c in CLIENTS:
        assert seen[c] == ["cmd_client"]

    # TLS: the server certificate names the host the clients dial, and each client has a certificate issued
    certs_cmds = fedquic_commands(compose["services"]["certs"])
    init = parser.parse_args(certs_cmds[0][1:])
    issued = {parser.parse_args(c[1:]).client_id for c in certs_cmds[1:] if c[2] == "issue"}
    for c in CLIENTS:
        args = parser.parse_args(fedquic_commands(compose["services"][c])[0][1:])
        host, port = args.server
        assert (args.server_name or host) in init.host, f"{c} dials {host}, the certificate names {init.host}"
        assert args.client_id in issued
        assert args.cert == init.dir / "clients" / f"{c}.pem" and args.key == init.dir / "clients" / f"{c}.key"
        server = parser.parse_args(fedquic_commands(compose["services"]["server"])[0][1:])
        assert port == server.port and args.ca == server.certs / "ca.pem"


def test_a_second_up_on_the_same_results_starts_a_fresh_job(compose: dict[str, Any]) -> None:
    """Without it the server resumes the finished job from /results/server/state, ends at once, and the clients
    never join: a second `up` on the same compose-run/ failed."""
    (argv,) = fedquic_commands(compose["services"]["server"])
    args = build_parser().parse_args(argv[1:])
    assert args.on_finished == "restart"
    assert args.run_dir == Path("/results/server")


def run_healthcheck(server: dict[str, Any], metrics_port: int, ok_file: Path) -> subprocess.CompletedProcess[str]:
    """The compose healthcheck, run here: aimed at ``metrics_port`` and with the server's OK file at ``ok_file``."""
    check = [str(x) for x in server["healthcheck"]["test"]]
    assert check[0] == "CMD"
    container_ok = _env(server)["FEDQUIC_OK_FILE"]
    check = [a.replace(":9464/", f":{metrics_port}/").replace(container_ok, str(ok_file)) for a in check[1:]]
    check[0] = sys.executable if check[0] in ("python3", "python") else check[0]
    return subprocess.run(check, capture_output=True, text=True, timeout=30)


def test_healthcheck_counts_a_finished_server_as_healthy(compose: dict[str, Any], tmp_path: Path) -> None:
    """Once `fedquic server` has exited 0 its metrics port is closed, but its container still runs (it waits for
    the clients' done files): the healthcheck must not call it unhealthy. Before that, nothing listening is."""
    server = compose["services"]["server"]
    ok = tmp_path / "server.ok"
    ok.write_text("0")  # stale, from a container started before: the entrypoint removes it
    port = _free_port()  # nothing listens there: the server's metrics port is closed
    go = tmp_path / "go"
    entry = _entry(
        tmp_path,
        ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done"],  # `fedquic server`, until the test lets it end
        FEDQUIC_OK_FILE=str(ok),
        FEDQUIC_WAIT_FOR=str(tmp_path / "client.done"),
        FEDQUIC_DONE_FILE=str(tmp_path / "server.done"),
    )
    try:
        deadline = time.monotonic() + 10
        while ok.exists():
            assert time.monotonic() < deadline, "the stale OK file was not removed"
            time.sleep(0.05)
        assert run_healthcheck(server, port, ok).returncode != 0  # running, and no metrics port: unhealthy
        go.write_text("")
        _wait_file(ok)
        assert entry.poll() is None  # waiting for the clients' done files, its metrics port closed
        hc = run_healthcheck(server, port, ok)
        assert hc.returncode == 0, hc.stderr
    finally:
        entry.terminate()
        entry.wait(10)


# -- the entrypoint's exit ordering ------------------------------------------------------------------------------


def _entry(tmp_path: Path, argv: list[str], **env: str) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FEDQUIC_")}
    full.update(env)
    return subprocess.Popen(
        ["sh", str(ENTRYPOINT), *argv],
        env=full,
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _wait_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_entrypoint_without_settings_just_runs_the_command(tmp_path: Path) -> None:
    p = _entry(tmp_path, ["sh", "-c", "echo hello; exit 3"])
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 3 and "hello" in out


def test_entrypoint_orders_the_exits(tmp_path: Path) -> None:
    server_done, client_done = tmp_path / "server.done", tmp_path / "client.done"
    client_done.write_text("0")  # stale, from an earlier run: the server must not count it
    server = _entry(tmp_path, ["true"], FEDQUIC_WAIT_FOR=str(client_done), FEDQUIC_DONE_FILE=str(server_done))
    time.sleep(1.0)
    assert server.poll() is None and not server_done.exists(), "the server did not wait for the client"
    client = _entry(tmp_path, ["true"], FEDQUIC_DONE_FILE=str(client_done), FEDQUIC_LINGER_FOR=str(server_done))
    assert server.wait(10) == 0 and client.wait(10) == 0
    assert server_done.read_text().strip() == "0"


def test_entrypoint_signals(tmp_path: Path) -> None:
    import signal

    # while the command runs: passed on, exit 143 (the work did not finish)
    running = _entry(tmp_path, ["sleep", "30"], FEDQUIC_DONE_FILE=str(tmp_path / "a.done"))
    time.sleep(0.5)
    running.send_signal(signal.SIGTERM)
    assert running.wait(10) == 143 and not (tmp_path / "a.done").exists()
    # waiting for others before its own done file: not complete either
    waiting = _entry(
        tmp_path, ["true"], FEDQUIC_WAIT_FOR=str(tmp_path / "never"), FEDQUIC_DONE_FILE=str(tmp_path / "b")
    )
    time.sleep(0.5)
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(10) == 143
    # lingering after its done file: the work is done, exit 0
    lingering = _entry(
        tmp_path, ["true"], FEDQUIC_DONE_FILE=str(tmp_path / "c.done"), FEDQUIC_LINGER_FOR=str(tmp_path / "never")
    )
    _wait_file(tmp_path / "c.done")
    lingering.send_signal(signal.SIGTERM)
    assert lingering.wait(10) == 0
    # a failing command: its own status, no done file
    failing = _entry(tmp_path, ["sh", "-c", "exit 7"], FEDQUIC_DONE_FILE=str(tmp_path / "d.done"))
    assert failing.wait(10) == 7 and not (tmp_path / "d.done").exists()
    # the first wait times out: exit 1; the linger times out: exit 0
    timed = _entry(tmp_path, ["true"], FEDQUIC_WAIT_FOR=str(tmp_path / "never"), FEDQUIC_WAIT_TIMEOUT="1")
    assert timed.wait(10) == 1
    timed = _entry(tmp_path, ["true"], FEDQUIC_LINGER_FOR=str(tmp_path / "never"), FEDQUIC_WAIT_TIMEOUT="1")
    assert timed.wait(10) == 0


# -- the same topology as local processes ----------------------------------------------------------------------


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Mapper:
    """Container paths -> a temporary directory; the `server` host -> 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.dirs = {d: root / d.strip("/").replace("/", "_") for d in CONTAINER_DIRS}

    def path(self, text: str) -> str:
        for cdir, local in self.dirs.items():
            if text == cdir or text.startswith(cdir + "/"):
                return str(local) + text[len(cdir) :]
        return text

    def value(self, text: str) -> str:
        return " ".join(self.path(t) for t in text.split(" "))

    def argv(self, argv: list[str], server_port: int | None = None) -> list[str]:
        out = [sys.executable, "-m", "fedquic"]
        for a in argv[1:]:
            if server_port is not None and a.startswith("server:"):
                a = f"127.0.0.1:{server_port}"
            out.append(self.path(a))
        return out


def test_compose_topology_runs_as_local_processes(compose: dict[str, Any], tmp_path: Path) -> None:
    """certs -> server (healthcheck) -> 3 clients, with the compose commands; shortened to 2 rounds of 3 steps."""
    pytest.importorskip("torch")
    from fedquic.client.model import build_tiny_llama

    services = compose["services"]
    m = _Mapper(tmp_path)
    build_tiny_llama(m.dirs["/opt/fedquic/model"], seed=0)  # what the client image builds (TINY_MODEL_SEED=0)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDQUIC_")}
    base_env["PYTHONUNBUFFERED"] = "1"

    for argv in fedquic_commands(services["certs"]):
        proc = subprocess.run(m.argv(argv), capture_output=True, text=True, timeout=120, env=base_env)
        assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stdout}{proc.stderr}"

    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files = []

    def spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        f = (logs / f"{name}.log").open("wb")
        files.append(f)
        full_env = {**base_env, **{k: m.value(v) for k, v in env.items()}}
        p = subprocess.Popen(["sh", str(ENTRYPOINT), *argv], stdout=f, stderr=subprocess.STDOUT, env=full_env)
        procs[name] = p
        return p

    def log_tail(name: str) -> str:
        return f"--- {name} ---\n" + (logs / f"{name}.log").read_text(errors="replace")[-3000:]

    ready = tmp_path / "server.ready"
    (server_argv,) = fedquic_commands(services["server"])
    # shortened, and on free ports (later flags win in argparse)
    extra = ["--port", "0", "--metrics-port", "0", "--ready-file", str(ready), "--rounds", "2", "--local-steps", "3"]
    try:
        server = spawn("server", m.argv(server_argv) + extra, _env(services["server"]))
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert server.poll() is None, log_tail("server")
            assert time.monotonic() < deadline, "the server did not start listening"
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        port, metrics_port = info["port"], info["metrics_port"]

        # the compose healthcheck, aimed at this server's metrics port
        hc = run_healthcheck(services["server"], metrics_port, tmp_path / "no-such.ok")
        assert hc.returncode == 0, hc.stderr

        for c in CLIENTS:
            (argv,) = fedquic_commands(services[c])
            spawn(c, m.argv(argv, server_port=port), _env(services[c]))

        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            assert not failed, "\n".join(log_tail(n) for n in procs)
            assert time.monotonic() < deadline, "timed out:\n" + "\n".join(log_tail(n) for n in procs)
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in files:
            f.close()

    assert {n: p.returncode for n, p in procs.items()} == dict.fromkeys(procs, 0), "\n".join(log_tail(n) for n in procs)
    results = m.dirs["/results"]
    rows = [json.loads(line) for line in (results / "server" / "history.jsonl").read_text().splitlines() if line]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(set(r["clients"]) == set(CLIENTS) for r in rows)
    assert (results / "server" / "compose.done").is_file()
    for c in CLIENTS:
        assert (results / c / "compose.done").is_file()
        assert (results / c / "adapters" / "peft" / "local" / "adapter_config.json").is_file()
        assert (results / c / "adapters" / "fedalt" / "fedalt.json").is_file()


# -- a real docker-compose up -------------------------------------------------------------------------------------


def _engine_env() -> dict[str, str]:
    """Start (or find) the private engine of ../shared/tools/docker-up.sh; skip, saying why, where it cannot."""
    up = SHARED_TOOLS / "docker-up.sh"
    if not up.is_file():
        pytest.skip(f"no Docker engine helper at {up} (the shared tools are not next to this checkout)")
    if os.geteuid() != 0:
        pytest.skip("docker-up.sh needs root (it apt-installs and starts a private dockerd)")
    proc = subprocess.run(["bash", str(up)], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.skip(f"no Docker engine could start (docker-up.sh exited {proc.returncode}):\n{proc.stderr[-2000:]}")
    env = dict(os.environ)
    for line in proc.stdout.splitlines():
        if line.startswith("export "):
            for assignment in shlex.split(line[len("export ") :]):
                key, _, value = assignment.partition("=")
                env[key] = value
    if "DOCKER_HOST" not in env or shutil.which("docker-compose") is None:
        pytest.skip(f"docker-up.sh printed no DOCKER_HOST or docker-compose is missing: {proc.stdout!r}")
    return env


def _engine_running() -> bool:
    pidfile = Path(os.environ.get("DOCKER_LOCAL_DIR", "/tmp/docker-local")) / "dockerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except (OSError, ValueError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_docker_compose_up_runs_the_job(tmp_path: Path) -> None:
    was_running = _engine_running()
    env = _engine_env()
    project = f"fedquictest{os.getpid()}"
    results = tmp_path / "compose-run"
    results.mkdir()
    env.update(
        BASE_IMAGE=os.environ.get("BASE_IMAGE", "local/python:3.11-bookworm"),
        FEDQUIC_RESULTS=str(results),
        FEDQUIC_METRICS_PUBLISH=f"127.0.0.1:{_free_port()}",
        FEDQUIC_QUIC_PUBLISH=str(_free_port(socket.SOCK_DGRAM)),
    )
    wheels = REPO / "docker" / "wheels"
    if not list(wheels.glob("torch-*.whl")):
        subprocess.run(["bash", str(REPO / "docker" / "fetch-wheels.sh")], env=env, timeout=600, check=False)
    if list(wheels.glob("torch-*.whl")) and "TORCH_INDEX_URL" not in os.environ:
        env["TORCH_INDEX_URL"] = ""  # the wheel is there: no need for the PyTorch index
    dc = ["docker-compose", "-f", str(COMPOSE_FILE), "-p", project]

    def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*dc, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    try:
        build = run("--profile", "setup", "build", timeout=2400)
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
        certs = run("run", "--rm", "certs", timeout=300)
        assert certs.returncode == 0, certs.stdout + certs.stderr
        t0 = time.monotonic()
        up = run("up", "--abort-on-container-exit", "--exit-code-from", "server", timeout=900)
        wall = time.monotonic() - t0
        assert up.returncode == 0, up.stdout[-6000:] + up.stderr[-3000:]
        print(f"docker-compose up: {wall:.1f} s")
        states = run("ps", "-a", timeout=60)
        print(states.stdout)
        rows = [json.loads(x) for x in (results / "server" / "history.jsonl").read_text().splitlines() if x]
        assert len(rows) == 3 and all(set(r["clients"]) == set(CLIENTS) for r in rows)
        for c in CLIENTS:
            assert (results / c / "adapters" / "peft" / "local" / "adapter_config.json").is_file()
            assert (results / c / "adapters" / "fedalt" / "fedalt.json").is_file()
            assert (results / c / "rounds.jsonl").is_file()
        # the same `up` again on the same results: a fresh job, not a server that finishes at once (issue 15, 12)
        again = run("up", "--abort-on-container-exit", "--exit-code-from", "server", timeout=900)
        assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-3000:]
        rows = [json.loads(x) for x in (results / "server" / "history.jsonl").read_text().splitlines() if x]
        assert len(rows) == 3 and all(set(r["clients"]) == set(CLIENTS) for r in rows)
        assert len(list((results / "server").glob("state.finished-*"))) == 1  # the first job, kept aside
    finally:
        run("down", "-v", "--remove-orphans", timeout=300)
        if not was_running:
            subprocess.run(["bash", str(SHARED_TOOLS / "docker-down.sh")], capture_output=True, timeout=300)
