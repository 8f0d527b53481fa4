-- The append-only, hash-chained ledger, the rejected-events store and the writer's Kafka offsets.

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consent_ledger_service') THEN
    -- A group role: operators grant it to the login the services use (see deploy/OPERATIONS.md).
    CREATE ROLE consent_ledger_service NOLOGIN;
  END IF;
END
$$;

CREATE TABLE ledger (
  seq              bigint      PRIMARY KEY CHECK (seq > 0),
  recorded_at      timestamptz NOT NULL,
  event_id         uuid        NOT NULL UNIQUE,
  event_type       text        NOT NULL,
  subject_id       text,
  occurred_at      timestamptz NOT NULL,
  producer         text        NOT NULL,
  body             jsonb       NOT NULL,
  entry_hash       bytea       NOT NULL CHECK (octet_length(entry_hash) = 32),
  -- Where the entry came from; not covered by the hash (an API-written receipt has none).
  source_topic     text,
  source_partition integer,
  source_offset    bigint
);
CREATE INDEX ledger_subject_seq ON ledger (subject_id, seq);
CREATE INDEX ledger_recorded_at ON ledger (recorded_at, seq);
CREATE INDEX ledger_event_type_seq ON ledger (event_type, seq) WHERE subject_id IS NULL;

CREATE TABLE rejected_events (
  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  rejected_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
  reason           text        NOT NULL,
  detail           text        NOT NULL,
  field            text,
  event_id         uuid,
  source_topic     text        NOT NULL,
  source_partition integer     NOT NULL,
  source_offset    bigint      NOT NULL,
  raw              bytea       NOT NULL,
  UNIQUE (source_topic, source_partition, source_offset)
);

CREATE TABLE consumer_offsets (
  group_id    text        NOT NULL,
  topic       text        NOT NULL,
  partition   integer     NOT NULL,
  next_offset bigint      NOT NULL CHECK (next_offset >= 0),
  updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (group_id, topic, partition)
);

-- How far the ledger.entries topic has been fed from the ledger (the outbox cursor).
CREATE TABLE outbox_cursor (
  name       text        PRIMARY KEY,
  last_seq   bigint      NOT NULL CHECK (last_seq >= 0),
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE FUNCTION refuse_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'the % table is append-only: % refused', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
  FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
  FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER rejected_events_append_only BEFORE UPDATE OR DELETE ON rejected_events
  FOR EACH ROW EXECUTE FUNCTION refuse_ledger_change();
CREATE TRIGGER rejected_events_no_truncate BEFORE TRUNCATE ON rejected_events
  FOR EACH STATEMENT EXECUTE FUNCTION refuse_ledger_change();

REVOKE ALL ON ledger, rejected_events, consumer_offsets, outbox_cursor FROM PUBLIC;
GRANT SELECT, INSERT ON ledger, rejected_events TO consent_ledger_service;
GRANT SELECT, INSERT, UPDATE ON consumer_offsets, outbox_cursor TO consent_ledger_service;
GRANT SELECT ON schema_migrations TO consent_ledger_service;
