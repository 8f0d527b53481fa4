-- Derived state folded from the ledger: bitemporal fact tables (valid time x transaction time).
-- Each row is one fact (see core/facts.py) known from `known_from` until `known_to` (NULL: still known).
-- `fact_hash` identifies a fact's content, so the open version of a fact is unique per subject and
-- re-folding an entry (at-least-once delivery) inserts nothing twice.

CREATE TABLE consent_intervals (
  subject_id     text        NOT NULL,
  fact_hash      bytea       NOT NULL,
  valid_from     timestamptz,
  valid_to       timestamptz,
  consent_on     boolean     NOT NULL,
  choice         text,
  policy_version text        NOT NULL,
  source_seq     bigint,
  known_from     timestamptz NOT NULL,
  known_to       timestamptz,
  CHECK (valid_from IS NULL OR valid_to IS NULL OR valid_from < valid_to)
);
CREATE UNIQUE INDEX consent_intervals_open ON consent_intervals (subject_id, fact_hash) WHERE known_to IS NULL;
CREATE INDEX consent_intervals_lookup ON consent_intervals (subject_id, valid_from);

CREATE TABLE account_intervals (
  subject_id     text        NOT NULL,
  fact_hash      bytea       NOT NULL,
  valid_from     timestamptz,
  valid_to       timestamptz,
  registered     boolean     NOT NULL,
  account_type   text,
  deleted        boolean     NOT NULL,
  registered_seq bigint,
  type_seq       bigint,
  deleted_seq    bigint,
  known_from     timestamptz NOT NULL,
  known_to       timestamptz,
  CHECK (valid_from IS NULL OR valid_to IS NULL OR valid_from < valid_to)
);
CREATE UNIQUE INDEX account_intervals_open ON account_intervals (subject_id, fact_hash) WHERE known_to IS NULL;
CREATE INDEX account_intervals_lookup ON account_intervals (subject_id, valid_from);

CREATE TABLE conversation_facts (
  subject_id         text        NOT NULL,
  fact_hash          bytea       NOT NULL,
  conversation_id    text        NOT NULL,
  kind               text        NOT NULL
                     CHECK (kind IN ('started', 'resumed', 'deleted', 'feedback', 'flagged', 'cleared')),
  occurred_at        timestamptz NOT NULL,
  seq                bigint      NOT NULL,
  flag_id            text,
  counts_for_consent boolean     NOT NULL,
  known_from         timestamptz NOT NULL,
  known_to           timestamptz
);
CREATE UNIQUE INDEX conversation_facts_open ON conversation_facts (subject_id, fact_hash) WHERE known_to IS NULL;
CREATE INDEX conversation_facts_lookup ON conversation_facts (subject_id, conversation_id, occurred_at);

-- The last ledger seq folded for each subject: the idempotency guard of the stream processors.
CREATE TABLE subject_fold_state (
  subject_id  text        PRIMARY KEY,
  folded_seq  bigint      NOT NULL,
  recorded_at timestamptz NOT NULL
);

-- Per ledger.entries partition: every entry up to watermark_seq on it has been folded.
CREATE TABLE processor_progress (
  app_id        text    NOT NULL,
  partition     integer NOT NULL,
  watermark_seq bigint  NOT NULL,
  updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (app_id, partition)
);

REVOKE ALL ON consent_intervals, account_intervals, conversation_facts, subject_fold_state, processor_progress
  FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON consent_intervals, account_intervals, conversation_facts, subject_fold_state,
  processor_progress TO consent_ledger_service;
