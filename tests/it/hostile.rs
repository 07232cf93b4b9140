//! Records that are valid Avro and still hostile, through the running service: each one is
//! dead-lettered with its own reason and its bytes, every record around it is applied, the
//! service never exits, and every partition ends at its high watermark. Also: refusals that
//! lie in the system stop the service with the cause named; conflicting duplicates are kept;
//! a consumer that cannot commit is not ready.

use std::time::Duration;

use payrecon::domain::PaymentEvent;
use payrecon::tools::simulate::Generated;
use rust_decimal::Decimal;

use crate::helpers::{Fixture, simulation, wait_for};

/// One hostile payment event, made from a clean one by `spoil` (or bytes made by `raw` from
/// the payment schema id).
struct Hostile {
    spoil: fn(&mut PaymentEvent),
    raw: Option<fn(u32) -> Vec<u8>>,
    /// The dead-letter reason it must get.
    reason: &'static str,
    /// A part of the stored message.
    message: &'static str,
    /// SQL run on the test database before the service starts.
    prepare: Option<&'static str>,
}

/// Produces a simulation with the hostile record in the middle of it and checks the outcome
/// the module doc promises, including every reference's predicted status (a hostile event
/// time must not move the watermark and open false deadline exceptions).
async fn one_hostile_record(h: Hostile) {
    let fx = Fixture::new(2).await;
    let encoder = fx.encoder().await;
    let sim =
        payrecon::tools::simulate::simulate(&simulation(300, 11), encoder.payment_schema_id())
            .unwrap();
    let (mut records, mut expected) = (sim.records, sim.totals);
    let Some(Generated::Payment(clean)) = records
        .iter()
        .find(|r| matches!(r, Generated::Payment(_)))
        .cloned()
    else {
        unreachable!("the simulation has payments")
    };
    let mut spoilt = clean.clone();
    spoilt.event_id = format!("hostile-{}", clean.event_id);
    (h.spoil)(&mut spoilt);
    let bytes = match h.raw {
        Some(raw) => raw(encoder.payment_schema_id()),
        None => encoder.encode_payment(&spoilt).unwrap(),
    };
    records.insert(
        records.len() / 2,
        Generated::Malformed {
            payments_topic: true,
            key: clean.payment_reference.clone(),
            bytes: bytes.clone(),
        },
    );
    expected.dead_letters += 1;
    expected.records += 1;
    if let Some(sql) = h.prepare {
        sqlx::raw_sql(sql)
            .execute(fx.db.store.pool())
            .await
            .unwrap();
    }
    let mut service = fx.spawn_service("hostile", &[]);
    fx.produce_records(&encoder, &records, 0).await;
    fx.wait_drained(Duration::from_secs(90)).await;
    assert!(
        service.child.try_wait().unwrap().is_none(),
        "the service exited on a hostile record\n{}",
        fx.log_tail()
    );
    fx.assert_exact(&expected).await;
    fx.assert_statuses(&sim.statuses).await;
    let rows: Vec<(String, Vec<u8>, String)> =
        sqlx::query_as("SELECT error_kind, payload, error_message FROM dead_letters")
            .fetch_all(fx.db.store.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (kind, payload, message) = &rows[0];
    assert_eq!(kind, h.reason, "{message}");
    assert_eq!(payload, &bytes, "the dead letter keeps the produced bytes");
    assert!(message.contains(h.message), "{message}");
    let counted = service
        .metric(
            "payrecon_dead_letters_total",
            &[&format!("reason=\"{}\"", h.reason)],
        )
        .await
        .unwrap();
    assert_eq!(counted, 1.0);
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nul_character_in_an_id_is_dead_lettered_as_invalid_text() {
    one_hostile_record(Hostile {
        spoil: |p| p.event_id.push('\0'),
        reason: "invalid_text",
        message: "U+0000",
        prepare: None,
        raw: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reference_of_hundreds_of_kilobytes_is_dead_lettered_as_too_long() {
    one_hostile_record(Hostile {
        spoil: |p| p.payment_reference = "r".repeat(300_000),
        reason: "field_too_long",
        message: "300000 bytes long",
        prepare: None,
        raw: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_amount_beyond_the_columns_is_dead_lettered_as_out_of_range() {
    one_hostile_record(Hostile {
        spoil: |p| p.amount = Decimal::new(12_345_678_901_234, 0),
        reason: "amount_out_of_range",
        message: "exceeds the maximum",
        prepare: None,
        raw: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_time_days_ahead_of_the_broker_is_dead_lettered_before_it_reaches_the_watermark() {
    one_hostile_record(Hostile {
        spoil: |p| p.event_time = chrono::Utc::now() + chrono::Duration::days(3),
        reason: "implausible_event_time",
        message: "ahead of the broker timestamp",
        prepare: None,
        raw: None,
    })
    .await;
}

/// Eight bytes that claim a 400 MB event_id: the Avro reader's allocations are bounded (16 MiB,
/// not its 512 MiB default), so the record is refused before anything is allocated for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_claiming_a_400_mb_string_is_dead_lettered_before_anything_is_allocated() {
    one_hostile_record(Hostile {
        spoil: |_| {},
        raw: Some(|schema_id| {
            // Avro long, zig-zag varint: 2 * 400_000_000.
            let mut body = Vec::new();
            let mut n: u64 = 800_000_000;
            while n >= 0x80 {
                body.push((n as u8) | 0x80);
                n >>= 7;
            }
            body.push(n as u8);
            body.extend_from_slice(b"abc");
            payrecon::codec::frame(schema_id, &body)
        }),
        reason: "undecodable_body",
        message: "maximum allowed: 16777216",
        prepare: None,
    })
    .await;
}

/// A rule of the database that validation does not know: the record is found among the
/// batch by bisection and dead-lettered with PostgreSQL's SQLSTATE and message.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_the_database_refuses_is_isolated_and_dead_lettered_with_the_sqlstate() {
    one_hostile_record(Hostile {
        spoil: |p| p.psp_reference = Some("refuse-me".into()),
        reason: "database_refused",
        message: "SQLSTATE 23514",
        prepare: Some(
            "ALTER TABLE payment_events ADD CONSTRAINT test_refuses_one_psp_reference
                 CHECK (psp_reference IS DISTINCT FROM 'refuse-me')",
        ),
        raw: None,
    })
    .await;
}

/// When the database refuses every record, a harmless twin included, the fault is in the
/// schema: nothing is dead-lettered, nothing is committed, and the service stops saying why.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_that_lies_in_the_schema_stops_the_service_with_the_cause_and_dead_letters_nothing()
 {
    let fx = Fixture::new(2).await;
    let encoder = fx.encoder().await;
    let (records, _) =
        payrecon::tools::simulate::generate(&simulation(50, 3), encoder.payment_schema_id())
            .unwrap();
    sqlx::raw_sql(
        "ALTER TABLE payment_events ADD CONSTRAINT test_refuses_everything CHECK (false) NOT VALID",
    )
    .execute(fx.db.store.pool())
    .await
    .unwrap();
    let mut service = fx.spawn_service("schema-fault", &[]);
    fx.produce_records(&encoder, &records, 0).await;
    let mut code = None;
    wait_for(Duration::from_secs(60), "the service to stop", || {
        code = service.child.try_wait().unwrap().map(|s| s.code());
        std::future::ready(code.is_some())
    })
    .await;
    assert_ne!(code.flatten(), Some(0), "it must exit with an error");
    let log = service.log_text();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("SQLSTATE 23514") && last.contains("lies in the system"),
        "the last line names the cause: {last}"
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(fx.db.store.pool())
        .await
        .unwrap();
    assert_eq!(dead, 0, "a system fault must never fill the dead letters");
    let payments_committed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM consumer_offsets WHERE topic = $1 AND next_offset > 0",
    )
    .bind(&fx.kafka.payments_topic)
    .fetch_one(fx.db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        payments_committed, 0,
        "no payment offset may pass unapplied records"
    );
}

/// An exact re-delivery stays a counted no-op; the same id with other content is kept aside,
/// in the same batch as the first version or long after it, and never changes the stored row.
#[tokio::test(flavor = "multi_thread")]
async fn conflicting_duplicates_are_kept_with_both_versions_and_never_change_the_stored_row() {
    let fx = Fixture::new(2).await;
    let encoder = fx.encoder().await;
    let (mut records, mut expected) =
        payrecon::tools::simulate::generate(&simulation(100, 5), encoder.payment_schema_id())
            .unwrap();
    let (pi, original) = records
        .iter()
        .enumerate()
        .find_map(|(i, r)| match r {
            Generated::Payment(p) => Some((i, p.clone())),
            _ => None,
        })
        .unwrap();
    let Some(Generated::Settlement(line)) = records
        .iter()
        .find(|r| matches!(r, Generated::Settlement(_)))
        .cloned()
    else {
        unreachable!()
    };
    let as_raw = |bytes: Vec<u8>, payments_topic: bool, key: &str| Generated::Malformed {
        payments_topic,
        key: key.to_owned(),
        bytes,
    };
    // Right behind the original: most likely in the same batch.
    let mut changed = original.clone();
    changed.amount += Decimal::ONE;
    let changed_bytes = encoder.encode_payment(&changed).unwrap();
    let key = original.payment_reference.clone();
    records.insert(pi + 1, as_raw(changed_bytes.clone(), true, &key));
    records.insert(
        pi + 2,
        as_raw(encoder.encode_payment(&original).unwrap(), true, &key),
    );
    expected.records += 2;
    let service = fx.spawn_service("conflicts", &[]);
    fx.produce_records(&encoder, &records, 0).await;
    fx.wait_drained(Duration::from_secs(60)).await;
    // Long after the stored line: a different net in a batch of its own.
    let mut other = line.clone();
    other.fee += Decimal::ONE;
    other.net -= Decimal::ONE;
    let later = vec![
        as_raw(
            encoder.encode_settlement(&other).unwrap(),
            false,
            &line.payment_reference,
        ),
        as_raw(
            encoder.encode_settlement(&line).unwrap(),
            false,
            &line.payment_reference,
        ),
    ];
    expected.records += 2;
    fx.produce_records(&encoder, &later, 0).await;
    fx.wait_drained(Duration::from_secs(60)).await;
    fx.assert_exact(&expected).await;

    let rows: Vec<Conflict> = sqlx::query_as(
        "SELECT record_type, record_id, differing_fields, stored_fields, incoming_fields,
                    payload
               FROM conflicting_duplicates ORDER BY id",
    )
    .fetch_all(fx.db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        rows.len(),
        2,
        "exact re-deliveries are not conflicts: {rows:?}"
    );
    assert_eq!(rows[0].0, "payment_event");
    assert_eq!(rows[0].1, original.event_id);
    assert_eq!(rows[0].2, ["amount"]);
    assert_eq!(rows[0].3["amount"], original.amount.normalize().to_string());
    assert_eq!(rows[0].4["amount"], changed.amount.normalize().to_string());
    assert_eq!(rows[0].5, changed_bytes);
    assert_eq!(rows[1].0, "settlement_line");
    assert_eq!(rows[1].2, ["fee", "net"]);
    let stored: Decimal =
        sqlx::query_scalar("SELECT amount FROM payment_events WHERE event_id = $1")
            .bind(&original.event_id)
            .fetch_one(fx.db.store.pool())
            .await
            .unwrap();
    assert_eq!(stored, original.amount, "the stored row never changes");
    let counted = service
        .metric("payrecon_conflicting_duplicates_total", &[])
        .await
        .unwrap();
    assert_eq!(counted, 2.0);
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
}

/// A conflicting_duplicates row: type, id, differing fields, stored and incoming fields, bytes.
type Conflict = (
    String,
    String,
    Vec<String>,
    serde_json::Value,
    serde_json::Value,
    Vec<u8>,
);

async fn readiness(port: u16) -> (u16, String) {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/health/ready"))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A commit that cannot go through (here: another session holds the offset rows' locks)
/// makes the instance not ready within the stall timeout, and ready again once it commits.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_that_cannot_commit_is_not_ready_until_it_commits_again() {
    let fx = Fixture::new(2).await;
    let encoder = fx.encoder().await;
    let (records, _) =
        payrecon::tools::simulate::generate(&simulation(60, 9), encoder.payment_schema_id())
            .unwrap();
    let (first, second) = records.split_at(records.len() / 2);
    let service = fx.spawn_service("stall", &[("PAYRECON_PIPELINE__STALL_TIMEOUT", "3s")]);
    fx.produce_records(&encoder, first, 0).await;
    fx.wait_drained(Duration::from_secs(60)).await;
    let port = service.metrics_port;
    wait_for(Duration::from_secs(20), "readiness", || async {
        readiness(port).await.0 == 200
    })
    .await;

    let mut blocker = fx.db.store.pool().begin().await.unwrap();
    sqlx::query("SELECT * FROM consumer_offsets WHERE consumer_group = $1 FOR UPDATE")
        .bind(&fx.group)
        .fetch_all(&mut *blocker)
        .await
        .unwrap();
    fx.produce_records(&encoder, second, 0).await;
    wait_for(Duration::from_secs(30), "readiness to fail", || async {
        let (code, body) = readiness(port).await;
        code == 503 && body.contains("consumer stalled")
    })
    .await;
    assert_eq!(
        service.metric("payrecon_consumer_stalled", &[]).await,
        Some(1.0)
    );
    blocker.rollback().await.unwrap();
    fx.wait_drained(Duration::from_secs(60)).await;
    wait_for(
        Duration::from_secs(20),
        "readiness to come back",
        || async { readiness(port).await.0 == 200 },
    )
    .await;
    assert_eq!(
        service.metric("payrecon_consumer_stalled", &[]).await,
        Some(0.0)
    );
    assert_eq!(service.terminate(Duration::from_secs(20)).await, Some(0));
}
