"""Readable renderings of answers for people at a terminal."""

from __future__ import annotations

from typing import Any


def render_decision(answer: dict[str, Any]) -> str:
    verdict = "ELIGIBLE" if answer["eligible"] else "NOT ELIGIBLE"
    why = ", ".join(answer["basis"]) if answer["eligible"] else ", ".join(answer["reasons"])
    lines = [
        f"{verdict} ({'basis' if answer['eligible'] else 'reason'}: {why})",
        f"  subject {answer['subject_id']}, conversation {answer['conversation_id']}",
        f"  at {answer['at']}, as known at {answer['known_at']} (ledger up to seq {answer['ledger_watermark']})",
        f"  policy {answer['policy_version']}",
    ]
    if answer["evidence"]:
        lines.append("  evidence:")
        lines += [
            f"    seq {e['seq']:>6}  {e['event_type']:<22} occurred {e['occurred_at']}  recorded {e['recorded_at']}"
            for e in answer["evidence"]
        ]
    return "\n".join(lines)
