-- Requests Bastion refused (401, 402, 403, 429), counted per hour, account, key and
-- code: they write no ledger row, and an operator must still see a customer being
-- refused. Gateways add their counts every few seconds; '' is "no key recognised".

CREATE TABLE refusals (
    hour        BIGINT  NOT NULL,
    account_id  TEXT    NOT NULL,
    key_id      TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    code        TEXT    NOT NULL,
    count       BIGINT  NOT NULL,
    last_at     BIGINT  NOT NULL,
    PRIMARY KEY (hour, account_id, key_id, status, code)
);
