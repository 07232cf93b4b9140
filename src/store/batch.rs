//! The per-batch transaction: offsets by compare-and-set, events, totals, dead letters.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use std::collections::HashMap;

use super::reconcile::{
    Cause, DailyDeltas, Evaluator, ReconcileOutcome, Reconciler, Targets, due_items,
    evaluate_targets,
};
use super::{CommitError, Store};
use crate::domain::{PaymentEvent, SettlementLine};

/// Where a record came from in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// Index into [`Batch::topics`]; avoids cloning the topic name per record.
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
}

/// How far a batch moves one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: i32,
    /// The stored `next_offset` this batch started from; `None` when the partition has
    /// never been committed by this group. The commit is a compare-and-set on it.
    pub expected: Option<i64>,
    /// Offset of the last record in the batch + 1.
    pub next_offset: i64,
    /// Records of this partition in the batch (applied, ignored duplicates and poison).
    pub records: i64,
    /// Broker timestamp of the last record.
    pub last_record_time: Option<DateTime<Utc>>,
}

/// A record that can never succeed, with its bytes and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub source: Source,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub error_kind: &'static str,
    pub error_message: String,
    pub broker_timestamp: Option<DateTime<Utc>>,
}

/// Everything one transaction writes.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Topic names referenced by [`Source::topic`].
    pub topics: Vec<String>,
    pub progress: Vec<PartitionProgress>,
    pub payments: Vec<(PaymentEvent, Source)>,
    pub settlements: Vec<(SettlementLine, Source)>,
    pub dead_letters: Vec<DeadLetter>,
}

/// What a committed batch changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Payment events newly inserted (re-deliveries excluded).
    pub payments_inserted: u64,
    pub settlements_inserted: u64,
    pub dead_letters: u64,
    /// What reconciliation changed in the same transaction.
    pub reconciliation: ReconcileOutcome,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.progress.is_empty()
    }

    /// Number of log records the batch covers.
    pub fn record_count(&self) -> i64 {
        self.progress.iter().map(|p| p.records).sum()
    }
}

impl Store {
    /// Commits `batch` atomically for consumer group `group`; `instance` is recorded as the
    /// committer. See the module doc for what the transaction contains; reconciliation uses
    /// one snapshot of `reconciler`'s reference cache throughout.
    pub async fn commit_batch(
        &self,
        group: &str,
        instance: &str,
        batch: &Batch,
        reconciler: &Reconciler,
    ) -> Result<CommitOutcome, CommitError> {
        let mut tx = self.pool.begin().await?;
        let max_times = batch.max_event_times();
        advance_offsets(&mut tx, group, instance, &batch.progress, &max_times).await?;
        let payments = insert_payments(&mut tx, &batch.topics, &batch.payments).await?;
        let settlements = insert_settlements(&mut tx, &batch.topics, &batch.settlements).await?;
        let dead_letters = insert_dead_letters(&mut tx, &batch.topics, &batch.dead_letters).await?;

        let reconciliation = reconcile_inserted(
            &mut tx,
            group,
            instance,
            reconciler,
            batch,
            &payments,
            &settlements,
        )
        .await?;
        tx.commit().await?;
        Ok(CommitOutcome {
            payments_inserted: payments.len() as u64,
            settlements_inserted: settlements.len() as u64,
            dead_letters,
            reconciliation,
        })
    }
}

/// Reconciles what `batch` inserted (`payments`, `settlements`: the ids actually inserted)
/// with one reference snapshot: the touched references, then the items the watermark made
/// due; then the daily totals. Runs inside the caller's transaction.
pub(crate) async fn reconcile_inserted(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    instance: &str,
    reconciler: &Reconciler,
    batch: &Batch,
    payments: &[String],
    settlements: &[String],
) -> Result<ReconcileOutcome, sqlx::Error> {
    let snapshot = reconciler.cache.snapshot();
    let mut targets = Targets::default();
    let mut daily = DailyDeltas::default();
    record_inserted(batch, payments, settlements, &mut targets, &mut daily);
    let who = Evaluator {
        group,
        instance,
        rules: &reconciler.rules,
        snapshot: &snapshot,
        watermark: reconciler.watermark(tx, group).await?,
    };
    let mut outcome = evaluate_targets(tx, &who, targets, &mut daily).await?;
    // Items the advanced watermark made due; locked ones are another batch's to judge.
    let due = due_items(tx, who.watermark, reconciler.rules.due_sweep_limit).await?;
    if !due.is_empty() {
        let mut targets = Targets::default();
        for reference in due {
            targets.other(reference, Cause::Deadline);
        }
        outcome.merge(evaluate_targets(tx, &who, targets, &mut daily).await?);
    }
    daily.write(tx).await?;
    Ok(outcome)
}

/// Adds the rows this transaction inserted (not the re-deliveries) to the references to
/// evaluate and to the daily totals.
pub(crate) fn record_inserted(
    batch: &Batch,
    payments: &[String],
    settlements: &[String],
    targets: &mut Targets,
    daily: &mut DailyDeltas,
) {
    if !payments.is_empty() {
        let mut by_id: HashMap<&str, &PaymentEvent> = HashMap::with_capacity(batch.payments.len());
        for (p, _) in &batch.payments {
            by_id.entry(p.event_id.as_str()).or_insert(p);
        }
        for id in payments {
            if let Some(p) = by_id.get(id.as_str()) {
                targets.record(&p.payment_reference, &p.event_id);
                daily.payment(p);
            }
        }
    }
    if !settlements.is_empty() {
        let mut by_id: HashMap<&str, &SettlementLine> =
            HashMap::with_capacity(batch.settlements.len());
        for (l, _) in &batch.settlements {
            by_id.entry(l.line_id.as_str()).or_insert(l);
        }
        for id in settlements {
            if let Some(l) = by_id.get(id.as_str()) {
                targets.record(&l.payment_reference, &l.line_id);
                daily.settlement(l);
            }
        }
    }
}

impl Batch {
    /// The highest event time per partition among the batch's records (the watermark's input).
    fn max_event_times(&self) -> HashMap<(&str, i32), DateTime<Utc>> {
        let mut out: HashMap<(&str, i32), DateTime<Utc>> = HashMap::new();
        let times = (self.payments.iter().map(|(p, s)| (p.event_time, s)))
            .chain(self.settlements.iter().map(|(l, s)| (l.event_time, s)));
        for (t, s) in times {
            let e = out
                .entry((self.topics[s.topic].as_str(), s.partition))
                .or_insert(t);
            *e = (*e).max(t);
        }
        out
    }
}

/// Compare-and-set of every partition's offset. Rows that do not match are reported as
/// [`CommitError::Fenced`]; dropping the transaction rolls everything back.
async fn advance_offsets(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    instance: &str,
    progress: &[PartitionProgress],
    max_times: &HashMap<(&str, i32), DateTime<Utc>>,
) -> Result<(), CommitError> {
    let (known, new): (Vec<&PartitionProgress>, Vec<&PartitionProgress>) =
        progress.iter().partition(|p| p.expected.is_some());
    let cols = |ps: &[&PartitionProgress]| {
        (
            ps.iter().map(|p| p.topic.clone()).collect::<Vec<_>>(),
            ps.iter().map(|p| p.partition).collect::<Vec<_>>(),
            ps.iter()
                .map(|p| p.expected.unwrap_or(-1))
                .collect::<Vec<_>>(),
            ps.iter().map(|p| p.next_offset).collect::<Vec<_>>(),
            ps.iter().map(|p| p.records).collect::<Vec<_>>(),
            ps.iter().map(|p| p.last_record_time).collect::<Vec<_>>(),
            ps.iter()
                .map(|p| max_times.get(&(p.topic.as_str(), p.partition)).copied())
                .collect::<Vec<_>>(),
        )
    };
    let mut advanced = 0usize;
    if !known.is_empty() {
        let (topics, parts, expected, next, records, times, event_times) = cols(&known);
        advanced += sqlx::query(
            "UPDATE consumer_offsets o
                SET next_offset = i.next_offset,
                    records_applied = o.records_applied + i.records,
                    batches_committed = o.batches_committed + 1,
                    last_record_time = COALESCE(i.last_time, o.last_record_time),
                    max_event_time = GREATEST(o.max_event_time, i.event_time),
                    last_committed_by = $8,
                    updated_at = now()
               FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::bigint[],
                           $7::timestamptz[], $9::timestamptz[])
                    AS i(topic, partition, expected, next_offset, records, last_time, event_time)
              WHERE o.consumer_group = $1 AND o.topic = i.topic AND o.partition = i.partition
                AND o.next_offset = i.expected AND i.next_offset > o.next_offset",
        )
        .bind(group)
        .bind(&topics)
        .bind(&parts)
        .bind(&expected)
        .bind(&next)
        .bind(&records)
        .bind(&times)
        .bind(instance)
        .bind(&event_times)
        .execute(&mut **tx)
        .await?
        .rows_affected() as usize;
    }
    if !new.is_empty() {
        let (topics, parts, _, next, records, times, event_times) = cols(&new);
        advanced += sqlx::query(
            "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset,
                    records_applied, batches_committed, last_record_time, last_committed_by,
                    max_event_time)
             SELECT $1, i.topic, i.partition, i.next_offset, i.records, 1, i.last_time, $7,
                    i.event_time
               FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::timestamptz[],
                           $8::timestamptz[])
                    AS i(topic, partition, next_offset, records, last_time, event_time)
             ON CONFLICT (consumer_group, topic, partition) DO NOTHING",
        )
        .bind(group)
        .bind(&topics)
        .bind(&parts)
        .bind(&next)
        .bind(&records)
        .bind(&times)
        .bind(instance)
        .bind(&event_times)
        .execute(&mut **tx)
        .await?
        .rows_affected() as usize;
    }
    if advanced == progress.len() {
        return Ok(());
    }
    // Name one partition that failed, for the log; the whole batch is rejected either way.
    let partitions: Vec<_> = progress
        .iter()
        .map(|p| (p.topic.clone(), p.partition))
        .collect();
    let stored = super::stored_offsets(&mut **tx, group, &partitions).await?;
    let stale = progress
        .iter()
        .find(|p| stored.get(&(p.topic.clone(), p.partition)).copied() != Some(p.next_offset))
        .unwrap_or(&progress[0]);
    Err(CommitError::Fenced {
        topic: stale.topic.clone(),
        partition: stale.partition,
    })
}

/// Inserts payment events (ignoring known ids) and adds the inserted ones to the totals,
/// in one statement so the totals can only ever count rows this transaction inserted.
/// Totals are upserted in key order so concurrent batches lock them in the same order.
/// Returns the ids actually inserted.
pub(crate) async fn insert_payments(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    payments: &[(PaymentEvent, Source)],
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
    for (p, s) in payments {
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
            INSERT INTO merchant_payment_totals AS t (merchant_id, currency, kind, event_count, amount_sum)
            SELECT merchant_id, currency, kind, count(*), sum(amount)
              FROM ins GROUP BY merchant_id, currency, kind ORDER BY merchant_id, currency, kind
            ON CONFLICT (merchant_id, currency, kind) DO UPDATE
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
    .fetch_all(&mut **tx)
    .await
}

/// Same as [`insert_payments`] for settlement lines.
pub(crate) async fn insert_settlements(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    lines: &[(SettlementLine, Source)],
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
    for (l, s) in lines {
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
            INSERT INTO merchant_settlement_totals AS t (merchant_id, currency, line_count,
                   gross_sum, fee_sum, net_sum)
            SELECT merchant_id, currency, count(*), sum(gross), sum(fee), sum(net)
              FROM ins GROUP BY merchant_id, currency ORDER BY merchant_id, currency
            ON CONFLICT (merchant_id, currency) DO UPDATE
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
    .fetch_all(&mut **tx)
    .await
}

async fn insert_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    letters: &[DeadLetter],
) -> Result<u64, sqlx::Error> {
    if letters.is_empty() {
        return Ok(0);
    }
    let src_topics: Vec<&str> = letters
        .iter()
        .map(|d| topics[d.source.topic].as_str())
        .collect();
    let parts: Vec<i32> = letters.iter().map(|d| d.source.partition).collect();
    let offsets: Vec<i64> = letters.iter().map(|d| d.source.offset).collect();
    let keys: Vec<Option<&[u8]>> = letters.iter().map(|d| d.key.as_deref()).collect();
    let payloads: Vec<Option<&[u8]>> = letters.iter().map(|d| d.payload.as_deref()).collect();
    let kinds: Vec<&str> = letters.iter().map(|d| d.error_kind).collect();
    let messages: Vec<&str> = letters.iter().map(|d| d.error_message.as_str()).collect();
    let times: Vec<Option<DateTime<Utc>>> = letters.iter().map(|d| d.broker_timestamp).collect();
    let r = sqlx::query(
        r#"INSERT INTO dead_letters (topic, partition, "offset", key, payload, error_kind,
                  error_message, broker_timestamp)
           SELECT * FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bytea[], $5::bytea[],
                  $6::text[], $7::text[], $8::timestamptz[])
           ON CONFLICT ON CONSTRAINT dead_letters_position_key DO NOTHING"#,
    )
    .bind(&src_topics)
    .bind(&parts)
    .bind(&offsets)
    .bind(&keys)
    .bind(&payloads)
    .bind(&kinds)
    .bind(&messages)
    .bind(&times)
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected())
}
