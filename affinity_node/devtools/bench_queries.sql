-- Statements of the benchmarks (affinity_node/devtools), never run by the node: bulk
-- rows through the real triggers, moves and deletes at a point of the key space, sizes,
-- and the notification queue. Same format as store/queries.sql (`-- name:` headers).

-- name: bench_keys
INSERT INTO api_keys (id, name, key_hash)
SELECT id, $2 || '-' || n, sha256(id::text::bytea)
FROM (SELECT gen_random_uuid() AS id, n FROM generate_series(1, $1) AS n) AS k
RETURNING id;

-- name: bench_triggers_off
-- In the bulk insert's transaction, superuser only: a million rows without a million
-- notifications (versions are still taken from the sequence by the statement below).
SET LOCAL session_replication_role = replica;

-- name: bench_bindings
INSERT INTO api_key_model_affinity (api_key_id, model, provider_url, version, expires_at)
SELECT k, m, ($3::text[])[1 + abs(hashtext(k::text || m)) % cardinality($3::text[])],
       nextval('affinity_binding_version_seq'), now() + make_interval(secs => $4::float8)
FROM unnest($1::uuid[]) AS k CROSS JOIN unnest($2::text[]) AS m;

-- name: bench_settle
-- After the bulk insert, so what follows measures a steady table: statistics and the
-- visibility map now (no autovacuum midway), the bulk's WAL flushed (no checkpoint midway).
VACUUM ANALYZE api_key_model_affinity;

-- name: bench_checkpoint
CHECKPOINT;

-- name: bench_sizes
SELECT relname, pg_relation_size(oid) FROM pg_class
WHERE relname IN ('api_key_model_affinity', 'api_key_model_affinity_pkey',
                  'api_key_model_affinity_expires_at_idx', 'api_key_model_affinity_version_idx');

-- name: bench_move
-- $2 bindings from a random point of the key space move to another backend (real triggers).
UPDATE api_key_model_affinity AS a SET provider_url = $3
FROM (SELECT api_key_id, model FROM api_key_model_affinity
      WHERE api_key_id > $1 ORDER BY api_key_id, model LIMIT $2) AS s
WHERE a.api_key_id = s.api_key_id AND a.model = s.model AND a.provider_url <> $3;

-- name: bench_delete
DELETE FROM api_key_model_affinity AS a
USING (SELECT api_key_id, model FROM api_key_model_affinity
       WHERE api_key_id > $1 ORDER BY api_key_id, model LIMIT $2) AS s
WHERE a.api_key_id = s.api_key_id AND a.model = s.model;

-- name: bench_expire
UPDATE api_key_model_affinity AS a SET expires_at = now() - interval '1 second'
FROM (SELECT api_key_id, model FROM api_key_model_affinity
      WHERE api_key_id > $1 ORDER BY api_key_id, model LIMIT $2) AS s
WHERE a.api_key_id = s.api_key_id AND a.model = s.model;

-- name: bench_terminate
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1;

-- name: bench_queue_usage
SELECT pg_notification_queue_usage();

-- name: bench_keys_settle
VACUUM ANALYZE api_keys;

-- name: bench_keys_size
-- The api_keys table with its indexes (primary key, key_hash unique).
SELECT pg_total_relation_size('api_keys');

-- name: bench_keys_last
-- The greatest key id: its secret (the id as text, see bench_keys) is in the last page.
SELECT id FROM api_keys ORDER BY id DESC LIMIT 1;
