//! `[database]`: the PostgreSQL connection and the session settings every connection starts
//! with.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::redact::{redact_text, redact_url};

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
