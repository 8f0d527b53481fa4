"""Every schema version stays backward and forward compatible with the latest of its event type."""

from __future__ import annotations

import copy
import io
import random
from collections.abc import Callable
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.utils import generate_many

from consent_ledger.adapters.avro.catalogue import SchemaCatalogue, SchemaVersion
from consent_ledger.core.events import EventType

CATALOGUE = SchemaCatalogue.load()
# Enough samples that every enum symbol of the schemas is written many times over.
SAMPLES = 300


def incompatibility(writer: Any, reader: Any, samples: int = SAMPLES, seed: int = 20250928) -> str | None:
    """Why data written with `writer` cannot be read with `reader` (Avro resolution), or None if it can."""
    parsed_writer = parse_schema(copy.deepcopy(writer))
    parsed_reader = parse_schema(copy.deepcopy(reader))
    # generate_many draws from the global `random`; a fixed seed makes a failure reproducible.
    saved = random.getstate()
    random.seed(seed)
    try:
        records = list(generate_many(writer, samples))
    finally:
        random.setstate(saved)
    for record in records:
        out = io.BytesIO()
        schemaless_writer(out, parsed_writer, record)
        try:
            schemaless_reader(io.BytesIO(out.getvalue()), parsed_writer, parsed_reader)
        except Exception as error:  # resolution failures come as several fastavro exception types
            return f"{type(error).__name__}: {error}"
    return None


def _label(version: SchemaVersion) -> str:
    return version.label.replace(" ", "-")


@pytest.mark.parametrize("version", list(CATALOGUE), ids=_label)
def test_latest_reads_every_version(version: SchemaVersion) -> None:
    """Backward: consumers on the latest schema read everything ever written."""
    latest = CATALOGUE.latest(version.event_type)
    assert incompatibility(version.schema, latest.schema) is None


@pytest.mark.parametrize("version", list(CATALOGUE), ids=_label)
def test_every_version_reads_the_latest(version: SchemaVersion) -> None:
    """Forward: consumers still on an older schema read what current producers write."""
    latest = CATALOGUE.latest(version.event_type)
    assert incompatibility(latest.schema, version.schema) is None


def test_every_event_type_has_a_latest_version() -> None:
    assert {CATALOGUE.latest(event_type).event_type for event_type in EventType} == set(EventType)


# --- the check itself must be able to fail ------------------------------------------------------------


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = schema["fields"][-1]["type"]
    return body


def _add_required_body_field(schema: dict[str, Any]) -> None:
    _body(schema)["fields"].append({"name": "reviewer", "type": "string"})


def _drop_enum_symbol(schema: dict[str, Any]) -> None:
    source = next(entry for entry in _body(schema)["fields"] if entry["name"] == "source")
    source["type"]["symbols"].remove("support")


def _retype_subject(schema: dict[str, Any]) -> None:
    schema["fields"][2]["type"] = "int"


def _rename_record(schema: dict[str, Any]) -> None:
    schema["name"] = "ConsentChangedRenamed"


def _drop_required_body_field_from_writer(schema: dict[str, Any]) -> None:
    # As a writer this drops `choice`, which a reader without a default for it cannot fill in.
    _body(schema)["fields"] = [entry for entry in _body(schema)["fields"] if entry["name"] != "choice"]


@pytest.mark.parametrize(
    ("change", "breaks"),
    [
        (_add_required_body_field, "backward"),
        (_drop_enum_symbol, "backward"),
        (_retype_subject, "both"),
        (_rename_record, "both"),
        (_drop_required_body_field_from_writer, "forward"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.__name__.strip("_"),
)
def test_incompatible_changes_are_detected(change: Callable[[dict[str, Any]], None], breaks: str) -> None:
    current = dict(CATALOGUE.latest(EventType.CONSENT_CHANGED).schema)
    variant = copy.deepcopy(current)
    change(variant)
    backward = incompatibility(current, variant)  # the variant as the new reader of existing data
    forward = incompatibility(variant, current)  # existing readers of the variant's data
    assert (backward is not None, forward is not None) == {
        "backward": (True, False), "forward": (False, True), "both": (True, True)
    }[breaks], (backward, forward)


def test_compatible_changes_pass() -> None:
    current = dict(CATALOGUE.latest(EventType.CONSENT_CHANGED).schema)
    variant = copy.deepcopy(current)
    _body(variant)["fields"].append({"name": "reviewer", "type": ["null", "string"], "default": None})
    variant["doc"] = "reworded"
    assert incompatibility(current, variant) is None
    assert incompatibility(variant, current) is None
