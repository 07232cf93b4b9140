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
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rust_decimal::Decimal;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::codec::{decimal_value, encode_datum, frame, register_schema, registry_settings};
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
}

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
    // Standby until the lock is ours.
    loop {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut conn)
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
    let instance = crate::app::instance_id();
    let message_timeout = settings.exceptions.relay_message_timeout;
    tracing::info!(%topic, "this instance is the active exceptions relay");
    let sr = registry_settings(&settings.registry.url, settings.registry.request_timeout)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (schema_id, schema) = register_schema(&sr, topic, EXCEPTION_SCHEMA).await?;
    let producer: FutureProducer = settings
        .kafka
        .producer_config()
        .set(
            "message.timeout.ms",
            message_timeout.as_millis().max(1).to_string(),
        )
        .create()
        .context("creating the relay producer")?;

    let unfinished: Option<(String, f64)> = sqlx::query_as(
        "SELECT instance,
                GREATEST(0, EXTRACT(EPOCH FROM round_started_at + $1::interval - clock_timestamp()))::float8
           FROM exceptions_relay WHERE round_started_at IS NOT NULL",
    )
    .bind(message_timeout + ROUND_MARGIN)
    .fetch_optional(&mut conn)
    .await?;
    if let Some((previous, wait)) = unfinished.filter(|(_, wait)| *wait > 0.0) {
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
    let already = published_in_tail(settings, round as usize).await?;
    if !already.is_empty() {
        let seqs: Vec<i64> = already.into_iter().collect();
        let marked = mark_published(&mut conn, &seqs).await?;
        tracing::info!(
            found = seqs.len(),
            marked,
            "outbox rows already on the topic (published before the last relay stopped)"
        );
    }
    // Whatever the previous relay had in flight has landed or never will, and is marked.
    sqlx::query("UPDATE exceptions_relay SET round_started_at = NULL")
        .execute(&mut conn)
        .await?;
    loop {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT seq, history_id, payment_reference, merchant_id, from_status, to_status,
                    opened, currency, expected_gross, settled_gross, reason, watermark, created_at
               FROM exceptions_outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1",
        )
        .bind(round)
        .fetch_all(&mut conn)
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
        .execute(&mut conn)
        .await?;
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
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        mark_published(&mut conn, &seqs).await?;
        sqlx::query("UPDATE exceptions_relay SET round_started_at = NULL")
            .execute(&mut conn)
            .await?;
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM exceptions_outbox WHERE published_at IS NULL")
                .fetch_one(&mut conn)
                .await?;
        crate::metrics::exceptions_published(rows.len() as u64, pending);
        if stop.is_cancelled() {
            return Ok(());
        }
    }
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

/// The outbox seqs among the last `depth` messages of every partition of the exceptions topic.
pub async fn published_in_tail(settings: &Settings, depth: usize) -> anyhow::Result<BTreeSet<i64>> {
    let topic = settings.exceptions.topic.clone();
    let mut config = settings.kafka.client_config();
    config
        .set(
            "group.id",
            format!("{}-relay-tail", settings.kafka.group_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: StreamConsumer = config.create().context("creating the tail reader")?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(&topic), timeout)
        .context("reading the exceptions topic's metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0usize;
    let mut ends = std::collections::HashMap::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(&topic, p, timeout)
            .context("reading the exceptions topic's watermarks")?;
        let from = low.max(high - depth as i64);
        if from < high {
            tpl.add_partition_offset(&topic, p, Offset::Offset(from))?;
            remaining += 1;
            ends.insert(p, high);
        }
    }
    let mut seqs = BTreeSet::new();
    if remaining == 0 {
        return Ok(seqs);
    }
    consumer.assign(&tpl)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while remaining > 0 {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .context("timed out reading the exceptions topic's tail")??;
        if let Some(seq) = header_seq(&message) {
            seqs.insert(seq);
        }
        if message.offset() + 1 >= ends.get(&message.partition()).copied().unwrap_or(0)
            && ends.remove(&message.partition()).is_some()
        {
            remaining -= 1;
        }
    }
    Ok(seqs)
}

/// The outbox seq of every message on the exceptions topic, in topic order per partition
/// (demo summary, tests: each seq must appear exactly once).
pub async fn topic_seqs(settings: &Settings) -> anyhow::Result<Vec<i64>> {
    let topic = settings.exceptions.topic.clone();
    let mut config = settings.kafka.client_config();
    config
        .set(
            "group.id",
            format!("{}-exceptions-check", settings.kafka.group_id),
        )
        .set("enable.auto.commit", "false");
    let consumer: StreamConsumer = config.create()?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
            if low < high {
                tpl.add_partition_offset(&topic, p.id(), Offset::Offset(low))?;
                ends.insert(p.id(), high);
            }
        }
    }
    let mut seqs = Vec::new();
    if ends.is_empty() {
        return Ok(seqs);
    }
    consumer.assign(&tpl)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .context("timed out reading the exceptions topic")??;
        seqs.push(header_seq(&m).context("a message without the outbox seq header")?);
        if ends
            .get(&m.partition())
            .is_some_and(|h| m.offset() + 1 >= *h)
        {
            ends.remove(&m.partition());
        }
    }
    Ok(seqs)
}
