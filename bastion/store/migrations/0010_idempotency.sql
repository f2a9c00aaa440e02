-- Idempotency keys of top-ups: `POST /admin/v1/accounts/{name}/credit` with an
-- `Idempotency-Key` header, `bastion accounts credit NAME USD --idempotency-key K`.
--
-- A top-up under a key inserts its row first, in the transaction that makes the credit:
-- the primary key decides a race (a second replica sending the same key waits for the
-- first to commit, then finds its row and answers with it), and a top-up that is
-- refused rolls its row back with it, so only top-ups that were applied are remembered.
--   idempotency_key  the client's key (1-255 printable characters)
--   request          what was asked, canonical JSON {"account", "amount"}: the same key
--                    with another request is refused (409), never applied
--   response         the account as the first answer gave it (JSON): every replay gives it
--   created_at       µs; a key is kept 7 days, then deleted by the next keyed top-up

CREATE TABLE idempotency_keys (
    idempotency_key  TEXT    PRIMARY KEY,
    request          TEXT    NOT NULL,
    response         TEXT    NOT NULL,
    created_at       BIGINT  NOT NULL
);

CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
