-- Every statement the binding store and the key store run. The domain asks for them by name.
-- Remaining lifetimes are computed here, by the database clock, and returned in seconds.

-- name: binding_read
-- Lock-free read of one live binding.
SELECT provider_url, version, extract(epoch FROM expires_at - now())::float8 AS ttl, fanout_urls
FROM api_key_model_affinity
WHERE api_key_id = $1 AND model = $2 AND expires_at > now();

-- name: binding_lock
-- Transaction-scoped: released by commit or rollback, never leaked by a pooled connection.
-- The transaction's commit does not wait for its WAL flush. A notifying commit holds
-- Postgres's one NOTIFY lock across that flush, so waiting for it capped new bindings at one
-- fsync each across the fleet (bench-scale: ~850/s, p99 lag 117 ms, inserts timing out on
-- the lock). A binding is soft state: one lost to a crash is picked again, and a node sees
-- the restart (server start time) and reloads.
SELECT pg_advisory_xact_lock($1::bigint), set_config('synchronous_commit', 'off', true);

-- name: binding_create
-- Runs under binding_lock after a re-check found no live row; an expired row is replaced.
INSERT INTO api_key_model_affinity AS a (api_key_id, model, provider_url, version, expires_at)
VALUES ($1, $2, $3, 0, now() + make_interval(secs => $4::float8))
ON CONFLICT (api_key_id, model) DO UPDATE
    SET provider_url = EXCLUDED.provider_url,
        fanout_urls = '{}',
        expires_at = EXCLUDED.expires_at,
        created_at = now()
    WHERE a.expires_at <= now()
RETURNING provider_url, version, extract(epoch FROM expires_at - now())::float8 AS ttl, fanout_urls;

-- name: binding_rebind
-- Compare-and-set: moves the binding only if it still points where the caller saw it and is
-- still live (an expired row is re-created under the pair's lock, never revived by a move).
-- A new first member that was already in the set leaves the rest of the set.
UPDATE api_key_model_affinity
SET provider_url = $4, fanout_urls = array_remove(fanout_urls, $4),
    expires_at = now() + make_interval(secs => $5::float8)
WHERE api_key_id = $1 AND model = $2 AND provider_url = $3 AND expires_at > now()
RETURNING provider_url, version, extract(epoch FROM expires_at - now())::float8 AS ttl, fanout_urls;

-- name: binding_set_members
-- Grow or shrink a set: runs under the pair's advisory lock, and changes the row only if it is
-- still the version the caller decided on, so concurrent decisions change it once.
UPDATE api_key_model_affinity
SET fanout_urls = $4::text[]
WHERE api_key_id = $1 AND model = $2 AND version = $3 AND expires_at > now()
RETURNING provider_url, version, extract(epoch FROM expires_at - now())::float8 AS ttl, fanout_urls;

-- name: binding_refresh
-- One statement per flush: extends every live binding that still points where the node saw it.
-- Nodes flush overlapping batches at the same moment: rows are locked in key order and a row
-- another node is extending right now is skipped (it is being extended anyway), so two
-- flushes never deadlock and never wait for each other.
WITH wanted AS (
    SELECT a.api_key_id, a.model
    FROM api_key_model_affinity AS a
    JOIN unnest($1::uuid[], $2::text[], $3::text[]) AS r (api_key_id, model, provider_url)
      ON a.api_key_id = r.api_key_id AND a.model = r.model AND a.provider_url = r.provider_url
    WHERE a.expires_at > now()
    ORDER BY a.api_key_id, a.model
    FOR UPDATE OF a SKIP LOCKED
)
UPDATE api_key_model_affinity AS a
SET expires_at = now() + make_interval(secs => $4::float8)
FROM wanted AS w
WHERE a.api_key_id = w.api_key_id AND a.model = w.model
RETURNING a.api_key_id, a.model, a.provider_url, a.version,
          extract(epoch FROM a.expires_at - now())::float8 AS ttl, a.fanout_urls;

-- name: binding_snapshot_page
-- One page of a full snapshot: the live bindings after the last pair read, in primary-key
-- order (an index range scan of at most $3 rows, so a page stays short however big the
-- table). Returned column by column in one row, numbers and ids packed big-endian, so the
-- node reads them into arrays without an object per row; each aggregate is ordered by the
-- key, which the index scan provides already (PostgreSQL 16+ sorts nothing more), so the
-- columns line up and the last row is the page's greatest pair. Sets (a handful) also list
-- their other members. date_part is float8 already (extract is numeric).
WITH page AS (
    SELECT api_key_id, model, provider_url, version, fanout_urls,
           date_part('epoch', expires_at - now()) AS ttl
    FROM api_key_model_affinity
    WHERE (api_key_id, model) > ($1::uuid, $2::text) AND expires_at > now()
    ORDER BY api_key_id, model
    LIMIT $3
)
SELECT string_agg(uuid_send(api_key_id), '' ORDER BY api_key_id, model),
       array_agg(model ORDER BY api_key_id, model),
       array_agg(provider_url ORDER BY api_key_id, model),
       string_agg(int8send(version), '' ORDER BY api_key_id, model),
       string_agg(float8send(ttl), '' ORDER BY api_key_id, model),
       array_agg((api_key_id, model, fanout_urls) ORDER BY api_key_id, model)
           FILTER (WHERE fanout_urls <> '{}')
FROM page;

-- name: snapshot_statement_timeout
-- Snapshot pages have their own deadline, not the request path's statement timeout.
SELECT set_config('statement_timeout', $1::text, true);

-- name: binding_estimate
-- The planner's row count (no scan): how far a snapshot has come, for /readyz.
SELECT greatest(reltuples, 0)::bigint FROM pg_class
WHERE oid = 'api_key_model_affinity'::regclass;

-- name: binding_deletions_horizon
-- Deletion-log entries at or below this version may have been trimmed.
SELECT version FROM affinity_binding_deletions_horizon;

-- name: binding_changed_since
-- A catch-up: rows whose routing changed after the node's watermark (expired ones too: they
-- replace what the node holds), by the version index.
SELECT api_key_id, model, provider_url, version,
       date_part('epoch', expires_at - now()) AS ttl, NULLIF(fanout_urls, '{}')
FROM api_key_model_affinity
WHERE version > $1
ORDER BY version
LIMIT $2;

-- name: binding_deleted_since
SELECT api_key_id, model, version
FROM affinity_binding_deletions
WHERE version > $1
ORDER BY version
LIMIT $2;

-- name: binding_deletions_trim
-- The cleanup leader forgets old deletion-log entries, a batch at a time, and moves the
-- horizon past them in the same statement.
WITH gone AS (
    DELETE FROM affinity_binding_deletions
    WHERE version IN (
        SELECT version FROM affinity_binding_deletions
        WHERE deleted_at < now() - make_interval(secs => $1::float8)
        ORDER BY version
        LIMIT $2
    )
    RETURNING version
), horizon AS (
    UPDATE affinity_binding_deletions_horizon
    SET version = greatest(version, (SELECT max(version) FROM gone))
    WHERE EXISTS (SELECT 1 FROM gone)
)
SELECT count(*) FROM gone;

-- name: binding_version_now
-- The newest version handed out: notifications claiming far more are not believed.
SELECT last_value FROM affinity_binding_version_seq;

-- name: server_started_at
-- A different answer after a reconnect: restarted, restored or failed over.
SELECT extract(epoch FROM pg_postmaster_start_time())::float8;

-- name: binding_cleanup_lock
-- One cleaner at a time across the fleet; the lock ends with the batch's transaction.
SELECT pg_try_advisory_xact_lock($1::bigint);

-- name: binding_cleanup_batch
DELETE FROM api_key_model_affinity
WHERE (api_key_id, model) IN (
    SELECT api_key_id, model FROM api_key_model_affinity
    WHERE expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
);

-- name: binding_list
SELECT api_key_id, model, provider_url, version, created_at, updated_at, expires_at,
       extract(epoch FROM expires_at - now())::float8 AS ttl, fanout_urls
FROM api_key_model_affinity
WHERE ($1::text IS NULL OR model = $1) AND ($2::uuid IS NULL OR api_key_id = $2)
ORDER BY model, api_key_id;

-- name: binding_purge
DELETE FROM api_key_model_affinity
WHERE ($1::text IS NULL OR model = $1) AND ($2::uuid IS NULL OR api_key_id = $2);

-- name: ping
SELECT 1;

-- name: db_clock
SELECT extract(epoch FROM clock_timestamp())::float8;

-- The listener's watermark (store/listener.py): the version is read first, the snapshot in a
-- later statement, so every transaction holding a version up to it is visible in that snapshot
-- or listed in progress there (the version trigger takes its transaction id first).

-- name: listener_version
SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM affinity_binding_version_seq;

-- name: listener_snapshot
-- The database clock, a snapshot, and whether every transaction in progress at an earlier
-- snapshot ($1) has ended.
SELECT extract(epoch FROM clock_timestamp())::float8, pg_current_snapshot()::text,
       $1::text IS NULL OR NOT EXISTS (
           SELECT 1 FROM pg_snapshot_xip($1::text::pg_snapshot) AS x
           WHERE pg_xact_status(x) = 'in progress'
       );

-- name: key_create
INSERT INTO api_keys (id, name, key_hash) VALUES ($1, $2, $3)
RETURNING id, name, created_at;

-- name: key_list
SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at, id;

-- name: key_revoke
UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
RETURNING id;

-- name: key_delete
DELETE FROM api_keys WHERE id = $1 RETURNING id;

-- name: key_active_page
-- What a node loads after LISTEN: every usable key, in pages of the primary key (a million
-- keys never make one statement long), like the binding snapshot returned as two packed
-- columns in one row (hashes are CHECKed 32 bytes, uuid_send 16), both aggregates in id
-- order so they line up and the last id is the page's greatest.
WITH page AS (
    SELECT id, key_hash FROM api_keys
    WHERE revoked_at IS NULL AND id > $1
    ORDER BY id
    LIMIT $2
)
SELECT string_agg(key_hash, '' ORDER BY id), string_agg(uuid_send(id), '' ORDER BY id)
FROM page;

-- name: key_names
-- The access log's key references when logging.key_ref is `name` (operator opt-in).
SELECT id, name FROM api_keys WHERE revoked_at IS NULL;

-- name: key_lookup
SELECT id, revoked_at IS NOT NULL AS revoked FROM api_keys WHERE key_hash = $1;

-- name: key_by_id
-- A key announced by a create or restore notification.
SELECT key_hash, revoked_at IS NOT NULL AS revoked FROM api_keys WHERE id = $1;

-- name: key_by_ids
-- The keys a batch of notifications named (create, restore, revoke, delete): the rows decide.
SELECT id, key_hash, revoked_at IS NOT NULL AS revoked FROM api_keys WHERE id = ANY($1::uuid[]);

-- Migration bookkeeping (store/migrate.py). The lock is session-scoped: it spans every file.

-- name: migrate_lock
SELECT pg_advisory_lock($1::bigint);

-- name: migrate_unlock
SELECT pg_advisory_unlock($1::bigint);

-- name: migrations_ledger
CREATE TABLE IF NOT EXISTS affinity_schema_migrations (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_applied
SELECT name, checksum FROM affinity_schema_migrations;

-- name: migration_record
INSERT INTO affinity_schema_migrations (name, checksum) VALUES ($1, $2);

-- Every lock wait of a migration is bounded (a DDL statement waiting for a lock queues every
-- later writer of the table behind itself). LOCAL: one transactional file; the others: the
-- session, while a no-transaction file runs.
-- name: migrate_lock_timeout_local
SELECT set_config('lock_timeout', $1, true);

-- name: migrate_lock_timeout
SELECT set_config('lock_timeout', $1, false);

-- name: migrate_lock_timeout_reset
RESET lock_timeout;

-- name: migrate_index_invalid
SELECT EXISTS (
    SELECT FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace
      AND NOT i.indisvalid
);

-- The index name is quoted by the caller (an identifier cannot be a parameter).
-- name: migrate_drop_index
DROP INDEX CONCURRENTLY IF EXISTS {index};

-- The schema a node needs (store/schema.py): the files applied so far.
-- name: schema_applied
SELECT name FROM affinity_schema_migrations;

-- Backend registry (store/registry.py): runtime backends and admin state of any backend.

-- name: registry_list
SELECT url, added, kind, models, state, drain_deadline FROM affinity_backends ORDER BY url;

-- name: registry_add
INSERT INTO affinity_backends (url, added, kind, models) VALUES ($1, true, $2, $3)
ON CONFLICT (url) DO UPDATE SET added = true, kind = EXCLUDED.kind, models = EXCLUDED.models
RETURNING url;

-- name: registry_set_state
-- For a backend only the YAML lists, the row holds its admin state (added = false).
INSERT INTO affinity_backends (url, added, state, drain_deadline) VALUES ($1, false, $2, $3)
ON CONFLICT (url) DO UPDATE SET state = EXCLUDED.state, drain_deadline = EXCLUDED.drain_deadline
RETURNING added;

-- name: registry_remove
DELETE FROM affinity_backends WHERE url = $1 RETURNING added;

-- name: registry_bindings
-- Live bindings per backend, set members included.
SELECT url, count(*) AS bindings FROM (
    SELECT provider_url AS url FROM api_key_model_affinity WHERE expires_at > now()
    UNION ALL
    SELECT unnest(fanout_urls) FROM api_key_model_affinity WHERE expires_at > now()
) AS b GROUP BY url;

-- name: health_report
INSERT INTO affinity_backend_health (node_id, url, healthy, kind, models, inflight, seen_at)
VALUES ($1, $2, $3, $4, $5, $6, now())
ON CONFLICT (url, node_id) DO UPDATE
    SET healthy = EXCLUDED.healthy, kind = EXCLUDED.kind, models = EXCLUDED.models,
        inflight = EXCLUDED.inflight, seen_at = now();

-- name: health_view
-- What the nodes that reported in the last 90 s know and see of each backend, and how many
-- requests they run on it.
SELECT url, count(*) FILTER (WHERE healthy) AS healthy, count(*) AS nodes,
       min(kind) AS kind, max(models) AS models, sum(inflight)::int AS inflight
FROM affinity_backend_health WHERE seen_at > now() - interval '90 seconds' GROUP BY url;

-- name: notify_queue_usage
-- The NOTIFY queue's fill (0-1): a session that LISTENs and sits in a transaction holds its
-- tail; when it is full every notifying commit fails.
SELECT pg_notification_queue_usage();

-- name: mover_slot
-- Fleet-wide pacing of binding moves: whoever takes the slot may move one binding now.
UPDATE affinity_mover SET last_move_at = now()
WHERE last_move_at <= now() - make_interval(secs => $1::float8)
RETURNING true;

-- name: mover_drain_candidates
-- Live bindings that hold a draining backend (as first member or in the set), oldest first.
SELECT api_key_id, model, provider_url, version, extract(epoch FROM expires_at - now())::float8,
       fanout_urls
FROM api_key_model_affinity
WHERE expires_at > now() AND (provider_url = ANY($1::text[]) OR fanout_urls && $1::text[])
ORDER BY updated_at
LIMIT $2;

-- name: mover_idle_bindings
-- Bindings on one backend alone (no set), idle the longest first: the cheapest to move.
SELECT api_key_id, model, provider_url, version, extract(epoch FROM expires_at - now())::float8,
       fanout_urls
FROM api_key_model_affinity
WHERE expires_at > now() AND provider_url = $1 AND fanout_urls = '{}'
ORDER BY expires_at
LIMIT $2;

-- Usage ledger (store/ledger_store.py). Counts arrive as parallel arrays, one element per row, in
-- the column order of ledger.COUNT_COLUMNS.

-- name: ledger_add
-- One statement per flush. `claim` records the batch's sequence number for its writer; a
-- batch sent again (its first attempt may or may not have landed) finds it claimed and adds
-- nothing. Rows arrive sorted alike from every node and are added in that order, so flushes
-- from many nodes lock the rows they share in one order and never deadlock. Rows of a key
-- deleted meanwhile are left out.
WITH claim AS (
    INSERT INTO usage_ledger_writers AS w (writer, node_id, last_seq)
    VALUES ($1, $2, $3)
    ON CONFLICT (writer) DO UPDATE SET last_seq = EXCLUDED.last_seq, flushed_at = now()
    WHERE w.last_seq < EXCLUDED.last_seq
    RETURNING 1
), added AS (
    INSERT INTO usage_ledger AS u (
        hour_start, api_key_id, model, backend, requests, prompt_tokens, cached_tokens,
        completion_tokens, hit_requests, miss_requests, rebind_requests, spill_requests,
        degraded_requests, bypass_requests, fanout_requests)
    SELECT to_timestamp(r.hour * 3600), r.api_key_id, r.model, r.backend, r.requests, r.prompt,
           r.cached, r.completion, r.hit, r.miss, r.rebind, r.spill, r.degraded, r.bypass,
           r.fanout
    FROM unnest($4::uuid[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[],
                $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[],
                $15::bigint[], $16::bigint[], $17::bigint[], $18::bigint[]) WITH ORDINALITY
         AS r (api_key_id, model, backend, hour, requests, prompt, cached, completion, hit,
               miss, rebind, spill, degraded, bypass, fanout, ord)
    WHERE EXISTS (SELECT FROM claim)
      AND EXISTS (SELECT FROM api_keys AS k WHERE k.id = r.api_key_id)
    ORDER BY r.ord
    ON CONFLICT (hour_start, api_key_id, model, backend) DO UPDATE SET
        requests = u.requests + EXCLUDED.requests,
        prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
        cached_tokens = u.cached_tokens + EXCLUDED.cached_tokens,
        completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens,
        hit_requests = u.hit_requests + EXCLUDED.hit_requests,
        miss_requests = u.miss_requests + EXCLUDED.miss_requests,
        rebind_requests = u.rebind_requests + EXCLUDED.rebind_requests,
        spill_requests = u.spill_requests + EXCLUDED.spill_requests,
        degraded_requests = u.degraded_requests + EXCLUDED.degraded_requests,
        bypass_requests = u.bypass_requests + EXCLUDED.bypass_requests,
        fanout_requests = u.fanout_requests + EXCLUDED.fanout_requests,
        updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM claim) = 1 AS claimed, (SELECT count(*) FROM added) AS rows;

-- name: ledger_cleanup_batch
-- Runs under binding_cleanup_lock with the ledger's own key: one cleaner at a time.
DELETE FROM usage_ledger
WHERE (hour_start, api_key_id, model, backend) IN (
    SELECT hour_start, api_key_id, model, backend FROM usage_ledger
    WHERE hour_start < now() - make_interval(secs => $1::float8)
    ORDER BY hour_start
    LIMIT $2
    FOR UPDATE SKIP LOCKED
);

-- name: ledger_writers_cleanup
-- A writer's sequence number guards against its own late duplicates, which cannot outlive a
-- statement timeout: a day of silence means the process is gone.
DELETE FROM usage_ledger_writers WHERE flushed_at < now() - interval '1 day';

-- name: usage_report
-- Per (key, model), over the hour buckets that overlap the last $1 seconds (database clock);
-- the most lost cache (uncached prompt tokens) first. The Tenants dashboard's table panel
-- computes the same figures over its time range (tests compare the two).
SELECT u.api_key_id, k.name AS key_name, u.model,
       sum(u.requests)::bigint AS requests,
       sum(u.prompt_tokens)::bigint AS prompt_tokens,
       sum(u.cached_tokens)::bigint AS cached_tokens,
       sum(u.completion_tokens)::bigint AS completion_tokens,
       sum(u.hit_requests)::bigint AS hit_requests,
       sum(u.miss_requests)::bigint AS miss_requests,
       sum(u.rebind_requests)::bigint AS rebind_requests,
       sum(u.spill_requests)::bigint AS spill_requests,
       sum(u.degraded_requests)::bigint AS degraded_requests,
       sum(u.bypass_requests)::bigint AS bypass_requests,
       sum(u.fanout_requests)::bigint AS fanout_requests,
       array_agg(DISTINCT u.backend ORDER BY u.backend) AS backends
FROM usage_ledger AS u
JOIN api_keys AS k ON k.id = u.api_key_id
WHERE u.hour_start > now() - make_interval(secs => $1::float8) - interval '1 hour'
  AND ($2::uuid IS NULL OR u.api_key_id = $2)
  AND ($3::text IS NULL OR k.name = $3)
  AND ($4::text IS NULL OR u.model = $4)
GROUP BY u.api_key_id, k.name, u.model
ORDER BY sum(u.prompt_tokens) - sum(u.cached_tokens) DESC, sum(u.requests) DESC,
         u.api_key_id, u.model;

-- Backup and restore (store/backup.py): keys, the backend registry and the usage ledger.
-- Bindings are soft state: not backed up; a restore empties them and makes every node reload.

-- name: backup_columns
SELECT column_name FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = $1 AND is_generated = 'NEVER'
ORDER BY ordinal_position;

-- The restore's first step, in its transaction: soft state and the ledger emptied (TRUNCATE:
-- no per-row trigger), then keys and registry deleted row by row so that every node hears
-- of each removed key and of the registry change (their triggers notify).
-- name: restore_truncate
TRUNCATE api_key_model_affinity, affinity_binding_deletions, usage_ledger, usage_ledger_writers;

-- name: restore_delete_keys
DELETE FROM api_keys;

-- name: restore_delete_registry
DELETE FROM affinity_backends;

-- Every node's watermark is below the next version: the deletion log "no longer reaches
-- back" for any of them, so their catch-up reloads in full. The doorbell wakes them now.
-- name: restore_horizon
WITH v AS (SELECT nextval('affinity_binding_version_seq') AS version)
UPDATE affinity_binding_deletions_horizon SET version = v.version FROM v
RETURNING affinity_binding_deletions_horizon.version;

-- name: restore_doorbell
SELECT pg_notify('affinity_changes', json_build_object(
    'op', 'delete', 'api_key_id', '00000000-0000-0000-0000-000000000000',
    'model', 'restore', 'provider_url', 'restore', 'version', $1::bigint,
    'ttl', 0, 'sent_at', extract(epoch FROM clock_timestamp())
)::text);
-- name: key_limits_all
-- Every active key's limit rows (the nodes' snapshot; few rows: only limited keys have any).
SELECT l.api_key_id, l.model, l.rpm, l.tpm, l.max_concurrent, l.priority
FROM api_key_limits AS l
JOIN api_keys AS k ON k.id = l.api_key_id
WHERE k.revoked_at IS NULL;

-- name: key_limits_of
-- The limit rows of the keys named by notifications (a revoked key has none that count).
SELECT l.api_key_id, l.model, l.rpm, l.tpm, l.max_concurrent, l.priority
FROM api_key_limits AS l
JOIN api_keys AS k ON k.id = l.api_key_id
WHERE l.api_key_id = ANY($1::uuid[]) AND k.revoked_at IS NULL;

-- name: key_limits_get
SELECT rpm, tpm, max_concurrent, priority FROM api_key_limits
WHERE api_key_id = $1 AND model = $2
FOR UPDATE;

-- name: key_limits_put
INSERT INTO api_key_limits AS l (api_key_id, model, rpm, tpm, max_concurrent, priority)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (api_key_id, model) DO UPDATE
SET rpm = excluded.rpm, tpm = excluded.tpm, max_concurrent = excluded.max_concurrent,
    priority = excluded.priority, updated_at = now();

-- name: key_limits_clear
DELETE FROM api_key_limits WHERE api_key_id = $1 AND model = $2;

-- name: key_limits_list
SELECT api_key_id, model, rpm, tpm, max_concurrent, priority FROM api_key_limits
ORDER BY api_key_id, model;

-- name: limit_exchange
-- One statement a second per node: upsert this node's demand for its active scopes (and its
-- heartbeat, the nil key), then read the other nodes' fresh rows for the same scopes. The
-- CTE's writes are not visible to the SELECT (one snapshot): the node knows its own figures.
WITH mine AS (
    INSERT INTO affinity_limit_demand AS d (api_key_id, model, node_id, requests, tokens)
    SELECT u.k, u.m, $1, u.r, u.t
    FROM unnest($2::uuid[], $3::text[], $4::float8[], $5::float8[]) AS u (k, m, r, t)
    ON CONFLICT (api_key_id, model, node_id) DO UPDATE
    SET requests = excluded.requests, tokens = excluded.tokens, updated_at = now()
)
SELECT d.api_key_id, d.model, d.node_id, d.requests, d.tokens
FROM affinity_limit_demand AS d
JOIN unnest($2::uuid[], $3::text[]) AS u (k, m) ON d.api_key_id = u.k AND d.model = u.m
WHERE d.node_id <> $1 AND d.updated_at > now() - make_interval(secs => $6::float8);

-- name: limit_demand_expire
-- Rows of nodes gone (or scopes gone quiet) for a minute; any node may run it.
DELETE FROM affinity_limit_demand WHERE updated_at < now() - interval '60 seconds';

-- name: limit_demand_leave
-- A stopping node's rows go with it, so the others' shares grow at once.
DELETE FROM affinity_limit_demand WHERE node_id = $1;

-- name: fair_exchange
-- The fair queue's exchange (routing/fairq.py), once a second per node while fairness is on:
-- upsert this node's rows (a tenant's recent service on scope $7; the node's demand per model
-- on key $8), read every other node's fresh rows of both kinds. Same table and expiry as the
-- limits exchange.
WITH mine AS (
    INSERT INTO affinity_limit_demand AS d (api_key_id, model, node_id, requests, tokens)
    SELECT u.k, u.m, $1, u.r, u.t
    FROM unnest($2::uuid[], $3::text[], $4::float8[], $5::float8[]) AS u (k, m, r, t)
    ON CONFLICT (api_key_id, model, node_id) DO UPDATE
    SET requests = excluded.requests, tokens = excluded.tokens, updated_at = now()
)
SELECT d.api_key_id, d.model, d.node_id, d.requests, d.tokens
FROM affinity_limit_demand AS d
WHERE d.node_id <> $1 AND d.updated_at > now() - make_interval(secs => $6::float8)
  AND (d.model = $7 OR d.api_key_id = $8);
