//! The exceptions outbox as the relay sees it: the relay lock, the round record
//! (`exceptions_relay`), the unpublished rows and their "published" marks. Every function runs
//! on the relay's own session (`PgConnection`): the advisory lock lives and dies with it, so a
//! relay whose session died cannot mark anything.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

/// The advisory lock key of the relay ("payrecon" in ASCII, as a number).
const RELAY_LOCK: i64 = 0x7061_7972_6563_6f6e;

/// One outbox row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub seq: i64,
    pub history_id: i64,
    pub payment_reference: String,
    pub merchant_id: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub opened: bool,
    pub currency: String,
    pub expected_gross: Option<Decimal>,
    pub settled_gross: Option<Decimal>,
    pub reason: String,
    pub watermark: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// SETTLEMENT or PAYOUT.
    pub leg: String,
    pub account_id: Option<String>,
}

/// Takes the relay lock on this session if no other session holds it.
pub async fn try_relay_lock(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RELAY_LOCK)
        .fetch_one(conn)
        .await
}

/// The round a previous relay recorded and never settled: who ran it, and how many seconds
/// remain (by the database's clock) until `round_started_at + bound`, 0 when that is past.
pub async fn unfinished_round(
    conn: &mut PgConnection,
    bound: std::time::Duration,
) -> Result<Option<(String, f64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT instance,
                GREATEST(0, EXTRACT(EPOCH FROM round_started_at + $1::interval - clock_timestamp()))::float8
           FROM exceptions_relay WHERE round_started_at IS NOT NULL",
    )
    .bind(bound)
    .fetch_optional(conn)
    .await
}

/// The columns of an [`OutboxRow`].
const ROW: &str = "seq, history_id, payment_reference, merchant_id, from_status, to_status,
                   opened, coalesce(currency, '') AS currency, expected_gross, settled_gross,
                   reason, watermark, created_at, leg, account_id";

/// The oldest `limit` rows not yet published, in seq order. A row holding the seq of a lost
/// exception ([`record_lost`]) is renumbered first: a seq never names two exceptions.
pub async fn unpublished(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query(
        "UPDATE exceptions_outbox SET seq = nextval('exceptions_outbox_seq_seq')
          WHERE published_at IS NULL AND seq IN (SELECT seq FROM exceptions_lost)",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query_as(&format!(
        "SELECT {ROW} FROM exceptions_outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// The rows holding `seqs` (published or not).
pub async fn rows(conn: &mut PgConnection, seqs: &[i64]) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {ROW} FROM exceptions_outbox WHERE seq = ANY($1)"
    ))
    .bind(seqs)
    .fetch_all(conn)
    .await
}

/// When the newest "published" mark was set (`None`: nothing is marked).
pub async fn newest_mark(conn: &mut PgConnection) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(published_at) FROM exceptions_outbox")
        .fetch_one(conn)
        .await
}

/// An exception the topic holds and this database lost: its seq, payment reference and the
/// digest it was published with.
#[derive(Debug, Clone)]
pub struct Lost {
    pub seq: i64,
    pub payment_reference: String,
    pub digest: Option<String>,
}

/// Records exceptions the topic holds and this database lost, and moves the outbox sequence
/// past them, in one statement each way (idempotent: a seq recorded before stays as it is).
pub async fn record_lost(conn: &mut PgConnection, lost: &[Lost]) -> Result<(), sqlx::Error> {
    let Some(highest) = lost.iter().map(|m| m.seq).max() else {
        return Ok(());
    };
    let seqs: Vec<i64> = lost.iter().map(|m| m.seq).collect();
    let references: Vec<&str> = lost.iter().map(|m| m.payment_reference.as_str()).collect();
    let digests: Vec<Option<&str>> = lost.iter().map(|m| m.digest.as_deref()).collect();
    sqlx::query(
        "INSERT INTO exceptions_lost (seq, payment_reference, digest)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])
         ON CONFLICT (seq) DO NOTHING",
    )
    .bind(&seqs)
    .bind(&references)
    .bind(&digests)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "SELECT setval('exceptions_outbox_seq_seq', $1) FROM exceptions_outbox_seq_seq
          WHERE last_value < $1",
    )
    .bind(highest)
    .execute(conn)
    .await?;
    Ok(())
}

/// Whether a lost exception still waits for the exception that supersedes it.
pub async fn unclaimed_lost(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM exceptions_lost WHERE superseded_by IS NULL)")
        .fetch_one(conn)
        .await
}

/// The lost exception the row `seq` of `payment_reference` supersedes: the lowest-seq
/// unclaimed one of that reference, or the one it already claimed (a round that failed after
/// claiming).
pub async fn claim_lost(
    conn: &mut PgConnection,
    payment_reference: &str,
    seq: i64,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE exceptions_lost SET superseded_by = $2
          WHERE seq = (SELECT seq FROM exceptions_lost
                        WHERE payment_reference = $1
                          AND (superseded_by IS NULL OR superseded_by = $2)
                        ORDER BY superseded_by NULLS LAST, seq LIMIT 1)
          RETURNING seq",
    )
    .bind(payment_reference)
    .bind(seq)
    .fetch_optional(conn)
    .await
}

/// Records a round as started by `instance`, before anything is sent: a successor waits for
/// it to settle.
pub async fn round_started(conn: &mut PgConnection, instance: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO exceptions_relay (instance, round_started_at)
         VALUES ($1, clock_timestamp())
         ON CONFLICT (singleton) DO UPDATE
            SET instance = EXCLUDED.instance, round_started_at = EXCLUDED.round_started_at",
    )
    .bind(instance)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records that no round is in flight any more.
pub async fn round_settled(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE exceptions_relay SET round_started_at = NULL")
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks the rows `seqs` published (those not marked yet); returns how many it marked.
pub async fn mark_published(conn: &mut PgConnection, seqs: &[i64]) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE exceptions_outbox SET published_at = now()
          WHERE seq = ANY($1) AND published_at IS NULL",
    )
    .bind(seqs)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Rows still waiting to be published.
pub async fn pending(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM exceptions_outbox WHERE published_at IS NULL")
        .fetch_one(conn)
        .await
}
