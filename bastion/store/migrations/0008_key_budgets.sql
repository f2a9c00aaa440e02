-- Key spend limits, enforced like credit (see 0002_leases.sql).
--
-- A key with a spend limit (0007) may spend at most that much per period. Its budget
-- for one period is a row here: what the key spent in it. Gateways admit a key's
-- requests only against budget they have leased: a grant locks the budget row and
-- never lets the live gateways' leases add up to more than limit − spent, so replicas
-- admit locally and together never pass the limit. A ledger write adds each row's
-- cost to the budget of the period its request was ADMITTED in (ledger.key_period),
-- and lowers the writing gateway's key lease by the part that lease backed.
--
--   spent       Σ cost counted in the period: ``seeded`` + the costs of the ledger rows
--               whose key_period is this period (the audit checks exactly that)
--   seeded      what the ledger showed the key spent in the period when its budget was
--               opened (spend from before the key had a limit); 0 for a key limited
--               throughout
--   over_limit  the part of ``spent`` that went past the limit: costs no lease backed
--               (settled by a gateway cut off from the store) that the room left
--               could not cover. Recorded, never hidden; the audit reports it

CREATE TABLE key_budgets (
    key_id        TEXT    NOT NULL REFERENCES api_keys(id),
    period_start  BIGINT  NOT NULL,
    spent         BIGINT  NOT NULL,
    seeded        BIGINT  NOT NULL,
    over_limit    BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period_start)
);

-- A gateway's lease on a key's budget for one period. The gateway's row going away
-- (a clean shutdown, or reaped for silence) takes its key leases with it.
CREATE TABLE key_leases (
    gateway_id    TEXT    NOT NULL REFERENCES gateways(id) ON DELETE CASCADE,
    key_id        TEXT    NOT NULL,
    period_start  BIGINT  NOT NULL,
    amount        BIGINT  NOT NULL,
    PRIMARY KEY (gateway_id, key_id, period_start)
);

CREATE INDEX key_leases_budget ON key_leases (key_id, period_start);

-- µs: start of the key's spend-limit period the row's request was admitted in, and so
-- counted against; NULL when the key had no spend limit at admission.
ALTER TABLE ledger ADD COLUMN key_period BIGINT NULL;
