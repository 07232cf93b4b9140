//! Layered settings: `config/default.toml` (embedded in the binary), an optional file given
//! with `--config`, then `PAYRECON_<SECTION>__<KEY>` environment variables.
//!
//! Every section builds the client configuration it describes, so no other module reads raw
//! settings. Secrets are `SecretString`s and never reach `Debug` output or logs. Unknown keys
//! and wrong types are rejected at start-up with the offending key named.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::domain::Limits;

/// The defaults shipped in the repository, embedded so the binary runs with no files around.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Environment variable prefix for overrides.
const ENV_PREFIX: &str = "PAYRECON_";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub registry: RegistrySettings,
    pub pipeline: PipelineSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub reconciliation: ReconciliationSettings,
    pub exceptions: ExceptionsSettings,
    pub validation: ValidationSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Full connection URL including credentials; secret because it carries the password.
    pub url: SecretString,
    /// Pool size: one connection per in-flight batch plus the lag/health tasks.
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// The one consumer group all instances share; also the key of `consumer_offsets`.
    pub group_id: String,
    pub payments_topic: String,
    pub settlements_topic: String,
    /// How long the group waits for a silent member before moving its partitions.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Longest gap between polls before the member is considered stuck and leaves.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Raw librdkafka options (security, tuning) passed through unchanged.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    pub url: String,
    /// Bounds each registry request so an unresponsive registry is a retry, not a hang.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub batch_max_records: usize,
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub lag_refresh_interval: Duration,
    /// An instance that owns partitions with lag and has committed nothing for this long is
    /// stalled: `/health/ready` fails and `payrecon_consumer_stalled` is 1.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

/// Global matching rules; a merchant's reference data can override tolerances and deadlines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconciliationSettings {
    /// Absolute tolerance in settlement currency (a decimal string, e.g. "0.01").
    #[serde(with = "rust_decimal::serde::str")]
    pub tolerance_abs: rust_decimal::Decimal,
    /// Relative tolerance as a fraction of the expected amount (e.g. "0.0001" = 1 bp).
    #[serde(with = "rust_decimal::serde::str")]
    pub tolerance_rel: rust_decimal::Decimal,
    /// How long after its last payment event a reference may still be settled.
    #[serde(with = "humantime_serde")]
    pub settlement_deadline: Duration,
    /// How long after a settlement line its payment event may still arrive.
    #[serde(with = "humantime_serde")]
    pub payment_deadline: Duration,
    /// The event-time watermark is the highest event time seen minus this.
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// Items the watermark made due that one batch re-evaluates at most (the rest follow in
    /// the next batches).
    pub due_sweep_limit: i64,
    /// Full reload of the reference cache, besides the reload on every change notification.
    #[serde(with = "humantime_serde")]
    pub reference_full_reload: Duration,
}

/// The exceptions topic and the outbox relay that publishes to it.
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

/// Bounds every record must respect before it reaches the store (see [`Limits`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationSettings {
    /// Longest id or reference, in UTF-8 bytes.
    pub max_id_bytes: usize,
    /// How far an event time may lie after its record's broker timestamp.
    #[serde(with = "humantime_serde")]
    pub max_event_time_ahead: Duration,
    /// How far an event time may lie before its record's broker timestamp.
    #[serde(with = "humantime_serde")]
    pub max_event_time_behind: Duration,
}

impl ValidationSettings {
    /// The codec's bounds.
    pub fn limits(&self) -> Limits {
        let chrono = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        Limits {
            max_id_bytes: self.max_id_bytes,
            max_event_time_ahead: chrono(self.max_event_time_ahead),
            max_event_time_behind: chrono(self.max_event_time_behind),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// librdkafka options payrecon sets itself; overriding them would break exactly-once.
const PROTECTED_KAFKA_OPTIONS: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "auto.offset.reset",
    "bootstrap.servers",
];

impl Settings {
    /// Loads defaults, then `file` (if any), then environment overrides from `env`.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Settings> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        // Only PAYRECON_SECTION__KEY variables are overrides; PAYRECON_CONFIG and the like
        // are not settings and must not trip `deny_unknown_fields`.
        let overrides: config::Map<String, String> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(ENV_PREFIX)?;
                rest.contains("__").then(|| (rest.to_lowercase(), v))
            })
            .collect();
        builder = builder.add_source(
            config::Environment::default()
                .separator("__")
                .source(Some(overrides)),
        );
        let settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.check()?;
        Ok(settings)
    }

    /// Loads with the process environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Settings> {
        Self::load_from(file, std::env::vars())
    }

    /// Semantic checks serde cannot express.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.pipeline.batch_max_records > 0,
            "invalid configuration: pipeline.batch_max_records must be at least 1"
        );
        anyhow::ensure!(
            (16..=2000).contains(&self.validation.max_id_bytes),
            "invalid configuration: validation.max_id_bytes must be between 16 and 2000 (a btree entry holds about 2700 bytes)"
        );
        anyhow::ensure!(
            self.kafka.payments_topic != self.kafka.settlements_topic,
            "invalid configuration: kafka.payments_topic and kafka.settlements_topic must differ"
        );
        for key in self.kafka.options.keys() {
            anyhow::ensure!(
                !PROTECTED_KAFKA_OPTIONS.contains(&key.as_str()),
                "invalid configuration: kafka.options.{key} is set by payrecon and cannot be overridden"
            );
        }
        Ok(())
    }
}

impl DatabaseSettings {
    /// Connection options parsed from the URL (sslmode, sslrootcert ... come from its query).
    /// Sessions are named `payrecon` so operators can find them in `pg_stat_activity`.
    pub fn connect_options(&self) -> anyhow::Result<PgConnectOptions> {
        let options = self
            .url
            .expose_secret()
            .parse::<PgConnectOptions>()
            .map_err(|e| anyhow::anyhow!("invalid configuration: database.url: {e}"))?;
        Ok(options.application_name("payrecon"))
    }

    pub fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.connect_timeout)
    }

    /// The URL with any password replaced, safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

impl KafkaSettings {
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
            .set_default("partition.assignment.strategy", "roundrobin")
            .set_default("queued.max.messages.kbytes", "32768")
            .set_default("fetch.wait.max.ms", "10");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_without_any_file() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.kafka.payments_topic, "payments.transactions");
        assert_eq!(s.pipeline.batch_linger, Duration::from_millis(20));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s = Settings::load_from(
            None,
            env(&[
                ("PAYRECON_KAFKA__GROUP_ID", "g2"),
                ("PAYRECON_PIPELINE__BATCH_LINGER", "1s"),
                ("PAYRECON_CONFIG", "ignored, not a setting"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.group_id, "g2");
        assert_eq!(s.pipeline.batch_linger, Duration::from_secs(1));
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Settings::load_from(
            None,
            env(&[("PAYRECON_PIPELINE__BATCH_MAX_RECORDS", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("batch_max_records"), "{err}");
        let err = Settings::load_from(None, env(&[("PAYRECON_PIPELINE__BATCH_LINGER", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_linger"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_rejected() {
        let err = Settings::load_from(None, env(&[("PAYRECON_KAFKA__BOOTSTRAP", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bootstrap"), "{err}");
    }

    #[test]
    fn protected_kafka_options_cannot_be_overridden() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[kafka.options]\n\"enable.auto.commit\" = \"true\"\n",
        )
        .unwrap();
        let err = Settings::load_from(Some(&path), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("enable.auto.commit"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:s3cret@h:5432/db?sslmode=require"),
            "postgres://u:***@h:5432/db?sslmode=require"
        );
        let s = Settings::load_from(
            None,
            env(&[("PAYRECON_DATABASE__URL", "postgres://u:s3cret@h/db")]),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
