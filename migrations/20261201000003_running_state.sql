-- Reconciliation over running state, and running totals no two instances share.
--
-- 1. Each reconciliation item keeps the state the matcher needs (src/reconcile/state.rs):
--    its anchor record, the terms and FX rates its expected sums were priced with, the sums
--    and counts of both sides, the latest times. A batch folds its new records into it
--    instead of re-reading all of the reference's records. NULL: an item judged before this
--    migration; its records are re-read (once) at its next evaluation.
--    fillfactor 85 leaves room on each page, so an update that changes no indexed column
--    (a further line on a MATCHED item, a re-evaluation that only moves the state) can be a
--    HOT update.
ALTER TABLE reconciliation_items ADD COLUMN state jsonb;
ALTER TABLE reconciliation_items SET (fillfactor = 85);

-- 2. Running totals and daily totals per shard. A shard is the first input partition
--    ("topic/partition") of the batch that wrote the row: two instances never own the same
--    partition, so concurrent instances never update the same row and never wait on each
--    other's row locks (the background re-evaluations write shard 'sweep'). The views with
--    the old names sum the shards; readers are unchanged.
ALTER TABLE merchant_payment_totals RENAME TO merchant_payment_totals_by_shard;
ALTER TABLE merchant_payment_totals_by_shard ADD COLUMN shard text NOT NULL DEFAULT '';
ALTER TABLE merchant_payment_totals_by_shard DROP CONSTRAINT merchant_payment_totals_pkey;
ALTER TABLE merchant_payment_totals_by_shard
    ADD PRIMARY KEY (merchant_id, currency, kind, shard);
CREATE VIEW merchant_payment_totals AS
SELECT merchant_id, currency, kind, sum(event_count)::bigint AS event_count,
       sum(amount_sum)::numeric(24,4) AS amount_sum
  FROM merchant_payment_totals_by_shard
 GROUP BY merchant_id, currency, kind;

ALTER TABLE merchant_settlement_totals RENAME TO merchant_settlement_totals_by_shard;
ALTER TABLE merchant_settlement_totals_by_shard ADD COLUMN shard text NOT NULL DEFAULT '';
ALTER TABLE merchant_settlement_totals_by_shard DROP CONSTRAINT merchant_settlement_totals_pkey;
ALTER TABLE merchant_settlement_totals_by_shard ADD PRIMARY KEY (merchant_id, currency, shard);
CREATE VIEW merchant_settlement_totals AS
SELECT merchant_id, currency, sum(line_count)::bigint AS line_count,
       sum(gross_sum)::numeric(24,4) AS gross_sum, sum(fee_sum)::numeric(24,4) AS fee_sum, sum(net_sum)::numeric(24,4) AS net_sum
  FROM merchant_settlement_totals_by_shard
 GROUP BY merchant_id, currency;

ALTER TABLE merchant_daily_totals RENAME TO merchant_daily_totals_by_shard;
ALTER TABLE merchant_daily_totals_by_shard ADD COLUMN shard text NOT NULL DEFAULT '';
ALTER TABLE merchant_daily_totals_by_shard DROP CONSTRAINT merchant_daily_totals_pkey;
ALTER TABLE merchant_daily_totals_by_shard
    ADD PRIMARY KEY (merchant_id, business_date, currency, shard);
CREATE VIEW merchant_daily_totals AS
SELECT merchant_id, business_date, currency,
       sum(captured_count)::bigint AS captured_count, sum(captured)::numeric(24,4) AS captured,
       sum(refunded_count)::bigint AS refunded_count, sum(refunded)::numeric(24,4) AS refunded,
       sum(charged_back_count)::bigint AS charged_back_count, sum(charged_back)::numeric(24,4) AS charged_back,
       sum(settled_count)::bigint AS settled_count, sum(settled_gross)::numeric(24,4) AS settled_gross,
       sum(settled_fees)::numeric(24,4) AS settled_fees, sum(settled_net)::numeric(24,4) AS settled_net,
       sum(matched_count)::bigint AS matched_count, sum(expected_count)::bigint AS expected_count,
       sum(exception_count)::bigint AS exception_count
  FROM merchant_daily_totals_by_shard
 GROUP BY merchant_id, business_date, currency;
COMMENT ON VIEW merchant_daily_totals IS
    'Per merchant, day and currency: the sum over shards of merchant_daily_totals_by_shard; '
    'must equal merchant_daily_totals_recomputed at any time.';

-- The report view was bound to the table, now the per-shard rows: bind it to the sums.
CREATE OR REPLACE VIEW merchant_daily_report AS
SELECT t.business_date, t.merchant_id, t.currency,
       t.captured_count, t.captured,
       t.refunded_count, t.refunded,
       t.charged_back_count, t.charged_back,
       t.captured - t.refunded - t.charged_back AS net_captured,
       t.settled_count, t.settled_gross, t.settled_fees, t.settled_net,
       t.matched_count, t.expected_count, t.exception_count,
       round(t.matched_count::numeric / nullif(t.matched_count + t.exception_count, 0), 4)
           AS match_rate,
       i.expected_net AS items_expected_net,
       i.settled_net AS items_settled_net,
       i.settled_net - i.expected_net AS items_net_difference
  FROM merchant_daily_totals t
  LEFT JOIN (
        SELECT merchant_id, business_date, currency,
               sum(expected_net) AS expected_net,
               coalesce(sum(settled_net) FILTER (WHERE settled_currency = currency), 0)
                   AS settled_net
          FROM reconciliation_items
         GROUP BY merchant_id, business_date, currency) i
       USING (merchant_id, business_date, currency)
 WHERE (t.captured_count, t.captured, t.refunded_count, t.refunded, t.charged_back_count,
        t.charged_back, t.settled_count, t.settled_gross, t.settled_fees, t.settled_net,
        t.matched_count, t.expected_count, t.exception_count)
       IS DISTINCT FROM (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
