//! Reference data: operator CSV loads, an append-only history with explicit corrections, and
//! the cache that refreshes on change.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use payrecon::domain::{Currency, PaymentEvent, PaymentEventKind};
use payrecon::reference::ReferenceCache;
use payrecon::tools::simulate::Generated;

use crate::helpers::{Fixture, TestDb, wait_for};
use crate::reconciliation::{at, capture, history, line, money, status, wait_status};

const MERCHANTS_HEADER: &str =
    "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status";

/// Runs `payrecon reference load ARGS...` against `db`.
fn reference_load(db: &TestDb, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .args(["reference", "load"])
        .args(args)
        .env("PAYRECON_DATABASE__URL", &db.url)
        .output()
        .unwrap()
}

/// Writes `rows` under the merchants header to `dir/name`.
fn merchants_file(dir: &Path, name: &str, rows: &[&str]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{MERCHANTS_HEADER}\n{}\n", rows.join("\n"))).unwrap();
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn fee_bps(db: &TestDb, merchant: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT fee_bps::text FROM merchants WHERE merchant_id = $1 ORDER BY valid_from",
    )
    .bind(merchant)
    .fetch_all(db.store.pool())
    .await
    .unwrap()
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(db.store.pool())
        .await
        .unwrap()
}

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
        payrecon::reference::csv::parse(file.as_bytes())
            .unwrap()
            .content
    else {
        panic!("not merchants")
    };
    db.store.load_merchants(&m, None).await.unwrap();
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

#[tokio::test(flavor = "multi_thread")]
async fn loading_an_identical_file_again_changes_nothing_and_counts_it_as_unchanged() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    // A plain date is midnight UTC.
    let file = merchants_file(
        dir.path(),
        "m.csv",
        &[
            "same1,2026-01-01,Shop,EUR,150,0.10,ACTIVE",
            "same1,2026-03-01T00:00:00Z,Shop,EUR,175,0.10,ACTIVE",
        ],
    );
    let first = reference_load(&db, &[file.to_str().unwrap()]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    assert!(
        text(&first.stdout).contains("loaded 2 merchant versions, 0 unchanged"),
        "{}",
        text(&first.stdout)
    );
    let loaded_at = |db: &TestDb| {
        let pool = db.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT max(loaded_at) FROM merchants WHERE merchant_id = 'same1'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let before = loaded_at(&db).await;
    // The same versions, written differently: 150.0 is 150, the date the same midnight.
    let again = merchants_file(
        dir.path(),
        "again.csv",
        &[
            "same1,2026-01-01T00:00:00Z,Shop,EUR,150.0,0.1,ACTIVE",
            "same1,2026-03-01,Shop,EUR,175,0.10,ACTIVE",
        ],
    );
    let second = reference_load(&db, &[again.to_str().unwrap()]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(
        text(&second.stdout).contains("loaded 0 merchant versions, 2 unchanged"),
        "{}",
        text(&second.stdout)
    );
    assert_eq!(loaded_at(&db).await, before, "nothing was rewritten");
    assert_eq!(fee_bps(&db, "same1").await, ["150.0000", "175.0000"]);
    assert_eq!(
        count(&db, "SELECT count(*) FROM reference_corrections").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_fee_for_a_stored_version_is_refused_naming_the_row_and_nothing_is_loaded() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let stored = merchants_file(
        dir.path(),
        "stored.csv",
        &["fixed1,2026-01-01T00:00:00Z,Shop,EUR,150,0.10,ACTIVE"],
    );
    assert!(
        reference_load(&db, &[stored.to_str().unwrap()])
            .status
            .success()
    );

    // A valid rates file and a merchants file with one new merchant and one changed version:
    // the conflict stops the whole command.
    let rates = dir.path().join("rates.csv");
    std::fs::write(
        &rates,
        "base_currency,quote_currency,valid_from,rate\nCHF,EUR,2026-01-01,0.95\n",
    )
    .unwrap();
    let changed = merchants_file(
        dir.path(),
        "changed.csv",
        &[
            "fresh1,2026-01-01T00:00:00Z,New,EUR,100,0,ACTIVE",
            "fixed1,2026-01-01,Shop,EUR,175,0.10,ACTIVE",
        ],
    );
    let out = reference_load(&db, &[rates.to_str().unwrap(), changed.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    for expected in [
        "nothing was loaded",
        &format!("{}: row 3", changed.display()),
        "merchant fixed1 valid from 2026-01-01T00:00:00Z",
        "fee_bps stored 150, file 175",
        "--correct",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing from:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("fee_fixed"),
        "only the fields that differ: {stderr}"
    );
    assert_eq!(fee_bps(&db, "fixed1").await, ["150.0000"]);
    assert!(
        fee_bps(&db, "fresh1").await.is_empty(),
        "the new merchant of that file"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM fx_rates WHERE base_currency = 'CHF'"
        )
        .await,
        0,
        "the other file of the same command"
    );

    // A correction needs a reason, and a blank one is none.
    for args in [vec!["--correct"], vec!["--correct", "--reason", "  "]] {
        let mut all = args.clone();
        all.push(changed.to_str().unwrap());
        let out = reference_load(&db, &all);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            text(&out.stderr).contains("reason"),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(fee_bps(&db, "fixed1").await, ["150.0000"]);
}

/// A USD capture for a merchant that settles in EUR (priced with the USD/EUR rate).
fn usd_capture(reference: &str, merchant: &str, amount: &str, hour: i64) -> Generated {
    Generated::Payment(PaymentEvent {
        event_id: format!("evt-{reference}"),
        payment_reference: reference.into(),
        merchant_id: merchant.into(),
        kind: PaymentEventKind::Capture,
        amount: money(amount),
        currency: Currency::from_code("USD").unwrap(),
        event_time: at(hour),
        psp_reference: None,
    })
}

/// (evaluations) of `reference`'s item.
async fn evaluations(f: &Fixture, reference: &str) -> i64 {
    sqlx::query_scalar("SELECT evaluations FROM reconciliation_items WHERE payment_reference = $1")
        .bind(reference)
        .fetch_one(f.db.store.pool())
        .await
        .unwrap()
}

async fn wait_queue_empty(f: &Fixture) {
    wait_for(
        Duration::from_secs(30),
        "the service to re-evaluate every queued reference",
        || async { count(&f.db, "SELECT count(*) FROM reference_reevaluations").await == 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_correction_is_recorded_and_the_running_service_re_evaluates_the_references_it_affects() {
    let f = Fixture::new(1).await;
    let dir = tempfile::tempdir().unwrap();
    // The operator typed 100 bps; the contract (and the acquirer) says 150.
    let typo = merchants_file(
        dir.path(),
        "typo.csv",
        &[
            "typo,2025-12-31,Typo Shop,EUR,100,0,ACTIVE",
            "calm,2025-12-31,Calm Shop,EUR,100,0,ACTIVE",
        ],
    );
    let out = reference_load(&f.db, &[typo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let service = f.spawn_service("a", &[]);
    let encoder = f.encoder().await;
    f.produce_records(
        &encoder,
        &[
            // Settled at 150 bps: a fee mismatch against the typo once due.
            capture("typo-1", "typo", "100.00", 2),
            line("typo-1", "typo", "100.00", "1.50", 26),
            // Priced with the USD/EUR rate of the simulation's reference data.
            usd_capture("typo-usd", "typo", "50.00", 3),
            capture("calm-1", "calm", "100.00", 2),
            line("calm-1", "calm", "100.00", "1.00", 26),
            // Moves the watermark past every deadline above.
            capture("calm-push", "calm", "10.00", 200),
            line("calm-push", "calm", "10.00", "0.10", 200),
        ],
        0,
    )
    .await;
    wait_status(&f, "typo-1", "FEE_MISMATCH").await;
    wait_status(&f, "calm-1", "MATCHED").await;
    let calm_evaluations = evaluations(&f, "calm-1").await;

    let fixed = merchants_file(
        dir.path(),
        "fixed.csv",
        &["typo,2025-12-31,Typo Shop,EUR,150,0,ACTIVE"],
    );
    let out = reference_load(
        &f.db,
        &[
            "--correct",
            "--reason",
            "fee typo: the contract says 150 bps",
            "--by",
            "alice",
            fixed.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("corrected 1 (re-evaluating 2 payment references)"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(fee_bps(&f.db, "typo").await, ["150.0000"]);
    let (key, previous, corrected, until, reason, by, source): (
        serde_json::Value,
        serde_json::Value,
        serde_json::Value,
        Option<chrono::DateTime<chrono::Utc>>,
        String,
        String,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT version_key, previous, corrected, valid_until, reason, corrected_by, source
           FROM reference_corrections WHERE table_name = 'merchants' AND corrected_at <= now()",
    )
    .fetch_one(f.db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        key,
        serde_json::json!({"merchant_id": "typo", "valid_from": "2025-12-31T00:00:00Z"})
    );
    assert_eq!(
        (&previous["fee_bps"], &corrected["fee_bps"]),
        (&"100".into(), &"150".into())
    );
    assert_eq!(previous["name"], corrected["name"]);
    assert_eq!(until, None, "the current version: its window is open");
    assert_eq!(
        (reason.as_str(), by.as_str()),
        ("fee typo: the contract says 150 bps", "alice")
    );
    assert!(source.unwrap().ends_with("fixed.csv"));

    // The running service re-evaluates the affected references after its cache reloads.
    wait_status(&f, "typo-1", "MATCHED").await;
    let h = history(&f, "typo-1").await;
    let last = h.last().unwrap();
    assert_eq!(
        (last.0.as_deref(), last.1.as_str(), last.2.as_str()),
        (Some("FEE_MISMATCH"), "MATCHED", "REFERENCE_DATA")
    );
    wait_queue_empty(&f).await;
    assert_eq!(
        evaluations(&f, "calm-1").await,
        calm_evaluations,
        "another merchant's reference is left alone"
    );

    // An FX rate correction re-evaluates the references converted with that pair in its
    // window: the USD capture, not the EUR ones.
    let (usd_before, typo_before) = (
        evaluations(&f, "typo-usd").await,
        evaluations(&f, "typo-1").await,
    );
    let rate = dir.path().join("rate.csv");
    std::fs::write(
        &rate,
        "base_currency,quote_currency,valid_from,rate\nUSD,EUR,2025-12-31,0.5\n",
    )
    .unwrap();
    let out = reference_load(
        &f.db,
        &[
            "--correct",
            "--reason",
            "wrong USD/EUR fixing",
            rate.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("corrected 1 (re-evaluating 1 payment references)"),
        "{}",
        text(&out.stdout)
    );
    let until: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT valid_until FROM reference_corrections WHERE table_name = 'fx_rates'",
    )
    .fetch_one(f.db.store.pool())
    .await
    .unwrap();
    assert_eq!(until, Some(at(5 * 24)), "up to the pair's next version");
    wait_for(
        Duration::from_secs(30),
        "typo-usd to be re-evaluated",
        || async { evaluations(&f, "typo-usd").await > usd_before },
    )
    .await;
    wait_queue_empty(&f).await;
    assert_eq!(evaluations(&f, "typo-1").await, typo_before);
    assert_eq!(status(&f, "typo-1").await.as_deref(), Some("MATCHED"));

    // The record of corrections cannot be edited.
    let err = sqlx::query("DELETE FROM reference_corrections")
        .execute(f.db.store.pool())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
    drop(service);
}
