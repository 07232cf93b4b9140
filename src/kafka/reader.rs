//! Reading a topic outside the service's consumer group: the tail of a topic read to its
//! end (the exceptions relay's check of what landed, the demo's and the tests' count), and
//! the positioned reads replay's range planning needs.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::kafka::KafkaSettings;

/// Where a reading of a topic's tail starts in each partition: `depth` offsets before its
/// end, or earlier when a message is younger than `since_ms` (broker timestamps, Unix ms).
#[derive(Debug, Clone, Copy)]
pub struct Tail {
    pub depth: i64,
    pub since_ms: Option<i64>,
}

/// A message of a tail as [`read_tail`] returns it: its key and the text of the headers asked
/// for, in the order asked.
#[derive(Debug, Clone)]
pub struct TailMessage {
    pub key: Option<String>,
    pub headers: Vec<Option<String>>,
}

/// Every committed message of `topic` from `tail` (from the log start when `None`), in topic
/// order per partition, with the text of its headers named `headers`. Reads until each
/// partition's end (partition EOF rather than "offset of the high watermark − 1", which a
/// transaction's commit marker occupies) with read_committed, so an aborted or still-open
/// transaction's messages are not counted. `group` names the reader (it never joins a group:
/// partitions are assigned).
pub async fn read_tail(
    kafka: &KafkaSettings,
    group: &str,
    topic: &str,
    headers: &[&str],
    tail: Option<Tail>,
) -> anyhow::Result<Vec<TailMessage>> {
    let mut config = kafka.client_config();
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: StreamConsumer<super::Quiet> = config
        .create_with_context(super::Quiet::default())
        .with_context(|| format!("creating a reader of {topic}"))?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = BTreeSet::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .with_context(|| format!("reading the watermarks of {topic}"))?;
            let from = match tail {
                None => low,
                Some(Tail { depth, since_ms }) => {
                    let by_time = match since_ms {
                        None => low,
                        Some(ms) => {
                            let mut q = TopicPartitionList::new();
                            q.add_partition_offset(topic, p.id(), Offset::Offset(ms))?;
                            let found = consumer
                                .offsets_for_times(q, timeout)
                                .with_context(|| format!("finding an offset by time in {topic}"))?;
                            match found.find_partition(topic, p.id()).map(|e| e.offset()) {
                                Some(Offset::Offset(o)) => o,
                                _ => high,
                            }
                        }
                    };
                    low.max((high - depth).min(by_time))
                }
            };
            if from < high {
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(from))?;
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
            .with_context(|| format!("timed out reading {topic}"))?
        {
            Ok(m) => out.push(TailMessage {
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                headers: headers.iter().map(|h| header_text(&m, h)).collect(),
            }),
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                remaining.remove(&p);
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {topic}"))),
        }
    }
    Ok(out)
}

/// The text of a message's header `name`.
fn header_text(message: &impl Message, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
        .map(str::to_owned)
}

/// A range reader's client: a group id of its own (never the service's), no commits, no
/// subscription (partitions are assigned), the service's isolation level.
fn range_config(kafka: &KafkaSettings, group_id: &str) -> ClientConfig {
    let mut c = kafka.client_config();
    c.set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        // A start offset that no longer exists is an error, never a silent jump.
        .set("auto.offset.reset", "error");
    for (key, value) in [
        ("queued.max.messages.kbytes", "32768"),
        ("fetch.wait.max.ms", "10"),
    ] {
        if c.get(key).is_none() {
            c.set(key, value);
        }
    }
    c
}

/// One partition as the brokers see it: its id and its log start and end offsets.
#[derive(Debug, Clone, Copy)]
pub struct PartitionBounds {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
}

/// Answers about topics before a range is read: their partitions and bounds, and where a
/// time range starts.
pub struct TopicProbe {
    consumer: BaseConsumer,
}

impl TopicProbe {
    pub fn new(kafka: &KafkaSettings, group_id: &str) -> anyhow::Result<Self> {
        let consumer = range_config(kafka, group_id)
            .create()
            .context("creating a Kafka client")?;
        Ok(Self { consumer })
    }

    /// Every partition of `topic`, in id order; an error when the topic does not exist.
    pub fn partitions(&self, topic: &str) -> anyhow::Result<Vec<PartitionBounds>> {
        let timeout = Duration::from_secs(10);
        let metadata = (self.consumer)
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| format!("reading the metadata of {topic}"))?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .with_context(|| format!("topic {topic} not found"))?;
        anyhow::ensure!(
            t.error().is_none() && !t.partitions().is_empty(),
            "topic {topic} does not exist on the brokers"
        );
        let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for partition in ids {
            let (low, high) = (self.consumer)
                .fetch_watermarks(topic, partition, timeout)
                .with_context(|| format!("reading the watermarks of {topic}[{partition}]"))?;
            out.push(PartitionBounds {
                partition,
                low,
                high,
            });
        }
        Ok(out)
    }

    /// Where to start scanning each partition (topic, bounds) for the first record at or
    /// after `from_ms`: the offset before the one the broker's `offsets_for_times` names,
    /// when the record there is indeed older than `from_ms` (the broker's answer is checked,
    /// because the mock cluster always answers "end" and some brokers answer per record
    /// batch); `None`: scan from the log start.
    pub fn start_hints(&self, parts: &[(&str, PartitionBounds)], from_ms: i64) -> Vec<Option<i64>> {
        let consumer = &self.consumer;
        let timeout = Duration::from_secs(10);
        let mut tpl = TopicPartitionList::new();
        for (topic, b) in parts {
            if tpl
                .add_partition_offset(topic, b.partition, Offset::Offset(from_ms))
                .is_err()
            {
                return vec![None; parts.len()];
            }
        }
        let answer: HashMap<(String, i32), Offset> = match consumer.offsets_for_times(tpl, timeout)
        {
            Ok(a) => a
                .elements()
                .iter()
                .map(|e| ((e.topic().to_owned(), e.partition()), e.offset()))
                .collect(),
            Err(e) => {
                tracing::info!(error = %e, "offsets_for_times failed; scanning from the log start");
                return vec![None; parts.len()];
            }
        };
        let hints: Vec<Option<i64>> = parts
            .iter()
            .map(|(topic, b)| {
                let first = match answer.get(&((*topic).to_owned(), b.partition)) {
                    Some(Offset::Offset(o)) => *o,
                    Some(Offset::End) => b.high,
                    _ => return None,
                };
                if first <= b.low || first > b.high {
                    return None;
                }
                // The record before the answer must be older than the start of the range.
                match self.peek(topic, b.partition, first - 1) {
                    Some((offset, ts)) if offset == first - 1 && ts < from_ms => Some(first - 1),
                    _ => None,
                }
            })
            .collect();
        let _ = consumer.unassign();
        tracing::info!(
            checked = hints.iter().filter(|h| h.is_some()).count(),
            partitions = parts.len(),
            "start of the time range: broker answers confirmed (the other partitions are scanned from the log start)"
        );
        hints
    }

    /// The first record at or after `offset` (its offset and broker timestamp).
    fn peek(&self, topic: &str, partition: i32, offset: i64) -> Option<(i64, i64)> {
        let consumer = &self.consumer;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .ok()?;
        consumer.assign(&tpl).ok()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                    return Some((m.offset(), m.timestamp().to_millis().unwrap_or(-1)));
                }
                Some(Err(e)) => {
                    tracing::info!(error = %e, topic, partition, "cannot check the broker's offset by time");
                    return None;
                }
                _ => {}
            }
        }
        None
    }
}

/// A record as read: where it stands, its broker time, key and payload.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Broker timestamp in milliseconds, when the record has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// What one wait on a [`RangeReader`] brought.
pub enum Received {
    /// Nothing within the wait.
    Idle,
    Record(ReadRecord),
    /// A broker or client error; `fatal`: retrying cannot fix it (the start offset is gone
    /// or invalid).
    Error {
        fatal: bool,
        error: KafkaError,
    },
}

/// Reads assigned partitions from given offsets, outside any group (replay).
pub struct RangeReader {
    consumer: StreamConsumer,
}

impl RangeReader {
    pub fn new(kafka: &KafkaSettings, group_id: &str) -> anyhow::Result<Self> {
        let consumer = range_config(kafka, group_id)
            .create()
            .context("creating the replay's Kafka consumer")?;
        Ok(Self { consumer })
    }

    /// Reads each (topic, partition) from its offset.
    pub fn assign(&self, starts: &[(&str, i32, i64)]) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in starts {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        if tpl.count() > 0 {
            (self.consumer)
                .assign(&tpl)
                .context("assigning the replayed partitions")?;
        }
        Ok(())
    }

    /// The next record, waiting at most `idle`.
    pub async fn recv(&self, idle: Duration) -> Received {
        match tokio::time::timeout(idle, self.consumer.recv()).await {
            Err(_) => Received::Idle,
            Ok(Err(error)) => Received::Error {
                fatal: matches!(
                    error.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange)
                ),
                error,
            },
            Ok(Ok(m)) => Received::Record(ReadRecord {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
            }),
        }
    }

    /// Stops fetching one partition.
    pub fn pause(&self, topic: &str, partition: i32) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(topic, partition);
        let _ = self.consumer.pause(&tpl);
    }

    /// The consumer's position in every assigned partition that has one.
    pub fn positions(&self) -> Vec<(String, i32, i64)> {
        let Ok(positions) = self.consumer.position() else {
            return Vec::new();
        };
        (positions.elements().iter())
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.topic().to_owned(), e.partition(), o)),
                _ => None,
            })
            .collect()
    }
}
