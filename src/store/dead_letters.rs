//! Inspecting and re-driving dead letters after a fix (new currency, registry repaired ...).

use chrono::{DateTime, Utc};
use serde::Serialize;

use std::collections::HashMap;

use super::batch::{Apply, Records, Source};
use super::reconcile::{ReconcileOutcome, Reconciler};
use super::{CommitError, Store};
use crate::domain::Record;

/// A dead letter as an operator sees it (payload shown as length; bytes stay in the table).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub error_kind: String,
    pub error_message: String,
    pub payload_bytes: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replay_attempts: i32,
}

/// A dead letter to re-drive: id, topic, partition, offset, payload, broker timestamp.
pub type OpenDeadLetter = (
    i64,
    String,
    i32,
    i64,
    Option<Vec<u8>>,
    Option<DateTime<Utc>>,
);

/// The outcome of re-driving one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayResult {
    /// Applied (or already present: the insert is idempotent) and marked replayed.
    Applied,
    /// Still poison; attempts and the new reason were recorded.
    StillFailing(String),
}

impl Store {
    /// Dead letters, newest first; `open_only` hides those already replayed.
    pub async fn list_dead_letters(
        &self,
        open_only: bool,
        limit: i64,
    ) -> Result<Vec<DeadLetterRow>, sqlx::Error> {
        sqlx::query_as(
            r#"SELECT id, topic, partition, "offset", error_kind, error_message,
                      octet_length(payload) AS payload_bytes, created_at, replayed_at, replay_attempts
                 FROM dead_letters
                WHERE NOT $1 OR replayed_at IS NULL
                ORDER BY id DESC LIMIT $2"#,
        )
        .bind(open_only)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// Open dead letters to re-drive, oldest first.
    pub async fn open_dead_letters(&self, ids: &[i64]) -> Result<Vec<OpenDeadLetter>, sqlx::Error> {
        sqlx::query_as(
            r#"SELECT id, topic, partition, "offset", payload, broker_timestamp FROM dead_letters
                WHERE replayed_at IS NULL AND (cardinality($1::bigint[]) = 0 OR id = ANY($1))
                ORDER BY id"#,
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
    }

    /// Applies a re-decoded record (and reconciles its payment reference, as consuming it
    /// would have) and marks dead letter `id` replayed, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn apply_replayed(
        &self,
        id: i64,
        topic: &str,
        partition: i32,
        offset: i64,
        record: Record,
        group: &str,
        reconciler: &Reconciler,
    ) -> Result<ReconcileOutcome, CommitError> {
        let mut tx = self.pool.begin().await?;
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
        sqlx::query(
            "UPDATE dead_letters SET replayed_at = now(), replay_attempts = replay_attempts + 1,
                    last_replay_error = NULL WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Records a failed re-drive attempt.
    pub async fn record_replay_failure(&self, id: i64, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE dead_letters SET replay_attempts = replay_attempts + 1, last_replay_error = $2
              WHERE id = $1",
        )
        .bind(id)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
