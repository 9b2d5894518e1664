"""The Learner protocol: what the network loop needs from local training.

:mod:`fedquic.client.runner` drives any object with these methods, so users can plug in their own model,
data and training step. :class:`fedquic.client.peft_learner.PeftLearner` is the built-in one
(4-bit base, peft LoRA, FedALT mixer). Methods may block: the app calls them in a worker thread so
the QUIC connection keeps being served while a round trains.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..common.adapter import AdapterSchema, TensorDict
from ..common.messages import TrainSpec, Welcome


@runtime_checkable
class Learner(Protocol):
    def base_fingerprint(self) -> str:
        """A hash identifying the base model; all clients of a job must agree."""
        ...

    def num_samples(self) -> int: ...

    def attach(self, job: Welcome) -> AdapterSchema:
        """Build the adapters the job asks for (rank, targets, mixer, federation); return the schema.

        The individual adapter must start from ``init_lora_state(schema, job.init_seed)``.
        """
        ...

    def local_state(self) -> TensorDict:
        """The individual LoRA (float32 numpy copies, peft's tensor names)."""
        ...

    def set_local_state(self, state: TensorDict) -> None: ...

    def set_row_state(self, state: TensorDict) -> None:
        """Install a new frozen Rest-of-World adapter (only called in ``fedalt`` jobs)."""
        ...

    def train(self, round_: int, spec: TrainSpec) -> dict[str, float]:
        """Train locally for one round; return metrics (at least ``loss_before``, ``loss_after``)."""
        ...

    # Optional methods, looked up with getattr (a learner without them works):
    #
    # * ``save(out_dir: Path) -> None``: called once the job ends, to write the trained adapters.
    # * ``evaluate(final: bool) -> dict[str, float]``: held-out figures of the model as it is now. The app calls
    #   it before the first round trains (the base model, reported as ``base_<metric>``), after every round's
    #   installed aggregate (``local`` jobs: after training), with ``final`` for the base model and the last
    #   round (score everything then; a subset in between). Must not change the model.
    # * ``extra_state() -> TensorDict`` and ``load_extra_state(state: TensorDict) -> None``: learner state that
    #   is neither the individual LoRA nor the Rest-of-World adapter but must survive a restart (the FedALT
    #   mixers; an optimizer state if the learner keeps one across rounds), as float32 numpy arrays. The app
    #   writes it into the client checkpoint after every sync and hands it back on restart.
