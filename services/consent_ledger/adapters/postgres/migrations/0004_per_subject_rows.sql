-- The two per-subject rows every fold batch rewrites, one new version per subject folded: made cheaper to rewrite.
-- With the history in arrival order 15,800 consecutive entries hold 13,065-13,616 subjects (lab), and the current
-- state's upsert alone was 42% of PostgreSQL's CPU in the fold (lab, 300,000 entries: 16.4 s, 9.5 s without it).

-- Room on each page for a row's next version: an update that fits beside the old one is HOT (no new index
-- entry, and the old version is pruned on the page). Pages written from now on; VACUUM FULL packs older ones.
ALTER TABLE subject_fold_state SET (fillfactor = 60);
ALTER TABLE subject_current_state SET (fillfactor = 60);

-- json, not jsonb: the state is written whole and read whole, never queried inside, and parsing it into jsonb
-- doubled the cost of its upsert (15,000 rows, fillfactor 60: 287-344 ms as jsonb, 139-210 ms as json). The
-- processors write it canonically (core.state.current_state through orjson); comparisons cast it to jsonb.
ALTER TABLE subject_current_state ALTER COLUMN state TYPE json USING state::json;
