//! Reconciliation inside a transaction: lock the payment references to evaluate, read all
//! their events and lines, run the pure matcher ([`crate::reconcile::evaluate`]) with one
//! reference-data [`Snapshot`], and write the verdicts, the history of status changes, the
//! exceptions outbox and the daily totals.
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

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use crate::config::ReconciliationSettings;
use crate::domain::{Currency, PaymentEvent, PaymentEventKind, SettlementLine};
use crate::reconcile::watermark::group_watermark;
use crate::reconcile::{
    Bucket, ClockRules, Evaluation, GroupWatermark, ItemState, LogEnd, PartitionClock, Priced,
    Rules, Status, TopicClock, fold, judge, recompute, transition,
};
use crate::reference::{ReferenceCache, Snapshot};

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

/// Why a reference is evaluated; recorded with every status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Records of the reference were inserted (their ids are recorded).
    Records,
    /// The watermark passed the item's deadline.
    Deadline,
    /// Reference data changed while the item waited for it, or a correction changed the
    /// reference data it was judged with.
    ReferenceData,
}

impl Cause {
    fn as_str(&self) -> &'static str {
        match self {
            Cause::Records => "RECORDS",
            Cause::Deadline => "DEADLINE",
            Cause::ReferenceData => "REFERENCE_DATA",
        }
    }
}

/// The references to evaluate in one transaction, with why, and the records this
/// transaction inserted for each (folded into its state).
#[derive(Debug, Default)]
pub struct Targets<'r> {
    refs: BTreeMap<String, Target<'r>>,
}

#[derive(Debug)]
struct Target<'r> {
    cause: Cause,
    /// Ids of the records that caused it.
    caused_by: Vec<String>,
    events: Vec<&'r PaymentEvent>,
    lines: Vec<&'r SettlementLine>,
}

impl<'r> Targets<'r> {
    fn target(&mut self, reference: &str) -> &mut Target<'r> {
        let t = (self.refs.entry(reference.to_owned())).or_insert(Target {
            cause: Cause::Records,
            caused_by: Vec::new(),
            events: Vec::new(),
            lines: Vec::new(),
        });
        t.cause = Cause::Records;
        t
    }

    /// A payment event was inserted.
    pub fn event(&mut self, e: &'r PaymentEvent) {
        let t = self.target(&e.payment_reference);
        t.caused_by.push(e.event_id.clone());
        t.events.push(e);
    }

    /// A settlement line was inserted.
    pub fn line(&mut self, l: &'r SettlementLine) {
        let t = self.target(&l.payment_reference);
        t.caused_by.push(l.line_id.clone());
        t.lines.push(l);
    }

    /// `reference` is evaluated for `cause` unless records already cause it.
    pub fn other(&mut self, reference: String, cause: Cause) {
        self.refs.entry(reference).or_insert(Target {
            cause,
            caused_by: Vec::new(),
            events: Vec::new(),
            lines: Vec::new(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }
}

/// What reconciliation changed in one transaction (for metrics and logs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileOutcome {
    /// References evaluated.
    pub evaluated: u64,
    /// Status changes by the status entered.
    pub status_changes: BTreeMap<Status, u64>,
    /// Outbox rows written: exceptions opened and resolved.
    pub exceptions_opened: u64,
    pub exceptions_resolved: u64,
    /// The watermark the evaluations used.
    pub watermark: Option<DateTime<Utc>>,
    /// What the payout leg changed.
    pub payouts: super::payouts::PayoutOutcome,
}

impl ReconcileOutcome {
    pub fn merge(&mut self, other: ReconcileOutcome) {
        self.evaluated += other.evaluated;
        for (s, n) in other.status_changes {
            *self.status_changes.entry(s).or_default() += n;
        }
        self.exceptions_opened += other.exceptions_opened;
        self.exceptions_resolved += other.exceptions_resolved;
        self.watermark = self.watermark.max(other.watermark);
        self.payouts.merge(other.payouts);
    }
}

/// Per merchant/day/currency increments, applied in one statement in key order at the end of
/// the transaction (the rows are hot: holding their locks briefly and in one order keeps
/// concurrent instances from waiting long or deadlocking).
#[derive(Debug, Default)]
pub struct DailyDeltas {
    rows: BTreeMap<(String, NaiveDate, &'static str), [Decimal; 13]>,
}

/// The counted columns of `merchant_daily_totals`, in [`DailyDeltas`] row order: the first
/// ten sum events and lines, the last three count items by status.
pub const DAILY_COLUMNS: [&str; 13] = [
    "captured_count",
    "captured",
    "refunded_count",
    "refunded",
    "charged_back_count",
    "charged_back",
    "settled_count",
    "settled_gross",
    "settled_fees",
    "settled_net",
    "matched_count",
    "expected_count",
    "exception_count",
];

impl DailyDeltas {
    fn row(&mut self, merchant: &str, date: NaiveDate, currency: Currency) -> &mut [Decimal; 13] {
        self.rows
            .entry((merchant.to_owned(), date, currency.code()))
            .or_insert([Decimal::ZERO; 13])
    }

    /// A payment event was inserted.
    pub fn payment(&mut self, e: &PaymentEvent) {
        let row = self.row(&e.merchant_id, e.event_time.date_naive(), e.currency);
        let i = match e.kind {
            PaymentEventKind::Capture => 0,
            PaymentEventKind::Refund => 2,
            PaymentEventKind::Chargeback => 4,
        };
        row[i] += Decimal::ONE;
        row[i + 1] += e.amount;
    }

    /// A settlement line was inserted.
    pub fn settlement(&mut self, l: &SettlementLine) {
        let row = self.row(&l.merchant_id, l.settlement_date, l.currency);
        row[6] += Decimal::ONE;
        row[7] += l.gross;
        row[8] += l.fee;
        row[9] += l.net;
    }

    /// An item enters (`sign` 1) or leaves (−1) a bucket with `status`.
    fn item(&mut self, bucket: &Bucket, status: Status, sign: i64) {
        let row = self.row(&bucket.merchant_id, bucket.date, bucket.currency);
        let i = match status {
            Status::Matched => 10,
            Status::Expected => 11,
            _ => 12,
        };
        row[i] += Decimal::from(sign);
    }

    /// Upserts every row with a non-zero change into `shard` (see the migration
    /// `running_state`: a shard no concurrent transaction of another instance writes).
    pub async fn write(
        self,
        tx: &mut Transaction<'_, Postgres>,
        shard: &str,
    ) -> Result<(), sqlx::Error> {
        let rows: Vec<_> = (self.rows.into_iter())
            .filter(|(_, v)| v.iter().any(|d| !d.is_zero()))
            .collect();
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
}

/// The stored state of an item before this evaluation.
struct Prior {
    status: Status,
    bucket: Bucket,
    /// The watermark the item was last judged at: it is never judged at a lower one, so a
    /// partition that becomes active again with older event times cannot reopen a deadline.
    watermark: DateTime<Utc>,
    /// `None`: judged before items kept their state; re-read once.
    state: Option<ItemState>,
    reason: String,
    deadline: Option<DateTime<Utc>>,
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
pub async fn watermark(
    conn: &mut sqlx::PgConnection,
    group: &str,
    rules: &ClockRules,
    input_partitions: Option<i64>,
    log_ends: Option<&HashMap<(String, i32), Option<LogEnd>>>,
) -> Result<GroupWatermark, sqlx::Error> {
    type Row = (
        String,
        i32,
        i64,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT topic, partition, next_offset, last_record_time, max_event_time
           FROM consumer_offsets WHERE consumer_group = $1",
    )
    .bind(group)
    .fetch_all(&mut *conn)
    .await?;
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

/// Who evaluates: recorded in the history.
#[derive(Clone, Copy)]
pub struct Evaluator<'a> {
    pub group: &'a str,
    pub instance: &'a str,
    pub rules: &'a Rules,
    pub snapshot: &'a Snapshot,
    pub watermark: DateTime<Utc>,
}

type EventRow = (
    String,
    String,
    String,
    String,
    Decimal,
    String,
    DateTime<Utc>,
    Option<String>,
);
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
);

fn currency(code: &str) -> Result<Currency, sqlx::Error> {
    Currency::from_code(code.trim()).map_err(|e| sqlx::Error::Decode(e.to_string().into()))
}

/// The payment events and settlement lines of each of `refs` (references without any record
/// are absent), each side sorted by (event time, id): the order [`judge`] takes its anchor
/// from. The batch evaluation and `report --verify`'s re-evaluation both read through here, so
/// the verifier judges exactly what the service judged.
pub(super) async fn records_of(
    conn: &mut sqlx::PgConnection,
    refs: &[&str],
) -> Result<HashMap<String, (Vec<PaymentEvent>, Vec<SettlementLine>)>, sqlx::Error> {
    let events: Vec<EventRow> = sqlx::query_as(
        "SELECT event_id, payment_reference, merchant_id, kind, amount, currency, event_time,
                psp_reference
           FROM payment_events WHERE payment_reference = ANY($1)",
    )
    .bind(refs)
    .fetch_all(&mut *conn)
    .await?;
    let lines: Vec<LineRow> = sqlx::query_as(
        "SELECT line_id, batch_id, payment_reference, merchant_id, gross, fee, net, currency,
                settlement_date, event_time
           FROM settlement_lines WHERE payment_reference = ANY($1)",
    )
    .bind(refs)
    .fetch_all(&mut *conn)
    .await?;
    let mut by_ref: HashMap<String, (Vec<PaymentEvent>, Vec<SettlementLine>)> =
        HashMap::with_capacity(refs.len());
    for (event_id, reference, merchant_id, kind, amount, cur, event_time, psp) in events {
        let kind = PaymentEventKind::parse(&kind)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown kind {kind}").into()))?;
        by_ref
            .entry(reference.clone())
            .or_default()
            .0
            .push(PaymentEvent {
                event_id,
                payment_reference: reference,
                merchant_id,
                kind,
                amount,
                currency: currency(&cur)?,
                event_time,
                psp_reference: psp,
            });
    }
    for (line_id, batch_id, reference, merchant_id, gross, fee, net, cur, date, event_time) in lines
    {
        by_ref
            .entry(reference.clone())
            .or_default()
            .1
            .push(SettlementLine {
                line_id,
                batch_id,
                payment_reference: reference,
                merchant_id,
                gross,
                fee,
                net,
                currency: currency(&cur)?,
                settlement_date: date,
                event_time,
            });
    }
    for (events, lines) in by_ref.values_mut() {
        events.sort_by(|a, b| (a.event_time, &a.event_id).cmp(&(b.event_time, &b.event_id)));
        lines.sort_by(|a, b| (a.event_time, &a.line_id).cmp(&(b.event_time, &b.line_id)));
    }
    Ok(by_ref)
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
async fn lock_items(
    tx: &mut Transaction<'_, Postgres>,
    refs: &[&str],
) -> Result<HashMap<String, Prior>, sqlx::Error> {
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
            currency: currency(&cur)?,
        };
        let p = Prior {
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
    prior: &HashMap<String, Prior>,
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
        let mut records = records_of(tx, &reread).await?;
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
    let mut prior = lock_items(tx, &refs).await?;
    let mut judged = judge_targets(tx, who, targets.refs.iter(), &prior).await?;

    // New items first: another instance may have created one since it was locked above (its
    // records arrived on another partition). Those are locked now, their committed state
    // read, and judged again with this transaction's records folded in.
    let new: Vec<(&str, &Judged)> = (judged.iter())
        .filter(|(r, _)| !prior.contains_key(**r))
        .map(|(r, j)| (*r, j))
        .collect();
    if !new.is_empty() {
        let inserted = insert_items(tx, &new).await?;
        let raced: Vec<&str> = (new.iter())
            .map(|(r, _)| *r)
            .filter(|r| !inserted.contains(*r))
            .collect();
        if !raced.is_empty() {
            prior.extend(lock_items(tx, &raced).await?);
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
            updates.push(reference, j);
        }
    }
    write_changes(tx, who, updates, changes).await?;
    Ok(outcome)
}

/// Column vectors of items' new rows: the verdict's derived columns (views and reports read
/// them) and the state.
#[derive(Default)]
struct ItemRows<'a> {
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
    fn push(&mut self, reference: &'a str, j: &'a Judged) {
        let e = &j.evaluation;
        self.refs.push(reference);
        self.merchants.push(&j.bucket.merchant_id);
        self.dates.push(j.bucket.date);
        self.currencies.push(j.bucket.currency.code());
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
            .push(i32::try_from(j.state.events).unwrap_or(i32::MAX));
        self.line_counts
            .push(i32::try_from(j.state.lines).unwrap_or(i32::MAX));
        self.deadlines.push(e.deadline);
        self.reasons.push(&e.reason);
        self.watermarks.push(j.watermark);
        self.states
            .push(serde_json::to_string(&j.state).expect("a state always serializes"));
    }

    fn is_empty(&self) -> bool {
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
async fn insert_items(
    tx: &mut Transaction<'_, Postgres>,
    new: &[(&str, &Judged)],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let mut rows = ItemRows::default();
    for (r, j) in new {
        rows.push(r, j);
    }
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
async fn write_changes(
    tx: &mut Transaction<'_, Postgres>,
    who: &Evaluator<'_>,
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
        .bind(who.watermark)
        .bind(who.group)
        .bind(who.instance);
    updates.bind(q).execute(&mut **tx).await?;
    Ok(())
}

/// The verdict on one reference from all of its records (`report --verify`'s re-evaluation:
/// the same fold and judgement as the service's, started from nothing), with the state.
pub(super) fn judge_records(
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

/// Column vectors of the history rows (and which of them go to the outbox).
#[derive(Default)]
struct Changes<'a> {
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
    fn push(
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

impl super::Store {
    /// Re-evaluates every MISSING_REFERENCE item with the cache's current snapshot, in
    /// transactions of `chunk` items (each with its own history and outbox rows), after
    /// reference data changed. Items locked by a batch are skipped: that batch evaluates them
    /// with a snapshot at least as new.
    pub async fn reevaluate_missing_reference(
        &self,
        group: &str,
        instance: &str,
        reconciler: &Reconciler,
        chunk: i64,
    ) -> Result<ReconcileOutcome, sqlx::Error> {
        let snapshot = reconciler.cache.snapshot();
        let mut outcome = ReconcileOutcome::default();
        let mut after = String::new();
        loop {
            let mut tx = self.pool.begin().await?;
            let refs = missing_reference_items(&mut tx, &after, chunk).await?;
            let Some(last) = refs.last().cloned() else {
                return Ok(outcome);
            };
            let watermark = reconciler.watermark(&mut tx, group).await?;
            let who = (group, instance, reconciler, &*snapshot, watermark);
            outcome.merge(evaluate_and_commit(tx, who, refs, Cause::ReferenceData).await?);
            after = last;
        }
    }
}

impl super::Store {
    /// Re-evaluates, with the cache's current snapshot and cause REFERENCE_DATA, the items a
    /// reference-data correction queued (see `store::reference`), in transactions of `chunk`
    /// items; called after every reload, like [`Self::reevaluate_missing_reference`]. An
    /// entry leaves the queue in the transaction that evaluates it, so a failure leaves it
    /// for the next reload.
    pub async fn reevaluate_corrected(
        &self,
        group: &str,
        instance: &str,
        reconciler: &Reconciler,
        chunk: i64,
    ) -> Result<ReconcileOutcome, sqlx::Error> {
        let snapshot = reconciler.cache.snapshot();
        let mut outcome = ReconcileOutcome::default();
        let Some(seen) = snapshot.database_snapshot.as_deref() else {
            return Ok(outcome);
        };
        loop {
            let mut tx = self.pool.begin().await?;
            let refs = take_corrected_items(&mut tx, seen, chunk).await?;
            if refs.is_empty() {
                return Ok(outcome);
            }
            let watermark = reconciler.watermark(&mut tx, group).await?;
            let who = (group, instance, reconciler, &*snapshot, watermark);
            outcome.merge(evaluate_and_commit(tx, who, refs, Cause::ReferenceData).await?);
        }
    }
}

impl super::Store {
    /// Evaluates, in transactions of `chunk` items, every EXPECTED item whose deadline the
    /// group's watermark has passed. Batches sweep a bounded number themselves; this catches
    /// up the rest, also when no more records arrive (the end of a replay, a quiet night).
    pub async fn reevaluate_due(
        &self,
        group: &str,
        instance: &str,
        reconciler: &Reconciler,
        chunk: i64,
    ) -> Result<ReconcileOutcome, sqlx::Error> {
        let snapshot = reconciler.cache.snapshot();
        let mut outcome = ReconcileOutcome::default();
        loop {
            let mut tx = self.pool.begin().await?;
            let wm = reconciler.watermark(&mut tx, group).await?;
            let refs = due_items(&mut tx, wm, chunk).await?;
            if refs.is_empty() {
                break;
            }
            let who = (group, instance, reconciler, &*snapshot, wm);
            outcome.merge(evaluate_and_commit(tx, who, refs, Cause::Deadline).await?);
        }
        // The payout leg's due items (the payout sweep writes no daily totals).
        let Some(rules) = &reconciler.payouts else {
            return Ok(outcome);
        };
        loop {
            let mut tx = self.pool.begin().await?;
            let who = Evaluator {
                group,
                instance,
                rules: &reconciler.rules,
                snapshot: &snapshot,
                watermark: reconciler.watermark(&mut tx, group).await?,
            };
            let p = super::payouts::reconcile(&mut tx, &who, rules, &[], &[]).await?;
            tx.commit().await?;
            if p.evaluated == 0 {
                return Ok(outcome);
            }
            outcome.payouts.merge(p);
        }
    }
}

/// The running-totals shard of the background re-evaluations (a batch's shard is its first
/// partition; these belong to none).
pub const SWEEP_SHARD: &str = "sweep";

/// Evaluates `refs` (for `cause`) in `tx` with the daily totals they change, and commits:
/// the one step of the background re-evaluations. `who`: group, instance, reconciler,
/// snapshot and watermark.
async fn evaluate_and_commit(
    mut tx: Transaction<'_, Postgres>,
    (group, instance, reconciler, snapshot, watermark): (
        &str,
        &str,
        &Reconciler,
        &Snapshot,
        DateTime<Utc>,
    ),
    refs: Vec<String>,
    cause: Cause,
) -> Result<ReconcileOutcome, sqlx::Error> {
    let mut targets = Targets::default();
    for r in refs {
        targets.other(r, cause);
    }
    let who = Evaluator {
        group,
        instance,
        rules: &reconciler.rules,
        snapshot,
        watermark,
    };
    let mut daily = DailyDeltas::default();
    let outcome = evaluate_targets(&mut tx, &who, targets, &mut daily).await?;
    daily.write(&mut tx, SWEEP_SHARD).await?;
    tx.commit().await?;
    Ok(outcome)
}

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

    /// What is still to do for reconciliation to be final for what has been consumed.
    pub async fn reconciliation_backlog(
        &self,
        group: &str,
        lateness: chrono::Duration,
    ) -> Result<Backlog, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // Without log ends nothing is idle: the lowest over partitions with an event time.
        let rules = ClockRules {
            default: TopicClock {
                idle_timeout: chrono::Duration::MAX,
                allowed_lateness: lateness,
            },
            topics: BTreeMap::new(),
        };
        let wm = watermark(&mut tx, group, &rules, None, None)
            .await?
            .watermark;
        tx.commit().await?;
        self.reconciliation_backlog_at(wm).await
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
