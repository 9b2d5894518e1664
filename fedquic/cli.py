"""The ``fedquic`` command: ``server``, ``client``, ``certs``, ``demo``.

Heavy packages are imported inside the commands: ``fedquic server`` never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("fedquic")


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _run_loop(coro: object, loop_kind: str) -> object:
    # uvloop is opt-in: measured here, uvloop + aioquic across processes fell to 1.5-3.5 MB/s because
    # uvloop's millisecond timer granularity starves aioquic's pacer.
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--log-file", type=Path, help="write logs to this file instead of stderr")
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (default asyncio; see docs on why uvloop is not the default)",
    )
    p.add_argument(
        "--max-datagram-size",
        type=int,
        default=None,
        help="QUIC datagram size in bytes (default 1350; up to 16000 on loopback)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedquic", description="Federated LoRA fine-tuning of 4-bit transformers over QUIC."
    )
    parser.add_argument("--version", action="version", version=f"fedquic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "server",
        help="run the aggregation server daemon for one federated job",
        description="Run the aggregation server: wait for clients, run the rounds, exit.",
    )
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=4433, help="UDP port (default 4433; 0 picks a free one)")
    s.add_argument(
        "--certs",
        type=Path,
        default=Path("certs/dev"),
        help="directory with ca.pem, server.pem and server.key (default certs/dev)",
    )
    s.add_argument("--min-clients", type=int, default=2, help="clients to wait for before round 1 (default 2)")
    s.add_argument("--rounds", type=int, default=3, help="number of rounds (default 3)")
    s.add_argument("--federation", choices=("fedalt", "fedavg", "local"), default="fedalt")
    s.add_argument("--mixer", choices=("fixed", "learned"), default="fixed")
    s.add_argument(
        "--row-mode",
        choices=("factor-mean", "exact"),
        default="factor-mean",
        help="Rest-of-World: average A and B separately (the FedALT paper) or the exact mean of the "
        "products B·A re-factored to rank r by SVD (default factor-mean)",
    )
    s.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        help="clip each client's contribution (adapter minus the shared init) to this L2 norm",
    )
    s.add_argument("--rank", type=int, default=8, help="LoRA rank (job-level, default 8)")
    s.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    s.add_argument(
        "--target-modules",
        default=None,
        help="comma-separated module names (default: per-architecture, q_proj,v_proj for Llama)",
    )
    s.add_argument("--local-steps", type=int, default=10, help="local training steps per round (default 10)")
    s.add_argument("--lr", type=float, default=3e-3, help="client learning rate (default 3e-3)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--prox-mu", type=float, default=0.0, help="FedProx proximal coefficient sent to clients (0: off)")
    s.add_argument("--init-seed", type=int, default=0, help="job seed for the shared adapter initialisation")
    s.add_argument(
        "--uplink",
        default="int8",
        help="client->server encoding: fp32, fp16, bf16, int8[-row|-column|-tensor|-blockN], topkP[-fp32|-fp16] "
        "(P percent kept, with error feedback), each optionally +nolz4 (default int8)",
    )
    s.add_argument(
        "--downlink",
        default="int8",
        help="server->client encoding of the aggregate, same forms (default int8)",
    )
    s.add_argument("--round-timeout", type=float, default=600.0, help="seconds per round (default 600)")
    s.add_argument(
        "--registration-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for --min-clients (default 600)",
    )
    s.add_argument("--run-dir", type=Path, default=Path("runs/server"), help="history and state (default runs/server)")
    s.add_argument("--ready-file", type=Path, help="write {host, port, pid} as JSON here once listening")
    _add_common(s)
    s.set_defaults(func=cmd_server)

    c = sub.add_parser(
        "client",
        help="run one training client",
        description="Run one client: load a local model in 4-bit, join the job, train each round.",
    )
    c.add_argument(
        "--server",
        type=_hostport,
        default=("127.0.0.1", 4433),
        metavar="HOST:PORT",
        help="server address (default 127.0.0.1:4433)",
    )
    c.add_argument("--server-name", default=None, help="name in the server certificate (default: the host)")
    c.add_argument("--ca", type=Path, default=Path("certs/dev/ca.pem"), help="CA that signed the server certificate")
    c.add_argument(
        "--cert",
        type=Path,
        default=None,
        help="client certificate for mutual TLS (default: CA_DIR/clients/CLIENT_ID.pem)",
    )
    c.add_argument("--key", type=Path, default=None, help="its private key (default: CA_DIR/clients/CLIENT_ID.key)")
    c.add_argument("--client-id", required=True, help="this client's id (letters, digits, _ . -)")
    c.add_argument("--model", type=Path, required=True, help="local model directory (no hub downloads)")
    data = c.add_mutually_exclusive_group(required=True)
    data.add_argument("--task", help="synthetic task for demos: copy, reverse, sort, ...")
    data.add_argument("--data", type=Path, help="JSONL file of {prompt, response} or {text} records")
    c.add_argument("--num-examples", type=int, default=256, help="synthetic examples to generate (default 256)")
    c.add_argument("--data-seed", type=int, default=0)
    c.add_argument("--quantization", choices=("nf4", "int8", "none"), default="nf4", help="base model quantization")
    c.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    c.add_argument("--no-gradient-checkpointing", action="store_true")
    c.add_argument("--max-len", type=int, default=48, help="max tokens per example (default 48)")
    c.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    c.add_argument("--run-dir", type=Path, default=None, help="client state and round log (default runs/CLIENT_ID)")
    _add_common(c)
    c.set_defaults(func=cmd_client)

    ce = sub.add_parser(
        "certs",
        help="make development certificates",
        description="Development PKI: a CA, a server certificate and client certificates.",
    )
    ce_sub = ce.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    ci = ce_sub.add_parser("init", help="create a CA and a server certificate")
    ci.add_argument("dir", type=Path, nargs="?", default=Path("certs/dev"))
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
    cs.add_argument("--dir", type=Path, default=Path("certs/dev"))
    cs.set_defaults(func=cmd_certs_issue)
    cr = ce_sub.add_parser("revoke", help="revoke a client certificate (a running server re-reads the list)")
    cr.add_argument("client_id")
    cr.add_argument("--dir", type=Path, default=Path("certs/dev"))
    cr.set_defaults(func=cmd_certs_revoke)
    cl = ce_sub.add_parser("list", help="list issued client certificates")
    cl.add_argument("--dir", type=Path, default=Path("certs/dev"))
    cl.set_defaults(func=cmd_certs_list)

    d = sub.add_parser(
        "demo",
        help="run a local federated job: server + clients on loopback",
        description="Build a tiny Llama model, start a server and clients on loopback, run rounds, "
        "print a per-round table.",
    )
    d.add_argument("--workdir", type=Path, default=Path("demo-run"), help="where everything is written")
    d.add_argument("--clients", type=int, default=3)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--local-steps", type=int, default=15)
    d.add_argument("--lr", type=float, default=1e-2, help="client learning rate (default 1e-2)")
    d.add_argument("--federation", choices=("fedalt", "fedavg", "local"), default="fedalt")
    d.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    d.add_argument("--log-level", default="INFO")
    d.set_defaults(func=cmd_demo)
    return parser


def _setup(args: argparse.Namespace) -> None:
    from .common.logs import setup_logging

    setup_logging(args.log_level, filename=str(args.log_file) if getattr(args, "log_file", None) else None)


def _transport(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .transport.settings import TransportSettings

    if args.max_datagram_size is None:
        return TransportSettings()
    return TransportSettings(max_datagram_size=args.max_datagram_size)


def cmd_server(args: argparse.Namespace) -> int:
    _setup(args)
    from .server.app import AggregationServer

    certs: Path = args.certs
    for f in ("ca.pem", "server.pem", "server.key"):
        if not (certs / f).is_file():
            raise SystemExit(
                f"fedquic server: {certs / f} not found (create dev certificates with `fedquic certs init {certs}`)"
            )
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip()) if args.target_modules else None
    try:
        cfg = _server_config(args, certs, targets)
    except ValueError as exc:  # pydantic's ValidationError included
        raise SystemExit(f"fedquic server: invalid configuration: {_explain(exc)}") from None

    async def main() -> int:
        server = AggregationServer(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop, f"stopped by {sig.name}")
        await server.start()
        result = await server.run()
        if result.ok:
            log.info("job finished: %d rounds", result.rounds_completed)
            return 0
        log.error("job did not finish: %s", result.reason)
        return 1

    return int(_run_loop(main(), args.loop))  # type: ignore[call-overload]


def _explain(exc: ValueError) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        return f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
    return str(exc)


def _server_config(args: argparse.Namespace, certs: Path, targets: tuple[str, ...] | None):  # type: ignore[no-untyped-def]
    from .common.codec import EncodingSpec
    from .common.messages import LoraJobSpec, TrainSpec
    from .server.config import JobConfig, ServerConfig
    from .server.rounds import RoundPolicy
    from .transport.settings import TlsFiles

    uplink, downlink = EncodingSpec.parse(args.uplink), EncodingSpec.parse(args.downlink)
    return ServerConfig(
        host=args.host,
        port=args.port,
        transport=_transport(args),
        tls=TlsFiles(
            ca=certs / "ca.pem", cert=certs / "server.pem", key=certs / "server.key", revoked=certs / "revoked.txt"
        ),
        policy=RoundPolicy(
            rounds=args.rounds,
            min_clients=args.min_clients,
            round_timeout_s=args.round_timeout,
            registration_timeout_s=args.registration_timeout,
        ),
        job=JobConfig(
            init_seed=args.init_seed,
            federation=args.federation,
            mixer=args.mixer,
            row_mode=args.row_mode,
            clip_norm=args.clip_norm,
            lora=LoraJobSpec(rank=args.rank, alpha=args.alpha, target_modules=targets),
            train=TrainSpec(local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size, prox_mu=args.prox_mu),
            uplink=uplink,
            downlink=downlink,
        ),
        run_dir=args.run_dir,
        ready_file=args.ready_file,
    )


def cmd_client(args: argparse.Namespace) -> int:
    _setup(args)
    from .client.app import ClientConfig, run_client
    from .client.peft_learner import PeftLearner, PeftLearnerConfig
    from .common.errors import FedQuicError
    from .transport.settings import TlsFiles

    host, port = args.server
    run_dir = args.run_dir or Path("runs") / args.client_id
    cert = args.cert or args.ca.parent / "clients" / f"{args.client_id}.pem"
    key = args.key or args.ca.parent / "clients" / f"{args.client_id}.key"
    for f, flag in ((args.ca, "--ca"), (cert, "--cert"), (key, "--key")):
        if not f.is_file():
            raise SystemExit(
                f"fedquic client: {f} not found ({flag}); issue a client certificate with "
                f"`fedquic certs issue {args.client_id} --dir {args.ca.parent}`"
            )
    try:
        learner = PeftLearner(
            PeftLearnerConfig(
                model_path=args.model,
                task=args.task,
                data_path=args.data,
                num_examples=args.num_examples,
                data_seed=args.data_seed,
                quantization=args.quantization,
                compute_dtype=args.compute_dtype,
                gradient_checkpointing=not args.no_gradient_checkpointing,
                max_len=args.max_len,
                threads=args.threads,
            )
        )
        cfg = ClientConfig(
            client_id=args.client_id,
            host=host,
            port=port,
            server_name=args.server_name,
            tls=TlsFiles(ca=args.ca, cert=cert, key=key),
            transport=_transport(args),
            run_dir=run_dir,
        )
        result = _run_loop(run_client(cfg, learner), args.loop)
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
    from .demo import DemoOptions, run_demo

    return run_demo(
        DemoOptions(
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
