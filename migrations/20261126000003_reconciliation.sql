-- Reconciliation of payments against settlements. Everything here is written by the same
-- per-batch transaction that advances consumer_offsets, so it inherits exactly-once.

-- Highest event time (the records' own time, not the broker's) applied per partition. The
-- group's event-time watermark is min(max_event_time) over its partitions minus the configured
-- allowed lateness; deadlines are judged against it, never against the wall clock.
ALTER TABLE consumer_offsets ADD COLUMN max_event_time timestamptz;

-- The current verdict on each payment reference.
CREATE TABLE reconciliation_items (
    payment_reference  text          PRIMARY KEY,
    merchant_id        text          NOT NULL,
    -- The bucket of merchant_daily_totals the item counts in: the UTC date of its earliest
    -- payment event (of its earliest settlement line when it has no payment event), and the
    -- merchant's settlement currency (the event's currency while the merchant is unknown).
    business_date      date          NOT NULL,
    currency           char(3)       NOT NULL,
    status             text          NOT NULL CHECK (status IN ('MATCHED', 'EXPECTED',
                           'AMOUNT_MISMATCH', 'FEE_MISMATCH', 'CURRENCY_MISMATCH',
                           'MISSING_SETTLEMENT', 'UNEXPECTED_SETTLEMENT', 'OVER_SETTLED',
                           'MISSING_REFERENCE')),
    -- What the payment events call for, in settlement currency (NULL: reference data missing).
    expected_gross     numeric(20,4),
    expected_fee       numeric(20,4),
    expected_net       numeric(20,4),
    -- The sums of the settlement lines (NULL: no lines, or lines in mixed currencies).
    settled_currency   char(3),
    settled_gross      numeric(20,4),
    settled_fee        numeric(20,4),
    settled_net        numeric(20,4),
    payment_events     integer       NOT NULL,
    settlement_lines   integer       NOT NULL,
    -- For EXPECTED: the event time after which the item is due and is evaluated again.
    deadline           timestamptz,
    reason             text          NOT NULL,
    -- The watermark of the evaluation that set the current status.
    watermark          timestamptz   NOT NULL,
    evaluations        bigint        NOT NULL DEFAULT 1,
    created_at         timestamptz   NOT NULL DEFAULT now(),
    updated_at         timestamptz   NOT NULL DEFAULT now()
);
-- The per-batch sweep of items whose deadline the watermark passed.
CREATE INDEX reconciliation_items_due_idx ON reconciliation_items (deadline)
    WHERE status = 'EXPECTED';
-- Re-evaluation after reference data arrives.
CREATE INDEX reconciliation_items_missing_reference_idx ON reconciliation_items (merchant_id)
    WHERE status = 'MISSING_REFERENCE';
-- Open exceptions per merchant and day (report, views).
CREATE INDEX reconciliation_items_exceptions_idx
    ON reconciliation_items (merchant_id, business_date)
    WHERE status NOT IN ('MATCHED', 'EXPECTED');

-- Every status change of an item: from, to, why (the records whose arrival caused it, or the
-- deadline the watermark passed, or the reference data that arrived), and who evaluated it.
CREATE TABLE reconciliation_history (
    id                 bigserial     PRIMARY KEY,
    payment_reference  text          NOT NULL,
    from_status        text,
    to_status          text          NOT NULL,
    cause              text          NOT NULL CHECK (cause IN ('RECORDS', 'DEADLINE',
                           'REFERENCE_DATA')),
    -- Ids of the payment events / settlement lines inserted by the batch that caused it
    -- (empty for DEADLINE and REFERENCE_DATA).
    caused_by          text[]        NOT NULL,
    watermark          timestamptz   NOT NULL,
    reason             text          NOT NULL,
    consumer_group     text          NOT NULL,
    evaluated_by       text          NOT NULL,
    recorded_at        timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX reconciliation_history_reference_idx
    ON reconciliation_history (payment_reference, id);

-- Per merchant, day and currency, maintained incrementally in the batch transaction; must
-- equal merchant_daily_totals_recomputed (below) at any time.
--   captured/refunded/charged_back: payment events by the UTC date of event_time, in the
--     event's currency;
--   settled_*: settlement lines by settlement_date, in the line's currency;
--   matched/expected/exception counts: reconciliation_items by their bucket.
CREATE TABLE merchant_daily_totals (
    merchant_id         text          NOT NULL,
    business_date       date          NOT NULL,
    currency            char(3)       NOT NULL,
    captured_count      bigint        NOT NULL DEFAULT 0,
    captured            numeric(24,4) NOT NULL DEFAULT 0,
    refunded_count      bigint        NOT NULL DEFAULT 0,
    refunded            numeric(24,4) NOT NULL DEFAULT 0,
    charged_back_count  bigint        NOT NULL DEFAULT 0,
    charged_back        numeric(24,4) NOT NULL DEFAULT 0,
    settled_count       bigint        NOT NULL DEFAULT 0,
    settled_gross       numeric(24,4) NOT NULL DEFAULT 0,
    settled_fees        numeric(24,4) NOT NULL DEFAULT 0,
    settled_net         numeric(24,4) NOT NULL DEFAULT 0,
    matched_count       bigint        NOT NULL DEFAULT 0,
    expected_count      bigint        NOT NULL DEFAULT 0,
    exception_count     bigint        NOT NULL DEFAULT 0,
    PRIMARY KEY (merchant_id, business_date, currency)
);

-- The same numbers recomputed from the stored rows: the proof that the incremental totals
-- are exact (tests and `payrecon report --verify` compare the two).
CREATE VIEW merchant_daily_totals_recomputed AS
WITH payments AS (
    SELECT merchant_id, (event_time AT TIME ZONE 'UTC')::date AS business_date, currency,
           count(*) FILTER (WHERE kind = 'CAPTURE') AS captured_count,
           coalesce(sum(amount) FILTER (WHERE kind = 'CAPTURE'), 0) AS captured,
           count(*) FILTER (WHERE kind = 'REFUND') AS refunded_count,
           coalesce(sum(amount) FILTER (WHERE kind = 'REFUND'), 0) AS refunded,
           count(*) FILTER (WHERE kind = 'CHARGEBACK') AS charged_back_count,
           coalesce(sum(amount) FILTER (WHERE kind = 'CHARGEBACK'), 0) AS charged_back
      FROM payment_events GROUP BY 1, 2, 3
), settled AS (
    SELECT merchant_id, settlement_date AS business_date, currency,
           count(*) AS settled_count, sum(gross) AS settled_gross, sum(fee) AS settled_fees,
           sum(net) AS settled_net
      FROM settlement_lines GROUP BY 1, 2, 3
), items AS (
    SELECT merchant_id, business_date, currency,
           count(*) FILTER (WHERE status = 'MATCHED') AS matched_count,
           count(*) FILTER (WHERE status = 'EXPECTED') AS expected_count,
           count(*) FILTER (WHERE status NOT IN ('MATCHED', 'EXPECTED')) AS exception_count
      FROM reconciliation_items GROUP BY 1, 2, 3
)
SELECT merchant_id, business_date, currency,
       coalesce(p.captured_count, 0) AS captured_count, coalesce(p.captured, 0) AS captured,
       coalesce(p.refunded_count, 0) AS refunded_count, coalesce(p.refunded, 0) AS refunded,
       coalesce(p.charged_back_count, 0) AS charged_back_count,
       coalesce(p.charged_back, 0) AS charged_back,
       coalesce(s.settled_count, 0) AS settled_count,
       coalesce(s.settled_gross, 0) AS settled_gross,
       coalesce(s.settled_fees, 0) AS settled_fees, coalesce(s.settled_net, 0) AS settled_net,
       coalesce(i.matched_count, 0) AS matched_count,
       coalesce(i.expected_count, 0) AS expected_count,
       coalesce(i.exception_count, 0) AS exception_count
  FROM payments p
  FULL JOIN settled s USING (merchant_id, business_date, currency)
  FULL JOIN items i USING (merchant_id, business_date, currency);

-- Status changes into or out of an exception status, to be published to the exceptions topic
-- by the relay. Written in the batch transaction; published_at is set by the relay after the
-- broker acknowledged the message (see src/outbox for why that gives no gap and no duplicate).
CREATE TABLE exceptions_outbox (
    seq                bigserial     PRIMARY KEY,
    history_id         bigint        NOT NULL REFERENCES reconciliation_history (id),
    payment_reference  text          NOT NULL,
    merchant_id        text          NOT NULL,
    from_status        text,
    to_status          text          NOT NULL,
    -- true: the item became an exception; false: an exception was resolved.
    opened             boolean       NOT NULL,
    currency           char(3)       NOT NULL,
    expected_gross     numeric(20,4),
    settled_gross      numeric(20,4),
    reason             text          NOT NULL,
    watermark          timestamptz   NOT NULL,
    created_at         timestamptz   NOT NULL DEFAULT now(),
    published_at       timestamptz
);
CREATE INDEX exceptions_outbox_pending_idx ON exceptions_outbox (seq) WHERE published_at IS NULL;
