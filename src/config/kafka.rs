//! `[kafka]`: brokers, the consumer group, the input topics and raw librdkafka options. The
//! client configurations built from it live in `crate::kafka::client` (only `kafka/` speaks
//! to librdkafka).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::redact::{is_secret_key, redact_url};

/// `Debug` is written by hand: `options` may hold `sasl.password` and the like.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// The one consumer group all instances share; also the key of `consumer_offsets`.
    pub group_id: String,
    pub payments_topic: String,
    pub settlements_topic: String,
    /// Bank statement lines (payouts), the third leg; empty: the payout leg is off (only
    /// payments and settlements are consumed).
    #[serde(default)]
    pub payouts_topic: String,
    /// How long the group waits for a silent member before moving its partitions.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Longest gap between polls before the member is considered stuck and leaves.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Static group membership (KIP-345): the member keeps its partitions across a restart
    /// that ends within `session_timeout`, so the group does not rebalance. Off by default:
    /// it only helps where an instance comes back under the same identity (a StatefulSet),
    /// and a static member that stops for good does not leave the group, so its partitions
    /// wait for `session_timeout`. On when true or when `group_instance_id` is set.
    #[serde(default)]
    pub static_membership: bool,
    /// librdkafka's `group.instance.id`; setting it turns static membership on. Unset with
    /// `static_membership = true`, it is taken from `POD_NAME`, else `HOSTNAME`, at start-up.
    /// Must be unique within the group.
    #[serde(default)]
    pub group_instance_id: Option<String>,
    /// A file holding the SASL password (`sasl.password`), read at start-up, one trailing
    /// newline trimmed. Setting it and `options."sasl.password"` is an error.
    #[serde(default)]
    pub sasl_password_file: Option<PathBuf>,
    /// Raw librdkafka options (security, tuning) passed through unchanged.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl KafkaSettings {
    /// The input topic names, in topic-index order (the index a batch's records refer to):
    /// payments, settlements, then payouts when configured. `crate::kafka::client` pairs
    /// them with the stream each carries.
    pub fn input_topic_names(&self) -> Vec<String> {
        let mut out = vec![self.payments_topic.clone(), self.settlements_topic.clone()];
        if !self.payouts_topic.is_empty() {
            out.push(self.payouts_topic.clone());
        }
        out
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: BTreeMap<&str, &str> = (self.options.iter())
            .map(|(k, v)| {
                let shown = if is_secret_kafka_option(k) { "***" } else { v };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &redact_url(&self.bootstrap_servers))
            .field("group_id", &self.group_id)
            .field("payments_topic", &self.payments_topic)
            .field("settlements_topic", &self.settlements_topic)
            .field("payouts_topic", &self.payouts_topic)
            .field("session_timeout", &self.session_timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("static_membership", &self.static_membership)
            .field("group_instance_id", &self.group_instance_id)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("options", &options)
            .finish()
    }
}

/// librdkafka options whose value is a credential: passwords and secrets by name, PEM
/// material given inline, and the OAUTHBEARER settings (their config string holds secrets).
fn is_secret_kafka_option(key: &str) -> bool {
    is_secret_key(key) || key.ends_with(".pem") || key.starts_with("sasl.oauthbearer")
}

/// librdkafka options payrecon sets itself; overriding them would break exactly-once.
pub(super) const PROTECTED_KAFKA_OPTIONS: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "auto.offset.reset",
    "bootstrap.servers",
    // Set through kafka.static_membership / kafka.group_instance_id.
    "group.instance.id",
];
