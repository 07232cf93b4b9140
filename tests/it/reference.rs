//! Reference data: operator CSV loads and the cache that refreshes on change.

use std::sync::Arc;
use std::time::Duration;

use payrecon::reference::ReferenceCache;

use crate::helpers::{TestDb, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn a_reference_file_loads_whole_or_not_at_all_and_errors_name_row_and_field() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status\n\
         m1,2026-01-01T00:00:00Z,Shop,EUR,150,0.10,ACTIVE\n\
         m2,2026-01-01T00:00:00Z,Other,EURO,150,0.10,ACTIVE\n",
    )
    .unwrap();
    let out = db.load_reference_file(&bad);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("row 3, field `settlement_currency`"),
        "{stderr}"
    );
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM merchants WHERE merchant_id IN ('m1', 'm2')")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!(count, 0, "a file with an invalid row must load nothing");

    let good = dir.path().join("rates.csv");
    std::fs::write(
        &good,
        "base_currency,quote_currency,valid_from,rate\nUSD,EUR,2026-01-01T00:00:00Z,0.92\n",
    )
    .unwrap();
    let out = db.load_reference_file(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("loaded 1 FX rate versions"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_picks_up_a_change_without_a_restart() {
    let db = TestDb::new().await;
    let cache = Arc::new(ReferenceCache::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(cache.clone().refresh_forever(
        db.store.clone(),
        Duration::from_secs(3600),
        shutdown.clone(),
    ));
    wait_for(Duration::from_secs(10), "the first load", || async {
        cache.snapshot().generation >= 1
    })
    .await;
    let before = cache.snapshot();
    assert!(
        before
            .merchant_at("m1", "2026-02-01T00:00:00Z".parse().unwrap())
            .is_none()
    );

    let file = "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status\n\
                m1,2026-01-01T00:00:00Z,Shop,EUR,150,0.10,ACTIVE\n";
    let payrecon::reference::csv::ReferenceFile::Merchants(m) =
        payrecon::reference::csv::parse(file.as_bytes()).unwrap()
    else {
        panic!("not merchants")
    };
    db.store.upsert_merchants(&m).await.unwrap();
    // The trigger's NOTIFY reloads the cache long before the hourly full reload.
    wait_for(
        Duration::from_secs(10),
        "the cache to see the new merchant",
        || async {
            cache
                .snapshot()
                .merchant_at("m1", "2026-02-01T00:00:00Z".parse().unwrap())
                .is_some()
        },
    )
    .await;
    // A batch holding the old snapshot still sees the old state: consistent within a batch.
    assert!(
        before
            .merchant_at("m1", "2026-02-01T00:00:00Z".parse().unwrap())
            .is_none()
    );
    shutdown.cancel();
    task.await.unwrap();
}
