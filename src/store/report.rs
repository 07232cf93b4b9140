//! The reporting views (`open_exceptions`, `merchant_daily_report`, `payout_status_summary`,
//! `open_payout_exceptions`) as `payrecon report` reads them: one business day, one
//! read-only snapshot. Amounts come as stored; `report` formats them.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::Store;

/// A row of the `open_exceptions` view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OpenException {
    pub payment_reference: String,
    pub merchant_id: String,
    pub business_date: NaiveDate,
    /// The merchant's settlement currency: expected amounts and the difference are in it.
    pub currency: String,
    pub status: String,
    /// `None` while reference data is missing (MISSING_REFERENCE).
    pub expected_gross: Option<Decimal>,
    pub expected_fee: Option<Decimal>,
    pub expected_net: Option<Decimal>,
    /// The settled amounts' currency; `None` without lines or with lines in mixed currencies.
    pub settled_currency: Option<String>,
    pub settled_gross: Option<Decimal>,
    pub settled_fee: Option<Decimal>,
    pub settled_net: Option<Decimal>,
    /// settled_gross − expected_gross (nothing settled counts as 0); `None` when either side
    /// is unknown or in another currency.
    pub difference: Option<Decimal>,
    pub reason: String,
    /// When the item entered its current status.
    pub since: Option<DateTime<Utc>>,
    pub evaluations: i64,
}

/// A row of the `merchant_daily_report` view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct MerchantDay {
    pub business_date: NaiveDate,
    pub merchant_id: String,
    pub currency: String,
    pub captured_count: i64,
    pub captured: Decimal,
    pub refunded_count: i64,
    pub refunded: Decimal,
    pub charged_back_count: i64,
    pub charged_back: Decimal,
    /// captured − refunded − charged_back.
    pub net_captured: Decimal,
    /// Settlement lines dated this day.
    pub settled_count: i64,
    pub settled_gross: Decimal,
    pub settled_fees: Decimal,
    pub settled_net: Decimal,
    pub matched_count: i64,
    pub expected_count: i64,
    pub exception_count: i64,
    /// matched / (matched + exceptions), 4 decimals; `None` when there is neither.
    pub match_rate: Option<Decimal>,
    /// What the day's reconciliation items call for, net of fees.
    pub items_expected_net: Option<Decimal>,
    /// What was settled for them, net of fees.
    pub items_settled_net: Option<Decimal>,
    pub items_net_difference: Option<Decimal>,
}

/// A row of the `payout_status_summary` view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PayoutDay {
    /// Empty for credits no batch explains.
    pub merchant_id: String,
    /// `None` for items in mixed currencies.
    pub currency: Option<String>,
    pub status: String,
    pub items: i64,
    /// Net totals of the batches, and what was paid out for them.
    pub expected_net: Option<Decimal>,
    pub paid: Option<Decimal>,
    /// paid − expected_net.
    pub difference: Option<Decimal>,
}

/// A row of the `open_payout_exceptions` view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OpenPayoutException {
    /// BATCH (a settlement batch) or LINE (a statement line without a batch reference).
    pub kind: String,
    pub batch_or_line: String,
    pub merchant_id: Option<String>,
    pub account_id: Option<String>,
    pub currency: Option<String>,
    pub status: String,
    pub expected_net: Option<Decimal>,
    pub paid: Option<Decimal>,
    pub difference: Option<Decimal>,
    pub reason: String,
    pub since: Option<DateTime<Utc>>,
}

/// One business day's rows of every reporting view, read in one snapshot.
#[derive(Debug, Clone)]
pub struct DayRows {
    pub business_date: NaiveDate,
    /// Open exceptions of the day in all (the list below stops at the limit).
    pub open_exceptions_total: i64,
    pub open_exceptions: Vec<OpenException>,
    pub merchants: Vec<MerchantDay>,
    pub payouts: Vec<PayoutDay>,
    pub open_payout_exceptions: Vec<OpenPayoutException>,
}

impl Store {
    /// The rows of `date` (default: the latest business day, of `merchant` when given), with
    /// at most `limit` open exceptions of each leg, read in one repeatable-read, read-only
    /// transaction; `None` when there is no business day at all.
    pub async fn day_report(
        &self,
        date: Option<NaiveDate>,
        merchant: Option<&str>,
        limit: i64,
    ) -> Result<Option<DayRows>, sqlx::Error> {
        let store = self;
        let mut tx = store.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let date: Option<NaiveDate> = match date {
            Some(d) => Some(d),
            None => {
                // The view's latest day costs the whole totals table (its rows are summed
                // over shards before the all-zero days are left out); the latest day of the
                // per-shard rows (index merchant_daily_totals_by_shard_date_idx) bounds it,
                // and a day can only be all zero when an item moved to an earlier bucket:
                // look a month back from it, and over everything only when that finds
                // nothing.
                let recent: Option<NaiveDate> = sqlx::query_scalar(
                    "SELECT max(business_date) FROM merchant_daily_report
                      WHERE ($1::text IS NULL OR merchant_id = $1)
                        AND business_date >= (
                            SELECT max(business_date) - 31 FROM merchant_daily_totals_by_shard
                             WHERE $1::text IS NULL OR merchant_id = $1)",
                )
                .bind(merchant)
                .fetch_one(&mut *tx)
                .await?;
                match recent {
                    Some(d) => Some(d),
                    None => {
                        sqlx::query_scalar(
                            "SELECT max(business_date) FROM merchant_daily_report
                              WHERE $1::text IS NULL OR merchant_id = $1",
                        )
                        .bind(merchant)
                        .fetch_one(&mut *tx)
                        .await?
                    }
                }
            }
        };
        let Some(date) = date else {
            tx.commit().await?;
            return Ok(None);
        };
        let open_exceptions_total = sqlx::query_scalar(
            "SELECT count(*) FROM open_exceptions
              WHERE business_date = $1 AND ($2::text IS NULL OR merchant_id = $2)",
        )
        .bind(date)
        .bind(merchant)
        .fetch_one(&mut *tx)
        .await?;
        let open_exceptions = sqlx::query_as::<_, OpenException>(
            "SELECT payment_reference, merchant_id, business_date, currency, status,
                    expected_gross, expected_fee, expected_net, settled_currency, settled_gross,
                    settled_fee, settled_net, difference, reason, since, evaluations
               FROM open_exceptions
              WHERE business_date = $1 AND ($2::text IS NULL OR merchant_id = $2)
              ORDER BY abs(difference) DESC NULLS LAST, payment_reference
              LIMIT $3",
        )
        .bind(date)
        .bind(merchant)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let merchants = sqlx::query_as::<_, MerchantDay>(
            "SELECT business_date, merchant_id, currency, captured_count, captured, refunded_count,
                    refunded, charged_back_count, charged_back, net_captured, settled_count,
                    settled_gross, settled_fees, settled_net, matched_count, expected_count,
                    exception_count, match_rate, items_expected_net, items_settled_net,
                    items_net_difference
               FROM merchant_daily_report
              WHERE business_date = $1 AND ($2::text IS NULL OR merchant_id = $2)
              ORDER BY merchant_id, currency",
        )
        .bind(date)
        .bind(merchant)
        .fetch_all(&mut *tx)
        .await?;
        let payouts = sqlx::query_as::<_, PayoutDay>(
            "SELECT merchant_id, trim(currency) AS currency, status, items, expected_net, paid,
                    difference
               FROM payout_status_summary
              WHERE business_date = $1 AND ($2::text IS NULL OR merchant_id = $2)
              ORDER BY merchant_id, currency, status",
        )
        .bind(date)
        .bind(merchant)
        .fetch_all(&mut *tx)
        .await?;
        let open_payout_exceptions = sqlx::query_as::<_, OpenPayoutException>(
            "SELECT kind, batch_or_line, merchant_id, account_id, trim(currency) AS currency, status,
                    expected_net, paid, difference, reason, since
               FROM open_payout_exceptions
              WHERE business_date = $1 AND ($2::text IS NULL OR merchant_id = $2)
              ORDER BY abs(difference) DESC NULLS LAST, kind, batch_or_line
              LIMIT $3",
        )
        .bind(date)
        .bind(merchant)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(DayRows {
            business_date: date,
            open_exceptions_total,
            open_exceptions,
            merchants,
            payouts,
            open_payout_exceptions,
        }))
    }
}
