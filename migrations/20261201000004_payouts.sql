-- The payout leg: settlement batches against the bank statement lines that pay them out
-- (src/reconcile/payout.rs has the rules). Everything here is written by the same per-batch
-- transaction that advances consumer_offsets, as on the other legs.

-- Bank statement lines as consumed from the payouts topic; insert-or-ignore by id.
CREATE TABLE bank_payouts (
    statement_line_id text          PRIMARY KEY,
    account_id        text          NOT NULL,
    value_date        date          NOT NULL,
    -- Signed: a credit is positive, a debit (money taken back) negative.
    amount            numeric(20,4) NOT NULL CHECK (amount <> 0),
    currency          char(3)       NOT NULL,
    -- As on the statement, surrounding spaces trimmed; NULL when the statement names none.
    batch_reference   text,
    description       text          NOT NULL,
    event_time        timestamptz   NOT NULL,
    source_topic      text          NOT NULL,
    source_partition  integer       NOT NULL,
    source_offset     bigint        NOT NULL,
    ingested_at       timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX bank_payouts_batch_idx ON bank_payouts (batch_reference);
CREATE INDEX settlement_lines_batch_idx ON settlement_lines (batch_id);

ALTER TABLE conflicting_duplicates DROP CONSTRAINT conflicting_duplicates_record_type_check;
ALTER TABLE conflicting_duplicates ADD CONSTRAINT conflicting_duplicates_record_type_check
    CHECK (record_type IN ('payment_event', 'settlement_line', 'bank_payout'));

-- The current verdict on each settlement batch's payout (kind BATCH, key = batch_id) and on
-- each statement line that names no batch (kind LINE, key = statement_line_id).
CREATE TABLE payout_items (
    kind              text          NOT NULL CHECK (kind IN ('BATCH', 'LINE')),
    key               text          NOT NULL,
    -- The batch's merchant (least merchant_id of its lines; NULL: no line yet).
    merchant_id       text,
    -- The account paid (least account_id of its payouts; NULL: nothing paid yet).
    account_id        text,
    -- The batch's settlement date, else the first payout's value date.
    business_date     date          NOT NULL,
    -- The batch's currency, else the payouts' (NULL: mixed currencies).
    currency          char(3),
    status            text          NOT NULL CHECK (status IN ('PAYOUT_MATCHED',
                          'PAYOUT_PENDING', 'PAYOUT_MISSING', 'PAYOUT_AMOUNT_MISMATCH',
                          'PAYOUT_CURRENCY_MISMATCH', 'PAYOUT_UNEXPECTED')),
    -- Net total of the batch's lines and the sum of its payouts, each when in one currency.
    expected_net      numeric(24,4),
    paid              numeric(24,4),
    -- paid - expected_net when both are in the same currency (nothing paid counts as 0).
    difference        numeric(24,4),
    settlement_lines  integer       NOT NULL,
    payouts           integer       NOT NULL,
    -- For PAYOUT_PENDING: the event time after which the item is due and judged again.
    deadline          timestamptz,
    reason            text          NOT NULL,
    watermark         timestamptz   NOT NULL,
    evaluations       bigint        NOT NULL DEFAULT 1,
    -- The running sums (src/reconcile/payout.rs PayoutState).
    state             jsonb         NOT NULL,
    created_at        timestamptz   NOT NULL DEFAULT now(),
    updated_at        timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key)
) WITH (fillfactor = 85);
CREATE INDEX payout_items_due_idx ON payout_items (deadline) WHERE status = 'PAYOUT_PENDING';
CREATE INDEX payout_items_exceptions_idx ON payout_items (business_date)
    WHERE status NOT IN ('PAYOUT_MATCHED', 'PAYOUT_PENDING');

-- Every status change of a payout item. Ids come from reconciliation_history's sequence, so
-- a history id names one status change of either leg (exceptions_outbox.history_id).
CREATE TABLE payout_history (
    id                bigint        PRIMARY KEY
                          DEFAULT nextval('reconciliation_history_id_seq'),
    kind              text          NOT NULL,
    key               text          NOT NULL,
    from_status       text,
    to_status         text          NOT NULL,
    cause             text          NOT NULL CHECK (cause IN ('RECORDS', 'DEADLINE')),
    -- Ids of the settlement lines / statement lines inserted by the batch that caused it.
    caused_by         text[]        NOT NULL,
    watermark         timestamptz   NOT NULL,
    reason            text          NOT NULL,
    consumer_group    text          NOT NULL,
    evaluated_by      text          NOT NULL,
    recorded_at       timestamptz   NOT NULL DEFAULT now()
);
CREATE INDEX payout_history_item_idx ON payout_history (kind, key, id);

-- The outbox carries both legs. For leg PAYOUT: payment_reference is the payout item's key
-- (the batch id, or the statement line id of a credit without a batch reference),
-- merchant_id the batch's merchant ('' when no line is known), expected_gross the batch's
-- net total, settled_gross the sum paid, history_id a payout_history id.
ALTER TABLE exceptions_outbox DROP CONSTRAINT exceptions_outbox_history_id_fkey;
ALTER TABLE exceptions_outbox ADD COLUMN leg text NOT NULL DEFAULT 'SETTLEMENT'
    CHECK (leg IN ('SETTLEMENT', 'PAYOUT'));
ALTER TABLE exceptions_outbox ADD COLUMN account_id text;
ALTER TABLE exceptions_outbox ALTER COLUMN currency DROP NOT NULL;

-- Payouts per account, value date and currency, per shard (see 20261201000003) and summed.
CREATE TABLE payout_daily_totals_by_shard (
    account_id    text          NOT NULL,
    value_date    date          NOT NULL,
    currency      char(3)       NOT NULL,
    shard         text          NOT NULL,
    payout_count  bigint        NOT NULL DEFAULT 0,
    credited      numeric(24,4) NOT NULL DEFAULT 0,
    debited       numeric(24,4) NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, value_date, currency, shard)
);
CREATE VIEW payout_daily_totals AS
SELECT account_id, value_date, currency, sum(payout_count)::bigint AS payout_count,
       sum(credited)::numeric(24,4) AS credited, sum(debited)::numeric(24,4) AS debited
  FROM payout_daily_totals_by_shard
 GROUP BY account_id, value_date, currency;
CREATE VIEW payout_daily_totals_recomputed AS
SELECT account_id, value_date, currency, count(*)::bigint AS payout_count,
       coalesce(sum(amount) FILTER (WHERE amount > 0), 0)::numeric(24,4) AS credited,
       coalesce(sum(-amount) FILTER (WHERE amount < 0), 0)::numeric(24,4) AS debited
  FROM bank_payouts
 GROUP BY account_id, value_date, currency;
COMMENT ON VIEW payout_daily_totals IS
    'Bank statement lines per account, value date and currency (credits and debits apart); '
    'must equal payout_daily_totals_recomputed at any time.';

-- Reporting: open payout exceptions, and items per day, merchant and status.
CREATE VIEW open_payout_exceptions AS
SELECT i.kind, i.key AS batch_or_line, i.merchant_id, i.account_id, i.business_date,
       i.currency, i.status, i.expected_net, i.paid, i.difference, i.settlement_lines,
       i.payouts, i.reason, h.recorded_at AS since, i.evaluations
  FROM payout_items i
  LEFT JOIN LATERAL (
        SELECT x.recorded_at FROM payout_history x
         WHERE x.kind = i.kind AND x.key = i.key AND x.to_status = i.status
         ORDER BY x.id DESC LIMIT 1) h ON true
 WHERE i.status NOT IN ('PAYOUT_MATCHED', 'PAYOUT_PENDING');
COMMENT ON VIEW open_payout_exceptions IS
    'One row per settlement batch (kind BATCH) or unexplained statement line (kind LINE) in '
    'a payout exception status, with the batch''s net total, what was paid, the difference '
    '(paid - net) and since when it has had this status.';

CREATE VIEW payout_status_summary AS
SELECT business_date, coalesce(merchant_id, '') AS merchant_id, currency, status,
       status NOT IN ('PAYOUT_MATCHED', 'PAYOUT_PENDING') AS exception,
       count(*) AS items, sum(expected_net) AS expected_net, sum(paid) AS paid,
       sum(difference) AS difference
  FROM payout_items
 GROUP BY 1, 2, 3, 4;
COMMENT ON VIEW payout_status_summary IS
    'Payout items per business date, merchant (empty: a credit no batch explains), currency '
    'and status, with the sums of net totals, payouts and differences.';
