//! Reads the planned ranges and commits them into the shadow schema through the service's
//! own path: decode with [`Decoder`] (poison → dead letter, transient → retry the same record),
//! build [`Batch`]es exactly as the consumer loop does, and [`crate::engine::commit_batch`] them.
//!
//! The consumer never joins the service's group: it has a group id of its own, never
//! subscribes, never commits, and `assign`s each partition at the start of its range. Memory
//! is bounded by one batch being built, one queued and one being committed (reading and
//! committing overlap), plus librdkafka's capped prefetch queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::DateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::range::{PartitionRange, Plan};
use crate::codec::{DecodeError, Stream};
use crate::config::Settings;
use crate::domain::Record;
use crate::engine::{Batch, Reconciler};
use crate::inputs::Decoder;
use crate::kafka::reader::{RangeReader, ReadRecord, Received};
use crate::store::{CommitError, DeadLetter, PartitionProgress, RawRecord, Source, Store};

/// Everything the reader needs.
pub struct Reader<'a> {
    pub settings: &'a Settings,
    pub codec: &'a Decoder,
    /// The shadow store: every batch is committed there, nowhere else.
    pub shadow: Store,
    pub reconciler: Reconciler,
    /// The live group's name, reused in the shadow so the watermark reads the same rows.
    pub group: String,
    pub instance: String,
    /// The replay's own consumer group id (never the service's).
    pub consumer_group: String,
    pub quiet: bool,
}

/// What reading found.
#[derive(Debug, Clone)]
pub struct ReadOutcome {
    /// Every planned partition's range as read, in plan order.
    pub ranges: Vec<PartitionRange>,
    pub records: u64,
    pub interrupted: bool,
    /// From the first record received to the last batch committed.
    pub elapsed: Duration,
}

/// Per-partition reading state.
struct Partition {
    plan: Plan,
    /// Next offset to read.
    position: i64,
    from: Option<i64>,
    /// The end, once a time scan found the first record past `--to-time`.
    to: Option<i64>,
    records: u64,
    done: bool,
}

/// Shared with the progress printer.
#[derive(Default)]
struct Progress {
    read: AtomicU64,
    committed: AtomicU64,
    /// (topic, partition) → (position, limit).
    positions: Mutex<BTreeMap<(String, i32), (i64, i64)>>,
}

/// Builds batches the way the consumer loop does; remembers where each partition's last
/// batch ended, which is the compare-and-set base of its next one.
struct Builder {
    topics: Vec<String>,
    batch: Batch,
    index: HashMap<(usize, i32), usize>,
    expected: HashMap<(usize, i32), i64>,
}

impl Builder {
    fn new(topics: Vec<String>) -> Self {
        Builder {
            batch: Batch {
                topics: topics.clone(),
                ..Batch::default()
            },
            topics,
            index: HashMap::new(),
            expected: HashMap::new(),
        }
    }

    fn progress(&mut self, topic: usize, partition: i32, offset: i64, time_ms: Option<i64>) {
        let last_record_time = time_ms.and_then(DateTime::from_timestamp_millis);
        if let Some(&i) = self.index.get(&(topic, partition)) {
            let p = &mut self.batch.progress[i];
            p.next_offset = offset + 1;
            p.records += 1;
            p.last_record_time = last_record_time;
            return;
        }
        self.index
            .insert((topic, partition), self.batch.progress.len());
        self.batch.progress.push(PartitionProgress {
            topic: self.topics[topic].clone(),
            partition,
            expected: self.expected.get(&(topic, partition)).copied(),
            next_offset: offset + 1,
            records: 1,
            last_record_time,
        });
    }

    fn take(&mut self) -> Option<Batch> {
        if self.batch.is_empty() {
            return None;
        }
        let fresh = Batch {
            topics: self.topics.clone(),
            ..Batch::default()
        };
        let batch = std::mem::replace(&mut self.batch, fresh);
        self.index.clear();
        for p in &batch.progress {
            let t = (self.topics.iter().position(|x| *x == p.topic)).unwrap_or_default();
            self.expected.insert((t, p.partition), p.next_offset);
        }
        Some(batch)
    }
}

impl Reader<'_> {
    /// Reads every plan to its end (or until `shutdown`) and commits it into the shadow.
    pub async fn run(
        &self,
        plans: Vec<Plan>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<ReadOutcome> {
        let k = &self.settings.kafka;
        let inputs = k.input_topics();
        let topics: Vec<String> = inputs.iter().map(|(_, t)| t.clone()).collect();
        let mut parts: Vec<Partition> = plans
            .into_iter()
            .map(|plan| Partition {
                position: plan.start,
                from: plan.from,
                to: None,
                records: 0,
                done: plan.start >= plan.limit,
                plan,
            })
            .collect();
        let index: HashMap<(String, i32), usize> = parts
            .iter()
            .enumerate()
            .map(|(n, p)| ((p.plan.topic.clone(), p.plan.partition), n))
            .collect();
        let progress = std::sync::Arc::new(Progress::default());
        {
            let mut positions = progress.positions.lock().expect("progress lock");
            for p in &parts {
                positions.insert(
                    (p.plan.topic.clone(), p.plan.partition),
                    (p.position, p.plan.limit),
                );
            }
        }
        let consumer = RangeReader::new(&self.settings.kafka, &self.consumer_group)?;
        let starts: Vec<(&str, i32, i64)> = (parts.iter().filter(|p| !p.done))
            .map(|p| (p.plan.topic.as_str(), p.plan.partition, p.position))
            .collect();
        consumer.assign(&starts)?;

        // Reading and committing overlap: the committer takes batches from a queue of one.
        let (tx, rx) = mpsc::channel::<Batch>(1);
        let committer = tokio::spawn(commit_all(
            self.shadow.clone(),
            self.group.clone(),
            self.instance.clone(),
            self.reconciler.clone(),
            rx,
            progress.clone(),
            self.settings.pipeline.retry_initial_backoff,
            self.settings.pipeline.retry_max_backoff,
            shutdown.clone(),
        ));
        let printer = (!self.quiet).then(|| {
            tokio::spawn(print_progress(
                progress.clone(),
                Duration::from_secs(2),
                shutdown.child_token(),
            ))
        });

        let mut builder = Builder::new(topics.clone());
        let mut first: Option<Instant> = None;
        let mut interrupted = false;
        let max_records = self.settings.pipeline.batch_max_records as i64;
        let mut consecutive_errors = 0u32;
        let result: anyhow::Result<()> = async {
            while parts.iter().any(|p| !p.done) {
                let received = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => { interrupted = true; break }
                    r = consumer.recv(Duration::from_millis(500)) => r,
                };
                match received {
                    Received::Idle => {
                        // Nothing arrived: commit what is collected and notice partitions that
                        // ended in offsets no record has (transaction markers, compaction).
                        self.send(&mut builder, &tx, shutdown, &mut interrupted).await?;
                        if interrupted {
                            break;
                        }
                        self.check_positions(&consumer, &mut parts)?;
                    }
                    Received::Error { fatal, error: e } => {
                        if fatal {
                            return Err(anyhow::Error::new(e).context(
                                "reading the range: records are gone (retention) or the offsets are invalid",
                            ));
                        }
                        consecutive_errors += 1;
                        anyhow::ensure!(
                            consecutive_errors < 600,
                            "the brokers keep failing: {e}"
                        );
                        tracing::warn!(error = %e, "Kafka consumer error; continuing");
                        tokio::time::sleep(self.settings.pipeline.retry_initial_backoff).await;
                    }
                    Received::Record(m) => {
                        consecutive_errors = 0;
                        first.get_or_insert_with(Instant::now);
                        let Some(&n) = index.get(&(m.topic.clone(), m.partition)) else {
                            continue;
                        };
                        let accepted = self
                            .accept(&mut parts[n], &m, &mut builder, shutdown)
                            .await?;
                        if accepted {
                            progress.read.fetch_add(1, Ordering::Relaxed);
                        }
                        {
                            let p = &parts[n];
                            progress
                                .positions
                                .lock()
                                .expect("progress lock")
                                .insert((p.plan.topic.clone(), p.plan.partition), (p.position, p.to.unwrap_or(p.plan.limit)));
                        }
                        if parts[n].done {
                            consumer.pause(&parts[n].plan.topic, parts[n].plan.partition);
                        }
                        if builder.batch.record_count() >= max_records {
                            self.send(&mut builder, &tx, shutdown, &mut interrupted).await?;
                            if interrupted {
                                break;
                            }
                        }
                    }
                }
            }
            if !interrupted {
                self.send(&mut builder, &tx, shutdown, &mut interrupted).await?;
            }
            Ok(())
        }
        .await;
        drop(tx);
        let committed = committer.await.context("the shadow committer panicked")?;
        if let Some(p) = printer {
            p.abort();
            let _ = p.await;
        }
        result?;
        if committed? {
            interrupted = true;
        }
        let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
        let ranges = parts
            .iter()
            .map(|p| {
                let to = p.to.unwrap_or(p.plan.limit);
                PartitionRange {
                    topic: p.plan.topic.clone(),
                    partition: p.plan.partition,
                    from: p.from.unwrap_or(to).min(to),
                    to,
                    records: p.records,
                }
            })
            .collect();
        if !self.quiet {
            let read = progress.read.load(Ordering::Relaxed);
            if interrupted {
                eprintln!("replay: interrupted after {read} records");
            } else {
                eprintln!(
                    "replay: read and applied {read} records in {:.1} s",
                    elapsed.as_secs_f64()
                );
            }
        }
        Ok(ReadOutcome {
            ranges,
            records: progress.read.load(Ordering::Relaxed),
            interrupted,
            elapsed,
        })
    }

    /// Takes one record: skips what precedes a time range, ends the partition at its limit
    /// or at the first record past `--to-time`, otherwise decodes it into the batch.
    /// Returns whether the record is in the range.
    async fn accept(
        &self,
        part: &mut Partition,
        m: &ReadRecord,
        builder: &mut Builder,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        let offset = m.offset;
        if part.done || offset < part.position {
            return Ok(false);
        }
        if offset >= part.plan.limit {
            part.done = true;
            return Ok(false);
        }
        let time_ms = m.timestamp_ms;
        let ts = time_ms.unwrap_or(-1);
        if part.from.is_none() {
            if ts < part.plan.scan_from_ms.unwrap_or(i64::MIN) {
                part.position = offset + 1;
                part.done = part.position >= part.plan.limit;
                return Ok(false);
            }
            part.from = Some(offset);
        }
        if part.plan.scan_to_ms.is_some_and(|to| ts >= to) {
            part.to = Some(offset);
            part.done = true;
            return Ok(false);
        }
        let topic = part.plan.topic_index;
        let source = Source {
            topic,
            partition: m.partition,
            offset,
        };
        let stream = Stream::ALL[topic];
        let pipeline = &self.settings.pipeline;
        let backoff = (pipeline.retry_initial_backoff, pipeline.retry_max_backoff);
        let Some(decoded) = (self.codec)
            .decode_retrying(
                stream,
                m.payload.as_deref(),
                time_ms.and_then(DateTime::from_timestamp_millis),
                backoff,
                shutdown,
            )
            .await
        else {
            return Ok(false); // shutdown while the registry was unavailable
        };
        let raw = || RawRecord {
            key: m.key.clone(),
            payload: m.payload.clone(),
            broker_timestamp: time_ms.and_then(DateTime::from_timestamp_millis),
        };
        match decoded {
            Ok(Record::Payment(p)) => {
                builder.batch.raw.insert(source, raw());
                builder.batch.payments.push((p, source));
            }
            Ok(Record::Settlement(s)) => {
                builder.batch.raw.insert(source, raw());
                builder.batch.settlements.push((s, source));
            }
            Ok(Record::Payout(b)) => {
                builder.batch.raw.insert(source, raw());
                builder.batch.payouts.push((b, source));
            }
            Err(DecodeError::Poison { kind, message }) => {
                builder.batch.dead_letters.push(DeadLetter {
                    source,
                    key: m.key.clone(),
                    payload: m.payload.clone(),
                    error_kind: kind.as_str(),
                    error_message: message,
                    broker_timestamp: time_ms.and_then(DateTime::from_timestamp_millis),
                })
            }
            Err(DecodeError::Transient(_)) => unreachable!("retried in decode"),
        }
        builder.progress(topic, m.partition, offset, time_ms);
        part.position = offset + 1;
        part.records += 1;
        part.done = part.position >= part.plan.limit;
        Ok(true)
    }

    /// Hands the collected batch to the committer.
    async fn send(
        &self,
        builder: &mut Builder,
        tx: &mpsc::Sender<Batch>,
        shutdown: &CancellationToken,
        interrupted: &mut bool,
    ) -> anyhow::Result<()> {
        let Some(batch) = builder.take() else {
            return Ok(());
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => { *interrupted = true; Ok(()) }
            sent = tx.send(batch) => sent.map_err(|_| anyhow::anyhow!("the shadow committer stopped")),
        }
    }

    /// Partitions whose consumer position reached their limit without a record there.
    fn check_positions(
        &self,
        consumer: &RangeReader,
        parts: &mut [Partition],
    ) -> anyhow::Result<()> {
        for (topic, partition, o) in consumer.positions() {
            if let Some(p) = parts
                .iter_mut()
                .find(|p| p.plan.topic == topic && p.plan.partition == partition)
                && !p.done
                && o >= p.plan.limit
            {
                p.position = p.plan.limit;
                p.done = true;
            }
        }
        Ok(())
    }
}

/// Commits the batches in order; transient errors are retried with backoff. Returns
/// `true` when shutdown abandoned a batch.
#[allow(clippy::too_many_arguments)]
async fn commit_all(
    shadow: Store,
    group: String,
    instance: String,
    reconciler: Reconciler,
    mut rx: mpsc::Receiver<Batch>,
    progress: std::sync::Arc<Progress>,
    initial_backoff: Duration,
    max_backoff: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<bool> {
    while let Some(batch) = rx.recv().await {
        let mut backoff = initial_backoff;
        loop {
            match crate::engine::commit_batch(&shadow, &group, &instance, &batch, &reconciler).await
            {
                Ok(_) => {
                    progress
                        .committed
                        .fetch_add(batch.record_count() as u64, Ordering::Relaxed);
                    break;
                }
                Err(CommitError::Transient(e)) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "shadow commit failed transiently; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(true),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
                Err(e) => {
                    // Nobody else writes the shadow: a fence or a permanent error is a bug.
                    return Err(anyhow::Error::new(e).context("committing into the shadow schema"));
                }
            }
        }
    }
    Ok(false)
}

/// Every `interval` on stderr: records/s, position per partition, ETA.
async fn print_progress(
    progress: std::sync::Arc<Progress>,
    interval: Duration,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let read = progress.read.load(Ordering::Relaxed);
        let committed = progress.committed.load(Ordering::Relaxed);
        let positions = progress.positions.lock().expect("progress lock").clone();
        let remaining: i64 = positions
            .values()
            .map(|(pos, limit)| (limit - pos).max(0))
            .sum();
        let rate = read as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let eta = if rate > 0.0 {
            format!("{:.0}s", remaining as f64 / rate)
        } else {
            "?".into()
        };
        let per_partition: Vec<String> = positions
            .iter()
            .map(|((t, p), (pos, limit))| format!("{t}[{p}] {pos}/{limit}"))
            .collect();
        eprintln!(
            "replay: {read} records read, {committed} applied, {rate:.0} records/s, ETA {eta} | {}",
            per_partition.join(" ")
        );
    }
}
