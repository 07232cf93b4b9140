//! Reconciliation inside a transaction: lock the payment references to evaluate, read all
//! their events and lines, run the pure matcher ([`crate::reconcile::evaluate`]) with one
//! reference-data [`Snapshot`], and write the verdicts, the history of status changes, the
//! exceptions outbox and the daily totals (the SQL: [`crate::store::items`]).
//!
//! ## Why concurrent instances cannot miss a match
//! Two instances may insert a payment and its settlement line in concurrent transactions
//! (the topics are partitioned independently). Each transaction inserts its records
//! *first*, then locks the items of the references it touched (in key order, so two
//! transactions cannot deadlock on them), and only *then* reads the references' events and
//! lines. Under READ COMMITTED every statement sees what was committed before it started, so
//! the transaction that gets the lock second sees the other's records: the last evaluation
//! of a reference always sees all of its records.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use crate::config::ReconciliationSettings;
use crate::domain::{PaymentEvent, SettlementLine};
use crate::reconcile::watermark::group_watermark;
use crate::reconcile::{
    Bucket, Cause, ClockRules, DailyDeltas, Evaluation, GroupWatermark, ItemState, LogEnd,
    PartitionClock, Priced, ReconcileOutcome, Rules, Target, Targets, TopicClock, fold, judge,
    recompute, transition,
};
use crate::reference::{ReferenceCache, Snapshot};
use crate::store::items::{self, Changes, ItemRows, StoredItem};
use crate::store::{Store, records};

/// The rules and the reference cache: what a transaction needs to reconcile.
#[derive(Debug, Clone)]
pub struct Reconciler {
    /// `false`: ingestion only (`reconciliation.enabled`).
    pub enabled: bool,
    pub rules: Rules,
    pub cache: Arc<ReferenceCache>,
    /// Partitions of the input topics. The watermark stays at its minimum until every one of
    /// them has applied a record, so the first partitions committed cannot push it ahead of
    /// the others. `None`: judge by the partitions committed so far (tools that run after the
    /// service, benchmarks).
    pub input_partitions: Option<i64>,
    /// The input partitions' log ends as last fetched from the broker: what says a partition
    /// is caught up, hence may be idle. `None`: no partition is ever idle (tools).
    pub log_ends: Option<Arc<LogEnds>>,
    /// The payout leg's rules; `None`: the leg is off (no payouts topic, or reconciliation
    /// off), and no payout item is written.
    pub payouts: Option<crate::reconcile::PayoutRules>,
}

/// A log end and when it was fetched (`None`: fixed, never stale).
type FetchedLogEnd = (LogEnd, Option<std::time::Instant>);

/// The input partitions' log ends (low and high watermarks) as last fetched, shared between
/// the lag reporter that fetches them and the transactions that judge the watermark.
#[derive(Debug)]
pub struct LogEnds {
    /// (topic, partition) → log end and when it was fetched (`None`: fixed, never stale).
    ends: std::sync::RwLock<HashMap<(String, i32), FetchedLogEnd>>,
    /// A log end fetched longer ago than this counts as unknown: a partition is never idle
    /// on an old answer.
    max_age: std::time::Duration,
}

impl LogEnds {
    /// Filled by the lag reporter ([`LogEnds::update`]); entries older than `max_age` are
    /// unknown.
    pub fn live(max_age: std::time::Duration) -> Self {
        LogEnds {
            ends: Default::default(),
            max_age,
        }
    }

    /// Log ends that never change (a replay: the end of each partition's range).
    pub fn fixed(ends: HashMap<(String, i32), LogEnd>) -> Self {
        LogEnds {
            ends: std::sync::RwLock::new(ends.into_iter().map(|(k, e)| (k, (e, None))).collect()),
            max_age: std::time::Duration::MAX,
        }
    }

    /// Records log ends fetched just now.
    pub fn update(&self, fetched: impl IntoIterator<Item = ((String, i32), LogEnd)>) {
        let now = std::time::Instant::now();
        if let Ok(mut ends) = self.ends.write() {
            for (k, e) in fetched {
                ends.insert(k, (e, Some(now)));
            }
        }
    }

    /// Every partition known, with its log end if fresh.
    pub fn current(&self) -> HashMap<(String, i32), Option<LogEnd>> {
        let Ok(ends) = self.ends.read() else {
            return HashMap::new();
        };
        ends.iter()
            .map(|(k, (e, at))| {
                let fresh = at.is_none_or(|at| at.elapsed() <= self.max_age);
                (k.clone(), fresh.then_some(*e))
            })
            .collect()
    }
}

impl Reconciler {
    pub fn new(
        settings: &ReconciliationSettings,
        cache: Arc<ReferenceCache>,
        input_partitions: Option<i64>,
    ) -> Self {
        Reconciler {
            enabled: settings.enabled,
            rules: Rules::from_settings(settings),
            cache,
            input_partitions,
            log_ends: None,
            payouts: settings
                .enabled
                .then(|| Rules::from_settings(settings).payout),
        }
    }

    /// Turns the payout leg off when `on` is false (no payouts topic is configured:
    /// `kafka.payouts_topic = ""`), so batches are not awaited on a statement never read.
    pub fn with_payout_leg(mut self, on: bool) -> Self {
        if !on {
            self.payouts = None;
        }
        self
    }

    /// Judges idleness with `log_ends` (see [`crate::reconcile::watermark`]).
    pub fn with_log_ends(mut self, log_ends: Arc<LogEnds>) -> Self {
        self.log_ends = Some(log_ends);
        self
    }

    /// The group's event-time watermark as this reconciler judges it (see [`watermark`]).
    pub async fn watermark(
        &self,
        tx: &mut sqlx::PgConnection,
        group: &str,
    ) -> Result<DateTime<Utc>, sqlx::Error> {
        Ok(self.group_watermark(tx, group).await?.watermark)
    }

    /// The watermark with every partition's standing (metrics, reports).
    pub async fn group_watermark(
        &self,
        conn: &mut sqlx::PgConnection,
        group: &str,
    ) -> Result<GroupWatermark, sqlx::Error> {
        let ends = self.log_ends.as_ref().map(|l| l.current());
        watermark(
            conn,
            group,
            &self.rules.clock,
            self.input_partitions,
            ends.as_ref(),
        )
        .await
    }
}

/// The group's event-time watermark (the rule: [`crate::reconcile::watermark`]) from the
/// stored offsets and, when given, the input partitions' log ends (every partition the broker
/// has, so an empty one without a stored row is judged too; `None` entries are unknown).
///
/// The lowest over partitions, because partitions (and the two topics) are consumed
/// independently: after a backlog, one partition can be days ahead of another, and with the
/// highest time overall every payment not yet read from a slower partition would look
/// overdue, opening a false exception for each. This way a deadline is judged only once every
/// partition that counts has passed it; an idle one (caught up, and empty or quiet in broker
/// time) does not count, so it no longer holds the watermark back forever.
async fn watermark(
    conn: &mut sqlx::PgConnection,
    group: &str,
    rules: &ClockRules,
    input_partitions: Option<i64>,
    log_ends: Option<&HashMap<(String, i32), Option<LogEnd>>>,
) -> Result<GroupWatermark, sqlx::Error> {
    let rows = items::partition_clocks(conn, group).await?;
    let mut clocks: BTreeMap<(String, i32), PartitionClock> = BTreeMap::new();
    for (topic, partition, next, last, max) in rows {
        let log_end = log_ends
            .and_then(|e| e.get(&(topic.clone(), partition)))
            .copied()
            .flatten();
        clocks.insert(
            (topic.clone(), partition),
            PartitionClock {
                topic,
                partition,
                next_offset: Some(next),
                last_record_time: last,
                max_event_time: max,
                log_end,
            },
        );
    }
    for ((topic, partition), end) in log_ends.into_iter().flatten() {
        clocks
            .entry((topic.clone(), *partition))
            .or_insert_with(|| PartitionClock {
                topic: topic.clone(),
                partition: *partition,
                next_offset: None,
                last_record_time: None,
                max_event_time: None,
                log_end: *end,
            });
    }
    let clocks: Vec<PartitionClock> = clocks.into_values().collect();
    Ok(group_watermark(&clocks, rules, input_partitions))
}

/// Who evaluates: recorded in the history.
#[derive(Clone, Copy)]
pub struct Evaluator<'a> {
    pub group: &'a str,
    pub instance: &'a str,
    pub rules: &'a Rules,
    pub snapshot: &'a Snapshot,
    pub watermark: DateTime<Utc>,
}

/// One reference's new state and verdict.
struct Judged {
    state: ItemState,
    evaluation: Evaluation,
    bucket: Bucket,
    /// The watermark it was judged at.
    watermark: DateTime<Utc>,
}

/// Folds each target's new records into its stored state (`prior`), re-reading the records
/// of those whose state cannot be carried forward (see [`crate::reconcile::state`]), and
/// judges them. Targets with no state and no records are left out.
async fn judge_targets<'t>(
    tx: &mut Transaction<'_, Postgres>,
    who: &Evaluator<'_>,
    targets: impl Iterator<Item = (&'t String, &'t Target<'t>)>,
    prior: &HashMap<String, StoredItem>,
) -> Result<BTreeMap<&'t str, Judged>, sqlx::Error> {
    let data = Priced {
        rules: who.rules,
        snapshot: who.snapshot,
    };
    let mut states: Vec<(&'t str, ItemState)> = Vec::new();
    let mut reread: Vec<&'t str> = Vec::new();
    for (reference, t) in targets {
        let before = prior.get(reference).and_then(|p| p.state.as_ref());
        let stored = prior.contains_key(reference);
        let no_records = t.events.is_empty() && t.lines.is_empty();
        let state = match (before, no_records) {
            _ if t.cause == Cause::ReferenceData => None,
            (Some(s), true) => Some(s.clone()),
            (None, true) if !stored => continue, // nothing stored, nothing new
            (None, _) if stored => None,
            (before, _) => fold(before, &t.events, &t.lines, &data),
        };
        match state {
            Some(state) => states.push((reference.as_str(), state)),
            None => reread.push(reference.as_str()),
        }
    }
    if !reread.is_empty() {
        crate::metrics::records_reread(reread.len() as u64);
        let mut records = records::records_of(tx, &reread).await?;
        for reference in reread {
            // No record at all (rows deleted by hand): nothing to judge; a stored verdict is
            // left for an audit to flag.
            let Some((events, lines)) = records.remove(reference) else {
                continue;
            };
            let events: Vec<&PaymentEvent> = events.iter().collect();
            let lines: Vec<&SettlementLine> = lines.iter().collect();
            let state = recompute(&events, &lines, &data);
            states.push((reference, state));
        }
    }
    let mut judged = BTreeMap::new();
    for (reference, state) in states {
        let at = prior
            .get(reference)
            .map_or(who.watermark, |p| p.watermark.max(who.watermark));
        let (evaluation, bucket) = judge(&state, &data, at);
        let j = Judged {
            state,
            evaluation,
            bucket,
            watermark: at,
        };
        judged.insert(reference, j);
    }
    Ok(judged)
}

/// Evaluates `targets`: folds the records inserted into each reference's state and judges
/// it, writes the items that changed, the history of status changes and the outbox rows;
/// adds the items' moves between daily buckets to `daily`.
pub async fn evaluate_targets(
    tx: &mut Transaction<'_, Postgres>,
    who: &Evaluator<'_>,
    targets: Targets<'_>,
    daily: &mut DailyDeltas,
) -> Result<ReconcileOutcome, sqlx::Error> {
    let mut outcome = ReconcileOutcome {
        watermark: Some(who.watermark),
        ..Default::default()
    };
    if targets.is_empty() {
        return Ok(outcome);
    }
    let refs: Vec<&str> = targets.refs.keys().map(String::as_str).collect();
    let mut prior = items::lock_items(tx, &refs).await?;
    let mut judged = judge_targets(tx, who, targets.refs.iter(), &prior).await?;

    // New items first: another instance may have created one since it was locked above (its
    // records arrived on another partition). Those are locked now, their committed state
    // read, and judged again with this transaction's records folded in.
    let new: Vec<(&str, &Judged)> = (judged.iter())
        .filter(|(r, _)| !prior.contains_key(**r))
        .map(|(r, j)| (*r, j))
        .collect();
    if !new.is_empty() {
        let mut rows = ItemRows::default();
        for (reference, j) in &new {
            rows.push(reference, (&j.evaluation, &j.state, &j.bucket, j.watermark));
        }
        let inserted = items::insert_items(tx, &rows).await?;
        let raced: Vec<&str> = (new.iter())
            .map(|(r, _)| *r)
            .filter(|r| !inserted.contains(*r))
            .collect();
        if !raced.is_empty() {
            prior.extend(items::lock_items(tx, &raced).await?);
            let again = (targets.refs.iter()).filter(|(r, _)| raced.contains(&r.as_str()));
            judged.extend(judge_targets(tx, who, again, &prior).await?);
        }
    }

    let mut updates = ItemRows::default();
    let mut changes = Changes::default();
    for (reference, j) in &judged {
        let t = &targets.refs[*reference];
        let before = prior.get(*reference);
        outcome.evaluated += 1;
        let unchanged = before.is_some_and(|p| {
            p.status == j.evaluation.status
                && p.state.as_ref() == Some(&j.state)
                && p.reason == j.evaluation.reason
                && p.deadline == j.evaluation.deadline
                && p.bucket == j.bucket
        });
        if unchanged {
            continue; // one write per changed row: nothing to write
        }
        if let Some(p) = before {
            daily.item(&p.bucket, p.status, -1);
        }
        daily.item(&j.bucket, j.evaluation.status, 1);
        if let Some(tr) = transition(before.map(|p| p.status), j.evaluation.status) {
            *outcome.status_changes.entry(tr.to).or_default() += 1;
            let opened = tr.to.is_exception();
            let publish = opened != tr.from.is_some_and(|s| s.is_exception());
            if publish {
                if opened {
                    outcome.exceptions_opened += 1;
                } else {
                    outcome.exceptions_resolved += 1;
                }
            }
            let change = (tr.from, tr.to, t.cause, publish);
            changes.push(reference, change, &t.caused_by, &j.evaluation, &j.bucket);
        }
        if before.is_some() {
            updates.push(reference, (&j.evaluation, &j.state, &j.bucket, j.watermark));
        }
    }
    items::write_changes(
        tx,
        (who.watermark, who.group, who.instance),
        updates,
        changes,
    )
    .await?;
    Ok(outcome)
}

/// The verdict on one reference from all of its records (`report --verify`'s re-evaluation:
/// the same fold and judgement as the service's, started from nothing), with the state.
pub fn judge_records(
    who: &Evaluator<'_>,
    events: &[PaymentEvent],
    lines: &[SettlementLine],
) -> (ItemState, Evaluation, Bucket) {
    let data = Priced {
        rules: who.rules,
        snapshot: who.snapshot,
    };
    let events: Vec<&PaymentEvent> = events.iter().collect();
    let lines: Vec<&SettlementLine> = lines.iter().collect();
    let state = recompute(&events, &lines, &data);
    let (evaluation, bucket) = judge(&state, &data, who.watermark);
    (state, evaluation, bucket)
}

/// What is still to do for reconciliation to be final for what has been consumed: the
/// watermark judged without log ends (nothing idle: the lowest over partitions with an event
/// time, less `lateness`), then the due items and unpublished outbox rows at it.
pub async fn reconciliation_backlog(
    store: &Store,
    group: &str,
    lateness: chrono::Duration,
) -> Result<items::Backlog, sqlx::Error> {
    let mut conn = store.pool().acquire().await?;
    let rules = ClockRules {
        default: TopicClock {
            idle_timeout: chrono::Duration::MAX,
            allowed_lateness: lateness,
        },
        topics: BTreeMap::new(),
    };
    let wm = watermark(&mut conn, group, &rules, None, None)
        .await?
        .watermark;
    drop(conn);
    store.reconciliation_backlog_at(wm).await
}
