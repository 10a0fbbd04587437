-- affinity: no-transaction
-- llama.cpp servers are a backend kind of their own (issue 28): affinity applies to them as
-- to vllm (a prefix cache to reuse), their load is read from llama.cpp's own metric names.
-- The registry's kind CHECKs gain 'llamacpp'. Each ALTER swaps the constraint in one
-- statement (a rerun after a crash finds it done), adding it NOT VALID so only the brief
-- catalog lock is taken; the VALIDATE that follows reads the rows without blocking writes.

ALTER TABLE affinity_backends
    DROP CONSTRAINT IF EXISTS affinity_backends_kind_check,
    DROP CONSTRAINT IF EXISTS affinity_backends_kind,
    ADD CONSTRAINT affinity_backends_kind
        CHECK (kind IN ('vllm', 'llamacpp', 'external')) NOT VALID;

ALTER TABLE affinity_backends VALIDATE CONSTRAINT affinity_backends_kind;

ALTER TABLE affinity_backend_health
    DROP CONSTRAINT IF EXISTS affinity_backend_health_kind_check,
    DROP CONSTRAINT IF EXISTS affinity_backend_health_kind,
    ADD CONSTRAINT affinity_backend_health_kind
        CHECK (kind IN ('vllm', 'llamacpp', 'external')) NOT VALID;

ALTER TABLE affinity_backend_health VALIDATE CONSTRAINT affinity_backend_health_kind;
