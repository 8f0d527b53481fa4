"""Prometheus metrics of every service, defined once so names and labels stay consistent."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("consent_ledger_events_consumed_total", "Messages read from the event topics")
ENTRIES_APPENDED = Counter("consent_ledger_entries_appended_total", "Entries appended to the ledger")
DUPLICATES = Counter("consent_ledger_duplicates_total", "Redelivered events stored once (same event_id and body)")
REDELIVERED = Counter(
    "consent_ledger_redelivered_total", "Messages read again after a rebalance, below the stored offsets: skipped"
)
EVENTS_REJECTED = Counter(
    "consent_ledger_events_rejected_total", "Inputs sent to the rejected store", ["reason"]
)
APPEND_BATCH_SIZE = Histogram(
    "consent_ledger_append_batch_size", "Messages per append transaction",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
APPEND_LATENCY = Histogram(
    "consent_ledger_append_seconds", "Time of one append transaction",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CONSUMER_LAG = Gauge("consent_ledger_consumer_lag", "Messages on the event topics not yet appended")
OUTBOX_PUBLISHED = Counter("consent_ledger_outbox_published_total", "Entries published to ledger.entries")
LEDGER_HEAD = Gauge("consent_ledger_head_seq", "Highest seq in the ledger, as last seen by this process")
ENTRIES_FOLDED = Counter("consent_ledger_entries_folded_total", "Ledger entries folded into state tables")
FOLD_BATCH_SIZE = Histogram(
    "consent_ledger_fold_batch_messages", "Feed messages per folding transaction",
    buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000),
)
TICKS_RECORDED = Counter(
    "consent_ledger_ticks_recorded_total",
    "Watermark ticks recorded, by what showed their promise held: the ledger scanned, or the feed's offsets unbroken",
    ["checked_by"],
)
FOLD_LATENCY = Histogram("consent_ledger_fold_batch_seconds", "Time to fold one batch and commit it")
FOLD_RETRIES = Counter(
    "consent_ledger_fold_retries_total",
    "Fold transactions rolled back by PostgreSQL, or whose session was lost, and folded again", ["sqlstate"],
)
STATE_LAG = Gauge("consent_ledger_state_lag", "Ledger head seq minus the seq folded into state tables")
API_LATENCY = Histogram(
    "consent_ledger_api_seconds", "Audit API latency", ["route", "method", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
