//! The only code that talks to PostgreSQL: typed functions by table family, SQL text
//! nowhere else. What to write, and in which order inside the batch transaction, is the
//! engine's ([`crate::engine`]).
//! - [`offsets`]: `consumer_offsets`, advanced by compare-and-set (the fence);
//! - [`records`]: the input records' rows and their running totals, conflicting duplicates,
//!   the savepoint records are applied under;
//! - [`items`], [`payout_items`]: the reconciliation items of both legs, their history, the
//!   exceptions outbox rows and daily totals they write;
//! - [`dead_letters`], [`reference`], [`totals`], [`verify`]: what their names say.
//!
//! It does not decide what to retry; it classifies errors ([`disposition`]) so the caller can.

pub mod audit;
pub mod bench;
pub mod compare;
pub mod dead_letters;
pub mod file_imports;
pub mod growth;
mod health;
pub mod items;
pub mod offsets;
pub mod outbox;
pub mod payout_items;
pub mod pgstats;
pub mod records;
mod reference;
pub mod report;
pub mod shadow;
pub mod targets;
mod totals;
pub mod verify;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

pub use crate::reconcile::Rules;
pub use dead_letters::{DeadLetter, DeadLetterRow, OpenDeadLetter, ReplayResult};
pub use items::{Backlog, SWEEP_SHARD};
pub use offsets::{PartitionProgress, TopicPartition, stored_offsets};
pub use records::{LogPosition, RawRecord, Source};
pub use reference::{Conflict, Correction, LoadError, LoadSummary};
pub use verify::{CHECKS, Check, Difference};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How a failed database call should be handled by the consumer loop.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// Another consumer advanced this partition since the batch started: the batch is stale
    /// (rebalance, pause, ambiguous earlier commit) and was rolled back. Resync from the store.
    #[error("offset compare-and-set failed for {topic}[{partition}]: the partition moved on")]
    Fenced { topic: String, partition: i32 },
    /// The database or the way to it is unavailable (see [`Disposition::Retry`]): retry the
    /// same batch.
    #[error("transient database error: {}", describe(.0))]
    Transient(#[source] sqlx::Error),
    /// The system, not a record, is wrong (see [`Disposition::Stop`]): stop, so nothing is
    /// skipped, and say why.
    #[error("database error that retrying cannot fix: {}", describe(.0))]
    Permanent(#[source] sqlx::Error),
}

impl From<sqlx::Error> for CommitError {
    fn from(e: sqlx::Error) -> Self {
        match disposition(&e) {
            Disposition::Retry => CommitError::Transient(e),
            // A record-caused refusal that reaches the caller was not isolated (it came from
            // no record of the batch), so it lies in the system.
            Disposition::RecordRefused | Disposition::Stop => CommitError::Permanent(e),
        }
    }
}

/// What to do about a database error: THE classification, used by every caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The database or the way to it is unavailable for now; the same work will succeed
    /// later. Connection loss and I/O (08, `Io`, `PoolTimedOut`, TLS), rollbacks (40:
    /// serialization failure, deadlock), insufficient resources (53: disk full, out of
    /// memory, too many connections), operator intervention (57: admin or crash shutdown,
    /// statement timeout, cannot connect now), lock not available (55P03: lock_timeout), a
    /// read-only transaction (25006: a standby during failover), system errors (58: I/O).
    Retry,
    /// PostgreSQL refused a value that came from a record: data exceptions (22: NUL
    /// character, value too long, numeric or datetime overflow), integrity violations (23:
    /// check constraints, foreign keys), program limits (54: index row size). The store
    /// isolates the record and dead-letters it (`database_refused`) after a sanitized twin of
    /// it succeeded, which proves the refusal lies in the record, not in the schema.
    RecordRefused,
    /// The system is wrong: the schema (42: undefined table or column, syntax, insufficient
    /// privilege; 3F, 3D), authentication (28), internal errors and corruption (XX), an
    /// unsupported feature (0A), undecodable columns, and any class not named above. Retrying
    /// cannot help and skipping would lose data: stop and name the cause.
    Stop,
}

/// Classifies `e` (see [`Disposition`]).
pub fn disposition(e: &sqlx::Error) -> Disposition {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            match code.get(..2).unwrap_or("") {
                "22" | "23" | "54" => Disposition::RecordRefused,
                "08" | "40" | "53" | "57" | "58" => Disposition::Retry,
                _ if code == "55P03" || code == "25006" => Disposition::Retry,
                _ => Disposition::Stop,
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Disposition::Retry,
        _ => Disposition::Stop,
    }
}

/// Why PostgreSQL refused a *connection* for a reason retrying cannot fix, if it did:
/// authentication failed (28P01), no such role or no pg_hba entry (28000), no such database
/// (3D000), TLS refused or failed (a `Tls` error). `None`: worth retrying (refused
/// connection, timeouts, the server starting up: 57P03).
pub fn refused_connection(e: &sqlx::Error) -> Option<&'static str> {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") => Some("authentication failed (wrong password?)"),
            Some("28000") => Some("the role does not exist or pg_hba.conf refuses it"),
            Some("3D000") => Some("the database does not exist"),
            Some(c) if c.starts_with("28") => Some("authorization refused"),
            _ => None,
        },
        sqlx::Error::Tls(_) => Some("TLS refused or failed"),
        _ => None,
    }
}

/// `SQLSTATE 22021: invalid byte sequence ...` for database errors, the error otherwise; safe
/// to log and to store (no record content beyond what PostgreSQL's message carries).
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => format!(
            "SQLSTATE {}: {}",
            db.code().as_deref().unwrap_or("?????"),
            db.message()
        ),
        other => other.to_string(),
    }
}

/// `s` safe for a text column and a log line: control characters (NUL among them, which
/// PostgreSQL text cannot hold) escaped, at most `max` characters kept.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
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
    /// The watched writable server when `database.url` lists several ([`targets`]).
    primary: Option<std::sync::Arc<targets::Primary>>,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Store {
            pool,
            primary: None,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations (idempotent; safe with many instances starting at once,
    /// sqlx takes an advisory lock). A lock wait that `lock_timeout` ends (another instance
    /// is migrating) or a lost connection is retried for up to `patience`.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        self.migrate_within(std::time::Duration::from_secs(120))
            .await
    }

    /// [`Store::migrate`], retrying transient failures for up to `patience`.
    pub async fn migrate_within(
        &self,
        patience: std::time::Duration,
    ) -> Result<(), sqlx::migrate::MigrateError> {
        let started = std::time::Instant::now();
        let mut backoff = std::time::Duration::from_millis(200);
        loop {
            match MIGRATOR.run(&self.pool).await {
                Err(sqlx::migrate::MigrateError::Execute(e))
                    if disposition(&e) == Disposition::Retry
                        && started.elapsed() + backoff < patience =>
                {
                    tracing::warn!(error = %describe(&e), retry_in = ?backoff, "migrations not applied yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Fails unless every migration of this binary is applied: for commands that must not
    /// change the schema (inspecting dead letters), so they never migrate a wrong or empty
    /// database by accident.
    pub async fn require_schema(&self) -> anyhow::Result<()> {
        let applied: Vec<i64> = sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        let missing = MIGRATOR
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .count();
        anyhow::ensure!(
            missing == 0,
            "this database does not have payrecon's schema ({missing} of {} migrations not applied): run `payrecon migrate` against it first (or check database.url)",
            MIGRATOR.iter().count()
        );
        Ok(())
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

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn admin_execute(admin: &PgConnectOptions, sql: &str) -> Result<(), sqlx::Error> {
    use sqlx::{ConnectOptions, Connection, Executor};
    let admin = admin
        .clone()
        .log_slow_statements(log::LevelFilter::Debug, std::time::Duration::from_secs(1));
    let mut conn = sqlx::PgConnection::connect_with(&admin).await?;
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
