//! The input records' rows: payment events, settlement lines and bank statement lines
//! (insert-or-ignore by id, with the running totals of the inserting shard in the same
//! statement), read back by id or by payment reference, and the conflicting duplicates kept
//! beside them. Also the one savepoint records are applied under.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use crate::domain::{BankPayout, Currency, PaymentEvent, PaymentEventKind, SettlementLine};

/// Where a record came from in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    /// Index into the batch's topic names; avoids cloning the topic name per record.
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
}

/// A stored row's position in the log: topic, partition, offset.
pub type LogPosition = (String, i32, i64);

/// A decoded record's bytes as they were in the log, kept until the commit so that a record
/// the database refuses, or a conflicting duplicate, can be stored whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub broker_timestamp: Option<DateTime<Utc>>,
}

/// Inserts payment events (ignoring known ids) and adds the inserted ones to the totals,
/// in one statement so the totals can only ever count rows this transaction inserted.
/// Totals are upserted in key order so concurrent batches lock them in the same order.
/// Returns the ids actually inserted.
pub async fn insert_payments(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    shard: &str,
    payments: &[&(PaymentEvent, Source)],
) -> Result<Vec<String>, sqlx::Error> {
    if payments.is_empty() {
        return Ok(Vec::new());
    }
    let n = payments.len();
    let mut ids = Vec::with_capacity(n);
    let mut refs = Vec::with_capacity(n);
    let mut merchants = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut amounts: Vec<Decimal> = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut psp = Vec::with_capacity(n);
    let mut src_topics = Vec::with_capacity(n);
    let mut src_parts = Vec::with_capacity(n);
    let mut src_offsets = Vec::with_capacity(n);
    for (p, s) in payments.iter().copied() {
        ids.push(p.event_id.as_str());
        refs.push(p.payment_reference.as_str());
        merchants.push(p.merchant_id.as_str());
        kinds.push(p.kind.as_str());
        amounts.push(p.amount);
        currencies.push(p.currency.code());
        times.push(p.event_time);
        psp.push(p.psp_reference.as_deref());
        src_topics.push(topics[s.topic].as_str());
        src_parts.push(s.partition);
        src_offsets.push(s.offset);
    }
    sqlx::query_scalar(
        "WITH ins AS (
            INSERT INTO payment_events (event_id, payment_reference, merchant_id, kind, amount,
                   currency, event_time, psp_reference, source_topic, source_partition, source_offset)
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[],
                   $6::text[], $7::timestamptz[], $8::text[], $9::text[], $10::int[], $11::bigint[])
            ON CONFLICT (event_id) DO NOTHING
            RETURNING event_id, merchant_id, currency, kind, amount
         ), totals AS (
            INSERT INTO merchant_payment_totals_by_shard AS t (merchant_id, currency, kind, shard,
                   event_count, amount_sum)
            SELECT merchant_id, currency, kind, $12, count(*), sum(amount)
              FROM ins GROUP BY merchant_id, currency, kind ORDER BY merchant_id, currency, kind
            ON CONFLICT (merchant_id, currency, kind, shard) DO UPDATE
               SET event_count = t.event_count + excluded.event_count,
                   amount_sum = t.amount_sum + excluded.amount_sum
            RETURNING event_count
         )
         SELECT event_id FROM ins",
    )
    .bind(&ids)
    .bind(&refs)
    .bind(&merchants)
    .bind(&kinds)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&times)
    .bind(&psp)
    .bind(&src_topics)
    .bind(&src_parts)
    .bind(&src_offsets)
    .bind(shard)
    .fetch_all(&mut **tx)
    .await
}

/// Same as [`insert_payments`] for settlement lines.
pub async fn insert_settlements(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    shard: &str,
    lines: &[&(SettlementLine, Source)],
) -> Result<Vec<String>, sqlx::Error> {
    if lines.is_empty() {
        return Ok(Vec::new());
    }
    let n = lines.len();
    let mut ids = Vec::with_capacity(n);
    let mut batch_ids = Vec::with_capacity(n);
    let mut refs = Vec::with_capacity(n);
    let mut merchants = Vec::with_capacity(n);
    let mut gross: Vec<Decimal> = Vec::with_capacity(n);
    let mut fee: Vec<Decimal> = Vec::with_capacity(n);
    let mut net: Vec<Decimal> = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    let mut dates: Vec<NaiveDate> = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut src_topics = Vec::with_capacity(n);
    let mut src_parts = Vec::with_capacity(n);
    let mut src_offsets = Vec::with_capacity(n);
    for (l, s) in lines.iter().copied() {
        ids.push(l.line_id.as_str());
        batch_ids.push(l.batch_id.as_str());
        refs.push(l.payment_reference.as_str());
        merchants.push(l.merchant_id.as_str());
        gross.push(l.gross);
        fee.push(l.fee);
        net.push(l.net);
        currencies.push(l.currency.code());
        dates.push(l.settlement_date);
        times.push(l.event_time);
        src_topics.push(topics[s.topic].as_str());
        src_parts.push(s.partition);
        src_offsets.push(s.offset);
    }
    sqlx::query_scalar(
        "WITH ins AS (
            INSERT INTO settlement_lines (line_id, batch_id, payment_reference, merchant_id, gross,
                   fee, net, currency, settlement_date, event_time, source_topic, source_partition,
                   source_offset)
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[],
                   $6::numeric[], $7::numeric[], $8::text[], $9::date[], $10::timestamptz[],
                   $11::text[], $12::int[], $13::bigint[])
            ON CONFLICT (line_id) DO NOTHING
            RETURNING line_id, merchant_id, currency, gross, fee, net
         ), totals AS (
            INSERT INTO merchant_settlement_totals_by_shard AS t (merchant_id, currency, shard,
                   line_count, gross_sum, fee_sum, net_sum)
            SELECT merchant_id, currency, $14, count(*), sum(gross), sum(fee), sum(net)
              FROM ins GROUP BY merchant_id, currency ORDER BY merchant_id, currency
            ON CONFLICT (merchant_id, currency, shard) DO UPDATE
               SET line_count = t.line_count + excluded.line_count,
                   gross_sum = t.gross_sum + excluded.gross_sum,
                   fee_sum = t.fee_sum + excluded.fee_sum,
                   net_sum = t.net_sum + excluded.net_sum
            RETURNING line_count
         )
         SELECT line_id FROM ins",
    )
    .bind(&ids)
    .bind(&batch_ids)
    .bind(&refs)
    .bind(&merchants)
    .bind(&gross)
    .bind(&fee)
    .bind(&net)
    .bind(&currencies)
    .bind(&dates)
    .bind(&times)
    .bind(&src_topics)
    .bind(&src_parts)
    .bind(&src_offsets)
    .bind(shard)
    .fetch_all(&mut **tx)
    .await
}

/// Inserts statement lines (ignoring known ids) and adds the inserted ones to the per-shard
/// daily totals in the same statement. Returns the ids inserted.
pub async fn insert_payouts(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    shard: &str,
    payouts: &[&(BankPayout, Source)],
) -> Result<Vec<String>, sqlx::Error> {
    if payouts.is_empty() {
        return Ok(Vec::new());
    }
    let n = payouts.len();
    let mut ids = Vec::with_capacity(n);
    let mut accounts = Vec::with_capacity(n);
    let mut dates: Vec<NaiveDate> = Vec::with_capacity(n);
    let mut amounts: Vec<Decimal> = Vec::with_capacity(n);
    let mut currencies = Vec::with_capacity(n);
    let mut references: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut descriptions = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    let mut src_topics = Vec::with_capacity(n);
    let mut src_parts = Vec::with_capacity(n);
    let mut src_offsets = Vec::with_capacity(n);
    for (b, s) in payouts.iter().copied() {
        ids.push(b.statement_line_id.as_str());
        accounts.push(b.account_id.as_str());
        dates.push(b.value_date);
        amounts.push(b.amount);
        currencies.push(b.currency.code());
        references.push(b.batch_reference.as_deref());
        descriptions.push(b.description.as_str());
        times.push(b.event_time);
        src_topics.push(topics[s.topic].as_str());
        src_parts.push(s.partition);
        src_offsets.push(s.offset);
    }
    sqlx::query_scalar(
        "WITH ins AS (
            INSERT INTO bank_payouts (statement_line_id, account_id, value_date, amount,
                   currency, batch_reference, description, event_time, source_topic,
                   source_partition, source_offset)
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::date[], $4::numeric[], $5::text[],
                   $6::text[], $7::text[], $8::timestamptz[], $9::text[], $10::int[],
                   $11::bigint[])
            ON CONFLICT (statement_line_id) DO NOTHING
            RETURNING statement_line_id, account_id, value_date, currency, amount
         ), totals AS (
            INSERT INTO payout_daily_totals_by_shard AS t (account_id, value_date, currency,
                   shard, payout_count, credited, debited)
            SELECT account_id, value_date, currency, $12, count(*),
                   coalesce(sum(amount) FILTER (WHERE amount > 0), 0),
                   coalesce(sum(-amount) FILTER (WHERE amount < 0), 0)
              FROM ins GROUP BY account_id, value_date, currency
             ORDER BY account_id, value_date, currency
            ON CONFLICT (account_id, value_date, currency, shard) DO UPDATE
               SET payout_count = t.payout_count + excluded.payout_count,
                   credited = t.credited + excluded.credited,
                   debited = t.debited + excluded.debited
            RETURNING 1
         )
         SELECT statement_line_id FROM ins",
    )
    .bind(&ids)
    .bind(&accounts)
    .bind(&dates)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&references)
    .bind(&descriptions)
    .bind(&times)
    .bind(&src_topics)
    .bind(&src_parts)
    .bind(&src_offsets)
    .bind(shard)
    .fetch_all(&mut **tx)
    .await
}

/// A payment event's columns, then where it came from.
type EventRow = (
    String,
    String,
    String,
    String,
    Decimal,
    String,
    DateTime<Utc>,
    Option<String>,
    String,
    i32,
    i64,
);
/// A settlement line's columns, then where it came from.
type LineRow = (
    String,
    String,
    String,
    String,
    Decimal,
    Decimal,
    Decimal,
    String,
    NaiveDate,
    DateTime<Utc>,
    String,
    i32,
    i64,
);
/// A bank statement line's columns, then where it came from.
type PayoutRow = (
    String,
    String,
    NaiveDate,
    Decimal,
    String,
    Option<String>,
    String,
    DateTime<Utc>,
    String,
    i32,
    i64,
);

const EVENT_COLUMNS: &str = "event_id, payment_reference, merchant_id, kind, amount, currency,
    event_time, psp_reference, source_topic, source_partition, source_offset";
const LINE_COLUMNS: &str = "line_id, batch_id, payment_reference, merchant_id, gross, fee, net,
    currency, settlement_date, event_time, source_topic, source_partition, source_offset";
const PAYOUT_COLUMNS: &str = "statement_line_id, account_id, value_date, amount, currency,
    batch_reference, description, event_time, source_topic, source_partition, source_offset";

pub(super) fn currency(code: &str) -> Result<Currency, sqlx::Error> {
    Currency::from_code(code.trim()).map_err(|e| sqlx::Error::Decode(e.to_string().into()))
}

fn payment(r: EventRow) -> Result<(PaymentEvent, LogPosition), sqlx::Error> {
    let (event_id, payment_reference, merchant_id, kind, amount, cur, event_time, psp) =
        (r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7);
    let kind = PaymentEventKind::parse(&kind)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown kind {kind}").into()))?;
    let event = PaymentEvent {
        event_id,
        payment_reference,
        merchant_id,
        kind,
        amount,
        currency: currency(&cur)?,
        event_time,
        psp_reference: psp,
    };
    Ok((event, (r.8, r.9, r.10)))
}

fn line(r: LineRow) -> Result<(SettlementLine, LogPosition), sqlx::Error> {
    let l = SettlementLine {
        line_id: r.0,
        batch_id: r.1,
        payment_reference: r.2,
        merchant_id: r.3,
        gross: r.4,
        fee: r.5,
        net: r.6,
        currency: currency(&r.7)?,
        settlement_date: r.8,
        event_time: r.9,
    };
    Ok((l, (r.10, r.11, r.12)))
}

fn payout(r: PayoutRow) -> Result<(BankPayout, LogPosition), sqlx::Error> {
    let b = BankPayout {
        statement_line_id: r.0,
        account_id: r.1,
        value_date: r.2,
        amount: r.3,
        currency: currency(&r.4)?,
        batch_reference: r.5,
        description: r.6,
        event_time: r.7,
    };
    Ok((b, (r.8, r.9, r.10)))
}

/// Payment events by id, with where each came from.
pub async fn payments_by_id(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[&str],
) -> Result<Vec<(PaymentEvent, LogPosition)>, sqlx::Error> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM payment_events WHERE event_id = ANY($1)");
    let rows: Vec<EventRow> = sqlx::query_as(&sql).bind(ids).fetch_all(&mut **tx).await?;
    rows.into_iter().map(payment).collect()
}

/// Settlement lines by id, with where each came from.
pub async fn lines_by_id(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[&str],
) -> Result<Vec<(SettlementLine, LogPosition)>, sqlx::Error> {
    let sql = format!("SELECT {LINE_COLUMNS} FROM settlement_lines WHERE line_id = ANY($1)");
    let rows: Vec<LineRow> = sqlx::query_as(&sql).bind(ids).fetch_all(&mut **tx).await?;
    rows.into_iter().map(line).collect()
}

/// Bank statement lines by id, with where each came from.
pub async fn payouts_by_id(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[&str],
) -> Result<Vec<(BankPayout, LogPosition)>, sqlx::Error> {
    let sql =
        format!("SELECT {PAYOUT_COLUMNS} FROM bank_payouts WHERE statement_line_id = ANY($1)");
    let rows: Vec<PayoutRow> = sqlx::query_as(&sql).bind(ids).fetch_all(&mut **tx).await?;
    rows.into_iter().map(payout).collect()
}

/// The payment events and settlement lines of each of `refs` (references without any record
/// are absent), each side sorted by (event time, id): the order the matcher takes its anchor
/// from. The batch evaluation and `report --verify`'s re-evaluation both read through here, so
/// the verifier judges exactly what the service judged.
pub async fn records_of(
    conn: &mut sqlx::PgConnection,
    refs: &[&str],
) -> Result<HashMap<String, (Vec<PaymentEvent>, Vec<SettlementLine>)>, sqlx::Error> {
    let sql =
        format!("SELECT {EVENT_COLUMNS} FROM payment_events WHERE payment_reference = ANY($1)");
    let events: Vec<EventRow> = sqlx::query_as(&sql)
        .bind(refs)
        .fetch_all(&mut *conn)
        .await?;
    let sql =
        format!("SELECT {LINE_COLUMNS} FROM settlement_lines WHERE payment_reference = ANY($1)");
    let lines: Vec<LineRow> = sqlx::query_as(&sql)
        .bind(refs)
        .fetch_all(&mut *conn)
        .await?;
    let mut by_ref: HashMap<String, (Vec<PaymentEvent>, Vec<SettlementLine>)> =
        HashMap::with_capacity(refs.len());
    for r in events {
        let (e, _) = payment(r)?;
        by_ref
            .entry(e.payment_reference.clone())
            .or_default()
            .0
            .push(e);
    }
    for r in lines {
        let (l, _) = line(r)?;
        by_ref
            .entry(l.payment_reference.clone())
            .or_default()
            .1
            .push(l);
    }
    for (events, lines) in by_ref.values_mut() {
        events.sort_by(|a, b| (a.event_time, &a.event_id).cmp(&(b.event_time, &b.event_id)));
        lines.sort_by(|a, b| (a.event_time, &a.line_id).cmp(&(b.event_time, &b.line_id)));
    }
    Ok(by_ref)
}

/// Keeps a conflicting duplicate: the incoming version of a record whose id is stored with
/// other content (`stored`/`incoming`: both versions' fields as JSON; `differing`: the
/// field names), with its bytes. The stored row is never changed.
#[allow(clippy::too_many_arguments)]
pub async fn insert_conflicting_duplicate(
    tx: &mut Transaction<'_, Postgres>,
    (record_type, record_id): (&str, &str),
    stored_position: &LogPosition,
    (topic, source): (&str, Source),
    stored: serde_json::Value,
    incoming: serde_json::Value,
    differing: &[&str],
    raw: &RawRecord,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        r#"INSERT INTO conflicting_duplicates (record_type, record_id, stored_topic,
                  stored_partition, stored_offset, topic, partition, "offset",
                  stored_fields, incoming_fields, differing_fields, key, payload,
                  broker_timestamp)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
           ON CONFLICT ON CONSTRAINT conflicting_duplicates_position_key DO NOTHING"#,
    )
    .bind(record_type)
    .bind(record_id)
    .bind(&stored_position.0)
    .bind(stored_position.1)
    .bind(stored_position.2)
    .bind(topic)
    .bind(source.partition)
    .bind(source.offset)
    .bind(stored)
    .bind(incoming)
    .bind(differing)
    .bind(raw.key.as_deref())
    .bind(raw.payload.as_deref())
    .bind(raw.broker_timestamp)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The savepoint every try at applying records runs under (the refusal isolation of
/// `crate::engine`): set, released, or rolled back to. Static text, so it goes as a simple
/// query.
#[derive(Debug, Clone, Copy)]
pub enum Savepoint {
    Set,
    Release,
    Rollback,
}

pub async fn savepoint(
    tx: &mut Transaction<'_, Postgres>,
    step: Savepoint,
) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    let sql = match step {
        Savepoint::Set => "SAVEPOINT payrecon_records",
        Savepoint::Release => "RELEASE SAVEPOINT payrecon_records",
        Savepoint::Rollback => "ROLLBACK TO SAVEPOINT payrecon_records",
    };
    (&mut **tx).execute(sql).await.map(|_| ())
}
