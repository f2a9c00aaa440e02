-- Gateways refresh keys incrementally: every change to a key stamps updated_at, and
-- a gateway reads only the keys changed since its last look (revoked ones included,
-- so it can drop them), instead of every key every second.

ALTER TABLE api_keys ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;

UPDATE api_keys SET updated_at = COALESCE(revoked_at, created_at);

CREATE INDEX api_keys_updated ON api_keys (updated_at);
