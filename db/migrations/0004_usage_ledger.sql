-- The usage ledger: per (API key, model, backend, hour), the tokens the backends reported in
-- their answers (`usage`, with `prompt_tokens_details.cached_tokens`) and what routing did for
-- the requests. Every node counts in memory and adds its counts here in batches (one statement
-- per flush interval, upsert-add). Nothing here notifies: the ledger is not routing state.

CREATE TABLE usage_ledger (
    -- The start of the hour (UTC epoch multiple of 3600, whatever the session's time zone).
    hour_start         timestamptz NOT NULL
        CHECK (extract(epoch FROM hour_start)::numeric % 3600 = 0),
    api_key_id         uuid NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    model              text NOT NULL CHECK (length(model) BETWEEN 1 AND 256),
    backend            text NOT NULL CHECK (length(backend) BETWEEN 1 AND 2048),
    requests           bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    prompt_tokens      bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    cached_tokens      bigint NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    completion_tokens  bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    -- Routing outcomes (vocabulary.LedgerOutcome); they add up to `requests`.
    hit_requests       bigint NOT NULL DEFAULT 0 CHECK (hit_requests >= 0),
    miss_requests      bigint NOT NULL DEFAULT 0 CHECK (miss_requests >= 0),
    rebind_requests    bigint NOT NULL DEFAULT 0 CHECK (rebind_requests >= 0),
    spill_requests     bigint NOT NULL DEFAULT 0 CHECK (spill_requests >= 0),
    degraded_requests  bigint NOT NULL DEFAULT 0 CHECK (degraded_requests >= 0),
    bypass_requests    bigint NOT NULL DEFAULT 0 CHECK (bypass_requests >= 0),
    fanout_requests    bigint NOT NULL DEFAULT 0 CHECK (fanout_requests >= 0),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    -- Time first: reports and the retention cleanup read a range of hours.
    PRIMARY KEY (hour_start, api_key_id, model, backend)
);

-- One tenant's history (`usage --key`), and the cascade when a key is deleted.
CREATE INDEX usage_ledger_api_key_idx ON usage_ledger (api_key_id, hour_start);

-- The last batch each writer (one node process) added: a batch sent again after an attempt
-- whose answer was lost carries the same sequence number and adds nothing the second time.
CREATE TABLE usage_ledger_writers (
    writer      uuid PRIMARY KEY,
    node_id     text NOT NULL CHECK (length(node_id) BETWEEN 1 AND 128),
    last_seq    bigint NOT NULL CHECK (last_seq > 0),
    flushed_at  timestamptz NOT NULL DEFAULT now()
);

-- Dashboards read the ledger as the read-only role of deploy/postgres/roles.sql, when it
-- exists already (roles.sql grants the same when it runs after this migration).
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'affinity_reader') THEN
        GRANT SELECT ON usage_ledger TO affinity_reader;
        GRANT SELECT (id, name) ON api_keys TO affinity_reader;
    END IF;
END
$$;
