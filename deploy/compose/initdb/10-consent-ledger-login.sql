-- Runs once, as the postgres superuser, when the compose PostgreSQL volume is first initialised.
-- Creates the login the services connect with (CONSENT_LEDGER_DATABASE_URL in docker-compose.yml) and
-- makes it a member of the group role the migrations grant table rights to.
--
-- The group role is created here too, with the same definition as migration 0001 (which skips it when
-- it exists): migrations run later, but the GRANT below needs the role now.
--
-- The password is for the local compose stack only; see deploy/OPERATIONS.md, "Database roles".

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consent_ledger_service') THEN
    CREATE ROLE consent_ledger_service NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'consent_ledger') THEN
    CREATE ROLE consent_ledger LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD 'consent_ledger_dev';
  END IF;
END
$$;

GRANT consent_ledger_service TO consent_ledger;
