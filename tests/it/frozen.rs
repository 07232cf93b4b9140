//! A frozen instance inside its batch transaction (SIGSTOP while its session holds offset-row
//! locks) cannot hold its partitions for long: the server ends the session idle in its
//! transaction after `database.session.idle_in_transaction_session_timeout`, the next owner's
//! lock waits give up after `lock_timeout` and are retried, and the partitions continue on the
//! other instance within a stated bound. When the frozen one resumes, its stale batch commits
//! nothing.

use std::time::{Duration, Instant};

use crate::helpers::{Fixture, simulation};

/// Whether a payrecon session of this database holds a lock on `consumer_offsets` inside a
/// transaction.
async fn in_transaction_on_offsets(fx: &Fixture) -> bool {
    sqlx::query_scalar(
        "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
          WHERE a.application_name = 'payrecon' AND a.datname = current_database()
            AND a.xact_start IS NOT NULL AND l.relation = 'consumer_offsets'::regclass",
    )
    .fetch_one(fx.db.store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_session_holding_offset_rows_loses_its_partitions_within_the_stated_bound() {
    let fx = Fixture::new(2).await;
    let encoder = fx.encoder().await;
    let sim =
        payrecon::tools::simulate::simulate(&simulation(12_000, 77), encoder.payment_schema_id())
            .unwrap();
    let (records, expected) = (sim.records, sim.totals);
    // Small timeouts so the test is quick; the bound scales with them.
    let session = [
        (
            "PAYRECON_DATABASE__SESSION__IDLE_IN_TRANSACTION_SESSION_TIMEOUT",
            "4s",
        ),
        ("PAYRECON_DATABASE__SESSION__LOCK_TIMEOUT", "2s"),
        // Small batches: the frozen one holds its locks while records keep flowing.
        ("PAYRECON_PIPELINE__BATCH_MAX_RECORDS", "200"),
    ];
    let producing = fx.produce_in_background(records, encoder, 1_000);
    let frozen = fx.spawn_service("frozen", &session);

    // Once it consumes, freeze it while its session holds offset-row locks inside the batch
    // transaction.
    crate::helpers::wait_for(Duration::from_secs(60), "the first commit", || async {
        fx.db.offsets(&fx.group).await.values().sum::<i64>() > 0
    })
    .await;
    let mut caught = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if in_transaction_on_offsets(&fx).await {
            frozen.sigstop();
            if in_transaction_on_offsets(&fx).await {
                caught = true;
                break;
            }
            frozen.sigcont();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        caught,
        "never caught the instance inside its transaction\n{}",
        fx.log_tail()
    );
    let frozen_at = Instant::now();
    let at_freeze: i64 = fx.db.offsets(&fx.group).await.values().sum();
    let other = fx.spawn_service("successor", &session);

    // The server ends the frozen session: its locks go with it.
    let mut released = None;
    let mut moved = None;
    while frozen_at.elapsed() < Duration::from_secs(60) && moved.is_none() {
        if released.is_none() && !in_transaction_on_offsets(&fx).await {
            released = Some(frozen_at.elapsed());
        }
        let now: i64 = fx.db.offsets(&fx.group).await.values().sum();
        if now > at_freeze {
            moved = Some(frozen_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let released = released.expect("the frozen session kept its locks");
    let moved = moved.unwrap_or_else(|| panic!("no partition moved on\n{}", fx.log_tail()));
    println!("frozen session ended after {released:?}; the successor committed after {moved:?}");
    // Bound: the group's session timeout (6 s) for the successor to be assigned, plus the
    // idle-in-transaction timeout (4 s) for the locks, plus one lock_timeout (2 s) and the
    // retry backoff (up to 1 s) for a wait that began before the locks were released.
    assert!(
        released <= Duration::from_secs(4 + 3),
        "the server ended the frozen session only after {released:?}"
    );
    assert!(
        moved <= Duration::from_secs(6 + 4 + 2 + 1 + 4),
        "the partitions continued only after {moved:?}"
    );

    frozen.sigcont();
    producing.await.unwrap();
    fx.wait_drained(Duration::from_secs(120)).await;
    fx.assert_exact(&expected).await;
    fx.assert_statuses(&sim.statuses).await;
    assert_eq!(other.terminate(Duration::from_secs(20)).await, Some(0));
    let _ = frozen.terminate(Duration::from_secs(20)).await;
}
