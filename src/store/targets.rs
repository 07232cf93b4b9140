//! Connection targeting: which PostgreSQL server payrecon writes to when `database.url` lists
//! several, as libpq does (`postgres://u@h1:5432,h2:5433/db?target_session_attrs=read-write`).
//! sqlx connects to one host only, so this module parses the list, tries the servers in
//! order, keeps the first that accepts writes (`pg_is_in_recovery()` false and
//! `transaction_read_only` off) and, while the service runs, watches it: when it dies or turns
//! read-only, the next writable server is found and the pool is pointed at it
//! ([`sqlx::Pool::set_connect_options`]); connections opened before the switch are discarded
//! when next acquired.
//!
//! It does not decide *when* a standby becomes the primary (the operator's HA tooling
//! promotes it), and it never makes a write succeed twice: a batch in flight at the switch
//! fails (transient error) and is retried on the new server, where the offset compare-and-set
//! decides. After a switch the consumer re-reads its stored offsets from the new server
//! ([`Store::database_switches`]): whatever the new server holds is the truth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::{Store, describe, refused_connection};

/// How often the watcher asks the current server whether it is still a writable primary.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// One `host:port` of the list (never credentials: safe to log and to show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The servers of `database.url` and what kind of session it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    pub servers: Vec<Server>,
    /// `target_session_attrs=read-write` (or `primary`): only a writable server will do.
    pub read_write: bool,
}

impl Targets {
    /// Whether the URL asks for more than sqlx does by itself (several servers or a
    /// read-write check): then [`connect`] finds the server and the service watches it.
    pub fn managed(&self) -> bool {
        self.servers.len() > 1 || self.read_write
    }
}

/// Splits a libpq-style URL into the URL of its first server (which sqlx can parse: the rest
/// of the URL unchanged, `target_session_attrs` removed) and the [`Targets`]. A URL with one
/// host and no `target_session_attrs` comes back unchanged. Errors never quote the URL.
pub fn split_url(raw: &str) -> Result<(String, Targets), String> {
    let Some(scheme_end) = raw.find("://") else {
        return Err("no scheme (postgres://...)".into());
    };
    let after = scheme_end + 3;
    let authority_end = raw[after..]
        .find(['/', '?', '#'])
        .map_or(raw.len(), |i| after + i);
    let authority = &raw[after..authority_end];
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let mut servers = Vec::new();
    for entry in hosts.split(',') {
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let close = rest.find(']').ok_or("an IPv6 host without its ']'")?;
            let port = rest[close + 1..].strip_prefix(':');
            (&rest[..close], port)
        } else {
            match entry.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (entry, None),
            }
        };
        let port = match port {
            None | Some("") => 5432,
            Some(p) => p.parse().map_err(|_| "a port that is not a number")?,
        };
        if host.is_empty() && hosts.contains(',') {
            return Err("an empty host in the host list".into());
        }
        servers.push(Server {
            host: host.to_owned(),
            port,
        });
    }
    // target_session_attrs is libpq's; sqlx would not know it.
    let mut read_write = false;
    let mut rest = raw[authority_end..].to_owned();
    if let Some(q) = rest.find('?') {
        let (path, query) = rest.split_at(q);
        let mut kept = Vec::new();
        for pair in query[1..].split('&') {
            match pair.split_once('=') {
                Some(("target_session_attrs", value)) => match value {
                    "read-write" | "primary" => read_write = true,
                    "any" => {}
                    _ => {
                        return Err(format!(
                            "target_session_attrs={value} is not supported (read-write, primary or any)"
                        ));
                    }
                },
                _ => kept.push(pair),
            }
        }
        rest = if kept.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{}", kept.join("&"))
        };
    }
    let first = hosts.split(',').next().unwrap_or_default();
    let url = format!("{}{userinfo}{first}{rest}", &raw[..after]);
    Ok((
        url,
        Targets {
            servers,
            read_write,
        },
    ))
}

/// The server payrecon writes to, and its switches (readiness, metrics, the consumer).
pub struct Primary {
    targets: Targets,
    /// Options of the first server; a server's are these with its host and port.
    base: PgConnectOptions,
    /// Bounds each connection attempt while looking for the primary.
    connect_timeout: Duration,
    /// Index into `targets.servers` of the current server.
    current: Mutex<usize>,
    /// Counted switches; the consumer resyncs when it sees this change.
    switches: AtomicU64,
    /// When the pool last moved to another server (connections older than this are stale).
    switched: Mutex<Option<(Instant, DateTime<Utc>)>>,
}

/// What readiness shows about the server.
#[derive(Debug, Clone)]
pub struct ServerStatus {
    pub server: String,
    pub switches: u64,
    pub last_switch: Option<DateTime<Utc>>,
}

impl Primary {
    fn new(targets: Targets, base: PgConnectOptions, connect_timeout: Duration) -> Self {
        Primary {
            targets,
            base,
            connect_timeout,
            current: Mutex::new(0),
            switches: AtomicU64::new(0),
            switched: Mutex::new(None),
        }
    }

    fn options_for(&self, i: usize) -> PgConnectOptions {
        let s = &self.targets.servers[i];
        self.base.clone().host(&s.host).port(s.port)
    }

    fn current(&self) -> usize {
        *self.current.lock().expect("primary lock")
    }

    /// The server payrecon is connected to and when it last switched.
    pub fn status(&self) -> ServerStatus {
        ServerStatus {
            server: self.targets.servers[self.current()].to_string(),
            switches: self.switches.load(Ordering::SeqCst),
            last_switch: self.switched.lock().expect("primary lock").map(|s| s.1),
        }
    }

    /// Whether a connection of this age was opened before the last switch.
    fn stale(&self, age: Duration) -> bool {
        self.switched
            .lock()
            .expect("primary lock")
            .is_some_and(|(at, _)| age >= at.elapsed())
    }

    /// Tries the servers in order, starting with the current one; returns the first that
    /// accepts writes (any that connects without `read_write`) with an open connection to it.
    /// All failed: a refusal retrying cannot fix if one server gave it, else the last error,
    /// and a summary naming each server's answer.
    async fn find(&self) -> Result<(usize, PgConnection), (sqlx::Error, String)> {
        let n = self.targets.servers.len();
        let start = self.current();
        let mut answers = Vec::new();
        let mut refusal = None;
        let mut last = None;
        for i in (0..n).map(|k| (start + k) % n) {
            let server = &self.targets.servers[i];
            let attempt = tokio::time::timeout(
                self.connect_timeout,
                PgConnection::connect_with(&self.options_for(i)),
            )
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut));
            let mut conn = match attempt {
                Ok(c) => c,
                Err(e) => {
                    answers.push(format!("{server}: {}", describe(&e)));
                    if refused_connection(&e).is_some() {
                        refusal = Some(e);
                    } else {
                        last = Some(e);
                    }
                    continue;
                }
            };
            if !self.targets.read_write {
                return Ok((i, conn));
            }
            match writable(&mut conn).await {
                Ok(true) => return Ok((i, conn)),
                Ok(false) => answers.push(format!("{server}: read-only (a standby)")),
                Err(e) => {
                    answers.push(format!("{server}: {}", describe(&e)));
                    last = Some(e);
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
        }
        let summary = format!("no writable server among {}", answers.join("; "));
        let error = refusal.or(last).unwrap_or_else(|| {
            sqlx::Error::Io(std::io::Error::other(
                "every server is read-only (no primary yet)",
            ))
        });
        Err((error, summary))
    }

    /// Points the pool at server `to` (see the module doc) and tells everyone.
    fn switch(&self, pool: &PgPool, to: usize, lost_for: Option<Duration>) {
        let from = std::mem::replace(&mut *self.current.lock().expect("primary lock"), to);
        pool.set_connect_options(self.options_for(to));
        *self.switched.lock().expect("primary lock") = Some((Instant::now(), Utc::now()));
        self.switches.fetch_add(1, Ordering::SeqCst);
        let (from, to) = (&self.targets.servers[from], &self.targets.servers[to]);
        crate::metrics::database_switched(&from.to_string(), &to.to_string(), lost_for);
        tracing::warn!(%from, %to, seconds_without_primary = lost_for.map(|d| d.as_secs_f64()), "switched to another PostgreSQL server: it is the writable primary now; re-reading the stored offsets from it");
    }
}

/// Whether the session's server accepts writes.
async fn writable(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    let (recovery, read_only): (bool, String) =
        sqlx::query_as("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")
            .fetch_one(conn)
            .await?;
    Ok(!recovery && read_only == "off")
}

/// Connects the pool for `database` (see [`connect`]) with the options `options` (the first
/// server's, from `DatabaseSettings::connect_options`).
pub async fn connect(
    database: &crate::config::DatabaseSettings,
    options: PgConnectOptions,
) -> Result<Store, sqlx::Error> {
    let targets = database
        .targets()
        .map_err(|e| sqlx::Error::Configuration(format!("database.url: {e}").into()))?;
    if !targets.managed() {
        let pool = database.pool_options().connect_with(options).await?;
        crate::metrics::database_server(&targets.servers[0].to_string());
        return Ok(Store::new(pool));
    }
    let primary = Arc::new(Primary::new(targets, options, database.connect_timeout));
    let (i, conn) = primary.find().await.map_err(|(e, summary)| {
        tracing::debug!(%summary, "looking for the primary");
        e
    })?;
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    *primary.current.lock().expect("primary lock") = i;
    let pool = pool_options(database.pool_options(), &primary)
        .connect_with(primary.options_for(i))
        .await?;
    crate::metrics::database_server(&primary.targets.servers[i].to_string());
    tracing::info!(server = %primary.targets.servers[i], "connected to the writable PostgreSQL server");
    Ok(Store {
        pool,
        primary: Some(primary),
    })
}

/// A session to the current writable server (the relay's own session, which holds its lock).
pub async fn connect_session(
    database: &crate::config::DatabaseSettings,
) -> anyhow::Result<PgConnection> {
    let options = database.connect_options()?;
    let targets = database.targets()?;
    if !targets.managed() {
        return Ok(PgConnection::connect_with(&options).await?);
    }
    let primary = Primary::new(targets, options, database.connect_timeout);
    let (_, conn) = primary
        .find()
        .await
        .map_err(|(_, summary)| anyhow::anyhow!("{summary}"))?;
    Ok(conn)
}

/// The pool's hooks: a new connection must reach a writable server; a connection opened
/// before the last switch is closed instead of handed out.
fn pool_options(options: PgPoolOptions, primary: &Arc<Primary>) -> PgPoolOptions {
    let (p1, p2) = (primary.clone(), primary.clone());
    options
        .after_connect(move |conn, _| {
            let read_write = p1.targets.read_write;
            Box::pin(async move {
                if read_write && !writable(conn).await? {
                    return Err(sqlx::Error::Io(std::io::Error::other(
                        "the server is read-only (a standby): not the primary",
                    )));
                }
                Ok(())
            })
        })
        .before_acquire(move |_, meta| {
            let fresh = !p2.stale(meta.age);
            Box::pin(async move { Ok(fresh) })
        })
}

impl Store {
    /// The watched primary, when `database.url` lists several servers or asks for read-write.
    pub fn primary(&self) -> Option<&Arc<Primary>> {
        self.primary.as_ref()
    }

    /// How many times the pool moved to another server (0 with a single server).
    pub fn database_switches(&self) -> u64 {
        self.primary
            .as_ref()
            .map_or(0, |p| p.switches.load(Ordering::SeqCst))
    }
}

/// Watches the current server until `stop`: every [`CHECK_INTERVAL`] it asks, on a session of
/// its own, whether the server is still a writable primary; when it is not (dead, read-only),
/// it looks for the one that is, as often as that interval allows, and switches the pool.
pub async fn watch(store: Store, stop: CancellationToken) {
    let Some(primary) = store.primary().cloned() else {
        return;
    };
    let mut probe: Option<PgConnection> = None;
    // When the current server was found gone (the failover's clock).
    let mut lost: Option<Instant> = None;
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Some(conn) = probe.as_mut() {
            let answer = tokio::time::timeout(primary.connect_timeout, writable(conn)).await;
            match answer {
                Ok(Ok(true)) => continue,
                other => {
                    let why = match other {
                        Ok(Ok(_)) => "it is read-only now".to_owned(),
                        Ok(Err(e)) => describe(&e),
                        Err(_) => "no answer".to_owned(),
                    };
                    let server = &primary.targets.servers[primary.current()];
                    tracing::warn!(%server, error = %why, "lost the writable PostgreSQL server; looking for the primary");
                    lost.get_or_insert_with(Instant::now);
                    probe = None;
                }
            }
        }
        match primary.find().await {
            Ok((i, conn)) => {
                if i != primary.current() {
                    primary.switch(store.pool(), i, lost.map(|l| l.elapsed()));
                } else if lost.is_some() {
                    tracing::info!(server = %primary.targets.servers[i], "the same PostgreSQL server is writable again");
                }
                lost = None;
                probe = Some(conn);
            }
            Err((_, summary)) => {
                lost.get_or_insert_with(Instant::now);
                tracing::warn!(%summary, "no writable PostgreSQL server yet; asking again");
            }
        }
    }
    if let Some(conn) = probe {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_list_is_split_and_the_first_host_left_for_sqlx() {
        let (url, t) = split_url(
            "postgres://u:p%40w@h1:5432,h2:5433,[::1]:5434/db?sslmode=disable&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(url, "postgres://u:p%40w@h1:5432/db?sslmode=disable");
        assert!(t.read_write);
        let shown: Vec<String> = t.servers.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["h1:5432", "h2:5433", "[::1]:5434"]);
        assert!(t.managed());
    }

    #[test]
    fn a_single_host_url_comes_back_unchanged() {
        let raw = "postgres://postgres@127.0.0.1:5432/payrecon?host=/run/postgresql";
        let (url, t) = split_url(raw).unwrap();
        assert_eq!(url, raw);
        assert!(!t.managed());
        let (url, t) = split_url("postgres://db/x?target_session_attrs=primary").unwrap();
        assert_eq!(url, "postgres://db/x");
        assert_eq!(
            t.servers,
            [Server {
                host: "db".into(),
                port: 5432
            }]
        );
        assert!(t.managed());
    }

    #[test]
    fn errors_do_not_quote_the_url() {
        let e = split_url("postgres://u:secret@h1:x,h2/db").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(split_url("postgres://h1,h2/db?target_session_attrs=standby").is_err());
    }
}
