//! Re-driving a dead letter after a fix (a new currency, a repaired registry ...): the record
//! is applied through the same path as the consumer's (a conflicting duplicate is kept, not
//! applied) and the dead letter marked replayed, in one transaction.

use std::collections::HashMap;

use super::apply::{Apply, Records};
use super::reconciler::Reconciler;
use crate::domain::Record;
use crate::reconcile::ReconcileOutcome;
use crate::store::{CommitError, Source, Store, dead_letters};

/// Applies a re-decoded record (and reconciles its payment reference, as consuming it
/// would have) and marks dead letter `id` replayed, in one transaction.
#[allow(clippy::too_many_arguments)]
pub async fn apply_replayed(
    store: &Store,
    id: i64,
    topic: &str,
    partition: i32,
    offset: i64,
    record: Record,
    group: &str,
    reconciler: &Reconciler,
) -> Result<ReconcileOutcome, CommitError> {
    let mut tx = store.pool().begin().await?;
    let source = Source {
        topic: 0,
        partition,
        offset,
    };
    let topics = [topic.to_owned()];
    let instance = format!("dead-letters-replay/{}", std::process::id());
    let apply = Apply {
        group,
        instance: &instance,
        reconciler,
        topics: &topics,
        raw: &HashMap::new(),
        shard: "dead-letters",
    };
    // Through the same path as the consumer: a conflicting duplicate is kept, not applied.
    let (mut pv, mut sv, mut bv) = (Vec::new(), Vec::new(), Vec::new());
    match record {
        Record::Payment(x) => pv.push((x, source)),
        Record::Settlement(x) => sv.push((x, source)),
        Record::Payout(x) => bv.push((x, source)),
    }
    let (pr, sr, br): (Vec<_>, Vec<_>, Vec<_>) = (
        pv.iter().collect(),
        sv.iter().collect(),
        bv.iter().collect(),
    );
    let records = Records {
        payments: &pr,
        settlements: &sr,
        payouts: &br,
    };
    let outcome = apply.apply(&mut tx, records).await?.reconciliation;
    dead_letters::mark_replayed(&mut tx, id).await?;
    tx.commit().await?;
    Ok(outcome)
}
