"""After traffic, /metrics shows the writer's and the API's counters moved by exactly the right amounts."""

from __future__ import annotations

import re
from typing import Any

from aiokafka import AIOKafkaProducer
from e2e_history import history
from test_audit_e2e import jsonl


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + label_text + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_counters_move_by_the_traffic(system: Any) -> None:
    before = (await system.client.get("/metrics")).text
    events = history()
    assert system.cli("publish", "-", stdin=jsonl(events)).returncode == 0
    producer = AIOKafkaProducer(bootstrap_servers=system.settings.kafka_bootstrap_servers, acks="all")
    await producer.start()
    try:
        for garbage in (b"not avro", b"\xc3\x01" + bytes(8) + b"unknown fingerprint"):
            await producer.send_and_wait(system.settings.topics.name("accounts"), garbage, key=b"x")
    finally:
        await producer.stop()
    await system.wait_folded(len(events) + 1)
    for _ in range(3):
        await system.get("/v1/eligibility", subject_id="alice", conversation_id="a1")
    after = (await system.client.get("/metrics")).text

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("consent_ledger_entries_appended_total") == len(events)
    # Every message read is accounted for once: appended, rejected, a duplicate, or a redelivery (a rebalance
    # can hand a partition over mid-batch; the stored offsets then skip what was already committed).
    assert moved("consent_ledger_events_consumed_total") == (
        len(events) + 2 + moved("consent_ledger_duplicates_total") + moved("consent_ledger_redelivered_total")
    )
    assert moved("consent_ledger_events_rejected_total", reason="undecodable") == 1
    assert moved("consent_ledger_events_rejected_total", reason="unknown_schema") == 1
    assert moved("consent_ledger_duplicates_total") == 0
    assert moved("consent_ledger_api_seconds_count", method="GET", route="/v1/eligibility", status="200") == 3
    assert sample(after, "consent_ledger_state_lag") == 0
