-- The roles of affinity-node, created once per database by its owner or a superuser:
--   psql "postgresql://admin@pg-rw.db.svc:5432/affinity" -f deploy/postgres/roles.sql
-- then give each a password (or use your operator's secrets) and put their DSNs in the
-- Kubernetes Secrets (deploy/README.md):
--   ALTER ROLE affinity_migrator PASSWORD '...';   -- Secret affinity-node-migrate-db
--   ALTER ROLE affinity_node PASSWORD '...';       -- Secret affinity-node-db
--   ALTER ROLE affinity_admin PASSWORD '...';      -- operators: `affinity-node backends ...`
--
-- affinity_migrator owns the schema objects: only `affinity-node migrate` (the Job) uses it.
-- affinity_node serves: it reads and writes rows, takes advisory locks, LISTENs and
-- NOTIFYs (no privilege needed), and can create no table, index, function or trigger.
-- It only reads the backend registry (affinity_backends): a stolen serving DSN cannot point
-- the fleet at a backend of its choosing. Default privileges give it the same rights on what
-- later migrations create (migration 0006 takes the registry back when it runs after this).
-- affinity_admin: operators' commands (`backends add|drain|undrain|remove`, keys, bindings):
-- every row of every table, no DDL.
-- Safe to run again.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'affinity_migrator') THEN
        CREATE ROLE affinity_migrator LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'affinity_node') THEN
        CREATE ROLE affinity_node LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'affinity_admin') THEN
        CREATE ROLE affinity_admin LOGIN;
    END IF;
    EXECUTE format(
        'GRANT CONNECT ON DATABASE %I TO affinity_migrator, affinity_node, affinity_admin',
        current_database());
    -- Nobody else creates objects in the schema (the default since PostgreSQL 15).
    EXECUTE format('REVOKE CREATE ON DATABASE %I FROM PUBLIC', current_database());
END
$$;

REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO affinity_migrator;
GRANT USAGE ON SCHEMA public TO affinity_node, affinity_admin;

-- What the migrator creates from now on.
ALTER DEFAULT PRIVILEGES FOR ROLE affinity_migrator IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO affinity_node, affinity_admin;
ALTER DEFAULT PRIVILEGES FOR ROLE affinity_migrator IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO affinity_node, affinity_admin;

-- What exists already (an install from before the split, migrated by another role).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO affinity_node, affinity_admin;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO affinity_node, affinity_admin;

-- The backend registry is the admin's: the serving role reads it.
DO $$
BEGIN
    IF to_regclass('public.affinity_backends') IS NOT NULL THEN
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON affinity_backends FROM affinity_node;
    END IF;
END
$$;

-- affinity_reader: dashboards (Grafana's "Affinity ledger" datasource). It reads the usage
-- ledger and the key names, nothing else (never key hashes), in read-only transactions with a
-- statement timeout, and a session idle inside a transaction is ended after 30 s: an open
-- transaction that LISTENs holds the NOTIFY queue's tail, and a full queue fails every
-- notifying commit of the fleet (RUNBOOK.md, "NOTIFY queue filling"). Migration 0004 grants it the ledger when this ran first; the grants
-- below do when the migrations ran first. Give it a password: ALTER ROLE affinity_reader
-- PASSWORD '...'.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'affinity_reader') THEN
        CREATE ROLE affinity_reader LOGIN;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO affinity_reader', current_database());
    IF to_regclass('public.usage_ledger') IS NOT NULL THEN
        GRANT SELECT ON usage_ledger TO affinity_reader;
        GRANT SELECT (id, name) ON api_keys TO affinity_reader;
    END IF;
END
$$;
ALTER ROLE affinity_reader SET default_transaction_read_only = on;
ALTER ROLE affinity_reader SET statement_timeout = '10s';
ALTER ROLE affinity_reader SET idle_in_transaction_session_timeout = '30s';
GRANT USAGE ON SCHEMA public TO affinity_reader;
