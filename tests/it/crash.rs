//! The service is SIGKILLed at random moments while consuming; after the last restart drains
//! the topics, PostgreSQL holds exactly the expected events and sums.

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
    let (records, expected) =
        payrecon::simulate::generate(&simulation(46_000, 2026), encoder.payment_schema_id())
            .unwrap();
    assert!(
        expected.payment_events >= 50_000,
        "{}",
        expected.payment_events
    );
    let seed: u64 = rand::random();
    println!("crash test seed {seed}; {} records", records.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);

    // The broker (this process) outlives every service process. Produce while killing.
    let producing = {
        let records = records.clone();
        let producer = fx.producer();
        let (p, s) = (
            fx.kafka.payments_topic.clone(),
            fx.kafka.settlements_topic.clone(),
        );
        tokio::spawn(async move {
            payrecon::simulate::produce(&producer, &encoder, &p, &s, &records, 4_000, |_| {})
                .await
                .unwrap();
        })
    };

    let mut kills = 0;
    let mut killed_with_progress = 0;
    let started = Instant::now();
    while kills < 10 {
        let before = progress(&fx).await;
        let service = fx.spawn_service(&format!("crash-{kills}"), &[]);
        // Kill at a random moment once it is consuming (it must have committed something
        // since it started, so every kill hits a live consumer mid-stream).
        let deadline = Instant::now() + Duration::from_secs(20);
        while progress(&fx).await == before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if progress(&fx).await > before {
            killed_with_progress += 1;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..700))).await;
        service.sigkill();
        kills += 1;
    }
    println!(
        "{kills} SIGKILLs ({killed_with_progress} after progress) in {:?}",
        started.elapsed()
    );
    producing.await.unwrap();
    let last = fx.spawn_service("crash-final", &[]);
    fx.wait_drained(Duration::from_secs(120)).await;
    fx.assert_exact(&expected).await;
    assert!(
        killed_with_progress >= 8,
        "only {killed_with_progress} kills hit a consuming service"
    );
    assert_eq!(last.terminate(Duration::from_secs(20)).await, Some(0));
}
