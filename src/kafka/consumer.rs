//! The consumer loop: poll, decode, batch, commit (rows + offsets in one transaction).
//!
//! Every failure has one disposition: a record that can never succeed is dead-lettered in
//! the batch that advances past it; a transient failure (database, registry, broker) is
//! retried at the same offset with backoff; a permanent database error stops the service.
//!
//! Commit lanes (`pipeline.commit_lanes`): the owned partitions are split by partition number
//! (partition mod lanes, the same lane for a partition of every input topic, where one
//! payment's records are), each lane collects its own batch and at most one transaction per
//! lane runs at a time, so the lanes' transactions run concurrently on their own connections
//! while the next batches are received and decoded. Two lanes never share a partition, so
//! their offsets' compare-and-sets and running-totals shards (the batch's first partition)
//! never meet, and every partition's batches still commit in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::assignment::{Assignment, RebalanceContext};
use super::progress::Progress;
use crate::codec::{DecodeError, Stream};
use crate::config::Settings;
use crate::domain::Record;
use crate::engine::{Batch, Reconciler};
use crate::inputs::Decoder;
use crate::store::{
    CommitError, DeadLetter, PartitionProgress, RawRecord, Source, Store, describe,
};

/// What the loop reports to an optional observer (benchmarks, tests, demo progress).
#[derive(Debug, Clone)]
pub enum LoopEvent {
    /// A batch committed: records covered, rows inserted, and per-record broker-timestamp
    /// to commit latencies.
    Committed {
        records: u64,
        inserted: u64,
        dead_letters: u64,
        latencies: Vec<Duration>,
    },
    /// A batch lost its offset compare-and-set and was rolled back.
    Fenced,
}

/// One service instance's consumer.
pub struct ConsumerLoop {
    consumer: StreamConsumer<RebalanceContext>,
    store: Store,
    codec: Arc<Decoder>,
    reconciler: Reconciler,
    group: String,
    /// `host/pid`, recorded with each commit.
    instance: String,
    /// The input topics and their streams, in topic-index order (`Source::topic`).
    inputs: Vec<(Stream, String)>,
    max_records: usize,
    linger: Duration,
    /// Commit lanes (module doc), at least 1.
    lanes: usize,
    initial_backoff: Duration,
    max_backoff: Duration,
    assignment: Arc<Mutex<Assignment>>,
    /// What readiness and the stall gauge know of this loop's progress.
    progress: Arc<Progress>,
    observer: Option<mpsc::UnboundedSender<LoopEvent>>,
}

/// Records accumulated for the next transaction.
struct Pending {
    batch: Batch,
    /// Index of each partition in `batch.progress`.
    index: HashMap<(usize, i32), usize>,
    /// Broker timestamps, for end-to-end latency after the commit, with their partition
    /// (a cooperative revocation drops a partition's records).
    timestamps: Vec<(i64, (usize, i32))>,
    /// Assignment generation the batch was built under.
    generation: u64,
    /// When the first record arrived (linger deadline base).
    started: Option<Instant>,
    decode_time: Duration,
    /// The compare-and-set base of partitions the batch in flight ends (its next offsets),
    /// used instead of the committed position until that batch has committed.
    bases: HashMap<(usize, i32), i64>,
}

/// The transaction of the batch a lane took last, running while the next one is collected.
type InFlight<'s> = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<Flushed>> + Send + 's>>;

/// How a lane's transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushed {
    /// Committed, or abandoned at shutdown.
    Done,
    /// Rejected by the offset compare-and-set: the stored offsets must be read again once no
    /// transaction is in flight.
    Fenced,
}

/// The first lane whose transaction finished, with its outcome.
fn next_done<'a, 's>(
    in_flight: &'a mut [Option<InFlight<'s>>],
) -> impl Future<Output = (usize, anyhow::Result<Flushed>)> + 'a {
    std::future::poll_fn(move |cx| {
        for (lane, f) in in_flight.iter_mut().enumerate() {
            if let Some(f) = f
                && let std::task::Poll::Ready(r) = f.as_mut().poll(cx)
            {
                return std::task::Poll::Ready((lane, r));
            }
        }
        std::task::Poll::Pending
    })
}

impl Pending {
    fn new(topics: &[String], generation: u64) -> Self {
        Pending {
            batch: Batch {
                topics: topics.to_vec(),
                ..Batch::default()
            },
            index: HashMap::new(),
            timestamps: Vec::new(),
            generation,
            started: None,
            decode_time: Duration::ZERO,
            bases: HashMap::new(),
        }
    }
}

enum Accepted {
    Added,
    /// Already covered by the stored offset or this batch (never move backwards).
    Skipped,
    /// Not ours (anymore).
    NotAssigned,
}

impl ConsumerLoop {
    /// Creates the consumer and subscribes to both input topics.
    pub fn new(
        settings: &Settings,
        store: Store,
        codec: Arc<Decoder>,
        reconciler: Reconciler,
        shutdown: CancellationToken,
        observer: Option<mpsc::UnboundedSender<LoopEvent>>,
    ) -> anyhow::Result<Self> {
        let assignment = Arc::new(Mutex::new(Assignment::default()));
        let progress = Arc::new(Progress::default());
        let context = RebalanceContext {
            store: store.clone(),
            group: settings.kafka.group_id.clone(),
            assignment: assignment.clone(),
            progress: progress.clone(),
            throttle: Default::default(),
            shutdown,
            retry_backoff: settings.pipeline.retry_initial_backoff,
            keyed_topics: (settings.kafka.input_topics().into_iter())
                .filter(|(s, _)| matches!(s, Stream::Payments | Stream::Settlements))
                .map(|(_, t)| t)
                .collect(),
        };
        let consumer: StreamConsumer<RebalanceContext> = settings
            .kafka
            .consumer_config()
            .create_with_context(context)
            .context("creating the Kafka consumer")?;
        let inputs = settings.kafka.input_topics();
        let names: Vec<&str> = inputs.iter().map(|(_, t)| t.as_str()).collect();
        consumer
            .subscribe(&names)
            .context("subscribing to the input topics")?;
        Ok(ConsumerLoop {
            consumer,
            store,
            codec,
            reconciler,
            group: settings.kafka.group_id.clone(),
            instance: crate::instance::instance_id(),
            inputs,
            max_records: settings.pipeline.batch_max_records,
            linger: settings.pipeline.batch_linger,
            lanes: settings.pipeline.commit_lanes.max(1),
            initial_backoff: settings.pipeline.retry_initial_backoff,
            max_backoff: settings.pipeline.retry_max_backoff,
            assignment,
            progress,
            observer,
        })
    }

    /// The loop's progress (readiness, the stall gauge).
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// The shared assignment (health checks, lag).
    pub fn assignment(&self) -> Arc<Mutex<Assignment>> {
        self.assignment.clone()
    }

    /// Runs until `shutdown` is cancelled. The batches being committed when shutdown
    /// arrives are finished (or abandoned if stuck retrying); batches still being collected
    /// are dropped (their records are re-read by the next owner). Leaves the group on return.
    ///
    /// Decoding overlaps committing: while a lane's transaction runs, its next batch (and the
    /// other lanes' batches) are received and decoded. A lane's next batch's compare-and-set
    /// base for a partition is its in-flight batch's end; if that batch does not commit
    /// (fenced), nothing more starts, and once every lane's transaction has ended the resync
    /// reads the stored offsets and starts a new generation, which drops the batches being
    /// collected before they commit, so nothing is applied out of order.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let topics: Vec<String> = self.inputs.iter().map(|(_, t)| t.clone()).collect();
        let generation = self.generation();
        let mut pending: Vec<Pending> = (0..self.lanes)
            .map(|_| Pending::new(&topics, generation))
            .collect();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight: Vec<Option<InFlight<'_>>> = (0..self.lanes).map(|_| None).collect();
        let mut resync = false;
        let mut switches = self.store.database_switches();
        loop {
            // Another server became the primary: what it holds is the truth (an asynchronous
            // standby may lack the last commits), so positions are read from it again.
            if self.store.database_switches() != switches {
                switches = self.store.database_switches();
                resync = true;
            }
            let busy = in_flight.iter().any(Option::is_some);
            if resync && !busy {
                self.resync(&shutdown).await;
                resync = false;
            }
            if !resync {
                for lane in 0..self.lanes {
                    let full = pending[lane].batch.record_count() as usize >= self.max_records;
                    if full && in_flight[lane].is_none() {
                        in_flight[lane] = self.start_flush(&mut pending, lane, &topics, &shutdown);
                    }
                }
            }
            let busy = in_flight.iter().any(Option::is_some);
            // No lane's batch grows past the maximum; after a fence nothing is received until
            // the resync (the batches collected meanwhile would be dropped).
            let hold = resync
                || (pending.iter()).any(|p| p.batch.record_count() as usize >= self.max_records);
            let deadline = (!resync)
                .then(|| {
                    (pending.iter().zip(&in_flight))
                        .filter(|(_, f)| f.is_none())
                        .filter_map(|(p, _)| p.started)
                        .min()
                })
                .flatten()
                .map(|s| tokio::time::Instant::from_std(s + self.linger));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                (lane, done) = next_done(&mut in_flight), if busy => {
                    in_flight[lane] = None;
                    if done? == Flushed::Fenced {
                        resync = true;
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    let now = Instant::now();
                    for lane in 0..self.lanes {
                        let due = pending[lane].started.is_some_and(|s| s + self.linger <= now);
                        if due && in_flight[lane].is_none() {
                            in_flight[lane] = self.start_flush(&mut pending, lane, &topics, &shutdown);
                        }
                    }
                }
                _ = tick.tick() => self.housekeeping(&shutdown, !busy).await,
                message = self.consumer.recv(), if !hold => match message {
                    Ok(m) => {
                        let m = m.detach();
                        self.accept(&mut pending, &topics, m, &shutdown).await;
                    }
                    Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_)) => {
                        // librdkafka gives up on a fatal error (e.g. another instance joined
                        // with this group.instance.id): the consumer never fetches again.
                        anyhow::bail!("stopping: the Kafka consumer failed fatally: {e}");
                    }
                    Err(e) => {
                        crate::metrics::transient_error("broker");
                        // Rate limited like librdkafka's own reports of the same outage.
                        self.consumer.context().throttle.log(
                            rdkafka::config::RDKafkaLogLevel::Warning,
                            "consumer",
                            &format!("Kafka consumer error; continuing: {e}"),
                        );
                        tokio::time::sleep(self.initial_backoff).await;
                    }
                },
            }
        }
        for committing in in_flight.into_iter().flatten() {
            committing.await?;
        }
        tracing::info!("consumer loop stopping; leaving the group");
        self.consumer.unsubscribe();
        Ok(())
    }

    /// The commit lane of a partition (module doc).
    fn lane(&self, partition: i32) -> usize {
        partition.rem_euclid(self.lanes as i32) as usize
    }

    /// Takes the batch `lane` collected and starts its transaction; the lane's next batch is
    /// collected on top of its end offsets. `None` when there is nothing to commit.
    fn start_flush<'s>(
        &'s self,
        pending: &mut [Pending],
        lane: usize,
        topics: &[String],
        shutdown: &'s CancellationToken,
    ) -> Option<InFlight<'s>> {
        // Records of partitions revoked incrementally (cooperative protocol) leave first.
        self.forget_revoked(pending, topics);
        let generation = self.generation();
        let slot = &mut pending[lane];
        let taken = std::mem::replace(slot, Pending::new(topics, generation));
        if taken.batch.is_empty() || taken.generation != generation {
            self.progress.dropped(lane);
            return None;
        }
        for p in &taken.batch.progress {
            if let Some(t) = topics.iter().position(|t| *t == p.topic) {
                slot.bases.insert((t, p.partition), p.next_offset);
            }
        }
        Some(Box::pin(self.flush(taken, lane, shutdown)))
    }

    fn generation(&self) -> u64 {
        self.assignment.lock().expect("assignment lock").generation
    }

    /// Drops from the batch being collected every record of the partitions a cooperative
    /// rebalance took away since the last call (their new owner starts at the stored
    /// offset). The records of the partitions this instance keeps stay: they will not be
    /// delivered again.
    fn forget_revoked(&self, pending: &mut [Pending], topics: &[String]) {
        let revoked = std::mem::take(&mut self.assignment.lock().expect("assignment lock").revoked);
        if revoked.is_empty() {
            return;
        }
        let gone: std::collections::HashSet<(usize, i32)> = (revoked.iter())
            .filter_map(|(t, p)| Some((topics.iter().position(|x| x == t)?, *p)))
            .collect();
        for (lane, pending) in pending.iter_mut().enumerate() {
            // A partition assigned again later starts from its stored offset, not from the
            // end of a batch in flight when it was revoked.
            pending.bases.retain(|tp, _| !gone.contains(tp));
            if pending.batch.is_empty() {
                continue;
            }
            let before = pending.batch.record_count();
            let keep = |s: &crate::store::Source| !gone.contains(&(s.topic, s.partition));
            let batch = &mut pending.batch;
            batch.progress.retain(|p| {
                let idx = topics.iter().position(|t| *t == p.topic);
                !idx.is_some_and(|i| gone.contains(&(i, p.partition)))
            });
            batch.payments.retain(|(_, s)| keep(s));
            batch.settlements.retain(|(_, s)| keep(s));
            batch.payouts.retain(|(_, s)| keep(s));
            batch.dead_letters.retain(|d| keep(&d.source));
            batch.raw.retain(|s, _| keep(s));
            pending.timestamps.retain(|(_, tp)| !gone.contains(tp));
            pending.index = (batch.progress.iter().enumerate())
                .filter_map(|(i, p)| {
                    let t = topics.iter().position(|x| *x == p.topic)?;
                    Some(((t, p.partition), i))
                })
                .collect();
            let dropped = before - batch.record_count();
            if dropped > 0 {
                tracing::info!(
                    records = dropped,
                    kept = batch.record_count(),
                    lane,
                    "dropping the records of revoked partitions from the batch being collected"
                );
            }
            if batch.is_empty() {
                pending.started = None;
                self.progress.dropped(lane);
            }
        }
    }

    /// Adds one message to its lane's batch (decoding it), after checking it is still ours.
    async fn accept(
        &self,
        lanes: &mut [Pending],
        topics: &[String],
        m: OwnedMessage,
        shutdown: &CancellationToken,
    ) {
        self.forget_revoked(lanes, topics);
        let generation = self.generation();
        for (lane, pending) in lanes.iter_mut().enumerate() {
            if generation == pending.generation {
                continue;
            }
            // A rebalance (or a resync) happened while the batch was collected: its
            // partitions were revoked (eager protocol) and re-assigned at their stored
            // offsets, so every buffered record will be delivered again to whoever owns it.
            if !pending.batch.is_empty() {
                tracing::info!(
                    records = pending.batch.record_count(),
                    lane,
                    "dropping the batch collected before the rebalance"
                );
            }
            *pending = Pending::new(topics, generation);
            self.progress.dropped(lane);
        }
        let lane = self.lane(m.partition());
        let pending = &mut lanes[lane];
        let Some(topic_idx) = topics.iter().position(|t| t == m.topic()) else {
            return;
        };
        match self.position(pending, topic_idx, topics, &m) {
            Accepted::Added => {}
            Accepted::Skipped | Accepted::NotAssigned => return,
        }
        let stream = self.inputs[topic_idx].0;
        let source = Source {
            topic: topic_idx,
            partition: m.partition(),
            offset: m.offset(),
        };
        let broker_ts = m.timestamp().to_millis();
        let broker_time = broker_ts.and_then(DateTime::<Utc>::from_timestamp_millis);
        let started = Instant::now();
        let decoded = (self.codec)
            .decode_retrying(
                stream,
                m.payload(),
                broker_time,
                (self.initial_backoff, self.max_backoff),
                shutdown,
            )
            .await;
        pending.decode_time += started.elapsed();
        let raw = || RawRecord {
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            broker_timestamp: broker_time,
        };
        match decoded {
            Some(Ok(Record::Payment(p))) => {
                pending.batch.raw.insert(source, raw());
                pending.batch.payments.push((p, source));
            }
            Some(Ok(Record::Settlement(s))) => {
                pending.batch.raw.insert(source, raw());
                pending.batch.settlements.push((s, source));
            }
            Some(Ok(Record::Payout(b))) => {
                pending.batch.raw.insert(source, raw());
                pending.batch.payouts.push((b, source));
            }
            Some(Err(DecodeError::Poison { kind, message })) => {
                tracing::warn!(topic = m.topic(), partition = m.partition(), offset = m.offset(), reason = kind.as_str(), message = %crate::store::printable(&message, 500), "dead-lettering a record that can never succeed");
                pending.batch.dead_letters.push(DeadLetter {
                    source,
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    error_kind: kind.as_str(),
                    error_message: message,
                    broker_timestamp: broker_ts.and_then(DateTime::<Utc>::from_timestamp_millis),
                });
            }
            // Transient errors are retried inside decode_retrying until shutdown; at
            // shutdown the batch is abandoned, so nothing is lost.
            Some(Err(DecodeError::Transient(_))) | None => {
                *pending = Pending::new(topics, generation);
                self.progress.dropped(lane);
                return;
            }
        }
        if let Some(ts) = broker_ts {
            pending.timestamps.push((ts, (topic_idx, m.partition())));
        }
        if pending.started.is_none() {
            // The batch's first record: from now on something waits to be committed.
            self.progress.received(lane);
            pending.started = Some(Instant::now());
        }
    }

    /// Updates the partition's progress in the batch; refuses records that are behind.
    fn position(
        &self,
        pending: &mut Pending,
        topic_idx: usize,
        topics: &[String],
        m: &OwnedMessage,
    ) -> Accepted {
        let key = (topic_idx, m.partition());
        let offset = m.offset();
        if let Some(&i) = pending.index.get(&key) {
            let p = &mut pending.batch.progress[i];
            if offset < p.next_offset {
                return Accepted::Skipped;
            }
            p.next_offset = offset + 1;
            p.records += 1;
            p.last_record_time = m
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis);
            return Accepted::Added;
        }
        let expected = {
            let a = self.assignment.lock().expect("assignment lock");
            match a
                .partitions
                .get(&(topics[topic_idx].clone(), m.partition()))
            {
                None => return Accepted::NotAssigned,
                Some(e) => pending.bases.get(&key).copied().or(*e),
            }
        };
        if let Some(e) = expected {
            if offset < e {
                return Accepted::Skipped;
            }
            if offset > e {
                crate::metrics::offset_gap(m.topic());
                tracing::warn!(
                    topic = m.topic(),
                    partition = m.partition(),
                    stored = e,
                    first = offset,
                    "offsets skipped between the stored position and the next record (retention, compaction or transaction markers)"
                );
            }
        }
        pending.index.insert(key, pending.batch.progress.len());
        pending.batch.progress.push(PartitionProgress {
            topic: topics[topic_idx].clone(),
            partition: m.partition(),
            expected,
            next_offset: offset + 1,
            records: 1,
            last_record_time: m
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis),
        });
        Accepted::Added
    }

    /// Commits a lane's taken batch; retries transient errors; reports a fence (the loop
    /// resyncs once no transaction is in flight).
    async fn flush(
        &self,
        taken: Pending,
        lane: usize,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Flushed> {
        let batch = taken.batch;
        let mut backoff = self.initial_backoff;
        loop {
            let started = Instant::now();
            match crate::engine::commit_batch(
                &self.store,
                &self.group,
                &self.instance,
                &batch,
                &self.reconciler,
            )
            .await
            {
                Ok(outcome) => {
                    let commit_time = started.elapsed();
                    self.after_commit(
                        (&batch, lane),
                        &taken.timestamps,
                        outcome,
                        commit_time,
                        taken.decode_time,
                    );
                    return Ok(Flushed::Done);
                }
                Err(CommitError::Fenced { topic, partition }) => {
                    crate::metrics::batch_fenced();
                    self.progress.dropped(lane);
                    tracing::warn!(%topic, partition, records = batch.record_count(), lane, "stale batch rejected by the offset compare-and-set; rolled back, resyncing from PostgreSQL");
                    if let Some(o) = &self.observer {
                        let _ = o.send(LoopEvent::Fenced);
                    }
                    return Ok(Flushed::Fenced);
                }
                Err(CommitError::Transient(e)) => {
                    crate::metrics::batch_retried();
                    crate::metrics::transient_error("database");
                    crate::metrics::database_error(&e, "retry");
                    let cause = describe(&e);
                    tracing::warn!(error = %cause, retry_in = ?backoff, records = batch.record_count(), "batch commit failed transiently; retrying the same batch");
                    self.progress.retrying(lane, cause);
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            tracing::info!("shutdown while retrying; abandoning the uncommitted batch");
                            self.progress.dropped(lane);
                            return Ok(Flushed::Done);
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                Err(CommitError::Permanent(e)) => {
                    crate::metrics::database_error(&e, "stop");
                    return Err(anyhow::anyhow!(
                        "stopping: the database refuses the batch for a reason that lies in the system, not in a record, so retrying cannot help and skipping would lose data: {}",
                        describe(&e)
                    ));
                }
            }
        }
    }

    /// Bookkeeping after a successful transaction.
    fn after_commit(
        &self,
        (batch, lane): (&Batch, usize),
        timestamps: &[(i64, (usize, i32))],
        outcome: crate::engine::CommitOutcome,
        commit_time: Duration,
        decode_time: Duration,
    ) {
        let records = batch.record_count() as u64;
        self.progress.committed(lane);
        crate::metrics::batch_committed(records, commit_time, decode_time);
        crate::metrics::records(
            &batch.topics[0],
            outcome.payments_inserted,
            outcome.payments_duplicates,
        );
        crate::metrics::records(
            &batch.topics[1],
            outcome.settlements_inserted,
            outcome.settlements_duplicates,
        );
        if let Some(topic) = batch.topics.get(2) {
            crate::metrics::records(topic, outcome.payouts_inserted, outcome.payouts_duplicates);
        }
        for d in batch.dead_letters.iter().chain(&outcome.refused) {
            crate::metrics::dead_lettered(&batch.topics[d.source.topic], d.error_kind);
        }
        for c in &outcome.conflicts {
            crate::metrics::conflicting_duplicate(&batch.topics[c.topic]);
        }
        crate::telemetry::reconciled(&outcome.reconciliation);
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default();
        let latencies: Vec<Duration> = timestamps
            .iter()
            .map(|(ts, _)| Duration::from_millis((now_ms - ts).max(0) as u64))
            .collect();
        for l in &latencies {
            crate::metrics::end_to_end(*l);
        }
        // Advance the compare-and-set base and mirror progress to Kafka for lag tools.
        let mut tpl = TopicPartitionList::new();
        {
            let mut a = self.assignment.lock().expect("assignment lock");
            for p in &batch.progress {
                if let Some(slot) = a.partitions.get_mut(&(p.topic.clone(), p.partition)) {
                    *slot = Some(p.next_offset);
                }
                let _ =
                    tpl.add_partition_offset(&p.topic, p.partition, Offset::Offset(p.next_offset));
            }
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %e, "mirroring offsets to Kafka failed (progress tracking only)");
        }
        if let Some(o) = &self.observer {
            let _ = o.send(LoopEvent::Committed {
                records,
                inserted: outcome.payments_inserted
                    + outcome.settlements_inserted
                    + outcome.payouts_inserted,
                dead_letters: outcome.dead_letters,
                latencies,
            });
        }
    }

    /// Re-reads the stored offsets of every assigned partition and seeks to them, so the
    /// next batch starts exactly where PostgreSQL says (after a fence or ambiguous commit).
    async fn resync(&self, shutdown: &CancellationToken) {
        let partitions: Vec<(String, i32)> = {
            let a = self.assignment.lock().expect("assignment lock");
            a.partitions.keys().cloned().collect()
        };
        let mut backoff = self.initial_backoff;
        let stored = loop {
            match self.store.load_offsets(&self.group, &partitions).await {
                Ok(s) => break s,
                Err(e) => {
                    crate::metrics::transient_error("database");
                    tracing::warn!(error = %e, "cannot read stored offsets for resync; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        };
        let mut a = self.assignment.lock().expect("assignment lock");
        for tp in partitions {
            let offset = stored.get(&tp).copied();
            if let Some(slot) = a.partitions.get_mut(&tp) {
                *slot = offset;
            }
            let target = offset.map_or(Offset::Beginning, Offset::Offset);
            if let Err(e) = self.consumer.seek(&tp.0, tp.1, target, Duration::ZERO) {
                // Never only logged: the instance is not ready until the housekeeping tick
                // re-assigns every partition at its stored offset.
                crate::metrics::positioning_error("seek");
                tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "seek after resync failed; re-assigning at the stored offsets");
                self.progress
                    .positioning(Some(format!("seek of {}[{}] failed: {e}", tp.0, tp.1)));
            }
        }
        // Records already buffered for the old positions are discarded by the new generation.
        a.generation += 1;
    }

    /// Once a second: publishes the fetch positions (stall detection) and, after a failed
    /// assign or seek, positions every owned partition at its stored offset again (only
    /// between transactions: `may_reposition`, so stored offsets read for it are current).
    async fn housekeeping(&self, shutdown: &CancellationToken, may_reposition: bool) {
        if let Ok(tpl) = self.consumer.position() {
            let positions = tpl
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                    _ => None,
                })
                .collect();
            self.progress.set_positions(positions);
        }
        if may_reposition && self.progress.positioning_failed() {
            self.reposition(shutdown).await;
        }
    }

    /// Assigns the owned partitions again, each at its stored offset (after a failed assign
    /// or seek). The batch being collected is dropped by the new generation.
    async fn reposition(&self, shutdown: &CancellationToken) {
        let partitions: Vec<(String, i32)> = {
            let a = self.assignment.lock().expect("assignment lock");
            a.partitions.keys().cloned().collect()
        };
        let stored = tokio::select! {
            _ = shutdown.cancelled() => return,
            stored = self.store.load_offsets(&self.group, &partitions) => match stored {
                Ok(s) => s,
                Err(e) => {
                    crate::metrics::transient_error("database");
                    tracing::warn!(error = %describe(&e), "cannot read stored offsets to reposition; retrying");
                    return;
                }
            },
        };
        let mut tpl = TopicPartitionList::new();
        for tp in &partitions {
            let target = stored
                .get(tp)
                .copied()
                .map_or(Offset::Beginning, Offset::Offset);
            if let Err(e) = tpl.add_partition_offset(&tp.0, tp.1, target) {
                self.progress
                    .positioning(Some(format!("cannot position {}[{}]: {e}", tp.0, tp.1)));
                return;
            }
        }
        let mut a = self.assignment.lock().expect("assignment lock");
        let result = if a.cooperative {
            // assign() is refused under the cooperative protocol: give the partitions back
            // to librdkafka and take them again at the stored offsets.
            let current = self.consumer.assignment().unwrap_or_default();
            let mut ours = TopicPartitionList::new();
            for e in current.elements() {
                if partitions.contains(&(e.topic().to_owned(), e.partition())) {
                    let _ = ours.add_partition(e.topic(), e.partition());
                }
            }
            self.consumer
                .incremental_unassign(&ours)
                .and_then(|()| self.consumer.incremental_assign(&tpl))
        } else {
            self.consumer.assign(&tpl)
        };
        match result {
            Ok(()) => {
                for tp in partitions {
                    let offset = stored.get(&tp).copied();
                    if let Some(slot) = a.partitions.get_mut(&tp) {
                        *slot = offset;
                    }
                }
                a.generation += 1;
                self.progress.positioning(None);
                tracing::info!(
                    partitions = a.partitions.len(),
                    "re-assigned every owned partition at its stored offset"
                );
            }
            Err(e) => {
                crate::metrics::positioning_error("assign");
                tracing::warn!(error = %e, "re-assigning at the stored offsets failed; retrying");
                self.progress
                    .positioning(Some(format!("assign at the stored offsets failed: {e}")));
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
