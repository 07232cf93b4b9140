//! Partition assignment decided inside librdkafka's rebalance callback.
//!
//! librdkafka calls the rebalance callback synchronously inside `poll`. payrecon overrides it
//! so that each newly assigned partition is `assign`ed exactly once, directly at the offset
//! stored in PostgreSQL (earliest when none): no assign-then-seek, and Kafka's committed
//! offsets are never used. The PostgreSQL read is async; the callback runs on a tokio worker
//! thread inside `recv()`, so it uses `block_in_place` (the service requires the multi-thread
//! runtime) and retries until the database answers or shutdown is requested.
//!
//! Both rebalance protocols are handled. **Eager** (the default, `range,roundrobin`): every
//! rebalance revokes everything and assigns the new set, each at its stored offset; the
//! assignment generation is bumped and the batch being collected is dropped whole (its
//! records are read again by whoever owns them now). **Cooperative**
//! (`partition.assignment.strategy = "cooperative-sticky"`): a rebalance only adds or takes
//! away the partitions that move. Added ones are `incremental_assign`ed at their stored
//! offsets; revoked ones are `incremental_unassign`ed and listed in
//! [`Assignment::revoked`], from which the consumer loop drops their records from the batch
//! being collected before it accepts another record or commits. Partitions that stay keep
//! their fetch position *and* their records in the batch, so the generation is not bumped:
//! dropping those records would lose them (they are not delivered again). Either way the
//! offset compare-and-set rejects a batch that still covers a partition someone else
//! committed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
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
    /// Bumped on every eager assign/revoke (and every repositioning); a batch built under
    /// an older generation is dropped whole. Cooperative rebalances leave it alone.
    pub generation: u64,
    /// Set by the first assignment (possibly empty): the instance has joined the group.
    pub joined: bool,
    /// Partitions revoked by a cooperative rebalance whose records the batch being
    /// collected must drop; taken by the consumer loop.
    pub revoked: Vec<TopicPartition>,
    /// Whether the group uses the cooperative protocol (as of the last rebalance).
    pub cooperative: bool,
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
    /// The input topics keyed by payment reference ([`not_co_partitioned`]).
    pub(super) keyed_topics: Vec<String>,
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
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<TopicPartition> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                let Some(stored) = self.load_offsets_blocking(&partitions) else {
                    // Shutting down before the database answered: take nothing.
                    if cooperative {
                        self.unassign_all(consumer);
                    } else {
                        self.apply(consumer, HashMap::new(), None, "error");
                    }
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
                    tracing::info!(topic = %tp.0, partition = tp.1, start = ?offset, cooperative, "assigned partition at its stored offset");
                    owned.insert(tp, offset);
                }
                if cooperative {
                    self.add(consumer, owned, &positioned);
                } else {
                    self.apply(consumer, owned, Some(&positioned), "assign");
                }
                if position_error.is_some() {
                    self.progress.positioning(position_error);
                }
                let owned = self.assignment.lock().expect("assignment lock");
                if let Some(why) = not_co_partitioned(&self.keyed_topics, owned.partitions.keys()) {
                    tracing::warn!(%why, "this instance does not own the same partition numbers of the payments and settlements topics: a payment's events and lines are then applied by different instances, which wait on each other's reconciliation items (still exact); use the default assignor (range) and the same partition count for both topics");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(
                    partitions = tpl.count(),
                    cooperative,
                    lost = consumer.assignment_lost(),
                    "partitions revoked; in-flight work for them is dropped"
                );
                if cooperative {
                    self.remove(consumer, tpl);
                } else {
                    self.apply(consumer, HashMap::new(), None, "revoke");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; unassigning everything");
                if cooperative {
                    self.unassign_all(consumer);
                } else {
                    self.apply(consumer, HashMap::new(), None, "error");
                }
            }
        }
    }
}

/// Why an assignment is not co-partitioned, or `None`: the partition numbers owned of each
/// of `keyed` (the topics keyed by payment reference: payments and settlement lines) must be
/// the same. One payment's records share a key, so they are on the same partition number of
/// those topics when the topics have the same partition count; an instance that owns a
/// partition number of one and not of the other applies half of those payments while another
/// instance applies the other half. (Payouts are keyed by batch, whose lines come from many
/// partitions anyway.)
pub fn not_co_partitioned<'a>(
    keyed: &[String],
    owned: impl Iterator<Item = &'a TopicPartition>,
) -> Option<String> {
    let mut by_topic: std::collections::BTreeMap<&str, std::collections::BTreeSet<i32>> = keyed
        .iter()
        .map(|t| (t.as_str(), Default::default()))
        .collect();
    for (topic, partition) in owned {
        if let Some(numbers) = by_topic.get_mut(topic.as_str()) {
            numbers.insert(*partition);
        }
    }
    let mut topics = by_topic.iter();
    let (first, numbers) = topics.next()?;
    let (other, theirs) = topics.find(|(_, p)| *p != numbers)?;
    Some(format!("{first} {numbers:?} but {other} {theirs:?}"))
}

impl RebalanceContext {
    /// Records the new assignment, then hands it to librdkafka (or unassigns). Eager
    /// protocol: the whole assignment changes and the generation with it.
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
            a.revoked.clear();
            a.cooperative = false;
            a.joined |= kind == "assign";
        }
        self.progress.reassigned();
        let result: KafkaResult<()> = match tpl {
            Some(tpl) => consumer.assign(tpl),
            None => consumer.unassign(),
        };
        self.assigned(result, tpl.is_some(), kind);
    }

    /// Cooperative protocol: adds `owned` (positioned in `tpl` at their stored offsets) to
    /// the assignment. The batch being collected stays valid: its partitions keep going.
    fn add(
        &self,
        consumer: &BaseConsumer<Self>,
        owned: HashMap<TopicPartition, Option<i64>>,
        tpl: &TopicPartitionList,
    ) {
        {
            let mut a = self.assignment.lock().expect("assignment lock");
            let mut after: HashMap<TopicPartition, Option<i64>> = a.partitions.clone();
            after.extend(owned);
            crate::metrics::rebalance("assign", a.partitions.keys(), after.keys());
            a.partitions = after;
            a.cooperative = true;
            a.joined = true;
        }
        self.progress.reassigned();
        self.assigned(consumer.incremental_assign(tpl), true, "assign");
    }

    /// Cooperative protocol: takes the partitions of `tpl` away; the consumer loop drops
    /// their records from the batch being collected (see [`Assignment::revoked`]).
    fn remove(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        {
            let mut a = self.assignment.lock().expect("assignment lock");
            let mut after = a.partitions.clone();
            for e in tpl.elements() {
                let tp = (e.topic().to_owned(), e.partition());
                after.remove(&tp);
                a.revoked.push(tp);
            }
            crate::metrics::rebalance("revoke", a.partitions.keys(), after.keys());
            a.partitions = after;
            a.cooperative = true;
        }
        self.progress.reassigned();
        self.assigned(consumer.incremental_unassign(tpl), false, "revoke");
    }

    /// Cooperative protocol: gives up every partition (rebalance error, shutdown during an
    /// assignment); `assign(NULL)` is refused under this protocol.
    fn unassign_all(&self, consumer: &BaseConsumer<Self>) {
        match consumer.assignment() {
            Ok(current) => self.remove(consumer, &current),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the current assignment to give it up");
                let mut a = self.assignment.lock().expect("assignment lock");
                let all: Vec<TopicPartition> = a.partitions.keys().cloned().collect();
                a.revoked.extend(all);
                a.partitions.clear();
            }
        }
    }

    /// Reports the outcome of handing an assignment to librdkafka.
    fn assigned(&self, result: KafkaResult<()>, assigning: bool, kind: &'static str) {
        match result {
            Ok(()) => {
                if assigning {
                    self.progress.positioning(None);
                }
            }
            Err(e) => {
                // Never only logged: readiness fails and the consumer loop retries the assign
                // at the stored offsets until it succeeds.
                crate::metrics::positioning_error("assign");
                tracing::error!(error = %e, kind, "applying the assignment failed; the consumer retries it");
                if assigning {
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
                    // Waited like the read: the worker thread is handed over for the wait
                    // (its other tasks move), and a shutdown ends the wait at once.
                    tokio::task::block_in_place(|| {
                        handle.block_on(async {
                            tokio::select! {
                                () = tokio::time::sleep(backoff) => {}
                                () = self.shutdown.cancelled() => {}
                            }
                        })
                    });
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::not_co_partitioned;

    fn tp(t: &str, p: i32) -> (String, i32) {
        (t.to_owned(), p)
    }

    #[test]
    fn an_assignment_is_co_partitioned_when_every_keyed_topic_has_the_same_numbers() {
        let keyed = ["pay".to_owned(), "set".to_owned()];
        let range = [
            tp("pay", 0),
            tp("pay", 1),
            tp("set", 1),
            tp("set", 0),
            tp("out", 3),
        ];
        assert_eq!(not_co_partitioned(&keyed, range.iter()), None);
        assert_eq!(not_co_partitioned(&keyed, [].iter()), None);
        // Round-robin over 3 members: payments-0 here, settlements-1.
        let rr = [tp("pay", 0), tp("pay", 3), tp("set", 1), tp("out", 2)];
        assert_eq!(
            not_co_partitioned(&keyed, rr.iter()).as_deref(),
            Some("pay {0, 3} but set {1}")
        );
        // Settlements only: payments of those numbers are another member's.
        let lines_only = [tp("set", 2)];
        assert_eq!(
            not_co_partitioned(&keyed, lines_only.iter()).as_deref(),
            Some("pay {} but set {2}")
        );
    }
}
