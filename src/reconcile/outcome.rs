//! What reconciliation changed in one transaction, per leg: counts for metrics and logs.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{PayoutStatus, Status};

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
    pub payouts: PayoutOutcome,
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

/// What the payout leg changed in one transaction.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PayoutOutcome {
    /// Payout items judged.
    pub evaluated: u64,
    /// Status changes by the status entered.
    pub status_changes: BTreeMap<PayoutStatus, u64>,
    /// Outbox rows written: payout exceptions opened and resolved.
    pub exceptions_opened: u64,
    pub exceptions_resolved: u64,
}

impl PayoutOutcome {
    pub fn merge(&mut self, other: PayoutOutcome) {
        self.evaluated += other.evaluated;
        for (s, n) in other.status_changes {
            *self.status_changes.entry(s).or_default() += n;
        }
        self.exceptions_opened += other.exceptions_opened;
        self.exceptions_resolved += other.exceptions_resolved;
    }
}
