-- The backend registry: backends added at runtime and the admin state of any backend (the
-- ones in the nodes' YAML included). Every node follows it through NOTIFY on
-- affinity_backend_changes and applies a change within a second, without a restart.

CREATE TABLE affinity_backends (
    url             text PRIMARY KEY CHECK (length(url) BETWEEN 1 AND 2048),
    -- false: a row that only holds the admin state of a backend the YAML lists.
    added           boolean NOT NULL,
    kind            text NOT NULL DEFAULT 'vllm' CHECK (kind IN ('vllm', 'external')),
    models          text[] NOT NULL DEFAULT '{}' CHECK (
        cardinality(models) <= 64
        AND octet_length(array_to_string(models, ' ')) <= 4000
        AND array_position(models, NULL) IS NULL
    ),
    state           text NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'draining', 'disabled')),
    drain_deadline  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- What each node sees of each backend's health (written on changes and every half minute),
-- so `backends list` can say it without asking every node.
CREATE TABLE affinity_backend_health (
    node_id     text NOT NULL CHECK (length(node_id) BETWEEN 1 AND 256),
    url         text NOT NULL CHECK (length(url) BETWEEN 1 AND 2048),
    healthy     boolean NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('vllm', 'external')),
    models      text[] NOT NULL CHECK (
        cardinality(models) <= 64 AND octet_length(array_to_string(models, ' ')) <= 4000
    ),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (url, node_id)
);

-- One row: when the fleet last moved a binding (drain, rebalance), so pacing holds for the
-- whole fleet however many nodes run the mover.
CREATE TABLE affinity_mover (
    id              boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_move_at    timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO affinity_mover DEFAULT VALUES;

CREATE FUNCTION affinity_backend_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.kind IS NOT DISTINCT FROM OLD.kind
       AND NEW.models IS NOT DISTINCT FROM OLD.models AND NEW.state IS NOT DISTINCT FROM OLD.state
       AND NEW.added IS NOT DISTINCT FROM OLD.added
       AND NEW.drain_deadline IS NOT DISTINCT FROM OLD.drain_deadline THEN
        RETURN NULL;
    END IF;
    -- The payload is only a nudge: nodes re-read the (small) table, whatever it says.
    PERFORM pg_notify('affinity_backend_changes', json_build_object('op', lower(TG_OP))::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER affinity_backend_notify_v1
    AFTER INSERT OR UPDATE OR DELETE ON affinity_backends
    FOR EACH ROW EXECUTE FUNCTION affinity_backend_notify_v1();

CREATE FUNCTION affinity_backend_touch_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER affinity_backend_touch_v1
    BEFORE UPDATE ON affinity_backends
    FOR EACH ROW EXECUTE FUNCTION affinity_backend_touch_v1();
