-- Money on every path: cached and reasoning tokens, uncharged money, dead letters.
--
-- A ledger row's cost is always the exact price of its tokens. What the account could
-- not cover (an upstream that reported more than was reserved, or a cost whose lease
-- was reclaimed while its gateway was cut off from the store) is the row's
-- ``uncharged``; only cost - uncharged leaves the balance. So, per account:
--   balance = Σ credits.amount − Σ (ledger.cost − ledger.uncharged)
--   spent   = Σ (ledger.cost − ledger.uncharged)      (what was collected)
--   uncharged = Σ ledger.uncharged                     (served, never collected)

ALTER TABLE ledger ADD COLUMN cached_input_tokens BIGINT NOT NULL DEFAULT 0;

ALTER TABLE ledger ADD COLUMN reasoning_tokens BIGINT NOT NULL DEFAULT 0;

ALTER TABLE ledger ADD COLUMN uncharged BIGINT NOT NULL DEFAULT 0;

ALTER TABLE accounts ADD COLUMN uncharged BIGINT NOT NULL DEFAULT 0;

-- A settled row the store refused (e.g. a value out of range): kept whole, as JSON,
-- so nothing served is lost from sight; `bastion audit` lists them.
CREATE TABLE dead_letters (
    request_id  TEXT    PRIMARY KEY,
    account_id  TEXT    NOT NULL,
    row_json    TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);
