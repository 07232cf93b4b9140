//! The reconciliation items of the payment leg: locking and reading them, writing verdicts,
//! their history and outbox rows, the daily totals, and the queues the sweeps take from.
//! SQL only: the engine ([`crate::engine`]) decides what to write.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use crate::reconcile::{Bucket, Cause, DAILY_COLUMNS, DailyRow, Evaluation, ItemState, Status};

/// EXPECTED items whose deadline the watermark passed, oldest first, skipping items another
/// transaction holds (it evaluates them itself).
pub async fn due_items(
    tx: &mut Transaction<'_, Postgres>,
    watermark: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT payment_reference FROM reconciliation_items
          WHERE status = 'EXPECTED' AND deadline < $1
          ORDER BY deadline LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(watermark)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// MISSING_REFERENCE items after `after` in key order (re-evaluation after a reference-data
/// change), skipping locked ones.
pub async fn missing_reference_items(
    tx: &mut Transaction<'_, Postgres>,
    after: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT payment_reference FROM reconciliation_items
          WHERE status = 'MISSING_REFERENCE' AND payment_reference > $1
          ORDER BY payment_reference LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// Takes (deletes) up to `limit` references a reference-data correction queued, in key order,
/// skipping entries another transaction holds, and only those queued by a transaction that
/// `seen` (the `pg_snapshot` the cache was loaded in) includes: evaluated with a cache from
/// before the correction, an entry would be used up without the correction applying. The
/// others wait for the reload the correction's NOTIFY triggers.
pub async fn take_corrected_items(
    tx: &mut Transaction<'_, Postgres>,
    seen: &str,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "DELETE FROM reference_reevaluations
          WHERE payment_reference IN (
                SELECT payment_reference FROM reference_reevaluations
                 WHERE pg_visible_in_snapshot(queued_by, $1::pg_snapshot)
                 ORDER BY payment_reference LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING payment_reference",
    )
    .bind(seen)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// An item as stored (locked), before an evaluation.
#[derive(Debug)]
pub struct StoredItem {
    pub status: Status,
    pub bucket: Bucket,
    /// The watermark the item was last judged at: it is never judged at a lower one, so a
    /// partition that becomes active again with older event times cannot reopen a deadline.
    pub watermark: DateTime<Utc>,
    /// `None`: judged before items kept their state; re-read once.
    pub state: Option<ItemState>,
    pub reason: String,
    pub deadline: Option<DateTime<Utc>>,
}

/// An item's stored row, locked.
type PriorRow = (
    String,
    String,
    String,
    NaiveDate,
    String,
    DateTime<Utc>,
    Option<String>,
    String,
    Option<DateTime<Utc>>,
);

/// Locks the stored items of `refs` (in key order, so concurrent transactions cannot
/// deadlock on them) and reads their state.
pub async fn lock_items(
    tx: &mut Transaction<'_, Postgres>,
    refs: &[&str],
) -> Result<HashMap<String, StoredItem>, sqlx::Error> {
    let rows: Vec<PriorRow> = sqlx::query_as(
        "SELECT payment_reference, status, merchant_id, business_date, currency, watermark,
                state::text, reason, deadline
           FROM reconciliation_items WHERE payment_reference = ANY($1)
          ORDER BY payment_reference FOR UPDATE",
    )
    .bind(refs)
    .fetch_all(&mut **tx)
    .await?;
    let mut prior = HashMap::with_capacity(rows.len());
    for (r, status, merchant_id, date, cur, watermark, state, reason, deadline) in rows {
        let status = Status::parse(&status)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown status {status}").into()))?;
        // A state that does not parse (written by another release) is rebuilt from records.
        let state = state.and_then(|s| serde_json::from_str::<ItemState>(&s).ok());
        let bucket = Bucket {
            merchant_id,
            date,
            currency: super::records::currency(&cur)?,
        };
        let p = StoredItem {
            status,
            bucket,
            watermark,
            state,
            reason,
            deadline,
        };
        prior.insert(r, p);
    }
    Ok(prior)
}

/// Column vectors of items' new rows: the verdict's derived columns (views and reports read
/// them) and the state.
#[derive(Default)]
pub struct ItemRows<'a> {
    refs: Vec<&'a str>,
    merchants: Vec<&'a str>,
    dates: Vec<NaiveDate>,
    currencies: Vec<&'static str>,
    statuses: Vec<&'static str>,
    expected: [Vec<Option<Decimal>>; 3],
    settled_currency: Vec<Option<&'static str>>,
    settled: [Vec<Option<Decimal>>; 3],
    event_counts: Vec<i32>,
    line_counts: Vec<i32>,
    deadlines: Vec<Option<DateTime<Utc>>>,
    reasons: Vec<&'a str>,
    watermarks: Vec<DateTime<Utc>>,
    states: Vec<String>,
}

impl<'a> ItemRows<'a> {
    /// One item's new row: its verdict, state, daily bucket and the watermark it was judged
    /// at.
    pub fn push(
        &mut self,
        reference: &'a str,
        (e, state, bucket, watermark): (&'a Evaluation, &ItemState, &'a Bucket, DateTime<Utc>),
    ) {
        self.refs.push(reference);
        self.merchants.push(&bucket.merchant_id);
        self.dates.push(bucket.date);
        self.currencies.push(bucket.currency.code());
        self.statuses.push(e.status.as_str());
        let [eg, ef, en] = &mut self.expected;
        eg.push(e.expected.map(|a| a.gross));
        ef.push(e.expected.map(|a| a.fee));
        en.push(e.expected.map(|a| a.net));
        self.settled_currency
            .push(e.settled.map(|a| a.currency.code()));
        let [sg, sf, sn] = &mut self.settled;
        sg.push(e.settled.map(|a| a.gross));
        sf.push(e.settled.map(|a| a.fee));
        sn.push(e.settled.map(|a| a.net));
        self.event_counts
            .push(i32::try_from(state.events).unwrap_or(i32::MAX));
        self.line_counts
            .push(i32::try_from(state.lines).unwrap_or(i32::MAX));
        self.deadlines.push(e.deadline);
        self.reasons.push(&e.reason);
        self.watermarks.push(watermark);
        self.states
            .push(serde_json::to_string(state).expect("a state always serializes"));
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// Binds the columns as `$first`.. in [`ITEM_COLUMNS`] order.
    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        let [eg, ef, en] = &self.expected;
        let [sg, sf, sn] = &self.settled;
        q.bind(&self.refs)
            .bind(&self.merchants)
            .bind(&self.dates)
            .bind(&self.currencies)
            .bind(&self.statuses)
            .bind(eg)
            .bind(ef)
            .bind(en)
            .bind(&self.settled_currency)
            .bind(sg)
            .bind(sf)
            .bind(sn)
            .bind(&self.event_counts)
            .bind(&self.line_counts)
            .bind(&self.deadlines)
            .bind(&self.reasons)
            .bind(&self.watermarks)
            .bind(&self.states)
    }
}

/// `UNNEST` of [`ItemRows`] bound from `$n`: (reference, merchant_id, business_date,
/// currency, status, eg, ef, en, sc, sg, sf, sn, events, lines, deadline, reason, watermark,
/// state).
fn item_rows(n: usize) -> String {
    let types = [
        "text",
        "text",
        "date",
        "text",
        "text",
        "numeric",
        "numeric",
        "numeric",
        "text",
        "numeric",
        "numeric",
        "numeric",
        "int",
        "int",
        "timestamptz",
        "text",
        "timestamptz",
        "text",
    ];
    let params: Vec<String> = (types.iter().enumerate())
        .map(|(i, t)| format!("${}::{t}[]", n + i))
        .collect();
    format!(
        "UNNEST({}) AS u(reference, merchant_id, business_date, currency, status, eg, ef, en,
                        sc, sg, sf, sn, events, lines, deadline, reason, watermark, state)",
        params.join(", ")
    )
}

/// Inserts new items; returns the references inserted (the others exist already).
pub async fn insert_items(
    tx: &mut Transaction<'_, Postgres>,
    rows: &ItemRows<'_>,
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let sql = format!(
        "INSERT INTO reconciliation_items (payment_reference, merchant_id, business_date,
                currency, status, expected_gross, expected_fee, expected_net, settled_currency,
                settled_gross, settled_fee, settled_net, payment_events, settlement_lines,
                deadline, reason, watermark, evaluations, state)
         SELECT reference, merchant_id, business_date, currency, status, eg, ef, en, sc, sg, sf,
                sn, events, lines, deadline, reason, watermark, 1, state
           FROM {}
          ORDER BY reference
         ON CONFLICT (payment_reference) DO NOTHING
         RETURNING payment_reference",
        item_rows(1)
    );
    let inserted: Vec<String> = rows
        .bind(sqlx::query(&sql))
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .map(|row| sqlx::Row::get(&row, 0))
        .collect();
    Ok(inserted.into_iter().collect())
}

/// Writes the changed items, their history rows and outbox rows in one statement.
/// `(watermark, group, instance)`: who evaluated, at which watermark (recorded in history).
pub async fn write_changes(
    tx: &mut Transaction<'_, Postgres>,
    (watermark, group, instance): (DateTime<Utc>, &str, &str),
    updates: ItemRows<'_>,
    changes: Changes<'_>,
) -> Result<(), sqlx::Error> {
    if updates.is_empty() && changes.refs.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "WITH u AS (
            UPDATE reconciliation_items i
               SET merchant_id = u.merchant_id, business_date = u.business_date,
                   currency = u.currency, status = u.status, expected_gross = u.eg,
                   expected_fee = u.ef, expected_net = u.en, settled_currency = u.sc,
                   settled_gross = u.sg, settled_fee = u.sf, settled_net = u.sn,
                   payment_events = u.events, settlement_lines = u.lines,
                   deadline = u.deadline, reason = u.reason,
                   watermark = GREATEST(i.watermark, u.watermark),
                   evaluations = i.evaluations + 1, updated_at = now(),
                   state = u.state
              FROM {items}
             WHERE i.payment_reference = u.reference
            RETURNING 1
         ), c AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                   $6::text[], $7::text[], $8::text[], $9::numeric[], $10::numeric[],
                   $11::bool[]) WITH ORDINALITY
                AS c(reference, merchant_id, from_status, to_status, cause, caused_by,
                     reason, currency, expected_gross, settled_gross, publish, n)
         ), h AS (
            INSERT INTO reconciliation_history (payment_reference, from_status, to_status,
                   cause, caused_by, watermark, reason, consumer_group, evaluated_by)
            SELECT reference, from_status, to_status, cause,
                   CASE WHEN caused_by = '' THEN '{{}}'::text[]
                        ELSE string_to_array(caused_by, chr(31)) END,
                   $12, reason, $13, $14
              FROM c ORDER BY n
            RETURNING id, payment_reference
         ), o AS (
            INSERT INTO exceptions_outbox (history_id, payment_reference, merchant_id,
                   from_status, to_status, opened, currency, expected_gross, settled_gross,
                   reason, watermark)
            SELECT h.id, c.reference, c.merchant_id, c.from_status, c.to_status,
                   c.to_status NOT IN ('MATCHED', 'EXPECTED'), c.currency, c.expected_gross,
                   c.settled_gross, c.reason, $12
              FROM h JOIN c ON c.reference = h.payment_reference
             WHERE c.publish
             ORDER BY h.id
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM o)",
        items = item_rows(15)
    );
    let q = sqlx::query(&sql)
        .bind(&changes.refs)
        .bind(&changes.merchants)
        .bind(&changes.from)
        .bind(&changes.to)
        .bind(&changes.causes)
        .bind(&changes.caused_by)
        .bind(&changes.reasons)
        .bind(&changes.currencies)
        .bind(&changes.expected_gross)
        .bind(&changes.settled_gross)
        .bind(&changes.publish)
        .bind(watermark)
        .bind(group)
        .bind(instance);
    updates.bind(q).execute(&mut **tx).await?;
    Ok(())
}
/// Column vectors of the history rows (and which of them go to the outbox).
#[derive(Default)]
pub struct Changes<'a> {
    refs: Vec<&'a str>,
    merchants: Vec<String>,
    from: Vec<Option<&'static str>>,
    to: Vec<&'static str>,
    causes: Vec<&'static str>,
    /// Record ids per change, joined by a unit separator (arrays of arrays must be
    /// rectangular in PostgreSQL).
    caused_by: Vec<String>,
    reasons: Vec<String>,
    currencies: Vec<&'static str>,
    expected_gross: Vec<Option<Decimal>>,
    settled_gross: Vec<Option<Decimal>>,
    publish: Vec<bool>,
}

const ID_SEPARATOR: char = '\u{1f}';

impl<'a> Changes<'a> {
    /// One status change: (from, to, cause, whether it goes to the outbox).
    pub fn push(
        &mut self,
        reference: &'a str,
        (from, to, cause, publish): (Option<Status>, Status, Cause, bool),
        caused_by: &[String],
        e: &Evaluation,
        bucket: &Bucket,
    ) {
        self.refs.push(reference);
        self.merchants.push(bucket.merchant_id.clone());
        self.from.push(from.map(|s| s.as_str()));
        self.to.push(to.as_str());
        self.causes.push(cause.as_str());
        let mut ids = caused_by.to_vec();
        ids.sort();
        ids.dedup();
        self.caused_by.push(ids.join(&ID_SEPARATOR.to_string()));
        self.reasons.push(e.reason.clone());
        self.currencies.push(bucket.currency.code());
        self.expected_gross.push(e.expected.map(|a| a.gross));
        self.settled_gross.push(e.settled.map(|a| a.gross));
        self.publish.push(publish);
    }
}
/// The running-totals shard of the background re-evaluations (a batch's shard is its first
/// partition; these belong to none).
pub const SWEEP_SHARD: &str = "sweep";

/// How far reconciliation is from caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// EXPECTED items whose deadline the watermark passed (judged within a second).
    pub due: i64,
    /// Outbox rows not yet published to the exceptions topic.
    pub unpublished: i64,
}

impl super::Store {
    /// The highest event time applied on any partition of `group` (the lag reporter reads it
    /// before fetching the log ends: `LogEnd::seen_up_to`).
    pub async fn highest_event_time(
        &self,
        group: &str,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT max(max_event_time) FROM consumer_offsets WHERE consumer_group = $1",
        )
        .bind(group)
        .fetch_one(&self.pool)
        .await
    }

    /// How far reconciliation is from caught up at the watermark `wm` (e.g. one judged with
    /// the broker's log ends, as the service judges it).
    pub async fn reconciliation_backlog_at(
        &self,
        wm: DateTime<Utc>,
    ) -> Result<Backlog, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let (due, unpublished): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM reconciliation_items
                      WHERE status = 'EXPECTED' AND deadline < $1)
                  + (SELECT count(*) FROM payout_items
                      WHERE status = 'PAYOUT_PENDING' AND deadline < $1),
                    (SELECT count(*) FROM exceptions_outbox WHERE published_at IS NULL)",
        )
        .bind(wm)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Backlog { due, unpublished })
    }

    /// Seconds since the oldest unpublished outbox row was written; 0 when every row is
    /// published. Reads the pending rows through their partial index.
    pub async fn outbox_oldest_pending_age(&self) -> Result<f64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT coalesce(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0)::float8
               FROM exceptions_outbox WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await
    }

    /// Every outbox seq, published or not (to compare with the exceptions topic).
    pub async fn outbox_seqs(&self) -> Result<Vec<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT seq FROM exceptions_outbox ORDER BY seq")
            .fetch_all(&self.pool)
            .await
    }
}

/// Upserts every row with a non-zero change into `shard` (see the migration
/// `running_state`: a shard no concurrent transaction of another instance writes).
pub async fn write_daily(
    tx: &mut Transaction<'_, Postgres>,
    shard: &str,
    rows: Vec<DailyRow>,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let merchants: Vec<&str> = rows.iter().map(|((m, _, _), _)| m.as_str()).collect();
    let dates: Vec<NaiveDate> = rows.iter().map(|((_, d, _), _)| *d).collect();
    let currencies: Vec<&str> = rows.iter().map(|((_, _, c), _)| *c).collect();
    let columns: Vec<Vec<Decimal>> = (0..DAILY_COLUMNS.len())
        .map(|i| rows.iter().map(|(_, v)| v[i]).collect())
        .collect();
    let names = DAILY_COLUMNS.join(", ");
    let casts: Vec<String> = (0..DAILY_COLUMNS.len())
        .map(|i| format!("${}::numeric[]", i + 5))
        .collect();
    let updates: Vec<String> = DAILY_COLUMNS
        .iter()
        .map(|c| format!("{c} = t.{c} + excluded.{c}"))
        .collect();
    let sql = format!(
        "INSERT INTO merchant_daily_totals_by_shard AS t (shard, merchant_id, business_date,
                currency, {names})
         SELECT $1, * FROM UNNEST($2::text[], $3::date[], $4::text[], {casts})
         ON CONFLICT (merchant_id, business_date, currency, shard) DO UPDATE SET {updates}",
        casts = casts.join(", "),
        updates = updates.join(", "),
    );
    let mut q = sqlx::query(&sql)
        .bind(shard)
        .bind(&merchants)
        .bind(&dates)
        .bind(&currencies);
    for c in &columns {
        q = q.bind(c);
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

/// Every stored partition clock of `group`: (topic, partition, next offset, last record's
/// broker time, highest event time).
pub async fn partition_clocks(
    conn: &mut sqlx::PgConnection,
    group: &str,
) -> Result<
    Vec<(
        String,
        i32,
        i64,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    )>,
    sqlx::Error,
> {
    sqlx::query_as(
        "SELECT topic, partition, next_offset, last_record_time, max_event_time
           FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_all(&mut *conn)
    .await
}
