//! The watermark with idle and sparse partitions, through the running service: deadlines
//! pass although partitions stay empty or quiet, a partition that is behind still holds
//! them back, and `payrecon replay` of each run reaches the same statuses.
//!
//! The records carry their event time as broker timestamp (`BrokerTime::Event`), so broker
//! time follows the simulated clock and idleness (judged in broker time) is deterministic.
//!
//! The bound these tests hold the service to: once every partition is caught up, a deadline
//! `d` is judged as soon as the stream time (highest broker timestamp applied) exceeds
//! `d + allowed_lateness + idle_timeout`, since every partition that still counts then has
//! an event time past `d + allowed_lateness` (a partition whose last broker time is within
//! the idle timeout of the stream time has an event time at least that high when broker
//! time is event time). In wall time: within [`WALL_BOUND`] of the last record being
//! applied (a lag refresh, 1 s here, for the high watermarks to show the partitions caught
//! up, then the next batch or the background sweep, every second).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use payrecon::reconcile::Status;
use payrecon::replay::{AuditResult, ReplayOptions};
use payrecon::simulate::{BrokerTime, Generated, SettlementRhythm, SimulationOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::{Fixture, simulation};

/// How long after the last record is applied every predicted exception must be raised.
const WALL_BOUND: Duration = Duration::from_secs(20);

/// The idle timeout the tests run the service with (broker time = simulated time).
const IDLE_TIMEOUT: &str = "6h";

fn service_env() -> [(&'static str, &'static str); 1] {
    [("PAYRECON_RECONCILIATION__IDLE_TIMEOUT", IDLE_TIMEOUT)]
}

/// The service's settings with the tests' idle timeout (for the replay).
fn settings(f: &Fixture) -> payrecon::config::Settings {
    let mut s = f.settings();
    s.reconciliation.idle_timeout = humantime::parse_duration(IDLE_TIMEOUT).unwrap();
    s
}

async fn produce_stamped(f: &Fixture, records: &[Generated]) {
    let encoder = f.encoder().await;
    payrecon::simulate::produce_stamped(
        &f.producer(),
        &encoder,
        &f.kafka.payments_topic,
        &f.kafka.settlements_topic,
        records,
        0,
        BrokerTime::Event,
        |_| {},
    )
    .await
    .unwrap();
}

/// Polls until every reference is in its predicted status; fails (with the wrong ones)
/// after `bound`. Returns how long it took.
async fn wait_statuses(f: &Fixture, expected: &BTreeMap<String, Status>, bound: Duration) {
    let started = Instant::now();
    loop {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT payment_reference, status FROM reconciliation_items")
                .fetch_all(f.db.store.pool())
                .await
                .unwrap();
        let actual: BTreeMap<String, String> = rows.into_iter().collect();
        let all = actual.len() == expected.len()
            && expected
                .iter()
                .all(|(r, s)| actual.get(r).map(String::as_str) == Some(s.as_str()));
        if all {
            return;
        }
        if started.elapsed() > bound {
            f.assert_statuses(expected).await;
            panic!("statuses not reached within {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Empty partitions of the input topics (high watermark 0).
fn empty_partitions(f: &Fixture) -> usize {
    f.kafka
        .watermarks()
        .values()
        .filter(|(_, high)| *high == 0)
        .count()
}

/// Replays the whole log into a shadow schema; asserts zero differences.
async fn assert_replay_matches(f: &Fixture) {
    let dir = tempfile::tempdir().unwrap();
    let options = ReplayOptions {
        report: Some(dir.path().join("replay.json")),
        differences_csv: Some(dir.path().join("replay.csv")),
        quiet: true,
        ..ReplayOptions::default()
    };
    let outcome = payrecon::replay::run(&settings(f), &options, CancellationToken::new())
        .await
        .expect("the replay runs");
    let csv = std::fs::read_to_string(dir.path().join("replay.csv")).unwrap();
    assert_eq!(
        (outcome.result, outcome.differences),
        (AuditResult::Match, 0),
        "replay differences:\n{csv}"
    );
}

/// The watermark as the service judges it now that every partition is caught up (log ends
/// from the broker), with `idle_timeout` (None: the tests' own).
async fn judged(
    f: &Fixture,
    idle_timeout: Option<Duration>,
) -> payrecon::reconcile::GroupWatermark {
    let mut s = settings(f);
    if let Some(t) = idle_timeout {
        s.reconciliation.idle_timeout = t;
    }
    let ends = f
        .kafka
        .watermarks()
        .into_iter()
        .map(|(k, (low, high))| (k, payrecon::reconcile::LogEnd { low, high }))
        .collect();
    let cache = std::sync::Arc::new(payrecon::reference::ReferenceCache::default());
    let reconciler = payrecon::store::Reconciler::new(
        &s.reconciliation,
        cache,
        Some(2 * i64::from(f.kafka.partitions)),
    )
    .with_log_ends(std::sync::Arc::new(payrecon::store::LogEnds::fixed(ends)));
    let mut conn = f.db.store.pool().acquire().await.unwrap();
    reconciler
        .group_watermark(&mut conn, &f.group)
        .await
        .unwrap()
}

fn standings(w: &payrecon::reconcile::GroupWatermark, standing: &str) -> usize {
    w.partitions
        .iter()
        .filter(|p| p.standing.as_str() == standing)
        .count()
}

fn count(statuses: &BTreeMap<String, Status>, s: Status) -> usize {
    statuses.values().filter(|v| **v == s).count()
}

/// Runs `options` through the service on 16 partitions per topic and checks every
/// reference's status, the wall-time bound and the replay.
async fn run_sparse(options: SimulationOptions) -> Fixture {
    let f = Fixture::new(16).await;
    let encoder = f.encoder().await;
    let sim = payrecon::simulate::simulate(&options, encoder.payment_schema_id()).unwrap();
    assert!(
        count(&sim.statuses, Status::MissingSettlement) > 0
            && count(&sim.statuses, Status::UnexpectedSettlement) > 0,
        "the simulation must predict deadline exceptions: {:?}",
        sim.statuses
    );
    let service = f.spawn_service("svc", &service_env());
    produce_stamped(&f, &sim.records).await;
    f.wait_drained(Duration::from_secs(90)).await;
    wait_statuses(&f, &sim.statuses, WALL_BOUND).await;
    f.assert_exact(&sim.totals).await;
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
    assert_replay_matches(&f).await;
    f
}

#[tokio::test(flavor = "multi_thread")]
async fn deadlines_pass_on_sixteen_partitions_where_several_stay_empty_and_replay_agrees() {
    let options = SimulationOptions {
        payments: 14,
        span: Duration::from_secs(10 * 24 * 3600),
        mismatch_share: 0.5,
        unexpected_share: 0.4,
        duplicate_share: 0.0,
        late_share: 0.0,
        ..simulation(14, 2)
    };
    let f = run_sparse(options).await;
    // Under the old rule (held at 1970 until every partition has a record) none of the
    // deadline exceptions above would have been raised.
    assert!(
        empty_partitions(&f) >= 4,
        "the scenario needs empty partitions: {:?}",
        f.kafka.watermarks()
    );
    let w = judged(&f, None).await;
    assert_eq!(standings(&w, "idle_empty"), empty_partitions(&f), "{w:?}");
    assert!(w.watermark > chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_settlement_burst_once_per_simulated_day_does_not_hold_deadlines_back() {
    let options = SimulationOptions {
        payments: 60,
        span: Duration::from_secs(12 * 24 * 3600),
        mismatch_share: 0.3,
        unexpected_share: 0.1,
        duplicate_share: 0.01,
        late_share: 0.0,
        settlement_rhythm: SettlementRhythm::DailyBurst,
        ..simulation(60, 8)
    };
    let f = run_sparse(options).await;
    // Settlement partitions whose last burst is days old are quiet and left out; counting
    // them would have held the watermark back.
    let w = judged(&f, None).await;
    assert!(standings(&w, "idle_quiet") > 0, "{w:?}");
    let counting_quiet_ones = judged(&f, Some(Duration::from_secs(100 * 365 * 86400))).await;
    assert!(
        counting_quiet_ones.watermark < w.watermark,
        "{counting_quiet_ones:?}"
    );
    // Every line came in a burst at 04:00: the settlement partitions were quiet between.
    let hours: Vec<u32> = sqlx::query_scalar(
        "SELECT DISTINCT EXTRACT(HOUR FROM event_time AT TIME ZONE 'UTC')::int4 FROM settlement_lines",
    )
    .fetch_all(f.db.store.pool())
    .await
    .unwrap()
    .into_iter()
    .map(|h: i32| h as u32)
    .collect();
    assert_eq!(hours, vec![4]);
}
