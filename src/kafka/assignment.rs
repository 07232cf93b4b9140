//! Partition assignment decided inside librdkafka's rebalance callback.
//!
//! librdkafka calls the rebalance callback synchronously inside `poll`. payrecon overrides it
//! so that each newly assigned partition is `assign`ed exactly once, directly at the offset
//! stored in PostgreSQL (earliest when none): no assign-then-seek, and Kafka's committed
//! offsets are never used. The PostgreSQL read is async; the callback runs on a tokio worker
//! thread inside `recv()`, so it uses `block_in_place` (the service requires the multi-thread
//! runtime) and retries until the database answers or shutdown is requested.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, TopicPartition};

/// What this instance owns right now.
#[derive(Debug, Default)]
pub struct Assignment {
    /// Assigned partitions and the stored `next_offset` the next batch must compare-and-set
    /// against (`None`: never committed).
    pub partitions: HashMap<TopicPartition, Option<i64>>,
    /// Bumped on every assign/revoke; a batch built under an older generation is dropped.
    pub generation: u64,
    /// Set by the first assignment (possibly empty): the instance has joined the group.
    pub joined: bool,
}

/// The consumer context: owns the rebalance decision.
pub struct RebalanceContext {
    pub(super) store: Store,
    pub(super) group: String,
    pub(super) assignment: Arc<Mutex<Assignment>>,
    /// Told of every assignment (stall timer) and of a failed one (readiness, retry).
    pub(super) progress: Arc<super::progress::Progress>,
    /// Rate limits librdkafka's repeated reports.
    pub(super) throttle: super::logs::Throttle,
    pub(super) shutdown: CancellationToken,
    pub(super) retry_backoff: Duration,
}

/// librdkafka's logs and errors, rate limited (a broker outage repeats them many times a
/// second).
impl ClientContext for RebalanceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.throttle.log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.throttle.error(error, reason);
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<TopicPartition> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                let Some(stored) = self.load_offsets_blocking(&partitions) else {
                    // Shutting down before the database answered: take nothing.
                    self.apply(consumer, HashMap::new(), None, "error");
                    return;
                };
                let mut positioned = TopicPartitionList::new();
                let mut position_error = None;
                let mut owned = HashMap::new();
                for tp in partitions {
                    let offset = stored.get(&tp).copied();
                    let start = offset.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(e) = positioned.add_partition_offset(&tp.0, tp.1, start) {
                        crate::metrics::positioning_error("assign");
                        tracing::error!(topic = %tp.0, partition = tp.1, error = %e, "cannot position partition; the consumer retries the assignment");
                        position_error = Some(format!("cannot position {}[{}]: {e}", tp.0, tp.1));
                    }
                    tracing::info!(topic = %tp.0, partition = tp.1, start = ?offset, "assigned partition at its stored offset");
                    owned.insert(tp, offset);
                }
                self.apply(consumer, owned, Some(&positioned), "assign");
                if position_error.is_some() {
                    self.progress.positioning(position_error);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(
                    partitions = tpl.count(),
                    "partitions revoked; in-flight work for them is dropped"
                );
                self.apply(consumer, HashMap::new(), None, "revoke");
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; unassigning everything");
                self.apply(consumer, HashMap::new(), None, "error");
            }
        }
    }
}

impl RebalanceContext {
    /// Records the new assignment, then hands it to librdkafka (or unassigns).
    fn apply(
        &self,
        consumer: &BaseConsumer<Self>,
        owned: HashMap<TopicPartition, Option<i64>>,
        tpl: Option<&TopicPartitionList>,
        kind: &'static str,
    ) {
        {
            let mut a = self.assignment.lock().expect("assignment lock");
            crate::metrics::rebalance(kind, a.partitions.keys(), owned.keys());
            a.partitions = owned;
            a.generation += 1;
            a.joined |= kind == "assign";
        }
        self.progress.reassigned();
        let result: KafkaResult<()> = match tpl {
            Some(tpl) => consumer.assign(tpl),
            None => consumer.unassign(),
        };
        match result {
            Ok(()) => {
                if tpl.is_some() {
                    self.progress.positioning(None);
                }
            }
            Err(e) => {
                // Never only logged: readiness fails and the consumer loop retries the assign
                // at the stored offsets until it succeeds.
                crate::metrics::positioning_error("assign");
                tracing::error!(error = %e, kind, "applying the assignment failed; the consumer retries it");
                if tpl.is_some() {
                    self.progress
                        .positioning(Some(format!("assign at the stored offsets failed: {e}")));
                }
            }
        }
    }

    /// Reads stored offsets, retrying with backoff until success or shutdown.
    fn load_offsets_blocking(
        &self,
        partitions: &[TopicPartition],
    ) -> Option<HashMap<TopicPartition, i64>> {
        let handle = tokio::runtime::Handle::current();
        let mut backoff = self.retry_backoff;
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            let result = tokio::task::block_in_place(|| {
                handle.block_on(self.store.load_offsets(&self.group, partitions))
            });
            match result {
                Ok(stored) => return Some(stored),
                Err(e) => {
                    crate::metrics::transient_error("database");
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot read stored offsets during rebalance; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
