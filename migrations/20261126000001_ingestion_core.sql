-- Exactly-once ingestion core.
--
-- The invariant: a batch's effects (rows below) and the advance of consumer_offsets.next_offset
-- for every partition it read are written in ONE transaction. consumer_offsets is the source of
-- truth for where each partition resumes; Kafka's committed offsets are only a progress mirror.

-- Where each (group, topic, partition) resumes. Updated only by compare-and-set against the
-- offset the batch started from, so a consumer that lost the partition cannot commit.
CREATE TABLE consumer_offsets (
    consumer_group     text        NOT NULL,
    topic              text        NOT NULL,
    partition          integer     NOT NULL CHECK (partition >= 0),
    -- Offset of the next record to read: last applied offset + 1.
    next_offset        bigint      NOT NULL CHECK (next_offset >= 0),
    -- Records applied through this row (including dead-lettered ones). With contiguous
    -- offsets starting at 0 it equals next_offset; a replayed range would make it larger,
    -- which is how the crash tests prove no offset was applied twice.
    records_applied    bigint      NOT NULL DEFAULT 0,
    batches_committed  bigint      NOT NULL DEFAULT 0,
    -- Broker timestamp of the last applied record: the basis of lag-in-seconds.
    last_record_time   timestamptz,
    -- Which instance committed last (host/pid), for incident forensics.
    last_committed_by  text,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- One row per payment event, keyed by its id: re-delivery inserts nothing (ON CONFLICT DO
-- NOTHING), so no later status can be overwritten by an old copy.
CREATE TABLE payment_events (
    event_id          text          PRIMARY KEY,
    payment_reference text          NOT NULL,
    merchant_id       text          NOT NULL,
    kind              text          NOT NULL CHECK (kind IN ('CAPTURE', 'REFUND', 'CHARGEBACK')),
    amount            numeric(20,4) NOT NULL CHECK (amount > 0),
    currency          char(3)       NOT NULL,
    event_time        timestamptz   NOT NULL,
    psp_reference     text,
    -- Provenance: where in the log the row came from (audits, replay comparisons).
    source_topic      text          NOT NULL,
    source_partition  integer       NOT NULL,
    source_offset     bigint        NOT NULL,
    ingested_at       timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX payment_events_reference_idx ON payment_events (payment_reference);

CREATE TABLE settlement_lines (
    line_id           text          PRIMARY KEY,
    batch_id          text          NOT NULL,
    payment_reference text          NOT NULL,
    merchant_id       text          NOT NULL,
    gross             numeric(20,4) NOT NULL,
    fee               numeric(20,4) NOT NULL,
    net               numeric(20,4) NOT NULL CHECK (net = gross - fee),
    currency          char(3)       NOT NULL,
    settlement_date   date          NOT NULL,
    event_time        timestamptz   NOT NULL,
    source_topic      text          NOT NULL,
    source_partition  integer       NOT NULL,
    source_offset     bigint        NOT NULL,
    ingested_at       timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX settlement_lines_reference_idx ON settlement_lines (payment_reference);

-- Running totals, incremented only from rows actually inserted in the same transaction
-- (aggregates are not idempotent by themselves). Must always equal the totals recomputed
-- from payment_events / settlement_lines; tests check exactly that.
CREATE TABLE merchant_payment_totals (
    merchant_id  text          NOT NULL,
    currency     char(3)       NOT NULL,
    kind         text          NOT NULL,
    event_count  bigint        NOT NULL,
    amount_sum   numeric(24,4) NOT NULL,
    PRIMARY KEY (merchant_id, currency, kind)
);

CREATE TABLE merchant_settlement_totals (
    merchant_id  text          NOT NULL,
    currency     char(3)       NOT NULL,
    line_count   bigint        NOT NULL,
    gross_sum    numeric(24,4) NOT NULL,
    fee_sum      numeric(24,4) NOT NULL,
    net_sum      numeric(24,4) NOT NULL,
    PRIMARY KEY (merchant_id, currency)
);

-- Records that can never succeed, kept whole (key + payload bytes) with the reason, written
-- in the same transaction that advances past them. Transient failures never land here.
CREATE TABLE dead_letters (
    id               bigserial   PRIMARY KEY,
    topic            text        NOT NULL,
    partition        integer     NOT NULL,
    "offset"         bigint      NOT NULL,
    key              bytea,
    payload          bytea,
    error_kind       text        NOT NULL,
    error_message    text        NOT NULL,
    broker_timestamp timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Set by `payrecon dead-letters replay` once the record was re-driven successfully.
    replayed_at      timestamptz,
    replay_attempts  integer     NOT NULL DEFAULT 0,
    last_replay_error text,
    CONSTRAINT dead_letters_position_key UNIQUE (topic, partition, "offset")
);
CREATE INDEX dead_letters_open_idx ON dead_letters (created_at) WHERE replayed_at IS NULL;
