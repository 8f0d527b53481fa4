-- Reads and writes of the derived state tables (see migrations/0002_state.sql).

-- name: claim_fold_state
-- A row for every subject of the batch before locking: FOR UPDATE locks only rows that exist, so two workers
-- folding a new subject at once (a rebalance redelivers to the new owner what the old one is still folding)
-- would both fold it from nothing. Inserting waits for the other's uncommitted row, in subject order.
INSERT INTO subject_fold_state (subject_id, folded_seq, recorded_at)
SELECT subject_id, 0, '-infinity' FROM unnest($1::text[]) AS s(subject_id) ORDER BY subject_id
ON CONFLICT (subject_id) DO NOTHING;

-- name: lock_fold_state
-- A statement of its own after claim_fold_state: it sees (and locks) the rows another worker committed meanwhile.
SELECT subject_id, folded_seq FROM subject_fold_state WHERE subject_id = ANY($1::text[]) ORDER BY subject_id
FOR UPDATE;

-- name: save_fold_state
INSERT INTO subject_fold_state (subject_id, folded_seq, recorded_at)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[])
ON CONFLICT (subject_id) DO UPDATE
SET folded_seq = EXCLUDED.folded_seq, recorded_at = EXCLUDED.recorded_at
WHERE subject_fold_state.folded_seq < EXCLUDED.folded_seq;

-- name: subjects_history
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE subject_id = ANY($1::text[]) AND seq <= $2 ORDER BY seq;

-- name: save_progress
INSERT INTO processor_progress (app_id, partition, watermark_seq)
SELECT $1, * FROM unnest($2::integer[], $3::bigint[])
ON CONFLICT (app_id, partition) DO UPDATE
SET watermark_seq = GREATEST(processor_progress.watermark_seq, EXCLUDED.watermark_seq),
    updated_at = clock_timestamp();

-- name: progress
SELECT partition, watermark_seq FROM processor_progress WHERE app_id = $1;

-- name: consent_at
SELECT subject_id, valid_from, valid_to, consent_on, choice, policy_version, source_seq
FROM consent_intervals
WHERE subject_id = ANY($1::text[])
  AND (valid_from IS NULL OR valid_from <= $2) AND (valid_to IS NULL OR valid_to > $2)
  AND known_from <= $3 AND (known_to IS NULL OR known_to > $3);

-- name: account_at
SELECT subject_id, valid_from, valid_to, registered, account_type, deleted, registered_seq, type_seq, deleted_seq
FROM account_intervals
WHERE subject_id = ANY($1::text[])
  AND (valid_from IS NULL OR valid_from <= $2) AND (valid_to IS NULL OR valid_to > $2)
  AND known_from <= $3 AND (known_to IS NULL OR known_to > $3);

-- name: conversation_facts_until
SELECT f.subject_id, f.conversation_id, f.kind, f.occurred_at, f.seq, f.flag_id, f.counts_for_consent
FROM conversation_facts f
JOIN (SELECT DISTINCT * FROM unnest($1::text[], $2::text[]) AS q(subject_id, conversation_id)) q
  ON f.subject_id = q.subject_id AND f.conversation_id = q.conversation_id
WHERE f.occurred_at <= $3 AND f.known_from <= $4 AND (f.known_to IS NULL OR f.known_to > $4);

-- name: consent_timeline
SELECT valid_from, valid_to, consent_on, choice, policy_version, source_seq
FROM consent_intervals
WHERE subject_id = $1 AND known_from <= $2 AND (known_to IS NULL OR known_to > $2)
ORDER BY valid_from NULLS FIRST;

-- name: replay_subject_entries
-- Subject by subject (the ledger_subject_seq index gives this order): a subject's history at a time.
SELECT seq, recorded_at, event_id, event_type, subject_id, occurred_at, producer, body, entry_hash
FROM ledger WHERE subject_id IS NOT NULL AND recorded_at <= $1 ORDER BY subject_id, seq;

-- name: fold_state_differences
SELECT coalesce(l.subject_id, s.subject_id) AS subject_id, l.max_seq, s.folded_seq
FROM (SELECT subject_id, max(seq) AS max_seq FROM ledger WHERE subject_id IS NOT NULL GROUP BY subject_id) l
FULL JOIN subject_fold_state s ON s.subject_id = l.subject_id
WHERE l.max_seq IS DISTINCT FROM s.folded_seq
ORDER BY 1 LIMIT $1;

-- name: watermark_and_folded
-- One round trip for the two numbers every question needs: what it may see, and what is folded.
SELECT coalesce((SELECT seq FROM ledger WHERE recorded_at <= $1 ORDER BY recorded_at DESC, seq DESC LIMIT 1), 0)
         AS watermark,
       (SELECT CASE WHEN count(*) >= $3 THEN min(watermark_seq) ELSE 0 END
          FROM processor_progress WHERE app_id = $2) AS folded;

-- name: subjects_between
-- The subjects with entries in (a partition's last watermark, its new one]: what a tick promises is folded.
SELECT subject_id, max(seq) AS last_seq FROM ledger
WHERE seq > $1 AND seq <= $2 AND subject_id IS NOT NULL GROUP BY subject_id;

-- name: progress_of
SELECT partition, watermark_seq FROM processor_progress WHERE app_id = $1 AND partition = ANY($2::integer[]);

-- name: entries_to_fold
-- Exactly the entries each subject lacks: (its folded seq, the highest seq the feed announced].
SELECT l.seq, l.recorded_at, l.event_id, l.event_type, l.subject_id, l.occurred_at, l.producer, l.body, l.entry_hash
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS q(subject_id, after_seq, upto_seq)
JOIN ledger l ON l.subject_id = q.subject_id AND l.seq > q.after_seq AND l.seq <= q.upto_seq
ORDER BY l.seq;
