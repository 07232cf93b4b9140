//! Reconciliation through the real service: reference data changes mid-stream, unknown
//! merchants, late settlements, and the exceptions topic.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use payrecon::domain::{Currency, PaymentEvent, PaymentEventKind, SettlementLine};
use payrecon::reference::{MerchantStatus, MerchantVersion};
use payrecon::tools::simulate::Generated;
use rust_decimal::Decimal;

use crate::helpers::{Fixture, wait_for};

/// `hours` after 2026-01-01T00:00:00Z.
pub(crate) fn at(hours: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(hours)
}

fn eur() -> Currency {
    Currency::from_code("EUR").unwrap()
}

pub(crate) fn money(s: &str) -> Decimal {
    s.parse().unwrap()
}

pub(crate) fn capture(reference: &str, merchant: &str, amount: &str, hour: i64) -> Generated {
    Generated::Payment(PaymentEvent {
        event_id: format!("evt-{reference}"),
        payment_reference: reference.into(),
        merchant_id: merchant.into(),
        kind: PaymentEventKind::Capture,
        amount: money(amount),
        currency: eur(),
        event_time: at(hour),
        psp_reference: None,
    })
}

pub(crate) fn line(
    reference: &str,
    merchant: &str,
    gross: &str,
    fee: &str,
    hour: i64,
) -> Generated {
    let (gross, fee) = (money(gross), money(fee));
    Generated::Settlement(SettlementLine {
        line_id: format!("line-{reference}"),
        batch_id: "b1".into(),
        payment_reference: reference.into(),
        merchant_id: merchant.into(),
        gross,
        fee,
        net: gross - fee,
        currency: eur(),
        settlement_date: at(hour).date_naive(),
        event_time: at(hour),
    })
}

/// The stored status of `reference`, if it has an item.
pub(crate) async fn status(f: &Fixture, reference: &str) -> Option<String> {
    sqlx::query_scalar("SELECT status FROM reconciliation_items WHERE payment_reference = $1")
        .bind(reference)
        .fetch_optional(f.db.store.pool())
        .await
        .unwrap()
}

pub(crate) async fn wait_status(f: &Fixture, reference: &str, expected: &str) {
    wait_for(
        Duration::from_secs(30),
        &format!("{reference} to become {expected}"),
        || async { status(f, reference).await.as_deref() == Some(expected) },
    )
    .await;
}

/// (from, to, cause, caused_by) of every status change of `reference`, oldest first.
pub(crate) async fn history(
    f: &Fixture,
    reference: &str,
) -> Vec<(Option<String>, String, String, Vec<String>)> {
    sqlx::query_as(
        "SELECT from_status, to_status, cause, caused_by FROM reconciliation_history
          WHERE payment_reference = $1 ORDER BY id",
    )
    .bind(reference)
    .fetch_all(f.db.store.pool())
    .await
    .unwrap()
}

/// (to_status, opened) of the outbox rows of `reference`, oldest first.
async fn outbox(f: &Fixture, reference: &str) -> Vec<(String, bool)> {
    sqlx::query_as(
        "SELECT to_status, opened FROM exceptions_outbox WHERE payment_reference = $1
          ORDER BY seq",
    )
    .bind(reference)
    .fetch_all(f.db.store.pool())
    .await
    .unwrap()
}

fn merchant(id: &str, fee_bps: i64, valid_from: DateTime<Utc>) -> MerchantVersion {
    MerchantVersion {
        merchant_id: id.into(),
        valid_from,
        name: format!("Shop {id}"),
        settlement_currency: eur(),
        fee_bps: Decimal::new(fee_bps, 0),
        fee_fixed: Decimal::ZERO,
        status: MerchantStatus::Active,
        tolerance_abs: None,
        tolerance_rel: None,
        settlement_deadline: None,
        payment_deadline: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_settlement_turns_missing_settlement_into_matched_and_both_are_published_once() {
    let f = Fixture::new(1).await;
    // EUR, 150 bps, no fixed fee.
    f.db.store
        .load_merchants(&[merchant("shop", 150, at(-24))], None)
        .await
        .unwrap();
    let service = f.spawn_service("a", &[]);
    let encoder = f.encoder().await;
    f.produce_records(&encoder, &[capture("late", "shop", "100.00", 0)], 0)
        .await;
    wait_status(&f, "late", "EXPECTED").await;
    // Both topics move 80 h on: the watermark (79 h) passes the 72 h settlement deadline.
    f.produce_records(
        &encoder,
        &[
            capture("later", "shop", "10.00", 80),
            line("later", "shop", "10.00", "0.15", 80),
        ],
        0,
    )
    .await;
    wait_status(&f, "late", "MISSING_SETTLEMENT").await;
    assert_eq!(status(&f, "later").await.as_deref(), Some("MATCHED"));
    // The settlement finally arrives: 100.00 at 150 bps = 1.50 fee.
    f.produce_records(&encoder, &[line("late", "shop", "100.00", "1.50", 24)], 0)
        .await;
    wait_status(&f, "late", "MATCHED").await;
    let h = history(&f, "late").await;
    let steps: Vec<(Option<&str>, &str, &str)> = h
        .iter()
        .map(|(from, to, cause, _)| (from.as_deref(), to.as_str(), cause.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            (None, "EXPECTED", "RECORDS"),
            (Some("EXPECTED"), "MISSING_SETTLEMENT", "DEADLINE"),
            (Some("MISSING_SETTLEMENT"), "MATCHED", "RECORDS"),
        ]
    );
    assert_eq!(h[2].3, ["line-late"], "the record that caused the change");
    assert_eq!(
        outbox(&f, "late").await,
        [
            ("MISSING_SETTLEMENT".to_owned(), true),
            ("MATCHED".to_owned(), false)
        ]
    );
    let seqs = f.assert_exceptions_exact().await;
    assert_eq!(
        seqs.len(),
        2,
        "only the late payment opened and resolved one"
    );
    drop(service);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_merchant_is_an_exception_until_its_reference_data_is_loaded() {
    let f = Fixture::new(1).await;
    let service = f.spawn_service("a", &[]);
    let encoder = f.encoder().await;
    f.produce_records(
        &encoder,
        &[
            capture("newshop-1", "newshop", "200.00", 1),
            line("newshop-1", "newshop", "200.00", "5.00", 25),
        ],
        0,
    )
    .await;
    wait_status(&f, "newshop-1", "MISSING_REFERENCE").await;
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM reconciliation_items WHERE payment_reference = 'newshop-1'",
    )
    .fetch_one(f.db.store.pool())
    .await
    .unwrap();
    assert!(reason.contains("newshop"), "{reason}");
    // Nothing was dead-lettered: the data is valid, the reference is missing.
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(f.db.store.pool())
        .await
        .unwrap();
    assert_eq!(dead, 0);

    // The operator loads the merchant (250 bps: 200.00 -> 5.00 fee) with the CLI; the running
    // service picks it up through NOTIFY and re-evaluates without any new record.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("merchants.csv");
    std::fs::write(
        &file,
        "merchant_id,valid_from,name,settlement_currency,fee_bps,fee_fixed,status\n\
         newshop,2025-12-01T00:00:00Z,New Shop,EUR,250,0,ACTIVE\n",
    )
    .unwrap();
    let out = f.db.load_reference_file(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_status(&f, "newshop-1", "MATCHED").await;
    let h = history(&f, "newshop-1").await;
    let last = h.last().unwrap();
    assert_eq!(
        (last.0.as_deref(), last.1.as_str(), last.2.as_str()),
        (Some("MISSING_REFERENCE"), "MATCHED", "REFERENCE_DATA")
    );
    assert_eq!(
        outbox(&f, "newshop-1").await,
        [
            ("MISSING_REFERENCE".to_owned(), true),
            ("MATCHED".to_owned(), false)
        ]
    );
    f.assert_exceptions_exact().await;
    drop(service);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reference_change_mid_stream_applies_from_its_validity_start_without_a_restart() {
    let f = Fixture::new(1).await;
    f.db.store
        .load_merchants(&[merchant("shop", 100, at(-24))], None)
        .await
        .unwrap();
    let service = f.spawn_service("a", &[]);
    let encoder = f.encoder().await;
    // 1.00 % until hour 10.
    f.produce_records(
        &encoder,
        &[
            capture("before", "shop", "100.00", 2),
            line("before", "shop", "100.00", "1.00", 26),
        ],
        0,
    )
    .await;
    wait_status(&f, "before", "MATCHED").await;

    // A new fee schedule from hour 10, loaded while the service runs; its cache reloads on
    // the table's NOTIFY (the metric says when).
    let changed = Utc::now().timestamp_millis() as f64 / 1000.0;
    f.db.store
        .load_merchants(&[merchant("shop", 200, at(10))], None)
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the service's cache to reload",
        || async {
            service
                .metric("payrecon_reference_cache_loaded_timestamp_seconds", &[])
                .await
                .is_some_and(|t| t >= changed)
        },
    )
    .await;
    // Events after hour 10 are priced at 2.00 %; an event before it (arriving now) still at
    // 1.00 %: the version valid at the event's own time, not the newest.
    f.produce_records(
        &encoder,
        &[
            capture("after", "shop", "100.00", 12),
            line("after", "shop", "100.00", "2.00", 36),
            capture("old", "shop", "50.00", 5),
            line("old", "shop", "50.00", "0.50", 29),
            // Settled at the old fee although the event is after the change: a fee mismatch
            // once due.
            capture("stale", "shop", "100.00", 14),
            line("stale", "shop", "100.00", "1.00", 38),
        ],
        0,
    )
    .await;
    wait_status(&f, "after", "MATCHED").await;
    wait_status(&f, "old", "MATCHED").await;
    wait_for(Duration::from_secs(30), "both records of stale", || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT settlement_lines + payment_events FROM reconciliation_items
              WHERE payment_reference = 'stale'",
        )
        .fetch_optional(f.db.store.pool())
        .await
        .unwrap()
            == Some(2)
    })
    .await;
    assert_eq!(status(&f, "stale").await.as_deref(), Some("EXPECTED"));
    // Push the watermark past the deadlines: "stale" is then a FEE_MISMATCH.
    f.produce_records(
        &encoder,
        &[
            capture("push", "shop", "10.00", 200),
            line("push", "shop", "10.00", "0.20", 200),
        ],
        0,
    )
    .await;
    wait_status(&f, "stale", "FEE_MISMATCH").await;
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM reconciliation_items WHERE payment_reference = 'stale'",
    )
    .fetch_one(f.db.store.pool())
    .await
    .unwrap();
    assert!(
        reason.contains("fee: settled 1.00 EUR, expected 2.00 EUR"),
        "{reason}"
    );
    assert_eq!(status(&f, "after").await.as_deref(), Some("MATCHED"));
    f.assert_exceptions_exact().await;
    drop(service);
}

/// A relay that lost its PostgreSQL session (and so the lock) mid-round may still be alive,
/// its producer delivering that round later. Its successor must not read the topic's tail
/// before that round can no longer land, or it would send the same message again.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_taking_over_waits_out_a_cut_off_relays_round_and_sends_nothing_twice() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let f = Fixture::new(1).await;
    // An exception (unknown merchant) in the outbox, with no relay running.
    let first = f.spawn_service(
        "no-relay",
        &[("PAYRECON_EXCEPTIONS__RELAY_ENABLED", "false")],
    );
    let encoder = f.encoder().await;
    f.produce_records(
        &encoder,
        &[capture("zombie-1", "unknown-shop", "10.00", 1)],
        0,
    )
    .await;
    wait_status(&f, "zombie-1", "MISSING_REFERENCE").await;
    // With no relay running, every instance still sees the exception waiting.
    wait_for(
        Duration::from_secs(10),
        "the unpublished exception's age to show",
        || async {
            first
                .metric("payrecon_exceptions_outbox_oldest_pending_seconds", &[])
                .await
                .is_some_and(|age| age > 0.0)
        },
    )
    .await;
    assert_eq!(first.terminate(Duration::from_secs(20)).await, Some(0));
    let seq: i64 = sqlx::query_scalar(
        "SELECT seq FROM exceptions_outbox WHERE payment_reference = 'zombie-1' AND published_at IS NULL",
    )
    .fetch_one(f.db.store.pool())
    .await
    .unwrap();

    // The cut-off relay: it recorded its round and sent it, but its message is still on the
    // way. Then the successor takes over.
    sqlx::query(
        "INSERT INTO exceptions_relay (instance, round_started_at) VALUES ('zombie', clock_timestamp())",
    )
    .execute(f.db.store.pool())
    .await
    .unwrap();
    let second = f.spawn_service(
        "relay",
        &[("PAYRECON_EXCEPTIONS__RELAY_MESSAGE_TIMEOUT", "3s")],
    );
    wait_for(
        Duration::from_secs(30),
        "the successor relay to wait",
        || async {
            second
                .log_text()
                .contains("the previous relay stopped mid-round")
        },
    )
    .await;
    // The zombie's message lands now (its seq header is what identifies it).
    let producer: FutureProducer = f.settings().kafka.producer_config().create().unwrap();
    let header = seq.to_string();
    producer
        .send(
            FutureRecord::to(&f.kafka.exceptions_topic)
                .key("zombie-1")
                .payload(b"sent by the cut-off relay")
                .headers(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: payrecon::outbox::SEQ_HEADER,
                        value: Some(header.as_bytes()),
                    }),
                ),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // The successor finds it in the tail and marks it instead of sending it again.
    let seqs = f.assert_exceptions_exact().await;
    assert_eq!(seqs, [seq]);
    let cleared: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT round_started_at FROM exceptions_relay")
            .fetch_one(f.db.store.pool())
            .await
            .unwrap();
    assert_eq!(cleared, None, "the successor has no round in flight");
    wait_for(
        Duration::from_secs(10),
        "the outbox backlog gauge to return to 0",
        || async {
            second
                .metric("payrecon_exceptions_outbox_oldest_pending_seconds", &[])
                .await
                == Some(0.0)
        },
    )
    .await;
    assert!(
        second
            .log_text()
            .contains("outbox rows already on the topic"),
        "{}",
        f.log_tail()
    );
    drop(second);
}

/// Where the broker has transactions and `exceptions.transactional_id` is set, each round is a
/// transaction and a new relay's init_transactions fences its predecessor: it publishes at
/// once, without waiting out an unfinished round, and still exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_transactional_relay_fences_its_predecessor_and_publishes_exactly_once() {
    let f = Fixture::new(1).await;
    let id = crate::helpers::unique("relay-tx");
    let env = [("PAYRECON_EXCEPTIONS__TRANSACTIONAL_ID", id.as_str())];
    let first = f.spawn_service("tx-first", &env);
    let encoder = f.encoder().await;
    f.produce_records(
        &encoder,
        &[
            capture("tx-1", "txshop", "200.00", 1),
            line("tx-1", "txshop", "200.00", "5.00", 25),
        ],
        0,
    )
    .await;
    wait_status(&f, "tx-1", "MISSING_REFERENCE").await;
    let all_published = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM exceptions_outbox WHERE published_at IS NULL",
        )
        .fetch_one(f.db.store.pool())
        .await
        .unwrap()
            == 0
    };
    wait_for(
        Duration::from_secs(20),
        "the opening to be published",
        all_published,
    )
    .await;
    assert!(
        first
            .log_text()
            .contains("the relay publishes each round in a transaction"),
        "{}",
        f.log_tail()
    );
    first.sigkill();
    // Pretend it died mid-round: an idempotent relay would now wait 35 s.
    sqlx::query(
        "INSERT INTO exceptions_relay (instance, round_started_at)
         VALUES ('tx-first', clock_timestamp())
         ON CONFLICT (singleton) DO UPDATE SET round_started_at = clock_timestamp()",
    )
    .execute(f.db.store.pool())
    .await
    .unwrap();
    let second = f.spawn_service("tx-second", &env);
    f.db.store
        .load_merchants(&[merchant("txshop", 250, at(-24))], None)
        .await
        .unwrap();
    wait_status(&f, "tx-1", "MATCHED").await;
    wait_for(
        Duration::from_secs(20),
        "the resolution to be published without waiting out the old round",
        all_published,
    )
    .await;
    let log = second.log_text();
    assert!(
        log.contains("the relay publishes each round in a transaction")
            && !log.contains("stopped mid-round"),
        "{log}"
    );
    let seqs = f.assert_exceptions_exact().await;
    assert_eq!(seqs.len(), 2, "opened once, resolved once");
    drop(second);
}
