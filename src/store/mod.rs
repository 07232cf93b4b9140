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
mod reconcile;
mod reference;
mod totals;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

pub use batch::{Batch, CommitOutcome, DeadLetter, PartitionProgress, Source};
pub use dead_letters::{DeadLetterRow, ReplayResult};
pub use reconcile::{Backlog, Cause, DAILY_COLUMNS, ReconcileOutcome, Reconciler, Rules};
pub use reference::{Conflict, Correction, LoadError, LoadSummary};

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

/// Stored `next_offset` of each requested partition, on the pool or inside a transaction
/// (the batch commit names the partition that lost its compare-and-set).
pub(crate) async fn stored_offsets<'e>(
    executor: impl sqlx::PgExecutor<'e>,
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
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(|(t, p, o)| ((t, p), o)).collect())
}

/// Where a partition stands in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredPosition {
    pub next_offset: i64,
    /// Broker timestamp of the last applied record.
    pub last_record_time: Option<DateTime<Utc>>,
}

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
        stored_offsets(&self.pool, group, partitions).await
    }

    /// Every stored position of a group, with the broker time of its last applied record
    /// (commit lag).
    pub async fn positions(
        &self,
        group: &str,
    ) -> Result<HashMap<TopicPartition, StoredPosition>, sqlx::Error> {
        let rows: Vec<(String, i32, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT topic, partition, next_offset, last_record_time FROM consumer_offsets
              WHERE consumer_group = $1",
        )
        .bind(group)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, p, next_offset, last_record_time)| {
                (
                    (t, p),
                    StoredPosition {
                        next_offset,
                        last_record_time,
                    },
                )
            })
            .collect())
    }

    /// Every stored offset of a group (reports, tests).
    /// The consumer groups that have stored offsets in this database.
    pub async fn consumer_groups(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT DISTINCT consumer_group FROM consumer_offsets ORDER BY consumer_group",
        )
        .fetch_all(&self.pool)
        .await
    }

    pub async fn group_offsets(
        &self,
        group: &str,
    ) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
        Ok(self
            .positions(group)
            .await?
            .into_iter()
            .map(|(tp, p)| (tp, p.next_offset))
            .collect())
    }
}

/// A connection URL for database `name` on the server (and as the user) of `admin`; a Unix
/// socket directory becomes a `host=` query parameter.
pub fn database_url(admin: &PgConnectOptions, name: &str) -> String {
    let host = admin.get_host();
    let user = admin.get_username();
    if host.starts_with('/') {
        format!(
            "postgres://{user}@localhost:{}/{name}?host={host}",
            admin.get_port()
        )
    } else {
        format!("postgres://{user}@{host}:{}/{name}", admin.get_port())
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn admin_execute(admin: &PgConnectOptions, sql: &str) -> Result<(), sqlx::Error> {
    use sqlx::{Connection, Executor};
    let mut conn = sqlx::PgConnection::connect_with(admin).await?;
    conn.execute(sql).await?;
    conn.close().await
}

/// Creates database `name` on the server of `admin` (tests, demo, bench).
pub async fn create_database(admin: &PgConnectOptions, name: &str) -> Result<(), sqlx::Error> {
    admin_execute(admin, &format!("CREATE DATABASE {}", quote_ident(name))).await
}

/// Drops database `name`, disconnecting its sessions (tests, demo, bench).
pub async fn drop_database(admin: &PgConnectOptions, name: &str) -> Result<(), sqlx::Error> {
    admin_execute(
        admin,
        &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name)),
    )
    .await
}

/// Drops and creates database `name`.
pub async fn recreate_database(admin: &PgConnectOptions, name: &str) -> Result<(), sqlx::Error> {
    drop_database(admin, name).await?;
    create_database(admin, name).await
}
