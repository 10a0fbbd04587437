-- Binding sets (load-aware fan-out): a hot pair may be served by more than one backend.
-- provider_url stays the set's first member; the others, oldest first, are in fanout_urls.
-- Growing or shrinking a set is a routing change: it takes a new version and notifies, like a
-- move. Sizes are bounded so that a notification payload stays far below 8000 bytes.

ALTER TABLE api_key_model_affinity
    ADD COLUMN fanout_urls text[] NOT NULL DEFAULT '{}'
    CONSTRAINT api_key_model_affinity_fanout_bounded CHECK (
        cardinality(fanout_urls) <= 15
        AND octet_length(array_to_string(fanout_urls, ' ')) <= 3000
        AND array_position(fanout_urls, NULL) IS NULL
    );

CREATE FUNCTION affinity_binding_version_v2() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.provider_url IS DISTINCT FROM OLD.provider_url
       OR NEW.fanout_urls IS DISTINCT FROM OLD.fanout_urls
       OR NEW.api_key_id IS DISTINCT FROM OLD.api_key_id OR NEW.model IS DISTINCT FROM OLD.model THEN
        NEW.version := nextval('affinity_binding_version_seq');
    ELSE
        NEW.version := OLD.version;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

DROP TRIGGER affinity_binding_version_v1 ON api_key_model_affinity;
DROP FUNCTION affinity_binding_version_v1();
CREATE TRIGGER affinity_binding_version_v2
    BEFORE INSERT OR UPDATE ON api_key_model_affinity
    FOR EACH ROW EXECUTE FUNCTION affinity_binding_version_v2();

CREATE FUNCTION affinity_binding_notify_v2() RETURNS trigger
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
           AND NEW.fanout_urls IS NOT DISTINCT FROM OLD.fanout_urls
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
        'fanout_urls', r.fanout_urls,
        'version', v,
        'expires_at', r.expires_at,
        'ttl', ttl,
        'sent_at', extract(epoch FROM clock_timestamp())
    )::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER affinity_binding_notify_v1 ON api_key_model_affinity;
DROP FUNCTION affinity_binding_notify_v1();
CREATE TRIGGER affinity_binding_notify_v2
    AFTER INSERT OR UPDATE OR DELETE ON api_key_model_affinity
    FOR EACH ROW EXECUTE FUNCTION affinity_binding_notify_v2();
