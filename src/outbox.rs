//! The exceptions relay: publishes `exceptions_outbox` rows (written by the batch
//! transactions) to the exceptions topic, exactly once, with exactly one active relay among
//! all instances.
//!
//! ## Why there is no gap and no duplicate
//! - **One relay**: an instance relays only while it holds a PostgreSQL advisory lock on a
//!   dedicated session. Every read and every "published" mark goes through that session, so a
//!   relay whose session died (and lost the lock) cannot mark anything and stops.
//! - **No gap**: a row is marked `published_at` only after the broker acknowledged its
//!   message (idempotent producer: retries never duplicate within a session). Rows are picked
//!   by `published_at IS NULL`, not by "seq above the last one", so a transaction that commits
//!   a lower seq late is still picked up.
//! - **No duplicate across crashes**: the relay publishes one round (at most `relay_batch`
//!   rows), waits for every acknowledgement, marks the round, and only then starts the next.
//!   So at most one round can be on the topic without its mark, and its messages are among the
//!   last `relay_batch` messages of each partition. Before its first round a new relay reads
//!   that tail of every partition, takes the outbox seq from each message's
//!   `payrecon-outbox-seq` header, and marks those rows published instead of sending them
//!   again. A round that fails half-way ends the session the same way.
//! - **No duplicate from a relay that is cut off but alive**: losing the PostgreSQL session
//!   loses the lock, but that process's producer may still deliver its round later. Each round
//!   is recorded in `exceptions_relay` (through the locked session) before it is sent and
//!   cleared once it is marked; a relay that takes over and finds a round still recorded
//!   waits until `round_started_at + relay_message_timeout` (the producer's delivery bound,
//!   plus a margin) has passed, by the database's clock, before it reads the tail.
//!
//! - **Transactional producer, where configured** (`exceptions.transactional_id`): each round
//!   is one Kafka transaction, committed after every acknowledgement and before the mark. A
//!   new relay's `init_transactions` fences its predecessors (their open transaction is
//!   aborted, their writes rejected), so it skips the wait above; the tail is read with
//!   read_committed either way. Brokers without transactions (tansu) use the idempotent path.
//!
//! Assumption: only the relay writes to the exceptions topic.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use apache_avro::types::Value;
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::codec::{decimal_value, encode_datum, frame, register_schema};
use crate::config::Settings;
use crate::kafka::producer::{RelayMessage, RelayProducer};
use crate::store::Store;
use crate::store::outbox::{self as rows, OutboxRow};

/// The shipped schema of exception messages.
pub const EXCEPTION_SCHEMA: &str = include_str!("../schemas/reconciliation_exception.avsc");
/// Header carrying the outbox sequence number of a message.
pub const SEQ_HEADER: &str = "payrecon-outbox-seq";
/// Added to `relay_message_timeout` before a successor reads the tail: the last in-flight
/// produce request's own round trip after the local timeout.
const ROUND_MARGIN: Duration = Duration::from_secs(5);

/// The Avro value of a row in [`EXCEPTION_SCHEMA`]'s field order.
pub fn to_value(r: &OutboxRow) -> Value {
    let optional = |d: Option<Decimal>| match d {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(d) => Value::Union(1, Box::new(decimal_value(d))),
    };
    Value::Record(vec![
        ("seq".into(), Value::Long(r.seq)),
        ("history_id".into(), Value::Long(r.history_id)),
        (
            "payment_reference".into(),
            Value::String(r.payment_reference.clone()),
        ),
        ("merchant_id".into(), Value::String(r.merchant_id.clone())),
        (
            "from_status".into(),
            match &r.from_status {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
            },
        ),
        ("to_status".into(), Value::String(r.to_status.clone())),
        ("opened".into(), Value::Boolean(r.opened)),
        ("currency".into(), Value::String(r.currency.trim().into())),
        ("expected_gross".into(), optional(r.expected_gross)),
        ("settled_gross".into(), optional(r.settled_gross)),
        ("reason".into(), Value::String(r.reason.clone())),
        (
            "watermark".into(),
            Value::TimestampMillis(r.watermark.timestamp_millis()),
        ),
        (
            "created_at".into(),
            Value::TimestampMillis(r.created_at.timestamp_millis()),
        ),
        ("leg".into(), Value::String(r.leg.clone())),
        (
            "account_id".into(),
            match &r.account_id {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
            },
        ),
    ])
}

/// Competes for the relay until `stop`: standby while another instance holds the lock,
/// relaying while this one does; any failure ends the session and starts over.
pub async fn run_relay(settings: Settings, store: Store, stop: CancellationToken) {
    let _ = store; // the relay uses its own session: the lock lives and dies with it
    let mut backoff = settings.pipeline.retry_initial_backoff;
    while !stop.is_cancelled() {
        match relay_session(&settings, &stop).await {
            Ok(()) => return,
            Err(e) => {
                crate::metrics::transient_error("relay");
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?backoff, "exceptions relay session ended; starting over");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(settings.pipeline.retry_max_backoff);
    }
}

/// One session: take the lock, reconcile with the topic's tail, relay rounds until `stop`.
async fn relay_session(settings: &Settings, stop: &CancellationToken) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect_with(&settings.database.connect_options()?)
        .await
        .context("connecting the relay session")?;
    let result = relay_on(&mut conn, settings, stop).await;
    // Said goodbye (Terminate), not dropped: a dropped socket is a "connection reset" in the
    // server's log at every stop. Bounded: after a failure the server may be gone.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
    result
}

/// The session's work on its connection: standby until the relay lock is ours, reconcile
/// with the topic's tail, relay rounds until `stop`.
async fn relay_on(
    conn: &mut PgConnection,
    settings: &Settings,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    // Standby until the lock is ours.
    loop {
        let locked = rows::try_relay_lock(conn).await?;
        if locked {
            break;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    let topic = &settings.exceptions.topic;
    let instance = crate::instance::instance_id();
    let message_timeout = settings.exceptions.relay_message_timeout;
    tracing::info!(%topic, "this instance is the active exceptions relay");
    let sr = settings.registry.client()?;
    let (schema_id, schema) = register_schema(&sr, topic, EXCEPTION_SCHEMA).await?;
    let transactional_id = settings.exceptions.transactional_id.as_deref();
    // With a transactional id, creating the producer fences every earlier producer with it:
    // the broker aborts its open transaction and rejects its writes, so a cut-off
    // predecessor cannot land anything any more.
    let producer = RelayProducer::new(&settings.kafka, message_timeout, transactional_id).await?;
    if let Some(id) = transactional_id {
        tracing::info!(
            transactional_id = id,
            "the relay publishes each round in a transaction"
        );
    }

    let unfinished = rows::unfinished_round(conn, message_timeout + ROUND_MARGIN).await?;
    // With transactions the broker fenced the predecessor above: nothing of it can land.
    let unfinished = unfinished.filter(|(_, wait)| *wait > 0.0 && transactional_id.is_none());
    if let Some((previous, wait)) = unfinished {
        tracing::warn!(
            %previous,
            wait_seconds = wait,
            "the previous relay stopped mid-round: waiting until its messages can no longer land before reading the topic's tail"
        );
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs_f64(wait)) => {}
        }
    }
    let round = settings.exceptions.relay_batch.max(1);
    // The unmarked round is within the last `round` offsets of each partition, plus its
    // commit marker when transactional.
    let already = published_in_tail(settings, round as usize + 1).await?;
    if !already.is_empty() {
        let seqs: Vec<i64> = already.into_iter().collect();
        let marked = rows::mark_published(conn, &seqs).await?;
        tracing::info!(
            found = seqs.len(),
            marked,
            "outbox rows already on the topic (published before the last relay stopped)"
        );
    }
    // Whatever the previous relay had in flight has landed or never will, and is marked.
    rows::round_settled(conn).await?;
    loop {
        let batch = rows::unpublished(conn, round).await?;
        if batch.is_empty() {
            crate::metrics::exceptions_published(0, 0);
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(settings.exceptions.relay_poll_interval) => continue,
            }
        }
        // Recorded before anything is sent: a successor waits for this round to settle.
        rows::round_started(conn, &instance).await?;
        let messages = (batch.iter())
            .map(|r| {
                Ok(RelayMessage {
                    key: r.payment_reference.clone(),
                    payload: frame(schema_id, &encode_datum(&schema, to_value(r))?),
                    seq: r.seq,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Every message of the round must be acknowledged (and the transaction committed)
        // before the round is marked; a failure ends the session and the next one finds what
        // landed in the tail.
        producer.publish(topic, SEQ_HEADER, &messages).await?;
        let seqs: Vec<i64> = batch.iter().map(|r| r.seq).collect();
        rows::mark_published(conn, &seqs).await?;
        rows::round_settled(conn).await?;
        let pending = rows::pending(conn).await?;
        crate::metrics::exceptions_published(batch.len() as u64, pending);
        if stop.is_cancelled() {
            return Ok(());
        }
    }
}

/// The outbox seqs among the last `depth` offsets of every partition of the exceptions topic.
pub async fn published_in_tail(settings: &Settings, depth: usize) -> anyhow::Result<BTreeSet<i64>> {
    let messages = read_exceptions_topic(settings, "relay-tail", Some(depth as i64)).await?;
    Ok(messages.into_iter().flatten().collect())
}

/// The outbox seq of every message on the exceptions topic, in topic order per partition
/// (demo summary, tests: each seq must appear exactly once).
pub async fn topic_seqs(settings: &Settings) -> anyhow::Result<Vec<i64>> {
    let messages = read_exceptions_topic(settings, "exceptions-check", None).await?;
    messages
        .into_iter()
        .map(|seq| seq.context("a message without the outbox seq header"))
        .collect()
}

/// The outbox seq header (if any) of every committed message from `depth` offsets before the
/// end of each partition of the exceptions topic (from the log start when `None`).
async fn read_exceptions_topic(
    settings: &Settings,
    reader: &str,
    depth: Option<i64>,
) -> anyhow::Result<Vec<Option<i64>>> {
    let group = format!("{}-{reader}", settings.kafka.group_id);
    crate::kafka::reader::header_numbers(
        &settings.kafka,
        &group,
        &settings.exceptions.topic,
        SEQ_HEADER,
        depth,
    )
    .await
}
