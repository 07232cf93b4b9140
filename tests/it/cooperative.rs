//! The cooperative-sticky protocol and static membership on the mock cluster: members join
//! and leave mid-stream, a rebalance moves only the partitions that change owner (added ones
//! `incremental_assign`ed at their stored offsets, revoked ones dropped from the batch being
//! collected), and the totals stay exact.

use std::time::Duration;

use crate::helpers::{Fixture, Service, simulation, wait_for};

/// Logged by the rebalance callback when partitions are taken away.
const REVOKED: &str = "partitions revoked; in-flight work for them is dropped";

/// A configuration file selecting the cooperative protocol (a `[kafka.options]` key cannot be
/// given through the environment).
fn cooperative_config(fx: &Fixture) -> String {
    let path = fx.logs.path().join("cooperative.toml");
    std::fs::write(
        &path,
        "[kafka.options]\n\"partition.assignment.strategy\" = \"cooperative-sticky\"\n",
    )
    .unwrap();
    path.display().to_string()
}

async fn assigned(s: &Service) -> f64 {
    s.metric("payrecon_assigned_partitions", &[])
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn cooperative_members_joining_and_leaving_mid_stream_keep_totals_exact() {
    let fx = Fixture::new(4).await;
    let config = cooperative_config(&fx);
    let env = [
        ("PAYRECON_CONFIG", config.as_str()),
        ("PAYRECON_PIPELINE__BATCH_LINGER", "300ms"),
    ];
    // a collects for 2 s per batch, so b's arrival finds it holding records of the partitions
    // it gives away and of those it keeps: the first must go, the second must commit.
    let env_a = [
        ("PAYRECON_CONFIG", config.as_str()),
        ("PAYRECON_PIPELINE__BATCH_LINGER", "2s"),
        ("PAYRECON_PIPELINE__BATCH_MAX_RECORDS", "1000000"),
    ];
    let encoder = fx.encoder().await;
    let (records, expected) =
        payrecon::tools::simulate::generate(&simulation(15_000, 4242), encoder.payment_schema_id())
            .unwrap();
    let t0 = std::time::Instant::now();
    let a = fx.spawn_service("coop-a", &env_a);
    let producing = fx.produce_in_background(records, encoder, 2_000);
    wait_for(Duration::from_secs(30), "a to commit", || async {
        a.metric("payrecon_batches_total", &["outcome=\"committed\""])
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    let b = fx.spawn_service("coop-b", &env);
    wait_for(Duration::from_secs(60), "b to get partitions", || async {
        assigned(&b).await > 0.0
    })
    .await;
    // a gave up only what b took, incrementally, and kept the rest.
    wait_for(Duration::from_secs(30), "a to give b its share", || async {
        assigned(&a).await + assigned(&b).await == 12.0
    })
    .await;
    assert!(assigned(&a).await > 0.0, "a keeps a share");
    let b_shares = t0.elapsed();
    let production_running = !producing.is_finished();
    let a_log = a.log_text();
    assert!(
        a_log
            .lines()
            .any(|l| l.contains(REVOKED) && l.contains("cooperative=true")),
        "a's partitions must have been revoked incrementally:\n{a_log}"
    );
    let c = fx.spawn_service("coop-c", &env);
    wait_for(Duration::from_secs(60), "c to get partitions", || async {
        assigned(&c).await > 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // One leaves: the others take its partitions at their stored offsets.
    assert_eq!(a.terminate(Duration::from_secs(20)).await, Some(0));
    wait_for(
        Duration::from_secs(60),
        "b and c to own everything",
        || async { assigned(&b).await + assigned(&c).await == 12.0 },
    )
    .await;
    producing.await.unwrap();
    fx.wait_drained(Duration::from_secs(120)).await;
    fx.assert_exact(&expected).await;
    let logs = fx.log_tail();
    for s in [&b, &c] {
        let text = s.log_text();
        assert!(
            !text.contains("applying the assignment failed"),
            "an assignment was refused:\n{text}"
        );
    }
    // The path under test ran: a dropped the given-away partitions' records and kept others.
    let dropped = a_log
        .lines()
        .filter(|l| l.contains("dropping the records of revoked partitions"))
        .inspect(|l| println!("{l}"))
        .count();
    if production_running {
        assert!(
            dropped >= 1,
            "a's 2 s batch was never cut by the revocation:\n{a_log}"
        );
    }
    println!(
        "b shares after {b_shares:?} (production running: {production_running}); batches that lost revoked partitions' records to a rebalance: {dropped}"
    );
    for s in [b, c] {
        assert_eq!(
            s.terminate(Duration::from_secs(20)).await,
            Some(0),
            "{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn static_members_restarting_under_the_same_instance_id_keep_totals_exact() {
    let fx = Fixture::new(4).await;
    let encoder = fx.encoder().await;
    let (records, expected) =
        payrecon::tools::simulate::generate(&simulation(10_000, 4343), encoder.payment_schema_id())
            .unwrap();
    let member = |name: &'static str| {
        [
            ("PAYRECON_KAFKA__STATIC_MEMBERSHIP", "true"),
            ("PAYRECON_KAFKA__GROUP_INSTANCE_ID", name),
        ]
    };
    let a = fx.spawn_service("static-a", &member("payrecon-0"));
    let b = fx.spawn_service("static-b", &member("payrecon-1"));
    let producing = fx.produce_in_background(records, encoder, 2_000);
    wait_for(
        Duration::from_secs(60),
        "both to get partitions",
        || async { assigned(&a).await > 0.0 && assigned(&b).await > 0.0 },
    )
    .await;
    assert!(
        a.log_text()
            .contains("group_instance_id=Some(\"payrecon-0\")"),
        "{}",
        a.log_text()
    );
    // A restart under the same identity.
    assert_eq!(a.terminate(Duration::from_secs(20)).await, Some(0));
    let a = fx.spawn_service("static-a2", &member("payrecon-0"));
    producing.await.unwrap();
    fx.wait_drained(Duration::from_secs(120)).await;
    fx.assert_exact(&expected).await;
    for s in [a, b] {
        assert_eq!(s.terminate(Duration::from_secs(20)).await, Some(0));
    }
}
