//! The payout items: locked (inserted when new) in key order, written with their history and
//! outbox rows in one statement; the due queue; the records' sums per item (the rebuild and
//! the verification).

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::{PgConnection, Postgres, Transaction};

use crate::reconcile::payout::{PayoutKey, PayoutState, PayoutStatus, PayoutVerdict};

/// Items the watermark made due (kind, key), oldest deadline first; locked ones are another
/// transaction's to judge.
pub async fn due_items(
    tx: &mut Transaction<'_, Postgres>,
    watermark: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT kind, key FROM payout_items
          WHERE status = 'PAYOUT_PENDING' AND deadline < $1
          ORDER BY deadline LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(watermark)
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// Inserts an item for each key that has none and locks every one, in key order, in one
/// statement; returns the stored status and state of those that existed (`None`: a state
/// that does not parse).
pub async fn lock_items<'k>(
    tx: &mut Transaction<'_, Postgres>,
    keys: impl Iterator<Item = &'k PayoutKey>,
) -> Result<HashMap<PayoutKey, (Option<PayoutStatus>, Option<PayoutState>)>, sqlx::Error> {
    let (kinds, names): (Vec<&str>, Vec<&str>) = keys.map(|k| (k.kind(), k.key())).unzip();
    // A new item is a placeholder until the write below (same transaction). Existing rows
    // are locked by the no-op update; `xmax = 0` tells the inserted ones.
    let rows: Vec<(String, String, bool, String, String)> = sqlx::query_as(
        "INSERT INTO payout_items AS i (kind, key, business_date, status, settlement_lines,
                payouts, reason, watermark, state, evaluations)
         SELECT k.kind, k.key, DATE '1970-01-01', 'PAYOUT_PENDING', 0, 0, '', '-infinity',
                '{}', 0
           FROM UNNEST($1::text[], $2::text[]) AS k(kind, key)
          ORDER BY k.kind, k.key
         ON CONFLICT (kind, key) DO UPDATE SET evaluations = i.evaluations
         RETURNING i.kind, i.key, (i.xmax = 0), i.status, i.state::text",
    )
    .bind(&kinds)
    .bind(&names)
    .fetch_all(&mut **tx)
    .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for (kind, key, inserted, status, state) in rows {
        if inserted {
            continue;
        }
        let key = PayoutKey::parse(&kind, key)
            .ok_or_else(|| sqlx::Error::Decode(format!("payout item kind {kind:?}").into()))?;
        let state = serde_json::from_str::<PayoutState>(&state).ok();
        out.insert(key, (PayoutStatus::parse(&status), state));
    }
    Ok(out)
}

/// Column vectors of the items written, and of their history rows.
#[derive(Default)]
pub struct ItemRows {
    kinds: Vec<&'static str>,
    keys: Vec<String>,
    merchants: Vec<Option<String>>,
    accounts: Vec<Option<String>>,
    dates: Vec<NaiveDate>,
    currencies: Vec<Option<&'static str>>,
    statuses: Vec<&'static str>,
    expected: Vec<Option<Decimal>>,
    paid: Vec<Option<Decimal>>,
    differences: Vec<Option<Decimal>>,
    lines: Vec<i32>,
    payouts: Vec<i32>,
    deadlines: Vec<Option<DateTime<Utc>>>,
    reasons: Vec<String>,
    states: Vec<String>,
    from: Vec<Option<&'static str>>,
    changed: Vec<bool>,
    publish: Vec<bool>,
    causes: Vec<&'static str>,
    caused_by: Vec<String>,
}

impl ItemRows {
    /// One judged item: its key, state, verdict, prior status and (changed, publish,
    /// cause, caused-by ids joined by U+001F).
    pub fn push(
        &mut self,
        key: &PayoutKey,
        state: &PayoutState,
        v: &PayoutVerdict,
        from: Option<PayoutStatus>,
        (changed, publish, cause, caused_by): (bool, bool, &'static str, String),
    ) {
        let expected = state.expected();
        let paid = state.paid_total();
        self.kinds.push(key.kind());
        self.keys.push(key.key().to_owned());
        self.merchants.push(state.merchant_id.clone());
        self.accounts.push(state.account_id.clone());
        self.dates.push(
            state
                .business_date()
                .unwrap_or_else(|| DateTime::<Utc>::UNIX_EPOCH.date_naive()),
        );
        self.currencies
            .push(expected.or(paid).map(|(c, _)| c.code()));
        self.statuses.push(v.status.as_str());
        self.expected.push(expected.map(|(_, a)| a));
        self.paid.push(paid.map(|(_, a)| a));
        self.differences.push(v.difference);
        self.lines.push(state.lines.try_into().unwrap_or(i32::MAX));
        self.payouts
            .push(state.payouts.try_into().unwrap_or(i32::MAX));
        self.deadlines.push(v.deadline);
        self.reasons.push(v.reason.clone());
        self.states
            .push(serde_json::to_string(state).expect("a payout state serializes"));
        self.from.push(from.map(|s| s.as_str()));
        self.changed.push(changed);
        self.publish.push(publish);
        self.causes.push(cause);
        self.caused_by.push(caused_by);
    }
}

/// Writes every judged item, a history row per status change and an outbox row per
/// exception opened or resolved, in one statement.
pub async fn write(
    tx: &mut Transaction<'_, Postgres>,
    (watermark, group, instance): (DateTime<Utc>, &str, &str),
    r: &ItemRows,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH c AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::date[],
                   $6::text[], $7::text[], $8::numeric[], $9::numeric[], $10::numeric[],
                   $11::int[], $12::int[], $13::timestamptz[], $14::text[], $15::text[],
                   $16::text[], $17::bool[], $18::bool[], $19::text[], $20::text[])
                   WITH ORDINALITY
                AS c(kind, key, merchant_id, account_id, business_date, currency, status,
                     expected, paid, difference, lines, payouts, deadline, reason, state,
                     from_status, changed, publish, cause, caused_by, n)
         ), u AS (
            UPDATE payout_items i
               SET merchant_id = c.merchant_id, account_id = c.account_id,
                   business_date = c.business_date, currency = c.currency, status = c.status,
                   expected_net = c.expected, paid = c.paid, difference = c.difference,
                   settlement_lines = c.lines, payouts = c.payouts, deadline = c.deadline,
                   reason = c.reason, watermark = GREATEST(i.watermark, $21),
                   evaluations = i.evaluations + 1, state = c.state,
                   updated_at = now()
              FROM c
             WHERE i.kind = c.kind AND i.key = c.key
            RETURNING 1
         ), h AS (
            INSERT INTO payout_history (kind, key, from_status, to_status, cause, caused_by,
                   watermark, reason, consumer_group, evaluated_by)
            SELECT kind, key, from_status, status, cause,
                   CASE WHEN caused_by = '' THEN '{}'::text[]
                        ELSE string_to_array(caused_by, chr(31)) END,
                   $21, reason, $22, $23
              FROM c WHERE changed ORDER BY n
            RETURNING id, kind, key
         ), o AS (
            INSERT INTO exceptions_outbox (leg, history_id, payment_reference, merchant_id,
                   account_id, from_status, to_status, opened, currency, expected_gross,
                   settled_gross, reason, watermark)
            SELECT 'PAYOUT', h.id, c.key, coalesce(c.merchant_id, ''), c.account_id,
                   c.from_status, c.status,
                   c.status NOT IN ('PAYOUT_MATCHED', 'PAYOUT_PENDING'), c.currency,
                   c.expected, c.paid, c.reason, $21
              FROM h JOIN c ON c.kind = h.kind AND c.key = h.key
             WHERE c.publish
             ORDER BY h.id
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM o)",
    )
    .bind(&r.kinds)
    .bind(&r.keys)
    .bind(&r.merchants)
    .bind(&r.accounts)
    .bind(&r.dates)
    .bind(&r.currencies)
    .bind(&r.statuses)
    .bind(&r.expected)
    .bind(&r.paid)
    .bind(&r.differences)
    .bind(&r.lines)
    .bind(&r.payouts)
    .bind(&r.deadlines)
    .bind(&r.reasons)
    .bind(&r.states)
    .bind(&r.from)
    .bind(&r.changed)
    .bind(&r.publish)
    .bind(&r.causes)
    .bind(&r.caused_by)
    .bind(watermark)
    .bind(group)
    .bind(instance)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The payout items' per-currency sums recomputed from the records, as (key, currency) rows.
pub type LineAgg = (
    String,
    String,
    i64,
    Decimal,
    DateTime<Utc>,
    NaiveDate,
    String,
);
pub type PayoutAgg = (
    String,
    String,
    String,
    i64,
    Decimal,
    DateTime<Utc>,
    NaiveDate,
    String,
);

/// The records' sums per payout item: settlement lines per (batch, currency) of `batches`,
/// and statement lines per (kind, key, currency) of `batches` or of `lines` (unreferenced
/// statement lines); `None`: every item.
pub async fn record_sums(
    conn: &mut PgConnection,
    batches: &Option<Vec<&str>>,
    lines_only: &Option<Vec<&str>>,
) -> Result<(Vec<LineAgg>, Vec<PayoutAgg>), sqlx::Error> {
    let lines: Vec<LineAgg> = sqlx::query_as(
        "SELECT batch_id, currency, count(*), sum(net), max(event_time), min(settlement_date),
                min(merchant_id COLLATE \"C\")
           FROM settlement_lines WHERE $1::text[] IS NULL OR batch_id = ANY($1) GROUP BY 1, 2",
    )
    .bind(batches)
    .fetch_all(&mut *conn)
    .await?;
    let payouts: Vec<PayoutAgg> = sqlx::query_as(
        "SELECT CASE WHEN batch_reference IS NULL THEN 'LINE' ELSE 'BATCH' END,
                coalesce(batch_reference, statement_line_id), currency, count(*), sum(amount),
                min(event_time), min(value_date), min(account_id COLLATE \"C\")
           FROM bank_payouts
          WHERE $1::text[] IS NULL OR batch_reference = ANY($1)
             OR (batch_reference IS NULL AND statement_line_id = ANY($2))
          GROUP BY 1, 2, 3",
    )
    .bind(batches)
    .bind(lines_only)
    .fetch_all(&mut *conn)
    .await?;
    Ok((lines, payouts))
}
