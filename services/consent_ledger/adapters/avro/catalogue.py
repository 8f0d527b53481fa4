"""The catalogue of every event schema version ever written, by fingerprint and by event type."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

from consent_ledger.core.events import EventType

NAMESPACE = "consent_ledger.events"
SCHEMA_SUFFIX = ".avsc"
HISTORY_DIR = "history"
FINGERPRINT_ALGORITHM = "CRC-64-AVRO"
FINGERPRINT_SIZE = 8
ENVELOPE_FIELDS = ("event_id", "event_type", "subject_id", "occurred_at", "producer", "body")


def default_schema_dir() -> Path:
    """`schemas/avro` of the repository; the package is installed editable from `services/`."""
    return Path(__file__).resolve().parents[4] / "schemas" / "avro"


class CatalogueError(ValueError):
    """The schema folder breaks the catalogue's rules; the message names the file and the rule."""


def schema_fingerprint(schema: Any) -> bytes:
    """The 8-byte little-endian CRC-64-AVRO fingerprint of a schema's parsing canonical form."""
    canonical = to_parsing_canonical_form(schema)
    # fastavro already returns the little-endian byte order that single-object encoding puts on the wire.
    return bytes.fromhex(fingerprint(canonical, FINGERPRINT_ALGORITHM))


def _without_logical_types(schema: Any) -> Any:
    """A copy without `logicalType`, so the codec sees raw strings and longs and validates them itself."""
    if isinstance(schema, dict):
        return {key: _without_logical_types(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(item) for item in schema]
    return schema


@dataclass(frozen=True, slots=True)
class SchemaVersion:
    """One version of one event type's record schema, as loaded from its `.avsc` file."""

    event_type: EventType
    version: int
    name: str
    """Full record name, e.g. `consent_ledger.events.ConsentChanged`."""
    fingerprint: bytes
    """CRC-64-AVRO of the parsing canonical form, little-endian, as on the wire."""
    schema: Mapping[str, Any] = field(repr=False, compare=False)
    """The schema exactly as written in its file (with docs and logical types)."""
    body_fields: tuple[str, ...] = field(repr=False, compare=False)
    path: Path = field(repr=False, compare=False)
    binary_schema: Any = field(repr=False, compare=False)
    """Parsed once for fastavro, logical types removed: the codec converts uuid and timestamps itself."""

    @property
    def label(self) -> str:
        return f"{self.event_type.value} v{self.version}"


def load_schema_file(path: Path) -> SchemaVersion:
    """Read, check and parse one `.avsc` file; raise `CatalogueError` naming the file otherwise."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CatalogueError(f"{path}: cannot read a JSON schema: {error}") from error
    if not isinstance(raw, dict) or raw.get("type") != "record":
        raise CatalogueError(f"{path}: an event schema must be a record")
    if raw.get("namespace") != NAMESPACE or "." in str(raw.get("name", "")):
        raise CatalogueError(f"{path}: the record needs a short name and namespace {NAMESPACE!r}")
    name = f"{NAMESPACE}.{raw['name']}"
    try:
        event_type = EventType(str(raw.get("event_type")))
    except ValueError:
        raise CatalogueError(f"{path}: attribute event_type must name an event type") from None
    version = raw.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CatalogueError(f"{path}: attribute version must be a positive integer")
    # The file name is how people find a version; a mismatch would hide one version behind another.
    in_history = path.parent.name == HISTORY_DIR
    expected = f"{name}.v{version}{SCHEMA_SUFFIX}" if in_history else f"{name}{SCHEMA_SUFFIX}"
    if path.name != expected:
        raise CatalogueError(f"{path}: a schema named {name} version {version} belongs in a file {expected}")
    fields = raw.get("fields")
    if not isinstance(fields, list) or tuple(
        entry.get("name") if isinstance(entry, dict) else None for entry in fields
    ) != ENVELOPE_FIELDS:
        raise CatalogueError(f"{path}: the fields must be {', '.join(ENVELOPE_FIELDS)} in this order")
    body = fields[-1]["type"]
    if not isinstance(body, dict) or body.get("type") != "record":
        raise CatalogueError(f"{path}: field body must be a record")
    try:
        binary_schema = parse_schema(_without_logical_types(raw))
        wire_fingerprint = schema_fingerprint(raw)
    except Exception as error:  # fastavro reports bad schemas with several exception types
        raise CatalogueError(f"{path}: not a valid Avro schema: {error}") from error
    return SchemaVersion(
        event_type=event_type,
        version=version,
        name=name,
        fingerprint=wire_fingerprint,
        schema=raw,
        body_fields=tuple(entry["name"] for entry in body.get("fields", [])),
        path=path,
        binary_schema=binary_schema,
    )


class SchemaCatalogue:
    """Writer schemas by fingerprint (every version ever written) and the reader schema of each event type.

    Layout of the folder: the latest version of each event type is `<full name>.avsc` at the top, with
    the custom attributes `"event_type"` and `"version"` on the record; when a schema changes, the
    previous file moves unchanged to `history/<full name>.v<version>.avsc`. Old versions are never
    deleted: messages written with them stay in Kafka and must remain readable.
    """

    def __init__(self, versions: Iterable[SchemaVersion]) -> None:
        self._versions: list[SchemaVersion] = sorted(versions, key=lambda v: (v.event_type.value, v.version))
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        self._latest: dict[EventType, SchemaVersion] = {}
        seen: dict[tuple[EventType, int], SchemaVersion] = {}
        for version in self._versions:
            key = (version.event_type, version.version)
            if key in seen:
                raise CatalogueError(
                    f"{version.path} and {seen[key].path} both claim {version.label}"
                )
            seen[key] = version
            claimed = self._by_fingerprint.get(version.fingerprint)
            if claimed is not None and claimed.event_type is not version.event_type:
                raise CatalogueError(f"{version.path} and {claimed.path} have the same fingerprint")
            # Versions that differ only in docs or defaults share a fingerprint; any of them can read
            # the bytes, and the newest one is kept because its docs are the current ones.
            self._by_fingerprint[version.fingerprint] = version
            self._latest[version.event_type] = version
        missing = [event_type.value for event_type in EventType if event_type not in self._latest]
        if missing:
            raise CatalogueError(f"no schema for event types: {', '.join(missing)}")
        for version in self._versions:
            # Only the file at the top is edited; anything older is frozen history.
            is_latest = self._latest[version.event_type] is version
            if is_latest == (version.path.parent.name == HISTORY_DIR):
                where = "at the top of the folder" if is_latest else f"in {HISTORY_DIR}/"
                raise CatalogueError(f"{version.path}: {version.label} belongs {where}")

    @classmethod
    def load(cls, directory: Path | None = None) -> SchemaCatalogue:
        """Load every `.avsc` under `directory` (default: the repository's `schemas/avro`) and its history."""
        root = directory if directory is not None else default_schema_dir()
        if not root.is_dir():
            raise CatalogueError(f"schema folder {root} does not exist")
        return cls(load_schema_file(path) for path in sorted(root.rglob(f"*{SCHEMA_SUFFIX}")))

    def by_fingerprint(self, wire_fingerprint: bytes) -> SchemaVersion | None:
        """The writer schema with this fingerprint, or None when this catalogue never saw it."""
        return self._by_fingerprint.get(wire_fingerprint)

    def latest(self, event_type: EventType) -> SchemaVersion:
        """The newest schema of an event type: what producers write and consumers read into."""
        return self._latest[event_type]

    def __iter__(self) -> Iterator[SchemaVersion]:
        return iter(self._versions)

    def __len__(self) -> int:
        return len(self._versions)
