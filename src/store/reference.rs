//! Reading and loading the temporal reference tables.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::types::PgInterval;

use super::Store;
use crate::domain::Currency;
use crate::reference::{FxRate, MerchantStatus, MerchantVersion};

type MerchantRow = (
    String,
    DateTime<Utc>,
    String,
    String,
    Decimal,
    Decimal,
    String,
    Option<Decimal>,
    Option<Decimal>,
    Option<PgInterval>,
    Option<PgInterval>,
);

fn interval_to_duration(i: PgInterval) -> std::time::Duration {
    // Written from std Durations, so months are 0; days are 24 h (timestamptz arithmetic).
    let micros = i64::from(i.months) * 30 * 86_400_000_000
        + i64::from(i.days) * 86_400_000_000
        + i.microseconds;
    std::time::Duration::from_micros(micros.max(0) as u64)
}

fn duration_to_interval(d: std::time::Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: d.as_micros().min(i64::MAX as u128) as i64,
    }
}

impl Store {
    /// Every version of every merchant and rate (cache loads).
    pub async fn load_reference(&self) -> Result<(Vec<MerchantVersion>, Vec<FxRate>), sqlx::Error> {
        let rows: Vec<MerchantRow> = sqlx::query_as(
            "SELECT merchant_id, valid_from, name, settlement_currency, fee_bps, fee_fixed, status,
                    tolerance_abs, tolerance_rel, settlement_deadline, payment_deadline
               FROM merchants",
        )
        .fetch_all(&self.pool)
        .await?;
        let decode = |what: &str, e: String| sqlx::Error::Decode(format!("{what}: {e}").into());
        let mut merchants = Vec::with_capacity(rows.len());
        for (id, from, name, currency, bps, fixed, status, tabs, trel, sdl, pdl) in rows {
            merchants.push(MerchantVersion {
                settlement_currency: Currency::from_code(currency.trim())
                    .map_err(|e| decode("merchants.settlement_currency", e.to_string()))?,
                status: MerchantStatus::parse(&status)
                    .ok_or_else(|| decode("merchants.status", status.clone()))?,
                merchant_id: id,
                valid_from: from,
                name,
                fee_bps: bps,
                fee_fixed: fixed,
                tolerance_abs: tabs,
                tolerance_rel: trel,
                settlement_deadline: sdl.map(interval_to_duration),
                payment_deadline: pdl.map(interval_to_duration),
            });
        }
        let rows: Vec<(String, String, DateTime<Utc>, Decimal)> =
            sqlx::query_as("SELECT base_currency, quote_currency, valid_from, rate FROM fx_rates")
                .fetch_all(&self.pool)
                .await?;
        let mut rates = Vec::with_capacity(rows.len());
        for (base, quote, valid_from, rate) in rows {
            rates.push(FxRate {
                base: Currency::from_code(base.trim())
                    .map_err(|e| decode("fx_rates.base_currency", e.to_string()))?,
                quote: Currency::from_code(quote.trim())
                    .map_err(|e| decode("fx_rates.quote_currency", e.to_string()))?,
                valid_from,
                rate,
            });
        }
        Ok((merchants, rates))
    }

    /// Inserts merchant versions in one transaction; a version with the same merchant and
    /// start is corrected in place (operators fix typos; audits see `loaded_at`).
    pub async fn upsert_merchants(&self, versions: &[MerchantVersion]) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for m in versions {
            n += sqlx::query(
                "INSERT INTO merchants (merchant_id, valid_from, name, settlement_currency, fee_bps,
                        fee_fixed, status, tolerance_abs, tolerance_rel, settlement_deadline, payment_deadline)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                 ON CONFLICT (merchant_id, valid_from) DO UPDATE SET
                        name = excluded.name, settlement_currency = excluded.settlement_currency,
                        fee_bps = excluded.fee_bps, fee_fixed = excluded.fee_fixed, status = excluded.status,
                        tolerance_abs = excluded.tolerance_abs, tolerance_rel = excluded.tolerance_rel,
                        settlement_deadline = excluded.settlement_deadline,
                        payment_deadline = excluded.payment_deadline, loaded_at = now()",
            )
            .bind(&m.merchant_id)
            .bind(m.valid_from)
            .bind(&m.name)
            .bind(m.settlement_currency.code())
            .bind(m.fee_bps)
            .bind(m.fee_fixed)
            .bind(m.status.as_str())
            .bind(m.tolerance_abs)
            .bind(m.tolerance_rel)
            .bind(m.settlement_deadline.map(duration_to_interval))
            .bind(m.payment_deadline.map(duration_to_interval))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Inserts rate versions in one transaction (same correction rule as merchants).
    pub async fn upsert_rates(&self, rates: &[FxRate]) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for r in rates {
            n += sqlx::query(
                "INSERT INTO fx_rates (base_currency, quote_currency, valid_from, rate)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (base_currency, quote_currency, valid_from)
                 DO UPDATE SET rate = excluded.rate, loaded_at = now()",
            )
            .bind(r.base.code())
            .bind(r.quote.code())
            .bind(r.valid_from)
            .bind(r.rate)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(n)
    }
}
