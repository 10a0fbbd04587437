#!/bin/sh
# Runs once, when the compose Postgres initialises its volume (/docker-entrypoint-initdb.d):
# the read-only role of Grafana's "Affinity ledger" datasource. `affinity-node migrate` then
# grants it the ledger (db/migrations/0004). For a volume initialised before this script
# existed, run deploy/postgres/roles.sql instead (it also grants), then set the password.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="${AFFINITY_READER_PASSWORD:?}" \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE affinity_reader LOGIN PASSWORD :'pw';
ALTER ROLE affinity_reader SET default_transaction_read_only = on;
ALTER ROLE affinity_reader SET statement_timeout = '10s';
ALTER ROLE affinity_reader SET idle_in_transaction_session_timeout = '30s';
SQL
