//! The reporting views and `payrecon report`, on reconciliation state written by the real
//! batch transaction (`Store::commit_batch`), not by hand-made rows.
//!
//! The day: merchant-000 (EUR, 150 bps + 0.25 fixed in the simulator's reference data) has a
//! payment settled exactly (MATCHED) and one settled 5.00 short whose deadline passes
//! (AMOUNT_MISMATCH); merchant-001 (USD, 150 bps) has one MATCHED payment. A later payment
//! and line three days on, on the same two partitions, push the watermark past the deadline.
//! `--verify` is tried on that day tampered with in one place at a time (a fresh database
//! each), and once after a real service run over simulated traffic, where it must find
//! nothing.

use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use payrecon::domain::{Currency, PaymentEvent, PaymentEventKind, SettlementLine};
use payrecon::engine::Batch;
use payrecon::store::{PartitionProgress, Source};
use payrecon::tools::report::Report;
use payrecon::tools::simulate::SimulationOptions;
use rust_decimal::Decimal;

use crate::helpers::{Fixture, TestDb};

const PAYMENTS: &str = "payments";
const SETTLEMENTS: &str = "settlements";

/// `hours` after 2026-01-01T10:00:00Z.
fn at(hours: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 10, 0, 0).unwrap() + chrono::Duration::hours(hours)
}

fn day(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

fn money(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn capture(
    reference: &str,
    merchant: &str,
    amount: &str,
    currency: &str,
    hour: i64,
) -> PaymentEvent {
    PaymentEvent {
        event_id: format!("evt-{reference}"),
        payment_reference: reference.into(),
        merchant_id: merchant.into(),
        kind: PaymentEventKind::Capture,
        amount: money(amount),
        currency: Currency::from_code(currency).unwrap(),
        event_time: at(hour),
        psp_reference: None,
    }
}

fn line(
    reference: &str,
    merchant: &str,
    (gross, fee): (&str, &str),
    currency: &str,
    hour: i64,
) -> SettlementLine {
    let (gross, fee) = (money(gross), money(fee));
    SettlementLine {
        line_id: format!("line-{reference}"),
        batch_id: "settlement-batch-1".into(),
        payment_reference: reference.into(),
        merchant_id: merchant.into(),
        gross,
        fee,
        net: gross - fee,
        currency: Currency::from_code(currency).unwrap(),
        settlement_date: at(hour).date_naive(),
        event_time: at(hour),
    }
}

/// One batch over partition 0 of both topics, starting at `first` on each (`None`: the
/// partitions' first commit).
fn batch(first: Option<i64>, payments: Vec<PaymentEvent>, lines: Vec<SettlementLine>) -> Batch {
    let start = first.unwrap_or(0);
    let progress = |topic: &str, records: usize| PartitionProgress {
        topic: topic.into(),
        partition: 0,
        expected: first,
        next_offset: start + records as i64,
        records: records as i64,
        last_record_time: Some(Utc::now()),
    };
    let source = |topic, i: usize| Source {
        topic,
        partition: 0,
        offset: start + i as i64,
    };
    Batch {
        topics: vec![PAYMENTS.into(), SETTLEMENTS.into()],
        progress: vec![
            progress(PAYMENTS, payments.len()),
            progress(SETTLEMENTS, lines.len()),
        ],
        payments: (payments.into_iter().enumerate())
            .map(|(i, p)| (p, source(0, i)))
            .collect(),
        settlements: (lines.into_iter().enumerate())
            .map(|(i, l)| (l, source(1, i)))
            .collect(),
        ..Batch::default()
    }
}

/// The day described in the module doc, committed through the store; returns when the
/// mismatch is an open exception.
async fn reconciled_day(db: &TestDb) {
    let store = &db.store;
    let reconciler = db.reconciler().await;
    // Expected fees: 100.00 × 1.5 % + 0.25 = 1.75; 50.00 × 1.5 % + 0.25 = 1.00;
    // 20.00 USD × 1.5 % = 0.30.
    let first = batch(
        None,
        vec![
            capture("pay-matched", "merchant-000", "100.00", "EUR", 0),
            capture("pay-usd", "merchant-001", "20.00", "USD", 1),
            capture("pay-short", "merchant-000", "50.00", "EUR", 2),
        ],
        vec![
            line("pay-matched", "merchant-000", ("100.00", "1.75"), "EUR", 1),
            line("pay-usd", "merchant-001", ("20.00", "0.30"), "USD", 2),
            line("pay-short", "merchant-000", ("45.00", "1.00"), "EUR", 3),
        ],
    );
    payrecon::engine::commit_batch(store, "g", "a", &first, &reconciler)
        .await
        .unwrap();
    assert_eq!(
        status(db, "pay-short").await,
        "EXPECTED",
        "in time until +75 h"
    );
    // +80 h on both partitions: watermark +79 h, past pay-short's deadline (+3 h + 72 h).
    let later = batch(
        Some(3),
        vec![capture("pay-later", "merchant-000", "10.00", "EUR", 80)],
        vec![line(
            "pay-later",
            "merchant-000",
            ("10.00", "0.40"),
            "EUR",
            80,
        )],
    );
    let outcome = payrecon::engine::commit_batch(store, "g", "a", &later, &reconciler)
        .await
        .unwrap();
    assert_eq!(outcome.reconciliation.exceptions_opened, 1);
    assert_eq!(status(db, "pay-short").await, "AMOUNT_MISMATCH");
}

async fn status(db: &TestDb, reference: &str) -> String {
    sqlx::query_scalar("SELECT status FROM reconciliation_items WHERE payment_reference = $1")
        .bind(reference)
        .fetch_one(db.store.pool())
        .await
        .unwrap()
}

/// `payrecon report ARGS` against `db`: (exit code, stdout, stderr).
fn payrecon_report(db: &TestDb, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .arg("report")
        .args(args)
        .env("PAYRECON_DATABASE__URL", &db.url)
        .env("PAYRECON_LOG__FILTER", "warn")
        .env_remove("RUST_LOG")
        .env_remove("PAYRECON_CONFIG")
        .output()
        .expect("running payrecon report");
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_shows_the_days_open_exception_and_merchant_totals_exactly() {
    let db = TestDb::new().await;
    reconciled_day(&db).await;
    let started = Utc::now() - chrono::Duration::minutes(10);

    let report: Report =
        payrecon::tools::report::build(&db.store, Some(day("2026-01-01")), None, 50)
            .await
            .unwrap();
    let json = serde_json::to_value(&report).unwrap();

    // The open exception, amounts as decimal strings in the currency's minor units.
    assert_eq!(json["business_date"], "2026-01-01");
    assert_eq!(json["open_exceptions_total"], 1);
    let exceptions = json["open_exceptions"].as_array().unwrap();
    assert_eq!(exceptions.len(), 1);
    let e = &exceptions[0];
    let since = e["since"].as_str().unwrap().to_owned();
    let reason = e["reason"].as_str().unwrap().to_owned();
    // The matcher's own text (how it prints the settled amount is its business).
    assert!(
        reason.starts_with("gross: settled 45") && reason.contains("expected 50.00 EUR"),
        "{reason}"
    );
    assert!(
        DateTime::parse_from_rfc3339(&since).unwrap() > started,
        "since is the time of the history row: {since}"
    );
    assert_eq!(
        *e,
        serde_json::json!({
            "payment_reference": "pay-short",
            "merchant_id": "merchant-000",
            "business_date": "2026-01-01",
            "currency": "EUR",
            "status": "AMOUNT_MISMATCH",
            "expected_gross": "50.00",
            "expected_fee": "1.00",
            "expected_net": "49.00",
            "settled_currency": "EUR",
            "settled_gross": "45.00",
            "settled_fee": "1.00",
            "settled_net": "44.00",
            "difference": "-5.00",
            "reason": reason,
            "since": since,
            // Once when its records arrived, once when the watermark passed its deadline.
            "evaluations": 2,
        })
    );

    // Per merchant and currency on that day.
    assert_eq!(
        json["merchants"],
        serde_json::json!([
            {
                "business_date": "2026-01-01", "merchant_id": "merchant-000", "currency": "EUR",
                "captured_count": 2, "captured": "150.00",
                "refunded_count": 0, "refunded": "0.00",
                "charged_back_count": 0, "charged_back": "0.00",
                "net_captured": "150.00",
                "settled_count": 2, "settled_gross": "145.00", "settled_fees": "2.75",
                "settled_net": "142.25",
                "matched_count": 1, "expected_count": 0, "exception_count": 1,
                "match_rate": "0.5000",
                "items_expected_net": "147.25", "items_settled_net": "142.25",
                "items_net_difference": "-5.00",
            },
            {
                "business_date": "2026-01-01", "merchant_id": "merchant-001", "currency": "USD",
                "captured_count": 1, "captured": "20.00",
                "refunded_count": 0, "refunded": "0.00",
                "charged_back_count": 0, "charged_back": "0.00",
                "net_captured": "20.00",
                "settled_count": 1, "settled_gross": "20.00", "settled_fees": "0.30",
                "settled_net": "19.70",
                "matched_count": 1, "expected_count": 0, "exception_count": 0,
                "match_rate": "1.0000",
                "items_expected_net": "19.70", "items_settled_net": "19.70",
                "items_net_difference": "0.00",
            },
        ])
    );
    assert!(json.get("verification").is_none());

    // The text form lists the same rows.
    let text = payrecon::tools::report::render(&report);
    assert!(
        text.contains("Reconciliation report for 2026-01-01 (all merchants)"),
        "{text}"
    );
    assert!(text.contains("Open exceptions: 1"), "{text}");
    let row = (text.lines().find(|l| l.starts_with("pay-short")))
        .unwrap_or_else(|| panic!("no row for pay-short:\n{text}"));
    let cells: Vec<&str> = row.split_whitespace().take(9).collect();
    assert_eq!(
        cells,
        [
            "pay-short",
            "merchant-000",
            "EUR",
            "AMOUNT_MISMATCH",
            "50.00",
            "45.00",
            "1.00",
            "1.00",
            "-5.00"
        ]
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("merchant-001") && l.contains("100.00%")),
        "{text}"
    );

    // Filters: one merchant; the limit keeps the total.
    let one = payrecon::tools::report::build(
        &db.store,
        Some(day("2026-01-01")),
        Some("merchant-001"),
        50,
    )
    .await
    .unwrap();
    assert_eq!(one.open_exceptions_total, 0);
    assert!(one.open_exceptions.is_empty());
    assert_eq!(
        one.merchants
            .iter()
            .map(|m| m.merchant_id.as_str())
            .collect::<Vec<_>>(),
        ["merchant-001"]
    );
    let limited = payrecon::tools::report::build(&db.store, Some(day("2026-01-01")), None, 0)
        .await
        .unwrap();
    assert_eq!(
        (limited.open_exceptions_total, limited.open_exceptions.len()),
        (1, 0)
    );

    // Without --date: the latest business day, where only the later payment is (matched).
    let latest = payrecon::tools::report::build(&db.store, None, None, 50)
        .await
        .unwrap();
    assert_eq!(latest.business_date, Some(day("2026-01-04")));
    assert_eq!(latest.open_exceptions_total, 0);
    let rows: Vec<_> = (latest.merchants.iter())
        .map(|m| {
            (
                m.merchant_id.as_str(),
                m.captured.to_string(),
                m.settled_net.to_string(),
                m.match_rate,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [(
            "merchant-000",
            "10.00".into(),
            "9.60".into(),
            Some(money("1.0000"))
        )]
    );

    // The binary prints the same document, and --verify finds the totals exact.
    let (code, stdout, stderr) = payrecon_report(&db, &["--json", "--date", "2026-01-01"]);
    assert_eq!(code, Some(0), "{stderr}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).expect(&stdout);
    assert_eq!(printed, json);
    let (code, stdout, stderr) = payrecon_report(&db, &["--json", "--verify"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let printed: serde_json::Value = serde_json::from_str(&stdout).expect(&stdout);
    assert_eq!(printed["business_date"], "2026-01-04");
    assert_eq!(printed["verification"]["consistent"], true, "{stdout}");
    let (code, stdout, stderr) = payrecon_report(&db, &["--verify", "--merchant", "merchant-000"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("Reconciliation report for 2026-01-04 (merchant merchant-000)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Verification: all 14 checks passed"),
        "{stdout}"
    );
}

/// `payrecon report --verify --json` against `db`: (exit code, the checks by name).
fn verify_json(db: &TestDb) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let (code, stdout, stderr) = payrecon_report(db, &["--verify", "--json"]);
    let printed: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    let checks = printed["verification"]["checks"]
        .as_array()
        .unwrap()
        .clone();
    (code, checks, stdout)
}

#[tokio::test(flavor = "multi_thread")]
async fn report_verify_passes_every_check_on_the_reconciled_day_and_says_what_it_compared() {
    let db = TestDb::new().await;
    reconciled_day(&db).await;

    let (code, checks, stdout) = verify_json(&db);
    assert_eq!(code, Some(0), "{stdout}");
    let compared: Vec<(String, i64, i64)> = checks
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["checked"].as_i64().unwrap(),
                c["differing"].as_i64().unwrap(),
            )
        })
        .collect();
    let expected = [
        // Two merchants with one currency and one kind each.
        ("payment_totals", 2),
        ("settlement_totals", 2),
        // Both merchants on 2026-01-01, merchant-000 again on 2026-01-04.
        ("daily_totals", 3),
        // pay-matched, pay-usd, pay-short, pay-later.
        ("item_records", 4),
        ("item_verdicts", 4),
        ("item_history", 4),
        // One row per item, two for pay-short (EXPECTED, then AMOUNT_MISMATCH).
        ("history_chains", 5),
        // pay-short opened an exception.
        ("exceptions_outbox", 1),
        // No statement line; one settlement batch, its lines in EUR and USD: a payout
        // currency mismatch at once (one item, one history row, one outbox row).
        ("payout_totals", 0),
        ("payout_verdicts", 1),
        ("payout_history", 2),
        ("payout_outbox", 1),
        // Partition 0 of both topics, in group g.
        ("offsets_records_applied", 2),
        ("offsets_cover_rows", 2),
    ];
    assert_eq!(
        compared,
        expected.map(|(n, checked)| (n.to_owned(), checked, 0)),
        "{stdout}"
    );
    // Contiguous offsets from 0, no duplicate: nothing left unexplained.
    let note = (checks.iter())
        .find(|c| c["name"] == "offsets_records_applied")
        .and_then(|c| c["note"].as_str())
        .unwrap();
    assert!(
        note.starts_with("0 offset(s) below next_offset not applied"),
        "{note}"
    );
    assert!(
        note.contains("; 0 record(s) applied without a row"),
        "{note}"
    );

    let (code, stdout, stderr) = payrecon_report(&db, &["--verify"]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("Verification: all 14 checks passed"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn report_verify_passes_after_a_service_run_with_duplicates_dead_letters_and_late_lines() {
    let f = Fixture::new(2).await;
    let service = f.spawn_service("svc", &[]);
    // Simulator defaults (mismatches, refunds, late lines, duplicates) and malformed records.
    let options = SimulationOptions {
        payments: 600,
        seed: 7,
        malformed: 6,
        ..SimulationOptions::default()
    };
    let expected = f.produce(&options).await;
    f.wait_drained(Duration::from_secs(120)).await;
    f.assert_exact(&expected).await;
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));

    // With the service's own settings, so the re-evaluation uses its rules.
    let out = Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .args(["report", "--verify", "--json"])
        .envs(f.service_env())
        .env("PAYRECON_LOG__FILTER", "warn")
        .env_remove("RUST_LOG")
        .env_remove("PAYRECON_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let checks = printed["verification"]["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 14);
    for c in checks {
        // A run may open no payout exception at all: then the payout outbox has nothing.
        if c["name"] == "payout_outbox" {
            continue;
        }
        assert!(c["checked"].as_i64().unwrap() > 0, "compared nothing: {c}");
    }
    // Duplicates were applied without a row of their own, and that is no difference.
    let note = (checks.iter())
        .find(|c| c["name"] == "offsets_records_applied")
        .and_then(|c| c["note"].as_str())
        .unwrap();
    assert!(
        !note.contains("; 0 record(s) applied without a row"),
        "{note}"
    );
}

/// A derived table tampered with by hand, and the checks that must name it (check, the start
/// of the differing row's key).
struct Tamper {
    what: &'static str,
    sql: &'static str,
    caught_by: &'static [(&'static str, &'static str)],
}

const TAMPERS: &[Tamper] = &[
    Tamper {
        what: "a running-total count +1",
        sql: "UPDATE merchant_payment_totals_by_shard SET event_count = event_count + 1
               WHERE merchant_id = 'merchant-001'",
        caught_by: &[("payment_totals", "merchant-001/USD/CAPTURE")],
    },
    Tamper {
        what: "a running-total amount_sum changed",
        sql: "UPDATE merchant_payment_totals_by_shard SET amount_sum = amount_sum - 0.01
               WHERE merchant_id = 'merchant-000'",
        caught_by: &[("payment_totals", "merchant-000/EUR/CAPTURE")],
    },
    Tamper {
        what: "a settlement running total's fee_sum changed",
        sql: "UPDATE merchant_settlement_totals_by_shard SET fee_sum = fee_sum + 1
               WHERE merchant_id = 'merchant-001'",
        caught_by: &[("settlement_totals", "merchant-001/USD")],
    },
    Tamper {
        what: "a daily total changed",
        sql: "UPDATE merchant_daily_totals_by_shard SET captured = captured + 1
               WHERE merchant_id = 'merchant-001' AND business_date = '2026-01-01'",
        caught_by: &[("daily_totals", "merchant-001/2026-01-01/USD")],
    },
    Tamper {
        what: "an offset -1",
        sql: "UPDATE consumer_offsets SET next_offset = next_offset - 1 WHERE topic = 'payments'",
        caught_by: &[
            // The event at offset 3 is now an effect without its offset...
            ("offsets_cover_rows", "payment_events payments[0]"),
            // ...and 4 records cannot have been applied below offset 3.
            ("offsets_records_applied", "g/payments[0]"),
        ],
    },
    Tamper {
        what: "records_applied +1",
        sql: "UPDATE consumer_offsets SET records_applied = records_applied + 1
               WHERE topic = 'settlements'",
        caught_by: &[("offsets_records_applied", "g/settlements[0]")],
    },
    Tamper {
        what: "records_applied -1",
        sql: "UPDATE consumer_offsets SET records_applied = records_applied - 1
               WHERE topic = 'payments'",
        caught_by: &[("offsets_records_applied", "g/payments[0]")],
    },
    Tamper {
        what: "an item's stored settled sum changed",
        sql: "UPDATE reconciliation_items
                 SET settled_gross = settled_gross + 1, settled_net = settled_net + 1
               WHERE payment_reference = 'pay-matched'",
        caught_by: &[("item_records", "pay-matched")],
    },
    Tamper {
        what: "an item's stored expected fee changed",
        sql: "UPDATE reconciliation_items SET expected_fee = 0
               WHERE payment_reference = 'pay-usd'",
        caught_by: &[("item_verdicts", "pay-usd")],
    },
    Tamper {
        what: "an item's running state changed (the next batch would fold onto it)",
        sql: "UPDATE reconciliation_items
                 SET state = jsonb_set(state::jsonb, '{expected_fee}', '\"0\"')::text
               WHERE payment_reference = 'pay-usd'",
        caught_by: &[("item_verdicts", "pay-usd")],
    },
    Tamper {
        what: "an item's status changed without history",
        sql: "UPDATE reconciliation_items SET status = 'MATCHED'
               WHERE payment_reference = 'pay-short'",
        caught_by: &[
            ("item_history", "pay-short"),
            ("item_verdicts", "pay-short"),
            ("daily_totals", "merchant-000/2026-01-01/EUR"),
        ],
    },
    Tamper {
        what: "a history row deleted",
        sql: "DELETE FROM reconciliation_history
               WHERE payment_reference = 'pay-short' AND from_status IS NULL",
        caught_by: &[("history_chains", "pay-short #")],
    },
    Tamper {
        what: "an outbox row deleted",
        sql: "DELETE FROM exceptions_outbox WHERE leg = 'SETTLEMENT'",
        caught_by: &[("exceptions_outbox", "history #")],
    },
    Tamper {
        what: "a payout item's state is not JSON (text can hold anything)",
        sql: "UPDATE payout_items SET state = 'not json'",
        caught_by: &[("payout_verdicts", "BATCH/")],
    },
];

#[tokio::test(flavor = "multi_thread")]
async fn report_verify_exits_2_and_names_the_check_for_each_kind_of_tampering() {
    for tamper in TAMPERS {
        // A fresh database each time: every check proves it catches its own fault.
        let db = TestDb::new().await;
        reconciled_day(&db).await;
        let (code, _, stdout) = verify_json(&db);
        assert_eq!(code, Some(0), "{}, before tampering: {stdout}", tamper.what);
        let changed = sqlx::query(tamper.sql)
            .execute(db.store.pool())
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(changed, 1, "{}", tamper.what);

        let (code, checks, stdout) = verify_json(&db);
        assert_eq!(code, Some(2), "{}: {stdout}", tamper.what);
        for (name, key) in tamper.caught_by {
            let check = (checks.iter())
                .find(|c| c["name"] == *name)
                .unwrap_or_else(|| panic!("no check {name}"));
            let differences = check["differences"].as_array().unwrap();
            assert!(
                check["differing"].as_i64().unwrap() >= 1
                    && differences
                        .iter()
                        .any(|d| d["key"].as_str().unwrap().starts_with(key)),
                "{}: {name} does not name {key}: {check}",
                tamper.what
            );
        }
        let (code, stdout, stderr) = payrecon_report(&db, &["--verify", "--date", "2026-01-01"]);
        assert_eq!(code, Some(2), "{}: {stdout}\n{stderr}", tamper.what);
        let (name, key) = tamper.caught_by[0];
        assert!(
            stdout.contains("checks FAILED") && stdout.contains(&format!("\n{name} (")),
            "{}: {stdout}",
            tamper.what
        );
        assert!(
            stdout.contains(&format!("\n  {key}")),
            "{}: {stdout}",
            tamper.what
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn report_verify_lists_the_differing_columns_stored_and_recomputed() {
    let db = TestDb::new().await;
    reconciled_day(&db).await;
    let rules = db.reconciler().await.rules;
    assert!(
        payrecon::tools::report::verify(&db.store, &rules)
            .await
            .unwrap()
            .consistent
    );
    // A running total that no longer equals the rows (a lost or doubled increment).
    sqlx::query(
        "UPDATE merchant_daily_totals_by_shard SET captured = captured + 1
          WHERE merchant_id = 'merchant-001' AND business_date = '2026-01-01'",
    )
    .execute(db.store.pool())
    .await
    .unwrap();

    let v = payrecon::tools::report::verify(&db.store, &rules)
        .await
        .unwrap();
    assert!(!v.consistent);
    let failed: Vec<_> = v.failed().collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].name, "daily_totals");
    assert_eq!(failed[0].differing, 1);
    assert_eq!(
        failed[0].differences,
        [payrecon::store::Difference {
            key: "merchant-001/2026-01-01/USD".into(),
            stored: "captured=21.0000".into(),
            recomputed: "captured=20.0000".into(),
        }]
    );
    // Without --verify the report itself still succeeds.
    let (code, _, stderr) = payrecon_report(&db, &["--date", "2026-01-01"]);
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_reporting_view_returns_the_rows_of_the_reconciled_day() {
    let db = TestDb::new().await;
    reconciled_day(&db).await;
    let pool = db.store.pool();

    type Exception = (String, String, String, String, String, String, bool, i64);
    let exceptions: Vec<Exception> = sqlx::query_as(
        "SELECT payment_reference, merchant_id, business_date::text, status,
                    expected_gross::text, difference::text, since IS NOT NULL, evaluations
               FROM open_exceptions ORDER BY payment_reference",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        exceptions,
        [(
            "pay-short".into(),
            "merchant-000".into(),
            "2026-01-01".into(),
            "AMOUNT_MISMATCH".into(),
            "50.0000".into(),
            "-5.0000".into(),
            true,
            2
        )]
    );

    type Summary = (
        String,
        String,
        String,
        String,
        bool,
        i64,
        String,
        String,
        String,
    );
    let summary: Vec<Summary> = sqlx::query_as(
        "SELECT business_date::text, merchant_id, currency::text, status, exception, items,
                expected_net::text, settled_net::text, difference::text
           FROM reconciliation_status_summary ORDER BY 1, 2, 3, 4",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let s = |d: &str, m: &str, c: &str, st: &str, exc, n, e: &str, se: &str, diff: &str| {
        (
            d.into(),
            m.into(),
            c.into(),
            st.into(),
            exc,
            n,
            e.into(),
            se.into(),
            diff.into(),
        )
    };
    assert_eq!(
        summary,
        [
            s(
                "2026-01-01",
                "merchant-000",
                "EUR",
                "AMOUNT_MISMATCH",
                true,
                1,
                "49.0000",
                "44.0000",
                "-5.0000"
            ),
            s(
                "2026-01-01",
                "merchant-000",
                "EUR",
                "MATCHED",
                false,
                1,
                "98.2500",
                "98.2500",
                "0.0000"
            ),
            s(
                "2026-01-01",
                "merchant-001",
                "USD",
                "MATCHED",
                false,
                1,
                "19.7000",
                "19.7000",
                "0.0000"
            ),
            s(
                "2026-01-04",
                "merchant-000",
                "EUR",
                "MATCHED",
                false,
                1,
                "9.6000",
                "9.6000",
                "0.0000"
            ),
        ]
    );

    type Daily = (
        String,
        String,
        String,
        String,
        String,
        i64,
        i64,
        i64,
        Option<String>,
        Option<String>,
    );
    let daily: Vec<Daily> = sqlx::query_as(
        "SELECT business_date::text, merchant_id, currency::text, net_captured::text,
                settled_net::text, matched_count, expected_count, exception_count,
                match_rate::text, items_net_difference::text
           FROM merchant_daily_report ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let d = |date: &str,
             m: &str,
             c: &str,
             net: &str,
             settled: &str,
             counts: (i64, i64, i64),
             rate: &str,
             diff: &str| {
        (
            date.into(),
            m.into(),
            c.into(),
            net.into(),
            settled.into(),
            counts.0,
            counts.1,
            counts.2,
            Some(rate.into()),
            Some(diff.into()),
        )
    };
    assert_eq!(
        daily,
        [
            d(
                "2026-01-01",
                "merchant-000",
                "EUR",
                "150.0000",
                "142.2500",
                (1, 0, 1),
                "0.5000",
                "-5.0000"
            ),
            d(
                "2026-01-01",
                "merchant-001",
                "USD",
                "20.0000",
                "19.7000",
                (1, 0, 0),
                "1.0000",
                "0.0000"
            ),
            d(
                "2026-01-04",
                "merchant-000",
                "EUR",
                "10.0000",
                "9.6000",
                (1, 0, 0),
                "1.0000",
                "0.0000"
            ),
        ]
    );

    // History rows are recorded at commit time (now): summed over the hours, one exception
    // was opened (EXPECTED -> AMOUNT_MISMATCH) and none resolved.
    let (hours, opened, resolved, net): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(opened)::bigint, sum(resolved)::bigint, sum(net_change)::bigint
           FROM exception_activity",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((hours, opened, resolved, net), (1, 1, 0, 1));
    let on_the_hour: bool = sqlx::query_scalar(
        "SELECT bool_and(hour = date_trunc('hour', hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
           FROM exception_activity",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(on_the_hour);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resolved_exception_leaves_the_open_exceptions_and_counts_as_resolved() {
    let db = TestDb::new().await;
    reconciled_day(&db).await;
    // The missing 5.00 arrives as a second line: gross 50.00 and fee 1.00 in all, matched.
    let reconciler = db.reconciler().await;
    let mut top_up = batch(
        Some(4),
        vec![],
        vec![SettlementLine {
            line_id: "line-pay-short-2".into(),
            ..line("pay-short", "merchant-000", ("5.00", "0.00"), "EUR", 81)
        }],
    );
    // Only the settlements partition moves.
    top_up.progress.retain(|p| p.topic == SETTLEMENTS);
    payrecon::engine::commit_batch(&db.store, "g", "a", &top_up, &reconciler)
        .await
        .unwrap();
    assert_eq!(status(&db, "pay-short").await, "MATCHED");

    let report = payrecon::tools::report::build(&db.store, Some(day("2026-01-01")), None, 50)
        .await
        .unwrap();
    assert_eq!(report.open_exceptions_total, 0);
    let m0 = &report.merchants[0];
    assert_eq!(
        (
            m0.matched_count,
            m0.exception_count,
            m0.match_rate,
            m0.items_net_difference
        ),
        (2, 0, Some(money("1.0000")), Some(money("0.00")))
    );
    let (opened, resolved): (i64, i64) =
        sqlx::query_as("SELECT sum(opened)::bigint, sum(resolved)::bigint FROM exception_activity")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!((opened, resolved), (1, 1));
    let v = payrecon::tools::report::verify(&db.store, &reconciler.rules)
        .await
        .unwrap();
    assert!(v.consistent, "{v:?}");
}
