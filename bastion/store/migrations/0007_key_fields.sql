-- Per-key controls an operator sets on a key: a spend limit per period, an expiry
-- time and a model allow-list. NULL means "none" for each, so every existing key keeps
-- working unchanged. Changing them stamps updated_at (0003), so gateways pick it up.
--   spend_limit  nano-dollars the key may spend per period; NULL: no limit
--   limit_reset  the period: 'never' | 'daily' | 'weekly' | 'monthly' (00:00 UTC, weeks on Monday)
--   expires_at   µs since the epoch; the key is refused from then on; NULL: never
--   models       a JSON array of client-facing model ids the key may use; NULL: all

ALTER TABLE api_keys ADD COLUMN spend_limit BIGINT NULL;

ALTER TABLE api_keys ADD COLUMN limit_reset TEXT NOT NULL DEFAULT 'never';

ALTER TABLE api_keys ADD COLUMN expires_at BIGINT NULL;

ALTER TABLE api_keys ADD COLUMN models TEXT NULL;

-- A key's spend in its current period is Σ ledger.cost of its rows since the period
-- started: this index keeps that a range scan however large the ledger grows.
CREATE INDEX ledger_key_time ON ledger (key_id, created_at);
