"""docs/protocol.md's field tables cannot drift from the message models: every field of every header model (section 4)
and of every nested object a header carries ("Nested objects") has exactly one row, and no row names a field that
does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fedquic.common.adapter import AdapterSchema, TensorSpec
from fedquic.common.codec import CompactManifest, EncodingSpec, Manifest, TensorRecord
from fedquic.common.messages import HEADER_TYPES, LoraJobSpec, SyncState, TrainSpec

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"
NESTED = (
    TrainSpec,
    LoraJobSpec,
    SyncState,
    AdapterSchema,
    TensorSpec,
    EncodingSpec,
    Manifest,
    TensorRecord,
    CompactManifest,
)


def table_rows(section: str) -> dict[str, list[str]]:
    """{owner: [field, ...]} from the first `| message | field | ... |` table after the heading ``section``."""
    text = DOC.read_text()
    start = text.index(section)
    rows: dict[str, list[str]] = {}
    owner = ""
    in_table = False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("| message | field"):
            in_table = True
            continue
        if not in_table:
            continue
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set(cells[0]) <= {"-", " "} and cells[0]:
            continue
        owner = cells[0] or owner
        names = re.findall(r"`([^`]+)`", cells[1])
        assert len(names) == 1, f"one field per row: {line}"
        rows.setdefault(owner, []).append(names[0])
    return rows


def test_every_header_field_has_exactly_one_row() -> None:
    rows = table_rows("## 4. Header schemas")
    expected = {t.name: sorted(cls.model_fields) for t, cls in HEADER_TYPES.items() if cls.model_fields}
    assert {k: sorted(v) for k, v in rows.items()} == expected


@pytest.mark.parametrize("model", NESTED, ids=lambda m: m.__name__)
def test_every_nested_field_has_exactly_one_row(model: type) -> None:
    rows = table_rows("### Nested objects")
    assert sorted(rows.get(model.__name__, [])) == sorted(model.model_fields), model.__name__
