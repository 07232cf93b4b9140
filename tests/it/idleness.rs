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
use payrecon::tools::replay::{AuditResult, ReplayOptions};
use payrecon::tools::simulate::{BrokerTime, Generated, SettlementRhythm, SimulationOptions};
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
    payrecon::tools::simulate::produce_stamped(
        &f.producer(),
        &encoder,
        &f.kafka.topics(),
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
    let outcome = payrecon::tools::replay::run(&settings(f), &options, CancellationToken::new())
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
        .map(|(k, (low, high))| {
            let end = payrecon::reconcile::LogEnd {
                low,
                high,
                seen_up_to: None,
                capped: false,
            };
            (k, end)
        })
        .collect();
    let cache = std::sync::Arc::new(payrecon::reference::ReferenceCache::default());
    let reconciler = payrecon::engine::Reconciler::new(
        &s.reconciliation,
        cache,
        Some(3 * i64::from(f.kafka.partitions)),
    )
    .with_log_ends(std::sync::Arc::new(payrecon::engine::LogEnds::fixed(ends)));
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
    let sim = payrecon::tools::simulate::simulate(&options, encoder.payment_schema_id()).unwrap();
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

    // `payrecon report --watermark` shows the same judgement per partition.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .args(["report", "--watermark", "--json"])
        .envs(f.service_env())
        .envs(service_env())
        .env("PAYRECON_LOG__FILTER", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["watermark"]["partitions"].as_array().unwrap();
    assert_eq!(rows.len(), 48);
    let shown: Vec<&str> = rows
        .iter()
        .map(|r| r["standing"].as_str().unwrap())
        .collect();
    let judged: Vec<&str> = w.partitions.iter().map(|p| p.standing.as_str()).collect();
    assert_eq!(shown, judged);
    assert_eq!(
        report["watermark"]["watermark"].as_str().unwrap(),
        serde_json::to_value(w.watermark).unwrap().as_str().unwrap()
    );
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

// ------------------------------------------------------------------ hand-made partitions

use chrono::{DateTime, Utc};
use payrecon::domain::{PaymentEvent, PaymentEventKind};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::reconciliation::{at, capture, history, line, status, wait_status};

/// A merchant settling in EUR at 100 bps: a capture of 100.00 settles as gross 100.00, fee 1.00.
async fn load_shop(f: &Fixture) {
    f.db.store
        .load_merchants(
            &[payrecon::reference::MerchantVersion {
                merchant_id: "shop".into(),
                valid_from: at(-24),
                name: "Shop".into(),
                settlement_currency: payrecon::domain::Currency::from_code("EUR").unwrap(),
                fee_bps: rust_decimal::Decimal::new(100, 0),
                fee_fixed: rust_decimal::Decimal::ZERO,
                status: payrecon::reference::MerchantStatus::Active,
                tolerance_abs: None,
                tolerance_rel: None,
                settlement_deadline: None,
                payment_deadline: None,
            }],
            None,
        )
        .await
        .unwrap();
}

/// Produces one record to an explicit partition with an explicit broker timestamp.
async fn send(
    f: &Fixture,
    producer: &FutureProducer,
    r: &Generated,
    partition: i32,
    broker_time: DateTime<Utc>,
) {
    let encoder = f.encoder().await;
    let (topic, key, bytes) = match r {
        Generated::Payment(p) => (
            &f.kafka.payments_topic,
            &p.payment_reference,
            encoder.encode_payment(p).unwrap(),
        ),
        Generated::Settlement(l) => (
            &f.kafka.settlements_topic,
            &l.payment_reference,
            encoder.encode_settlement(l).unwrap(),
        ),
        Generated::Payout(b) => (
            &f.kafka.payouts_topic,
            &b.account_id,
            encoder.encode_payout(b).unwrap(),
        ),
        Generated::Malformed { .. } => unreachable!(),
    };
    producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .partition(partition)
                .payload(&bytes)
                .timestamp(broker_time.timestamp_millis()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

/// A matched pair for `reference` at `hour` on partition `p` of both topics (broker time =
/// event time).
async fn matched_pair(f: &Fixture, producer: &FutureProducer, reference: &str, p: i32, hour: i64) {
    send(
        f,
        producer,
        &capture(reference, "shop", "100.00", hour),
        p,
        at(hour),
    )
    .await;
    send(
        f,
        producer,
        &line(reference, "shop", "100.00", "1.00", hour),
        p,
        at(hour),
    )
    .await;
}

fn ever_missing(h: &[(Option<String>, String, String, Vec<String>)]) -> bool {
    h.iter().any(|(_, to, _, _)| to == "MISSING_SETTLEMENT")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_behind_holds_deadlines_back_while_the_others_are_live() {
    let f = Fixture::new(4).await;
    load_shop(&f).await;
    // A long session: the frozen instance keeps its partitions (they stay behind) until it
    // is resumed.
    let env = [
        service_env()[0],
        ("PAYRECON_KAFKA__SESSION_TIMEOUT", "45s"),
        ("PAYRECON_KAFKA__MAX_POLL_INTERVAL", "60s"),
    ];
    // One after the other, so the group settles quickly: `b` joins a group `a` leads.
    let a = f.spawn_service("a", &env);
    crate::helpers::wait_for(
        Duration::from_secs(60),
        "a to own every partition",
        || async {
            a.metric(payrecon::metrics::ASSIGNED_PARTITIONS, &[])
                .await
                .is_some_and(|n| n == 12.0)
        },
    )
    .await;
    // librdkafka's mock coordinator loses a follower whose SyncGroup arrives after the
    // leader's: it answers the follower "invalid request" and the next join round starts only
    // a session (45 s) later. A real broker holds either request until both are in. A
    // round-trip delay makes the leader, which needs a Metadata round trip before its
    // SyncGroup, the later one unless `b` stalls for as long; it is lifted once both own
    // partitions.
    f.kafka
        .mock()
        .broker_round_trip_time(1, Duration::from_millis(300))
        .expect("mock round-trip time");
    let b = f.spawn_service("b", &env);
    let producer = f.producer();
    // Which settlements partition does `a` own once both share the group?
    let settlements = f.kafka.settlements_topic.clone();
    let owned_by_a = std::sync::Mutex::new(None);
    // 120 s, more than two of this test's 45 s sessions, so one join round that ends only
    // when a session expires does not fail the test on a loaded machine.
    crate::helpers::wait_for(
        Duration::from_secs(120),
        "both instances to own partitions",
        || async {
            let (Some(ma), Some(mb)) = (a.metrics().await, b.metrics().await) else {
                return false;
            };
            let a_owns = crate::helpers::owned_partitions(&ma, &settlements, 4);
            let b_owns = crate::helpers::owned_partitions(&mb, &settlements, 4);
            *owned_by_a.lock().unwrap() = a_owns.first().copied();
            !a_owns.is_empty() && !b_owns.is_empty() && a_owns.len() + b_owns.len() == 4
        },
    )
    .await;
    f.kafka
        .mock()
        .broker_round_trip_time(1, Duration::ZERO)
        .expect("mock round-trip time");
    let x = owned_by_a.lock().unwrap().unwrap();
    // Every partition gets a record, so none is empty.
    for p in 0..4 {
        matched_pair(&f, &producer, &format!("warm-{p}"), p, 1).await;
    }
    send(
        &f,
        &producer,
        &capture("pay-late", "shop", "100.00", 3),
        0,
        at(3),
    )
    .await;
    f.wait_drained(Duration::from_secs(120)).await;
    wait_status(&f, "pay-late", "EXPECTED").await;

    // `a` freezes; pay-late's line goes to its partition (unread: a backlog), while every
    // other partition moves 200 h on. The line's broker time (h24) is long before the
    // stream time: only the backlog, not the broker time, tells that it must be waited for.
    a.sigstop();
    send(
        &f,
        &producer,
        &line("pay-late", "shop", "100.00", "1.00", 24),
        x,
        at(24),
    )
    .await;
    for p in 0..4 {
        matched_pair(&f, &producer, &format!("push-{p}"), p, 200).await;
    }
    // `b` applies its partitions, refreshes the high watermarks and sweeps several times.
    let b_partitions = f.kafka.watermarks();
    crate::helpers::wait_for(
        Duration::from_secs(30),
        "b to apply its partitions",
        || async {
            let offsets = f.db.offsets(&f.group).await;
            let ms = b.metrics().await.unwrap_or_default();
            b_partitions.iter().all(|((t, p), (_, high))| {
                let mine = crate::helpers::owns_partition(&ms, t, *p);
                !mine || *high == 0 || offsets.get(&(t.clone(), *p)) == Some(high)
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = history(&f, "pay-late").await;
    assert!(
        !ever_missing(&held),
        "a false exception while a partition was behind: {held:?}"
    );
    assert_eq!(status(&f, "pay-late").await.as_deref(), Some("EXPECTED"));
    assert!(
        b.metric(
            payrecon::metrics::WATERMARK_PARTITION_STANDING,
            &["standing=\"behind\""]
        )
        .await
        .unwrap_or(0.0)
            >= 1.0,
        "b reports the backlog"
    );

    a.sigcont();
    f.wait_drained(Duration::from_secs(120)).await;
    wait_status(&f, "pay-late", "MATCHED").await;
    assert!(!ever_missing(&history(&f, "pay-late").await));
    for r in [
        "warm-0", "warm-1", "warm-2", "warm-3", "push-0", "push-1", "push-2", "push-3",
    ] {
        assert_eq!(status(&f, r).await.as_deref(), Some("MATCHED"), "{r}");
    }
    assert_eq!(a.terminate(Duration::from_secs(20)).await, Some(0));
    assert_eq!(b.terminate(Duration::from_secs(20)).await, Some(0));
    assert_replay_matches(&f).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_that_becomes_active_after_being_idle_never_reopens_a_judged_deadline() {
    let f = Fixture::new(4).await;
    load_shop(&f).await;
    let service = f.spawn_service("svc", &service_env());
    let producer = f.producer();
    for p in 0..4 {
        matched_pair(&f, &producer, &format!("warm-{p}"), p, 1).await;
    }
    // pay-gone (h5, never settled: deadline h77) on payments partition 0; partitions 0..2
    // move to h100, partition 3 of both topics stays quiet (last broker time h1).
    send(
        &f,
        &producer,
        &capture("pay-gone", "shop", "100.00", 5),
        0,
        at(5),
    )
    .await;
    for p in 0..3 {
        matched_pair(&f, &producer, &format!("push-{p}"), p, 100).await;
    }
    f.wait_drained(Duration::from_secs(60)).await;
    wait_status(&f, "pay-gone", "MISSING_SETTLEMENT").await;

    // Partition 3 becomes active again with an old event time (h50, produced at broker time
    // h101): the group watermark drops below pay-gone's deadline (to h49).
    let revived = capture("pay-revived", "shop", "100.00", 50);
    send(&f, &producer, &revived, 3, at(101)).await;
    f.wait_drained(Duration::from_secs(60)).await;
    wait_status(&f, "pay-revived", "EXPECTED").await;
    // A refund of pay-gone re-evaluates it at the lower group watermark: it keeps the
    // watermark it was judged at, so it does not go back to EXPECTED.
    let Generated::Payment(c) = capture("pay-gone", "shop", "100.00", 6) else {
        unreachable!()
    };
    let refund = Generated::Payment(PaymentEvent {
        event_id: "evt-pay-gone-refund".into(),
        kind: PaymentEventKind::Refund,
        amount: "10.00".parse().unwrap(),
        ..c
    });
    send(&f, &producer, &refund, 0, at(101)).await;
    f.wait_drained(Duration::from_secs(60)).await;
    crate::helpers::wait_for(Duration::from_secs(30), "the refund to be evaluated", || async {
        history(&f, "pay-gone").await.iter().any(|(_, _, _, by)| by.iter().any(|id| id == "evt-pay-gone-refund"))
            || sqlx::query_scalar::<_, i32>(
                "SELECT payment_events FROM reconciliation_items WHERE payment_reference = 'pay-gone'",
            )
            .fetch_one(f.db.store.pool())
            .await
            .unwrap()
                == 2
    })
    .await;
    let h = history(&f, "pay-gone").await;
    assert_eq!(
        status(&f, "pay-gone").await.as_deref(),
        Some("MISSING_SETTLEMENT"),
        "{h:?}"
    );
    assert!(
        !h.iter().any(
            |(from, to, _, _)| from.as_deref() == Some("MISSING_SETTLEMENT") && to == "EXPECTED"
        ),
        "a judged deadline was reopened: {h:?}"
    );
    assert_eq!(status(&f, "pay-revived").await.as_deref(), Some("EXPECTED"));

    // Every partition moves to h130: pay-revived's deadline (h122) passes.
    for p in 0..4 {
        matched_pair(&f, &producer, &format!("later-{p}"), p, 130).await;
    }
    f.wait_drained(Duration::from_secs(60)).await;
    wait_status(&f, "pay-revived", "MISSING_SETTLEMENT").await;
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
    assert_replay_matches(&f).await;
}
