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

/// The oldest `limit` rows not yet published, in seq order.
pub async fn unpublished(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<OutboxRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, history_id, payment_reference, merchant_id, from_status, to_status,
                opened, coalesce(currency, '') AS currency, expected_gross, settled_gross,
                reason, watermark, created_at, leg, account_id
           FROM exceptions_outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1",
    )
    .bind(limit)
    .fetch_all(conn)
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
