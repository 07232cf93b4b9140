//! Throwaway PostgreSQL 15 clusters for the failover drills: `initdb`, `pg_ctl`,
//! `pg_basebackup` from `/usr/lib/postgresql/15/bin`, run as the `postgres` OS user (the
//! tests run as root, which PostgreSQL refuses), each in a temporary directory on a free
//! port. Dropping a cluster stops it (immediate mode) and removes its directory, also when
//! the test panics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

const BIN: &str = "/usr/lib/postgresql/15/bin";

/// Whether this process runs as root (the owner of `/proc/self` is its effective user).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A command run as the `postgres` user when the tests run as root (PostgreSQL refuses to
/// run as root), as the current user otherwise.
fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs a PostgreSQL program (see [`as_postgres`]); panics with its output when it fails.
fn pg(program: &str, args: &[&str]) -> String {
    let out = as_postgres(Path::new(BIN).join(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

/// A directory owned by `postgres`, removed on drop.
pub struct PgDir(tempfile::TempDir);

impl PgDir {
    pub fn new(prefix: &str) -> PgDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("payrecon-{prefix}-"))
            .tempdir()
            .unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        PgDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// `path/name` as a string.
    pub fn join(&self, name: &str) -> String {
        self.path().join(name).display().to_string()
    }
}

/// One cluster (data directory, port, log), stopped and removed on drop.
pub struct PgCluster {
    pub name: String,
    pub port: u16,
    dir: PgDir,
    /// Set once the cluster has been killed: nothing to stop.
    killed: bool,
}

/// How a new primary is configured.
#[derive(Default, Clone)]
pub struct PrimaryOptions {
    /// A directory that `archive_command` copies every finished WAL segment to.
    pub archive: Option<String>,
}

impl PgCluster {
    fn data(&self) -> String {
        self.dir.join("data")
    }

    fn log(&self) -> String {
        self.dir.join("server.log")
    }

    /// The server log (test failure output).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn configure(&self, lines: &[String]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(Path::new(&self.data()).join("postgresql.conf"))
            .unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
    }

    fn common_settings(&self) -> Vec<String> {
        vec![
            format!("port = {}", self.port),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{}'", self.dir.path().display()),
            "max_connections = 60".into(),
            "shared_buffers = 32MB".into(),
            // The drills kill processes, not the machine: the page cache survives.
            "fsync = off".into(),
            "full_page_writes = on".into(),
            "wal_level = replica".into(),
            "max_wal_senders = 5".into(),
            "wal_keep_size = 256MB".into(),
            "hot_standby = on".into(),
            format!("cluster_name = '{}'", self.name),
            "log_line_prefix = '%m [%p] '".into(),
        ]
    }

    /// A new primary cluster, started.
    pub fn primary(name: &str, options: &PrimaryOptions) -> PgCluster {
        let c = PgCluster {
            name: name.into(),
            port: crate::helpers::free_port(),
            dir: PgDir::new(name),
            killed: false,
        };
        pg(
            "initdb",
            &[
                "-D",
                &c.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let mut settings = c.common_settings();
        if let Some(archive) = &options.archive {
            settings.push("archive_mode = on".into());
            settings.push(format!(
                "archive_command = 'test ! -f {archive}/%f && cp %p {archive}/%f'"
            ));
            settings.push("archive_timeout = 0".into());
        }
        c.configure(&settings);
        c.start();
        c
    }

    /// A streaming replica of `primary` (pg_basebackup -R), started and streaming;
    /// `synchronous` makes the primary wait for it at every commit.
    pub async fn replica(name: &str, primary: &PgCluster, synchronous: bool) -> PgCluster {
        let c = PgCluster {
            name: name.into(),
            port: crate::helpers::free_port(),
            dir: PgDir::new(name),
            killed: false,
        };
        pg(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &c.data(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ],
        );
        let mut settings = c.common_settings();
        settings.push(format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={name}'",
            primary.port
        ));
        // The copied archive settings would make the standby archive into the primary's
        // archive after its promotion; the drills archive from one primary only.
        settings.push("archive_mode = off".into());
        c.configure(&settings);
        c.start();
        if synchronous {
            primary
                .execute(&format!(
                    "ALTER SYSTEM SET synchronous_standby_names = '{name}'"
                ))
                .await;
            primary.execute("SELECT pg_reload_conf()").await;
        }
        let wanted = if synchronous { "sync" } else { "async" };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state: Option<String> = primary
                .query_scalar(&format!(
                    "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}' AND state = 'streaming'"
                ))
                .await;
            if state.as_deref() == Some(wanted) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica {name} not streaming ({state:?}, wanted {wanted}):\n{}",
                c.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c
    }

    /// A cluster restored from `backup` (a pg_basebackup copy) and the WAL `archive`, up to
    /// the named restore point `target`, then promoted; started and writable.
    pub async fn restore(name: &str, backup: &Path, archive: &str, target: &str) -> PgCluster {
        let c = PgCluster {
            name: name.into(),
            port: crate::helpers::free_port(),
            dir: PgDir::new(name),
            killed: false,
        };
        let status = as_postgres("cp")
            .arg("-a")
            .arg(backup)
            .arg(c.data())
            .status()
            .unwrap();
        assert!(status.success());
        let mut settings = c.common_settings();
        settings.push("archive_mode = off".into());
        settings.push(format!("restore_command = 'cp {archive}/%f %p'"));
        settings.push(format!("recovery_target_name = '{target}'"));
        settings.push("recovery_target_action = 'promote'".into());
        c.configure(&settings);
        let signal = Path::new(&c.data()).join("recovery.signal");
        assert!(
            as_postgres("touch")
                .arg(&signal)
                .status()
                .unwrap()
                .success()
        );
        c.start();
        c.wait_writable().await;
        c
    }

    pub fn start(&self) {
        pg(
            "pg_ctl",
            &[
                "start",
                "-D",
                &self.data(),
                "-l",
                &self.log(),
                "-w",
                "-t",
                "60",
            ],
        );
    }

    /// SIGKILL of the postmaster (its backends notice and exit on their own).
    pub fn kill_postmaster(&mut self) {
        let pid = self.postmaster_pid().expect("postmaster.pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.killed = true;
    }

    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(Path::new(&self.data()).join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Cuts a standby off its primary: `primary_conninfo` points at a closed port, so its WAL
    /// receiver stops and every later commit of the primary misses it. Waits until no WAL
    /// receiver streams.
    pub async fn detach_from_primary(&self) {
        self.execute("ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1 user=postgres'")
            .await;
        self.execute("SELECT pg_reload_conf()").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .query_scalar::<i64>(
                "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
            )
            .await
            != Some(0)
        {
            assert!(Instant::now() < deadline, "{} still streams", self.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `pg_ctl promote`, waiting until the server accepts writes.
    pub async fn promote(&self) {
        pg("pg_ctl", &["promote", "-D", &self.data(), "-w", "-t", "60"]);
        self.wait_writable().await;
    }

    async fn wait_writable(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let recovery: Option<bool> = self.query_scalar("SELECT pg_is_in_recovery()").await;
            if recovery == Some(false) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not writable:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A base backup of this (running) cluster into a new directory.
    pub fn base_backup(&self, into: &PgDir) -> PathBuf {
        let target = into.path().join("base");
        pg(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &target.display().to_string(),
                "-X",
                "fetch",
                "-c",
                "fast",
            ],
        );
        target
    }

    pub fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database(database)
    }

    /// `postgres://postgres@127.0.0.1:PORT/database`
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn pool(&self, database: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(4)
            .connect_with(self.options(database))
            .await
            .unwrap()
    }

    /// Runs `sql` on database `postgres`.
    pub async fn execute(&self, sql: &str) {
        let mut conn = PgConnection::connect_with(&self.options("postgres"))
            .await
            .unwrap();
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
        let _ = conn.close().await;
    }

    /// The first column of the first row of `sql` on database `postgres`; `None` when the
    /// server does not answer or returns no row.
    pub async fn query_scalar<T>(&self, sql: &str) -> Option<T>
    where
        T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
    {
        let mut conn = PgConnection::connect_with(&self.options("postgres"))
            .await
            .ok()?;
        let v = sqlx::query_scalar::<_, T>(sql)
            .fetch_optional(&mut conn)
            .await
            .ok()
            .flatten();
        let _ = conn.close().await;
        v
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.killed {
            let _ = as_postgres(Path::new(BIN).join("pg_ctl"))
                .args([
                    "stop",
                    "-D",
                    &self.data(),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                ])
                .output();
        }
        // A killed postmaster's backends notice its death and exit by themselves.
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            eprintln!(
                "---- last {} log lines of PostgreSQL cluster {} ----\n{}",
                tail.len(),
                self.name,
                tail.join("\n")
            );
        }
    }
}
