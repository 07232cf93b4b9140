//! Reading and loading the temporal reference tables.

use futures::TryStreamExt;
use sqlx::postgres::types::PgInterval;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::{Decode, Row, Type};

use super::Store;
use crate::domain::Currency;
use crate::reference::{
    FxRate, MerchantStatus, MerchantVersion, MerchantVersionRef, SnapshotBuilder,
};

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

/// Column `i` of a row, with the column named in the error.
fn column<'r, T>(row: &'r PgRow, i: usize, name: &str) -> Result<T, sqlx::Error>
where
    T: Decode<'r, Postgres> + Type<Postgres>,
{
    row.try_get(i).map_err(|e| decode(name, e.to_string()))
}

fn decode(what: &str, e: String) -> sqlx::Error {
    sqlx::Error::Decode(format!("{what}: {e}").into())
}

impl Store {
    /// Every version of every merchant and rate (tools; the cache streams instead, see
    /// [`Store::load_reference_into`]).
    pub async fn load_reference(&self) -> Result<(Vec<MerchantVersion>, Vec<FxRate>), sqlx::Error> {
        let mut merchants = Vec::new();
        self.each_merchant_version(|m| merchants.push(m.to_version()))
            .await?;
        let mut rates = Vec::new();
        self.each_rate(|r| rates.push(r)).await?;
        Ok((merchants, rates))
    }

    /// Streams every version of every merchant and rate into `builder` (cache loads). Rows
    /// are decoded one at a time, their strings borrowed from the row, so a load holds the
    /// packed snapshot and one row, never the whole table as rows.
    pub async fn load_reference_into(
        &self,
        builder: &mut SnapshotBuilder,
    ) -> Result<(), sqlx::Error> {
        self.each_merchant_version(|m| builder.push_merchant(m))
            .await?;
        self.each_rate(|r| builder.push_rate(r)).await
    }

    /// Calls `f` with each merchants row, validated, in no particular order.
    async fn each_merchant_version(
        &self,
        mut f: impl FnMut(MerchantVersionRef<'_>) + Send,
    ) -> Result<(), sqlx::Error> {
        let mut rows = sqlx::query(
            "SELECT merchant_id, valid_from, name, settlement_currency, fee_bps, fee_fixed, status,
                    tolerance_abs, tolerance_rel, settlement_deadline, payment_deadline
               FROM merchants",
        )
        .fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let currency: &str = column(&row, 3, "merchants.settlement_currency")?;
            let status: &str = column(&row, 6, "merchants.status")?;
            let interval = |i, name| -> Result<_, sqlx::Error> {
                Ok(column::<Option<PgInterval>>(&row, i, name)?.map(interval_to_duration))
            };
            f(MerchantVersionRef {
                merchant_id: column(&row, 0, "merchants.merchant_id")?,
                valid_from: column(&row, 1, "merchants.valid_from")?,
                name: column(&row, 2, "merchants.name")?,
                settlement_currency: Currency::from_code(currency.trim())
                    .map_err(|e| decode("merchants.settlement_currency", e.to_string()))?,
                fee_bps: column(&row, 4, "merchants.fee_bps")?,
                fee_fixed: column(&row, 5, "merchants.fee_fixed")?,
                status: MerchantStatus::parse(status)
                    .ok_or_else(|| decode("merchants.status", status.to_owned()))?,
                tolerance_abs: column(&row, 7, "merchants.tolerance_abs")?,
                tolerance_rel: column(&row, 8, "merchants.tolerance_rel")?,
                settlement_deadline: interval(9, "merchants.settlement_deadline")?,
                payment_deadline: interval(10, "merchants.payment_deadline")?,
            });
        }
        Ok(())
    }

    /// Calls `f` with each fx_rates row, validated, in no particular order.
    async fn each_rate(&self, mut f: impl FnMut(FxRate) + Send) -> Result<(), sqlx::Error> {
        let mut rows =
            sqlx::query("SELECT base_currency, quote_currency, valid_from, rate FROM fx_rates")
                .fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let base: &str = column(&row, 0, "fx_rates.base_currency")?;
            let quote: &str = column(&row, 1, "fx_rates.quote_currency")?;
            f(FxRate {
                base: Currency::from_code(base.trim())
                    .map_err(|e| decode("fx_rates.base_currency", e.to_string()))?,
                quote: Currency::from_code(quote.trim())
                    .map_err(|e| decode("fx_rates.quote_currency", e.to_string()))?,
                valid_from: column(&row, 2, "fx_rates.valid_from")?,
                rate: column(&row, 3, "fx_rates.rate")?,
            });
        }
        Ok(())
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
