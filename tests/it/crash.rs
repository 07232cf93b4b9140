//! The service is SIGKILLed at random moments while consuming; after the last restart drains
//! the topics (payments, settlements and bank payouts), PostgreSQL holds exactly the expected
//! events, sums and statuses of both reconciliation legs.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::helpers::{Fixture, simulation};

/// Sum of stored next_offsets: progress of the group.
async fn progress(fx: &Fixture) -> i64 {
    fx.db.offsets(&fx.group).await.values().sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_sigkills_while_consuming_lose_nothing_and_double_nothing() {
    let fx = Fixture::new(4).await;
    let encoder = fx.encoder().await;
    // ~46k payments: > 50,000 payment events plus their settlement lines, on 4+4 partitions.
    let sim =
        payrecon::tools::simulate::simulate(&simulation(46_000, 2026), encoder.payment_schema_id())
            .unwrap();
    let (records, expected) = (sim.records, sim.totals);
    assert!(
        expected.payment_events >= 50_000,
        "{}",
        expected.payment_events
    );
    let seed: u64 = rand::random();
    println!("crash test seed {seed}; {} records", records.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    // The broker (this process) outlives every service process. Produce while killing.
    // 1,000 records/s spreads production over ~100 s, the time ten restarts take (each waits
    // out the killed member's 6 s session), so every restart finds records to consume.
    let producing = fx.produce_in_background(records.clone(), encoder, 1_000);

    // Kill at a random moment once the instance is consuming: it must have committed
    // something since it started, so every kill hits a live consumer mid-stream. Each restart
    // waits out the killed member's session timeout (6 s) before it is assigned; an instance
    // that has not progressed within a minute is killed too, but does not count.
    let mut kills = 0;
    let mut attempts = 0;
    let started = Instant::now();
    while kills < 10 {
        attempts += 1;
        assert!(
            attempts <= 15,
            "only {kills} of {attempts} restarts made progress:\n{}",
            fx.log_tail()
        );
        let before = progress(&fx).await;
        let service = fx.spawn_service(&format!("crash-{attempts}"), &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while progress(&fx).await == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if progress(&fx).await > before {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..700))).await;
            kills += 1;
        }
        service.sigkill();
    }
    println!(
        "{kills} SIGKILLs of consuming instances ({attempts} restarts) in {:?}",
        started.elapsed()
    );
    let last = fx.spawn_service("crash-final", &[]);
    producing.await.unwrap();
    fx.wait_drained(Duration::from_secs(120)).await;
    fx.assert_exact(&expected).await;
    fx.assert_statuses(&sim.statuses).await;
    // The third topic under the same kills: every settlement batch's payout status exact.
    assert!(
        expected.statement_lines > 0,
        "the simulation produces bank payouts"
    );
    fx.assert_payout_statuses(&sim.payout_statuses).await;
    assert_eq!(last.terminate(Duration::from_secs(20)).await, Some(0));
}
