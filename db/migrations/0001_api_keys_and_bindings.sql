-- API keys and the (api key, model) -> backend bindings shared by every node.
-- Expiry is always computed by the database clock (now()), never by a node's clock.

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    key_hash    bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- One global sequence: a binding's version grows even across delete and re-create, so a node
-- can tell an old notification (or an old fill) from a new one for the same pair.
CREATE SEQUENCE affinity_binding_version_seq;

CREATE TABLE api_key_model_affinity (
    api_key_id    uuid NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    -- Bounded so that a notification payload always stays far below the 8000-byte limit.
    model         text NOT NULL CHECK (length(model) BETWEEN 1 AND 256),
    provider_url  text NOT NULL CHECK (length(provider_url) BETWEEN 1 AND 2048),
    version       bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (api_key_id, model)
);

CREATE INDEX api_key_model_affinity_expires_at_idx ON api_key_model_affinity (expires_at);

-- version changes only when routing changes (insert, new provider); a pure TTL extension
-- keeps it, and keeps quiet (see the notify trigger).
CREATE FUNCTION affinity_binding_version_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.provider_url IS DISTINCT FROM OLD.provider_url
       OR NEW.api_key_id IS DISTINCT FROM OLD.api_key_id OR NEW.model IS DISTINCT FROM OLD.model THEN
        NEW.version := nextval('affinity_binding_version_seq');
    ELSE
        NEW.version := OLD.version;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER affinity_binding_version_v1
    BEFORE INSERT OR UPDATE ON api_key_model_affinity
    FOR EACH ROW EXECUTE FUNCTION affinity_binding_version_v1();

-- NOTIFY only when routing changes: every NOTIFY takes a server-wide lock at commit, so TTL
-- refreshes must not wake every node. A delete carries a fresh version so that a late fill
-- of the deleted row cannot resurrect it in a cache. Deleting a row that had already expired
-- (the cleanup job) is silent: every node already treats it as gone.
CREATE FUNCTION affinity_binding_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v bigint;
    ttl double precision;
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF OLD.expires_at <= now() THEN
            RETURN NULL;
        END IF;
        r := OLD;
        v := nextval('affinity_binding_version_seq');
        ttl := 0;
    ELSE
        IF TG_OP = 'UPDATE' AND NEW.provider_url IS NOT DISTINCT FROM OLD.provider_url
           AND NEW.api_key_id IS NOT DISTINCT FROM OLD.api_key_id
           AND NEW.model IS NOT DISTINCT FROM OLD.model THEN
            RETURN NULL;
        END IF;
        r := NEW;
        v := NEW.version;
        ttl := extract(epoch FROM NEW.expires_at - clock_timestamp());
    END IF;
    PERFORM pg_notify('affinity_changes', json_build_object(
        'op', lower(TG_OP),
        'api_key_id', r.api_key_id,
        'model', r.model,
        'provider_url', r.provider_url,
        'version', v,
        'expires_at', r.expires_at,
        'ttl', ttl,
        'sent_at', extract(epoch FROM clock_timestamp())
    )::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER affinity_binding_notify_v1
    AFTER INSERT OR UPDATE OR DELETE ON api_key_model_affinity
    FOR EACH ROW EXECUTE FUNCTION affinity_binding_notify_v1();

-- Revocations and deletions of keys reach every node's key cache at once; a new key clears the
-- nodes' memory of unknown keys, so it works at once too.
CREATE FUNCTION api_key_notify_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('api_key_changes', json_build_object('op', 'create', 'id', NEW.id)::text);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('api_key_changes', json_build_object(
            'op', 'delete', 'id', OLD.id)::text);
    ELSIF NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        PERFORM pg_notify('api_key_changes', json_build_object(
            'op', CASE WHEN NEW.revoked_at IS NULL THEN 'restore' ELSE 'revoke' END,
            'id', NEW.id)::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_key_notify_v1
    AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_key_notify_v1();
