//! The background re-evaluations: items whose deadline the watermark passed, items waiting
//! for reference data, and items a reference-data correction queued. Each runs in chunks, one
//! transaction per chunk, with the same evaluation as a batch.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use super::payout;
use super::reconciler::{Evaluator, Reconciler, evaluate_targets};
use crate::reconcile::ReconcileOutcome;
use crate::reconcile::{Cause, DailyDeltas, Targets};
use crate::reference::Snapshot;
use crate::store::{SWEEP_SHARD, Store, items};

/// Re-evaluates every MISSING_REFERENCE item with the cache's current snapshot, in
/// transactions of `chunk` items (each with its own history and outbox rows), after
/// reference data changed. Items locked by a batch are skipped: that batch evaluates them
/// with a snapshot at least as new.
pub async fn reevaluate_missing_reference(
    store: &Store,
    group: &str,
    instance: &str,
    reconciler: &Reconciler,
    chunk: i64,
) -> Result<ReconcileOutcome, sqlx::Error> {
    let snapshot = reconciler.cache.snapshot();
    let mut outcome = ReconcileOutcome::default();
    let mut after = String::new();
    loop {
        let mut tx = store.pool().begin().await?;
        let refs = items::missing_reference_items(&mut tx, &after, chunk).await?;
        let Some(last) = refs.last().cloned() else {
            return Ok(outcome);
        };
        let watermark = reconciler.watermark(&mut tx, group).await?;
        let who = (group, instance, reconciler, &*snapshot, watermark);
        outcome.merge(evaluate_and_commit(tx, who, refs, Cause::ReferenceData).await?);
        after = last;
    }
}

/// Re-evaluates, with the cache's current snapshot and cause REFERENCE_DATA, the items a
/// reference-data correction queued (see `store::reference`), in transactions of `chunk`
/// items; called after every reload, like [`reevaluate_missing_reference`]. An
/// entry leaves the queue in the transaction that evaluates it, so a failure leaves it
/// for the next reload.
pub async fn reevaluate_corrected(
    store: &Store,
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
        let mut tx = store.pool().begin().await?;
        let refs = items::take_corrected_items(&mut tx, seen, chunk).await?;
        if refs.is_empty() {
            return Ok(outcome);
        }
        let watermark = reconciler.watermark(&mut tx, group).await?;
        let who = (group, instance, reconciler, &*snapshot, watermark);
        outcome.merge(evaluate_and_commit(tx, who, refs, Cause::ReferenceData).await?);
    }
}

/// Evaluates, in transactions of `chunk` items, every EXPECTED item whose deadline the
/// group's watermark has passed. Batches sweep a bounded number themselves; this catches
/// up the rest, also when no more records arrive (the end of a replay, a quiet night).
pub async fn reevaluate_due(
    store: &Store,
    group: &str,
    instance: &str,
    reconciler: &Reconciler,
    chunk: i64,
) -> Result<ReconcileOutcome, sqlx::Error> {
    let snapshot = reconciler.cache.snapshot();
    let mut outcome = ReconcileOutcome::default();
    loop {
        let mut tx = store.pool().begin().await?;
        let wm = reconciler.watermark(&mut tx, group).await?;
        let refs = items::due_items(&mut tx, wm, chunk).await?;
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
        let mut tx = store.pool().begin().await?;
        let who = Evaluator {
            group,
            instance,
            rules: &reconciler.rules,
            snapshot: &snapshot,
            watermark: reconciler.watermark(&mut tx, group).await?,
        };
        let p = payout::reconcile(&mut tx, &who, rules, &[], &[]).await?;
        tx.commit().await?;
        if p.evaluated == 0 {
            return Ok(outcome);
        }
        outcome.payouts.merge(p);
    }
}

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
    items::write_daily(&mut tx, SWEEP_SHARD, daily.into_rows()).await?;
    tx.commit().await?;
    Ok(outcome)
}
