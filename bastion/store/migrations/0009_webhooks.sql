-- Webhooks: a balance alert per account, and an outbox of events to deliver.
--
-- accounts.alert_below (nano-dollars; NULL: no alert): an `account.balance_low` event
-- is recorded each time the balance falls from >= it to below it.
--
-- webhook_outbox: every event is inserted in the same transaction as the change that
-- causes it (a ledger write, a take-back), so none is lost and none invented; gateways
-- with `[webhooks] url` set deliver it until the receiver answers 2xx.
--   id            evt_…: the receiver's idempotency key, the same on every attempt
--   body          the JSON POSTed, exactly as sent every time
--   next_at       µs: not before then (0: at once). A claim moves it to the claim
--                 deadline, a failed attempt to the next retry
--   claimed_by    the sender that last claimed it (NULL when not claimed)
--   attempts      deliveries tried so far
--   delivered_at  µs: the receiver answered 2xx; given_up_at: too old, not delivered
-- Delivered and given-up rows are deleted after 7 days.

ALTER TABLE accounts ADD COLUMN alert_below BIGINT NULL;

CREATE TABLE webhook_outbox (
    id            TEXT     PRIMARY KEY,
    type          TEXT     NOT NULL,
    body          TEXT     NOT NULL,
    created_at    BIGINT   NOT NULL,
    next_at       BIGINT   NOT NULL DEFAULT 0,
    claimed_by    TEXT     NULL,
    attempts      INTEGER  NOT NULL DEFAULT 0,
    delivered_at  BIGINT   NULL,
    given_up_at   BIGINT   NULL,
    last_error    TEXT     NULL
);

-- What the senders poll: events still to deliver, by when they are due.
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_at)
    WHERE delivered_at IS NULL AND given_up_at IS NULL;
