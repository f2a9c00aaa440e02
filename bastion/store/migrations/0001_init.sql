-- Bastion schema, version 1.
--
-- Portable between SQLite and PostgreSQL, so one migration history serves both:
--   * ids are TEXT made in Python ("acct_…", "key_…", "cred_…"), never SERIAL/AUTOINCREMENT;
--   * money is BIGINT nano-dollars (1e-9 USD) and timestamps are BIGINT microseconds
--     since the epoch, so no DECIMAL/TIMESTAMP semantics differ between engines;
--   * booleans are SMALLINT 0/1 with a CHECK: both engines accept integer parameters
--     for them, where a PostgreSQL BOOLEAN would refuse 0/1 from a driver.
-- Statements are separated by a ";" at the end of a line (see bastion/store/migrate.py).

CREATE TABLE accounts (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    balance     BIGINT  NOT NULL DEFAULT 0,   -- Σ credits.amount − Σ ledger.cost
    spent       BIGINT  NOT NULL DEFAULT 0,   -- Σ ledger.cost
    created_at  BIGINT  NOT NULL
);

-- Every grant and take-back, so a balance can always be audited.
CREATE TABLE credits (
    id          TEXT    PRIMARY KEY,
    account_id  TEXT    NOT NULL REFERENCES accounts(id),
    amount      BIGINT  NOT NULL,
    created_at  BIGINT  NOT NULL
);

CREATE INDEX credits_account ON credits (account_id);

CREATE TABLE api_keys (
    id          TEXT    PRIMARY KEY,
    account_id  TEXT    NOT NULL REFERENCES accounts(id),
    name        TEXT    NOT NULL DEFAULT '',
    prefix      TEXT    NOT NULL,
    key_hash    TEXT    NOT NULL UNIQUE,      -- hex SHA-256 of the whole key
    rpm         BIGINT  NULL,                 -- NULL: config default; 0: unlimited
    tpm         BIGINT  NULL,
    revoked     SMALLINT NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
    created_at  BIGINT  NOT NULL,
    revoked_at  BIGINT  NULL
);

CREATE INDEX api_keys_account ON api_keys (account_id);

-- One row per request that reached an upstream, keyed by its x-request-id.
CREATE TABLE ledger (
    request_id    TEXT    PRIMARY KEY,
    account_id    TEXT    NOT NULL REFERENCES accounts(id),
    key_id        TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    endpoint      TEXT    NOT NULL,
    input_tokens  BIGINT  NOT NULL,
    output_tokens BIGINT  NOT NULL,
    cost          BIGINT  NOT NULL,
    estimated     SMALLINT NOT NULL DEFAULT 0 CHECK (estimated IN (0, 1)),
    status        TEXT    NOT NULL,
    created_at    BIGINT  NOT NULL
);

CREATE INDEX ledger_account_time ON ledger (account_id, created_at);

CREATE INDEX ledger_time ON ledger (created_at);

-- What each running gateway holds for requests in flight; rows older than a few
-- seconds belong to a gateway that stopped and are ignored.
CREATE TABLE reservations (
    gateway_id  TEXT    NOT NULL,
    account_id  TEXT    NOT NULL,
    amount      BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (gateway_id, account_id)
);

CREATE INDEX reservations_account ON reservations (account_id);
