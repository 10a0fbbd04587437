-- Priority classes for fair queueing (issue 25, item 2): a key's class, on its every-model row
-- (model ''); NULL: class 0. While every backend of a model is saturated, a node's queue
-- releases a higher class first. A change rings api_key_changes like any limit change
-- (api_key_limits_notify_v1), so every node re-reads the key's rows.
ALTER TABLE api_key_limits
    ADD COLUMN priority smallint CHECK (priority BETWEEN 0 AND 9);
