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

mod assignment;
pub mod client;
mod consumer;
pub mod lag;
pub mod logs;
mod progress;

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

/// Creates `topics` with `partitions` partitions if they do not exist (tests, demo, simulate).
pub async fn ensure_topics(
    config: &rdkafka::ClientConfig,
    topics: &[&str],
    partitions: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("creating topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Partitions of `topics` in all, from the broker's metadata (the watermark waits for every
/// one of them). A topic that does not exist counts as 0.
pub fn partition_count(config: &rdkafka::ClientConfig, topics: &[&str]) -> anyhow::Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = config.create()?;
    let mut n = 0;
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), std::time::Duration::from_secs(10))?;
        n += metadata
            .topics()
            .iter()
            .filter(|t| t.name() == *topic && t.error().is_none())
            .map(|t| t.partitions().len() as i64)
            .sum::<i64>();
    }
    Ok(n)
}
