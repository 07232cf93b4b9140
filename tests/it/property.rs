//! Property: whatever a record contains (any characters, sizes, decimals, timestamps, ids
//! that collide, bytes that are not Avro at all), decode + validate + store ends it either
//! applied, dead-lettered, kept as a conflicting duplicate or ignored as an exact
//! re-delivery, and the batch transaction never fails. Real codec, real registry, real
//! PostgreSQL; one database for every case, so ids of different cases collide as they would
//! in a real log.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use payrecon::codec::{DecodeError, Stream, registry_settings};
use payrecon::domain::{Currency, PaymentEvent, PaymentEventKind, Record, SettlementLine};
use payrecon::engine::Batch;
use payrecon::inputs::{Decoder, Encoder};
use payrecon::store::{DeadLetter, PartitionProgress, RawRecord, Source};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rust_decimal::Decimal;

use crate::helpers::TestDb;

/// What goes into the log.
#[derive(Debug, Clone)]
enum Input {
    Payment(PaymentEvent),
    Settlement(SettlementLine),
    /// Framed with a real schema id, then anything.
    Bytes(Vec<u8>),
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[a-z0-9-]{1,12}",
        // Any characters: NUL, controls, every plane.
        2 => ".{0,40}",
        // Ids that collide across records and cases.
        2 => "(dup-1|dup-2|dup-3)",
        1 => (1usize..3000).prop_map(|n| "x".repeat(n)),
        1 => Just(String::new()),
    ]
}

fn amount() -> impl Strategy<Value = Decimal> {
    prop_oneof![
        6 => (1i64..10_000_000).prop_map(|m| Decimal::new(m, 0)),
        2 => (1i64..10_000_000, 0u32..3).prop_map(|(m, s)| Decimal::new(m, s)),
        1 => (any::<i64>(), 0u32..8).prop_map(|(m, s)| Decimal::new(m, s)),
        1 => Just(Decimal::MAX),
        1 => Just(Decimal::ZERO),
    ]
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    prop_oneof![
        4 => 1_767_225_600_000i64..1_767_225_600_000 + 40 * 86_400_000,
        1 => -8_000_000_000_000_000i64..8_000_000_000_000_000,
        1 => Just(0i64),
    ]
    .prop_filter_map("chrono range", DateTime::from_timestamp_millis)
}

fn currency() -> impl Strategy<Value = Currency> {
    prop::sample::select(vec!["EUR", "USD", "JPY", "GBP", "BHD"])
        .prop_map(|c| Currency::from_code(c).unwrap())
}

fn payment() -> impl Strategy<Value = PaymentEvent> {
    (
        (text(), text(), text()),
        prop::sample::select(vec![
            PaymentEventKind::Capture,
            PaymentEventKind::Refund,
            PaymentEventKind::Chargeback,
        ]),
        amount(),
        currency(),
        time(),
        prop::option::of(text()),
    )
        .prop_map(
            |(
                (event_id, payment_reference, merchant_id),
                kind,
                amount,
                currency,
                event_time,
                psp_reference,
            )| {
                PaymentEvent {
                    event_id,
                    payment_reference,
                    merchant_id,
                    kind,
                    amount,
                    currency,
                    event_time,
                    psp_reference,
                }
            },
        )
}

fn settlement() -> impl Strategy<Value = SettlementLine> {
    (
        (text(), text(), text(), text()),
        (amount(), amount(), any::<bool>()),
        currency(),
        (-100_000i32..3_000_000),
        time(),
    )
        .prop_map(
            |(
                (line_id, batch_id, payment_reference, merchant_id),
                (gross, fee, nets),
                currency,
                day,
                event_time,
            )| {
                let net = if nets {
                    gross.checked_sub(fee).unwrap_or(gross)
                } else {
                    fee
                };
                SettlementLine {
                    line_id,
                    batch_id,
                    payment_reference,
                    merchant_id,
                    gross,
                    fee,
                    net,
                    currency,
                    settlement_date: NaiveDate::from_num_days_from_ce_opt(day)
                        .unwrap_or(NaiveDate::MIN),
                    event_time,
                }
            },
        )
}

fn input() -> impl Strategy<Value = (Input, Option<i64>)> {
    let broker = prop::option::of(1_767_225_600_000i64..1_767_225_600_000 + 60 * 86_400_000);
    (
        prop_oneof![
            5 => payment().prop_map(Input::Payment),
            4 => settlement().prop_map(Input::Settlement),
            1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Input::Bytes),
        ],
        broker,
    )
}

/// Where each record of the log ended.
#[derive(Debug, PartialEq, Eq, Hash, Clone, Copy)]
enum End {
    Applied,
    DeadLettered,
    Conflict,
    Duplicate,
}

#[tokio::test(flavor = "multi_thread")]
async fn every_arbitrary_record_is_applied_or_kept_and_no_batch_fails() {
    let db = TestDb::new().await;
    let (url, _registry) = payrecon::registry::spawn_local(payrecon::registry::RegistryConfig {
        storage: payrecon::registry::Storage::Memory,
    })
    .await
    .unwrap();
    let sr = registry_settings(&url, Duration::from_secs(5)).unwrap();
    let (payments_topic, settlements_topic) = ("prop.payments", "prop.settlements");
    let encoder = Encoder::register(&sr, payments_topic, settlements_topic)
        .await
        .unwrap();
    let codec = Decoder::new(sr);
    let reconciler = db.reconciler().await;
    let handle = tokio::runtime::Handle::current();
    let topics = vec![payments_topic.to_owned(), settlements_topic.to_owned()];
    // The runner's closure is `Fn`: the log positions and the tally live behind a lock
    // (held across the case's awaits; nothing else takes it).
    let next = tokio::sync::Mutex::new([0i64; 2]);
    let ends: tokio::sync::Mutex<HashMap<End, usize>> = Default::default();

    let mut runner = TestRunner::new(Config {
        cases: 128,
        failure_persistence: None,
        ..Config::default()
    });
    // Some records again, unchanged, later in the same batch: exact re-deliveries.
    let strategy = (
        prop::collection::vec(input(), 1..16),
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    )
        .prop_map(|(mut inputs, again)| {
            let copies: Vec<_> = again
                .iter()
                .map(|i| inputs[i.index(inputs.len())].clone())
                .collect();
            inputs.extend(copies);
            inputs
        });
    let result = runner.run(&strategy, |inputs| {
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let mut next = next.lock().await;
                let mut ends = ends.lock().await;
                let mut batch = Batch {
                    topics: topics.clone(),
                    ..Batch::default()
                };
                let mut sources = Vec::new();
                for (input, broker_ms) in inputs {
                    let (topic, bytes) = match &input {
                        Input::Payment(p) => match encoder.encode_payment(p) {
                            Ok(b) => (0, b),
                            Err(_) => continue, // not representable in Avro: never in a log
                        },
                        Input::Settlement(s) => match encoder.encode_settlement(s) {
                            Ok(b) => (1, b),
                            Err(_) => continue,
                        },
                        Input::Bytes(b) => {
                            (0, payrecon::codec::frame(encoder.payment_schema_id(), b))
                        }
                    };
                    let source = Source {
                        topic,
                        partition: 0,
                        offset: next[topic],
                    };
                    next[topic] += 1;
                    sources.push(source);
                    let broker = broker_ms.and_then(DateTime::from_timestamp_millis);
                    let stream = [Stream::Payments, Stream::Settlements][topic];
                    match codec.decode(stream, Some(&bytes), broker).await {
                        Ok(Record::Payment(p)) => batch.payments.push((p, source)),
                        Ok(Record::Settlement(s)) => batch.settlements.push((s, source)),
                        Ok(Record::Payout(b)) => batch.payouts.push((b, source)),
                        Err(DecodeError::Poison { kind, message }) => {
                            batch.dead_letters.push(DeadLetter {
                                source,
                                key: None,
                                payload: Some(bytes.clone()),
                                error_kind: kind.as_str(),
                                error_message: message,
                                broker_timestamp: broker,
                            })
                        }
                        Err(e @ DecodeError::Transient(_)) => {
                            panic!("the local registry is never unavailable: {e}")
                        }
                    }
                    batch.raw.insert(
                        source,
                        RawRecord {
                            key: None,
                            payload: Some(bytes),
                            broker_timestamp: broker,
                        },
                    );
                }
                progress(&mut batch, &sources, &next);
                if batch.progress.is_empty() {
                    return Ok(());
                }
                let outcome = payrecon::engine::commit_batch(
                    &db.store,
                    "prop",
                    "prop/1",
                    &batch,
                    &reconciler,
                )
                .await;
                prop_assert!(outcome.is_ok(), "the batch failed: {outcome:?}");
                let outcome = outcome.unwrap();
                let mut duplicates = 0;
                for s in &sources {
                    let end = where_it_ended(&db, &topics, s).await;
                    prop_assert!(end.is_some(), "{s:?} ended in two places: {batch:?}");
                    let end = end.unwrap();
                    duplicates += u64::from(end == End::Duplicate);
                    *ends.entry(end).or_default() += 1;
                }
                // Every record that left no row is one the commit counted as an exact
                // re-delivery.
                prop_assert_eq!(
                    duplicates,
                    outcome.payments_duplicates + outcome.settlements_duplicates
                );
                Ok(())
            })
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (next, ends) = (next.into_inner(), ends.into_inner());
    // The generators reach every end (otherwise the property would prove little).
    for end in [
        End::Applied,
        End::DeadLettered,
        End::Duplicate,
        End::Conflict,
    ] {
        assert!(
            ends.get(&end).copied().unwrap_or(0) > 0,
            "no record ended {end:?}: {ends:?}"
        );
    }
    let offsets = db.offsets("prop").await;
    assert_eq!(offsets.get(&(payments_topic.to_owned(), 0)), Some(&next[0]));
    assert_eq!(
        offsets.get(&(settlements_topic.to_owned(), 0)),
        Some(&next[1])
    );
}

/// The batch's advance of each topic's partition 0, from the first offset it holds.
fn progress(batch: &mut Batch, sources: &[Source], next: &[i64; 2]) {
    for (topic, &next_offset) in next.iter().enumerate() {
        let Some(first) = sources
            .iter()
            .filter(|s| s.topic == topic)
            .map(|s| s.offset)
            .min()
        else {
            continue;
        };
        let records = sources.iter().filter(|s| s.topic == topic).count() as i64;
        batch.progress.push(PartitionProgress {
            topic: batch.topics[topic].clone(),
            partition: 0,
            expected: (first > 0).then_some(first),
            next_offset,
            records,
            last_record_time: None,
        });
    }
}

async fn where_it_ended(db: &TestDb, topics: &[String], s: &Source) -> Option<End> {
    let table = ["payment_events", "settlement_lines"][s.topic];
    let source = ("source_topic", "source_partition", "source_offset");
    let kept = ("topic", "partition", "\"offset\"");
    let applied = rows_at(db, table, source, &topics[s.topic], s).await;
    let dead = rows_at(db, "dead_letters", kept, &topics[s.topic], s).await;
    let conflict = rows_at(db, "conflicting_duplicates", kept, &topics[s.topic], s).await;
    match (applied, dead, conflict) {
        (1, 0, 0) => Some(End::Applied),
        (0, 1, 0) => Some(End::DeadLettered),
        (0, 0, 1) => Some(End::Conflict),
        // Neither stored nor kept: an exact re-delivery (checked against the commit's count).
        (0, 0, 0) => Some(End::Duplicate),
        _ => None,
    }
}

/// Rows of `table` at the log position `s` (`columns`: its topic, partition, offset columns).
async fn rows_at(
    db: &TestDb,
    table: &str,
    (t, p, o): (&str, &str, &str),
    topic: &str,
    s: &Source,
) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE {t} = $1 AND {p} = $2 AND {o} = $3"
    ))
    .bind(topic)
    .bind(s.partition)
    .bind(s.offset)
    .fetch_one(db.store.pool())
    .await
    .unwrap()
}
