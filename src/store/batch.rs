//! The per-batch transaction: offsets by compare-and-set, events, totals, reconciliation,
//! dead letters and conflicting duplicates, all in ONE transaction.
//!
//! ## Records the database refuses
//! Records are validated before they get here (`domain::Limits`), but PostgreSQL may still
//! refuse one (a value no check foresaw). Refusals that lie in a record
//! ([`Disposition::RecordRefused`]: SQLSTATE classes 22, 23, 54) must neither stop the
//! stream nor cost a good record, so the records are applied under a savepoint: when the
//! whole batch is refused, the transaction rolls back to it and bisects the records, each
//! half under a savepoint of its own, until every refused record stands alone. A lone refused
//! record is then tried once more as a sanitized *twin* (same kind, currency and event time;
//! harmless ids and amount), rolled back whatever happens: if the twin is refused too, the
//! refusal lies in the system (schema, permissions) and the batch fails with
//! [`CommitError::Permanent`]; otherwise the record is dead-lettered (`database_refused`,
//! with the SQLSTATE and PostgreSQL's message, its bytes kept) and the rest of the batch and
//! the offsets commit together. The clean path costs one SAVEPOINT and one RELEASE.
//!
//! ## Duplicates
//! Events and lines are inserted by id with insert-or-ignore. A record whose id is already
//! stored (or appears earlier in the batch) with the same business fields is a re-delivery:
//! counted, nothing else. With different fields it is a *conflicting duplicate*: the stored row
//! is never changed, and the incoming version is kept in `conflicting_duplicates` with both
//! versions' fields and log positions.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use super::reconcile::{
    Cause, DailyDeltas, Evaluator, ReconcileOutcome, Reconciler, Targets, due_items,
    evaluate_targets,
};
use super::{CommitError, Disposition, Store, describe, disposition};
use crate::domain::{BankPayout, PaymentEvent, SettlementLine};

/// Where a record came from in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// A decoded record's bytes as they were in the log, kept until the commit so that a record
/// the database refuses, or a conflicting duplicate, can be stored whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
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
    pub payouts: Vec<(BankPayout, Source)>,
    pub dead_letters: Vec<DeadLetter>,
    /// The bytes of the decoded records, by position (absent ones are stored without bytes).
    pub raw: HashMap<Source, RawRecord>,
}

/// What a committed batch changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Payment events newly inserted (re-deliveries excluded).
    pub payments_inserted: u64,
    pub settlements_inserted: u64,
    /// Exact re-deliveries ignored, per stream.
    pub payments_duplicates: u64,
    pub settlements_duplicates: u64,
    /// Bank statement lines newly inserted, and exact re-deliveries ignored.
    pub payouts_inserted: u64,
    pub payouts_duplicates: u64,
    /// Dead letters written: the batch's poison plus the records the database refused.
    pub dead_letters: u64,
    /// Records the database refused, dead-lettered by the isolation (also in `dead_letters`).
    pub refused: Vec<DeadLetter>,
    /// Conflicting duplicates kept (ids stored with different content).
    pub conflicts: Vec<Source>,
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
        let shard = batch.shard();
        let apply = Apply {
            group,
            instance,
            reconciler,
            topics: &batch.topics,
            raw: &batch.raw,
            shard: &shard,
        };
        let payments: Vec<_> = batch.payments.iter().collect();
        let settlements: Vec<_> = batch.settlements.iter().collect();
        let payouts: Vec<_> = batch.payouts.iter().collect();
        let records = Records {
            payments: &payments,
            settlements: &settlements,
            payouts: &payouts,
        };
        let applied = apply.isolating(&mut tx, records).await?;
        let dead_letters = insert_dead_letters(
            &mut tx,
            &batch.topics,
            batch.dead_letters.iter().chain(&applied.refused),
        )
        .await?;
        tx.commit().await?;
        Ok(CommitOutcome {
            payments_inserted: applied.payments_inserted,
            settlements_inserted: applied.settlements_inserted,
            payments_duplicates: applied.payments_duplicates,
            settlements_duplicates: applied.settlements_duplicates,
            payouts_inserted: applied.payouts_inserted,
            payouts_duplicates: applied.payouts_duplicates,
            dead_letters,
            refused: applied.refused,
            conflicts: applied.conflicts,
            reconciliation: applied.reconciliation,
        })
    }
}

/// What applying a set of records changed.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    pub payments_inserted: u64,
    pub settlements_inserted: u64,
    pub payments_duplicates: u64,
    pub settlements_duplicates: u64,
    pub payouts_inserted: u64,
    pub payouts_duplicates: u64,
    pub conflicts: Vec<Source>,
    pub refused: Vec<DeadLetter>,
    pub reconciliation: ReconcileOutcome,
}

impl Applied {
    fn merge(&mut self, other: Applied) {
        self.payments_inserted += other.payments_inserted;
        self.settlements_inserted += other.settlements_inserted;
        self.payments_duplicates += other.payments_duplicates;
        self.settlements_duplicates += other.settlements_duplicates;
        self.payouts_inserted += other.payouts_inserted;
        self.payouts_duplicates += other.payouts_duplicates;
        self.conflicts.extend(other.conflicts);
        self.refused.extend(other.refused);
        self.reconciliation.merge(other.reconciliation);
    }
}

type Payments<'b> = [&'b (PaymentEvent, Source)];
type Settlements<'b> = [&'b (SettlementLine, Source)];
type Payouts<'b> = [&'b (BankPayout, Source)];

/// The records one try applies: one slice per input stream, seen as one sequence (payments,
/// then settlements, then payouts) that the refusal isolation can cut anywhere.
#[derive(Clone, Copy, Default)]
pub(crate) struct Records<'b> {
    pub payments: &'b Payments<'b>,
    pub settlements: &'b Settlements<'b>,
    pub payouts: &'b Payouts<'b>,
}

impl<'b> Records<'b> {
    pub fn len(&self) -> usize {
        self.payments.len() + self.settlements.len() + self.payouts.len()
    }

    /// Records `a..b` of the sequence.
    fn slice(&self, a: usize, b: usize) -> Records<'b> {
        fn cut<T>(xs: &[T], start: usize, (a, b): (usize, usize)) -> &[T] {
            let clamp = |i: usize| i.clamp(start, start + xs.len()) - start;
            &xs[clamp(a)..clamp(b)]
        }
        let (p, s) = (self.payments.len(), self.settlements.len());
        Records {
            payments: cut(self.payments, 0, (a, b)),
            settlements: cut(self.settlements, p, (a, b)),
            payouts: cut(self.payouts, p + s, (a, b)),
        }
    }

    fn first_source(&self) -> Option<Source> {
        (self.payments.first().map(|(_, s)| *s))
            .or_else(|| self.settlements.first().map(|(_, s)| *s))
            .or_else(|| self.payouts.first().map(|(_, s)| *s))
    }
}

/// Applies records inside the caller's transaction: inserts, duplicates, reconciliation.
pub(crate) struct Apply<'a> {
    pub group: &'a str,
    pub instance: &'a str,
    pub reconciler: &'a Reconciler,
    pub topics: &'a [String],
    pub raw: &'a HashMap<Source, RawRecord>,
    /// The running-totals shard this transaction writes (see [`Batch::shard`]).
    pub shard: &'a str,
}

/// Ids and references of a refused record's twin (rolled back, never committed).
const PROBE: &str = "payrecon-refusal-probe";

impl Apply<'_> {
    /// Applies the records; a refusal that lies in records is isolated (module doc).
    async fn isolating(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Applied, CommitError> {
        match self.attempt(tx, records).await? {
            Ok(applied) => Ok(applied),
            Err(first) => {
                crate::metrics::batch_isolating();
                tracing::warn!(error = %describe(&first), records = records.len(), "PostgreSQL refused the batch; isolating the refused records");
                self.bisect(tx, records).await
            }
        }
    }

    /// One try under a savepoint: `Ok(Err(e))` when PostgreSQL refused it for a reason that
    /// may lie in the records (rolled back to the savepoint), `Err` for every other failure.
    async fn attempt(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Result<Applied, sqlx::Error>, CommitError> {
        savepoint(tx, SAVEPOINT_SET).await?;
        match self.apply(tx, records).await {
            Ok(applied) => {
                savepoint(tx, SAVEPOINT_RELEASE).await?;
                Ok(Ok(applied))
            }
            Err(e) if disposition(&e) == Disposition::RecordRefused => {
                savepoint(tx, SAVEPOINT_ROLLBACK).await?;
                savepoint(tx, SAVEPOINT_RELEASE).await?;
                Ok(Err(e))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Splits the refused records in halves until each refused one stands alone.
    async fn bisect(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Applied, CommitError> {
        let mut out = Applied::default();
        // Ranges over the records still to try, in log order.
        let mut todo = vec![(0, records.len())];
        while let Some((a, b)) = todo.pop() {
            if b - a > 1 {
                let mid = a + (b - a) / 2;
                for half in [(mid, b), (a, mid)] {
                    match self.attempt(tx, records.slice(half.0, half.1)).await? {
                        Ok(applied) => out.merge(applied),
                        Err(_) => todo.push(half),
                    }
                }
                continue;
            }
            match self.refused(tx, records.slice(a, b)).await? {
                Ok(applied) => out.merge(applied),
                Err(dead_letter) => out.refused.push(dead_letter),
            }
        }
        Ok(out)
    }

    /// A record refused on its own: dead-lettered (`Ok(Err)`) if its twin goes through, else
    /// the refusal lies in the system (`Err`). `Ok(Ok)`: accepted on this second try (its
    /// refusal depended on the records tried with it, which are applied by now).
    async fn refused(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Result<Applied, DeadLetter>, CommitError> {
        let refusal = match self.attempt(tx, records).await? {
            Err(e) => e,
            Ok(applied) => return Ok(Ok(applied)),
        };
        let twin_p: Vec<(PaymentEvent, Source)> = (records.payments.iter())
            .map(|(e, s)| (payment_twin(e), *s))
            .collect();
        let twin_s: Vec<(SettlementLine, Source)> = (records.settlements.iter())
            .map(|(l, s)| (settlement_twin(l), *s))
            .collect();
        let twin_b: Vec<(BankPayout, Source)> = (records.payouts.iter())
            .map(|(b, s)| (payout_twin(b), *s))
            .collect();
        let (twin_p, twin_s, twin_b) = (
            twin_p.iter().collect::<Vec<_>>(),
            twin_s.iter().collect::<Vec<_>>(),
            twin_b.iter().collect::<Vec<_>>(),
        );
        savepoint(tx, SAVEPOINT_SET).await?;
        let twin = self
            .apply(
                tx,
                Records {
                    payments: &twin_p,
                    settlements: &twin_s,
                    payouts: &twin_b,
                },
            )
            .await;
        savepoint(tx, SAVEPOINT_ROLLBACK).await?;
        savepoint(tx, SAVEPOINT_RELEASE).await?;
        match twin {
            Ok(_) => {}
            // The connection, not the twin, failed: retry the whole batch.
            Err(e) if disposition(&e) == Disposition::Retry => {
                return Err(CommitError::Transient(e));
            }
            Err(e) => {
                tracing::error!(record = %describe(&refusal), twin = %describe(&e), "PostgreSQL refuses a harmless twin of the refused record too: the schema or the database is wrong, not the record");
                return Err(CommitError::Permanent(e));
            }
        }
        let source = records.first_source().expect("one record");
        let raw = self.raw.get(&source).cloned().unwrap_or_default();
        tracing::warn!(topic = %self.topics[source.topic], partition = source.partition, offset = source.offset, error = %describe(&refusal), "dead-lettering a record PostgreSQL refuses");
        Ok(Err(DeadLetter {
            source,
            key: raw.key,
            payload: raw.payload,
            error_kind: crate::codec::PoisonKind::DatabaseRefused.as_str(),
            error_message: describe(&refusal),
            broker_timestamp: raw.broker_timestamp,
        }))
    }

    /// Inserts the records, keeps conflicting duplicates, reconciles what was inserted.
    pub(crate) async fn apply(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: Records<'_>,
    ) -> Result<Applied, sqlx::Error> {
        let mut out = Applied::default();
        let p = self.insert_checked(tx, records.payments).await?;
        let s = self.insert_checked(tx, records.settlements).await?;
        let b = self.insert_checked(tx, records.payouts).await?;
        out.payments_inserted = p.inserted.len() as u64;
        out.settlements_inserted = s.inserted.len() as u64;
        out.payouts_inserted = b.inserted.len() as u64;
        out.payments_duplicates = p.duplicates;
        out.settlements_duplicates = s.duplicates;
        out.payouts_duplicates = b.duplicates;
        out.conflicts = (p.conflicts.into_iter())
            .chain(s.conflicts)
            .chain(b.conflicts)
            .collect();
        out.reconciliation = reconcile_inserted(
            tx,
            (self.group, self.instance, self.shard),
            self.reconciler,
            records,
            (&p.inserted, &s.inserted, &b.inserted),
        )
        .await?;
        Ok(out)
    }

    /// Inserts the first occurrence of each id, then sorts every record that was not
    /// inserted into re-deliveries and conflicting duplicates (kept).
    async fn insert_checked<R: Keyed>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        records: &[&(R, Source)],
    ) -> Result<Checked, sqlx::Error> {
        let mut out = Checked::default();
        if records.is_empty() {
            return Ok(out);
        }
        let mut first: HashMap<&str, usize> = HashMap::with_capacity(records.len());
        let mut unique = Vec::with_capacity(records.len());
        let mut repeats = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match first.entry(r.0.id()) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                    unique.push(*r);
                }
                std::collections::hash_map::Entry::Occupied(o) => repeats.push((i, *o.get())),
            }
        }
        out.inserted = R::insert(tx, self.topics, self.shard, &unique).await?;
        if out.inserted.len() == unique.len() && repeats.is_empty() {
            return Ok(out);
        }
        let inserted: std::collections::HashSet<&str> =
            out.inserted.iter().map(String::as_str).collect();
        let known: Vec<&str> = unique
            .iter()
            .map(|r| r.0.id())
            .filter(|id| !inserted.contains(id))
            .collect();
        let stored = R::stored(tx, &known).await?;
        // Each record not inserted is compared with the version that is stored now: a row
        // from before this batch, or the batch's own first occurrence of the id.
        let mut conflicts = Vec::new();
        let not_inserted = unique
            .iter()
            .filter(|r| !inserted.contains(r.0.id()))
            .copied()
            .chain(repeats.iter().map(|&(i, _)| records[i]));
        for r in not_inserted {
            let id = r.0.id();
            let reference = match stored.get(id) {
                Some(row) => Some((row.fields.clone(), row.position.clone())),
                None => {
                    let f = records[first[id]];
                    (f.1 != r.1).then(|| {
                        (
                            f.0.fields(),
                            (self.topics[f.1.topic].clone(), f.1.partition, f.1.offset),
                        )
                    })
                }
            };
            let Some((stored_fields, position)) = reference else {
                continue;
            };
            let incoming = r.0.fields();
            let differing: Vec<&'static str> = incoming
                .iter()
                .zip(&stored_fields)
                .filter(|(a, b)| a.1 != b.1)
                .map(|(a, _)| a.0)
                .collect();
            if differing.is_empty() {
                out.duplicates += 1;
            } else {
                conflicts.push((r, stored_fields, incoming, differing, position));
            }
        }
        for (r, stored_fields, incoming, differing, position) in conflicts {
            let raw = self.raw.get(&r.1).cloned().unwrap_or_default();
            tracing::warn!(record_type = R::TYPE, id = %crate::store::printable(r.0.id(), 200), topic = %self.topics[r.1.topic], partition = r.1.partition, offset = r.1.offset, differing = ?differing, "conflicting duplicate: the id is stored with different content; kept, the stored row is unchanged");
            sqlx::query(
                r#"INSERT INTO conflicting_duplicates (record_type, record_id, stored_topic,
                          stored_partition, stored_offset, topic, partition, "offset",
                          stored_fields, incoming_fields, differing_fields, key, payload,
                          broker_timestamp)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                   ON CONFLICT ON CONSTRAINT conflicting_duplicates_position_key DO NOTHING"#,
            )
            .bind(R::TYPE)
            .bind(r.0.id())
            .bind(&position.0)
            .bind(position.1)
            .bind(position.2)
            .bind(&self.topics[r.1.topic])
            .bind(r.1.partition)
            .bind(r.1.offset)
            .bind(as_json(&stored_fields))
            .bind(as_json(&incoming))
            .bind(&differing)
            .bind(raw.key.as_deref())
            .bind(raw.payload.as_deref())
            .bind(raw.broker_timestamp)
            .execute(&mut **tx)
            .await?;
            out.conflicts.push(r.1);
        }
        Ok(out)
    }
}

/// Outcome of [`Apply::insert_checked`] for one record type.
#[derive(Debug, Default)]
struct Checked {
    /// Ids inserted by this statement.
    inserted: Vec<String>,
    duplicates: u64,
    conflicts: Vec<Source>,
}

/// A record's business fields as canonical strings (amounts normalized, times in UTC to the
/// microsecond PostgreSQL keeps), in a fixed order, so two versions compare field by field.
pub(super) type Fields = Vec<(&'static str, Option<String>)>;

fn as_json(fields: &Fields) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.clone().map_or(serde_json::Value::Null, Into::into),
                )
            })
            .collect(),
    )
}

pub(super) fn amount(d: Decimal) -> Option<String> {
    Some(d.normalize().to_string())
}

pub(super) fn time(t: DateTime<Utc>) -> Option<String> {
    Some(t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// A stored row's fields and where in the log it came from.
pub(super) struct StoredRow {
    pub fields: Fields,
    pub position: (String, i32, i64),
}

/// What the duplicate check needs of a record type.
pub(super) trait Keyed: Sync {
    /// `conflicting_duplicates.record_type`.
    const TYPE: &'static str;
    fn id(&self) -> &str;
    fn fields(&self) -> Fields;
    /// Inserts (insert-or-ignore) and returns the ids inserted. (Boxed: an `async fn` in a
    /// trait does not promise a `Send` future, which the consumer task needs.)
    fn insert<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        topics: &'a [String],
        shard: &'a str,
        records: &'a [&'a (Self, Source)],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>>
    where
        Self: Sized;
    /// The stored versions of `ids`.
    fn stored<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<HashMap<String, StoredRow>, sqlx::Error>>;
}

fn payment_fields(
    reference: &str,
    merchant: &str,
    kind: &str,
    value: Decimal,
    currency: &str,
    event_time: DateTime<Utc>,
    psp: Option<&str>,
) -> Fields {
    vec![
        ("payment_reference", Some(reference.to_owned())),
        ("merchant_id", Some(merchant.to_owned())),
        ("kind", Some(kind.to_owned())),
        ("amount", amount(value)),
        ("currency", Some(currency.trim().to_owned())),
        ("event_time", time(event_time)),
        ("psp_reference", psp.map(str::to_owned)),
    ]
}

impl Keyed for PaymentEvent {
    const TYPE: &'static str = "payment_event";

    fn id(&self) -> &str {
        &self.event_id
    }

    fn fields(&self) -> Fields {
        payment_fields(
            &self.payment_reference,
            &self.merchant_id,
            self.kind.as_str(),
            self.amount,
            self.currency.code(),
            self.event_time,
            self.psp_reference.as_deref(),
        )
    }

    fn insert<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        topics: &'a [String],
        shard: &'a str,
        records: &'a [&'a (Self, Source)],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(insert_payments(tx, topics, shard, records))
    }

    fn stored<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<HashMap<String, StoredRow>, sqlx::Error>> {
        Box::pin(async move {
            type Row = (
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
            let rows: Vec<Row> = sqlx::query_as(
            "SELECT event_id, payment_reference, merchant_id, kind, amount, currency, event_time,
                    psp_reference, source_topic, source_partition, source_offset
               FROM payment_events WHERE event_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    let fields = payment_fields(&r.1, &r.2, &r.3, r.4, &r.5, r.6, r.7.as_deref());
                    (
                        r.0,
                        StoredRow {
                            fields,
                            position: (r.8, r.9, r.10),
                        },
                    )
                })
                .collect())
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn settlement_fields(
    batch_id: &str,
    reference: &str,
    merchant: &str,
    gross: Decimal,
    fee: Decimal,
    net: Decimal,
    currency: &str,
    date: NaiveDate,
    event_time: DateTime<Utc>,
) -> Fields {
    vec![
        ("batch_id", Some(batch_id.to_owned())),
        ("payment_reference", Some(reference.to_owned())),
        ("merchant_id", Some(merchant.to_owned())),
        ("gross", amount(gross)),
        ("fee", amount(fee)),
        ("net", amount(net)),
        ("currency", Some(currency.trim().to_owned())),
        ("settlement_date", Some(date.to_string())),
        ("event_time", time(event_time)),
    ]
}

impl Keyed for SettlementLine {
    const TYPE: &'static str = "settlement_line";

    fn id(&self) -> &str {
        &self.line_id
    }

    fn fields(&self) -> Fields {
        settlement_fields(
            &self.batch_id,
            &self.payment_reference,
            &self.merchant_id,
            self.gross,
            self.fee,
            self.net,
            self.currency.code(),
            self.settlement_date,
            self.event_time,
        )
    }

    fn insert<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        topics: &'a [String],
        shard: &'a str,
        records: &'a [&'a (Self, Source)],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(insert_settlements(tx, topics, shard, records))
    }

    fn stored<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<HashMap<String, StoredRow>, sqlx::Error>> {
        Box::pin(async move {
            type Row = (
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
            let rows: Vec<Row> = sqlx::query_as(
            "SELECT line_id, batch_id, payment_reference, merchant_id, gross, fee, net, currency,
                    settlement_date, event_time, source_topic, source_partition, source_offset
               FROM settlement_lines WHERE line_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    let fields = settlement_fields(&r.1, &r.2, &r.3, r.4, r.5, r.6, &r.7, r.8, r.9);
                    (
                        r.0,
                        StoredRow {
                            fields,
                            position: (r.10, r.11, r.12),
                        },
                    )
                })
                .collect())
        })
    }
}

/// A payment event like `p` in every respect the schema could refuse for reasons of its own
/// (kind, currency, event time), with harmless ids and amount.
fn payment_twin(p: &PaymentEvent) -> PaymentEvent {
    PaymentEvent {
        event_id: PROBE.into(),
        payment_reference: PROBE.into(),
        merchant_id: PROBE.into(),
        kind: p.kind,
        amount: Decimal::ONE,
        currency: p.currency,
        event_time: p.event_time,
        psp_reference: p.psp_reference.as_ref().map(|_| PROBE.into()),
    }
}

/// The settlement-line counterpart of [`payment_twin`].
fn settlement_twin(l: &SettlementLine) -> SettlementLine {
    SettlementLine {
        line_id: PROBE.into(),
        batch_id: PROBE.into(),
        payment_reference: PROBE.into(),
        merchant_id: PROBE.into(),
        gross: Decimal::ONE,
        fee: Decimal::ZERO,
        net: Decimal::ONE,
        currency: l.currency,
        settlement_date: l.settlement_date,
        event_time: l.event_time,
    }
}

/// The bank-statement counterpart of [`payment_twin`].
fn payout_twin(b: &BankPayout) -> BankPayout {
    BankPayout {
        statement_line_id: PROBE.into(),
        account_id: PROBE.into(),
        value_date: b.value_date,
        amount: Decimal::ONE,
        currency: b.currency,
        batch_reference: b.batch_reference.as_ref().map(|_| PROBE.into()),
        description: String::new(),
        event_time: b.event_time,
    }
}

/// Runs one of the statements below on the one savepoint records are applied under (one try at a time, re-declared
/// for each); static text, so it goes as a simple query.
async fn savepoint(
    tx: &mut Transaction<'_, Postgres>,
    sql: &'static str,
) -> Result<(), sqlx::Error> {
    use sqlx::Executor;
    (&mut **tx).execute(sql).await.map(|_| ())
}

const SAVEPOINT_SET: &str = "SAVEPOINT payrecon_records";
const SAVEPOINT_RELEASE: &str = "RELEASE SAVEPOINT payrecon_records";
const SAVEPOINT_ROLLBACK: &str = "ROLLBACK TO SAVEPOINT payrecon_records";

/// Reconciles what was inserted (`inserted`: the payment and line ids actually inserted, out
/// of `records`) with one reference snapshot: the touched references, then the items the
/// watermark made due; then the daily totals. Runs inside the caller's transaction.
pub(crate) async fn reconcile_inserted<'r>(
    tx: &mut Transaction<'_, Postgres>,
    (group, instance, shard): (&str, &str, &str),
    reconciler: &Reconciler,
    records: Records<'r>,
    (inserted_payments, inserted_lines, inserted_payouts): (&[String], &[String], &[String]),
) -> Result<ReconcileOutcome, sqlx::Error> {
    let snapshot = reconciler.cache.snapshot();
    let mut targets = Targets::default();
    let mut daily = DailyDeltas::default();
    record_inserted(
        (records.payments, records.settlements),
        (inserted_payments, inserted_lines),
        &mut targets,
        &mut daily,
    );
    if !reconciler.enabled {
        daily.write(tx, shard).await?;
        return Ok(ReconcileOutcome::default());
    }
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
    daily.write(tx, shard).await?;
    if let Some(rules) = &reconciler.payouts {
        // Last in the transaction: a batch's item is shared by the partitions its lines
        // came from, so its row lock is held only from here to the commit.
        let lines = inserted_only(records.settlements, inserted_lines, |l| &l.line_id);
        let payouts = inserted_only(records.payouts, inserted_payouts, |b| &b.statement_line_id);
        outcome.payouts = super::payouts::reconcile(tx, &who, rules, &lines, &payouts).await?;
    }
    Ok(outcome)
}

/// The records of `records` whose ids are in `inserted` (first occurrence of each id).
fn inserted_only<'r, T>(
    records: &[&'r (T, Source)],
    inserted: &[String],
    id: impl Fn(&T) -> &String,
) -> Vec<&'r T> {
    if inserted.is_empty() {
        return Vec::new();
    }
    let mut by_id: HashMap<&str, &'r T> = HashMap::with_capacity(records.len());
    for (r, _) in records.iter().copied() {
        by_id.entry(id(r).as_str()).or_insert(r);
    }
    (inserted.iter())
        .filter_map(|i| by_id.get(i.as_str()).copied())
        .collect()
}

/// Adds the rows this transaction inserted (not the re-deliveries) to the references to
/// evaluate and to the daily totals.
fn record_inserted<'r>(
    (payments, settlements): (&Payments<'r>, &Settlements<'r>),
    (inserted_payments, inserted_lines): (&[String], &[String]),
    targets: &mut Targets<'r>,
    daily: &mut DailyDeltas,
) {
    if !inserted_payments.is_empty() {
        let mut by_id: HashMap<&str, &PaymentEvent> = HashMap::with_capacity(payments.len());
        for (p, _) in payments.iter().copied() {
            by_id.entry(p.event_id.as_str()).or_insert(p);
        }
        for id in inserted_payments {
            if let Some(p) = by_id.get(id.as_str()) {
                targets.event(p);
                daily.payment(p);
            }
        }
    }
    if !inserted_lines.is_empty() {
        let mut by_id: HashMap<&str, &SettlementLine> = HashMap::with_capacity(settlements.len());
        for (l, _) in settlements.iter().copied() {
            by_id.entry(l.line_id.as_str()).or_insert(l);
        }
        for id in inserted_lines {
            if let Some(l) = by_id.get(id.as_str()) {
                targets.line(l);
                daily.settlement(l);
            }
        }
    }
}

impl Batch {
    /// The running-totals shard of this batch: its first input partition, `topic/partition`.
    /// Two instances never own one partition, so two instances' batches never share a shard
    /// (a zombie's batch is fenced at its offsets, which it updates first).
    pub fn shard(&self) -> String {
        (self.progress.iter())
            .map(|p| (p.topic.as_str(), p.partition))
            .min()
            .map_or_else(String::new, |(t, p)| format!("{t}/{p}"))
    }

    /// The highest event time per partition among the batch's records (the watermark's input).
    fn max_event_times(&self) -> HashMap<(&str, i32), DateTime<Utc>> {
        let mut out: HashMap<(&str, i32), DateTime<Utc>> = HashMap::new();
        let times = (self.payments.iter().map(|(p, s)| (p.event_time, s)))
            .chain(self.settlements.iter().map(|(l, s)| (l.event_time, s)))
            .chain(self.payouts.iter().map(|(b, s)| (b.event_time, s)));
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
    // In one key order: a zombie's batch and the new owner's may cover the same partitions
    // during a rebalance, and rows locked in the order records arrived could deadlock.
    let mut sorted: Vec<&PartitionProgress> = progress.iter().collect();
    sorted.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let (known, new): (Vec<&PartitionProgress>, Vec<&PartitionProgress>) =
        sorted.into_iter().partition(|p| p.expected.is_some());
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
pub(crate) async fn insert_settlements(
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

/// Inserts dead letters; their messages are made printable and bounded first (a message may
/// quote record content, and text cannot hold every byte a record can).
async fn insert_dead_letters<'d>(
    tx: &mut Transaction<'_, Postgres>,
    topics: &[String],
    letters: impl Iterator<Item = &'d DeadLetter>,
) -> Result<u64, sqlx::Error> {
    let letters: Vec<&DeadLetter> = letters.collect();
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
    let messages: Vec<String> = letters
        .iter()
        .map(|d| super::printable(&d.error_message, 2000))
        .collect();
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
