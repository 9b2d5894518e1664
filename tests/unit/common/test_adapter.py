import numpy as np
import pytest
from fedquic.common.adapter import AdapterSchema, TensorSpec, init_lora_state, state_hash
from fedquic.common.errors import SchemaMismatchError

SCHEMA = AdapterSchema(
    tensors=(
        TensorSpec(name="l0.q_proj.lora_A.weight", shape=(4, 64)),
        TensorSpec(name="l0.q_proj.lora_B.weight", shape=(32, 4)),
    )
)


def test_init_is_deterministic_and_seed_dependent() -> None:
    a, b = init_lora_state(SCHEMA, 7), init_lora_state(SCHEMA, 7)
    assert state_hash(a) == state_hash(b)
    assert state_hash(a) != state_hash(init_lora_state(SCHEMA, 8))


def test_init_matches_peft_distribution_b_zero_a_bounded() -> None:
    s = init_lora_state(SCHEMA, 0)
    assert not s["l0.q_proj.lora_B.weight"].any()
    a = s["l0.q_proj.lora_A.weight"]
    assert np.abs(a).max() <= 1 / np.sqrt(64) and a.std() > 0.5 / np.sqrt(3 * 64)


def test_init_does_not_depend_on_tensor_order() -> None:
    reversed_schema = AdapterSchema(tensors=tuple(reversed(SCHEMA.tensors)))
    assert state_hash(init_lora_state(reversed_schema, 3)) == state_hash(init_lora_state(SCHEMA, 3))
    assert reversed_schema.fingerprint() == SCHEMA.fingerprint()


def test_check_state_names_the_problem() -> None:
    s = init_lora_state(SCHEMA, 0)
    SCHEMA.check_state(s)
    s["l0.q_proj.lora_B.weight"] = np.zeros((32, 5), np.float32)
    with pytest.raises(SchemaMismatchError, match="lora_B"):
        SCHEMA.check_state(s)
    del s["l0.q_proj.lora_B.weight"]
    with pytest.raises(SchemaMismatchError, match="missing"):
        SCHEMA.check_state(s)


@pytest.mark.parametrize(
    "tensors",
    [
        [{"name": "a", "shape": [-1, 4]}],  # a negative dimension
        [{"name": "a", "shape": []}],  # no dimension
        [{"name": "a", "shape": [2, 4]}, {"name": "a", "shape": [4, 2]}],  # a repeated name
    ],
)
def test_schemas_a_job_could_not_use_are_refused(tensors: list[dict[str, object]]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        AdapterSchema.model_validate({"tensors": tensors})
