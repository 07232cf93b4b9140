//! librdkafka client configurations built from `[kafka]`: the base every client shares, the
//! exactly-once consumer's and the idempotent producer's, and the start-up check of the
//! pass-through options. `config` describes the settings; this is where they meet librdkafka.

use rdkafka::ClientConfig;

use crate::codec::Stream;
use crate::config::kafka::KafkaSettings;
use crate::redact::redact_text;

impl KafkaSettings {
    /// The input topics with the stream each carries, in topic-index order (the index a
    /// batch's records refer to): payments, settlements, then payouts when configured.
    pub fn input_topics(&self) -> Vec<(Stream, String)> {
        Stream::ALL
            .into_iter()
            .zip(self.input_topic_names())
            .collect()
    }

    /// Base client config shared by consumers, producers and admin clients.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    /// The consumer configuration the exactly-once loop relies on.
    pub fn consumer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            )
            .set(
                "max.poll.interval.ms",
                self.max_poll_interval.as_millis().to_string(),
            )
            // Range first: partition N of every input topic goes to the same member, where
            // one payment's events and lines are (keys are the payment reference); roundrobin
            // second so a group still on it upgrades in one rolling restart.
            .set_default("partition.assignment.strategy", "range,roundrobin")
            .set_default("queued.max.messages.kbytes", "32768")
            .set_default("fetch.wait.max.ms", "10");
        if let (true, Some(id)) = (self.static_membership, &self.group_instance_id) {
            c.set("group.instance.id", id);
        }
        c
    }

    /// An idempotent producer (simulator, dead-letter replay).
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.client_config();
        c.set("enable.idempotence", "true")
            .set_default("compression.type", "lz4")
            .set_default("linger.ms", "5");
        c
    }
}

trait SetDefault {
    fn set_default(&mut self, key: &str, value: &str) -> &mut Self;
}

impl SetDefault for ClientConfig {
    /// Sets `key` unless the pass-through options already did.
    fn set_default(&mut self, key: &str, value: &str) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value);
        }
        self
    }
}

/// Refuses pass-through options librdkafka does not accept, naming the option but never its
/// value (librdkafka's own message quotes it, and the value may be a password).
pub fn check_options(kafka: &KafkaSettings) -> anyhow::Result<()> {
    if let Err(e) = kafka.client_config().create_native_config() {
        let message = match e {
            rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
                let desc = if value.is_empty() {
                    desc
                } else {
                    desc.replace(&value, "***")
                };
                format!("kafka.options.{key}: {desc}")
            }
            other => redact_text(&other.to_string()),
        };
        anyhow::bail!("invalid configuration: {message}");
    }
    Ok(())
}
