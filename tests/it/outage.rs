//! PostgreSQL connections are killed and the broker goes down mid-run; the service retries
//! and recovers with exact totals.

use std::time::Duration;

use crate::helpers::{Fixture, simulation, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn terminated_database_connections_and_a_broker_outage_are_survived_exactly() {
    let fx = Fixture::new(4).await;
    let encoder = fx.encoder().await;
    let (records, expected) =
        payrecon::tools::simulate::generate(&simulation(12_000, 5), encoder.payment_schema_id())
            .unwrap();
    let service = fx.spawn_service("outage", &[]);
    let producing = fx.produce_in_background(records, encoder, 2_500);
    wait_for(Duration::from_secs(30), "first commits", || async {
        !fx.db.offsets(&fx.group).await.is_empty()
    })
    .await;

    // Kill every connection of the service, several times, while it commits.
    let admin = sqlx::PgPool::connect(&crate::helpers::admin_url())
        .await
        .unwrap();
    let mut terminated: Vec<i32> = Vec::new();
    for _ in 0..5 {
        let pids: Vec<i32> = sqlx::query_scalar(
            // OFFSET 0 keeps the filter below the volatile call: only the service's sessions.
            "SELECT pid FROM (SELECT pid FROM pg_stat_activity
                               WHERE datname = $1 AND application_name = 'payrecon'
                                 AND pid <> pg_backend_pid() OFFSET 0) s
              WHERE pg_terminate_backend(pid)",
        )
        .bind(&fx.db.name)
        .fetch_all(&admin)
        .await
        .unwrap();
        terminated.extend(pids);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        !terminated.is_empty(),
        "no service connection was terminated"
    );

    // The broker goes down and comes back.
    fx.kafka.mock().broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    fx.kafka.mock().broker_up(1).unwrap();

    producing.await.unwrap();
    fx.wait_drained(Duration::from_secs(90)).await;
    // The embedded broker deduplicates only transactional producers' retries
    // (rd_kafka_mock_validate_records): a produce request whose answer the outage cut off is
    // appended again when the producer retries it, so the log may hold a record twice. Each
    // copy is applied (offsets, records_applied) and inserts nothing the second time; every
    // other figure stays the generated one. Seen once in CI: 26,894 records for 26,893.
    let in_log: i64 = fx
        .kafka
        .watermarks()
        .values()
        .map(|(low, high)| high - low)
        .sum();
    assert!(
        in_log >= expected.records && in_log <= expected.records + 50,
        "the log holds {in_log} records for {} produced",
        expected.records
    );
    let mut expected = expected;
    expected.records = in_log;
    fx.assert_exact(&expected).await;
    // The service kept working on new sessions: none of the terminated ones is left.
    let alive: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
            .bind(&terminated)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(alive, 0, "terminated sessions are still listed");
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(fx.db.store.pool())
        .await
        .unwrap();
    assert_eq!(dead, 0, "transient failures must never dead-letter");
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
}
