"""Loads policy timelines from JSON files: the shipped default or an operator's "what if" file."""

from __future__ import annotations

import json
from pathlib import Path

from consent_ledger.core.policy import PolicyTimeline, timeline_from_json

SCHEMAS_DIR = Path(__file__).resolve().parents[3] / "schemas"
DEFAULT_TIMELINE = SCHEMAS_DIR / "policy" / "timeline.json"


def load_timeline(path: Path | None = None) -> PolicyTimeline:
    """Read and validate a timeline; the error names the file and what is wrong with it."""
    source = path or DEFAULT_TIMELINE
    try:
        return timeline_from_json(json.loads(source.read_text()))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot use policy timeline {source}: {error}") from error
