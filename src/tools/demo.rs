//! `payrecon demo`: the whole main job on one machine with no setup.
//!
//! Starts an embedded Kafka (librdkafka's mock cluster; its bootstrap address is printed so
//! other clients can connect), the embedded Schema Registry, and uses PostgreSQL from
//! `DATABASE_URL` or the local server (or, if none answers and `initdb`/`pg_ctl` exist, a
//! throwaway cluster in a temporary directory). Then it simulates traffic on all three input
//! topics (payments, settlement lines, the bank's payouts), runs the service, prints progress
//! and a summary checked against the simulator's expected totals and statuses of both
//! reconciliation legs, and exits 0 only when they match.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::kafka::embedded::EmbeddedKafka;
use anyhow::Context;
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::domain::Totals;
use crate::kafka::LoopEvent;
use crate::store::Store;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Payments to simulate (each brings one or two events and settlement lines).
    #[arg(long, default_value_t = 20_000)]
    pub payments: u64,
    /// Malformed records mixed in (they must end in dead_letters).
    #[arg(long, default_value_t = 12)]
    pub malformed: u64,
    /// Partitions per input topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Records per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Keep everything running after the summary (Ctrl-C to stop) to look at metrics/tables.
    #[arg(long)]
    pub keep_running: bool,
    /// Give up if the service has not applied everything within this time.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Database to (re)create on the PostgreSQL server.
    #[arg(long, default_value = "payrecon_demo")]
    pub database: String,
    /// The records' broker timestamps: when they are produced (`now`) or their event time
    /// (`event`: a quiet simulated day is a quiet day of broker time, so sparse and empty
    /// partitions are judged idle as in real traffic). Default: `event` when the shape is
    /// sparse (fewer than 2,000 payments per partition: a simulated day compressed into
    /// seconds of broker time cannot show a quiet partition), `now` otherwise.
    #[arg(long, value_enum)]
    pub broker_time: Option<crate::tools::simulate::BrokerTime>,
    /// Where the service's log goes while the demo prints its progress (default:
    /// payrecon-demo.log in the temporary directory); `PAYRECON_LOG__FILTER` sends it to
    /// the terminal instead.
    #[arg(long)]
    pub log_file: Option<std::path::PathBuf>,
    /// Settlement lines and bank payouts come as files (settlement reports and bank
    /// statements, written by the simulator and imported where they stand in the stream, then
    /// all imported again) instead of records on their topics. Implies
    /// `--settlement-rhythm daily-burst` (a PSP's daily report) and `--broker-time event`
    /// (the importer stamps entries with their event time).
    #[arg(long)]
    pub from_files: bool,
    /// When settlement lines come: with each payment, or one burst per simulated day.
    #[arg(long, value_enum, default_value = "with-payment")]
    pub settlement_rhythm: crate::tools::simulate::SettlementRhythm,
}

/// A PostgreSQL cluster created for the demo; stopped and removed on drop.
struct ThrowawayCluster {
    dir: tempfile::TempDir,
    pg_ctl: std::path::PathBuf,
    port: u16,
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            &self.pg_ctl,
            &[
                "-D",
                &self.dir.path().join("data").to_string_lossy(),
                "-m",
                "fast",
                "stop",
            ],
        );
    }
}

fn as_postgres(program: &std::path::Path, args: &[&str]) -> std::io::Result<std::process::Output> {
    // initdb refuses to run as root: use the postgres account when we are root.
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
    let mut cmd = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        std::process::Command::new(program)
    };
    cmd.args(args).output()
}

fn find_pg_binary(name: &str) -> Option<std::path::PathBuf> {
    let mut candidates: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .collect();
    candidates.sort();
    candidates.reverse();
    candidates.into_iter().find(|p| p.exists()).or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.exists())
        })
    })
}

impl ThrowawayCluster {
    fn start() -> anyhow::Result<Self> {
        let initdb = find_pg_binary("initdb")
            .context("no PostgreSQL answered and initdb is not installed")?;
        let pg_ctl = find_pg_binary("pg_ctl").context("pg_ctl is not installed")?;
        let dir = tempfile::Builder::new().prefix("payrecon-pg-").tempdir()?;
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres", &dir.path().to_string_lossy()])
            .output();
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let out = as_postgres(
            &initdb,
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
            ],
        )?;
        anyhow::ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            dir.path().display()
        );
        // `-l`: the server must not inherit our output pipes, or waiting for pg_ctl never ends.
        let log = dir.path().join("postgres.log");
        let out = as_postgres(
            &pg_ctl,
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        )?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(ThrowawayCluster { dir, pg_ctl, port })
    }
}

/// Finds a PostgreSQL server: `DATABASE_URL`, the local server, or a throwaway cluster.
async fn postgres_admin() -> anyhow::Result<(PgConnectOptions, Option<ThrowawayCluster>)> {
    use sqlx::Connection;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let opts: PgConnectOptions = url.parse().map_err(|e| {
        anyhow::anyhow!(
            "DATABASE_URL ({}) is not a valid PostgreSQL URL: {}",
            crate::redact::redact_url(&url),
            crate::redact::redact_text(&format!("{e}"))
        )
    })?;
    match sqlx::PgConnection::connect_with(&opts).await {
        Ok(c) => {
            let _ = c.close().await;
            Ok((opts, None))
        }
        Err(e) => {
            println!(
                "no PostgreSQL at {} ({e}); starting a throwaway cluster",
                crate::redact::redact_url(&url)
            );
            let cluster = ThrowawayCluster::start()?;
            let opts = PgConnectOptions::new()
                .host("127.0.0.1")
                .port(cluster.port)
                .username("postgres")
                .database("postgres");
            Ok((opts, Some(cluster)))
        }
    }
}

/// Payments per partition below which the demo stamps records with their event time.
const SPARSE_PER_PARTITION: u64 = 2_000;

/// The broker time a demo shape needs to be exact: with few payments per partition, broker
/// time must follow the simulated clock so that a partition's quiet day is visible.
pub fn default_broker_time(payments: u64, partitions: i32) -> crate::tools::simulate::BrokerTime {
    if payments < SPARSE_PER_PARTITION * partitions.max(1) as u64 {
        crate::tools::simulate::BrokerTime::Event
    } else {
        crate::tools::simulate::BrokerTime::Now
    }
}

/// Where the demo's service log goes unless asked otherwise.
pub fn default_log_file() -> std::path::PathBuf {
    std::env::temp_dir().join("payrecon-demo.log")
}

/// Runs the demo; the exit code says whether the summary matched.
pub async fn run(mut settings: Settings, o: DemoOptions) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // Embedded Kafka.
    let cluster = EmbeddedKafka::start()?;
    let bootstrap = cluster.bootstrap_servers();
    // Payments, settlements and (unless configured off) the bank's payouts.
    let inputs = settings.kafka.input_topic_names();
    for topic in &inputs {
        cluster.create_topic(topic, o.partitions)?;
    }
    cluster.create_topic(&settings.exceptions.topic, 1)?;
    println!(
        "embedded Kafka:           {bootstrap}  (topics {}; {} partitions each)",
        inputs.join(", "),
        o.partitions
    );
    // Embedded registry.
    let (registry_url, _registry) = crate::registry::spawn_local(crate::registry::RegistryConfig {
        storage: crate::registry::Storage::Memory,
    })
    .await?;
    println!("embedded schema registry: {registry_url}");
    // PostgreSQL.
    let (admin, _throwaway) = postgres_admin().await?;
    crate::store::recreate_database(&admin, &o.database).await?;
    let url = crate::store::database_url(&admin, &o.database);
    println!(
        "PostgreSQL database:      {}",
        crate::redact::redact_url(&url)
    );
    settings.database.url = SecretString::from(url);
    settings.kafka.bootstrap_servers = bootstrap.clone();
    settings.kafka.group_id = "payrecon-demo".into();
    settings.registry.url = registry_url.clone();
    println!(
        "metrics:                  http://{}/metrics",
        settings.http.listen
    );

    let broker_time = match o.broker_time {
        Some(t) => t,
        None if o.from_files => crate::tools::simulate::BrokerTime::Event,
        None => default_broker_time(o.payments, o.partitions),
    };
    let files_dir = tempfile::Builder::new()
        .prefix("payrecon-demo-files")
        .tempdir()?;
    println!("broker time of records:   {broker_time:?}");
    // The simulation's reference data (merchants, FX rates), loaded before the service
    // starts so its first batch prices with it.
    let sim = crate::tools::simulate::SimulationOptions {
        payments: o.payments,
        malformed: o.malformed,
        rate: o.rate,
        unknown_merchant_share: 0.0,
        broker_time,
        settlement_rhythm: if o.from_files {
            crate::tools::simulate::SettlementRhythm::DailyBurst
        } else {
            o.settlement_rhythm
        },
        files: o.from_files.then(|| files_dir.path().to_path_buf()),
        ..Default::default()
    }
    .with_rules(&settings.reconciliation);
    {
        let store = crate::app::connect_store(
            &settings,
            &CancellationToken::new(),
            crate::app::Patience::Bounded,
        )
        .await?;
        store.migrate().await?;
        let (merchants, rates) = crate::tools::simulate::reference_data(&sim)?;
        store.load_merchants(&merchants, None).await?;
        store.load_rates(&rates, None).await?;
        println!(
            "reference data:           {} merchants, {} FX rate versions",
            merchants.len(),
            rates.len()
        );
        store.pool().close().await;
    }

    // The service.
    let shutdown = CancellationToken::new();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let service = tokio::spawn(crate::app::run(
        settings.clone(),
        shutdown.clone(),
        Some(events_tx),
    ));
    // The simulator.
    let sim_settings = settings.clone();
    let producer = tokio::spawn(async move {
        crate::tools::simulate::command(&sim_settings, &sim, None, false).await
    });

    let mut expected: Option<Totals> = None;
    let mut applied: i64 = 0;
    let mut fenced = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut producer = Some(producer);
    let outcome = loop {
        tokio::select! {
            e = events.recv() => match e {
                Some(LoopEvent::Committed { records, .. }) => applied += records as i64,
                Some(LoopEvent::Fenced) => fenced += 1,
                None => break Err(anyhow::anyhow!("the service stopped unexpectedly")),
            },
            done = async { producer.as_mut().expect("guarded").await }, if producer.is_some() => {
                producer = None;
                expected = Some(done.context("simulator task")??);
            }
            _ = ticker.tick() => {
                println!(
                    "[{:>5.1}s] applied {applied} records{}",
                    started.elapsed().as_secs_f64(),
                    expected.as_ref().map(|e| format!(" of {}", e.records)).unwrap_or_else(|| " (simulator still producing)".into())
                );
                if started.elapsed() > o.timeout {
                    break Err(anyhow::anyhow!("timed out after {:?} with {applied} records applied", o.timeout));
                }
            }
        }
        if let Some(e) = &expected
            && applied >= e.records
        {
            break Ok(e.clone());
        }
    };
    let result = match outcome {
        Ok(expected) => summarize(&settings, &expected, started.elapsed(), fenced).await,
        Err(e) => Err(e),
    };
    if o.keep_running && result.is_ok() {
        println!(
            "still running (Ctrl-C to stop); Kafka at {bootstrap}, registry at {registry_url}"
        );
        crate::app::termination_signal().await;
    }
    shutdown.cancel();
    let _ = service.await;
    drop(cluster);
    result
}

async fn summarize(
    settings: &Settings,
    expected: &Totals,
    elapsed: Duration,
    fenced: u32,
) -> anyhow::Result<ExitCode> {
    let store = crate::app::connect_store(
        settings,
        &CancellationToken::new(),
        crate::app::Patience::Bounded,
    )
    .await?;
    let result = summarize_with(&store, settings, expected, elapsed, fenced).await;
    // Closed, not dropped at exit: the server logs a dropped session as a connection reset.
    store.pool().close().await;
    result
}

async fn summarize_with(
    store: &Store,
    settings: &Settings,
    expected: &Totals,
    elapsed: Duration,
    fenced: u32,
) -> anyhow::Result<ExitCode> {
    // Everything is consumed; wait for the last due items to be judged and the last
    // exceptions to be published.
    // Due as the service judges it: idle partitions (from the broker's log ends) do not hold
    // the watermark back, so deadlines on a topic with empty partitions pass too.
    let waited = Instant::now();
    let watermark = loop {
        let wm = crate::tools::report::judged_watermark(settings, store).await?;
        let backlog = store.reconciliation_backlog_at(wm.watermark).await?;
        if backlog.due == 0 && backlog.unpublished == 0 {
            break wm;
        }
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(60),
            "reconciliation did not catch up within 60 s: {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let running = store.running_totals(&settings.kafka.group_id).await?;
    let recomputed = store.recomputed_totals(&settings.kafka.group_id).await?;
    println!();
    println!("== summary after {:.1}s ==", elapsed.as_secs_f64());
    let mut standings = std::collections::BTreeMap::<&str, usize>::new();
    for p in &watermark.partitions {
        *standings.entry(p.standing.as_str()).or_default() += 1;
    }
    let standings: Vec<String> = standings.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!(
        "watermark:          {} (input partitions: {})",
        watermark.watermark.to_rfc3339(),
        standings.join(", ")
    );
    println!(
        "records read:       {} (expected {})",
        running.records, expected.records
    );
    println!(
        "payment events:     {} (expected {})",
        running.payment_events, expected.payment_events
    );
    println!(
        "settlement lines:   {} (expected {})",
        running.settlement_lines, expected.settlement_lines
    );
    println!(
        "statement lines:    {} (expected {})",
        running.statement_lines, expected.statement_lines
    );
    println!(
        "dead letters:       {} (expected {})",
        running.dead_letters, expected.dead_letters
    );
    println!("stale batches fenced: {fenced}");
    println!();
    println!(
        "{:<28} {:>8} {:>18}   {:>8} {:>18}",
        "merchant/currency/kind", "count", "sum", "expected", "expected sum"
    );
    for (key, e) in expected.payments.iter().take(12) {
        let a = running.payments.get(key).cloned().unwrap_or_default();
        println!(
            "{key:<28} {:>8} {:>18}   {:>8} {:>18}",
            a.count, a.sum, e.count, e.sum
        );
    }
    if expected.payments.len() > 12 {
        println!(
            "... and {} more (all compared)",
            expected.payments.len() - 12
        );
    }
    println!();
    println!(
        "{:<24} {:>8} {:>9}",
        "reconciliation status", "found", "expected"
    );
    let statuses: std::collections::BTreeSet<&String> = expected
        .statuses
        .keys()
        .chain(running.statuses.keys())
        .collect();
    for status in statuses {
        println!(
            "{status:<24} {:>8} {:>9}",
            running.statuses.get(status).copied().unwrap_or(0),
            expected.statuses.get(status).copied().unwrap_or(0)
        );
    }
    // The payout leg: settlement batches against the bank's statement lines.
    println!();
    println!("{:<24} {:>8} {:>9}", "payout status", "found", "expected");
    let payout_statuses: std::collections::BTreeSet<&String> = expected
        .payout_statuses
        .keys()
        .chain(running.payout_statuses.keys())
        .collect();
    for status in payout_statuses {
        println!(
            "{status:<24} {:>8} {:>9}",
            running.payout_statuses.get(status).copied().unwrap_or(0),
            expected.payout_statuses.get(status).copied().unwrap_or(0)
        );
    }
    let mut differences = expected.differences(&running);
    // The exceptions topic holds every outbox row exactly once.
    let outbox = store.outbox_seqs().await?;
    let mut on_topic = crate::outbox::topic_seqs(settings).await?;
    let published = on_topic.len();
    on_topic.sort_unstable();
    on_topic.dedup();
    println!(
        "exceptions topic:   {published} messages for {} outbox rows ({} distinct seqs)",
        outbox.len(),
        on_topic.len()
    );
    if published != on_topic.len() {
        differences.push(format!(
            "exceptions topic: {} duplicate messages",
            published - on_topic.len()
        ));
    }
    if on_topic != outbox {
        differences.push(format!(
            "exceptions topic: {} outbox rows, {} distinct seqs published",
            outbox.len(),
            on_topic.len()
        ));
    }
    let daily = store.daily_totals_differences().await?;
    differences.extend(
        daily
            .into_iter()
            .map(|d| format!("merchant_daily_totals vs rows: {d}")),
    );
    differences.extend(
        running
            .differences(&Totals {
                dead_letters: running.dead_letters,
                records: running.records,
                ..recomputed
            })
            .into_iter()
            .map(|d| format!("running totals vs rows: {d}")),
    );
    println!();
    if differences.is_empty() {
        println!(
            "RESULT: MATCH: every expected event, line, statement line, total, dead letter, reconciliation and payout status is in PostgreSQL exactly once; every exception is on the topic exactly once"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("RESULT: MISMATCH ({} differences)", differences.len());
        for d in differences.iter().take(50) {
            println!("  {d}");
        }
        Ok(ExitCode::from(2))
    }
}
