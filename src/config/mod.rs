//! Layered settings: `config/default.toml` (embedded in the binary), an optional file given
//! with `--config`, then `PAYRECON_<SECTION>__<KEY>` environment variables.
//!
//! Every section builds the client configuration it describes, so no other module reads raw
//! settings. Secrets are `SecretString`s and never reach `Debug` output or logs. Unknown keys
//! and wrong types are rejected at start-up with the offending key named.
//!
//! One file per section (`database`, `kafka`, `registry`, `pipeline`, `reconciliation`,
//! `exceptions`, `validation`, `http`, `log`); this file holds the tree and its loading.

mod database;
mod exceptions;
mod http;
pub(crate) mod kafka;
mod log;
mod pipeline;
mod reconciliation;
mod registry;
#[cfg(test)]
mod tests;
mod validation;

use std::path::Path;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use database::{DatabaseSettings, SessionSettings};
pub use exceptions::ExceptionsSettings;
pub use http::HttpSettings;
pub use kafka::KafkaSettings;
pub use log::{LogFormat, LogSettings};
pub use pipeline::PipelineSettings;
pub use reconciliation::{ReconciliationSettings, TopicClockSettings};
pub use registry::RegistrySettings;
pub use validation::ValidationSettings;

// Kept here for callers that took them from `config` before they moved to `redact`.
pub use crate::redact::{error_chain, redact_text, redact_url};

/// The defaults shipped in the repository, embedded so the binary runs with no files around.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

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
                !kafka::PROTECTED_KAFKA_OPTIONS.contains(&key.as_str()),
                "invalid configuration: kafka.options.{key} is set by payrecon and cannot be overridden"
            );
        }
        // librdkafka checks every option's name and value here, at start-up, rather than when
        // the first client is created (its error there quotes the value, so a misspelt
        // "sasl.pasword" would print the password).
        crate::kafka::client::check_options(&self.kafka)?;
        Ok(())
    }
}
