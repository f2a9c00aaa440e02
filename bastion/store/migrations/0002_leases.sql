-- Credit leases replace reservation snapshots (scale-out).
--
-- A gateway may only admit requests against credit it has leased: the sum of the
-- live gateways' leases never exceeds an account's balance, so any number of
-- replicas can admit locally without overspending. A ledger write lowers the
-- balance and the writing gateway's lease by the same cost. Gateways heartbeat;
-- the leases of one not seen for a while (it crashed) are reclaimed.

DROP TABLE reservations;

CREATE TABLE gateways (
    id       TEXT    PRIMARY KEY,
    seen_at  BIGINT  NOT NULL
);

CREATE TABLE leases (
    gateway_id  TEXT    NOT NULL,
    account_id  TEXT    NOT NULL REFERENCES accounts(id),
    amount      BIGINT  NOT NULL,
    PRIMARY KEY (gateway_id, account_id)
);

CREATE INDEX leases_account ON leases (account_id);
