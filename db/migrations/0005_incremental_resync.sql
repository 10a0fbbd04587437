-- Resync that costs what changed (a million live bindings): a node whose listener was away
-- reads the rows changed after its watermark and the deletions logged after it, not the table.
--
-- 1. An index on version: "rows changed after version V" is a range scan.
-- 2. A deletion log, written by the delete trigger for live rows (exactly the deletes that
--    notify; expired rows deleted by the cleanup are silent, every node expires them by its own
--    deadline). The cleanup leader trims it; the horizon says up to which version entries may
--    be gone: a node whose watermark is older reloads in full.
-- 3. Triggers _v3. The version trigger takes the transaction's id before it takes a version,
--    so a transaction holding a version shows in the in-progress list of every later snapshot:
--    the listener's watermark (store/listener.py) counts on it. That also needs the sequence to
--    hand out versions one at a time (CACHE 1, its default).

CREATE INDEX api_key_model_affinity_version_idx ON api_key_model_affinity (version);

CREATE TABLE affinity_binding_deletions (
    version     bigint PRIMARY KEY,
    api_key_id  uuid NOT NULL,
    model       text NOT NULL CHECK (length(model) BETWEEN 1 AND 256),
    deleted_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE affinity_binding_deletions_horizon (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version   bigint NOT NULL
);
INSERT INTO affinity_binding_deletions_horizon (version) VALUES (0);

CREATE FUNCTION affinity_binding_version_v3() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.provider_url IS DISTINCT FROM OLD.provider_url
       OR NEW.fanout_urls IS DISTINCT FROM OLD.fanout_urls
       OR NEW.api_key_id IS DISTINCT FROM OLD.api_key_id OR NEW.model IS DISTINCT FROM OLD.model THEN
        PERFORM pg_current_xact_id();  -- the transaction id first, then the version
        NEW.version := nextval('affinity_binding_version_seq');
    ELSE
        NEW.version := OLD.version;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

DROP TRIGGER affinity_binding_version_v2 ON api_key_model_affinity;
DROP FUNCTION affinity_binding_version_v2();
CREATE TRIGGER affinity_binding_version_v3
    BEFORE INSERT OR UPDATE ON api_key_model_affinity
    FOR EACH ROW EXECUTE FUNCTION affinity_binding_version_v3();

-- As _v2, plus: a live row deleted (or renamed away from its pair, which the product never
-- does) is logged with the delete's version.
CREATE FUNCTION affinity_binding_notify_v3() RETURNS trigger
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
        INSERT INTO affinity_binding_deletions (version, api_key_id, model)
        VALUES (v, OLD.api_key_id, OLD.model);
    ELSE
        IF TG_OP = 'UPDATE' AND NEW.provider_url IS NOT DISTINCT FROM OLD.provider_url
           AND NEW.fanout_urls IS NOT DISTINCT FROM OLD.fanout_urls
           AND NEW.api_key_id IS NOT DISTINCT FROM OLD.api_key_id
           AND NEW.model IS NOT DISTINCT FROM OLD.model THEN
            RETURN NULL;
        END IF;
        IF TG_OP = 'UPDATE' AND (NEW.api_key_id, NEW.model) IS DISTINCT FROM
                                (OLD.api_key_id, OLD.model) THEN
            INSERT INTO affinity_binding_deletions (version, api_key_id, model)
            VALUES (nextval('affinity_binding_version_seq'), OLD.api_key_id, OLD.model);
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
        'fanout_urls', r.fanout_urls,
        'version', v,
        'expires_at', r.expires_at,
        'ttl', ttl,
        'sent_at', extract(epoch FROM clock_timestamp())
    )::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER affinity_binding_notify_v2 ON api_key_model_affinity;
DROP FUNCTION affinity_binding_notify_v2();
CREATE TRIGGER affinity_binding_notify_v3
    AFTER INSERT OR UPDATE OR DELETE ON api_key_model_affinity
    FOR EACH ROW EXECUTE FUNCTION affinity_binding_notify_v3();
