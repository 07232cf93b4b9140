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
//! - **A database that lost what it published** (an asynchronous standby promoted, a
//!   point-in-time restore): every message carries the SHA-256 of its Avro datum
//!   (`payrecon-outbox-digest`). A new session reads the topic from shortly before the newest
//!   mark the database holds; a seq on the topic that the database lacks, or holds with other
//!   content, is recorded in `exceptions_lost`, the outbox sequence is moved past it, an
//!   unpublished row holding it is renumbered before it is sent, and the next exception of
//!   the same payment reference is published with `payrecon-supersedes: <lost seq>`. So a
//!   seq never names two different exceptions, and a replaced one is named, not silent
//!   (docs/failover.md).
//!
//! Assumption: only the relay writes to the exceptions topic.

use std::time::Duration;

use anyhow::Context;
use apache_avro::types::Value;
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::codec::{decimal_value, encode_datum, frame, register_schema};
use crate::config::Settings;
use crate::kafka::producer::{RelayMessage, RelayProducer};
use crate::kafka::reader::{self, Tail};
use crate::store::{Store, outbox};

/// The shipped schema of exception messages.
pub const EXCEPTION_SCHEMA: &str = include_str!("../schemas/reconciliation_exception.avsc");
/// Header carrying the outbox sequence number of a message.
pub const SEQ_HEADER: &str = "payrecon-outbox-seq";
/// Header carrying the SHA-256 (hex) of the message's Avro datum: what was published under
/// a seq, so a database that lost the row can tell it from what it derives again.
pub const DIGEST_HEADER: &str = "payrecon-outbox-digest";
/// Header naming the seq of a lost exception (see the module doc) this message replaces.
pub const SUPERSEDES_HEADER: &str = "payrecon-supersedes";
/// How long before the newest mark a new session starts reading the topic: the database's
/// and the broker's clocks, and a mark's delay after the acknowledgement.
const MARK_MARGIN: chrono::Duration = chrono::Duration::seconds(60);
/// One outbox row (the SQL and the row type are `store::outbox`).
pub use crate::store::outbox::OutboxRow;

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

/// What the relay needs of a message on the exceptions topic.
#[derive(Debug, Clone)]
pub struct Published {
    pub seq: Option<i64>,
    /// The payment reference.
    pub key: Option<String>,
    pub digest: Option<String>,
    pub supersedes: Option<i64>,
}

/// The SHA-256 (hex) of a row's Avro datum.
fn digest(datum: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(datum)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
    let mut conn = crate::store::targets::connect_session(&settings.database)
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
    while !outbox::try_relay_lock(&mut *conn).await? {
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
    // With a transactional id, creating the producer fences every earlier one with that id:
    // the broker aborts its open transaction and rejects its writes, so a cut-off
    // predecessor cannot land anything any more.
    let producer = RelayProducer::new(&settings.kafka, message_timeout, transactional_id).await?;
    if let Some(id) = transactional_id {
        tracing::info!(
            transactional_id = id,
            "the relay publishes each round in a transaction"
        );
    }
    let unfinished = outbox::unfinished_round(&mut *conn, message_timeout + ROUND_MARGIN).await?;
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
    // commit marker when transactional; what a lost transaction published is after the
    // newest mark this database holds (the whole topic when it holds none).
    let newest_mark = outbox::newest_mark(&mut *conn).await?;
    let tail = read_exceptions_topic(
        settings,
        "relay-tail",
        Some(Tail {
            depth: round + 1,
            since_ms: newest_mark.map(|t| (t - MARK_MARGIN).timestamp_millis()),
        }),
    )
    .await?;
    let (already, lost) = sort_tail(&mut *conn, &schema, &tail).await?;
    if !already.is_empty() {
        let marked = outbox::mark_published(&mut *conn, &already).await?;
        tracing::info!(
            found = already.len(),
            marked,
            "outbox rows already on the topic (published before the last relay stopped)"
        );
    }
    for m in &lost {
        tracing::warn!(seq = m.seq, payment_reference = %m.payment_reference, "the exceptions topic holds an exception this database lost (a failover to an asynchronous standby or a restore); its seq is retired and the exception re-derived for the reference will say it supersedes it");
    }
    outbox::record_lost(&mut *conn, &lost).await?;
    if !lost.is_empty() {
        crate::metrics::exceptions_lost(lost.len() as u64);
    }
    let mut superseding = outbox::unclaimed_lost(&mut *conn).await?;
    // Whatever the previous relay had in flight has landed or never will, and is marked.
    outbox::round_settled(&mut *conn).await?;
    loop {
        let rows = outbox::unpublished(&mut *conn, round).await?;
        if rows.is_empty() {
            crate::metrics::exceptions_published(0, 0);
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(settings.exceptions.relay_poll_interval) => continue,
            }
        }
        // Recorded before anything is sent: a successor waits for this round to settle.
        outbox::round_started(&mut *conn, &instance).await?;
        let mut messages = Vec::with_capacity(rows.len());
        for r in &rows {
            let datum = encode_datum(&schema, to_value(r))?;
            let mut headers = vec![
                (SEQ_HEADER, r.seq.to_string()),
                (DIGEST_HEADER, digest(&datum)),
            ];
            if superseding
                && let Some(lost) =
                    outbox::claim_lost(&mut *conn, &r.payment_reference, r.seq).await?
            {
                tracing::warn!(lost, seq = r.seq, payment_reference = %r.payment_reference, "publishing an exception that supersedes one the database lost");
                headers.push((SUPERSEDES_HEADER, lost.to_string()));
            }
            messages.push(RelayMessage {
                key: r.payment_reference.clone(),
                payload: frame(schema_id, &datum),
                headers,
            });
        }
        // Every message of the round is acknowledged (and its transaction committed) before
        // the round is marked; a failure ends the session and the next one finds what landed
        // in the tail.
        producer.publish(topic, &messages).await?;
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        outbox::mark_published(&mut *conn, &seqs).await?;
        if superseding {
            superseding = outbox::unclaimed_lost(&mut *conn).await?;
        }
        outbox::round_settled(&mut *conn).await?;
        let pending = outbox::pending(&mut *conn).await?;
        crate::metrics::exceptions_published(rows.len() as u64, pending);
        if stop.is_cancelled() {
            return Ok(());
        }
    }
}

/// Sorts the tail's messages: the seqs whose row this database holds with the same content
/// (published; to be marked) and the messages it lacks or holds with other content (lost).
async fn sort_tail(
    conn: &mut PgConnection,
    schema: &apache_avro::Schema,
    tail: &[Published],
) -> anyhow::Result<(Vec<i64>, Vec<outbox::Lost>)> {
    let seqs: Vec<i64> = tail.iter().filter_map(|m| m.seq).collect();
    let mut held = std::collections::HashMap::new();
    for r in outbox::rows(conn, &seqs).await? {
        held.insert(r.seq, digest(&encode_datum(schema, to_value(&r))?));
    }
    let (mut already, mut lost) = (Vec::new(), Vec::new());
    for m in tail {
        let Some(seq) = m.seq else { continue };
        match (held.get(&seq), &m.digest) {
            // Published before digests existed: the seq is all there is to go by.
            (Some(_), None) => already.push(seq),
            (Some(d), Some(theirs)) if d == theirs => already.push(seq),
            _ => lost.push(outbox::Lost {
                seq,
                payment_reference: m.key.clone().unwrap_or_default(),
                digest: m.digest.clone(),
            }),
        }
    }
    Ok((already, lost))
}

/// The outbox seq of every message on the exceptions topic, in topic order per partition
/// (demo summary, tests: each seq must appear exactly once).
pub async fn topic_seqs(settings: &Settings) -> anyhow::Result<Vec<i64>> {
    let messages = read_exceptions_topic(settings, "exceptions-check", None).await?;
    messages
        .into_iter()
        .map(|m| m.seq.context("a message without the outbox seq header"))
        .collect()
}

/// Every message on the exceptions topic, in topic order per partition (tests, drills).
pub async fn topic_messages(settings: &Settings) -> anyhow::Result<Vec<Published>> {
    read_exceptions_topic(settings, "exceptions-check", None).await
}

/// The messages of the exceptions topic from `tail` (from the log start when `None`), in
/// topic order per partition, committed messages only.
async fn read_exceptions_topic(
    settings: &Settings,
    reader: &str,
    tail: Option<Tail>,
) -> anyhow::Result<Vec<Published>> {
    let messages = reader::read_tail(
        &settings.kafka,
        &format!("{}-{reader}", settings.kafka.group_id),
        &settings.exceptions.topic,
        &[SEQ_HEADER, DIGEST_HEADER, SUPERSEDES_HEADER],
        tail,
    )
    .await?;
    Ok(messages
        .into_iter()
        .map(|m| {
            let number = |i: usize| m.headers[i].as_deref().and_then(|s| s.parse().ok());
            Published {
                seq: number(0),
                supersedes: number(2),
                digest: m.headers[1].clone(),
                key: m.key,
            }
        })
        .collect())
}
