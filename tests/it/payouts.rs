//! The payout leg through the running service: settlement batches against bank statement
//! lines on the third topic, every status, split, partial and late payouts, duplicates and
//! hostile statement lines, the exceptions topic, `report --verify` and a replay.

use std::collections::BTreeMap;
use std::time::Duration;

use payrecon::domain::{BankPayout, Currency, SettlementLine};
use payrecon::tools::replay::{AuditResult, ReplayOptions};
use payrecon::tools::simulate::Generated;
use tokio_util::sync::CancellationToken;

use crate::helpers::{Fixture, wait_for};
use crate::reconciliation::{at, money};

fn cur(code: &str) -> Currency {
    Currency::from_code(code).unwrap()
}

/// A settlement line of `batch` with net `net` (fee 1.00) at `hour`.
fn line(id: &str, batch: &str, net: &str, hour: i64) -> Generated {
    let net = money(net);
    let fee = money("1.00");
    Generated::Settlement(SettlementLine {
        line_id: format!("line-{id}"),
        batch_id: batch.into(),
        payment_reference: format!("pay-{id}"),
        merchant_id: "shop".into(),
        gross: net + fee,
        fee,
        net,
        currency: cur("EUR"),
        settlement_date: at(hour).date_naive(),
        event_time: at(hour),
    })
}

/// A bank statement line paying `amount` for `batch` (None: no batch reference) at `hour`.
fn payout(id: &str, batch: Option<&str>, amount: &str, currency: &str, hour: i64) -> BankPayout {
    BankPayout {
        statement_line_id: format!("stmt-{id}"),
        account_id: "DE89 3704 0044 0532 0130 00".into(),
        value_date: at(hour).date_naive(),
        amount: money(amount),
        currency: cur(currency),
        batch_reference: batch.map(str::to_owned),
        description: format!("ACQUIRER PAYOUT {}\nref {id}", batch.unwrap_or("?")),
        event_time: at(hour),
    }
}

async fn payout_statuses(f: &Fixture) -> BTreeMap<String, String> {
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT kind, key, status FROM payout_items")
            .fetch_all(f.db.store.pool())
            .await
            .unwrap();
    rows.into_iter()
        .map(|(kind, key, status)| (format!("{kind}/{key}"), status))
        .collect()
}

async fn wait_payouts(f: &Fixture, expected: &BTreeMap<String, String>) {
    wait_for(
        Duration::from_secs(60),
        &format!("payout statuses {expected:?}"),
        || async { payout_statuses(f).await == *expected },
    )
    .await;
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, s)| (k.to_string(), s.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_payout_status_through_the_service_with_history_outbox_verify_and_replay() {
    let f = Fixture::new(1).await;
    let service = f.spawn_service("a", &[]);
    let encoder = f.encoder().await;
    let pay = |p: BankPayout| Generated::Payout(p);
    let mut records = vec![
        line("ok1", "B-ok", "60.00", 0),
        line("ok2", "B-ok", "40.00", 1),
        line("split", "B-split", "100.00", 0),
        line("short", "B-short", "100.00", 0),
        line("missing", "B-missing", "50.00", 0),
        line("late", "B-late", "20.00", 0),
        line("fx", "B-fx", "30.00", 0),
        line("zero1", "B-zero", "25.00", 0),
        line("zero2", "B-zero", "-25.00", 0),
        pay(payout("ok", Some("B-ok"), "100.00", "EUR", 5)),
        pay(payout("split1", Some("B-split"), "70.00", "EUR", 5)),
        pay(payout("split2", Some("B-split"), "30.00", "EUR", 6)),
        // A reserve of 10.00 withheld.
        pay(payout("short", Some("B-short"), "90.00", "EUR", 5)),
        pay(payout("fx", Some("B-fx"), "30.00", "USD", 5)),
        pay(payout("ghost", Some("B-ghost"), "12.34", "EUR", 5)),
        pay(payout("noref", None, "5.00", "EUR", 5)),
        // A fixed-width statement field of spaces: no reference, not a dead letter.
        pay(payout("blank", Some("    "), "7.00", "EUR", 5)),
    ];
    // An exact re-delivery of a payout changes nothing; a different one under the same id is
    // a conflicting duplicate, kept and not applied.
    records.push(pay(payout("ok", Some("B-ok"), "100.00", "EUR", 5)));
    records.push(pay(payout("ok", Some("B-ok"), "999.00", "EUR", 5)));
    f.produce_records(&encoder, &records, 0).await;
    // Hostile statement lines go to dead letters, the stream goes on.
    let mut nul = payout("nul", Some("B-ok"), "1.00", "EUR", 5);
    nul.description = "bad\0text".into();
    let mut zero = payout("zero", Some("B-ok"), "0", "EUR", 5);
    zero.amount = money("0");
    let mut long = payout("long", Some("B-ok"), "1.00", "EUR", 5);
    long.description = "x".repeat(5000);
    f.produce_records(&encoder, &[pay(nul), pay(zero), pay(long)], 0)
        .await;
    // Before any deadline: matched, split matched, currency mismatch and the unreferenced
    // credit at once; the rest waits.
    wait_payouts(
        &f,
        &expect(&[
            ("BATCH/B-ok", "PAYOUT_MATCHED"),
            ("BATCH/B-split", "PAYOUT_MATCHED"),
            ("BATCH/B-short", "PAYOUT_PENDING"),
            ("BATCH/B-missing", "PAYOUT_PENDING"),
            ("BATCH/B-late", "PAYOUT_PENDING"),
            ("BATCH/B-fx", "PAYOUT_CURRENCY_MISMATCH"),
            ("BATCH/B-zero", "PAYOUT_MATCHED"),
            ("BATCH/B-ghost", "PAYOUT_PENDING"),
            ("LINE/stmt-noref", "PAYOUT_UNEXPECTED"),
            ("LINE/stmt-blank", "PAYOUT_UNEXPECTED"),
        ]),
    )
    .await;
    // Every topic moves 100 h on: the watermark (99 h) passes the 72 h payout deadlines.
    let advance = [
        crate::reconciliation::capture("later", "shop", "10.00", 100),
        line("later", "B-later", "9.00", 100),
        pay(payout("later", Some("B-later"), "9.00", "EUR", 100)),
    ];
    f.produce_records(&encoder, &advance, 0).await;
    wait_payouts(
        &f,
        &expect(&[
            ("BATCH/B-ok", "PAYOUT_MATCHED"),
            ("BATCH/B-split", "PAYOUT_MATCHED"),
            ("BATCH/B-short", "PAYOUT_AMOUNT_MISMATCH"),
            ("BATCH/B-missing", "PAYOUT_MISSING"),
            ("BATCH/B-late", "PAYOUT_MISSING"),
            ("BATCH/B-fx", "PAYOUT_CURRENCY_MISMATCH"),
            ("BATCH/B-zero", "PAYOUT_MATCHED"),
            ("BATCH/B-ghost", "PAYOUT_UNEXPECTED"),
            ("LINE/stmt-noref", "PAYOUT_UNEXPECTED"),
            ("LINE/stmt-blank", "PAYOUT_UNEXPECTED"),
            ("BATCH/B-later", "PAYOUT_MATCHED"),
        ]),
    )
    .await;
    // A running state that does not parse (a hand edit; the column is text) does not stall
    // the stream: the store rebuilds it from the batch's stored records when a record
    // touches it, and verify's payout_verdicts (in assert_exceptions_exact) finds it exact.
    let pool = f.db.store.pool();
    let corrupted = sqlx::query(
        "UPDATE payout_items SET state = 'not json' WHERE kind = 'BATCH' AND key = 'B-late'",
    )
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(corrupted.rows_affected(), 1);
    // The late payout arrives: its exception is resolved. The ghost batch's line arrives
    // late (its time long past the deadline): the unexplained credit becomes a short payout,
    // one exception turning into another, which is history and not a second outbox row.
    f.produce_records(
        &encoder,
        &[
            pay(payout("late", Some("B-late"), "20.00", "EUR", 101)),
            line("ghost", "B-ghost", "20.00", 0),
        ],
        0,
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "B-late matched, B-ghost short",
        || async {
            let statuses = payout_statuses(&f).await;
            statuses.get("BATCH/B-late").map(String::as_str) == Some("PAYOUT_MATCHED")
                && statuses.get("BATCH/B-ghost").map(String::as_str)
                    == Some("PAYOUT_AMOUNT_MISMATCH")
        },
    )
    .await;
    f.wait_drained(Duration::from_secs(30)).await;
    // Outbox and exceptions topic exactly once, payout checks of report --verify.
    f.assert_exceptions_exact().await;
    let state: String = sqlx::query_scalar(
        "SELECT state FROM payout_items WHERE kind = 'BATCH' AND key = 'B-late'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).expect("the state was rebuilt");
    assert_eq!(
        (state["lines"].as_i64(), state["payouts"].as_i64()),
        (Some(1), Some(1)),
        "{state}"
    );

    let (difference, reason): (Option<rust_decimal::Decimal>, String) = sqlx::query_as(
        "SELECT difference, reason FROM payout_items WHERE kind = 'BATCH' AND key = 'B-short'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(difference, Some(money("-10")));
    assert!(reason.contains("short by 10.00 EUR"), "{reason}");
    let history: Vec<(Option<String>, String, String, Vec<String>)> = sqlx::query_as(
        "SELECT from_status, to_status, cause, caused_by FROM payout_history
          WHERE kind = 'BATCH' AND key = 'B-late' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        history,
        vec![
            (
                None,
                "PAYOUT_PENDING".into(),
                "RECORDS".into(),
                vec!["line-late".into()]
            ),
            (
                Some("PAYOUT_PENDING".into()),
                "PAYOUT_MISSING".into(),
                "DEADLINE".into(),
                vec![]
            ),
            (
                Some("PAYOUT_MISSING".into()),
                "PAYOUT_MATCHED".into(),
                "RECORDS".into(),
                vec!["stmt-late".into()]
            ),
        ]
    );
    let outbox: Vec<(String, bool, String)> = sqlx::query_as(
        "SELECT to_status, opened, leg FROM exceptions_outbox WHERE payment_reference = 'B-late'
          ORDER BY seq",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        outbox,
        vec![
            ("PAYOUT_MISSING".into(), true, "PAYOUT".into()),
            ("PAYOUT_MATCHED".into(), false, "PAYOUT".into())
        ]
    );
    let ghost: Vec<(String, String)> = sqlx::query_as(
        "SELECT coalesce(from_status, 'NULL') || '->' || to_status, cause FROM payout_history
          WHERE kind = 'BATCH' AND key = 'B-ghost' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let ghost: Vec<(&str, &str)> = ghost
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        ghost,
        [
            ("NULL->PAYOUT_PENDING", "RECORDS"),
            ("PAYOUT_PENDING->PAYOUT_UNEXPECTED", "DEADLINE"),
            ("PAYOUT_UNEXPECTED->PAYOUT_AMOUNT_MISMATCH", "RECORDS"),
        ]
    );
    let ghost_outbox: Vec<(String, bool)> = sqlx::query_as(
        "SELECT to_status, opened FROM exceptions_outbox WHERE payment_reference = 'B-ghost'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(ghost_outbox, [("PAYOUT_UNEXPECTED".to_string(), true)]);
    // The re-delivery counted once, the conflicting version kept, the hostile ones dead.
    let (payouts, conflicts, dead): (i64, i64, Vec<String>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM bank_payouts),
                (SELECT count(*) FROM conflicting_duplicates WHERE record_type = 'bank_payout'),
                (SELECT array_agg(error_kind ORDER BY \"offset\") FROM dead_letters)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((payouts, conflicts), (10, 1));
    assert_eq!(dead, ["invalid_text", "invalid_field", "field_too_long"]);
    let (credited, count): (rust_decimal::Decimal, i64) = sqlx::query_as(
        "SELECT sum(credited), sum(payout_count)::bigint FROM payout_daily_totals
          WHERE currency = 'EUR'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((credited, count), (money("343.34"), 9));
    let report = payrecon::tools::report::build(&f.db.store, Some(at(0).date_naive()), None, 50)
        .await
        .unwrap();
    let text = payrecon::tools::report::render(&report);
    assert!(text.contains("PAYOUT_AMOUNT_MISMATCH"), "{text}");
    assert!(text.contains("batch B-short"), "{text}");

    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
    // A replay of the three topics gives the same payout items, history-free tables equal.
    let dir = tempfile::tempdir().unwrap();
    let options = ReplayOptions {
        report: Some(dir.path().join("replay.json")),
        differences_csv: Some(dir.path().join("replay.csv")),
        quiet: true,
        ..ReplayOptions::default()
    };
    let outcome = payrecon::tools::replay::run(&f.settings(), &options, CancellationToken::new())
        .await
        .expect("the replay runs");
    let csv = std::fs::read_to_string(dir.path().join("replay.csv")).unwrap();
    assert_eq!(
        (outcome.result, outcome.differences),
        (AuditResult::Match, 0),
        "replay differences:\n{csv}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("replay.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["audit"]["summary"]["payout_items_compared"], 11,
        "{report}"
    );
}
