-- The current-state table: each subject's state from its last event on (consent choice, account, each
-- conversation's status), written by the stream processors in the same transaction as the subject's facts,
-- so it is exactly as folded as they are. Replaces the processors' changelog-backed faust table, which was
-- at-least-once on its own, unread by anything, and crashed workers whose broker misreported log ends.
CREATE TABLE subject_current_state (
  subject_id  text   PRIMARY KEY,
  folded_seq  bigint NOT NULL,
  state       jsonb  NOT NULL
);

REVOKE ALL ON subject_current_state FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON subject_current_state TO consent_ledger_service;
