//! # The engine: one batch, one transaction
//!
//! [`commit_batch`] is the whole of what payrecon does with the records a consumer polled,
//! in the order it happens, inside ONE PostgreSQL transaction:
//! 1. **decode and validate** happened before, record by record, in the consumer
//!    ([`crate::inputs::Decoder`]); what can never succeed arrived here as a dead letter;
//! 2. **offsets**: every partition's `next_offset` is advanced by compare-and-set against the
//!    offset the batch started from ([`crate::store::offsets`]); a stale batch (a zombie, a
//!    lost rebalance) is fenced here and rolls back;
//! 3. **apply** each input's records by id, insert-or-ignore, with their running totals;
//!    re-deliveries are counted, conflicting duplicates kept ([`apply`]); a record the
//!    database refuses is isolated and dead-lettered without costing the others
//!    ([`isolate`]);
//! 4. **reconcile** what was inserted, and the items the watermark made due: verdicts,
//!    history and the exceptions outbox ([`reconciler`]), then the payout leg ([`payout`]);
//! 5. **daily totals** in key order, then the **dead letters**;
//! 6. **commit**: rows and offsets become visible together, or not at all.
//!
//! Beside the batch: the background re-evaluations ([`sweeps`]), re-driving dead letters
//! ([`redrive`]) and the independent verification of the tables ([`verify`]).
//! The SQL is in [`crate::store`], the rules in [`crate::reconcile`], the inputs' own parts
//! in [`crate::inputs`].

pub mod apply;
mod batch;
pub mod isolate;
pub mod payout;
pub mod reconciler;
pub mod redrive;
pub mod sweeps;
pub mod verify;

pub use crate::reconcile::{PayoutOutcome, ReconcileOutcome};
pub use crate::store::{DeadLetter, PartitionProgress, RawRecord, Source};
pub use batch::{Batch, CommitOutcome};
pub use reconciler::{LogEnds, Reconciler, reconciliation_backlog};

use crate::store::{CommitError, Store, dead_letters, offsets};

/// Commits `batch` atomically for consumer group `group`; `instance` is recorded as the
/// committer. Reconciliation uses one snapshot of `reconciler`'s reference cache throughout.
pub async fn commit_batch(
    store: &Store,
    group: &str,
    instance: &str,
    batch: &Batch,
    reconciler: &Reconciler,
) -> Result<CommitOutcome, CommitError> {
    let mut tx = store.pool().begin().await?;
    let max_times = batch.max_event_times();
    offsets::advance_offsets(&mut tx, group, instance, &batch.progress, &max_times).await?;
    let shard = batch.shard();
    let apply = apply::Apply {
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
    let records = apply::Records {
        payments: &payments,
        settlements: &settlements,
        payouts: &payouts,
    };
    let applied = apply.isolating(&mut tx, records).await?;
    let dead_letters = dead_letters::insert_dead_letters(
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
