//! `payrecon bench`: the figures behind docs/performance.md, measured in one run so
//! they can be compared as ratios on a shared, noisy machine.
//!
//! 1. Store-only ceiling: pre-decoded batches through [`crate::engine::commit_batch`] (no Kafka,
//!    no decoding), `pipeline.commit_lanes` lanes committing concurrently as the service's
//!    do: the most the database path can take; with PostgreSQL's row writes per record
//!    (`pg_stat_user_tables`, HOT updates) and, when `pg_stat_statements` is preloaded, the
//!    statements that took the time.
//! 2. End-to-end: a backlog produced into the embedded Kafka, then consumed by the real
//!    service loop (decode + validate + batch transaction); records/s from first to last
//!    commit.
//! 3. Latency: a fixed offered rate (default 5,000 records/s) while the service runs;
//!    broker timestamp to commit, p50/p99.
//! 4. Replay: `payrecon replay` of everything that service applied (backlog + latency run)
//!    into a shadow schema and the comparison, records/s next to the end-to-end figure.
//! 5. Hostile: the end-to-end run again on the same backlog with one hostile record after
//!    every `--hostile-every` (default 10,000), each class in turn, one of them refused only
//!    by PostgreSQL; records/s and the ratio to the clean end-to-end figure.
//! 6. Ingestion only: the end-to-end run again with `reconciliation.enabled = false`
//!    (`--ingestion false` skips it).
//! 7. Scale-out: the backlog consumed by 1, 2 and 3 instances of one group on the same
//!    PostgreSQL (`--instances`), the group formed on the empty topics before the backlog is
//!    produced: total records/s, each instance's records and the row-lock waits seen in
//!    `pg_locks`.
//! 8. Service process: `payrecon run` as a process of its own on the backlog: records/s,
//!    its peak resident memory, and the CPU a record costs it and the PostgreSQL server
//!    (`/proc`; with the cores, the most records/s the machine could give at that cost);
//!    then again with `reconciliation.enabled = false` unless `--ingestion false`
//!    (`--process false` skips both). The peak RSS of the bench process itself also holds
//!    the embedded broker's log and the generated records.
//!
//! `--reference-versions N` measures only the reference-data cache instead: the process's
//! memory with N merchant versions loaded, the load time and the lookup rate.
//! `--prefill N` measures only growth: the end-to-end and latency runs on an empty database
//! and on one holding N records of history, the tables after each, and the plans of the
//! per-batch, per-sweep and per-report statements at size ([`growth`]).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::kafka::embedded::EmbeddedKafka;
use anyhow::Context;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::engine::Batch;
use crate::kafka::LoopEvent;
use crate::store::{PartitionProgress, Source, Store};
use crate::tools::simulate::{Generated, SimulationOptions};

mod cpu;
mod growth;
mod pgstats;
mod process;
mod rolling;
mod scale;
mod stage;

pub use stage::peak_rss_mib;
use stage::*;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Payments in the backlog for the store-only and end-to-end runs (~2.2 records each).
    #[arg(long, default_value_t = 45_000)]
    pub payments: u64,
    /// Offered rate for the latency run, records/s.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Duration of the latency run.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub latency_duration: Duration,
    /// Partitions per input topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// The hostile stage: the end-to-end run again with one hostile record after every this
    /// many (NUL characters, a 100 KB reference, an event time a month ahead, a record only
    /// PostgreSQL refuses, in turn); 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    pub hostile_every: u64,
    /// The ingestion-only stage: the end-to-end run again with `reconciliation.enabled =
    /// false` (decode, validate, insert-or-ignore, running totals, offsets).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ingestion: bool,
    /// Measure only the pause of a steady stream (`--rate` records/s) while 3 instances of
    /// one group are restarted one after the other, with the eager and the cooperative-sticky
    /// protocol.
    #[arg(long)]
    pub rolling_restart: bool,
    /// The scale-out stage: the backlog consumed by this many instances of one group on the
    /// same PostgreSQL, each count in turn (total records/s and row-lock waits); empty skips.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub instances: Vec<usize>,
    /// The service-process stage: `payrecon run` as a process of its own on the backlog
    /// (records/s and its peak resident memory).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub process: bool,
    /// Measure only the reference-data cache with this many merchant versions (N/4
    /// merchants with 4 versions each): process memory before and after loading, load time,
    /// lookups/s.
    #[arg(long)]
    pub reference_versions: Option<u64>,
    /// Measure only the file import parsers: both passes over a synthetic file of this many
    /// entries in every format, generated while it is read (entries/s, peak RSS), and the same
    /// with a tenth of the entries, to show memory flat in file size (`src/files/`).
    #[arg(long)]
    pub import_entries: Option<u64>,
    /// Measure only growth: the end-to-end and latency runs on an empty database and on one
    /// holding this many records of history generated inside PostgreSQL, the tables' sizes
    /// and dead tuples after each, and the plans of the per-batch, per-sweep and per-report
    /// statements at size (`src/tools/bench/growth.rs`, docs/growth.md).
    #[arg(long)]
    pub prefill: Option<u64>,
    /// Days the prefilled history is spread over (ending where the bench's records begin).
    #[arg(long, default_value_t = 365)]
    pub prefill_days: u64,
    /// Write the growth stage's plans in full to this file.
    #[arg(long)]
    pub plans_out: Option<std::path::PathBuf>,
    /// Keep the growth stage's databases (their names are printed) instead of dropping them.
    #[arg(long)]
    pub keep_databases: bool,
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum BenchOutcome {
    Pipeline(BenchReport),
    Reference(ReferenceReport),
    Rolling(Vec<rolling::RollingRestart>),
    Import(Vec<crate::files::synthetic::ParseRate>),
    Growth(Box<growth::GrowthReport>),
}

/// One run's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub records: usize,
    pub store_only_records_per_sec: f64,
    pub end_to_end_records_per_sec: f64,
    pub ratio: f64,
    pub latency_rate: u64,
    pub latency_records: u64,
    pub latency_p50_ms: u64,
    pub latency_p99_ms: u64,
    pub latency_max_ms: u64,
    /// Peak resident memory of the bench process after the end-to-end and latency runs: the
    /// service, the embedded broker with everything produced, and the generated records.
    pub peak_rss_mib: f64,
    /// `payrecon replay` of everything the service applied in this run (backlog + latency
    /// run): records read, decoded, reconciled and committed into a shadow schema, per second.
    pub replay_records_per_sec: f64,
    /// The end-to-end figure on the same backlog with `hostile_records` hostile records in it
    /// (0 when the stage was skipped), and its ratio to the clean end-to-end figure.
    pub hostile_end_to_end_records_per_sec: f64,
    pub hostile_records: u64,
    pub hostile_ratio: f64,
    /// PostgreSQL row writes (inserted + updated + deleted tuples) per record in the
    /// store-only stage, and per table.
    pub row_writes_per_record: f64,
    pub table_writes: Vec<pgstats::TableWrites>,
    /// The ingestion path alone (`reconciliation.enabled = false`) through Kafka and the
    /// service loop, records/s (0 when skipped).
    pub ingestion_records_per_sec: f64,
    /// The scale-out stage, one entry per instance count.
    pub scale_out: Vec<scale::ScaleRun>,
    /// The service-process stage (`None` when skipped).
    pub service_process: Option<process::ProcessRun>,
    /// The same with `reconciliation.enabled = false`.
    pub service_process_ingestion: Option<process::ProcessRun>,
}

/// Loads the simulation's reference data and returns a reconciler with a loaded cache.
async fn load_reference(
    store: &Store,
    sim: &SimulationOptions,
    settings: &Settings,
) -> anyhow::Result<crate::engine::Reconciler> {
    let (merchants, rates) = crate::tools::simulate::reference_data(sim)?;
    store.load_merchants(&merchants, None).await?;
    store.load_rates(&rates, None).await?;
    let cache = std::sync::Arc::new(crate::reference::ReferenceCache::default());
    cache.reload(store).await?;
    Ok(crate::engine::Reconciler::new(
        &settings.reconciliation,
        cache,
        None,
    ))
}

/// The commit latencies (broker timestamp -> commit, ms) of the next `count` records the
/// service reports committed; an error when none is reported for 60 s.
async fn latencies(
    events: &mut mpsc::UnboundedReceiver<LoopEvent>,
    count: u64,
) -> anyhow::Result<Histogram<u64>> {
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut seen = 0u64;
    while seen < count {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Some(LoopEvent::Committed {
                records, latencies, ..
            })) => {
                seen += records;
                for l in latencies {
                    histogram.record(l.as_millis() as u64)?;
                }
            }
            Ok(Some(LoopEvent::Fenced)) => {}
            _ => anyhow::bail!("latency run stalled with {seen} records applied"),
        }
    }
    Ok(histogram)
}

/// A freshly created and migrated database of its own for one stage: name, URL and a store
/// with a small pool on it.
async fn fresh_store(
    admin: &PgConnectOptions,
    tag: &str,
) -> anyhow::Result<(String, String, Store)> {
    let name = format!("payrecon_bench_{tag}_{}", std::process::id());
    crate::store::recreate_database(admin, &name).await?;
    let url = crate::store::database_url(admin, &name);
    let store = Store::new(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?,
    );
    store.migrate().await?;
    Ok((name, url, store))
}

/// Runs all three measurements (or only the reference-cache one) and prints them.
/// `config` is the file the settings were layered from (`--config`), handed on to the
/// service-process stage's `payrecon run`.
pub async fn run(
    mut settings: Settings,
    config: Option<&std::path::Path>,
    o: BenchOptions,
) -> anyhow::Result<BenchOutcome> {
    let admin: PgConnectOptions = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
        .parse()?;
    if let Some(versions) = o.reference_versions {
        return Ok(BenchOutcome::Reference(
            reference_cache(&admin, versions).await?,
        ));
    }
    if o.rolling_restart {
        return rolling_restart(settings, &admin, &o).await;
    }
    if let Some(entries) = o.import_entries {
        let rates =
            tokio::task::spawn_blocking(move || crate::files::synthetic::stage(entries)).await??;
        return Ok(BenchOutcome::Import(rates));
    }
    if let Some(records) = o.prefill {
        let report = growth::run(settings, &admin, &o, records).await?;
        return Ok(BenchOutcome::Growth(Box::new(report)));
    }
    let sim = SimulationOptions {
        payments: o.payments,
        malformed: 0,
        payouts: false,
        ..SimulationOptions::default()
    };
    let (records, _) = crate::tools::simulate::generate(&sim, 1)?;
    println!(
        "payrecon bench: {} records ({} payments), batch_max_records = {}, {} partitions/topic, {} commit lanes",
        records.len(),
        o.payments,
        settings.pipeline.batch_max_records,
        o.partitions,
        settings.pipeline.commit_lanes
    );

    // 1. Store-only ceiling, with PostgreSQL's statistics of the same run.
    let (db1, url1, store) = fresh_store(&admin, "store").await?;
    let reconciler = load_reference(&store, &sim, &settings).await?;
    let lanes = settings.pipeline.commit_lanes;
    let batches = pre_decoded_batches(
        &records,
        settings.pipeline.batch_max_records,
        o.partitions,
        lanes,
    );
    let statements = pgstats::reset(store.pool()).await?;
    let started = Instant::now();
    // The lanes commit concurrently, as the service's do (`pipeline.commit_lanes`).
    let (store_ref, reconciler_ref) = (&store, &reconciler);
    futures::future::try_join_all(batches.iter().map(|lane| async move {
        for b in lane {
            crate::engine::commit_batch(store_ref, "bench", "bench", b, reconciler_ref)
                .await
                .context("store-only commit")?;
        }
        anyhow::Ok(())
    }))
    .await?;
    let store_rate = records.len() as f64 / started.elapsed().as_secs_f64();
    store.pool().close().await;
    println!("store-only ceiling:   {store_rate:>10.0} records/s");
    let stats = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url1)
        .await?;
    tokio::time::sleep(Duration::from_millis(700)).await; // the closed backends' last report
    let writes = pgstats::table_writes(&stats).await?;
    let row_writes =
        writes.iter().map(pgstats::TableWrites::total).sum::<i64>() as f64 / records.len() as f64;
    println!(
        "row writes per record:{row_writes:>10.2}  ({})",
        pgstats::describe_writes(&writes, records.len())
    );
    let top = if statements {
        pgstats::top_statements(&stats, 6).await?
    } else {
        println!(
            "statement times:      pg_stat_statements is not preloaded (shared_preload_libraries)"
        );
        Vec::new()
    };
    pgstats::print_statements(&top);
    stats.close().await;
    let _ = crate::store::drop_database(&admin, &db1).await;

    // 2 + 3. Through Kafka and the real service loop.
    let cluster = EmbeddedKafka::start()?;
    let bootstrap = cluster.bootstrap_servers();
    let (payments_topic, settlements_topic) = ("bench.payments", "bench.settlements");
    let (registry_url, _registry) = crate::registry::spawn_local(crate::registry::RegistryConfig {
        storage: crate::registry::Storage::Memory,
    })
    .await?;
    settings.kafka.bootstrap_servers = bootstrap;
    settings.registry.url = registry_url;
    settings.http.listen = "127.0.0.1:0".parse()?;
    let stage = Stage {
        tag: "e2e",
        group: "bench",
        topics: (payments_topic, settlements_topic),
        refuse_psp: false,
    };
    let (db2, encoder) = stage
        .prepare(&mut settings, &admin, &cluster, &sim, o.partitions)
        .await?;
    let stats = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&crate::store::database_url(&admin, &db2))
        .await?;
    let statements = pgstats::reset(&stats).await?;
    let Backlog {
        producer,
        shutdown,
        service,
        mut events,
        rate: e2e_rate,
    } = stage.consume_backlog(&settings, &encoder, &records).await?;
    println!(
        "end-to-end:           {e2e_rate:>10.0} records/s  ({:.0}% of the store-only ceiling)",
        100.0 * e2e_rate / store_rate
    );
    if statements {
        pgstats::print_statements(&pgstats::top_statements(&stats, 6).await?);
    }
    stats.close().await;

    // 3. Latency at a fixed offered rate.
    let count = (o.rate as f64 * o.latency_duration.as_secs_f64()) as u64;
    let sim = SimulationOptions {
        payments: count / 2 + 1,
        seed: 7,
        malformed: 0,
        payouts: false,
        ..SimulationOptions::default()
    };
    let (mut paced, _) = crate::tools::simulate::generate(&sim, 1)?;
    paced.truncate(count as usize);
    let producing = {
        let paced: Vec<Generated> = paced.clone();
        let rate = o.rate;
        tokio::spawn(async move {
            crate::tools::simulate::produce(
                &producer,
                &encoder,
                &[payments_topic, settlements_topic],
                &paced,
                rate,
                |_| {},
            )
            .await
        })
    };
    let histogram = latencies(&mut events, paced.len() as u64).await?;
    producing.await??;
    shutdown.cancel();
    service.await??;
    // 4. Audit replay of the same database, before it is dropped. The peak RSS of this
    // process (service + embedded broker + records) is taken before the replay runs in it.
    let service_peak_rss_mib = peak_rss_mib();
    let replay = replay_stage(&settings).await?;
    let _ = crate::store::drop_database(&admin, &db2).await;
    let (hostile_rate, hostile_records) = if o.hostile_every > 0 {
        let sim = SimulationOptions {
            payments: o.payments,
            malformed: 0,
            payouts: false,
            ..SimulationOptions::default()
        };
        hostile_stage(settings.clone(), &admin, &cluster, &sim, &records, &o).await?
    } else {
        (0.0, 0)
    };
    let ingestion_rate = if o.ingestion {
        ingestion_stage(settings.clone(), &admin, &cluster, &sim, &records, &o).await?
    } else {
        0.0
    };
    let mut scale_out = Vec::new();
    let backlog_sim = SimulationOptions {
        payments: o.payments,
        malformed: 0,
        payouts: false,
        ..SimulationOptions::default()
    };
    for &n in o.instances.iter().filter(|n| **n > 0) {
        let run = scale::run_with(
            settings.clone(),
            &admin,
            &cluster,
            &backlog_sim,
            &records,
            o.partitions,
            n,
        )
        .await?;
        println!(
            "scale-out, {n} instance{}: {:>8.0} records/s  ({:.2}x one instance; {} row-lock waits, {} over 100 ms, longest {} ms; records per instance {})",
            if n == 1 { " " } else { "s" },
            run.records_per_sec,
            run.records_per_sec
                / scale_out
                    .first()
                    .map_or(run.records_per_sec, |f: &scale::ScaleRun| f.records_per_sec),
            run.lock_waits,
            run.lock_waits_over_100ms,
            run.longest_lock_wait_ms,
            run.records_per_instance
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / ")
        );
        for (statement, n) in &run.long_waits_by_statement {
            println!("    {n:>4} waits over 100 ms in: {statement}");
        }
        scale_out.push(run);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The service-process stage, with reconciliation (`true`) or the ingestion path alone.
    let service_process_run = |reconcile: bool| {
        process::run_with(
            settings.clone(),
            config,
            &admin,
            &cluster,
            &backlog_sim,
            &records,
            o.partitions,
            reconcile,
        )
    };
    let service_process = if o.process {
        let run = service_process_run(true).await?;
        println!(
            "service process:      {:>10.0} records/s  (`payrecon run` as its own process; peak RSS {:.1} MiB; idle {:.1} MiB; after the backlog {:.1} MiB, {:.1} MiB of it anonymous)",
            run.records_per_sec,
            run.peak_rss_mib,
            run.idle_rss_mib,
            run.rss_after_mib,
            run.anon_after_mib
        );
        print_cpu(&run, cores);
        Some(run)
    } else {
        None
    };
    let service_process_ingestion = if o.process && o.ingestion {
        let run = service_process_run(false).await?;
        println!(
            "service process, ingestion only: {:>10.0} records/s  (`reconciliation.enabled = false`; peak RSS {:.1} MiB)",
            run.records_per_sec, run.peak_rss_mib
        );
        print_cpu(&run, cores);
        Some(run)
    } else {
        None
    };
    let report = BenchReport {
        records: records.len(),
        store_only_records_per_sec: store_rate.round(),
        end_to_end_records_per_sec: e2e_rate.round(),
        ratio: (1000.0 * e2e_rate / store_rate).round() / 1000.0,
        latency_rate: o.rate,
        latency_records: histogram.len(),
        latency_p50_ms: histogram.value_at_quantile(0.50),
        latency_p99_ms: histogram.value_at_quantile(0.99),
        latency_max_ms: histogram.max(),
        peak_rss_mib: service_peak_rss_mib,
        replay_records_per_sec: replay.records_per_sec.round(),
        hostile_end_to_end_records_per_sec: hostile_rate.round(),
        hostile_records,
        hostile_ratio: (1000.0 * hostile_rate / e2e_rate).round() / 1000.0,
        row_writes_per_record: (100.0 * row_writes).round() / 100.0,
        table_writes: writes,
        ingestion_records_per_sec: ingestion_rate.round(),
        scale_out,
        service_process,
        service_process_ingestion,
    };
    println!(
        "latency @ {} records/s: p50 {} ms, p99 {} ms, max {} ms over {} records (broker timestamp -> commit)",
        o.rate,
        report.latency_p50_ms,
        report.latency_p99_ms,
        report.latency_max_ms,
        report.latency_records
    );
    println!(
        "replay (audit):       {:>10.0} records/s  ({} records into a shadow schema, {}; service end-to-end {:.0} records/s)",
        replay.records_per_sec,
        replay.records_read,
        replay.result.as_str(),
        e2e_rate
    );
    if hostile_records > 0 {
        println!(
            "hostile end-to-end:   {hostile_rate:>10.0} records/s  ({hostile_records} hostile records, 1 per {}; {:.0}% of the clean end-to-end)",
            o.hostile_every,
            100.0 * report.hostile_ratio
        );
    }
    if ingestion_rate > 0.0 {
        println!(
            "ingestion only:       {ingestion_rate:>10.0} records/s  (decode, validate, insert-or-ignore, running totals, offsets; no reconciliation)"
        );
    }
    println!(
        "peak RSS (bench):     {:>10.1} MiB  (this process: the service, the embedded broker's log, the generated records)",
        report.peak_rss_mib
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(BenchOutcome::Pipeline(report))
}

/// `payrecon bench --rolling-restart`: the stream's pause while 3 instances are restarted in
/// turn, eager protocol then cooperative-sticky, on the embedded broker and registry.
async fn rolling_restart(
    mut settings: Settings,
    admin: &PgConnectOptions,
    o: &BenchOptions,
) -> anyhow::Result<BenchOutcome> {
    let cluster = EmbeddedKafka::start()?;
    let (registry_url, _registry) = crate::registry::spawn_local(crate::registry::RegistryConfig {
        storage: crate::registry::Storage::Memory,
    })
    .await?;
    settings.kafka.bootstrap_servers = cluster.bootstrap_servers();
    settings.registry.url = registry_url;
    settings.http.listen = "127.0.0.1:0".parse()?;
    let sim = SimulationOptions {
        malformed: 0,
        payouts: false,
        ..SimulationOptions::default()
    };
    println!(
        "payrecon bench --rolling-restart: 3 instances, each stopped and replaced in turn, {} records/s offered, {} partitions/topic",
        o.rate, o.partitions
    );
    let mut runs = Vec::new();
    for cooperative in [false, true] {
        let run = rolling::run_with(
            settings.clone(),
            admin,
            &cluster,
            &sim,
            o.partitions,
            o.rate,
            cooperative,
        )
        .await?;
        println!(
            "{:<20} longest pause without a commit {:>6} ms; latency during the restarts p99 {} ms, max {} ms",
            run.protocol, run.longest_pause_ms, run.p99_ms, run.max_ms
        );
        runs.push(run);
    }
    println!("{}", serde_json::to_string(&runs)?);
    Ok(BenchOutcome::Rolling(runs))
}

/// The reference-data cache's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReferenceReport {
    pub snapshot: crate::reference::SnapshotStats,
    pub insert_secs: f64,
    pub load_secs: f64,
    /// Process RSS (VmRSS) and its peak so far (VmHWM), MiB: before the first load, after
    /// it, and after a second load (which builds the new snapshot while the old one is
    /// still in use, as every refresh does).
    pub rss_before_mib: f64,
    pub hwm_before_mib: f64,
    pub rss_loaded_mib: f64,
    pub hwm_loaded_mib: f64,
    pub rss_reloaded_mib: f64,
    pub hwm_reloaded_mib: f64,
    pub lookups: u64,
    pub lookups_per_sec: f64,
    /// Lookups that found a version (the rest: unknown merchant, or before its first version).
    pub lookup_hits: u64,
}

/// `payrecon bench --reference-versions N`: loads N merchant versions into the cache in a
/// fresh database and reports the process's memory, the load time and the lookup rate.
async fn reference_cache(
    admin: &PgConnectOptions,
    versions: u64,
) -> anyhow::Result<ReferenceReport> {
    let (db, _, store) = fresh_store(admin, "reference").await?;
    let started = Instant::now();
    crate::store::bench::insert_merchant_versions(store.pool(), i64::try_from(versions)?)
        .await
        .context("inserting merchant versions")?;
    crate::store::bench::insert_rates(store.pool()).await?;
    let insert_secs = started.elapsed().as_secs_f64();
    println!("payrecon bench: {versions} merchant versions inserted in {insert_secs:.1} s");

    let (rss_before_mib, hwm_before_mib) = (status_mib("VmRSS:"), status_mib("VmHWM:"));
    let cache = crate::reference::ReferenceCache::default();
    let started = Instant::now();
    let snapshot = cache.reload(&store).await?;
    let load_secs = started.elapsed().as_secs_f64();
    let (rss_loaded_mib, hwm_loaded_mib) = (status_mib("VmRSS:"), status_mib("VmHWM:"));
    drop(snapshot);
    cache.reload(&store).await?;
    let (rss_reloaded_mib, hwm_reloaded_mib) = (status_mib("VmRSS:"), status_mib("VmHWM:"));
    let snapshot = cache.snapshot();
    let stats = snapshot.stats();
    anyhow::ensure!(
        stats.merchant_versions as u64 == versions,
        "loaded {} merchant versions, inserted {versions}",
        stats.merchant_versions
    );

    // Random merchants (one in a hundred unknown) at random times from a month before the
    // first versions to a month after the last; the ids are packed into one string so the
    // keys themselves barely touch memory or the allocator.
    let lookups = 1_000_000u64;
    let merchants = versions.div_ceil(4);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let first = chrono::DateTime::parse_from_rfc3339("2024-12-01T00:00:00Z")?.to_utc();
    let span = (chrono::Duration::days(4 * 90 + 60)).num_seconds();
    let mut ids = String::new();
    let mut keys = Vec::with_capacity(lookups as usize);
    for _ in 0..lookups {
        let m = rng.random_range(0..merchants + merchants / 100 + 1);
        let start = ids.len();
        write!(ids, "merchant-{m:06}")?;
        let at = first + chrono::Duration::seconds(rng.random_range(0..span));
        keys.push((start, ids.len(), at));
    }
    let started = Instant::now();
    let mut lookup_hits = 0u64;
    for &(start, end, at) in &keys {
        let found = snapshot.merchant_at(&ids[start..end], at);
        lookup_hits += u64::from(std::hint::black_box(found).is_some());
    }
    let lookups_per_sec = lookups as f64 / started.elapsed().as_secs_f64();

    store.pool().close().await;
    let _ = crate::store::drop_database(admin, &db).await;
    let report = ReferenceReport {
        snapshot: stats,
        insert_secs: round3(insert_secs),
        load_secs: round3(load_secs),
        rss_before_mib: round1(rss_before_mib),
        hwm_before_mib: round1(hwm_before_mib),
        rss_loaded_mib: round1(rss_loaded_mib),
        hwm_loaded_mib: round1(hwm_loaded_mib),
        rss_reloaded_mib: round1(rss_reloaded_mib),
        hwm_reloaded_mib: round1(hwm_reloaded_mib),
        lookups,
        lookups_per_sec: lookups_per_sec.round(),
        lookup_hits,
    };
    println!(
        "snapshot:             {} merchant versions of {} merchants, {} names, {} with overrides, {} rate versions; {:.1} MiB of heap",
        stats.merchant_versions,
        stats.merchants,
        stats.names,
        stats.extras,
        stats.rate_versions,
        stats.heap_bytes as f64 / (1024.0 * 1024.0)
    );
    println!("load:                 {load_secs:>10.2} s");
    println!(
        "process RSS (MiB):    before load {rss_before_mib:.1} (peak {hwm_before_mib:.1}), after load {rss_loaded_mib:.1} (peak {hwm_loaded_mib:.1}), after a second load {rss_reloaded_mib:.1} (peak {hwm_reloaded_mib:.1})"
    );
    println!(
        "lookups:              {lookups_per_sec:>10.0} merchant_at/s ({lookup_hits} of {lookups} found)"
    );
    println!("{}", serde_json::to_string(&report)?);
    Ok(report)
}

fn round1(x: f64) -> f64 {
    (10.0 * x).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (1000.0 * x).round() / 1000.0
}

/// `payrecon replay` over everything the bench's service applied (the default range: up to
/// the group's stored offsets), reports in a temporary directory.
async fn replay_stage(settings: &Settings) -> anyhow::Result<crate::tools::replay::ReplayOutcome> {
    let dir = tempfile::tempdir()?;
    let options = crate::tools::replay::ReplayOptions {
        report: Some(dir.path().join("audit.json")),
        differences_csv: Some(dir.path().join("audit.csv")),
        quiet: true,
        ..Default::default()
    };
    let outcome = crate::tools::replay::run(settings, &options, CancellationToken::new())
        .await
        .context("the replay stage")?;
    if outcome.result != crate::tools::replay::AuditResult::Match {
        // Kept for the reader: the report and every difference, row by row.
        let kept = dir.keep();
        anyhow::bail!(
            "the replay found {} differences (report and differences kept in {})",
            outcome.differences,
            kept.display()
        );
    }
    Ok(outcome)
}

/// The CPU line under a service-process figure: what a record costs the service and the
/// PostgreSQL server, and what the machine's cores could give at that cost.
fn print_cpu(run: &process::ProcessRun, cores: usize) {
    let Some(cpu) = run.cpu else {
        println!("    CPU per record: not measured (no /proc)");
        return;
    };
    match (cpu.postgres_us, cpu.bound(cores)) {
        (Some(pg), Some(bound)) => println!(
            "    CPU per record: service {:.1} µs + PostgreSQL {pg:.1} µs = {:.1} µs; at most {bound:.0} records/s on {cores} cores at that cost, the broker costing nothing ({:.0} % of it reached)",
            cpu.service_us,
            cpu.service_us + pg,
            100.0 * run.records_per_sec / bound
        ),
        _ => println!(
            "    CPU per record: service {:.1} µs; PostgreSQL not measured (the server is not a process on this machine)",
            cpu.service_us
        ),
    }
}

/// Waits for `total` records to be committed; their rate from the first commit on (group join
/// excluded, the first batch not counted).
async fn backlog_rate(
    events: &mut mpsc::UnboundedReceiver<LoopEvent>,
    total: u64,
) -> anyhow::Result<f64> {
    let mut applied = 0u64;
    let mut first: Option<Instant> = None;
    let mut first_batch = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while applied < total {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Some(LoopEvent::Committed { records, .. })) => {
                if first.is_none() {
                    first = Some(Instant::now());
                    first_batch = records;
                }
                applied += records;
            }
            Ok(Some(LoopEvent::Fenced)) => {}
            Ok(None) => anyhow::bail!("the service stopped during the end-to-end run"),
            Err(_) => anyhow::bail!("end-to-end run timed out with {applied} records applied"),
        }
    }
    anyhow::ensure!(
        applied > first_batch,
        "the backlog of {applied} records was applied in one batch: nothing to measure the \
         end-to-end rate with (use more --payments)"
    );
    Ok((applied - first_batch) as f64 / first.expect("committed").elapsed().as_secs_f64())
}
