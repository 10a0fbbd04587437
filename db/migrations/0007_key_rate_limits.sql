-- Fleet-wide per-key limits (issue 25): requests and tokens a minute, requests at once. A row
-- with model '' holds the key's limits on every model together; a row naming a model holds
-- that model's own (a request is checked against both). NULL: no such limit.
CREATE TABLE api_key_limits (
    api_key_id      uuid NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    model           text NOT NULL DEFAULT '' CHECK (length(model) <= 256),
    rpm             integer CHECK (rpm BETWEEN 1 AND 100000000),
    tpm             bigint CHECK (tpm BETWEEN 1 AND 100000000000),
    max_concurrent  integer CHECK (max_concurrent BETWEEN 1 AND 1000000),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, model)
);

-- A change is a doorbell on api_key_changes: every node re-reads that key's limit rows. Limits
-- change rarely (an operator's command), so this NOTIFY stays rare.
CREATE FUNCTION api_key_limits_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k uuid;
BEGIN
    IF TG_OP = 'DELETE' THEN
        k := OLD.api_key_id;
    ELSE
        k := NEW.api_key_id;
    END IF;
    PERFORM pg_notify('api_key_changes', json_build_object('op', 'limits', 'id', k)::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_key_limits_notify_v1
    AFTER INSERT OR UPDATE OR DELETE ON api_key_limits
    FOR EACH ROW EXECUTE FUNCTION api_key_limits_notify_v1();

-- Each node's observed demand per limited (key, model) scope, written once a second in one
-- statement for all its active scopes; shares follow from everyone's rows. Soft state: lost
-- on a crash and rebuilt within seconds, so UNLOGGED. api_key_id '00000000-...' with model ''
-- is each node's heartbeat (how many nodes are alive to split a fresh key between).
CREATE UNLOGGED TABLE affinity_limit_demand (
    api_key_id  uuid NOT NULL,
    model       text NOT NULL CHECK (length(model) <= 256),
    node_id     text NOT NULL CHECK (length(node_id) BETWEEN 1 AND 200),
    requests    double precision NOT NULL CHECK (requests >= 0),
    tokens      double precision NOT NULL CHECK (tokens >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, model, node_id)
);

CREATE INDEX affinity_limit_demand_updated_at_idx ON affinity_limit_demand (updated_at);
