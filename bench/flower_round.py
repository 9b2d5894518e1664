"""Flower as a peer for ``bench/round.py``: the same payload through a Flower FedAvg round (gRPC), 2 clients.

Runs in a scratch virtual environment that has Flower (never a dependency of fedquic): ``bench/round.py --flower``
creates ``runs/flower-venv`` with ``flwr==1.41.0`` and numpy the first time, then calls this script with it. It
imports nothing of fedquic. The payload is bench/round.py's: rank-16 LoRA A/B on q and v of 86 layers at width 2048
(344 tensors, 45 MB fp32), trivial training (one add), fp32 on the wire as Flower sends it.

The server runs in this process (``flwr.server.start_server``, FedAvg, no evaluation) and the 2 clients in their own
processes (``flwr.client.start_client``). ``round_s`` is the time from round 1's aggregation to round 2's, as
bench/round.py times its own round 2 (round 1 includes connecting). Prints one JSON object as its last line:
``{"flower_round_s": ..., "flower_version": ...}``.

    runs/flower-venv/bin/python bench/flower_round.py [--layers 86]   # server + 2 client processes

Over ``testkit.wan``'s emulated link (``bench/round.py --wan --flower``), ``--host`` is the address the server
listens on and the clients dial (the link's root side) and ``--client-prefix`` what each client command is
started under (``ip netns exec <namespace>``: the clients sit behind the link).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time

import numpy as np

DIM, RANK = 2048, 16  # bench/round.py's update (testkit.synthetic.schema_for_bytes): 86 layers make 45 MB
LAYERS = 86


def payload(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(LAYERS):
        for _module in ("q_proj", "v_proj"):
            out.append(rng.standard_normal((RANK, DIM), dtype=np.float32) * 1e-2)
            out.append(rng.standard_normal((DIM, RANK), dtype=np.float32) * 1e-2)
    return out


def client_main(address: str, seed: int) -> None:
    import flwr as fl

    class Client(fl.client.NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config):  # type: ignore[no-untyped-def]
            return payload(seed)

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [p + 1e-3 for p in parameters], 1, {}  # trivial training, as bench/round.py's learner

        def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
            return 0.0, 1, {}

    fl.client.start_client(server_address=address, client=Client().to_client())


def server_main(address: str, client_prefix: list[str]) -> float:
    import flwr as fl

    marks: list[float] = []

    class Timed(fl.server.strategy.FedAvg):  # type: ignore[misc]
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            out = super().aggregate_fit(server_round, results, failures)
            marks.append(time.monotonic())
            return out

    strategy = Timed(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=2,
        min_available_clients=2,
        initial_parameters=fl.common.ndarrays_to_parameters(payload(0)),
    )
    clients = [
        subprocess.Popen(
            [*client_prefix, sys.executable, __file__, "--layers", str(LAYERS), "--client", address, str(i + 1)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    try:
        fl.server.start_server(server_address=address, config=fl.server.ServerConfig(num_rounds=2), strategy=strategy)
    finally:
        for p in clients:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    if len(marks) < 2:
        raise SystemExit(f"flower ran {len(marks)} rounds, not 2")
    return marks[1] - marks[0]


def main() -> int:
    global LAYERS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--host", default="127.0.0.1", help="the server's address (it listens there, clients dial it)")
    ap.add_argument("--client-prefix", default="", help="command prefix of each client, e.g. 'ip netns exec NS'")
    ap.add_argument("--client", nargs=2, metavar=("ADDRESS", "SEED"), help=argparse.SUPPRESS)  # a client process
    args = ap.parse_args()
    LAYERS = args.layers
    if args.client:
        client_main(args.client[0], int(args.client[1]))
        return 0
    import socket

    import flwr

    with socket.socket() as s:
        s.bind((args.host, 0))
        port = s.getsockname()[1]
    round_s = server_main(f"{args.host}:{port}", shlex.split(args.client_prefix))
    print(json.dumps({"flower_round_s": round_s, "flower_version": flwr.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
