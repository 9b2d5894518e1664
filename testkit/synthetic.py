"""A synthetic :class:`~fedquic.client.learner.Learner`: numpy only, deterministic, no model.

Used where the network and the server are under test rather than learning: load and soak tests, the
round benchmark (an update the size of a real LoRA state, trivial training), and crash/restart tests.
Each round it moves its adapter by a seeded random step, so every update differs per client and round
and is reproducible: a test can recompute exactly what the server must hold.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fedquic.common.adapter import AdapterSchema, TensorDict, init_lora_state
from fedquic.common.messages import TrainSpec, Welcome


def lora_schema(layers: int, dim: int, rank: int, modules: tuple[str, ...] = ("q_proj", "v_proj")) -> AdapterSchema:
    """The adapter schema of rank-``rank`` LoRA on ``modules`` of ``layers`` square ``dim`` projections."""
    state: TensorDict = {}
    for i in range(layers):
        for m in modules:
            base = f"base_model.model.model.layers.{i}.self_attn.{m}"
            state[f"{base}.lora_A.weight"] = np.zeros((rank, dim), np.float32)
            state[f"{base}.lora_B.weight"] = np.zeros((dim, rank), np.float32)
    return AdapterSchema.from_state(state)


def schema_for_bytes(fp32_bytes: int, dim: int = 2048, rank: int = 16) -> AdapterSchema:
    """A LoRA schema whose fp32 state is about ``fp32_bytes`` (e.g. 45 MB, a 7B model's q/v LoRA at r=16)."""
    per_layer = 2 * 2 * rank * dim * 4  # q and v, A and B
    return lora_schema(max(1, round(fp32_bytes / per_layer)), dim, rank)


@dataclass
class SyntheticLearner:
    schema: AdapterSchema
    seed: int = 0
    samples: int = 100
    step_scale: float = 1e-2
    train_seconds: float = 0.0  # simulated training time
    slow_rounds: dict[int, float] = field(default_factory=dict)  # round -> simulated training time instead
    fingerprint: str = "5e7717e71c"
    # Tests may hold a round's training until they release it (e.g. to kill the server meanwhile).
    gates: dict[int, threading.Event] = field(default_factory=dict)
    trained_rounds: list[int] = field(default_factory=list)
    # With a pool size, training noise comes from windows of one pool of that many values (bench/round.py)
    noise_pool: int = 0
    _pool: np.ndarray | None = None
    _local: TensorDict = field(default_factory=dict)
    _row: TensorDict = field(default_factory=dict)

    def base_fingerprint(self) -> str:
        return self.fingerprint

    def num_samples(self) -> int:
        return self.samples

    def attach(self, job: Welcome) -> AdapterSchema:
        if not self._local:
            self._local = init_lora_state(self.schema, job.init_seed)
        return self.schema

    def local_state(self) -> TensorDict:
        return {k: v.copy() for k, v in self._local.items()}

    def set_local_state(self, state: TensorDict) -> None:
        self._local = {k: np.array(v, dtype=np.float32) for k, v in state.items()}

    def set_row_state(self, state: TensorDict) -> None:
        self._row = {k: np.array(v, dtype=np.float32) for k, v in state.items()}

    def row_state(self) -> TensorDict:
        return self._row

    def _noise(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """``step_scale`` x standard normal noise of ``shape``; with ``noise_pool`` a window of a pool drawn once
        (a view at a random offset: one pass per tensor, like a benchmark peer's trivial training) rather than
        fresh draws (~20 ns per value: 0.2 s per round for a 45 MB adapter)."""
        n = int(np.prod(shape))
        if not self.noise_pool or n > self.noise_pool:
            return self.step_scale * rng.standard_normal(shape, np.float32)
        if self._pool is None:
            self._pool = self.step_scale * np.random.default_rng([self.seed, 0x9E3779B9]).standard_normal(
                self.noise_pool, np.float32
            )
        start = int(rng.integers(0, self.noise_pool - n + 1))
        return self._pool[start : start + n].reshape(shape)

    def train(self, round_: int, spec: TrainSpec) -> dict[str, float]:
        gate = self.gates.get(round_)
        if gate is not None:
            gate.wait()
        pause = self.slow_rounds.get(round_, self.train_seconds)
        if pause:
            time.sleep(pause)
        rng = np.random.default_rng([self.seed, round_])
        for k in sorted(self._local):
            self._local[k] = self._local[k] + self._noise(rng, self._local[k].shape)
        self.trained_rounds.append(round_)
        loss = 1.0 / (1 + len(self.trained_rounds))
        return {"loss_before": loss * 1.1, "loss_after": loss}


def _parser() -> Any:
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m testkit.synthetic", description=main.__doc__)
    ap.add_argument("--client-id", required=True, help="client id (with --count: the prefix of the ids)")
    ap.add_argument("--count", type=int, default=0, help="run this many clients in this process (ids ID-i)")
    ap.add_argument("--server", default="127.0.0.1:4433", help="HOST:PORT")
    ap.add_argument("--certs", type=Path, default=Path("certs/dev"), help="dir with ca.pem and clients/ID.{pem,key}")
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seconds", type=float, default=0.0)
    ap.add_argument("--slow-round", action="append", default=[], metavar="R:SECONDS", help="train longer in round R")
    ap.add_argument("--connect-attempts", type=int, default=20)
    ap.add_argument("--dgram", type=int, default=None, help="max QUIC datagram size (default: the transport's)")
    ap.add_argument("--log-level", default="INFO")
    return ap


def _client(args: Any, i: int, cid: str, many: bool) -> Any:
    from fedquic.client.config import ClientConfig
    from fedquic.client.runner import FederatedClient
    from fedquic.transport.settings import TlsFiles, TransportSettings

    host, _, port = args.server.rpartition(":")
    transport = TransportSettings() if args.dgram is None else TransportSettings(max_datagram_size=args.dgram)
    cfg = ClientConfig(
        client_id=cid,
        host=host,
        port=int(port),
        server_name="localhost",
        tls=TlsFiles(
            ca=args.certs / "ca.pem",
            cert=args.certs / "clients" / f"{cid}.pem",
            key=args.certs / "clients" / f"{cid}.key",
        ),
        transport=transport,
        run_dir=args.run_dir / cid if many else args.run_dir,
        connect_attempts=args.connect_attempts,
        backoff_initial_s=0.2,
        backoff_max_s=2.0,
    )
    slow = {int(r): float(t) for r, t in (x.split(":") for x in args.slow_round)}
    learner = SyntheticLearner(
        lora_schema(args.layers, args.dim, args.rank),
        seed=args.seed + i,
        train_seconds=args.train_seconds,
        slow_rounds=slow,
    )
    return FederatedClient(cfg, learner)


def main(argv: list[str] | None = None) -> int:
    """A light client process (synthetic learner, no torch): for load, soak and crash tests and benchmarks.

    python -m testkit.synthetic --client-id c1 --server 127.0.0.1:4433 --certs certs/dev --run-dir runs/c1

    With ``--count N`` the process runs N clients concurrently on one event loop (ids ``ID-0`` .. ``ID-N-1``, run
    directories under ``--run-dir``, seeds ``--seed + i``): how a load test reaches hundreds of clients without
    hundreds of Python processes. Each client has its own QUIC connection, certificate and state.
    """
    import asyncio

    from fedquic.common.logs import setup_logging

    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    many = args.count > 0
    ids = [f"{args.client_id}-{i}" for i in range(args.count)] if many else [args.client_id]
    clients = [_client(args, i, cid, many) for i, cid in enumerate(ids)]

    async def run_all() -> list[BaseException | None]:
        outcomes = await asyncio.gather(*(c.run() for c in clients), return_exceptions=True)
        return [o if isinstance(o, BaseException) else None for o in outcomes]

    failures = 0
    for c, err in zip(clients, asyncio.run(run_all()), strict=True):
        if err is not None:
            failures += 1
            print(f"client={c.cfg.client_id} failed: {type(err).__name__}: {err}", flush=True)
            continue
        rounds = [r.round for r in c.result.rounds] if c.result else []
        print(
            f"client={c.cfg.client_id} resumed_from_checkpoint={c.resumed_from_checkpoint} rounds={rounds} "
            f"view_hash={c.view_hash}",
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
