//! The scale-out stage: the same backlog consumed by 1, 2 and 3 instances of one consumer
//! group on the same PostgreSQL, each count into a database and topics of its own. Reports
//! the total throughput, the records each instance committed, and the row-lock waits
//! PostgreSQL saw (sampled from `pg_locks`, whose `waitstart` says since when a backend
//! waits; `log_lock_waits` is switched on for the database too, so waits past
//! `deadline_timeout` also reach the server log).
//!
//! The instances start on the empty topics and get [`GROUP_FORMATION`] to form the group
//! before the backlog is produced, so the figure is the steady state of N members, not the
//! rebalances of members joining one by one (`bench --rolling-restart` measures those pauses).
//! The embedded broker's coordinator can lose a join round (a follower's SyncGroup that
//! arrives after the leader's is refused, docs/testing.md); the per-instance counts show it
//! when a member took no part.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::kafka::embedded::EmbeddedKafka;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Stage;
use crate::config::Settings;
use crate::kafka::LoopEvent;
use crate::tools::simulate::{Generated, SimulationOptions};

/// One instance count's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleRun {
    pub instances: usize,
    pub records_per_sec: f64,
    /// Distinct lock waits observed, and those that lasted longer than 100 ms.
    pub lock_waits: u64,
    pub lock_waits_over_100ms: u64,
    pub longest_lock_wait_ms: u64,
    /// The waits over 100 ms by what waited (the waiting statement's first words), most first.
    pub long_waits_by_statement: Vec<(String, u64)>,
    /// Records committed by each instance, in start order.
    pub records_per_instance: Vec<u64>,
}

/// How long the instances get to form the group on the empty topics before the backlog is
/// produced: a join round (the coordinator waits for the members it knows), plus a lost
/// round at the 6 s session timeout the stage sets.
const GROUP_FORMATION: Duration = Duration::from_secs(10);

/// One lock wait seen: how long it lasted at most, and the statement that waited.
struct Wait {
    ms: f64,
    statement: String,
}

/// Lock waits seen by sampling `pg_locks` of one database until `stop`.
async fn sample_lock_waits(
    pool: sqlx::PgPool,
    database: String,
    stop: CancellationToken,
) -> HashMap<(i32, String), Wait> {
    let mut waits: HashMap<(i32, String), Wait> = HashMap::new();
    let mut every = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return waits,
            _ = every.tick() => {}
        }
        let rows = crate::store::bench::lock_waits(&pool, &database).await;
        for (pid, since, ms, statement) in rows.unwrap_or_default() {
            let w = waits.entry((pid, since)).or_insert(Wait { ms, statement });
            w.ms = w.ms.max(ms);
        }
    }
}

/// Runs the backlog through `instances` instances of one group; records/s from the first
/// commit until every record is committed, and the lock waits.
pub async fn run_with(
    mut settings: Settings,
    admin: &PgConnectOptions,
    cluster: &EmbeddedKafka,
    sim: &SimulationOptions,
    records: &[Generated],
    partitions: i32,
    instances: usize,
) -> anyhow::Result<ScaleRun> {
    let tag: &'static str = ["scale1", "scale2", "scale3", "scale4"][instances.clamp(1, 4) - 1];
    let topics: (&'static str, &'static str) = match instances {
        1 => ("bench.scale1.payments", "bench.scale1.settlements"),
        2 => ("bench.scale2.payments", "bench.scale2.settlements"),
        3 => ("bench.scale3.payments", "bench.scale3.settlements"),
        _ => ("bench.scale4.payments", "bench.scale4.settlements"),
    };
    let stage = Stage {
        tag,
        group: "bench-scale",
        topics,
        refuse_psp: false,
    };
    // Members that join later take partitions over; a short session keeps rebalances quick.
    settings.kafka.session_timeout = Duration::from_secs(6);
    let (db, encoder) = stage
        .prepare(&mut settings, admin, cluster, sim, partitions)
        .await?;
    let admin_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(admin.clone())
        .await?;
    for setting in ["log_lock_waits = on", "deadlock_timeout = '100ms'"] {
        crate::store::bench::set_database_default(&admin_pool, &db, setting).await?;
    }
    let stop_sampling = CancellationToken::new();
    let sampler = tokio::spawn(sample_lock_waits(
        admin_pool.clone(),
        db.clone(),
        stop_sampling.clone(),
    ));
    let shutdown = CancellationToken::new();
    // One channel per instance, merged with the instance's index: who committed what.
    let (tx, mut events) = mpsc::unbounded_channel::<(usize, LoopEvent)>();
    let mut services = Vec::new();
    for i in 0..instances {
        let (own_tx, mut own_rx) = mpsc::unbounded_channel();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(event) = own_rx.recv().await {
                if tx.send((i, event)).is_err() {
                    break;
                }
            }
        });
        services.push(tokio::spawn(crate::app::run(
            settings.clone(),
            shutdown.clone(),
            Some(own_tx),
        )));
    }
    drop(tx);
    tokio::time::sleep(GROUP_FORMATION).await;
    let producer = crate::kafka::producer::idempotent(&settings.kafka)?;
    crate::tools::simulate::produce(
        &producer,
        &encoder,
        &[topics.0, topics.1],
        records,
        0,
        |_| {},
    )
    .await?;

    let total = records.len() as u64;
    let mut applied = 0u64;
    let mut per_instance = vec![0u64; instances];
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while applied < total {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Some((i, LoopEvent::Committed { records, .. }))) => {
                first.get_or_insert_with(Instant::now);
                applied += records;
                per_instance[i] += records;
            }
            Ok(Some((_, LoopEvent::Fenced))) => {}
            Ok(None) => anyhow::bail!("the instances stopped during the scale-out run"),
            Err(_) => anyhow::bail!("scale-out run timed out with {applied} records applied"),
        }
    }
    let elapsed = first.map_or(Duration::ZERO, |f| f.elapsed());
    shutdown.cancel();
    for s in services {
        s.await??;
    }
    stop_sampling.cancel();
    let waits = sampler.await?;
    admin_pool.close().await;
    let _ = crate::store::drop_database(admin, &db).await;
    let mut by_statement: HashMap<String, u64> = HashMap::new();
    for w in waits.values().filter(|w| w.ms > 100.0) {
        *by_statement.entry(w.statement.clone()).or_default() += 1;
    }
    let mut long_waits_by_statement: Vec<(String, u64)> = by_statement.into_iter().collect();
    long_waits_by_statement.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(ScaleRun {
        instances,
        records_per_sec: (total as f64 / elapsed.as_secs_f64().max(1e-3)).round(),
        lock_waits: waits.len() as u64,
        lock_waits_over_100ms: waits.values().filter(|w| w.ms > 100.0).count() as u64,
        longest_lock_wait_ms: waits.values().fold(0.0f64, |a, w| a.max(w.ms)) as u64,
        long_waits_by_statement,
        records_per_instance: per_instance,
    })
}
