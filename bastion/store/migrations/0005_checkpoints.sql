-- What a crash can lose. A gateway's seat (host:port/worker) lets the process that
-- takes its place find it at once; its streams in flight are checkpointed here (one
-- row each, the tokens streamed so far, refreshed every second), so that a gateway
-- that dies without a clean shutdown is charged from its checkpoints by whichever
-- gateway reclaims its leases, instead of leaving served streams with no ledger row.

ALTER TABLE gateways ADD COLUMN seat TEXT NOT NULL DEFAULT '';

CREATE TABLE inflight (
    request_id          TEXT    PRIMARY KEY,
    gateway_id          TEXT    NOT NULL,
    account_id          TEXT    NOT NULL,
    key_id              TEXT    NOT NULL,
    model               TEXT    NOT NULL,
    endpoint            TEXT    NOT NULL,
    input_tokens        BIGINT  NOT NULL,
    output_tokens       BIGINT  NOT NULL,
    cost                BIGINT  NOT NULL,
    created_at          BIGINT  NOT NULL
);

CREATE INDEX inflight_gateway ON inflight (gateway_id);
