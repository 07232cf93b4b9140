//! Applying records inside the batch transaction, for every input alike: the first
//! occurrence of each id is inserted, every other one sorted into re-deliveries (counted)
//! and conflicting duplicates (kept, the stored row unchanged); then what was inserted is
//! reconciled.
//!
//! ## Duplicates
//! Events and lines are inserted by id with insert-or-ignore. A record whose id is already
//! stored (or appears earlier in the batch) with the same business fields is a re-delivery:
//! counted, nothing else. With different fields it is a *conflicting duplicate*: the stored row
//! is never changed, and the incoming version is kept in `conflicting_duplicates` with both
//! versions' fields and log positions.

use std::collections::HashMap;

use sqlx::{Postgres, Transaction};

use super::reconciler::{Evaluator, Reconciler, evaluate_targets};
use crate::domain::{BankPayout, PaymentEvent, SettlementLine};
use crate::inputs::{Input, fields_json};
use crate::reconcile::ReconcileOutcome;
use crate::reconcile::{Cause, DailyDeltas, Targets};
use crate::store::{DeadLetter, RawRecord, Source, items, records};

/// What applying a set of records changed.
#[derive(Debug, Default)]
pub struct Applied {
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
    pub(super) fn merge(&mut self, other: Applied) {
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
pub struct Records<'b> {
    pub payments: &'b Payments<'b>,
    pub settlements: &'b Settlements<'b>,
    pub payouts: &'b Payouts<'b>,
}

impl<'b> Records<'b> {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.payments.len() + self.settlements.len() + self.payouts.len()
    }

    /// Records `a..b` of the sequence.
    pub(super) fn slice(&self, a: usize, b: usize) -> Records<'b> {
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

    pub(super) fn first_source(&self) -> Option<Source> {
        (self.payments.first().map(|(_, s)| *s))
            .or_else(|| self.settlements.first().map(|(_, s)| *s))
            .or_else(|| self.payouts.first().map(|(_, s)| *s))
    }
}

/// Applies records inside the caller's transaction: inserts, duplicates, reconciliation.
pub struct Apply<'a> {
    pub group: &'a str,
    pub instance: &'a str,
    pub reconciler: &'a Reconciler,
    pub topics: &'a [String],
    pub raw: &'a HashMap<Source, RawRecord>,
    /// The running-totals shard this transaction writes (see [`Batch::shard`]).
    pub shard: &'a str,
}

impl Apply<'_> {
    /// Inserts the records, keeps conflicting duplicates, reconciles what was inserted.
    pub async fn apply(
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
    async fn insert_checked<R: Input>(
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
                Some((fields, position)) => Some((fields.clone(), position.clone())),
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
            records::insert_conflicting_duplicate(
                tx,
                (R::TYPE, r.0.id()),
                &position,
                (&self.topics[r.1.topic], r.1),
                fields_json(&stored_fields),
                fields_json(&incoming),
                &differing,
                &raw,
            )
            .await?;
            out.conflicts.push(r.1);
        }
        Ok(out)
    }
}

/// Outcome of [`Apply::insert_checked`] for one record type.
#[derive(Debug, Default)]
pub(super) struct Checked {
    /// Ids inserted by this statement.
    inserted: Vec<String>,
    duplicates: u64,
    conflicts: Vec<Source>,
}

/// Reconciles what was inserted (`inserted`: the payment and line ids actually inserted, out
/// of `records`) with one reference snapshot: the touched references, then the items the
/// watermark made due; then the daily totals. Runs inside the caller's transaction.
pub async fn reconcile_inserted<'r>(
    tx: &mut Transaction<'_, Postgres>,
    (group, instance, shard): (&str, &str, &str),
    reconciler: &Reconciler,
    records: Records<'r>,
    (inserted_payments, inserted_lines, inserted_payouts): (&[String], &[String], &[String]),
) -> Result<ReconcileOutcome, sqlx::Error> {
    let snapshot = reconciler.cache.snapshot();
    let mut targets = Targets::default();
    let mut daily = DailyDeltas::default();
    for r in inserted_only(records.payments, inserted_payments, |p| &p.event_id) {
        r.contribute(&mut targets, &mut daily);
    }
    for r in inserted_only(records.settlements, inserted_lines, |l| &l.line_id) {
        r.contribute(&mut targets, &mut daily);
    }
    if !reconciler.enabled {
        items::write_daily(tx, shard, daily.into_rows()).await?;
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
    let due = items::due_items(tx, who.watermark, reconciler.rules.due_sweep_limit).await?;
    if !due.is_empty() {
        let mut targets = Targets::default();
        for reference in due {
            targets.other(reference, Cause::Deadline);
        }
        outcome.merge(evaluate_targets(tx, &who, targets, &mut daily).await?);
    }
    items::write_daily(tx, shard, daily.into_rows()).await?;
    if let Some(rules) = &reconciler.payouts {
        // Last in the transaction: a batch's item is shared by the partitions its lines
        // came from, so its row lock is held only from here to the commit.
        let lines = inserted_only(records.settlements, inserted_lines, |l| &l.line_id);
        let payouts = inserted_only(records.payouts, inserted_payouts, |b| &b.statement_line_id);
        outcome.payouts = super::payout::reconcile(tx, &who, rules, &lines, &payouts).await?;
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
