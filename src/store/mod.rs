//! The only code that talks to PostgreSQL.
//!
//! [`Store::commit_batch`] is the heart of exactly-once: in ONE transaction it
//! (1) advances `consumer_offsets.next_offset` of every partition the batch read, by
//! compare-and-set against the offset the batch started from, (2) inserts the batch's events
//! and settlement lines with insert-or-ignore on their ids, (3) adds to the running totals only
//! what was actually inserted, and (4) keeps the batch's poison records in `dead_letters`.
//! If any compare-and-set fails the whole transaction rolls back ([`CommitError::Fenced`]).
//!
//! It does not decide what to retry; it classifies errors so the caller can.

mod batch;
mod dead_letters;
mod totals;

use std::collections::HashMap;

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

pub use batch::{Batch, CommitOutcome, DeadLetter, PartitionProgress, Source};
pub use dead_letters::{DeadLetterRow, ReplayResult};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How a failed database call should be handled by the consumer loop.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another consumer advanced this partition since the batch started: the batch is stale
    /// (rebalance, pause, ambiguous earlier commit) and was rolled back. Resync from the store.
    #[error("offset compare-and-set failed for {topic}[{partition}]: the partition moved on")]
    Fenced { topic: String, partition: i32 },
    /// Connection loss, server shutdown, deadlock, serialization failure: retry the batch.
    #[error("transient database error: {0}")]
    Transient(#[source] sqlx::Error),
    /// Constraint or data errors that retrying cannot fix: a bug or a schema mismatch.
    #[error("permanent database error: {0}")]
    Permanent(#[source] sqlx::Error),
}

impl From<sqlx::Error> for CommitError {
    fn from(e: sqlx::Error) -> Self {
        if is_permanent(&e) {
            CommitError::Permanent(e)
        } else {
            CommitError::Transient(e)
        }
    }
}

/// SQLSTATE classes 22 (data exception), 23 (integrity violation) and 42 (syntax/undefined
/// object) cannot succeed on retry; everything else (08 connection, 40 rollback, 53
/// resources, 57 operator intervention, I/O errors, pool timeouts) can.
pub fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("42")),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::TypeNotFound { .. } => true,
        _ => false,
    }
}

/// A (topic, partition) pair.
pub type TopicPartition = (String, i32);

/// Handle to the payrecon database.
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Store { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations (idempotent; safe with many instances starting at once,
    /// sqlx takes an advisory lock).
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// Stored `next_offset` of each requested partition; absent when never committed.
    pub async fn load_offsets(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
        let (topics, parts): (Vec<String>, Vec<i32>) = partitions.iter().cloned().unzip();
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT o.topic, o.partition, o.next_offset
               FROM consumer_offsets o
               JOIN UNNEST($2::text[], $3::int[]) AS p(topic, partition)
                 ON o.topic = p.topic AND o.partition = p.partition
              WHERE o.consumer_group = $1",
        )
        .bind(group)
        .bind(&topics)
        .bind(&parts)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
    }

    /// Every stored offset of a group (lag computation, reports, tests).
    pub async fn group_offsets(
        &self,
        group: &str,
    ) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
        let rows: Vec<(String, i32, i64)> = sqlx::query_as(
            "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = $1",
        )
        .bind(group)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
    }
}

/// Creates database `name` on the server of `admin` if it does not exist (tests, demo).
pub async fn create_database(admin: &PgConnectOptions, name: &str) -> Result<(), sqlx::Error> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect_with(admin).await?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut conn)
        .await?;
    if exists.is_none() {
        conn.execute(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{}\"",
            name.replace('"', "\"\"")
        )))
        .await?;
    }
    conn.close().await
}
