//! Inspecting and re-driving dead letters after a fix (new currency, registry repaired ...).

use chrono::{DateTime, Utc};
use serde::Serialize;

use sqlx::{Postgres, Transaction};

use super::Store;
use super::records::Source;

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

/// Inserts dead letters; their messages are made printable and bounded first (a message may
/// quote record content, and text cannot hold every byte a record can).
pub async fn insert_dead_letters<'d>(
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

/// Marks dead letter `id` replayed (inside the transaction that applied it again).
pub async fn mark_replayed(tx: &mut Transaction<'_, Postgres>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE dead_letters SET replayed_at = now(), replay_attempts = replay_attempts + 1,
                last_replay_error = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
