//! What one transaction writes ([`Batch`]) and what it changed ([`CommitOutcome`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::ReconcileOutcome;
use crate::domain::{BankPayout, PaymentEvent, SettlementLine};
use crate::store::{DeadLetter, PartitionProgress, RawRecord, Source};

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
    pub(super) fn max_event_times(&self) -> HashMap<(&str, i32), DateTime<Utc>> {
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
