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

use std::collections::BTreeMap;

use crate::codec::{Encoder, frame, payment_to_value};
use crate::domain::{
    BankPayout, Currency, PaymentEvent, PaymentEventKind, SettlementLine, Totals as ExpectedTotals,
};
use crate::reconcile::Status;
use crate::reference::{FxRate, MerchantStatus, MerchantVersion, Snapshot};

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
    /// Share of payments whose settlement is wrong or missing (0..1): missing, amount, fee,
    /// settled twice or in the wrong currency, in equal parts.
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
    /// Event time the payments are spread over.
    #[arg(long, default_value = "10days", value_parser = humantime::parse_duration)]
    pub span: Duration,
    /// Share of settlement lines for payments that never come (UNEXPECTED_SETTLEMENT).
    #[arg(long, default_value_t = 0.005)]
    pub unexpected_share: f64,
    /// Share of payments for merchants missing from the reference data (MISSING_REFERENCE).
    #[arg(long, default_value_t = 0.0)]
    pub unknown_merchant_share: f64,
    /// When settlement lines come: one per payment event a day after it, or the whole day's
    /// lines in one burst at 04:00 of the next day (an acquirer's daily settlement file).
    #[arg(long, value_enum, default_value = "with-payment")]
    pub settlement_rhythm: SettlementRhythm,
    /// The records' broker timestamps: the time they are produced, or their own event time
    /// (so broker time follows the simulated clock: a simulated day of quiet on a partition
    /// is a day of broker time, which idleness is judged by). On a broker with time-based
    /// retention, records stamped older than `retention.ms` are deleted soon after.
    #[arg(long, value_enum, default_value = "now")]
    pub broker_time: BrokerTime,
    /// The service's reconciliation.settlement_deadline, to predict the statuses
    /// (`payrecon simulate` takes it from the configuration).
    #[arg(skip = Duration::from_secs(72 * 3600))]
    pub settlement_deadline: Duration,
    /// The service's reconciliation.payment_deadline.
    #[arg(skip = Duration::from_secs(72 * 3600))]
    pub payment_deadline: Duration,
    /// The service's reconciliation.allowed_lateness.
    #[arg(skip = Duration::from_secs(3600))]
    pub allowed_lateness: Duration,
}

/// When settlement lines are produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SettlementRhythm {
    /// Each line 24 h after its payment event.
    WithPayment,
    /// A day's lines together, at 04:00 of the next day.
    DailyBurst,
}

/// Which time a produced record carries as its broker (create) timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerTime {
    /// The producer's clock (the broker's default).
    Now,
    /// The record's event time.
    Event,
}

impl SimulationOptions {
    /// Predicts statuses with the service's deadlines and lateness.
    pub fn with_rules(mut self, r: &crate::config::ReconciliationSettings) -> Self {
        self.settlement_deadline = r.settlement_deadline;
        self.payment_deadline = r.payment_deadline;
        self.allowed_lateness = r.allowed_lateness;
        self
    }

    fn settlement_deadline_chrono(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.settlement_deadline).unwrap_or(chrono::Duration::MAX)
    }

    fn payment_deadline_chrono(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.payment_deadline).unwrap_or(chrono::Duration::MAX)
    }

    fn allowed_lateness_chrono(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.allowed_lateness).unwrap_or(chrono::Duration::zero())
    }
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
    /// A bank statement line, for the payouts topic.
    Payout(BankPayout),
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
            Generated::Payout(b) => &b.account_id,
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

/// Everything a simulation produces and expects.
#[derive(Debug, Clone)]
pub struct Simulation {
    /// The records, in production order.
    pub records: Vec<Generated>,
    /// What PostgreSQL must hold once every record is consumed.
    pub totals: ExpectedTotals,
    /// The status each payment reference must end in.
    pub statuses: BTreeMap<String, Status>,
    /// The reference data the records were priced with (load it before consuming).
    pub merchants: Vec<MerchantVersion>,
    pub rates: Vec<FxRate>,
}

/// A fault injected into one payment; the status it must be found with once due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    MissingSettlement,
    AmountMismatch,
    FeeMismatch,
    OverSettled,
    CurrencyMismatch,
}

/// A settlement batch's id: one merchant's lines of one settlement day in one currency, as
/// an acquirer pays them out (one payout per merchant, day and currency). The currency is
/// part of it because a line settled in a wrong currency (a settlement-leg fault) or for a
/// merchant the reference data does not know (settled in the payment's currency) is
/// reported, and paid, apart from the merchant's usual batch.
fn batch_id(seed: u64, merchant: &str, date: NaiveDate, currency: Currency) -> String {
    format!("batch-{seed}-{merchant}-{date}-{currency}")
}

/// Value of one unit of a currency in EUR, to derive consistent cross rates.
fn unit_value(c: Currency) -> Decimal {
    match c.code() {
        "EUR" => Decimal::ONE,
        "USD" => Decimal::new(92, 2),
        "GBP" => Decimal::new(117, 2),
        "JPY" => Decimal::new(62, 4),
        "CHF" => Decimal::new(105, 2),
        _ => Decimal::new(50, 2),
    }
}

fn parse_currencies(o: &SimulationOptions) -> anyhow::Result<Vec<Currency>> {
    let currencies: Vec<Currency> = o
        .currencies
        .iter()
        .map(|c| Currency::from_code(c.trim()))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(!currencies.is_empty(), "at least one currency is needed");
    anyhow::ensure!(o.merchants > 0, "at least one merchant is needed");
    Ok(currencies)
}

fn start_of(o: &SimulationOptions) -> DateTime<Utc> {
    o.start_time
        .unwrap_or_else(|| Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap())
}

/// The simulation's reference data: `merchant-NNN` settled in the currencies in turn, 150 bps
/// (plus 0.25 fixed for even merchants whose currency has cents); FX rates for every ordered
/// pair, valid from a day before the start, and a second version 2% higher from 5 days in
/// (so events before and after it are priced differently).
pub fn reference_data(
    o: &SimulationOptions,
) -> anyhow::Result<(Vec<MerchantVersion>, Vec<FxRate>)> {
    let currencies = parse_currencies(o)?;
    let start = start_of(o);
    let merchants = (0..o.merchants)
        .map(|k| {
            let currency = currencies[k as usize % currencies.len()];
            MerchantVersion {
                merchant_id: format!("merchant-{k:03}"),
                valid_from: start - chrono::Duration::days(1),
                name: format!("Simulated merchant {k}"),
                settlement_currency: currency,
                fee_bps: Decimal::new(150, 0),
                fee_fixed: if k % 2 == 0 && currency.minor_units() >= 2 {
                    Decimal::new(25, 2)
                } else {
                    Decimal::ZERO
                },
                status: MerchantStatus::Active,
                tolerance_abs: None,
                tolerance_rel: None,
                settlement_deadline: None,
                payment_deadline: None,
            }
        })
        .collect();
    let mut rates = Vec::new();
    for &base in &currencies {
        for &quote in &currencies {
            if base == quote {
                continue;
            }
            let rate = (unit_value(base) / unit_value(quote)).round_dp(6);
            rates.push(FxRate {
                base,
                quote,
                valid_from: start - chrono::Duration::days(1),
                rate,
            });
            rates.push(FxRate {
                base,
                quote,
                valid_from: start + chrono::Duration::days(5),
                rate: (rate * Decimal::new(102, 2)).round_dp(6),
            });
        }
    }
    Ok((merchants, rates))
}

/// Generates the records (in production order) and their expected totals.
pub fn generate(
    o: &SimulationOptions,
    encoder_payment_schema_id: u32,
) -> anyhow::Result<(Vec<Generated>, ExpectedTotals)> {
    let s = simulate(o, encoder_payment_schema_id)?;
    Ok((s.records, s.totals))
}

/// Generates a whole simulation: records, reference data, expected totals and statuses.
pub fn simulate(
    o: &SimulationOptions,
    encoder_payment_schema_id: u32,
) -> anyhow::Result<Simulation> {
    let currencies = parse_currencies(o)?;
    let (merchants, rates) = reference_data(o)?;
    let snapshot = Snapshot::new(merchants.clone(), rates.clone(), 0);
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let start = start_of(o);
    let span = chrono::Duration::from_std(o.span).unwrap_or(chrono::Duration::days(10));
    let spacing = span / (o.payments.max(1) as i32);
    let mut out = Vec::new();
    let mut late = Vec::new();
    let mut expected = ExpectedTotals::default();
    let mut statuses = BTreeMap::new();
    let faults = [
        Fault::MissingSettlement,
        Fault::AmountMismatch,
        Fault::FeeMismatch,
        Fault::OverSettled,
        Fault::CurrencyMismatch,
    ];
    // Faults go only into payments whose deadlines every partition's watermark will have
    // passed by the end (a day to spare): the watermark is the lowest over partitions, which
    // depends on how keys fall on partitions, so a fault nearer the end could be judged
    // either way.
    let last = start + spacing * (o.payments.saturating_sub(1) as i32);
    // A line comes 24 h after its payment, or in the next day's 04:00 burst (at most 28 h).
    let line_delay = match o.settlement_rhythm {
        SettlementRhythm::WithPayment => chrono::Duration::hours(24),
        SettlementRhythm::DailyBurst => chrono::Duration::hours(28),
    };
    let judged_by = last
        - o.allowed_lateness_chrono()
        - o.settlement_deadline_chrono()
            .max(line_delay + o.payment_deadline_chrono())
        - chrono::Duration::days(1);
    // Daily bursts: lines waiting for their burst, and when the next one is due.
    let mut burst: Vec<SettlementLine> = Vec::new();
    let burst_time = |t: DateTime<Utc>| {
        (t.date_naive() + chrono::Days::new(1))
            .and_hms_opt(4, 0, 0)
            .expect("04:00")
            .and_utc()
    };
    for i in 0..o.payments {
        let t = start + spacing * (i as i32);
        let in_window = t < judged_by;
        if burst.first().is_some_and(|l| l.event_time <= t) {
            let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut burst)
                .into_iter()
                .partition(|l| l.event_time <= t);
            burst = rest;
            for l in due {
                push_line(o, &mut rng, l, &mut expected, &mut out, &mut late);
            }
        }
        let unknown = rng.random_bool(o.unknown_merchant_share.clamp(0.0, 1.0));
        let k = rng.random_range(0..o.merchants);
        let merchant = if unknown {
            format!("merchant-unknown-{k:03}")
        } else {
            format!("merchant-{k:03}")
        };
        let currency = currencies[rng.random_range(0..currencies.len())];
        let scale = currency.minor_units();
        let minor: i64 = rng.random_range(100..100_000) * 10i64.pow(scale) / 100;
        let amount = Decimal::new(minor.max(1), scale);
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
        let mut fault = if rng.random_bool(o.mismatch_share.clamp(0.0, 1.0)) && in_window {
            faults[rng.random_range(0..faults.len())]
        } else {
            Fault::None
        };
        // The acquirer settles in the merchant's currency at the rate of the event's time.
        let terms = snapshot.merchant_at(&merchant, t);
        let settle_in = terms.as_ref().map_or(currency, |m| m.settlement_currency);
        let other_currency = currencies.iter().copied().find(|c| *c != settle_in);
        if fault == Fault::CurrencyMismatch && other_currency.is_none() {
            fault = Fault::AmountMismatch;
        }
        let settle_scale = settle_in.minor_units();
        let mut lines = Vec::new();
        let date = (t + chrono::Duration::hours(24)).date_naive();
        for (n, e) in events.iter().enumerate() {
            if fault == Fault::MissingSettlement {
                break;
            }
            let rate = snapshot
                .rate_at(e.currency, settle_in, e.event_time)
                .unwrap_or(Decimal::ONE);
            let mut line_currency = settle_in;
            let mut gross = round(e.signed_amount() * rate, settle_in);
            let mut fee = match (&terms, e.kind) {
                (Some(m), PaymentEventKind::Capture) => round(
                    gross * m.fee_bps / Decimal::new(10_000, 0) + m.fee_fixed,
                    settle_in,
                ),
                _ => Decimal::ZERO,
            };
            if n == 0 {
                match fault {
                    Fault::AmountMismatch => gross += Decimal::ONE,
                    Fault::FeeMismatch => fee += Decimal::new(1, settle_scale),
                    Fault::CurrencyMismatch => {
                        line_currency = other_currency.expect("checked above");
                        gross = round(e.signed_amount(), line_currency);
                        fee = Decimal::ZERO;
                    }
                    _ => {}
                }
            }
            let line = SettlementLine {
                line_id: format!("line-{}-{i}-{n}", o.seed),
                batch_id: batch_id(o.seed, &merchant, date, line_currency),
                payment_reference: reference.clone(),
                merchant_id: merchant.clone(),
                gross,
                fee,
                net: gross - fee,
                currency: line_currency,
                settlement_date: date,
                event_time: e.event_time + chrono::Duration::hours(24),
            };
            if n == 0 && fault == Fault::OverSettled {
                // The same capture settled again in a later batch, under a new line id.
                lines.push(SettlementLine {
                    line_id: format!("line-{}-{i}-again", o.seed),
                    batch_id: format!("{}-again", line.batch_id),
                    ..line.clone()
                });
            }
            lines.push(line);
        }
        let status = match fault {
            _ if unknown => Status::MissingReference,
            Fault::None => Status::Matched,
            Fault::MissingSettlement => Status::MissingSettlement,
            Fault::AmountMismatch => Status::AmountMismatch,
            Fault::FeeMismatch => Status::FeeMismatch,
            Fault::OverSettled => Status::OverSettled,
            Fault::CurrencyMismatch => Status::CurrencyMismatch,
        };
        statuses.insert(reference.clone(), status);
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
        for mut l in lines {
            match o.settlement_rhythm {
                SettlementRhythm::WithPayment => {
                    push_line(o, &mut rng, l, &mut expected, &mut out, &mut late)
                }
                SettlementRhythm::DailyBurst => {
                    l.event_time = burst_time(t);
                    burst.push(l);
                }
            }
        }
        // Now and then a settlement line for a payment that never comes.
        if rng.random_bool(o.unexpected_share.clamp(0.0, 1.0)) && in_window {
            let reference = format!("unexpected-{}-{i}", o.seed);
            // In the merchant's own settlement currency, so nothing but the missing payment
            // is wrong with it.
            let settle_k = currencies[k as usize % currencies.len()];
            let gross = round(amount, settle_k).max(Decimal::ONE);
            let settled_for = format!("merchant-{k:03}");
            let line = SettlementLine {
                line_id: format!("line-{}-{i}-unexpected", o.seed),
                batch_id: batch_id(o.seed, &settled_for, date, settle_k),
                payment_reference: reference.clone(),
                merchant_id: settled_for,
                gross,
                fee: Decimal::ZERO,
                net: gross,
                currency: settle_k,
                settlement_date: date,
                event_time: t + chrono::Duration::hours(24),
            };
            statuses.insert(reference, Status::UnexpectedSettlement);
            match o.settlement_rhythm {
                SettlementRhythm::WithPayment => {
                    push_line(o, &mut rng, line, &mut expected, &mut out, &mut late)
                }
                SettlementRhythm::DailyBurst => burst.push(SettlementLine {
                    event_time: burst_time(t),
                    ..line
                }),
            }
        }
    }
    for l in std::mem::take(&mut burst) {
        push_line(o, &mut rng, l, &mut expected, &mut out, &mut late);
    }
    out.extend(late);
    for status in statuses.values() {
        *expected
            .statuses
            .entry(status.as_str().to_owned())
            .or_default() += 1;
    }
    // Spread malformed records evenly through the stream.
    let malformed = malformed_records(o.malformed, encoder_payment_schema_id, o.seed);
    expected.dead_letters = malformed.len() as i64;
    let step = (out.len() / (malformed.len() + 1)).max(1);
    for (n, m) in malformed.into_iter().enumerate() {
        let at = ((n + 1) * step + n).min(out.len());
        out.insert(at, m);
    }
    expected.records = out.len() as i64;
    Ok(Simulation {
        records: out,
        totals: expected,
        statuses,
        merchants,
        rates,
    })
}

/// Counts a settlement line in the expected totals and queues it: sometimes twice
/// (duplicate), sometimes at the very end (late).
fn push_line(
    o: &SimulationOptions,
    rng: &mut ChaCha8Rng,
    l: SettlementLine,
    expected: &mut ExpectedTotals,
    out: &mut Vec<Generated>,
    late: &mut Vec<Generated>,
) {
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
///
/// `topics` are the input topics in topic-index order: payments, settlements and, when the
/// records hold payouts, the payouts topic.
pub async fn produce(
    producer: &FutureProducer,
    encoder: &Encoder,
    topics: &[&str],
    records: &[Generated],
    rate: u64,
    progress: impl FnMut(usize),
) -> anyhow::Result<()> {
    produce_stamped(
        producer,
        encoder,
        topics,
        records,
        rate,
        BrokerTime::Now,
        progress,
    )
    .await
}

/// [`produce`] with the records' broker timestamps chosen by `broker_time`.
#[allow(clippy::too_many_arguments)]
pub async fn produce_stamped(
    producer: &FutureProducer,
    encoder: &Encoder,
    topics: &[&str],
    records: &[Generated],
    rate: u64,
    broker_time: BrokerTime,
    mut progress: impl FnMut(usize),
) -> anyhow::Result<()> {
    anyhow::ensure!(
        topics.len() >= 2,
        "payments and settlements topics are required"
    );
    let (payments_topic, settlements_topic) = (topics[0], topics[1]);
    let payouts_topic = topics.get(2).copied();
    let mut in_flight = FuturesUnordered::new();
    let mut stamp: Option<i64> = None;
    let started = tokio::time::Instant::now();
    for (n, r) in records.iter().enumerate() {
        if rate > 0 {
            let due = started + Duration::from_secs_f64(n as f64 / rate as f64);
            tokio::time::sleep_until(due).await;
        }
        let (topic, bytes) = match r {
            Generated::Payment(p) => (payments_topic, encoder.encode_payment(p)?),
            Generated::Settlement(s) => (settlements_topic, encoder.encode_settlement(s)?),
            Generated::Payout(b) => (
                payouts_topic.context("payout records need a payouts topic")?,
                encoder.encode_payout(b)?,
            ),
            Generated::Malformed {
                payments_topic: true,
                bytes,
                ..
            } => (payments_topic, bytes.clone()),
            Generated::Malformed { bytes, .. } => (settlements_topic, bytes.clone()),
        };
        let key = r.key().to_owned();
        // A malformed record has no event time: it takes the previous record's.
        stamp = match (broker_time, r) {
            (BrokerTime::Now, _) => None,
            (BrokerTime::Event, Generated::Payment(p)) => Some(p.event_time.timestamp_millis()),
            (BrokerTime::Event, Generated::Settlement(l)) => Some(l.event_time.timestamp_millis()),
            (BrokerTime::Event, Generated::Payout(b)) => Some(b.event_time.timestamp_millis()),
            (BrokerTime::Event, Generated::Malformed { .. }) => stamp,
        };
        loop {
            let mut record = FutureRecord::to(topic).key(&key).payload(&bytes);
            if let Some(ms) = stamp {
                record = record.timestamp(ms);
            }
            match producer.send_result(record) {
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
