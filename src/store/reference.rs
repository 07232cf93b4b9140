//! Reading and loading the temporal reference tables.
//!
//! Reference data is an append-only history (migration `20261201000002`): a load inserts new
//! versions, skips versions identical to the stored ones, and refuses — the whole load, in
//! one transaction — a version that differs from the stored one with the same key
//! ([`LoadError::Conflicts`]). Only an explicit [`Correction`] changes a stored version; it
//! records who, when, why and the values before and after in `reference_corrections`, and
//! queues the payment references whose pricing it changes in `reference_reevaluations`, which
//! the running service re-evaluates after its cache reloads ([`Store::reevaluate_corrected`]).
//!
//! Which references a correction queues:
//! - a merchant version valid from T until the next version's start U: every reference with
//!   a payment event or a settlement line of that merchant whose event time is in [T, U) (a
//!   reference's terms are the version valid at its first record, so this is exact or more);
//! - an FX rate version of BASE/QUOTE valid in [T, U): every reference with a payment event in
//!   [T, U) converted between BASE and QUOTE, in either direction (its currency is one of the
//!   two, its item settles in the other; the lookup also inverts the reverse pair). Not
//!   narrowed to the events that used this very version rather than the reverse pair's (the
//!   cache decides that, per event), so it may queue a reference whose verdict cannot change;
//!   re-evaluating one is harmless, it only writes history when the status changes.
//!
//! Finding them reads `payment_events` and `settlement_lines` without an index on merchant
//! or currency and time: corrections are rare operator actions, and an index on the hot
//! tables would slow every batch to speed them up.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sqlx::postgres::types::PgInterval;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::{Decode, PgConnection, Row, Type};

use super::Store;
use crate::domain::Currency;
use crate::reference::csv::ReferenceFile;
use crate::reference::{
    FieldChange, FxRate, MerchantStatus, MerchantVersion, MerchantVersionRef, SnapshotBuilder,
    VersionFields, differences,
};

/// An operator's deliberate change of stored versions: who asks and why, recorded with every
/// version it changes.
#[derive(Debug, Clone)]
pub struct Correction {
    /// Why the stored values were wrong (required, never empty).
    pub reason: String,
    /// Who asks for it (the OS user unless named).
    pub by: String,
    /// Where the new values come from (the file), for the record.
    pub source: Option<String>,
}

/// A loaded version that differs from the stored version with the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Which file of [`Store::load_reference_files`] it is in (0 for the other loads).
    pub file: usize,
    /// Position of the version in the slice given to the load (the caller maps it to a line).
    pub index: usize,
    /// The key, as [`MerchantVersion::describe_key`] names it.
    pub key: String,
    pub changes: Vec<FieldChange>,
}

/// Why a load did not happen. Nothing of it was written in either case.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Versions differ from stored versions with the same key and no correction was asked
    /// for: the caller shows them and the operator decides.
    #[error("{} version(s) differ from the stored version with the same key: {}", .0.len(), describe(.0))]
    Conflicts(Vec<Conflict>),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn describe(conflicts: &[Conflict]) -> String {
    let each: Vec<String> = conflicts
        .iter()
        .map(|c| {
            let changes: Vec<String> = c.changes.iter().map(ToString::to_string).collect();
            format!("{} ({})", c.key, changes.join("; "))
        })
        .collect();
    each.join(", ")
}

/// What a load did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadSummary {
    /// New versions.
    pub inserted: u64,
    /// Versions identical to the stored ones (a repeated load).
    pub unchanged: u64,
    /// Stored versions changed by a [`Correction`].
    pub corrected: u64,
    /// Payment references queued for re-evaluation by the corrections.
    pub queued: u64,
}

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

const MERCHANT_COLUMNS: &str = "merchant_id, valid_from, name, settlement_currency, fee_bps,
    fee_fixed, status, tolerance_abs, tolerance_rel, settlement_deadline, payment_deadline";

/// A merchants row (columns in [`MERCHANT_COLUMNS`] order), validated, strings borrowed.
fn merchant_row(row: &PgRow) -> Result<MerchantVersionRef<'_>, sqlx::Error> {
    let currency: &str = column(row, 3, "merchants.settlement_currency")?;
    let status: &str = column(row, 6, "merchants.status")?;
    let interval = |i, name| -> Result<_, sqlx::Error> {
        Ok(column::<Option<PgInterval>>(row, i, name)?.map(interval_to_duration))
    };
    Ok(MerchantVersionRef {
        merchant_id: column(row, 0, "merchants.merchant_id")?,
        valid_from: column(row, 1, "merchants.valid_from")?,
        name: column(row, 2, "merchants.name")?,
        settlement_currency: Currency::from_code(currency.trim())
            .map_err(|e| decode("merchants.settlement_currency", e.to_string()))?,
        fee_bps: column(row, 4, "merchants.fee_bps")?,
        fee_fixed: column(row, 5, "merchants.fee_fixed")?,
        status: MerchantStatus::parse(status)
            .ok_or_else(|| decode("merchants.status", status.to_owned()))?,
        tolerance_abs: column(row, 7, "merchants.tolerance_abs")?,
        tolerance_rel: column(row, 8, "merchants.tolerance_rel")?,
        settlement_deadline: interval(9, "merchants.settlement_deadline")?,
        payment_deadline: interval(10, "merchants.payment_deadline")?,
    })
}

/// An fx_rates row (base, quote, valid_from, rate), validated.
fn rate_row(row: &PgRow) -> Result<FxRate, sqlx::Error> {
    let base: &str = column(row, 0, "fx_rates.base_currency")?;
    let quote: &str = column(row, 1, "fx_rates.quote_currency")?;
    Ok(FxRate {
        base: Currency::from_code(base.trim())
            .map_err(|e| decode("fx_rates.base_currency", e.to_string()))?,
        quote: Currency::from_code(quote.trim())
            .map_err(|e| decode("fx_rates.quote_currency", e.to_string()))?,
        valid_from: column(row, 2, "fx_rates.valid_from")?,
        rate: column(row, 3, "fx_rates.rate")?,
    })
}

/// Fields as a JSON object, for `reference_corrections`.
fn fields_json(fields: &VersionFields) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone().into()))
            .collect(),
    )
}

/// Sorts a load's versions into new, unchanged and changed ones against the stored versions
/// with the same keys.
fn classify<'v, T, K: Eq + std::hash::Hash>(
    versions: &'v [T],
    key: impl Fn(&T) -> K,
    stored: &HashMap<K, T>,
    fields: impl Fn(&T) -> VersionFields,
    describe_key: impl Fn(&T) -> String,
) -> (Vec<&'v T>, u64, Vec<(Conflict, &'v T)>) {
    let (mut new, mut unchanged, mut changed) = (Vec::new(), 0, Vec::new());
    for (index, v) in versions.iter().enumerate() {
        match stored.get(&key(v)) {
            None => new.push(v),
            Some(old) => {
                let changes = differences(&fields(old), &fields(v));
                if changes.is_empty() {
                    unchanged += 1;
                } else {
                    let key = describe_key(v);
                    changed.push((
                        Conflict {
                            file: 0,
                            index,
                            key,
                            changes,
                        },
                        v,
                    ));
                }
            }
        }
    }
    (new, unchanged, changed)
}

/// Records one correction and queues the references it affects; returns how many it queued.
/// `affected` selects `payment_reference`s; it sees the window in the CTE `c` and `extra`
/// bound from `$10` on.
#[allow(clippy::too_many_arguments)]
async fn record_correction(
    tx: &mut PgConnection,
    table: &str,
    key: serde_json::Value,
    previous: &VersionFields,
    corrected: &VersionFields,
    (valid_from, valid_until): (DateTime<Utc>, Option<DateTime<Utc>>),
    correction: &Correction,
    (affected, extra): (&str, &[&str]),
) -> Result<u64, sqlx::Error> {
    // One statement: the correction row, the references it affects, and the queue entries
    // (a reference queued by an earlier correction is re-queued by this one, so the service
    // evaluates it only with a snapshot that includes this one too).
    let sql = format!(
        "WITH c AS (
            INSERT INTO reference_corrections (table_name, version_key, previous, corrected,
                   valid_from, valid_until, reason, corrected_by, source)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            RETURNING id, valid_from, valid_until
         ), affected AS ({affected}), q AS (
            INSERT INTO reference_reevaluations (payment_reference, correction_id)
            SELECT a.payment_reference, c.id FROM affected a, c
            ON CONFLICT (payment_reference) DO UPDATE
               SET correction_id = excluded.correction_id, queued_by = excluded.queued_by,
                   queued_at = excluded.queued_at
            RETURNING 1
         )
         SELECT count(*) FROM q"
    );
    let mut query = sqlx::query_scalar::<_, i64>(&sql)
        .bind(table)
        .bind(key)
        .bind(fields_json(previous))
        .bind(fields_json(corrected))
        .bind(valid_from)
        .bind(valid_until)
        .bind(correction.reason.trim())
        .bind(correction.by.trim())
        .bind(correction.source.as_deref());
    for value in extra {
        query = query.bind(*value);
    }
    let queued = query.fetch_one(&mut *tx).await?;
    Ok(queued.max(0) as u64)
}

impl Store {
    /// Every version of every merchant and rate (tools; the cache streams instead, see
    /// [`Store::load_reference_into`]).
    pub async fn load_reference(&self) -> Result<(Vec<MerchantVersion>, Vec<FxRate>), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut merchants = Vec::new();
        each_merchant_version(&mut conn, |m| merchants.push(m.to_version())).await?;
        let mut rates = Vec::new();
        each_rate(&mut conn, |r| rates.push(r)).await?;
        Ok((merchants, rates))
    }

    /// Streams every version of every merchant and rate into `builder` (cache loads). Rows
    /// are decoded one at a time, their strings borrowed from the row, so a load holds the
    /// packed snapshot and one row, never the whole table as rows.
    ///
    /// Both tables are read in one REPEATABLE READ transaction, whose PostgreSQL snapshot is
    /// returned (`pg_snapshot` as text): it says which transactions' changes the copy
    /// includes, so [`Store::reevaluate_corrected`] only takes the corrections it contains.
    pub async fn load_reference_into(
        &self,
        builder: &mut SnapshotBuilder,
    ) -> Result<String, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        // The first statement takes the transaction's snapshot; it is the one reported.
        let seen: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&mut *tx)
            .await?;
        each_merchant_version(&mut tx, |m| builder.push_merchant(m)).await?;
        each_rate(&mut tx, |r| builder.push_rate(r)).await?;
        tx.commit().await?;
        Ok(seen)
    }

    /// Loads merchant versions in one transaction: new ones are inserted, ones identical to
    /// the stored version with the same merchant and start are left alone, and one that
    /// differs fails the whole load with [`LoadError::Conflicts`] unless `correction` is
    /// given, which updates it, records it and queues the affected references (module doc).
    pub async fn load_merchants(
        &self,
        versions: &[MerchantVersion],
        correction: Option<&Correction>,
    ) -> Result<LoadSummary, LoadError> {
        let mut tx = self.pool.begin().await?;
        let summary = merchants_in(&mut tx, versions, correction).await?;
        tx.commit().await?;
        Ok(summary)
    }

    /// Loads FX rate versions in one transaction, by the rules of [`Store::load_merchants`].
    pub async fn load_rates(
        &self,
        rates: &[FxRate],
        correction: Option<&Correction>,
    ) -> Result<LoadSummary, LoadError> {
        let mut tx = self.pool.begin().await?;
        let summary = rates_in(&mut tx, rates, correction).await?;
        tx.commit().await?;
        Ok(summary)
    }

    /// Loads several files' versions in ONE transaction, by the rules of
    /// [`Store::load_merchants`]: one conflict in any file loads nothing of any of them. The
    /// conflicts of every file are reported, each with [`Conflict::file`] set.
    pub async fn load_reference_files(
        &self,
        files: &[&ReferenceFile],
        correction: Option<&Correction>,
    ) -> Result<Vec<LoadSummary>, LoadError> {
        let mut tx = self.pool.begin().await?;
        // Both tables at once and always in this order, so two loads of several files
        // cannot deadlock on each other's locks.
        sqlx::query("LOCK TABLE merchants, fx_rates IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let mut summaries = Vec::with_capacity(files.len());
        let mut conflicts = Vec::new();
        for (file, content) in files.iter().enumerate() {
            let result = match content {
                ReferenceFile::Merchants(m) => merchants_in(&mut tx, m, correction).await,
                ReferenceFile::Rates(r) => rates_in(&mut tx, r, correction).await,
            };
            match result {
                Ok(summary) => summaries.push(summary),
                // Keep going so the operator sees every conflict of the load at once.
                Err(LoadError::Conflicts(found)) => {
                    conflicts.extend(found.into_iter().map(|c| Conflict { file, ..c }))
                }
                Err(e) => return Err(e),
            }
        }
        if !conflicts.is_empty() {
            return Err(LoadError::Conflicts(conflicts));
        }
        tx.commit().await?;
        Ok(summaries)
    }
}

/// [`Store::load_merchants`] inside `tx`.
async fn merchants_in(
    tx: &mut PgConnection,
    versions: &[MerchantVersion],
    correction: Option<&Correction>,
) -> Result<LoadSummary, LoadError> {
    let mut summary = LoadSummary::default();
    if versions.is_empty() {
        return Ok(summary);
    }
    // Compare-then-write must not race another load of the same keys. This mode
    // excludes other writers of the table (and itself), not its readers: the caches
    // keep loading while a load runs.
    sqlx::query("LOCK TABLE merchants IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let ids: Vec<&str> = versions.iter().map(|m| m.merchant_id.as_str()).collect();
    let starts: Vec<DateTime<Utc>> = versions.iter().map(|m| m.valid_from).collect();
    let rows = sqlx::query(&format!(
        "SELECT {MERCHANT_COLUMNS} FROM merchants
              WHERE (merchant_id, valid_from) IN
                    (SELECT * FROM UNNEST($1::text[], $2::timestamptz[]))"
    ))
    .bind(&ids)
    .bind(&starts)
    .fetch_all(&mut *tx)
    .await?;
    let mut stored = HashMap::with_capacity(rows.len());
    for row in &rows {
        let m = merchant_row(row)?.to_version();
        stored.insert((m.merchant_id.clone(), m.valid_from), m);
    }
    let (new, unchanged, changed) = classify(
        versions,
        |m| (m.merchant_id.clone(), m.valid_from),
        &stored,
        MerchantVersion::fields,
        MerchantVersion::describe_key,
    );
    summary.unchanged = unchanged;
    if !changed.is_empty() && correction.is_none() {
        return Err(LoadError::Conflicts(
            changed.into_iter().map(|(c, _)| c).collect(),
        ));
    }
    // New versions first: they bound the windows of the corrected ones.
    summary.inserted = insert_merchants(tx, &new).await?;
    let Some(correction) = correction else {
        return Ok(summary);
    };
    for (_, m) in changed {
        let old = &stored[&(m.merchant_id.clone(), m.valid_from)];
        write_merchant(tx, m, true).await?;
        let valid_until: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT min(valid_from) FROM merchants WHERE merchant_id = $1 AND valid_from > $2",
        )
        .bind(&m.merchant_id)
        .bind(m.valid_from)
        .fetch_one(&mut *tx)
        .await?;
        summary.queued += record_correction(
            tx,
            "merchants",
            serde_json::json!({ "merchant_id": m.merchant_id, "valid_from": m.valid_from }),
            &old.fields(),
            &m.fields(),
            (m.valid_from, valid_until),
            correction,
            (
                "SELECT payment_reference FROM payment_events, c
                  WHERE merchant_id = $10 AND event_time >= c.valid_from
                    AND (c.valid_until IS NULL OR event_time < c.valid_until)
                 UNION
                 SELECT payment_reference FROM settlement_lines, c
                  WHERE merchant_id = $10 AND event_time >= c.valid_from
                    AND (c.valid_until IS NULL OR event_time < c.valid_until)",
                &[&m.merchant_id],
            ),
        )
        .await?;
        summary.corrected += 1;
    }
    Ok(summary)
}

/// [`Store::load_rates`] inside `tx`.
async fn rates_in(
    tx: &mut PgConnection,
    rates: &[FxRate],
    correction: Option<&Correction>,
) -> Result<LoadSummary, LoadError> {
    let mut summary = LoadSummary::default();
    if rates.is_empty() {
        return Ok(summary);
    }
    // See load_merchants: serializes loads, not readers.
    sqlx::query("LOCK TABLE fx_rates IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let bases: Vec<&str> = rates.iter().map(|r| r.base.code()).collect();
    let quotes: Vec<&str> = rates.iter().map(|r| r.quote.code()).collect();
    let starts: Vec<DateTime<Utc>> = rates.iter().map(|r| r.valid_from).collect();
    let rows = sqlx::query(
        "SELECT base_currency, quote_currency, valid_from, rate FROM fx_rates
              WHERE (base_currency, quote_currency, valid_from) IN
                    (SELECT b::char(3), q::char(3), v
                       FROM UNNEST($1::text[], $2::text[], $3::timestamptz[]) AS u(b, q, v))",
    )
    .bind(&bases)
    .bind(&quotes)
    .bind(&starts)
    .fetch_all(&mut *tx)
    .await?;
    let mut stored = HashMap::with_capacity(rows.len());
    for row in &rows {
        let r = rate_row(row)?;
        stored.insert((r.base, r.quote, r.valid_from), r);
    }
    let (new, unchanged, changed) = classify(
        rates,
        |r| (r.base, r.quote, r.valid_from),
        &stored,
        FxRate::fields,
        FxRate::describe_key,
    );
    summary.unchanged = unchanged;
    if !changed.is_empty() && correction.is_none() {
        return Err(LoadError::Conflicts(
            changed.into_iter().map(|(c, _)| c).collect(),
        ));
    }
    summary.inserted = insert_rates(tx, &new).await?;
    if let Some(correction) = correction {
        for (_, r) in changed {
            let old = &stored[&(r.base, r.quote, r.valid_from)];
            sqlx::query(
                "UPDATE fx_rates SET rate = $4, loaded_at = now()
                      WHERE base_currency = $1 AND quote_currency = $2 AND valid_from = $3",
            )
            .bind(r.base.code())
            .bind(r.quote.code())
            .bind(r.valid_from)
            .bind(r.rate)
            .execute(&mut *tx)
            .await?;
            let valid_until: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT min(valid_from) FROM fx_rates
                      WHERE base_currency = $1 AND quote_currency = $2 AND valid_from > $3",
            )
            .bind(r.base.code())
            .bind(r.quote.code())
            .bind(r.valid_from)
            .fetch_one(&mut *tx)
            .await?;
            summary.queued += record_correction(
                tx,
                "fx_rates",
                serde_json::json!({
                    "base_currency": r.base.code(),
                    "quote_currency": r.quote.code(),
                    "valid_from": r.valid_from,
                }),
                &old.fields(),
                &r.fields(),
                (r.valid_from, valid_until),
                correction,
                (
                    "SELECT DISTINCT e.payment_reference
                       FROM payment_events e
                       JOIN reconciliation_items i USING (payment_reference), c
                      WHERE e.currency IN ($10, $11) AND i.currency IN ($10, $11)
                        AND e.currency <> i.currency
                        AND e.event_time >= c.valid_from
                        AND (c.valid_until IS NULL OR e.event_time < c.valid_until)",
                    &[r.base.code(), r.quote.code()],
                ),
            )
            .await?;
            summary.corrected += 1;
        }
    }
    Ok(summary)
}

/// Calls `f` with each merchants row, validated, in no particular order.
async fn each_merchant_version(
    conn: &mut PgConnection,
    mut f: impl FnMut(MerchantVersionRef<'_>) + Send,
) -> Result<(), sqlx::Error> {
    let sql = format!("SELECT {MERCHANT_COLUMNS} FROM merchants");
    let mut rows = sqlx::query(&sql).fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        f(merchant_row(&row)?);
    }
    Ok(())
}

/// Calls `f` with each fx_rates row, validated, in no particular order.
async fn each_rate(
    conn: &mut PgConnection,
    mut f: impl FnMut(FxRate) + Send,
) -> Result<(), sqlx::Error> {
    let mut rows =
        sqlx::query("SELECT base_currency, quote_currency, valid_from, rate FROM fx_rates")
            .fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        f(rate_row(&row)?);
    }
    Ok(())
}

async fn insert_merchants(
    tx: &mut PgConnection,
    versions: &[&MerchantVersion],
) -> Result<u64, sqlx::Error> {
    for m in versions {
        write_merchant(tx, m, false).await?;
    }
    Ok(versions.len() as u64)
}

/// Inserts `m`, or (`update`) overwrites the stored version with its key.
async fn write_merchant(
    tx: &mut PgConnection,
    m: &MerchantVersion,
    update: bool,
) -> Result<(), sqlx::Error> {
    let sql = if update {
        "UPDATE merchants SET name = $3, settlement_currency = $4, fee_bps = $5, fee_fixed = $6,
                status = $7, tolerance_abs = $8, tolerance_rel = $9, settlement_deadline = $10,
                payment_deadline = $11, loaded_at = now()
          WHERE merchant_id = $1 AND valid_from = $2"
    } else {
        "INSERT INTO merchants (merchant_id, valid_from, name, settlement_currency, fee_bps,
                fee_fixed, status, tolerance_abs, tolerance_rel, settlement_deadline, payment_deadline)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    };
    sqlx::query(sql)
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
        .await?;
    Ok(())
}

async fn insert_rates(tx: &mut PgConnection, rates: &[&FxRate]) -> Result<u64, sqlx::Error> {
    for r in rates {
        sqlx::query(
            "INSERT INTO fx_rates (base_currency, quote_currency, valid_from, rate)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(r.base.code())
        .bind(r.quote.code())
        .bind(r.valid_from)
        .bind(r.rate)
        .execute(&mut *tx)
        .await?;
    }
    Ok(rates.len() as u64)
}
