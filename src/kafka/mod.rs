//! The consumer side of exactly-once.
//!
//! **Delivery guarantee.** Each record's effect is applied exactly once *in PostgreSQL*:
//! partitions are positioned at the `next_offset` stored in PostgreSQL on every assignment
//! (never at Kafka's committed offset), each batch commits its rows together with the new
//! offsets by compare-and-set, and a stale consumer's batch is rolled back. Kafka's committed
//! offsets are written after the database commit only so external lag tools see progress;
//! they are never read back. **Limits:** effects outside the transaction (logs, metrics) are
//! at-least-once; records removed by retention before they were read cannot be applied
//! (counted in `payrecon_offset_gaps_total`).

mod admin;
mod assignment;
pub mod client;
mod consumer;
pub mod embedded;
pub mod lag;
pub mod logs;
pub mod producer;
mod progress;
pub mod reader;

pub use admin::{ensure_topics, partition_count};
pub use assignment::Assignment;

/// The client context of every Kafka client payrecon creates besides the consumer (whose
/// [`assignment`] context does the same): librdkafka's logs and error callbacks rate limited,
/// end of partition not an error (see [`logs`]).
#[derive(Default)]
pub struct Quiet {
    throttle: logs::Throttle,
}

impl rdkafka::ClientContext for Quiet {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.throttle.log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.throttle.error(error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for Quiet {}
pub use consumer::{ConsumerLoop, LoopEvent};
pub use progress::Progress;
