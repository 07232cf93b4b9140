//! The rolling-restart stage: three instances of one group consume a steady stream while
//! each is stopped and replaced in turn, as a rolling update does. Reports how long the
//! stream paused: the longest time without any commit in the group, and the broker-timestamp
//! → commit latency of the records committed during the restarts. Run once with the eager
//! protocol (librdkafka's default: every rebalance revokes every partition of every member)
//! and once with `cooperative-sticky` (only the partitions that move stop).
//!
//! Static membership is not part of it: librdkafka's mock cluster identifies members by
//! member id only, so a static member's restart cannot be reproduced on it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kafka::embedded::EmbeddedKafka;
use hdrhistogram::Histogram;
use sqlx::postgres::PgConnectOptions;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Stage;
use crate::config::Settings;
use crate::kafka::LoopEvent;
use crate::tools::simulate::SimulationOptions;

/// One protocol's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RollingRestart {
    pub protocol: &'static str,
    pub restarts: usize,
    /// The longest time without a commit anywhere in the group, during the restarts.
    pub longest_pause_ms: u64,
    /// Latency of the records committed during the restarts.
    pub p99_ms: u64,
    pub max_ms: u64,
}

const INSTANCES: usize = 3;
const WARM_UP: Duration = Duration::from_secs(8);
const BETWEEN_RESTARTS: Duration = Duration::from_secs(8);

type Commits = Arc<Mutex<Vec<(Instant, Vec<Duration>)>>>;

fn start(
    settings: &Settings,
    tx: &mpsc::UnboundedSender<LoopEvent>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let stop = CancellationToken::new();
    let handle = tokio::spawn(crate::app::run(
        settings.clone(),
        stop.clone(),
        Some(tx.clone()),
    ));
    (stop, handle)
}

/// Runs the stage with the eager (`cooperative` false) or the cooperative-sticky protocol.
pub async fn run_with(
    mut settings: Settings,
    admin: &PgConnectOptions,
    cluster: &EmbeddedKafka,
    sim: &SimulationOptions,
    partitions: i32,
    rate: u64,
    cooperative: bool,
) -> anyhow::Result<RollingRestart> {
    let (protocol, stage) = if cooperative {
        let stage = Stage {
            tag: "rollcoop",
            group: "bench-rolling-cooperative",
            topics: ("bench.rollcoop.payments", "bench.rollcoop.settlements"),
            refuse_psp: false,
        };
        ("cooperative-sticky", stage)
    } else {
        let stage = Stage {
            tag: "rolleager",
            group: "bench-rolling-eager",
            topics: ("bench.rolleager.payments", "bench.rolleager.settlements"),
            refuse_psp: false,
        };
        ("eager (range)", stage)
    };
    settings.kafka.session_timeout = Duration::from_secs(6);
    if cooperative {
        settings.kafka.options.insert(
            "partition.assignment.strategy".into(),
            "cooperative-sticky".into(),
        );
    }
    let (db, encoder) = stage
        .prepare(&mut settings, admin, cluster, sim, partitions)
        .await?;
    let total_time = WARM_UP + BETWEEN_RESTARTS * INSTANCES as u32 + Duration::from_secs(4);
    let count = (rate as f64 * total_time.as_secs_f64()) as usize;
    let (mut records, _) = crate::tools::simulate::generate(
        &SimulationOptions {
            payments: count as u64 / 2 + 1,
            seed: 11,
            malformed: 0,
            payouts: false,
            ..SimulationOptions::default()
        },
        1,
    )?;
    records.truncate(count);
    let producer = crate::kafka::producer::idempotent(&settings.kafka)?;
    let (payments_topic, settlements_topic) = stage.topics;
    let producing = {
        let records = records.clone();
        tokio::spawn(async move {
            crate::tools::simulate::produce(
                &producer,
                &encoder,
                &[payments_topic, settlements_topic],
                &records,
                rate,
                |_| {},
            )
            .await
        })
    };

    let (tx, mut events) = mpsc::unbounded_channel();
    let commits: Commits = Arc::default();
    let collector = {
        let commits = commits.clone();
        tokio::spawn(async move {
            let mut applied = 0u64;
            while let Some(e) = events.recv().await {
                if let LoopEvent::Committed {
                    records, latencies, ..
                } = e
                {
                    applied += records;
                    commits
                        .lock()
                        .expect("commits lock")
                        .push((Instant::now(), latencies));
                }
            }
            applied
        })
    };
    let mut members: Vec<_> = (0..INSTANCES).map(|_| start(&settings, &tx)).collect();
    tokio::time::sleep(WARM_UP).await;
    let restarts_began = Instant::now();
    for member in members.iter_mut() {
        let (stop, handle) = std::mem::replace(member, start(&settings, &tx));
        // The replacement starts as the old one stops (a rolling update with surge 0 would
        // start it after; with the eager protocol both cost a rebalance each).
        stop.cancel();
        handle.await??;
        tokio::time::sleep(BETWEEN_RESTARTS).await;
    }
    let restarts_ended = Instant::now();
    producing.await??;
    // Let the group catch up, then stop it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let latest = commits.lock().expect("commits lock").last().map(|c| c.0);
        if latest.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (stop, handle) in members {
        stop.cancel();
        handle.await??;
    }
    drop(tx);
    let applied = collector.await?;
    let _ = crate::store::drop_database(admin, &db).await;
    anyhow::ensure!(
        applied == records.len() as u64,
        "{} records produced, {applied} committed",
        records.len()
    );

    let commits = commits.lock().expect("commits lock");
    let window: Vec<&(Instant, Vec<Duration>)> = (commits.iter())
        .filter(|(t, _)| *t >= restarts_began && *t <= restarts_ended)
        .collect();
    let mut longest = Duration::ZERO;
    let mut previous = restarts_began;
    for (t, _) in &window {
        longest = longest.max(t.duration_since(previous));
        previous = *t;
    }
    longest = longest.max(restarts_ended.duration_since(previous));
    let mut histogram = Histogram::<u64>::new(3)?;
    for (_, latencies) in &window {
        for l in latencies {
            histogram.record(l.as_millis() as u64)?;
        }
    }
    Ok(RollingRestart {
        protocol,
        restarts: INSTANCES,
        longest_pause_ms: longest.as_millis() as u64,
        p99_ms: histogram.value_at_quantile(0.99),
        max_ms: histogram.max(),
    })
}
