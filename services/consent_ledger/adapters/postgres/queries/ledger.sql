-- Queries of the ledger writer and of everything that reads the ledger.

-- name: lock_appends
-- One appender at a time keeps seq gapless and the chain linear (see docs/adr/0002).
SELECT pg_advisory_xact_lock(7316285410396272485);

-- name: head
SELECT seq, entry_hash, recorded_at FROM ledger ORDER BY seq DESC LIMIT 1;

-- name: head_and_clock
-- Under the append lock: the head to chain after (NULLs and seq 0 on an empty ledger) and the database clock.
SELECT coalesce(h.seq, 0) AS seq, h.entry_hash, h.recorded_at, clock_timestamp() AS clock
FROM (SELECT 1) AS one LEFT JOIN (SELECT seq, entry_hash, recorded_at FROM ledger ORDER BY seq DESC LIMIT 1) h ON true;

-- name: head_seq
SELECT coalesce(max(seq), 0) FROM ledger;

-- name: entries_by_event_id
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE event_id = ANY($1::uuid[]);

-- name: latest_entries_by_event_id
-- The same among the last $2 entries only: a walk back from the head, whatever the plan guesses of $2.
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM (SELECT * FROM ledger ORDER BY seq DESC LIMIT $2) latest WHERE event_id = ANY($1::uuid[]);

-- name: stored_offsets
SELECT topic, partition, next_offset FROM consumer_offsets
WHERE group_id = $1 AND topic = ANY($2::text[]);

-- name: save_offset
INSERT INTO consumer_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
ON CONFLICT (group_id, topic, partition)
DO UPDATE SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset),
              updated_at = clock_timestamp();

-- name: insert_rejection
INSERT INTO rejected_events (reason, detail, field, event_id, source_topic, source_partition, source_offset, raw)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING;

-- name: entries_from
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3;

-- name: announcements_from
-- What the outbox publishes: which subject each entry after the cursor is about (the entries stay here).
SELECT seq, subject_id FROM ledger WHERE seq > $1 ORDER BY seq LIMIT $2;

-- name: links_outside_subjects
-- The entries up to seq $2 that no replay shard reads (no subject, or recorded after the cut $1), each with the
-- recorded_at and entry_hash of seq - 1 (NULL when there is none), as replay_subject_entries gives them.
SELECT l.seq, l.recorded_at, l.event_id, l.event_type, l.subject_id, l.occurred_at, l.producer, l.body,
       l.entry_hash, p.recorded_at, p.entry_hash
FROM ledger l LEFT JOIN ledger p ON p.seq = l.seq - 1
WHERE l.seq <= $2 AND (l.subject_id IS NULL OR l.recorded_at > $1)
ORDER BY l.seq;

-- name: entry_before
-- The entry stored last before seq $1: what an entry after a gap follows.
SELECT seq, recorded_at, entry_hash FROM ledger WHERE seq < $1 ORDER BY seq DESC LIMIT 1;

-- name: entry_by_event_id
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE event_id = $1;

-- name: entries_by_seq
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE seq = ANY($1::bigint[]) ORDER BY seq;

-- name: subject_entries
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE subject_id = $1 AND recorded_at <= $2 ORDER BY seq;

-- name: watermark_at
SELECT seq, recorded_at FROM ledger WHERE recorded_at <= $1 ORDER BY recorded_at DESC, seq DESC LIMIT 1;

-- name: rejections_after
SELECT id, rejected_at, reason, detail, field, event_id, source_topic, source_partition, source_offset, raw
FROM rejected_events WHERE id > $1 ORDER BY id LIMIT $2;

-- name: count_entries
SELECT count(*) FROM ledger;

-- name: outbox_lock
-- Session lock: one publisher feeds ledger.entries at a time, whatever the number of writers.
SELECT pg_try_advisory_lock(7316285410396272486);

-- name: outbox_cursor
SELECT last_seq FROM outbox_cursor WHERE name = $1;

-- name: save_outbox_cursor
INSERT INTO outbox_cursor (name, last_seq) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET last_seq = GREATEST(outbox_cursor.last_seq, EXCLUDED.last_seq),
                                 updated_at = clock_timestamp();

-- name: latest_policy
SELECT body FROM ledger WHERE event_type = 'policy.published' AND subject_id IS NULL ORDER BY seq DESC LIMIT 1;

-- name: policy_before
-- The timeline in force when the entry at seq $1 was appended: the last one recorded before it.
SELECT body FROM ledger WHERE event_type = 'policy.published' AND subject_id IS NULL AND seq < $1
ORDER BY seq DESC LIMIT 1;


-- name: subject_entries_after
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE subject_id = ANY($1::text[]) AND seq > $2 AND occurred_at <= $3 ORDER BY seq;

-- name: decision_entries
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE event_type = 'decision.recorded' AND subject_id IS NULL AND seq > $1 ORDER BY seq LIMIT $2;
