-- The backend registry belongs to the operators (issue 21): the serving role only reads it,
-- so a leaked serving DSN cannot add a backend of its choosing to every node. Default
-- privileges (deploy/postgres/roles.sql) gave affinity_node every row right on the registry
-- when roles.sql ran before migration 0003; this takes the writes back. roles.sql does the
-- same when it runs after this migration. Without those roles (one owner role for
-- everything) nothing changes.
--
-- `backends list` shows what the nodes run on each backend (their in-flight requests, as
-- they report health) instead of asking the backend: it fetches nothing from URLs that the
-- registry holds.

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'affinity_node') THEN
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON affinity_backends FROM affinity_node;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'affinity_admin') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON affinity_backends TO affinity_admin;
    END IF;
END
$$;

ALTER TABLE affinity_backend_health
    ADD COLUMN inflight integer NOT NULL DEFAULT 0 CHECK (inflight >= 0);
