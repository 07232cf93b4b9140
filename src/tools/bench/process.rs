//! The service-process stage: `payrecon run` started as a process of its own on a backlog in
//! the embedded broker, watched from outside as an operator would: records/s from the
//! offsets it stores, and its peak resident memory (`VmHWM` of `/proc/<pid>/status`), the
//! figure a container's memory limit meets. The other stages run the service inside the bench
//! process, whose memory also holds the embedded broker's log and the generated records.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::kafka::embedded::EmbeddedKafka;
use anyhow::Context;
use secrecy::ExposeSecret;
use sqlx::postgres::PgConnectOptions;

use super::Stage;
use super::cpu;
use crate::config::Settings;
use crate::tools::simulate::{Generated, SimulationOptions};

/// What the stage measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProcessRun {
    pub records_per_sec: f64,
    /// The process's peak resident set over the whole run (start-up, group join, backlog).
    pub peak_rss_mib: f64,
    /// Its resident set once the backlog was applied, and the part of it that is heap and
    /// other anonymous memory (the rest is the executable's and libraries' pages).
    pub rss_after_mib: f64,
    pub anon_after_mib: f64,
    /// Its resident set idle: 4 s after it started on the empty topics, before the backlog.
    /// 0 for the ingestion-only run, which skips the idle phase.
    pub idle_rss_mib: f64,
    /// CPU per record over the measured window, the service's and the PostgreSQL server's
    /// (`None` without `/proc`).
    pub cpu: Option<cpu::PerRecord>,
}

/// A kB field of a child's `/proc/<pid>/status`, in MiB; 0 where /proc is unavailable.
fn status_mib(pid: u32, field: &str) -> f64 {
    super::proc_status_mib(&pid.to_string(), field).unwrap_or(0.0)
}

/// Produces `records` into topics of its own, runs `payrecon run` (this executable, with
/// `config` and the bench's environment, pointed at the stage's broker, registry and
/// database) until every record is committed, then stops it with SIGTERM. With `reconcile`
/// false the service runs with `reconciliation.enabled = false` (the ingestion path alone)
/// and the idle phase is skipped.
#[allow(clippy::too_many_arguments)]
pub async fn run_with(
    mut settings: Settings,
    config: Option<&Path>,
    admin: &PgConnectOptions,
    cluster: &EmbeddedKafka,
    sim: &SimulationOptions,
    records: &[Generated],
    partitions: i32,
    reconcile: bool,
) -> anyhow::Result<ProcessRun> {
    let stage = if reconcile {
        Stage {
            tag: "process",
            group: "bench-process",
            topics: ("bench.process.payments", "bench.process.settlements"),
            refuse_psp: false,
        }
    } else {
        Stage {
            tag: "process-ingest",
            group: "bench-process-ingest",
            topics: (
                "bench.process-ingest.payments",
                "bench.process-ingest.settlements",
            ),
            refuse_psp: false,
        }
    };
    settings.reconciliation.enabled = reconcile;
    let (db, encoder) = stage
        .prepare(&mut settings, admin, cluster, sim, partitions)
        .await?;
    let (payments_topic, settlements_topic) = stage.topics;
    // Idle first, on the empty topics: what the process holds before any record arrives.
    let idle_rss_mib = if reconcile {
        let mut idle = Service::start(&settings, config)?;
        tokio::time::sleep(Duration::from_secs(4)).await;
        idle.alive()?;
        let rss = status_mib(idle.pid, "VmRSS:");
        idle.stop().await?;
        rss
    } else {
        0.0
    };
    let _producer = stage.produce(&settings, &encoder, records).await?;
    let mut service = Service::start(&settings, config)?;
    let watch = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&crate::store::database_url(admin, &db))
        .await?;
    let backend = crate::store::bench::backend_pid(&watch).await?;
    let server = cpu::Server::of_backend(backend);
    let total = records.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first: Option<(Instant, i64, cpu::Mark)> = None;
    let (rate, applied_in_window, mark) = loop {
        service.alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the service-process stage timed out"
        );
        let applied = crate::store::bench::applied_records(
            &watch,
            stage.group,
            &[payments_topic, settlements_topic],
        )
        .await?;
        let now = Instant::now();
        match first {
            None if applied > 0 => first = Some((now, applied, cpu::mark(service.pid, server))),
            Some((t0, n0, mark)) if applied >= total => {
                anyhow::ensure!(
                    applied > n0,
                    "the backlog was applied before it could be measured (use more --payments)"
                );
                break (
                    (applied - n0) as f64 / (now - t0).as_secs_f64(),
                    applied - n0,
                    mark,
                );
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = mark.per_record(service.pid, server, applied_in_window);
    let rss_after_mib = status_mib(service.pid, "VmRSS:");
    let peak_rss_mib = status_mib(service.pid, "VmHWM:");
    let anon_after_mib = status_mib(service.pid, "RssAnon:");
    service.stop().await?;
    watch.close().await;
    let _ = crate::store::drop_database(admin, &db).await;
    Ok(ProcessRun {
        records_per_sec: rate,
        peak_rss_mib,
        rss_after_mib,
        anon_after_mib,
        idle_rss_mib,
        cpu,
    })
}

/// `payrecon run` as a child process, its output kept in a file for the error message.
struct Service {
    child: tokio::process::Child,
    pid: u32,
    log: tempfile::NamedTempFile,
}

impl Service {
    /// This executable's `payrecon run` with `config` and the bench's environment, pointed
    /// at `settings`' broker, registry, topics, group and database.
    fn start(settings: &Settings, config: Option<&Path>) -> anyhow::Result<Self> {
        let log = tempfile::NamedTempFile::new()?;
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        let k = &settings.kafka;
        command
            .arg("run")
            .env(
                "PAYRECON_DATABASE__URL",
                settings.database.url.expose_secret(),
            )
            .env_remove("PAYRECON_DATABASE__URL_FILE")
            .env("PAYRECON_KAFKA__BOOTSTRAP_SERVERS", &k.bootstrap_servers)
            .env("PAYRECON_KAFKA__GROUP_ID", &k.group_id)
            .env("PAYRECON_KAFKA__PAYMENTS_TOPIC", &k.payments_topic)
            .env("PAYRECON_KAFKA__SETTLEMENTS_TOPIC", &k.settlements_topic)
            .env("PAYRECON_KAFKA__PAYOUTS_TOPIC", &k.payouts_topic)
            .env(
                "PAYRECON_RECONCILIATION__ENABLED",
                settings.reconciliation.enabled.to_string(),
            )
            .env("PAYRECON_REGISTRY__URL", &settings.registry.url)
            .env("PAYRECON_HTTP__LISTEN", "127.0.0.1:0")
            .env("PAYRECON_LOG__FILTER", "warn")
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .kill_on_drop(true);
        let child = command.spawn().context("starting `payrecon run`")?;
        let pid = child.id().context("the service process has no pid")?;
        Ok(Self { child, pid, log })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// An error with the process's output if it has exited.
    fn alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => anyhow::bail!(
                "`payrecon run` exited ({status}) during the service-process stage:\n{}",
                self.output()
            ),
            None => Ok(()),
        }
    }

    /// SIGTERM, then a clean exit within 30 s.
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => anyhow::ensure!(
                status?.success(),
                "`payrecon run` did not stop cleanly on SIGTERM:\n{}",
                self.output()
            ),
            Err(_) => anyhow::bail!("`payrecon run` did not stop within 30 s of SIGTERM"),
        }
        Ok(())
    }
}
