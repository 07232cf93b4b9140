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

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::codec::{decimal_value, encode_datum, frame, register_schema};
use crate::config::Settings;
use crate::store::Store;

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
/// The advisory lock key of the relay ("payrecon" in ASCII, as a number).
const RELAY_LOCK: i64 = 0x7061_7972_6563_6f6e;

/// One outbox row (the SQL and the row type are `store::outbox`).
pub use crate::store::outbox::OutboxRow;

/// Added to `relay_message_timeout` before a successor reads the tail: the last in-flight
/// produce request's own round trip after the local timeout.
const ROUND_MARGIN: Duration = Duration::from_secs(5);

/// Bound of the blocking transaction calls (init, commit).
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

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

/// The outbox sequence number in a message's headers.
pub fn header_seq(message: &impl Message) -> Option<i64> {
    header_text(message, SEQ_HEADER)?.parse().ok()
}

fn header_text<'m>(message: &'m impl Message, key: &str) -> Option<&'m str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
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
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *conn)
            .await?;
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
    let mut config = settings.kafka.producer_config();
    config.set(
        "message.timeout.ms",
        message_timeout.as_millis().max(1).to_string(),
    );
    if let Some(id) = transactional_id {
        config.set("transactional.id", id);
    }
    let producer: FutureProducer<crate::kafka::Quiet> = config
        .create_with_context(crate::kafka::Quiet::default())
        .context("creating the relay producer")?;
    if let Some(id) = transactional_id {
        // Fences every earlier producer with this id: the broker aborts its open transaction
        // and rejects its writes, so a cut-off predecessor cannot land anything any more.
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(TRANSACTION_TIMEOUT))
            .await?
            .with_context(|| format!("initialising transactions for transactional.id {id}"))?;
        tracing::info!(
            transactional_id = id,
            "the relay publishes each round in a transaction"
        );
    }

    let unfinished: Option<(String, f64)> = sqlx::query_as(
        "SELECT instance,
                GREATEST(0, EXTRACT(EPOCH FROM round_started_at + $1::interval - clock_timestamp()))::float8
           FROM exceptions_relay WHERE round_started_at IS NOT NULL",
    )
    .bind(message_timeout + ROUND_MARGIN)
    .fetch_optional(&mut *conn)
    .await?;
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
    let newest_mark: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(published_at) FROM exceptions_outbox")
            .fetch_one(&mut *conn)
            .await?;
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
        let marked = mark_published(&mut *conn, &already).await?;
        tracing::info!(
            found = already.len(),
            marked,
            "outbox rows already on the topic (published before the last relay stopped)"
        );
    }
    record_lost(&mut *conn, &lost).await?;
    let mut superseding: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM exceptions_lost WHERE superseded_by IS NULL)",
    )
    .fetch_one(&mut *conn)
    .await?;
    // Whatever the previous relay had in flight has landed or never will, and is marked.
    round_settled(&mut *conn).await?;
    loop {
        // A row holding the seq of a lost exception gets a new one before it is sent.
        sqlx::query(
            "UPDATE exceptions_outbox SET seq = nextval('exceptions_outbox_seq_seq')
              WHERE published_at IS NULL AND seq IN (SELECT seq FROM exceptions_lost)",
        )
        .execute(&mut *conn)
        .await?;
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT seq, history_id, payment_reference, merchant_id, from_status, to_status,
                    opened, coalesce(currency, '') AS currency, expected_gross, settled_gross,
                    reason, watermark, created_at, leg, account_id
               FROM exceptions_outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1",
        )
        .bind(round)
        .fetch_all(&mut *conn)
        .await?;
        if rows.is_empty() {
            crate::metrics::exceptions_published(0, 0);
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(settings.exceptions.relay_poll_interval) => continue,
            }
        }
        // Recorded before anything is sent: a successor waits for this round to settle.
        sqlx::query(
            "INSERT INTO exceptions_relay (instance, round_started_at)
             VALUES ($1, clock_timestamp())
             ON CONFLICT (singleton) DO UPDATE
                SET instance = EXCLUDED.instance, round_started_at = EXCLUDED.round_started_at",
        )
        .bind(&instance)
        .execute(&mut *conn)
        .await?;
        if transactional_id.is_some() {
            producer
                .begin_transaction()
                .context("beginning a relay transaction")?;
        }
        let mut acks = FuturesOrdered::new();
        for r in &rows {
            let datum = encode_datum(&schema, to_value(r))?;
            let payload = frame(schema_id, &datum);
            let seq = r.seq.to_string();
            let digest = digest(&datum);
            let mut headers = OwnedHeaders::new()
                .insert(Header {
                    key: SEQ_HEADER,
                    value: Some(seq.as_bytes()),
                })
                .insert(Header {
                    key: DIGEST_HEADER,
                    value: Some(digest.as_bytes()),
                });
            if superseding && let Some(lost) = claim_lost(&mut *conn, r).await? {
                tracing::warn!(lost, seq = r.seq, payment_reference = %r.payment_reference, "publishing an exception that supersedes one the database lost");
                headers = headers.insert(Header {
                    key: SUPERSEDES_HEADER,
                    value: Some(lost.to_string().as_bytes()),
                });
            }
            let record = FutureRecord::to(topic)
                .key(&r.payment_reference)
                .payload(&payload)
                .headers(headers);
            let ack = producer
                .send_result(record)
                .map_err(|(e, _)| anyhow::Error::new(e).context("queueing an exception"))?;
            acks.push_back(ack);
        }
        // Every message of the round must be acknowledged before the round is marked; a
        // failure ends the session and the next one finds what landed in the tail.
        while let Some(ack) = acks.next().await {
            ack.context("the relay producer went away")?
                .map_err(|(e, _)| anyhow::Error::new(e).context("publishing an exception"))?;
        }
        if transactional_id.is_some() {
            let p = producer.clone();
            tokio::task::spawn_blocking(move || p.commit_transaction(TRANSACTION_TIMEOUT))
                .await?
                .context("committing a relay transaction")?;
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        mark_published(&mut *conn, &seqs).await?;
        if superseding {
            superseding = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM exceptions_lost WHERE superseded_by IS NULL)",
            )
            .fetch_one(&mut *conn)
            .await?;
        }
        round_settled(&mut *conn).await?;
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM exceptions_outbox WHERE published_at IS NULL")
                .fetch_one(&mut *conn)
                .await?;
        crate::metrics::exceptions_published(rows.len() as u64, pending);
        if stop.is_cancelled() {
            return Ok(());
        }
    }
}

/// Records that no round is in flight any more (see `exceptions_relay`).
async fn round_settled(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE exceptions_relay SET round_started_at = NULL")
        .execute(conn)
        .await?;
    Ok(())
}

async fn mark_published(conn: &mut PgConnection, seqs: &[i64]) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE exceptions_outbox SET published_at = now()
          WHERE seq = ANY($1) AND published_at IS NULL",
    )
    .bind(seqs)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Sorts the tail's messages: the seqs whose row this database holds with the same content
/// (published; to be marked) and the messages it lacks or holds with other content (lost).
async fn sort_tail(
    conn: &mut PgConnection,
    schema: &apache_avro::Schema,
    tail: &[Published],
) -> anyhow::Result<(Vec<i64>, Vec<Published>)> {
    let seqs: Vec<i64> = tail.iter().filter_map(|m| m.seq).collect();
    let rows: Vec<OutboxRow> = sqlx::query_as(
        "SELECT seq, history_id, payment_reference, merchant_id, from_status, to_status,
                opened, coalesce(currency, '') AS currency, expected_gross, settled_gross,
                reason, watermark, created_at, leg, account_id
           FROM exceptions_outbox WHERE seq = ANY($1)",
    )
    .bind(&seqs)
    .fetch_all(&mut *conn)
    .await?;
    let mut held = std::collections::HashMap::new();
    for r in &rows {
        held.insert(r.seq, digest(&encode_datum(schema, to_value(r))?));
    }
    let (mut already, mut lost) = (Vec::new(), Vec::new());
    for m in tail {
        let Some(seq) = m.seq else { continue };
        match (held.get(&seq), &m.digest) {
            // Published before digests existed: the seq is all there is to go by.
            (Some(_), None) => already.push(seq),
            (Some(d), Some(theirs)) if d == theirs => already.push(seq),
            _ => lost.push(m.clone()),
        }
    }
    Ok((already, lost))
}

/// Records exceptions the topic holds and this database lost, and moves the outbox sequence
/// past them (module doc).
async fn record_lost(conn: &mut PgConnection, lost: &[Published]) -> Result<(), sqlx::Error> {
    let Some(highest) = lost.iter().filter_map(|m| m.seq).max() else {
        return Ok(());
    };
    for m in lost {
        tracing::warn!(seq = m.seq, payment_reference = ?m.key, "the exceptions topic holds an exception this database lost (a failover to an asynchronous standby or a restore); its seq is retired and the exception re-derived for the reference will say it supersedes it");
        sqlx::query(
            "INSERT INTO exceptions_lost (seq, payment_reference, digest) VALUES ($1, $2, $3)
             ON CONFLICT (seq) DO NOTHING",
        )
        .bind(m.seq)
        .bind(m.key.as_deref().unwrap_or(""))
        .bind(&m.digest)
        .execute(&mut *conn)
        .await?;
    }
    crate::metrics::exceptions_lost(lost.len() as u64);
    sqlx::query(
        "SELECT setval('exceptions_outbox_seq_seq', $1) FROM exceptions_outbox_seq_seq
          WHERE last_value < $1",
    )
    .bind(highest)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The lost exception `row` supersedes: the lowest-seq unclaimed one of its payment
/// reference, or the one it already claimed (a round that failed after claiming).
async fn claim_lost(conn: &mut PgConnection, row: &OutboxRow) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE exceptions_lost SET superseded_by = $2
          WHERE seq = (SELECT seq FROM exceptions_lost
                        WHERE payment_reference = $1
                          AND (superseded_by IS NULL OR superseded_by = $2)
                        ORDER BY superseded_by NULLS LAST, seq LIMIT 1)
          RETURNING seq",
    )
    .bind(&row.payment_reference)
    .bind(row.seq)
    .fetch_optional(conn)
    .await
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

/// Where a session's reading of the topic starts in each partition: `depth` offsets before
/// its end, or earlier when a message is younger than `since_ms` (broker timestamps, Unix
/// ms); the log start when `since_ms` is `None`.
struct Tail {
    depth: i64,
    since_ms: Option<i64>,
}

/// The messages of the exceptions topic from `tail` (from the log start when `None`), in
/// topic order per partition. Reads until each partition's end (partition EOF rather than
/// "offset of the high watermark − 1", which a transaction's commit marker occupies) with
/// read_committed, so an aborted or still-open transaction's messages are not counted.
async fn read_exceptions_topic(
    settings: &Settings,
    reader: &str,
    tail: Option<Tail>,
) -> anyhow::Result<Vec<Published>> {
    let topic = settings.exceptions.topic.clone();
    let mut config = settings.kafka.client_config();
    config
        .set("group.id", format!("{}-{reader}", settings.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: StreamConsumer<crate::kafka::Quiet> = config
        .create_with_context(crate::kafka::Quiet::default())
        .context("creating the exceptions topic's reader")?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(&topic), timeout)
        .context("reading the exceptions topic's metadata")?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = BTreeSet::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p.id(), timeout)
                .context("reading the exceptions topic's watermarks")?;
            let from = match &tail {
                None => low,
                Some(Tail { depth, since_ms }) => {
                    let by_time = match since_ms {
                        None => low,
                        Some(ms) => {
                            let mut q = TopicPartitionList::new();
                            q.add_partition_offset(&topic, p.id(), Offset::Offset(*ms))?;
                            let found = consumer
                                .offsets_for_times(q, timeout)
                                .context("finding the exceptions topic's offset for a time")?;
                            match found.find_partition(&topic, p.id()).map(|e| e.offset()) {
                                Some(Offset::Offset(o)) => o,
                                _ => high,
                            }
                        }
                    };
                    low.max((high - depth).min(by_time))
                }
            };
            if from < high {
                tpl.add_partition_offset(&topic, p.id(), Offset::Offset(from))?;
                remaining.insert(p.id());
            }
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() {
        match tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .context("timed out reading the exceptions topic")?
        {
            Ok(m) => out.push(Published {
                seq: header_seq(&m),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                digest: header_text(&m, DIGEST_HEADER).map(str::to_owned),
                supersedes: header_text(&m, SUPERSEDES_HEADER).and_then(|s| s.parse().ok()),
            }),
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                remaining.remove(&p);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("reading the exceptions topic")),
        }
    }
    Ok(out)
}
