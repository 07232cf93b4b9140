//! `[exceptions]`: the exceptions topic and the outbox relay that publishes to it.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExceptionsSettings {
    pub topic: String,
    /// Whether this instance competes for the relay (exactly one instance holds it).
    pub relay_enabled: bool,
    /// Outbox rows published per round; the relay marks them published after every ack.
    pub relay_batch: i64,
    /// How often the relay looks for new outbox rows when it found none.
    #[serde(with = "humantime_serde")]
    pub relay_poll_interval: Duration,
    /// The relay producer's `message.timeout.ms`: after it, a message is delivered or failed.
    /// A relay taking over from one that stopped mid-round waits this long (plus a margin)
    /// past that round's start before it reads the topic's tail.
    #[serde(with = "humantime_serde")]
    pub relay_message_timeout: Duration,
    /// Publish each round in a Kafka transaction with this `transactional.id` (the same on
    /// every instance: the active relay fences the previous one). Unset: idempotent producer
    /// only (for brokers without transactions).
    #[serde(default)]
    pub transactional_id: Option<String>,
}
