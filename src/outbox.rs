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
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == SEQ_HEADER)
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
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
    // commit marker when transactional.
    let already = published_in_tail(settings, round as usize + 1).await?;
    if !already.is_empty() {
        let seqs: Vec<i64> = already.into_iter().collect();
        let marked = mark_published(&mut *conn, &seqs).await?;
        tracing::info!(
            found = seqs.len(),
            marked,
            "outbox rows already on the topic (published before the last relay stopped)"
        );
    }
    // Whatever the previous relay had in flight has landed or never will, and is marked.
    round_settled(&mut *conn).await?;
    loop {
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
            let payload = frame(schema_id, &encode_datum(&schema, to_value(r))?);
            let seq = r.seq.to_string();
            let record = FutureRecord::to(topic)
                .key(&r.payment_reference)
                .payload(&payload)
                .headers(OwnedHeaders::new().insert(Header {
                    key: SEQ_HEADER,
                    value: Some(seq.as_bytes()),
                }));
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
/// end of each partition of the exceptions topic (from the log start when `None`), in topic
/// order per partition. Reads until each partition's end (partition EOF rather than "offset
/// of the high watermark − 1", which a transaction's commit marker occupies) with
/// read_committed, so an aborted or still-open transaction's messages are not counted.
async fn read_exceptions_topic(
    settings: &Settings,
    reader: &str,
    depth: Option<i64>,
) -> anyhow::Result<Vec<Option<i64>>> {
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
            let from = depth.map_or(low, |d| low.max(high - d));
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
            Ok(m) => out.push(header_seq(&m)),
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                remaining.remove(&p);
            }
            Err(e) => return Err(anyhow::Error::new(e).context("reading the exceptions topic")),
        }
    }
    Ok(out)
}
