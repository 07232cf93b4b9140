//! The load generator: realistic payments and matching settlement lines, with configurable
//! shares of refunds, mismatches, duplicates, late events and malformed records, produced
//! with an idempotent producer. It also computes the totals PostgreSQL must end up with.
//!
//! Deterministic for a given seed: the same options produce the same records in the same
//! order, so a failed run can be reproduced.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rust_decimal::Decimal;

use crate::codec::{Encoder, frame, payment_to_value};
use crate::domain::{
    Currency, PaymentEvent, PaymentEventKind, SettlementLine, Totals as ExpectedTotals,
};

/// What to generate.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulationOptions {
    /// Number of payments (each has a capture, sometimes a refund, and settlement lines).
    #[arg(long, default_value_t = 10_000)]
    pub payments: u64,
    /// Records per second to produce (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Number of distinct merchants.
    #[arg(long, default_value_t = 20)]
    pub merchants: u32,
    /// Comma-separated ISO currency codes to draw from.
    #[arg(long, default_value = "EUR,USD,GBP,JPY", value_delimiter = ',')]
    pub currencies: Vec<String>,
    /// Seed of the pseudo-random generator.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of payments partially refunded (0..1).
    #[arg(long, default_value_t = 0.1)]
    pub refund_share: f64,
    /// Share of payments whose settlement is wrong or missing (0..1).
    #[arg(long, default_value_t = 0.02)]
    pub mismatch_share: f64,
    /// Share of records sent twice (same id: must be applied once).
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_share: f64,
    /// Share of settlement lines held back and sent after everything else (late).
    #[arg(long, default_value_t = 0.02)]
    pub late_share: f64,
    /// Number of malformed records to mix in (cycling through every poison class).
    #[arg(long, default_value_t = 0)]
    pub malformed: u64,
    /// Write the expected totals as JSON to this file.
    #[arg(long)]
    pub expected_out: Option<std::path::PathBuf>,
    /// Event time of the first payment (RFC 3339); default 2026-01-01T00:00:00Z.
    #[arg(long)]
    pub start_time: Option<DateTime<Utc>>,
}

impl Default for SimulationOptions {
    fn default() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            o: SimulationOptions,
        }
        Wrapper::parse_from(["simulate"]).o
    }
}

/// One record ready to produce.
#[derive(Debug, Clone)]
pub enum Generated {
    Payment(PaymentEvent),
    Settlement(SettlementLine),
    /// Bytes that must be dead-lettered, with the topic they go to (true = payments).
    Malformed {
        payments_topic: bool,
        key: String,
        bytes: Vec<u8>,
    },
}

impl Generated {
    fn key(&self) -> &str {
        match self {
            Generated::Payment(p) => &p.payment_reference,
            Generated::Settlement(s) => &s.payment_reference,
            Generated::Malformed { key, .. } => key,
        }
    }
}

/// Rounds `amount` to the currency's minor units (banker's rounding is not used for money
/// here: half away from zero, as card schemes do).
fn round(amount: Decimal, currency: Currency) -> Decimal {
    amount.round_dp_with_strategy(
        currency.minor_units(),
        rust_decimal::RoundingStrategy::MidpointAwayFromZero,
    )
}

/// Generates the records (in production order) and their expected totals.
pub fn generate(
    o: &SimulationOptions,
    encoder_payment_schema_id: u32,
) -> anyhow::Result<(Vec<Generated>, ExpectedTotals)> {
    let currencies: Vec<Currency> = o
        .currencies
        .iter()
        .map(|c| Currency::from_code(c.trim()))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!currencies.is_empty(), "at least one currency is needed");
    anyhow::ensure!(o.merchants > 0, "at least one merchant is needed");
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let start = o
        .start_time
        .unwrap_or_else(|| Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
    let mut out = Vec::new();
    let mut late = Vec::new();
    let mut expected = ExpectedTotals::default();
    let fee_bps = Decimal::new(150, 4); // 1.50 %
    for i in 0..o.payments {
        let merchant = format!("merchant-{:03}", rng.random_range(0..o.merchants));
        let currency = currencies[rng.random_range(0..currencies.len())];
        let scale = currency.minor_units();
        let minor: i64 = rng.random_range(100..100_000) * 10i64.pow(scale) / 100;
        let amount = Decimal::new(minor.max(1), scale);
        let t = start + chrono::Duration::milliseconds(i as i64 * 10);
        let reference = format!("pay-{}-{i}", o.seed);
        let capture = PaymentEvent {
            event_id: format!("evt-{}-{i}-c", o.seed),
            payment_reference: reference.clone(),
            merchant_id: merchant.clone(),
            kind: PaymentEventKind::Capture,
            amount,
            currency,
            event_time: t,
            psp_reference: Some(format!("psp-{i}")),
        };
        let mut events = vec![capture];
        if rng.random_bool(o.refund_share.clamp(0.0, 1.0)) {
            let refund = round(
                amount * Decimal::new(rng.random_range(10..=100), 2),
                currency,
            );
            if refund > Decimal::ZERO {
                events.push(PaymentEvent {
                    event_id: format!("evt-{}-{i}-r", o.seed),
                    kind: PaymentEventKind::Refund,
                    amount: refund,
                    event_time: t + chrono::Duration::seconds(30),
                    ..events[0].clone()
                });
            }
        }
        let mut lines = Vec::new();
        let mismatch = rng.random_bool(o.mismatch_share.clamp(0.0, 1.0));
        let date = NaiveDate::from_ymd_opt(2026, 1, 2).unwrap()
            + chrono::Duration::days((i / 100_000) as i64);
        for (n, e) in events.iter().enumerate() {
            let mut gross = if e.kind == PaymentEventKind::Capture {
                e.amount
            } else {
                -e.amount
            };
            if mismatch && n == 0 {
                match rng.random_range(0..3) {
                    0 => continue, // settlement missing
                    1 => gross += Decimal::new(1, scale.min(2)),
                    _ => {}
                }
            }
            let mut fee = round(gross.abs() * fee_bps, currency);
            if mismatch && n == 0 && fee > Decimal::ZERO && rng.random_bool(0.5) {
                fee += Decimal::new(1, scale.min(2)); // fee mismatch
            }
            if gross < Decimal::ZERO {
                fee = Decimal::ZERO;
            }
            lines.push(SettlementLine {
                line_id: format!("line-{}-{i}-{n}", o.seed),
                batch_id: format!("batch-{}-{}", o.seed, i / 1000),
                payment_reference: reference.clone(),
                merchant_id: merchant.clone(),
                gross,
                fee,
                net: gross - fee,
                currency,
                settlement_date: date,
                event_time: e.event_time + chrono::Duration::hours(24),
            });
        }
        for e in events {
            let k = format!("{}/{}/{}", e.merchant_id, e.currency, e.kind.as_str());
            let t = expected.payments.entry(k).or_default();
            t.count += 1;
            t.sum += e.amount;
            expected.payment_events += 1;
            if rng.random_bool(o.duplicate_share.clamp(0.0, 1.0)) {
                out.push(Generated::Payment(e.clone()));
            }
            out.push(Generated::Payment(e));
        }
        for l in lines {
            let t = expected
                .settlements
                .entry(format!("{}/{}", l.merchant_id, l.currency))
                .or_default();
            t.count += 1;
            t.gross += l.gross;
            t.fee += l.fee;
            t.net += l.net;
            expected.settlement_lines += 1;
            if rng.random_bool(o.duplicate_share.clamp(0.0, 1.0)) {
                out.push(Generated::Settlement(l.clone()));
            }
            if rng.random_bool(o.late_share.clamp(0.0, 1.0)) {
                late.push(Generated::Settlement(l));
            } else {
                out.push(Generated::Settlement(l));
            }
        }
    }
    out.extend(late);
    // Spread malformed records evenly through the stream.
    let malformed = malformed_records(o.malformed, encoder_payment_schema_id, o.seed);
    expected.dead_letters = malformed.len() as i64;
    let step = (out.len() / (malformed.len() + 1)).max(1);
    for (n, m) in malformed.into_iter().enumerate() {
        let at = ((n + 1) * step + n).min(out.len());
        out.insert(at, m);
    }
    expected.records = out.len() as i64;
    Ok((out, expected))
}

/// The fields of an Avro record value.
type AvroFields = Vec<(String, apache_avro::types::Value)>;

/// `count` malformed records cycling through every poison class.
pub fn malformed_records(count: u64, payment_schema_id: u32, seed: u64) -> Vec<Generated> {
    let schema = apache_avro::Schema::parse_str(crate::codec::PAYMENT_EVENT_SCHEMA)
        .expect("shipped schema parses");
    let valid = PaymentEvent {
        event_id: String::new(),
        payment_reference: String::new(),
        merchant_id: "merchant-000".into(),
        kind: PaymentEventKind::Capture,
        amount: Decimal::new(1000, 2),
        currency: Currency::from_code("EUR").expect("EUR exists"),
        event_time: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        psp_reference: None,
    };
    let encode = |p: &PaymentEvent, patch: &dyn Fn(&mut AvroFields)| {
        let apache_avro::types::Value::Record(mut fields) = payment_to_value(p) else {
            unreachable!()
        };
        patch(&mut fields);
        let body = crate::codec::encode_datum(&schema, apache_avro::types::Value::Record(fields))
            .expect("encodes");
        frame(payment_schema_id, &body)
    };
    (0..count)
        .map(|n| {
            let mut p = valid.clone();
            p.event_id = format!("bad-{seed}-{n}");
            p.payment_reference = format!("bad-ref-{seed}-{n}");
            let bytes = match n % 6 {
                // Not the Confluent wire format at all.
                0 => b"{\"json\": \"is not avro\"}".to_vec(),
                // Wire format with a schema id the registry does not know.
                1 => frame(999_999, b"\x02ab"),
                // Valid header, truncated body.
                2 => {
                    let full = encode(&p, &|_| {});
                    full[..full.len() / 2].to_vec()
                }
                // Unknown currency code.
                3 => encode(&p, &|f| {
                    f[5].1 = apache_avro::types::Value::String("XYZ".into())
                }),
                // Amount with more decimals than EUR allows.
                4 => {
                    let mut q = p.clone();
                    q.amount = Decimal::new(12345, 3);
                    encode(&q, &|_| {})
                }
                // Negative amount.
                _ => {
                    let mut q = p.clone();
                    q.amount = Decimal::new(-500, 2);
                    encode(&q, &|_| {})
                }
            };
            Generated::Malformed {
                payments_topic: true,
                key: p.payment_reference,
                bytes,
            }
        })
        .collect()
}

/// Produces `records` to the two topics with an idempotent producer, at `rate` records/s
/// (0 = unthrottled). Returns when every record is acknowledged.
pub async fn produce(
    producer: &FutureProducer,
    encoder: &Encoder,
    payments_topic: &str,
    settlements_topic: &str,
    records: &[Generated],
    rate: u64,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<()> {
    let mut in_flight = FuturesUnordered::new();
    let started = tokio::time::Instant::now();
    for (n, r) in records.iter().enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
        let (topic, bytes) = match r {
            Generated::Payment(p) => (payments_topic, encoder.encode_payment(p)?),
            Generated::Settlement(s) => (settlements_topic, encoder.encode_settlement(s)?),
            Generated::Malformed {
                payments_topic: true,
                bytes,
                ..
            } => (payments_topic, bytes.clone()),
            Generated::Malformed { bytes, .. } => (settlements_topic, bytes.clone()),
        };
        let key = r.key().to_owned();
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&bytes)) {
                Ok(delivery) => {
                    in_flight.push(delivery);
                    break;
                }
                Err((e, _)) => {
                    // Local queue full: wait for some acknowledgements, then retry.
                    if in_flight.is_empty() {
                        return Err(anyhow::Error::new(e).context("producing"));
                    }
                    drain(&mut in_flight, 1).await?;
                }
            }
        }
        if in_flight.len() >= 20_000 {
            drain(&mut in_flight, 10_000).await?;
        }
        if n % 10_000 == 0 {
            progress(n);
        }
    }
    drain(&mut in_flight, usize::MAX).await?;
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the producer")?;
    progress(records.len());
    Ok(())
}

async fn drain(
    in_flight: &mut FuturesUnordered<rdkafka::producer::DeliveryFuture>,
    count: usize,
) -> anyhow::Result<()> {
    let mut n = 0;
    while n < count {
        match in_flight.next().await {
            None => return Ok(()),
            Some(Ok(Ok(_))) => n += 1,
            Some(Ok(Err((e, _)))) => {
                return Err(anyhow::Error::new(e).context("a record was not acknowledged"));
            }
            Some(Err(_)) => anyhow::bail!("the producer was dropped before acknowledging"),
        }
    }
    Ok(())
}
