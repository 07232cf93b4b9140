//! The bench's prefilled history (`payrecon bench --prefill N`, `store::growth`): generated
//! inside PostgreSQL in chunks, it is shaped like the service's own rows, its running totals
//! equal the totals recomputed from its rows, and the service and the report work on top of
//! it.

use payrecon::store::growth;

use crate::helpers::TestDb;

const PAYMENTS: i64 = 4_000;

async fn prefilled() -> TestDb {
    let db = TestDb::new().await;
    let end = "2026-01-01T00:00:00Z".parse().unwrap();
    let span = 30.0 * 86_400.0;
    for (from, to) in [(0, 1_500), (1_500, PAYMENTS)] {
        growth::prefill_chunk(db.store.pool(), (from, to, PAYMENTS), span, end)
            .await
            .unwrap();
    }
    growth::prefill_finish(db.store.pool()).await.unwrap();
    db
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(db.store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn prefilled_history_has_the_service_shape_and_totals_equal_to_its_rows() {
    let db = prefilled().await;
    // A capture per payment, a refund for one in ten.
    assert_eq!(
        count(&db, "SELECT count(*) FROM payment_events").await,
        PAYMENTS + PAYMENTS / 10
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM reconciliation_items").await,
        PAYMENTS
    );
    // 97% matched, 0.5% still expected, the rest in an exception status.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reconciliation_items WHERE status = 'MATCHED'"
        )
        .await,
        PAYMENTS * 193 / 200
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reconciliation_items WHERE status = 'EXPECTED'"
        )
        .await,
        PAYMENTS / 200
    );
    // Every item: created EXPECTED, then moved to its status (unless still expected); an
    // outbox row, published, per move into an exception.
    assert_eq!(
        count(&db, "SELECT count(*) FROM reconciliation_history").await,
        2 * PAYMENTS - PAYMENTS / 200
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM exceptions_outbox WHERE published_at IS NOT NULL"
        )
        .await,
        count(
            &db,
            "SELECT count(*) FROM reconciliation_items WHERE status NOT IN ('MATCHED', 'EXPECTED')"
        )
        .await
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM exceptions_outbox WHERE published_at IS NULL"
        )
        .await,
        0
    );
    // An item's settled sums are its lines' sums.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM reconciliation_items i
               JOIN (SELECT payment_reference, sum(gross) AS gross, count(*) AS n
                       FROM settlement_lines GROUP BY 1) l USING (payment_reference)
              WHERE i.settled_gross IS DISTINCT FROM l.gross OR i.settlement_lines <> l.n"
        )
        .await,
        0
    );
    // A payout per settlement batch, each paying the batch's net.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM payout_items p
               JOIN (SELECT batch_id, sum(net) AS net FROM settlement_lines GROUP BY 1) l
                 ON l.batch_id = p.key
              WHERE p.status = 'PAYOUT_MATCHED' AND p.paid = l.net"
        )
        .await,
        count(&db, "SELECT count(DISTINCT batch_id) FROM settlement_lines").await
    );
    // The totals the history implies equal the ones recomputed from its rows.
    let running = db.store.running_totals("payrecon").await.unwrap();
    let recomputed = db.store.recomputed_totals("payrecon").await.unwrap();
    assert!(running.differences(&recomputed).is_empty());
    assert!(!running.payments.is_empty(), "{running:?}");
    assert!(
        db.store
            .daily_totals_differences()
            .await
            .unwrap()
            .is_empty()
    );
    // Every event lies in the 30 days before the end, every business date near its event.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM payment_events
              WHERE event_time < '2025-12-02' OR event_time >= '2026-01-01T01:00:00Z'"
        )
        .await,
        0
    );
}

/// The report's default day is the latest day with figures, found through the per-shard
/// totals' date index; a day's rows are the prefilled ones.
#[tokio::test(flavor = "multi_thread")]
async fn the_report_of_a_prefilled_database_defaults_to_its_latest_day() {
    let db = prefilled().await;
    let latest: chrono::NaiveDate =
        sqlx::query_scalar("SELECT max(business_date) FROM merchant_daily_totals_recomputed")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    let day = db.store.day_report(None, None, 10).await.unwrap().unwrap();
    assert_eq!(day.business_date, latest);
    assert!(!day.merchants.is_empty());
    let one = db
        .store
        .day_report(None, Some("merchant-007"), 10)
        .await
        .unwrap()
        .unwrap();
    assert!(one.business_date <= latest);
    assert!(
        one.merchants
            .iter()
            .all(|m| m.merchant_id == "merchant-007")
    );
    assert!(!one.merchants.is_empty());
}
