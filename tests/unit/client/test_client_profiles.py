"""Device profiles (by name, overridable field by field, never touching job-level LoRA settings), micro-batching
with gradient accumulation, held-out metrics in the learner's round metrics, and the progress bar."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from fedquic.client.data import make_examples
from fedquic.client.fedalt import FedALTModel, LoraSpec
from fedquic.client.peft_learner import PeftLearner, PeftLearnerConfig, held_out_split
from fedquic.client.profiles import PROFILES, DeviceProfile, known_profiles, resolve_profile
from fedquic.client.progress import TrainProgress
from fedquic.client.trainer import TrainConfig, train_local
from fedquic.common.errors import ConfigError
from fedquic.common.messages import LoraJobSpec, TrainSpec, Welcome

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_profiles_by_name_and_overrides() -> None:
    assert {"default", "edge", "gpu"} <= set(known_profiles())
    edge, gpu = resolve_profile("edge"), resolve_profile("gpu")
    assert edge.gradient_checkpointing and edge.device == "cpu" and edge.micro_batch_size == 2
    assert not gpu.gradient_checkpointing and gpu.compute_dtype == "bfloat16" and gpu.device == "cuda"
    assert gpu.micro_batch_size is not None and gpu.micro_batch_size > edge.micro_batch_size
    default = resolve_profile("default")
    assert default.compute_dtype in ("float32", "bfloat16")  # auto, resolved for this machine
    assert default == DeviceProfile(compute_dtype=default.compute_dtype)
    # one field overridden, the others kept; None means "the profile's value"
    mixed = resolve_profile("gpu", device="cuda:1", gradient_checkpointing=None, micro_batch_size=16)
    assert (mixed.device, mixed.micro_batch_size) == ("cuda:1", 16)
    assert mixed.compute_dtype == gpu.compute_dtype and mixed.gradient_checkpointing == gpu.gradient_checkpointing
    assert PROFILES["gpu"] == gpu  # the registry is not modified by overrides


def test_auto_compute_is_bf16_only_where_the_hardware_does_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedquic.client.profiles as profiles

    amx = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    plain = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"
    assert profiles.cpu_has_native_bf16(amx)
    assert not profiles.cpu_has_native_bf16(plain) and not profiles.cpu_has_native_bf16(arm)
    assert not profiles.cpu_has_native_bf16("")
    for info, want in ((amx, "bfloat16"), (plain, "float32")):
        monkeypatch.setattr(
            profiles,
            "cpu_has_native_bf16",
            lambda cpuinfo=None, info=info: profiles._BF16_CPU_FLAGS & set(info.split()) != set(),
        )
        assert resolve_profile("default").compute_dtype == want
        assert resolve_profile("edge").compute_dtype == want
        assert resolve_profile("default", compute_dtype="float32").compute_dtype == "float32"  # explicit wins
    assert profiles.native_compute_dtype("mps") == "float32"


def test_profiles_cannot_touch_job_level_settings() -> None:
    for field in ("rank", "target_modules", "alpha"):
        with pytest.raises(ConfigError, match="job-level"):
            resolve_profile("edge", **{field: 4})
    assert not {"rank", "alpha", "dropout", "target_modules"} & set(DeviceProfile.model_fields)
    with pytest.raises(ConfigError, match="known profiles"):
        resolve_profile("phone")
    with pytest.raises(ConfigError):
        resolve_profile("edge", micro_batch_size=0)
    with pytest.raises(ConfigError):
        resolve_profile("edge", quantization="fp8")


def test_learner_config_resolves_its_profile(tmp_path: Path) -> None:
    cfg = PeftLearnerConfig(model_path=tmp_path, task="copy", profile="edge", compute_dtype="bfloat16")
    p = cfg.device_profile()
    assert p.compute_dtype == "bfloat16" and p.micro_batch_size == 2 and p.gradient_checkpointing
    with pytest.raises(ConfigError):
        PeftLearnerConfig(model_path=tmp_path, task="copy", profile="nope").device_profile()


def test_micro_batches_give_the_same_training(load_tiny) -> None:
    examples = make_examples("reverse", 48, seed=0)

    def run(micro: int | None) -> tuple[dict[str, np.ndarray], list[float]]:
        model, tok = load_tiny(quantization="none", gradient_checkpointing=False)
        fam = FedALTModel(model, LoraSpec(rank=4), init_seed=0, federation="fedavg")
        losses: list[float] = []
        cfg = TrainConfig(steps=3, batch_size=8, seed=5, micro_batch_size=micro, weight_decay=0.1)
        res = train_local(fam, examples, tok, cfg, progress=lambda s, t, loss: losses.append(loss))
        assert res.samples == 24
        return fam.local_state(), losses

    full, full_losses = run(None)
    for micro in (2, 3):  # 3 does not divide 8: a last, smaller micro-batch
        state, losses = run(micro)
        assert losses == pytest.approx(full_losses, rel=1e-5)
        for k in full:
            np.testing.assert_allclose(state[k], full[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_held_out_split_is_disjoint_deterministic_and_bounded() -> None:
    examples = make_examples("copy", 100, seed=0)
    train, held = held_out_split(examples, 0.1, seed=1)
    assert len(held) == 10 and len(train) == 90  # the fraction asked
    assert set(train).isdisjoint(held) and sorted(train + held, key=examples.index) == examples
    assert held_out_split(examples, 0.1, seed=1) == (train, held)
    assert held_out_split(examples, 0.1, seed=2)[1] != held
    assert len(held_out_split(examples, 0.25, seed=1)[1]) == 25
    assert held_out_split(examples, 0.0, seed=1) == (examples, [])
    assert len(held_out_split(examples[:5], 0.1, seed=1)[1]) == 1  # at least one item when a fraction is asked
    assert len(held_out_split(examples[:2], 0.9, seed=1)[0]) == 1  # and one left to train on
    with pytest.raises(ConfigError):
        held_out_split(examples, 1.0, seed=1)


@pytest.mark.parametrize(("task", "metric"), [("reverse", "acc_exact"), ("mc-sort", "acc_mc")])
def test_learner_reports_held_out_metrics(tiny_model_dir: Path, task: str, metric: str) -> None:
    learner = PeftLearner(
        PeftLearnerConfig(model_path=tiny_model_dir, task=task, num_examples=60, profile="edge", progress=False)
    )
    assert len(learner.eval_examples) == 6 and learner.num_samples() == 54
    learner.attach(Welcome(version=1, job_id="j", rounds=1, init_seed=0, lora=LoraJobSpec(rank=4)))
    metrics = learner.train(1, TrainSpec(local_steps=2, batch_size=4))
    assert metrics["samples"] == 8.0  # the job's batch size, whatever the profile's micro-batch
    assert metric not in metrics  # training reports training figures; the app asks for held-out ones
    held = learner.evaluate()
    assert 0.0 <= held[metric] <= 1.0 and math.isfinite(held["loss_eval"]) and held["eval_s"] > 0
    assert held["eval_n"] == 6.0
    other = "acc_mc" if metric == "acc_exact" else "acc_exact"
    assert other not in held


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    with TrainProgress("round 1", 5, stream=quiet) as bar:
        assert not bar.active
        bar.update(1, 5, 2.0)
    assert quiet.getvalue() == ""
    tty = FakeTty()
    with TrainProgress("round 7", 5, enabled=False, stream=tty) as bar:
        assert not bar.active
    assert tty.getvalue() == ""
    with TrainProgress("round 7", 5, stream=tty) as bar:
        assert bar.active
        for step in range(1, 6):
            bar.update(step, 5, 1.0 / step)
    out = tty.getvalue()
    assert "round 7" in out and "5/5" in out


def test_learner_builds_the_mixer_the_job_asks_for(tiny_model_dir: Path) -> None:
    learner = PeftLearner(PeftLearnerConfig(model_path=tiny_model_dir, task="reverse", num_examples=20, progress=False))
    learner.attach(
        Welcome(version=1, job_id="j", rounds=1, init_seed=0, mixer="learned", mixer_init=0.7, lora=LoraJobSpec(rank=4))
    )
    biases = [v for k, v in learner.extra_state().items() if k.endswith(".router.bias")]
    assert biases and all(np.allclose(b, [math.log(0.7 / 0.3), 0.0], atol=1e-6) for b in biases)
