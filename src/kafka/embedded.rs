//! An embedded Kafka: librdkafka's mock cluster, a real Kafka protocol peer inside the
//! process (the demo and the benchmark run on it; the tests use it directly). Not durable,
//! one broker, no authentication: never for production.

use anyhow::Context;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// A running mock cluster; it stops when dropped.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedKafka {
    /// Starts a one-broker cluster.
    pub fn start() -> anyhow::Result<Self> {
        let cluster = MockCluster::new(1).context("starting the embedded Kafka (mock cluster)")?;
        Ok(Self { cluster })
    }

    /// Its bootstrap address (`kafka.bootstrap_servers`).
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions (replication 1).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.cluster
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("creating topic {topic}"))
    }
}
