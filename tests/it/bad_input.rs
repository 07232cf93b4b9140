//! Poison records are dead-lettered with their bytes and reason; the stream keeps flowing;
//! transient registry failures are retried, never dead-lettered; dead letters can be re-driven.

use std::time::Duration;

use payrecon::codec::{frame, registry_settings};
use payrecon::tools::simulate::Generated;

use crate::helpers::{Fixture, free_port, simulation, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn every_malformed_class_is_dead_lettered_and_the_valid_records_around_it_are_applied() {
    let fx = Fixture::new(2).await;
    let encoder = fx.encoder().await;
    let mut options = simulation(400, 7);
    options.malformed = 12;
    let (mut records, mut expected) =
        payrecon::tools::simulate::generate(&options, encoder.payment_schema_id()).unwrap();
    // A payment event on the settlements topic is the wrong record type for that topic.
    let Generated::Payment(p) = records
        .iter()
        .find(|r| matches!(r, Generated::Payment(_)))
        .unwrap()
        .clone()
    else {
        unreachable!()
    };
    records.insert(
        records.len() / 2,
        Generated::Malformed {
            payments_topic: false,
            key: p.payment_reference.clone(),
            bytes: encoder.encode_payment(&p).unwrap(),
        },
    );
    expected.dead_letters += 1;
    expected.records += 1;
    let service = fx.spawn_service("bad-input", &[]);
    fx.produce_records(&encoder, &records, 0).await;
    fx.wait_drained(Duration::from_secs(60)).await;
    fx.assert_exact(&expected).await;

    let rows: Vec<(String, String, Vec<u8>, String)> = sqlx::query_as(
        r#"SELECT topic, error_kind, payload, error_message FROM dead_letters ORDER BY topic, partition, "offset""#,
    )
    .fetch_all(fx.db.store.pool())
    .await
    .unwrap();
    let mut kinds: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "bad_magic_byte",
            "invalid_field",
            "undecodable_body",
            "unknown_schema_id",
            "wrong_record_type"
        ]
    );
    // Every dead letter keeps the exact bytes that were produced.
    let produced: Vec<&Vec<u8>> = records
        .iter()
        .filter_map(|r| match r {
            Generated::Malformed { bytes, .. } => Some(bytes),
            _ => None,
        })
        .collect();
    for (topic, kind, payload, message) in &rows {
        assert!(
            produced.contains(&payload),
            "{topic} {kind}: stored payload differs from the produced bytes"
        );
        assert!(!message.is_empty());
    }
    let messages: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("unknown currency code \"XYZ\"")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("more than 2 decimals")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("no schema with id 999999")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("magic byte")),
        "{messages:?}"
    );
    // The counters agree.
    let dead = service
        .metric("payrecon_dead_letters_total", &[])
        .await
        .unwrap();
    assert_eq!(dead, expected.dead_letters as f64);
    assert_eq!(
        service.terminate(Duration::from_secs(20)).await,
        Some(0),
        "SIGTERM must exit 0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_outage_is_retried_at_the_same_offset_and_never_dead_lettered() {
    let fx = Fixture::new(2).await;
    // A registry with file storage that we can stop and restart on the same port.
    let dir = tempfile::tempdir().unwrap();
    let storage = payrecon::registry::Storage::File(dir.path().join("registry.json"));
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let start_registry = |storage: payrecon::registry::Storage| async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let stop = token.clone();
        let task = tokio::spawn(payrecon::registry::serve(
            listener,
            payrecon::registry::RegistryConfig { storage },
            async move { stop.cancelled().await },
        ));
        (token, task)
    };
    let (token, task) = start_registry(storage.clone()).await;
    let sr = registry_settings(&url, Duration::from_secs(2)).unwrap();
    let encoder = payrecon::inputs::Encoder::register(
        &sr,
        &fx.kafka.payments_topic,
        &fx.kafka.settlements_topic,
    )
    .await
    .unwrap()
    .with_payouts(&sr, &fx.kafka.payouts_topic)
    .await
    .unwrap();
    let (records, expected) =
        payrecon::tools::simulate::generate(&simulation(300, 11), encoder.payment_schema_id())
            .unwrap();
    fx.produce_records(&encoder, &records, 0).await;
    // Registry down before the service ever saw a schema.
    token.cancel();
    task.await.unwrap().unwrap();

    let service = fx.spawn_service(
        "registry-outage",
        &[("PAYRECON_REGISTRY__URL", url.as_str())],
    );
    wait_for(
        Duration::from_secs(30),
        "registry errors to be retried",
        || async {
            service
                .metric("payrecon_transient_errors_total", &["source=\"registry\""])
                .await
                .unwrap_or(0.0)
                >= 2.0
        },
    )
    .await;
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(fx.db.store.pool())
        .await
        .unwrap();
    assert_eq!(dead, 0, "a registry outage must never dead-letter");
    assert!(
        fx.db.offsets(&fx.group).await.is_empty(),
        "no offset may advance while records cannot be decoded"
    );

    // The registry comes back with the same ids: everything is applied exactly once.
    let (token, _task) = start_registry(storage).await;
    fx.wait_drained(Duration::from_secs(60)).await;
    fx.assert_exact(&expected).await;
    token.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_re_driven_once_its_cause_is_fixed() {
    let fx = Fixture::new(1).await;
    let encoder = fx.encoder().await;
    let (records, mut expected) =
        payrecon::tools::simulate::generate(&simulation(50, 3), encoder.payment_schema_id())
            .unwrap();
    // A producer already on schema v2 whose id is not yet known to the registry.
    let v2 = payrecon::codec::PAYMENT_EVENT_SCHEMA.replace(
        r#"{"name": "psp_reference""#,
        r#"{"name": "channel", "type": "string", "default": "web"},
    {"name": "psp_reference""#,
    );
    // The next id the registry will hand out: after both input schemas and the exceptions
    // schema that the service's relay registers at start-up.
    let sr = registry_settings(&fx.registry_url, Duration::from_secs(2)).unwrap();
    let (exception_id, _) = payrecon::codec::register_schema(
        &sr,
        &fx.kafka.exceptions_topic,
        payrecon::outbox::EXCEPTION_SCHEMA,
    )
    .await
    .unwrap();
    let future_id = encoder.payment_schema_id().max(exception_id) + 1;
    let v2_schema = apache_avro::Schema::parse_str(&v2).unwrap();
    let Generated::Payment(mut p) = records[0].clone() else {
        unreachable!()
    };
    p.event_id = "evt-v2-1".into();
    let apache_avro::types::Value::Record(mut fields) = payrecon::inputs::payments::to_avro(&p)
    else {
        unreachable!()
    };
    fields.insert(
        7,
        (
            "channel".into(),
            apache_avro::types::Value::String("app".into()),
        ),
    );
    let body = payrecon::codec::encode_datum(&v2_schema, apache_avro::types::Value::Record(fields))
        .unwrap();
    let mut all = records.clone();
    all.push(Generated::Malformed {
        payments_topic: true,
        key: p.payment_reference.clone(),
        bytes: frame(future_id, &body),
    });
    expected.dead_letters = 1;
    expected.records += 1;

    let service = fx.spawn_service("redrive", &[]);
    fx.produce_records(&encoder, &all, 0).await;
    fx.wait_drained(Duration::from_secs(60)).await;
    fx.assert_exact(&expected).await;
    let kind: String = sqlx::query_scalar("SELECT error_kind FROM dead_letters")
        .fetch_one(fx.db.store.pool())
        .await
        .unwrap();
    assert_eq!(kind, "unknown_schema_id");

    // The fix: v2 gets registered (and receives the id the producer used).
    let (id, _) = payrecon::codec::register_schema(&sr, &fx.kafka.payments_topic, &v2)
        .await
        .unwrap();
    assert_eq!(id, future_id);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .args(["dead-letters", "replay"])
        .envs(fx.service_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 applied, 0 still failing"));
    let (count, replayed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM payment_events WHERE event_id = 'evt-v2-1'),
                (SELECT count(*) FROM dead_letters WHERE replayed_at IS NOT NULL)",
    )
    .fetch_one(fx.db.store.pool())
    .await
    .unwrap();
    assert_eq!((count, replayed), (1, 1));
    let running = fx.db.store.running_totals(&fx.group).await.unwrap();
    assert_eq!(running.payment_events, expected.payment_events + 1);
    // Replaying again applies nothing more.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_payrecon"))
        .args(["dead-letters", "replay"])
        .envs(fx.service_env())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 applied"));
    drop(service);
}

/// A settlement line dated 9999-12-31 (and, with the window narrowed to a week, one dated ten
/// days after its event) is dead-lettered as an implausible business date with its bytes;
/// the line it was copied from and every record around it are applied.
#[tokio::test(flavor = "multi_thread")]
async fn settlement_dates_far_from_the_event_time_are_dead_lettered_as_implausible() {
    let fx = Fixture::new(2).await;
    let encoder = fx.encoder().await;
    let (mut records, mut expected) =
        payrecon::tools::simulate::generate(&simulation(300, 5), encoder.payment_schema_id())
            .unwrap();
    let Generated::Settlement(line) = records
        .iter()
        .find(|r| matches!(r, Generated::Settlement(_)))
        .unwrap()
        .clone()
    else {
        unreachable!()
    };
    let mut produced = Vec::new();
    for (n, date) in [
        chrono::NaiveDate::from_ymd_opt(9999, 12, 31).unwrap(),
        line.event_time.date_naive() + chrono::Duration::days(10),
    ]
    .into_iter()
    .enumerate()
    {
        let mut far = line.clone();
        far.line_id = format!("far-{n}-{}", line.line_id);
        far.settlement_date = date;
        let bytes = encoder.encode_settlement(&far).unwrap();
        produced.push(bytes.clone());
        records.insert(
            records.len() / 2,
            Generated::Malformed {
                payments_topic: false,
                key: line.payment_reference.clone(),
                bytes,
            },
        );
        expected.dead_letters += 1;
        expected.records += 1;
    }
    let service = fx.spawn_service(
        "business-dates",
        &[("PAYRECON_VALIDATION__MAX_BUSINESS_DATE_AHEAD", "7d")],
    );
    fx.produce_records(&encoder, &records, 0).await;
    fx.wait_drained(Duration::from_secs(60)).await;
    fx.assert_exact(&expected).await;
    let rows: Vec<(String, Vec<u8>, String)> = sqlx::query_as(
        r#"SELECT error_kind, payload, error_message FROM dead_letters ORDER BY "offset""#,
    )
    .fetch_all(fx.db.store.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (kind, payload, message) in &rows {
        assert_eq!(kind, "implausible_business_date", "{message}");
        assert!(
            produced.contains(payload),
            "the dead letter keeps the bytes"
        );
        assert!(message.contains("settlement_date"), "{message}");
        assert!(message.contains("at most 7 days allowed"), "{message}");
    }
    assert!(rows.iter().any(|r| r.2.contains("9999-12-31")), "{rows:?}");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM settlement_lines WHERE line_id LIKE 'far-%'")
            .fetch_one(fx.db.store.pool())
            .await
            .unwrap();
    assert_eq!(stored, 0);
    let counted = service
        .metric(
            "payrecon_dead_letters_total",
            &["reason=\"implausible_business_date\""],
        )
        .await
        .unwrap();
    assert_eq!(counted, 2.0);
}
