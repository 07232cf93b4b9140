//! Reading totals back: the running totals tables, and the same figures recomputed from the
//! stored rows (they must always agree).

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use super::Store;
use crate::domain::{PaymentTotal, PayoutTotal, SettlementTotal, Totals};

impl Store {
    /// Totals as maintained incrementally by the batch transactions.
    pub async fn running_totals(&self, group: &str) -> Result<Totals, sqlx::Error> {
        self.totals_from(
            "SELECT merchant_id, currency, kind, event_count, amount_sum FROM merchant_payment_totals",
            "SELECT merchant_id, currency, line_count, gross_sum, fee_sum, net_sum FROM merchant_settlement_totals",
            "SELECT account_id, currency, sum(payout_count)::bigint, sum(credited - debited) FROM payout_daily_totals GROUP BY 1, 2",
            group,
        )
        .await
    }

    /// The same totals recomputed from `payment_events`, `settlement_lines` and
    /// `bank_payouts`.
    pub async fn recomputed_totals(&self, group: &str) -> Result<Totals, sqlx::Error> {
        self.totals_from(
            "SELECT merchant_id, currency, kind, count(*), sum(amount) FROM payment_events GROUP BY 1, 2, 3",
            "SELECT merchant_id, currency, count(*), sum(gross), sum(fee), sum(net) FROM settlement_lines GROUP BY 1, 2",
            "SELECT account_id, currency, count(*), sum(amount) FROM bank_payouts GROUP BY 1, 2",
            group,
        )
        .await
    }

    async fn totals_from(
        &self,
        payments_sql: &'static str,
        settlements_sql: &'static str,
        payouts_sql: &'static str,
        group: &str,
    ) -> Result<Totals, sqlx::Error> {
        let payment_rows: Vec<(String, String, String, i64, Decimal)> =
            sqlx::query_as(payments_sql).fetch_all(&self.pool).await?;
        let settlement_rows: Vec<(String, String, i64, Decimal, Decimal, Decimal)> =
            sqlx::query_as(settlements_sql)
                .fetch_all(&self.pool)
                .await?;
        let mut payments = BTreeMap::new();
        let mut payment_events = 0;
        for (m, c, k, count, sum) in payment_rows {
            payment_events += count;
            payments.insert(
                format!("{m}/{}/{k}", c.trim()),
                PaymentTotal {
                    count,
                    sum: sum.normalize(),
                },
            );
        }
        let mut settlements = BTreeMap::new();
        let mut settlement_lines = 0;
        for (m, c, count, gross, fee, net) in settlement_rows {
            settlement_lines += count;
            settlements.insert(
                format!("{m}/{}", c.trim()),
                SettlementTotal {
                    count,
                    gross: gross.normalize(),
                    fee: fee.normalize(),
                    net: net.normalize(),
                },
            );
        }
        let payout_rows: Vec<(String, String, i64, Decimal)> =
            sqlx::query_as(payouts_sql).fetch_all(&self.pool).await?;
        let mut payouts = BTreeMap::new();
        let mut statement_lines = 0;
        for (a, c, count, sum) in payout_rows {
            statement_lines += count;
            payouts.insert(
                format!("{a}/{}", c.trim()),
                PayoutTotal {
                    count,
                    sum: sum.normalize(),
                },
            );
        }
        let (dead_letters, records): (i64, Option<Decimal>) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM dead_letters),
                    (SELECT sum(records_applied) FROM consumer_offsets WHERE consumer_group = $1)",
        )
        .bind(group)
        .fetch_one(&self.pool)
        .await?;
        let statuses: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM reconciliation_items GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let payout_statuses: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM payout_items GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        Ok(Totals {
            statuses: statuses.into_iter().collect(),
            payout_statuses: payout_statuses.into_iter().collect(),
            payouts,
            statement_lines,
            payments,
            settlements,
            payment_events,
            settlement_lines,
            dead_letters,
            records: records.and_then(|r| r.try_into().ok()).unwrap_or(0),
        })
    }
}

impl Store {
    /// Rows where `merchant_daily_totals` differs from the same figures recomputed from the
    /// stored events, lines and items (the view `merchant_daily_totals_recomputed`); empty
    /// when the incremental totals are exact. All-zero rows (every item moved on to another
    /// bucket) count as absent.
    pub async fn daily_totals_differences(&self) -> Result<Vec<String>, sqlx::Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "WITH running AS (
                SELECT * FROM merchant_daily_totals
                 WHERE (captured_count, captured, refunded_count, refunded, charged_back_count,
                        charged_back, settled_count, settled_gross, settled_fees, settled_net,
                        matched_count, expected_count, exception_count)
                       IS DISTINCT FROM (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)),
                  recomputed AS (SELECT * FROM merchant_daily_totals_recomputed)
             SELECT coalesce(a.merchant_id, b.merchant_id) || '/' ||
                    coalesce(a.business_date, b.business_date)::text || '/' ||
                    trim(coalesce(a.currency, b.currency)),
                    coalesce(to_jsonb(a)::text, 'missing') || ' vs ' ||
                    coalesce(to_jsonb(b)::text, 'missing')
               FROM running a
               FULL JOIN recomputed b
                 ON a.merchant_id = b.merchant_id AND a.business_date = b.business_date
                AND a.currency = b.currency
              WHERE a IS DISTINCT FROM b
              ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(k, v)| format!("{k}: {v}")).collect())
    }
}
