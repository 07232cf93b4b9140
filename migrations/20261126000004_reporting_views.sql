-- Reporting views over the reconciliation tables, for BI tools, Grafana's PostgreSQL data
-- source and `payrecon report`. They only read: nothing here is written by the service, and
-- dropping or replacing them never touches a stored row.
--
-- Choices shared by all of them:
--   * "Exception" means every status except MATCHED and EXPECTED (as in the partial index
--     reconciliation_items_exceptions_idx and exceptions_outbox.opened).
--   * Amounts stay numeric, never float; each amount is in the row's `currency` (the
--     merchant's settlement currency) unless its name says otherwise.
--   * A settled amount in another currency than the row's (CURRENCY_MISMATCH) is never added
--     to or subtracted from amounts in the row's currency: the difference is NULL and the
--     summed settled amounts leave it out.
--   * Key columns come first (business_date, merchant_id, currency, ...), so ORDER BY 1, 2, 3
--     reads naturally; the views themselves have no order.
-- Read access: the read-only role of the local stack (grafana_reader) gets SELECT on these
-- through the default privileges granted in grafana/postgres-init/10-grafana-reader.sh; the
-- role is created outside the migrations, so it is not named here.

CREATE VIEW open_exceptions AS
SELECT i.payment_reference, i.merchant_id, i.business_date, i.currency, i.status,
       i.expected_gross, i.expected_fee, i.expected_net,
       i.settled_currency, i.settled_gross, i.settled_fee, i.settled_net,
       CASE WHEN i.settlement_lines = 0 THEN 0 - i.expected_gross
            WHEN i.settled_currency = i.currency THEN i.settled_gross - i.expected_gross
       END AS difference,
       i.reason,
       h.recorded_at AS since,
       i.evaluations
  FROM reconciliation_items i
  -- The newest history row that moved the item into its current status (index
  -- reconciliation_history_reference_idx).
  LEFT JOIN LATERAL (
        SELECT x.recorded_at FROM reconciliation_history x
         WHERE x.payment_reference = i.payment_reference AND x.to_status = i.status
         ORDER BY x.id DESC LIMIT 1) h ON true
 WHERE i.status NOT IN ('MATCHED', 'EXPECTED');

COMMENT ON VIEW open_exceptions IS
    'One row per payment reference currently in an exception status (every status except '
    'MATCHED and EXPECTED), with expected and settled amounts in the merchant''s settlement '
    'currency, the difference, the reason, and since when it has had this status.';
COMMENT ON COLUMN open_exceptions.difference IS
    'settled_gross - expected_gross; nothing settled counts as 0. NULL when the expected '
    'amount is unknown (MISSING_REFERENCE) or the settled side is in another or mixed '
    'currencies.';
COMMENT ON COLUMN open_exceptions.since IS
    'recorded_at of the reconciliation_history row that put the item in its current status.';
COMMENT ON COLUMN open_exceptions.evaluations IS
    'How many times the item has been evaluated (records arriving, deadlines, reference data).';

CREATE VIEW reconciliation_status_summary AS
SELECT business_date, merchant_id, currency, status,
       status NOT IN ('MATCHED', 'EXPECTED') AS exception,
       count(*) AS items,
       sum(expected_gross) AS expected_gross,
       sum(expected_fee) AS expected_fee,
       sum(expected_net) AS expected_net,
       coalesce(sum(settled_gross) FILTER (WHERE settled_currency = currency), 0) AS settled_gross,
       coalesce(sum(settled_fee) FILTER (WHERE settled_currency = currency), 0) AS settled_fee,
       coalesce(sum(settled_net) FILTER (WHERE settled_currency = currency), 0) AS settled_net,
       sum(CASE WHEN settlement_lines = 0 THEN 0 - expected_gross
                WHEN settled_currency = currency THEN settled_gross - expected_gross
           END) AS difference
  FROM reconciliation_items
 GROUP BY business_date, merchant_id, currency, status;

COMMENT ON VIEW reconciliation_status_summary IS
    'Reconciliation items per business_date, merchant_id, currency and status: how many, and '
    'the sums of their expected and settled amounts and differences (as in open_exceptions).';
COMMENT ON COLUMN reconciliation_status_summary.expected_gross IS
    'Sum over the items whose expected amount is known; NULL when none is (MISSING_REFERENCE).';
COMMENT ON COLUMN reconciliation_status_summary.settled_gross IS
    'Sum of what was settled in the row''s currency; lines in another currency are left out.';

CREATE VIEW merchant_daily_report AS
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
 -- Rows every item has moved out of again hold only zeros (as in
 -- Store::daily_totals_differences, they count as absent).
 WHERE (t.captured_count, t.captured, t.refunded_count, t.refunded, t.charged_back_count,
        t.charged_back, t.settled_count, t.settled_gross, t.settled_fees, t.settled_net,
        t.matched_count, t.expected_count, t.exception_count)
       IS DISTINCT FROM (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);

COMMENT ON VIEW merchant_daily_report IS
    'merchant_daily_totals (without all-zero rows) plus the match rate and, for the '
    'reconciliation items of the day, expected net against settled net.';
COMMENT ON COLUMN merchant_daily_report.net_captured IS
    'captured - refunded - charged_back: payment events by the UTC date of their event time, '
    'in the event currency.';
COMMENT ON COLUMN merchant_daily_report.settled_net IS
    'Settlement lines by settlement_date, in the line currency (not necessarily the lines of '
    'the payments of this date: compare items_settled_net for that).';
COMMENT ON COLUMN merchant_daily_report.match_rate IS
    'matched_count / (matched_count + exception_count), 4 decimals; EXPECTED items are not '
    'counted. NULL when there is neither.';
COMMENT ON COLUMN merchant_daily_report.items_expected_net IS
    'Sum of expected_net of the reconciliation items counted in this row (their payment '
    'events priced with the merchant''s terms). NULL when the row has no item or none is priced.';
COMMENT ON COLUMN merchant_daily_report.items_settled_net IS
    'Sum of settled_net of the same items, in this row''s currency (lines in another currency '
    'left out). NULL when the row has no item.';
COMMENT ON COLUMN merchant_daily_report.items_net_difference IS
    'items_settled_net - items_expected_net.';

CREATE VIEW exception_activity AS
SELECT date_trunc('hour', recorded_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour,
       count(*) FILTER (WHERE opened) AS opened,
       count(*) FILTER (WHERE NOT opened) AS resolved,
       count(*) FILTER (WHERE opened) - count(*) FILTER (WHERE NOT opened) AS net_change
  FROM (SELECT recorded_at, to_status NOT IN ('MATCHED', 'EXPECTED') AS opened
          FROM reconciliation_history
         -- Only changes into or out of an exception status (the same rows the outbox
         -- publishes); a first evaluation has no from_status and counts as not an exception.
         WHERE (to_status NOT IN ('MATCHED', 'EXPECTED'))
               <> coalesce(from_status NOT IN ('MATCHED', 'EXPECTED'), false)) c
 GROUP BY 1;

COMMENT ON VIEW exception_activity IS
    'Per UTC hour of reconciliation_history.recorded_at: exceptions opened (to_status is an '
    'exception and from_status is not) and resolved (the reverse). Hours without either are '
    'absent. Scans all of reconciliation_history (no index on recorded_at).';
