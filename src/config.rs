//! Layered settings: `config/default.toml` (embedded in the binary), an optional file given
//! with `--config`, then `PAYRECON_<SECTION>__<KEY>` environment variables.
//!
//! Every section builds the client configuration it describes, so no other module reads raw
//! settings. Secrets are `SecretString`s and never reach `Debug` output or logs. Unknown keys
//! and wrong types are rejected at start-up with the offending key named.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::ConnectOptions;
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
    /// A file holding `url` (a mounted Kubernetes Secret): read at start-up, one trailing
    /// newline trimmed. Setting both is an error.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Pool size: one connection per in-flight batch plus the lag/health tasks.
    pub max_connections: u32,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a command (`migrate`, `reference load`, `dead-letters`, `simulate`) waits for
    /// a database that does not answer, and `migrate` for another instance's migration,
    /// before it fails. `payrecon run` waits for the database as long as it takes.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Settings every session starts with, so that a dead or frozen peer cannot hold row
    /// locks (and with them a partition) for long.
    pub session: SessionSettings,
}

/// PostgreSQL session settings (GUCs) sent with every connection; `0s` disables one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// Longest single statement (a runaway query).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Longest wait for a lock: a batch blocked on a row a frozen session holds fails with
    /// 55P03 and is retried, instead of hanging.
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// A session idle inside a transaction this long is ended by the server, releasing its
    /// locks: the bound on how long a frozen or cut-off instance can hold a partition's
    /// offset row.
    #[serde(with = "humantime_serde")]
    pub idle_in_transaction_session_timeout: Duration,
    /// Server-side TCP keepalive: idle time before the first probe, interval, probes.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalives_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_keepalives_interval: Duration,
    pub tcp_keepalives_count: u32,
    /// How long data sent to a client may stay unacknowledged before the server drops the
    /// connection (a network black hole while a statement's results are sent).
    #[serde(with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
}

impl SessionSettings {
    /// The settings as (name, value) pairs for the connection's startup options.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let s = |d: Duration| d.as_secs().to_string();
        vec![
            ("statement_timeout", ms(self.statement_timeout)),
            ("lock_timeout", ms(self.lock_timeout)),
            (
                "idle_in_transaction_session_timeout",
                ms(self.idle_in_transaction_session_timeout),
            ),
            ("tcp_keepalives_idle", s(self.tcp_keepalives_idle)),
            ("tcp_keepalives_interval", s(self.tcp_keepalives_interval)),
            (
                "tcp_keepalives_count",
                self.tcp_keepalives_count.to_string(),
            ),
            ("tcp_user_timeout", ms(self.tcp_user_timeout)),
            // NOTICEs ("relation ... already exists, skipping" from every migration run) are
            // not the operator's business; warnings and errors still arrive.
            ("client_min_messages", "warning".to_owned()),
        ]
    }
}

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
    /// The input topics with the stream each carries, in topic-index order (the index a
    /// batch's records refer to): payments, settlements, then payouts when configured.
    pub fn input_topics(&self) -> Vec<(crate::codec::Stream, String)> {
        use crate::codec::Stream;
        let mut out = vec![
            (Stream::Payments, self.payments_topic.clone()),
            (Stream::Settlements, self.settlements_topic.clone()),
        ];
        if !self.payouts_topic.is_empty() {
            out.push((Stream::Payouts, self.payouts_topic.clone()));
        }
        out
    }

    /// The input topic names, in topic-index order.
    pub fn input_topic_names(&self) -> Vec<String> {
        self.input_topics().into_iter().map(|(_, t)| t).collect()
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

/// The Schema Registry and how payrecon authenticates to it. `Debug` never shows a secret
/// (`SecretString`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    pub url: String,
    /// Bounds each registry request so an unresponsive registry is a retry, not a hang.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP basic auth user (Confluent Cloud: the Schema Registry API key); needs `password`.
    #[serde(default)]
    pub username: Option<String>,
    /// HTTP basic auth password (Confluent Cloud: the API secret).
    #[serde(default)]
    pub password: Option<SecretString>,
    /// A file holding `password`, read at start-up (one trailing newline trimmed).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A bearer token sent as `Authorization: Bearer ...` (instead of basic auth).
    #[serde(default)]
    pub token: Option<SecretString>,
    /// A file holding `token`, read at start-up (one trailing newline trimmed).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA certificate(s) the registry's certificate must chain to; when set,
    /// only these are trusted (not the system store).
    #[serde(default)]
    pub ca_location: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `key_location`.
    #[serde(default)]
    pub certificate_location: Option<PathBuf>,
    /// Its private key: PEM, PKCS#8, unencrypted (`openssl pkcs8 -topk8 -nocrypt`).
    #[serde(default)]
    pub key_location: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    pub batch_max_records: usize,
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Batches committed concurrently, each over its own partitions (partition mod lanes),
    /// each with its own connection; 1 to 16.
    pub commit_lanes: usize,
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
    /// `false`: ingestion only. Records, running totals, dead letters and offsets are
    /// committed as always, but no reconciliation item, history, outbox row or item count
    /// in the daily totals is written (`payrecon bench` measures the ingestion path so).
    pub enabled: bool,
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
    /// How long after a settlement batch's last line its payout may still arrive on the bank
    /// statement (and how long an unexplained credit waits for its batch).
    #[serde(with = "humantime_serde")]
    pub payout_deadline: Duration,
    /// Absolute tolerance between a batch's net total and its payouts (a decimal string).
    #[serde(with = "rust_decimal::serde::str")]
    pub payout_tolerance_abs: rust_decimal::Decimal,
    /// Relative tolerance of the payout leg as a fraction of the batch's net total.
    #[serde(with = "rust_decimal::serde::str")]
    pub payout_tolerance_rel: rust_decimal::Decimal,
    /// A partition's highest event time counts in the watermark minus this (how late a
    /// record may arrive and still be in time).
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// A caught-up input partition whose last record's broker timestamp is more than this
    /// behind the group's stream time (the highest broker timestamp applied) stops holding
    /// the watermark back; see `reconcile::watermark`. Broker time, not the wall clock, so a
    /// replay judges it the same.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Per input topic overrides of `idle_timeout` and `allowed_lateness`, keyed by topic
    /// name (a settlements topic that receives one burst a day needs a longer idle timeout).
    #[serde(default)]
    pub topics: BTreeMap<String, TopicClockSettings>,
    /// Items the watermark made due that one batch re-evaluates at most (the rest follow in
    /// the next batches).
    pub due_sweep_limit: i64,
    /// Full reload of the reference cache, besides the reload on every change notification.
    #[serde(with = "humantime_serde")]
    pub reference_full_reload: Duration,
}

/// One input topic's watermark overrides; unset fields take the global value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicClockSettings {
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub allowed_lateness: Option<Duration>,
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
    // Set through kafka.static_membership / kafka.group_instance_id.
    "group.instance.id",
];

/// Sections of the settings, for spotting `PAYRECON_<SECTION>_<KEY>` (one underscore).
const SECTIONS: &[&str] = &[
    "database",
    "kafka",
    "registry",
    "pipeline",
    "http",
    "log",
    "reconciliation",
    "exceptions",
    "validation",
];

/// Keys without a default in `config/default.toml` (which lists every other key).
const OPTIONAL_KEYS: &[&str] = &[
    "database.url_file",
    "kafka.static_membership",
    "kafka.group_instance_id",
    "kafka.sasl_password_file",
    "registry.username",
    "registry.password",
    "registry.password_file",
    "registry.token",
    "registry.token_file",
    "registry.ca_location",
    "registry.certificate_location",
    "registry.key_location",
    "exceptions.transactional_id",
];

/// Refuses `PAYRECON_DATABASE_URL_FILE`-style variables (one underscore between section and
/// key) that name a setting: they would be ignored silently, and the secret they point at
/// with them, while the setting keeps its default.
fn check_env_names(env: &[(String, String)]) -> anyhow::Result<()> {
    let defaults = config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .build()
        .context("reading the embedded defaults")?;
    for (name, _) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest.contains("__") {
            continue;
        }
        let lower = rest.to_lowercase();
        for section in SECTIONS {
            let Some(key) = lower
                .strip_prefix(section)
                .and_then(|k| k.strip_prefix('_'))
            else {
                continue;
            };
            let path = format!("{section}.{key}");
            if OPTIONAL_KEYS.contains(&path.as_str())
                || defaults.get::<config::Value>(&path).is_ok()
            {
                anyhow::bail!(
                    "invalid configuration: {name} is not read; settings take two underscores between section and key: {ENV_PREFIX}{}__{}",
                    section.to_uppercase(),
                    key.to_uppercase()
                );
            }
        }
    }
    Ok(())
}

/// The content of the secret file `path` (given as setting `key`) without its trailing
/// newline. Errors name the key and the path, never the content.
fn read_secret_file(key: &str, path: &Path) -> anyhow::Result<SecretString> {
    let bytes = std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration: cannot read {key} ({}): {e}",
            path.display()
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "invalid configuration: {key} ({}) is not UTF-8 text",
            path.display()
        )
    })?;
    let value = match text.strip_suffix('\n') {
        Some(v) => v.strip_suffix('\r').unwrap_or(v),
        None => &text,
    };
    anyhow::ensure!(
        !value.is_empty(),
        "invalid configuration: {key} ({}) is empty",
        path.display()
    );
    Ok(SecretString::from(value.to_owned()))
}

impl Settings {
    /// Loads defaults, then `file` (if any), then environment overrides from `env`, then
    /// reads the secrets given as files (`*_file` keys, `PAYRECON_<SECTION>__<KEY>_FILE`).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Settings> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        check_env_names(&env)?;
        // Only PAYRECON_SECTION__KEY variables are overrides; PAYRECON_CONFIG and the like
        // are not settings and must not trip `deny_unknown_fields`.
        let overrides: config::Map<String, String> = (env.iter())
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(ENV_PREFIX)?;
                rest.contains("__")
                    .then(|| (rest.to_lowercase(), v.clone()))
            })
            .collect();
        // The layers a user wrote (file and environment, not the embedded defaults): a
        // secret's `*_file` key conflicts with its value only when the user set both.
        let user_layers = |builder: config::ConfigBuilder<config::builder::DefaultState>| {
            let mut builder = builder;
            if let Some(path) = file {
                builder = builder.add_source(config::File::from(path).required(true));
            }
            builder.add_source(
                config::Environment::default()
                    .separator("__")
                    .source(Some(overrides.clone())),
            )
        };
        let builder = user_layers(config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        )));
        let mut settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let user = user_layers(config::Config::builder())
            .build()
            .context("reading configuration")?;
        let explicit_database_url = user.get_string("database.url").is_ok();
        settings.read_secret_files(explicit_database_url)?;
        settings.resolve_group_instance_id(&env)?;
        settings.check()?;
        Ok(settings)
    }

    /// Replaces every secret given as a file by the file's content. It is an error to give a
    /// secret both ways, or a file that cannot be read; errors name the key and the path,
    /// never the content.
    fn read_secret_files(&mut self, explicit_database_url: bool) -> anyhow::Result<()> {
        if let Some(path) = &self.database.url_file {
            anyhow::ensure!(
                !explicit_database_url,
                "invalid configuration: database.url and database.url_file are both set \
                 (PAYRECON_DATABASE__URL and PAYRECON_DATABASE__URL_FILE); set only one"
            );
            self.database.url = read_secret_file("database.url_file", path)?;
        }
        let registry = &mut self.registry;
        if let Some(path) = &registry.password_file {
            anyhow::ensure!(
                registry.password.is_none(),
                "invalid configuration: registry.password and registry.password_file are both set; set only one"
            );
            registry.password = Some(read_secret_file("registry.password_file", path)?);
        }
        if let Some(path) = &registry.token_file {
            anyhow::ensure!(
                registry.token.is_none(),
                "invalid configuration: registry.token and registry.token_file are both set; set only one"
            );
            registry.token = Some(read_secret_file("registry.token_file", path)?);
        }
        if let Some(path) = &self.kafka.sasl_password_file {
            anyhow::ensure!(
                !self.kafka.options.contains_key("sasl.password"),
                "invalid configuration: kafka.options.\"sasl.password\" and kafka.sasl_password_file are both set; set only one"
            );
            let password = read_secret_file("kafka.sasl_password_file", path)?;
            (self.kafka.options).insert("sasl.password".into(), password.expose_secret().into());
        }
        Ok(())
    }

    /// Settles static membership: on when `kafka.group_instance_id` is set (an explicit id
    /// is an explicit choice) or `kafka.static_membership` is true, the id then taken from
    /// `POD_NAME` (else `HOSTNAME`) in `env`.
    fn resolve_group_instance_id(&mut self, env: &[(String, String)]) -> anyhow::Result<()> {
        let kafka = &mut self.kafka;
        if let Some(id) = &kafka.group_instance_id {
            anyhow::ensure!(
                !id.trim().is_empty(),
                "invalid configuration: kafka.group_instance_id is empty"
            );
            kafka.static_membership = true;
            return Ok(());
        }
        if !kafka.static_membership {
            return Ok(());
        }
        if kafka.group_instance_id.is_none() {
            let from_env = |name: &str| {
                (env.iter())
                    .find(|(k, v)| k == name && !v.trim().is_empty())
                    .map(|(_, v)| v.trim().to_owned())
            };
            kafka.group_instance_id = from_env("POD_NAME").or_else(|| from_env("HOSTNAME"));
        }
        match &kafka.group_instance_id {
            Some(id) if !id.trim().is_empty() => Ok(()),
            _ => anyhow::bail!(
                "invalid configuration: kafka.static_membership is true but no group instance id is known: \
                 set kafka.group_instance_id, or POD_NAME or HOSTNAME in the environment"
            ),
        }
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
            (1..=16).contains(&self.pipeline.commit_lanes),
            "invalid configuration: pipeline.commit_lanes must be between 1 and 16"
        );
        anyhow::ensure!(
            (16..=2000).contains(&self.validation.max_id_bytes),
            "invalid configuration: validation.max_id_bytes must be between 16 and 2000 (a btree entry holds about 2700 bytes)"
        );
        let topics = self.kafka.input_topic_names();
        anyhow::ensure!(
            topics
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == topics.len(),
            "invalid configuration: kafka.payments_topic, kafka.settlements_topic and kafka.payouts_topic must differ"
        );
        self.registry.check()?;
        for key in self.kafka.options.keys() {
            anyhow::ensure!(
                !PROTECTED_KAFKA_OPTIONS.contains(&key.as_str()),
                "invalid configuration: kafka.options.{key} is set by payrecon and cannot be overridden"
            );
        }
        // librdkafka checks every option's name and value here, at start-up, rather than when
        // the first client is created: rdkafka's error there quotes the value, so a misspelt
        // "sasl.pasword" would print the password.
        if let Err(e) = self.kafka.client_config().create_native_config() {
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
}

impl DatabaseSettings {
    /// Connection options parsed from the URL (sslmode, sslrootcert ... come from its query).
    /// Sessions are named `payrecon` so operators can find them in `pg_stat_activity`.
    ///
    /// The URL is parsed here, not by sqlx's `FromStr`, for two reasons: a parse error names
    /// the setting and the *redacted* URL (never the URL itself), and query parameters sqlx
    /// does not know are dropped with a warning naming only the key, because sqlx would log
    /// their value (`?sslpassword=...` is a libpq parameter sqlx ignores).
    pub fn connect_options(&self) -> anyhow::Result<PgConnectOptions> {
        let raw = self.url.expose_secret();
        let invalid = |e: &dyn std::fmt::Display| {
            // Neither url's nor sqlx's parse errors quote the input today; scrubbed anyway,
            // because a future version quoting it would otherwise print the password.
            anyhow::anyhow!(
                "invalid configuration: database.url ({}) is not a valid PostgreSQL URL: {}",
                redact_url(raw),
                redact_text(&e.to_string())
            )
        };
        // A libpq host list: sqlx gets the first server; store::targets finds the primary.
        let (first, _) = crate::store::targets::split_url(raw).map_err(|e| invalid(&e))?;
        let mut url = url::Url::parse(&first).map_err(|e| invalid(&e))?;
        let (known, unknown): (Vec<_>, Vec<_>) = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .partition(|(k, _)| is_sqlx_parameter(k));
        if !unknown.is_empty() {
            for (key, _) in &unknown {
                tracing::warn!(
                    %key,
                    "ignoring unrecognized parameter of database.url (value not shown)"
                );
            }
            if known.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut().clear().extend_pairs(known);
            }
        }
        let options = PgConnectOptions::from_url(&url).map_err(|e| invalid(&e))?;
        Ok(options
            .application_name("payrecon")
            .options(self.session.options())
            // sqlx's slow-statement warning carries the whole SQL text; the batch commit
            // histogram measures the same thing. Kept, but at DEBUG.
            .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1)))
    }

    /// The servers `url` lists and the session it asks for (libpq's `target_session_attrs`).
    pub fn targets(&self) -> anyhow::Result<crate::store::targets::Targets> {
        crate::store::targets::split_url(self.url.expose_secret())
            .map(|(_, targets)| targets)
            .map_err(|e| {
                anyhow::anyhow!(
                    "invalid configuration: database.url ({}): {e}",
                    self.redacted_url()
                )
            })
    }

    pub fn pool_options(&self) -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.connect_timeout)
    }

    /// The URL with any credential replaced, safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(self.url.expose_secret())
    }
}

/// Whether sqlx 0.8's URL parser knows the query parameter `key` (it logs the value of any
/// other one).
fn is_sqlx_parameter(key: &str) -> bool {
    const KNOWN: &[&str] = &[
        "sslmode",
        "ssl-mode",
        "sslrootcert",
        "ssl-root-cert",
        "ssl-ca",
        "sslcert",
        "ssl-cert",
        "sslkey",
        "ssl-key",
        "statement-cache-capacity",
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "application_name",
        "options",
    ];
    KNOWN.contains(&key) || (key.starts_with("options[") && key.ends_with(']'))
}

/// Whether the value of parameter `key` is a credential (`password`, `sslpassword`, `pass`,
/// `passwd`, `pwd`, `*_secret`, `*_token`...). Erring towards "yes": redacting a harmless
/// value costs a less helpful log line, missing a secret costs a leak.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "passwd", "password", "pwd", "secret", "token"]
        .iter()
        .any(|s| key.ends_with(s))
}

/// Replaces the value of every secret `key=value` pair (URL query parameters and libpq
/// `key=value` strings alike, see [`is_secret_key`]) with `***`. A value ends at whitespace,
/// and in a URL (`url_query`) also at `&`; a value in single quotes (libpq) ends at the
/// closing quote, backslash escapes included.
fn redact_secret_parameters(s: &str, url_query: bool) -> String {
    let is_key_char = |c: char| c.is_ascii_alphanumeric() || "_-.[]".contains(c);
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let before = &rest[..eq];
        let key_end = before.trim_end().len();
        let key_start = before[..key_end]
            .rfind(|c: char| !is_key_char(c))
            .map_or(0, |i| {
                i + before[i..].chars().next().map_or(1, char::len_utf8)
            });
        let key = &before[key_start..key_end];
        out.push_str(&rest[..=eq]);
        rest = &rest[eq + 1..];
        if key.is_empty() || !is_secret_key(key) {
            continue;
        }
        let value = rest.trim_start();
        out.push_str(&rest[..rest.len() - value.len()]);
        let len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let close = quoted.char_indices().find_map(|(i, c)| {
                let end = !escaped && c == '\'';
                escaped = !escaped && c == '\\';
                end.then_some(i)
            });
            close.map_or(value.len(), |i| i + 2)
        } else {
            value
                .find(|c: char| c.is_whitespace() || (url_query && c == '&'))
                .unwrap_or(value.len())
        };
        out.push_str("***");
        rest = &value[len..];
    }
    out.push_str(rest);
    out
}

/// A connection string safe to log: credentials replaced by `***`, whatever the string's
/// shape. Passwords may hold `@`, `:`, `/`, `?` or `#` unencoded, so no attempt is made to
/// find where a well-formed URL's password ends:
/// - with a scheme: everything between `://` and the *last* `@` goes, user name included
///   (`postgres://u:p@ss@host/db` is `postgres://***@host/db`);
/// - without a scheme: everything up to the last `@` (`u:secret@host` is `***@host`), unless
///   it reads as a libpq `key=value` string (where `@` may be part of a user name);
/// - everywhere: the value of `password=`, `sslpassword=`, `pass=` and the like.
///
/// It over-redacts rather than under-redacts: an `@` later in the query also hides the host.
pub fn redact_url(url: &str) -> String {
    let has_scheme = url.contains("://");
    let s = redact_secret_parameters(url, has_scheme);
    if let Some((scheme, rest)) = s.split_once("://") {
        return match rest.rfind('@') {
            Some(at) => format!("{scheme}://***{}", &rest[at..]),
            None => s,
        };
    }
    let keyword_form = s.contains('=');
    match s.rfind('@') {
        Some(at) if !keyword_form => format!("***{}", &s[at..]),
        _ => s,
    }
}

/// Free text (an error message from a driver or an HTTP client) with every URL's credentials
/// and every secret `key=value` redacted. URLs inside text are found by their `://`; the
/// credentials of each end at the last `@` before the next whitespace (clients print URLs
/// serialized, with spaces percent-encoded).
pub fn redact_text(text: &str) -> String {
    let s = redact_secret_parameters(text, true);
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let token_end = tail.find(char::is_whitespace).unwrap_or(tail.len());
        match tail[..token_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

impl RegistrySettings {
    /// Combinations that cannot work, refused at start-up.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.username.is_some() == self.password.is_some(),
            "invalid configuration: registry basic auth needs both registry.username and \
             registry.password (or registry.password_file)"
        );
        anyhow::ensure!(
            !(self.username.is_some() && self.token.is_some()),
            "invalid configuration: registry.token and registry.username/password are both set; \
             a request carries one Authorization header: set only one"
        );
        anyhow::ensure!(
            self.certificate_location.is_some() == self.key_location.is_some(),
            "invalid configuration: a registry client certificate needs both \
             registry.certificate_location and registry.key_location"
        );
        Ok(())
    }

    /// The registry client's settings: URL, request timeout, credentials, CA and client
    /// certificate, through `schema_registry_converter`'s own builder (its `build_with` takes
    /// the TLS configuration as a reqwest client builder). Errors name the setting and the
    /// file, never a credential.
    pub fn client(&self) -> anyhow::Result<SrSettings> {
        let mut builder = SrSettings::new_builder(self.url.clone());
        builder.set_timeout(self.request_timeout);
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            builder.set_basic_authorization(user, Some(password.expose_secret()));
        }
        if let Some(token) = &self.token {
            builder.set_token_authorization(token.expose_secret());
        }
        let mut tls = reqwest::Client::builder();
        if let Some(path) = &self.ca_location {
            let pem = read_file("registry.ca_location", path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "invalid configuration: registry.ca_location ({}) holds no PEM certificate",
                        path.display()
                    )
                })?;
            tls = tls.tls_certs_only(certs);
        }
        if let (Some(cert), Some(key)) = (&self.certificate_location, &self.key_location) {
            let cert_pem = read_file("registry.certificate_location", cert)?;
            let key_pem = read_file("registry.key_location", key)?;
            // native-tls's error describes the parse failure, not the bytes.
            let identity = reqwest::Identity::from_pkcs8_pem(&cert_pem, &key_pem).map_err(|e| {
                anyhow::anyhow!(
                    "invalid configuration: registry.certificate_location ({}) and registry.key_location ({}) \
                     are not a PEM certificate and an unencrypted PKCS#8 PEM key: {}",
                    cert.display(),
                    key.display(),
                    redact_text(&error_chain(&e))
                )
            })?;
            tls = tls.identity(identity);
        }
        builder.build_with(tls).map_err(|e| {
            anyhow::anyhow!(
                "invalid configuration: cannot build the schema registry client for {}: {}",
                redact_url(&self.url),
                redact_text(&e.to_string())
            )
        })
    }
}

/// Reads a (non-secret) file given as setting `key`; the error names both.
fn read_file(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration: cannot read {key} ({}): {e}",
            path.display()
        )
    })
}

/// An error and its sources, `: `-separated (reqwest's own message omits the causes).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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
    fn a_password_never_survives_redaction_whatever_the_url_looks_like() {
        // (input, secrets that must not appear, what must still be there)
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "postgres://u:s3cret@h:5432/db?sslmode=require",
                &["s3cret"],
                "@h:5432/db?sslmode=require",
            ),
            ("postgres://u:p@ss@host/db", &["p@ss", "ss@"], "@host/db"),
            (
                "postgres://u:pa:ss:wd@host/db",
                &["pa:ss", "ss:wd"],
                "@host/db",
            ),
            ("postgres://u:pa/ss@host/db", &["pa/ss", "ss@"], "@host/db"),
            ("postgres://u:pa?ss@host/db", &["pa?ss", "ss@"], "@host/db"),
            ("postgres://u:pa#ss@host/db", &["pa#ss", "ss@"], "@host/db"),
            (
                "postgres://u:p%40ss%2Fw@host/db",
                &["p%40ss", "ss%2Fw"],
                "@host/db",
            ),
            (
                "postgres://u:v6secret@[::1]:5432/db",
                &["v6secret"],
                "@[::1]:5432/db",
            ),
            ("postgres://justauser@h/db", &[], "@h/db"),
            ("u:nosch3me@h:5432/db", &["nosch3me"], "@h:5432/db"),
            (
                "host=h user=u password=kw-secret dbname=d",
                &["kw-secret"],
                "host=h",
            ),
            (
                "host=h password='quo ted\\' secret' port=5",
                &["quo", "ted", "secret'"],
                "port=5",
            ),
            ("host=h password = spaced dbname=d", &["spaced"], "dbname=d"),
            (
                "postgres://h/db?sslmode=require&password=qu3ry&application_name=a",
                &["qu3ry"],
                "application_name=a",
            ),
            (
                "postgres://h/db?sslpassword=ssl-s3cret",
                &["ssl-s3cret"],
                "sslpassword=***",
            ),
            (
                "http://h/?pass=p1&pwd=p2&api_token=p3",
                &["p1", "p2", "p3"],
                "http://h/",
            ),
            (
                "postgres://u:p@ss@h/db?password=a@b",
                &["p@ss", "ss@", "a@b"],
                "@h/db",
            ),
            (
                "::not a url at all:: user:g@rbage@",
                &["user:g", "rbage"],
                "***@",
            ),
            ("not a url, no credential", &[], "not a url, no credential"),
            (
                "SASL_SSL://svc:k4fka@broker1:9092,broker2:9092",
                &["k4fka"],
                "broker2:9092",
            ),
        ];
        for (input, secrets, kept) in cases {
            let out = redact_url(input);
            for secret in *secrets {
                assert!(
                    !out.contains(secret),
                    "{input:?} -> {out:?} leaks {secret:?}"
                );
            }
            assert!(out.contains(kept), "{input:?} -> {out:?} lost {kept:?}");
            if !secrets.is_empty() {
                assert_ne!(
                    &out, input,
                    "a credential form must never come back unchanged"
                );
            }
        }
    }

    #[test]
    fn urls_inside_error_messages_lose_their_credentials() {
        let message = "error sending request for url (https://key:p@ss)w0rd@registry:8081/schemas/ids/1): \
                       connection refused; retry password=plain";
        let out = redact_text(message);
        for secret in ["key", "p@ss", "ss)w0rd", "plain"] {
            assert!(!out.contains(secret), "{out} leaks {secret}");
        }
        assert!(
            out.contains("https://***@registry:8081/schemas/ids/1)"),
            "{out}"
        );
        assert_eq!(redact_text("no url in here"), "no url in here");
    }

    #[test]
    fn an_unparsable_database_url_is_named_but_not_shown() {
        let s = Settings::load_from(
            None,
            env(&[("PAYRECON_DATABASE__URL", "postgres://u:p@ss@h:notaport/db")]),
        )
        .unwrap();
        let err = s.database.connect_options().unwrap_err().to_string();
        assert!(err.contains("database.url"), "{err}");
        assert!(err.contains("postgres://***@h:notaport/db"), "{err}");
        assert!(!err.contains("p@ss") && !err.contains("ss@"), "{err}");
        assert!(!format!("{s:?}").contains("p@ss"));
    }

    #[test]
    fn database_url_parameters_sqlx_does_not_know_are_dropped() {
        let s = Settings::load_from(
            None,
            env(&[(
                "PAYRECON_DATABASE__URL",
                "postgres://u@h:5433/db?sslpassword=x&application_name=ignored&sslmode=disable",
            )]),
        )
        .unwrap();
        let options = s.database.connect_options().unwrap();
        assert_eq!(options.get_port(), 5433);
        assert_eq!(options.get_database(), Some("db"));
    }

    #[test]
    fn a_bad_kafka_option_is_refused_at_start_up_without_showing_its_value() {
        let dir = tempfile::tempdir().unwrap();
        for (key, fragment) in [("sasl.pasword", "sasl.pasword"), ("linger.ms", "linger.ms")] {
            let path = dir.path().join("c.toml");
            std::fs::write(
                &path,
                format!("[kafka.options]\n\"{key}\" = \"Sekr1t-x\"\n"),
            )
            .unwrap();
            let err = Settings::load_from(Some(&path), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(fragment), "{err}");
            assert!(!err.contains("Sekr1t"), "{err}");
        }
    }

    #[test]
    fn kafka_credentials_do_not_reach_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[kafka.options]\n\"sasl.username\" = \"svc\"\n\"sasl.password\" = \"Sekr1t\"\n\
             \"ssl.key.password\" = \"Sekr1t\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Some(&path), env(&[])).unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("Sekr1t"), "{debug}");
        assert!(debug.contains("\"svc\""), "{debug}");
    }

    /// Writes `content` to a file named `name` in `dir`; returns its path as a string.
    fn secret_file(dir: &tempfile::TempDir, name: &str, content: &[u8]) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }

    #[test]
    fn secrets_given_as_files_replace_their_settings_without_the_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let url = secret_file(&dir, "url", b"postgres://u:F1le-Sekr1t@db:5432/p\n");
        let password = secret_file(&dir, "password", b"Reg-Sekr1t\r\n");
        let sasl = secret_file(&dir, "sasl", b"Sasl-Sekr1t \n");
        let s = Settings::load_from(
            None,
            env(&[
                ("PAYRECON_DATABASE__URL_FILE", &url),
                ("PAYRECON_REGISTRY__USERNAME", "key"),
                ("PAYRECON_REGISTRY__PASSWORD_FILE", &password),
                ("PAYRECON_KAFKA__SASL_PASSWORD_FILE", &sasl),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.database.url.expose_secret(),
            "postgres://u:F1le-Sekr1t@db:5432/p"
        );
        assert_eq!(
            s.registry.password.as_ref().unwrap().expose_secret(),
            "Reg-Sekr1t"
        );
        // Only the newline goes: a trailing space may be part of a password.
        assert_eq!(s.kafka.options["sasl.password"], "Sasl-Sekr1t ");
        assert_eq!(
            s.kafka.consumer_config().get("sasl.password"),
            Some("Sasl-Sekr1t ")
        );
        let debug = format!("{s:?}");
        assert!(!debug.contains("Sekr1t"), "{debug}");

        let token = secret_file(&dir, "token", b"Tok-Sekr1t\n");
        let s =
            Settings::load_from(None, env(&[("PAYRECON_REGISTRY__TOKEN_FILE", &token)])).unwrap();
        assert_eq!(
            s.registry.token.as_ref().unwrap().expose_secret(),
            "Tok-Sekr1t"
        );
    }

    #[test]
    fn a_secret_given_both_as_a_value_and_as_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = secret_file(&dir, "f", b"x");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("PAYRECON_DATABASE__URL", "postgres://h/db"),
                    ("PAYRECON_DATABASE__URL_FILE", &file),
                ],
                "database.url and database.url_file are both set",
            ),
            (
                &[
                    ("PAYRECON_REGISTRY__USERNAME", "u"),
                    ("PAYRECON_REGISTRY__PASSWORD", "p"),
                    ("PAYRECON_REGISTRY__PASSWORD_FILE", &file),
                ],
                "registry.password and registry.password_file are both set",
            ),
            (
                &[
                    ("PAYRECON_REGISTRY__TOKEN", "t"),
                    ("PAYRECON_REGISTRY__TOKEN_FILE", &file),
                ],
                "registry.token and registry.token_file are both set",
            ),
        ];
        for (vars, message) in cases {
            let err = Settings::load_from(None, env(vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{err}");
        }
        // The default database.url is not "set": a file alone is fine.
        Settings::load_from(None, env(&[("PAYRECON_DATABASE__URL_FILE", &file)])).unwrap();
        // kafka.options."sasl.password" in a configuration file and the file variant.
        let config = dir.path().join("c.toml");
        std::fs::write(&config, "[kafka.options]\n\"sasl.password\" = \"p\"\n").unwrap();
        let err = Settings::load_from(
            Some(&config),
            env(&[("PAYRECON_KAFKA__SASL_PASSWORD_FILE", &file)]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kafka.sasl_password_file are both set"),
            "{err}"
        );
    }

    #[test]
    fn an_unreadable_secret_file_is_named_by_its_path_never_by_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-file").display().to_string();
        let err = Settings::load_from(None, env(&[("PAYRECON_DATABASE__URL_FILE", &missing)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read database.url_file") && err.contains(&missing),
            "{err}"
        );
        // Content that cannot be used is refused without being quoted.
        let binary = secret_file(&dir, "binary", b"Bin-Sekr1t\xff\xfe");
        let empty = secret_file(&dir, "empty", b"\n");
        for (var, path, what) in [
            (
                "PAYRECON_REGISTRY__TOKEN_FILE",
                &binary,
                "is not UTF-8 text",
            ),
            ("PAYRECON_REGISTRY__TOKEN_FILE", &empty, "is empty"),
        ] {
            let err = Settings::load_from(None, env(&[(var, path)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(path) && err.contains(what), "{err}");
            assert!(!err.contains("Sekr1t"), "{err}");
        }
        // A directory is not a file.
        let dir_path = dir.path().display().to_string();
        let err = Settings::load_from(
            None,
            env(&[("PAYRECON_KAFKA__SASL_PASSWORD_FILE", &dir_path)]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kafka.sasl_password_file") && err.contains(&dir_path),
            "{err}"
        );
    }

    #[test]
    fn a_variable_with_one_underscore_after_the_section_is_refused_with_the_right_name() {
        for (var, right) in [
            ("PAYRECON_DATABASE_URL_FILE", "PAYRECON_DATABASE__URL_FILE"),
            ("PAYRECON_DATABASE_URL", "PAYRECON_DATABASE__URL"),
            (
                "PAYRECON_REGISTRY_PASSWORD_FILE",
                "PAYRECON_REGISTRY__PASSWORD_FILE",
            ),
            (
                "PAYRECON_KAFKA_SASL_PASSWORD_FILE",
                "PAYRECON_KAFKA__SASL_PASSWORD_FILE",
            ),
        ] {
            let err = Settings::load_from(None, env(&[(var, "/run/secrets/x")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var) && err.contains(right), "{err}");
        }
        // Variables that name no setting are none of payrecon's business.
        Settings::load_from(
            None,
            env(&[
                ("PAYRECON_TEST_DATABASE_URL", "postgres://h/db"),
                ("PAYRECON_KAFKA_SOMETHING_ELSE", "x"),
                ("PAYRECON_CONFIG", "x"),
            ]),
        )
        .unwrap();
    }

    #[test]
    fn static_membership_sets_group_instance_id_from_the_setting_or_the_pod_name() {
        let id = |vars: &[(&str, &str)]| {
            Settings::load_from(None, env(vars)).map(|s| {
                s.kafka
                    .consumer_config()
                    .get("group.instance.id")
                    .map(str::to_owned)
            })
        };
        assert_eq!(
            id(&[("POD_NAME", "payrecon-0")]).unwrap(),
            None,
            "off by default"
        );
        let on = ("PAYRECON_KAFKA__STATIC_MEMBERSHIP", "true");
        assert_eq!(
            id(&[on, ("POD_NAME", "payrecon-1"), ("HOSTNAME", "h")]).unwrap(),
            Some("payrecon-1".into())
        );
        assert_eq!(
            id(&[on, ("HOSTNAME", "payrecon-2")]).unwrap(),
            Some("payrecon-2".into())
        );
        assert_eq!(
            id(&[
                on,
                ("PAYRECON_KAFKA__GROUP_INSTANCE_ID", "fixed"),
                ("POD_NAME", "p")
            ])
            .unwrap(),
            Some("fixed".into())
        );
        let err = id(&[on]).unwrap_err().to_string();
        assert!(err.contains("no group instance id"), "{err}");
        // An explicit id is an explicit choice: static membership without the switch.
        assert_eq!(
            id(&[("PAYRECON_KAFKA__GROUP_INSTANCE_ID", "payrecon-3")]).unwrap(),
            Some("payrecon-3".into())
        );
        let err = id(&[("PAYRECON_KAFKA__GROUP_INSTANCE_ID", " ")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.group_instance_id is empty"), "{err}");
        // Not through the pass-through options, where it would escape these rules.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("c.toml");
        std::fs::write(&config, "[kafka.options]\n\"group.instance.id\" = \"x\"\n").unwrap();
        let err = Settings::load_from(Some(&config), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("group.instance.id"), "{err}");
    }

    #[test]
    fn registry_settings_that_cannot_work_are_refused_and_secrets_never_shown() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("PAYRECON_REGISTRY__USERNAME", "u")],
                "needs both registry.username",
            ),
            (
                &[("PAYRECON_REGISTRY__PASSWORD", "Sekr1t")],
                "needs both registry.username",
            ),
            (
                &[
                    ("PAYRECON_REGISTRY__USERNAME", "u"),
                    ("PAYRECON_REGISTRY__PASSWORD", "Sekr1t"),
                    ("PAYRECON_REGISTRY__TOKEN", "Sekr1t"),
                ],
                "one Authorization header",
            ),
            (
                &[("PAYRECON_REGISTRY__CERTIFICATE_LOCATION", "/c.pem")],
                "needs both registry.certificate_location and registry.key_location",
            ),
        ];
        for (vars, message) in cases {
            let err = Settings::load_from(None, env(vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{err}");
            assert!(!err.contains("Sekr1t"), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let not_pem = secret_file(&dir, "ca.pem", b"not a certificate");
        let s = Settings::load_from(
            None,
            env(&[
                ("PAYRECON_REGISTRY__USERNAME", "u"),
                ("PAYRECON_REGISTRY__PASSWORD", "Sekr1t"),
                ("PAYRECON_REGISTRY__CA_LOCATION", &not_pem),
            ]),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("Sekr1t"));
        let err = s.registry.client().unwrap_err().to_string();
        assert!(
            err.contains("registry.ca_location") && err.contains(&not_pem),
            "{err}"
        );
        let mut s = s;
        s.registry.ca_location = Some(dir.path().join("missing.pem"));
        let err = s.registry.client().unwrap_err().to_string();
        assert!(err.contains("cannot read registry.ca_location"), "{err}");
    }
}
