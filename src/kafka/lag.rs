//! `commit_lag`: how far the offsets committed in PostgreSQL trail the partitions' high
//! watermarks. Computed from the database (the offsets that matter for exactly-once), on a
//! timer, so it is exported even when no record flows and even when Kafka's own committed
//! offsets are stale. Every instance exports every partition of the group; dashboards take
//! `max by (topic, partition)`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;
use crate::store::Store;

/// Lag of one partition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartitionLag {
    /// The log's first offset (what a partition without a stored offset starts from).
    pub low_watermark: i64,
    pub high_watermark: i64,
    pub next_offset: i64,
    pub records: i64,
    pub seconds: f64,
}

/// Reads watermarks of both input topics and the stored offsets; returns lag per partition.
pub async fn measure(
    kafka: &KafkaSettings,
    client: &BaseConsumer,
    store: &Store,
) -> anyhow::Result<HashMap<(String, i32), PartitionLag>> {
    let topics = kafka.input_topic_names();
    let stored = store.positions(&kafka.group_id).await?;
    let watermarks = tokio::task::block_in_place(|| watermarks(client, &topics))?;
    let now = Utc::now();
    Ok(watermarks
        .into_iter()
        .map(|((topic, partition), (low, high))| {
            let (next, last) = stored
                .get(&(topic.clone(), partition))
                .map_or((low, None), |p| (p.next_offset, p.last_record_time));
            let records = (high - next.max(low)).max(0);
            let seconds = match (records, last) {
                (0, _) => 0.0,
                (_, Some(ts)) => (now - ts).num_milliseconds().max(0) as f64 / 1000.0,
                // Nothing committed yet: unknown age; report 0 rather than invent one.
                (_, None) => 0.0,
            };
            (
                (topic, partition),
                PartitionLag {
                    low_watermark: low,
                    high_watermark: high,
                    next_offset: next,
                    records,
                    seconds,
                },
            )
        })
        .collect())
}

/// (low, high) watermarks of every partition of both input topics, from a client of its own
/// (blocking: tools such as `payrecon report`).
pub fn log_ends(kafka: &KafkaSettings) -> anyhow::Result<HashMap<(String, i32), (i64, i64)>> {
    let client: BaseConsumer = kafka.client_config().create()?;
    watermarks(&client, &kafka.input_topic_names())
}

fn watermarks(
    client: &BaseConsumer,
    topics: &[String],
) -> anyhow::Result<HashMap<(String, i32), (i64, i64)>> {
    let timeout = Duration::from_secs(5);
    let mut out = HashMap::new();
    for topic in topics {
        let metadata = client.fetch_metadata(Some(topic), timeout)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = client.fetch_watermarks(topic, p.id(), timeout)?;
                out.insert((topic.clone(), p.id()), (low, high));
            }
        }
    }
    Ok(out)
}

/// Refreshes the lag gauges every `interval` until `shutdown`; each success stores the time
/// (unix ms) in `broker_seen`, which readiness uses as proof that the broker answers.
/// What the lag reporter judges stalls with (see [`super::Progress`]).
pub struct StallWatch {
    pub progress: Arc<super::Progress>,
    pub assignment: Arc<Mutex<super::Assignment>>,
    pub timeout: Duration,
}

impl StallWatch {
    fn judge(&self, lags: &HashMap<(String, i32), PartitionLag>) {
        let owned: HashSet<_> = self
            .assignment
            .lock()
            .map(|a| a.partitions.keys().cloned().collect())
            .unwrap_or_default();
        if let Some(reason) = self.progress.judge(self.timeout, &owned, lags) {
            tracing::warn!(%reason, "consumer stalled: not ready until it makes progress");
        }
    }
}

/// What the lag reporter tells the watermark: the log ends it fetched go to `reconciler`'s
/// [`crate::engine::LogEnds`] (idleness needs them), and after each fetch the watermark is
/// judged and exported per partition.
pub struct WatermarkWatch {
    pub reconciler: crate::engine::Reconciler,
    pub log_ends: Arc<crate::engine::LogEnds>,
}

impl WatermarkWatch {
    /// `seen_up_to`: the group's highest event time, read before `lags` were fetched.
    async fn refresh(
        &self,
        store: &Store,
        group: &str,
        seen_up_to: Option<chrono::DateTime<Utc>>,
        lags: &HashMap<(String, i32), PartitionLag>,
    ) {
        self.log_ends.update(lags.iter().map(|(k, l)| {
            let end = crate::reconcile::LogEnd {
                low: l.low_watermark,
                high: l.high_watermark,
                seen_up_to,
                capped: true,
            };
            (k.clone(), end)
        }));
        let judged = match store.pool().acquire().await {
            Ok(mut conn) => self.reconciler.group_watermark(&mut conn, group).await,
            Err(e) => Err(e),
        };
        match judged {
            Ok(w) => crate::telemetry::group_watermark(&w),
            Err(e) => tracing::warn!(error = %e, "cannot judge the watermark for its metrics"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    kafka: KafkaSettings,
    store: Store,
    interval: Duration,
    broker_seen: Arc<std::sync::atomic::AtomicI64>,
    stall: StallWatch,
    watch: Option<WatermarkWatch>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client: BaseConsumer = kafka.client_config().create()?;
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        // Read before the log ends are fetched (see `LogEnd::seen_up_to`).
        let seen_up_to = match &watch {
            Some(_) => store.highest_event_time(&kafka.group_id).await,
            None => Ok(None),
        };
        match measure(&kafka, &client, &store).await {
            Ok(lags) => {
                for ((topic, partition), lag) in &lags {
                    crate::metrics::commit_lag(topic, *partition, lag.records, lag.seconds);
                }
                stall.judge(&lags);
                match (&watch, &seen_up_to) {
                    (Some(w), Ok(seen)) => w.refresh(&store, &kafka.group_id, *seen, &lags).await,
                    // Not refreshed: the log ends go stale, and stale is never idle.
                    (Some(_), Err(e)) => {
                        tracing::warn!(error = %e, "cannot read the group's event times")
                    }
                    (None, _) => {}
                }
                let now = Utc::now();
                crate::metrics::lag_refreshed(now.timestamp_millis() as f64 / 1000.0);
                broker_seen.store(now.timestamp_millis(), std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                crate::metrics::lag_refresh_failed();
                tracing::warn!(error = %e, "cannot measure commit lag");
                // Without the lag, a batch that does not commit still counts as a stall.
                stall.judge(&HashMap::new());
            }
        }
        // The exceptions topic's lag, seen from every instance (the relay's own gauges go
        // quiet when no instance relays).
        match store.outbox_oldest_pending_age().await {
            Ok(age) => crate::metrics::outbox_oldest_pending(age),
            Err(e) => tracing::warn!(error = %e, "cannot measure the exceptions outbox backlog"),
        }
    }
}
