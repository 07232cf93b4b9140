//! The offset compare-and-set, driven directly through the store.

use chrono::Utc;
use payrecon::domain::{Currency, PaymentEvent, PaymentEventKind};
use payrecon::engine::Batch;
use payrecon::store::{CommitError, PartitionProgress, Source};

use crate::helpers::TestDb;

fn payment(id: &str, amount: i64) -> PaymentEvent {
    PaymentEvent {
        event_id: id.into(),
        payment_reference: format!("ref-{id}"),
        merchant_id: "m-1".into(),
        kind: PaymentEventKind::Capture,
        amount: rust_decimal::Decimal::new(amount, 2),
        currency: Currency::from_code("EUR").unwrap(),
        event_time: Utc::now(),
        psp_reference: None,
    }
}

fn batch(expected: Option<i64>, first_offset: i64, ids: &[&str]) -> Batch {
    let payments: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                payment(id, 1000),
                Source {
                    topic: 0,
                    partition: 0,
                    offset: first_offset + i as i64,
                },
            )
        })
        .collect();
    Batch {
        topics: vec!["payments".into(), "settlements".into()],
        progress: vec![PartitionProgress {
            topic: "payments".into(),
            partition: 0,
            expected,
            next_offset: first_offset + ids.len() as i64,
            records: ids.len() as i64,
            last_record_time: Some(Utc::now()),
        }],
        payments,
        ..Batch::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_batch_is_rejected_and_rolls_back_entirely() {
    let db = TestDb::new().await;
    let store = &db.store;
    let r = db.reconciler().await;
    // Instance A commits offsets 0..2.
    payrecon::engine::commit_batch(store, "g", "a", &batch(None, 0, &["e0", "e1"]), &r)
        .await
        .unwrap();
    // Instance B took over from offset 2 and committed 2..4.
    payrecon::engine::commit_batch(store, "g", "b", &batch(Some(2), 2, &["e2", "e3"]), &r)
        .await
        .unwrap();
    // A zombie that also started from 2 (with a different event) must be rejected whole.
    let err = payrecon::engine::commit_batch(
        store,
        "g",
        "zombie",
        &batch(Some(2), 2, &["e2", "zombie-only"]),
        &r,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, CommitError::Fenced { partition: 0, .. }),
        "{err:?}"
    );
    // A second first-time commit of the partition is rejected too.
    let err = payrecon::engine::commit_batch(
        store,
        "g",
        "zombie",
        &batch(None, 0, &["zombie-first"]),
        &r,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CommitError::Fenced { .. }), "{err:?}");

    let ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM payment_events ORDER BY event_id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(ids, ["e0", "e1", "e2", "e3"]);
    let (next, applied): (i64, i64) = sqlx::query_as(
        "SELECT next_offset, records_applied FROM consumer_offsets WHERE consumer_group = 'g'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!((next, applied), (4, 4));
    let totals = store.running_totals("g").await.unwrap();
    assert_eq!(totals.payments["m-1/EUR/CAPTURE"].count, 4);
    assert_eq!(
        totals.payments["m-1/EUR/CAPTURE"].sum,
        rust_decimal::Decimal::new(4000, 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_event_changes_nothing_and_is_not_double_counted() {
    let db = TestDb::new().await;
    let store = &db.store;
    let r = db.reconciler().await;
    payrecon::engine::commit_batch(store, "g", "a", &batch(None, 0, &["e0", "e1"]), &r)
        .await
        .unwrap();
    // The same event ids arrive again at later offsets (a producer retry without idempotence).
    let outcome = payrecon::engine::commit_batch(
        store,
        "g",
        "a",
        &batch(Some(2), 2, &["e0", "e1", "e2"]),
        &r,
    )
    .await
    .unwrap();
    assert_eq!(outcome.payments_inserted, 1);
    let totals = store.running_totals("g").await.unwrap();
    assert_eq!(totals.payments["m-1/EUR/CAPTURE"].count, 3);
    assert_eq!(totals, {
        let mut r = store.recomputed_totals("g").await.unwrap();
        r.records = totals.records;
        r
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offset_never_moves_backwards() {
    let db = TestDb::new().await;
    let store = &db.store;
    let r = db.reconciler().await;
    payrecon::engine::commit_batch(store, "g", "a", &batch(None, 0, &["e0", "e1", "e2"]), &r)
        .await
        .unwrap();
    // A batch claiming to start at 3 but ending at 2 is refused.
    let mut b = batch(Some(3), 3, &["x"]);
    b.progress[0].next_offset = 2;
    assert!(matches!(
        payrecon::engine::commit_batch(store, "g", "a", &b, &r).await,
        Err(CommitError::Fenced { .. })
    ));
    assert_eq!(db.offsets("g").await[&("payments".to_string(), 0)], 3);
}
