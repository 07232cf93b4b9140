//! The load generator: realistic payments, matching settlement lines and the bank statement
//! lines paying each settlement batch, with configurable shares of refunds, mismatches,
//! faulty payouts, duplicates, late events and malformed records, produced with an
//! idempotent producer. It also computes the totals PostgreSQL must end up with and the
//! status every reconciliation and payout item must end in.
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

use crate::codec::frame;
use crate::domain::{
    BankPayout, Currency, PaymentEvent, PaymentEventKind, SettlementLine, Totals as ExpectedTotals,
};
use crate::inputs::Encoder;
use crate::inputs::payments::to_avro as payment_to_value;
use crate::reconcile::Status;
use crate::reconcile::payout::{self, PayoutKey, PayoutRules, PayoutState, PayoutStatus};
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
    /// Generate the payout leg: every settlement batch's bank statement line(s), for the
    /// payouts topic. `--payouts false` for runs that produce to the payments and settlements
    /// topics only: no statement lines are generated and no payout statuses predicted.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub payouts: bool,
    /// Share of settlement batches with a positive net whose payout is faulty (0..1), in equal
    /// parts: missing, short (a reserve withheld), over-paid, paid in another currency, split
    /// into two or three credits, paid after the deadline, an extra credit naming a batch that
    /// does not exist, or an extra statement line with no batch reference. Faults whose
    /// verdict waits for the deadline go only into batches due well before the end.
    #[arg(long, default_value_t = 0.1)]
    pub payout_fault_share: f64,
    /// The service's reconciliation.payout_deadline.
    #[arg(skip = Duration::from_secs(72 * 3600))]
    pub payout_deadline: Duration,
    /// The service's reconciliation.payout_tolerance_abs and payout_tolerance_rel (the
    /// predictions judge with them; the faults are generated without regard to them).
    #[arg(skip)]
    pub payout_tolerance_abs: Decimal,
    #[arg(skip)]
    pub payout_tolerance_rel: Decimal,
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
        self.payout_deadline = r.payout_deadline;
        self.payout_tolerance_abs = r.payout_tolerance_abs;
        self.payout_tolerance_rel = r.payout_tolerance_rel;
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

    /// The payout leg's rules as the service applies them.
    pub fn payout_rules(&self) -> PayoutRules {
        PayoutRules {
            deadline: chrono::Duration::from_std(self.payout_deadline)
                .unwrap_or(chrono::Duration::MAX),
            tolerance: crate::reconcile::Tolerance {
                absolute: self.payout_tolerance_abs,
                relative: self.payout_tolerance_rel,
            },
        }
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
    /// The status each payout item (settlement batch, or statement line without a batch
    /// reference) must end in; empty when `payouts` is off.
    pub payout_statuses: BTreeMap<PayoutKey, PayoutStatus>,
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
    let (late_payouts, payout_statuses) = if o.payouts {
        add_payouts(
            o,
            &mut rng,
            &currencies,
            last,
            &mut out,
            &late,
            &mut expected,
        )
    } else {
        (Vec::new(), BTreeMap::new())
    };
    out.extend(late);
    out.extend(late_payouts);
    for status in statuses.values() {
        *expected
            .statuses
            .entry(status.as_str().to_owned())
            .or_default() += 1;
    }
    for status in payout_statuses.values() {
        *expected
            .payout_statuses
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
        payout_statuses,
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

/// A fault injected into one settlement batch's payout, and the status it ends in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayoutFault {
    /// Paid exactly, in one credit: PAYOUT_MATCHED.
    None,
    /// Nothing paid: PAYOUT_MISSING once due.
    Missing,
    /// A reserve of a tenth withheld: PAYOUT_AMOUNT_MISMATCH once due.
    Short,
    /// A hundredth too much paid: PAYOUT_AMOUNT_MISMATCH once due (until then a late line
    /// could explain it).
    Over,
    /// The net paid in another currency: PAYOUT_CURRENCY_MISMATCH at once.
    Currency,
    /// Two or three credits that sum to the net: PAYOUT_MATCHED.
    Split,
    /// Paid exactly but after the deadline, and produced after everything else: the batch is
    /// PAYOUT_MISSING until the credit comes, then PAYOUT_MATCHED.
    Late,
    /// Paid exactly, plus a credit naming a batch that does not exist: PAYOUT_UNEXPECTED
    /// once the credit has waited the deadline for its batch's lines.
    UnknownBatch,
    /// Paid exactly, plus a statement line with no batch reference: PAYOUT_UNEXPECTED at once.
    NoReference,
}

impl PayoutFault {
    const ALL: [PayoutFault; 8] = [
        PayoutFault::Missing,
        PayoutFault::Short,
        PayoutFault::Over,
        PayoutFault::Currency,
        PayoutFault::Split,
        PayoutFault::Late,
        PayoutFault::UnknownBatch,
        PayoutFault::NoReference,
    ];

    /// Whether its verdict (or, for a late payout, the exception it opens first) waits for a
    /// deadline: such faults go only into batches the final watermark is sure to judge.
    fn waits_for_deadline(self) -> bool {
        matches!(
            self,
            PayoutFault::Missing
                | PayoutFault::Short
                | PayoutFault::Over
                | PayoutFault::Late
                | PayoutFault::UnknownBatch
        )
    }
}

/// A settlement batch as generated: what the acquirer's report says it owes.
#[derive(Debug, Clone)]
struct Batch {
    id: String,
    merchant: String,
    currency: Currency,
    /// The sum of its distinct lines' net, faulty lines included (the bank pays what the
    /// report says, not what the payments imply).
    net: Decimal,
    last_line: DateTime<Utc>,
    /// Where in the main stream its last line (a copy not held back) is: its payouts come
    /// after it. None when every line is held back.
    last_index: Option<usize>,
}

/// A statement line to produce; `late`: after everything else.
#[derive(Debug, Clone)]
struct PlannedPayout {
    payout: BankPayout,
    late: bool,
}

/// How the statement lines of the batches are made.
struct PayoutPlan<'a> {
    o: &'a SimulationOptions,
    currencies: &'a [Currency],
    rules: PayoutRules,
    /// The highest event time of the payments and lines: no statement line is stamped later.
    /// A partition far ahead of the others would move the stream time and, with broker time =
    /// event time, leave the others idle, so the watermark would run ahead of the records.
    stream_end: DateTime<Utc>,
    /// Deadlines before this are passed by the final watermark with a day to spare (the
    /// settlement leg's margin), so faults that wait for one are judged by the end.
    judged_by: DateTime<Utc>,
    /// Statement lines issued so far (their ids count up).
    issued: u64,
}

impl PayoutPlan<'_> {
    fn statement_line(
        &mut self,
        b: &Batch,
        batch_reference: Option<String>,
        (amount, currency): (Decimal, Currency),
        at: DateTime<Utc>,
        description: String,
    ) -> BankPayout {
        self.issued += 1;
        BankPayout {
            statement_line_id: format!("stmt-{}-{}", self.o.seed, self.issued),
            account_id: format!("acct-{}", b.merchant),
            value_date: at.date_naive(),
            amount,
            currency,
            batch_reference,
            description,
            event_time: at,
        }
    }

    /// A credit of some hundreds in `currency` that no batch owes.
    fn stray_amount(rng: &mut ChaCha8Rng, currency: Currency) -> Decimal {
        let scale = currency.minor_units();
        Decimal::new(
            rng.random_range(1_000..100_000) * 10i64.pow(scale) / 100,
            scale,
        )
    }

    /// The statement lines paying batch `b`, with the fault drawn for it (see
    /// [`PayoutFault`]). A batch that nets to zero owes nothing and gets none.
    fn payouts(&mut self, rng: &mut ChaCha8Rng, b: &Batch) -> Vec<PlannedPayout> {
        if b.net.is_zero() {
            return Vec::new();
        }
        let deadline = self.rules.deadline;
        let after = |t: DateTime<Utc>, d: chrono::Duration| t.checked_add_signed(d);
        // Some hours after the last line, well inside the deadline.
        let delay = chrono::Duration::minutes(rng.random_range(4 * 60..=16 * 60)).min(deadline / 2);
        let end = self.stream_end;
        let at = after(b.last_line, delay).unwrap_or(b.last_line).min(end);
        // `minutes` after the payout, but never past the end of the stream.
        let later = |minutes: i64| {
            after(at, chrono::Duration::minutes(minutes))
                .unwrap_or(at)
                .min(end)
        };
        let mut fault = PayoutFault::None;
        if b.net > Decimal::ZERO && rng.random_bool(self.o.payout_fault_share.clamp(0.0, 1.0)) {
            fault = PayoutFault::ALL[rng.random_range(0..PayoutFault::ALL.len())];
        }
        // The latest deadline a fault waits for: the batch's, or its extra credit's (an hour
        // after the payout, since the credit waits for lines from its own time).
        let judged = after(later(60), deadline).is_some_and(|d| d < self.judged_by);
        if fault.waits_for_deadline() && !judged {
            fault = PayoutFault::None;
        }
        let c = b.currency;
        let unit = Decimal::new(1, c.minor_units());
        let part = |share: u32| {
            (b.net / Decimal::from(share))
                .round_dp_with_strategy(c.minor_units(), rust_decimal::RoundingStrategy::ToZero)
                .max(unit)
        };
        let payout = format!("ACQ PAYOUT {}", b.id);
        let reference = Some(b.id.clone());
        let mut out = Vec::new();
        let mut push = |plan: &mut Self, reference, money, at, description, late| {
            let payout = plan.statement_line(b, reference, money, at, description);
            out.push(PlannedPayout { payout, late });
        };
        match fault {
            PayoutFault::None => push(self, reference, (b.net, c), at, payout, false),
            PayoutFault::Missing => {}
            PayoutFault::Short => {
                let paid = b.net - part(10);
                if !paid.is_zero() {
                    let text = format!("{payout} LESS RESERVE");
                    push(self, reference, (paid, c), at, text, false);
                }
            }
            PayoutFault::Over => push(self, reference, (b.net + part(100), c), at, payout, false),
            PayoutFault::Currency => {
                let other = (self.currencies.iter().copied())
                    .chain(Currency::all())
                    .find(|o| *o != c)
                    .expect("there is more than one currency");
                let amount = round(b.net * unit_value(c) / unit_value(other), other)
                    .max(Decimal::new(1, other.minor_units()));
                push(self, reference, (amount, other), at, payout, false);
            }
            PayoutFault::Split => {
                let mut minor = b.net;
                minor.rescale(c.minor_units());
                let mut left = minor.mantissa();
                let parts = rng.random_range(2..=3_i128).min(left);
                for n in 1..=parts {
                    let this = if n == parts {
                        left
                    } else {
                        rng.random_range(1..=left - (parts - n))
                    };
                    left -= this;
                    let amount = Decimal::from_i128_with_scale(this, c.minor_units());
                    let text = format!("{payout} PART {n}/{parts}");
                    let t = later(90 * (n as i64 - 1));
                    push(self, reference.clone(), (amount, c), t, text, false);
                }
            }
            PayoutFault::Late => {
                let late = after(b.last_line, deadline)
                    .and_then(|d| after(d, chrono::Duration::hours(rng.random_range(1..=12))))
                    .expect("a judged deadline is representable");
                push(self, reference, (b.net, c), late, payout, true);
            }
            PayoutFault::UnknownBatch => {
                push(self, reference, (b.net, c), at, payout.clone(), false);
                let unknown = format!("batch-{}-unknown-{}", self.o.seed, self.issued);
                let text = format!("ACQ PAYOUT {unknown}");
                let stray = (Self::stray_amount(rng, c), c);
                push(self, Some(unknown), stray, later(60), text, false);
            }
            PayoutFault::NoReference => {
                push(self, reference, (b.net, c), at, payout.clone(), false);
                let text = format!("CREDIT TRANSFER {}", b.merchant);
                let stray = (Self::stray_amount(rng, c), c);
                push(self, None, stray, later(120), text, false);
            }
        }
        out
    }
}

/// The event time of a generated record (malformed ones have none).
fn event_time(r: &Generated) -> Option<DateTime<Utc>> {
    match r {
        Generated::Payment(p) => Some(p.event_time),
        Generated::Settlement(l) => Some(l.event_time),
        Generated::Payout(b) => Some(b.event_time),
        Generated::Malformed { .. } => None,
    }
}

/// The payout leg: the statement lines paying every settlement batch of `out` and
/// `late_lines`, woven into `out`, with their expected totals and the status each payout
/// item must end in. Returns the statement lines to produce after everything else, and the
/// predictions.
///
/// A statement line goes into `out` after its batch's last line and no earlier than the
/// point where the other streams' event times reach its own, so the payouts topic moves
/// with the others and never ahead of them. The predictions are
/// [`payout::judge`] of each item's state from every distinct record, at the watermark
/// every faulted deadline is sure to be behind; the items no fault touched are MATCHED at
/// any watermark.
fn add_payouts(
    o: &SimulationOptions,
    rng: &mut ChaCha8Rng,
    currencies: &[Currency],
    last_payment: DateTime<Utc>,
    out: &mut Vec<Generated>,
    late_lines: &[Generated],
    expected: &mut ExpectedTotals,
) -> (Vec<Generated>, BTreeMap<PayoutKey, PayoutStatus>) {
    // The highest event time produced up to each position, and the batches.
    let mut frontier = Vec::with_capacity(out.len());
    let mut high = DateTime::<Utc>::MIN_UTC;
    let mut batches: BTreeMap<String, Batch> = BTreeMap::new();
    let mut states: BTreeMap<PayoutKey, PayoutState> = BTreeMap::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut add = |l: &SettlementLine, index: Option<usize>| {
        let b = batches.entry(l.batch_id.clone()).or_insert_with(|| Batch {
            id: l.batch_id.clone(),
            merchant: l.merchant_id.clone(),
            currency: l.currency,
            net: Decimal::ZERO,
            last_line: l.event_time,
            last_index: None,
        });
        b.last_index = b.last_index.max(index);
        // A duplicate is one line, as the service stores it.
        if seen.insert(l.line_id.clone()) {
            b.net += l.net;
            b.last_line = b.last_line.max(l.event_time);
            let state = states
                .entry(PayoutKey::Batch(l.batch_id.clone()))
                .or_default();
            *state = payout::fold(std::mem::take(state), [l], []);
        }
    };
    for (i, r) in out.iter().enumerate() {
        if let Some(t) = event_time(r) {
            high = high.max(t);
        }
        if let Generated::Settlement(l) = r {
            add(l, Some(i));
        }
        frontier.push(high);
    }
    for r in late_lines {
        if let Generated::Settlement(l) = r {
            add(l, None);
        }
    }
    let mut batches: Vec<Batch> = batches.into_values().collect();
    batches.sort_by(|a, b| (a.last_line, &a.id).cmp(&(b.last_line, &b.id)));
    let rules = o.payout_rules();
    let judged_by = last_payment - o.allowed_lateness_chrono() - chrono::Duration::days(1);
    let mut plan = PayoutPlan {
        o,
        currencies,
        rules,
        stream_end: high,
        judged_by,
        issued: 0,
    };
    let mut woven: Vec<(usize, BankPayout)> = Vec::new();
    let mut late = Vec::new();
    for b in &batches {
        for PlannedPayout {
            payout: p,
            late: is_late,
        } in plan.payouts(rng, b)
        {
            let t = expected
                .payouts
                .entry(format!("{}/{}", p.account_id, p.currency))
                .or_default();
            t.count += 1;
            t.sum += p.amount;
            expected.statement_lines += 1;
            let state = states.entry(PayoutKey::of_payout(&p)).or_default();
            *state = payout::fold(std::mem::take(state), [], [&p]);
            let copies = if rng.random_bool(o.duplicate_share.clamp(0.0, 1.0)) {
                2
            } else {
                1
            };
            // After the first position whose event time reaches the payout's (the end when
            // none does), and after the batch's last line.
            let reached = frontier.partition_point(|f| *f < p.event_time) + 1;
            let at = reached
                .min(out.len())
                .max(b.last_index.map_or(0, |i| i + 1));
            for _ in 0..copies {
                if is_late {
                    late.push(Generated::Payout(p.clone()));
                } else {
                    woven.push((at, p.clone()));
                }
            }
        }
    }
    // Stable: the statement lines of one position keep the order they were issued in.
    woven.sort_by_key(|(at, _)| *at);
    let mut woven = woven.into_iter().peekable();
    let mut merged = Vec::with_capacity(out.len() + woven.len());
    for (i, r) in std::mem::take(out).into_iter().enumerate() {
        while let Some((_, p)) = woven.next_if(|(at, _)| *at == i) {
            merged.push(Generated::Payout(p));
        }
        merged.push(r);
    }
    merged.extend(woven.map(|(_, p)| Generated::Payout(p)));
    *out = merged;
    let statuses = states
        .iter()
        .map(|(k, s)| (k.clone(), payout::judge(k, s, judged_by, &rules).status))
        .collect();
    (late, statuses)
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use super::*;
    use crate::domain::PayoutTotal;

    /// A simulation with enough faulty payouts that every kind appears.
    fn options(payments: u64, seed: u64) -> SimulationOptions {
        SimulationOptions {
            payments,
            seed,
            malformed: 3,
            payout_fault_share: 0.5,
            ..SimulationOptions::default()
        }
    }

    fn lines(s: &Simulation) -> impl Iterator<Item = &SettlementLine> {
        s.records.iter().filter_map(|r| match r {
            Generated::Settlement(l) => Some(l),
            _ => None,
        })
    }

    fn payouts(s: &Simulation) -> impl Iterator<Item = &BankPayout> {
        s.records.iter().filter_map(|r| match r {
            Generated::Payout(b) => Some(b),
            _ => None,
        })
    }

    /// Every payout item's distinct records (by id, as the service stores them).
    fn items(s: &Simulation) -> BTreeMap<PayoutKey, (Vec<&SettlementLine>, Vec<&BankPayout>)> {
        let mut by_id: HashMap<&str, &SettlementLine> = HashMap::new();
        for l in lines(s) {
            by_id.entry(&l.line_id).or_insert(l);
        }
        let mut paid: HashMap<&str, &BankPayout> = HashMap::new();
        for b in payouts(s) {
            paid.entry(&b.statement_line_id).or_insert(b);
        }
        let mut out: BTreeMap<PayoutKey, (Vec<_>, Vec<_>)> = BTreeMap::new();
        for l in by_id.into_values() {
            (out.entry(PayoutKey::Batch(l.batch_id.clone()))
                .or_default()
                .0)
                .push(l);
        }
        for b in paid.into_values() {
            (out.entry(PayoutKey::of_payout(b)).or_default().1).push(b);
        }
        out
    }

    /// What kind of payout an item got, told from its records alone.
    fn kind_of(
        key: &PayoutKey,
        (lines, paid): &(Vec<&SettlementLine>, Vec<&BankPayout>),
        deadline: chrono::Duration,
    ) -> &'static str {
        let net: Decimal = lines.iter().map(|l| l.net).sum();
        let sum: Decimal = paid.iter().map(|b| b.amount).sum();
        let last_line = lines.iter().map(|l| l.event_time).max();
        match key {
            PayoutKey::Line(_) => "no batch reference",
            PayoutKey::Batch(_) if lines.is_empty() => "unknown batch",
            _ if net.is_zero() => "nets to zero",
            _ if paid.is_empty() => "missing",
            _ if paid.iter().any(|b| b.currency != lines[0].currency) => "other currency",
            _ if paid
                .iter()
                .any(|b| last_line.is_some_and(|t| b.event_time > t + deadline)) =>
            {
                "late"
            }
            _ if paid.len() > 1 => "split",
            _ if sum < net => "short",
            _ if sum > net => "over",
            _ => "exact",
        }
    }

    #[test]
    fn every_payout_fault_appears_with_the_status_it_must_end_in() {
        use PayoutStatus::*;
        let o = options(6_000, 42);
        let s = simulate(&o, 1).unwrap();
        let want = [
            ("exact", Matched),
            ("missing", Missing),
            ("short", AmountMismatch),
            ("over", AmountMismatch),
            ("other currency", CurrencyMismatch),
            ("split", Matched),
            ("late", Matched),
            ("unknown batch", Unexpected),
            ("no batch reference", Unexpected),
        ];
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (key, records) in items(&s) {
            let kind = kind_of(&key, &records, o.payout_rules().deadline);
            *seen.entry(kind).or_default() += 1;
            let status = s.payout_statuses[&key];
            match want.iter().find(|(k, _)| *k == kind) {
                Some((_, w)) => assert_eq!(status, *w, "{kind} {key:?}: {records:?}"),
                None => assert_eq!(status, Matched, "{kind} {key:?}"),
            }
        }
        for (kind, _) in want {
            assert!(
                seen.get(kind).is_some_and(|n| *n > 0),
                "no {kind}: {seen:?}"
            );
        }
        // Nothing the simulator did not inject is an exception: one item per fault at most.
        let exceptions = s.payout_statuses.values().filter(|s| s.is_exception());
        assert_eq!(
            exceptions.count(),
            [
                "missing",
                "short",
                "over",
                "other currency",
                "unknown batch",
                "no batch reference"
            ]
            .iter()
            .map(|k| seen[k])
            .sum::<usize>()
        );
        assert!(!s.payout_statuses.values().any(|s| *s == Pending));
        for (status, n) in &s.totals.payout_statuses {
            let predicted = s.payout_statuses.values().filter(|p| p.as_str() == status);
            assert_eq!(predicted.count() as i64, *n, "{status}");
        }
    }

    #[test]
    fn payout_predictions_equal_a_brute_force_judge_at_any_final_watermark() {
        let o = options(3_000, 7);
        let s = simulate(&o, 1).unwrap();
        let rules = o.payout_rules();
        let latest = (s.records.iter()).filter_map(event_time).max().unwrap();
        let items = items(&s);
        assert_eq!(
            items.keys().collect::<Vec<_>>(),
            s.payout_statuses.keys().collect::<Vec<_>>()
        );
        for at in [latest, latest + chrono::Duration::days(365)] {
            for (key, (lines, paid)) in &items {
                let state = PayoutState::of(lines.iter().copied(), paid.iter().copied());
                let v = payout::judge(key, &state, at, &rules);
                assert_eq!(
                    v.status, s.payout_statuses[key],
                    "{key:?} at {at}: {}",
                    v.reason
                );
            }
        }
    }

    #[test]
    fn a_seed_gives_the_same_records_and_predictions_and_another_seed_others() {
        let a = simulate(&options(1_500, 9), 1).unwrap();
        let b = simulate(&options(1_500, 9), 1).unwrap();
        let c = simulate(&options(1_500, 10), 1).unwrap();
        assert_eq!(format!("{:?}", a.records), format!("{:?}", b.records));
        assert_eq!(a.payout_statuses, b.payout_statuses);
        assert_eq!(a.totals, b.totals);
        assert_ne!(format!("{:?}", a.records), format!("{:?}", c.records));
    }

    #[test]
    fn a_settlement_batch_is_one_merchants_lines_of_one_day_in_one_currency() {
        let s = simulate(&options(4_000, 3), 1).unwrap();
        let mut batches: BTreeMap<&str, BTreeSet<(&str, NaiveDate, Currency)>> = BTreeMap::new();
        for l in lines(&s) {
            (batches.entry(&l.batch_id).or_default()).insert((
                &l.merchant_id,
                l.settlement_date,
                l.currency,
            ));
        }
        assert!(batches.len() > 100, "{}", batches.len());
        for (batch, kinds) in &batches {
            assert_eq!(kinds.len(), 1, "{batch} mixes {kinds:?}");
        }
        // Its payouts go to the merchant's account.
        for p in payouts(&s) {
            if let Some(kinds) = p.batch_reference.as_deref().and_then(|b| batches.get(b)) {
                let merchant = kinds.first().unwrap().0;
                assert_eq!(p.account_id, format!("acct-{merchant}"));
            }
        }
    }

    #[test]
    fn payouts_follow_their_lines_and_never_run_ahead_of_the_other_streams() {
        let deadline = options(0, 0).payout_rules().deadline;
        for rhythm in [SettlementRhythm::WithPayment, SettlementRhythm::DailyBurst] {
            for late_share in [0.0, 0.02] {
                let o = SimulationOptions {
                    settlement_rhythm: rhythm,
                    late_share,
                    ..options(3_000, 5)
                };
                let s = simulate(&o, 1).unwrap();
                let mut last_lines: BTreeMap<&str, (usize, DateTime<Utc>)> = BTreeMap::new();
                for (i, r) in s.records.iter().enumerate() {
                    if let Generated::Settlement(l) = r {
                        let e = last_lines.entry(&l.batch_id).or_insert((i, l.event_time));
                        *e = (i, e.1.max(l.event_time));
                    }
                }
                let mut high = DateTime::<Utc>::MIN_UTC;
                let (mut last_other, mut first_late) = (0, None);
                for (i, r) in s.records.iter().enumerate() {
                    let Generated::Payout(p) = r else {
                        if let Some(t) = event_time(r) {
                            (high, last_other) = (high.max(t), i);
                        }
                        continue;
                    };
                    let case = format!("{rhythm:?}, late share {late_share}: {p:?}");
                    assert!(p.event_time <= high, "{case} ahead of {high}");
                    let Some((at, t)) =
                        p.batch_reference.as_deref().and_then(|b| last_lines.get(b))
                    else {
                        continue;
                    };
                    if p.event_time > *t + deadline {
                        first_late.get_or_insert(i);
                    } else if late_share == 0.0 {
                        assert!(*at < i, "{case} at {i} before its batch's line at {at}");
                    }
                }
                // Late payouts come after every payment and line, late lines included.
                let first_late = first_late.expect("a late payout");
                assert!(
                    first_late > last_other,
                    "{rhythm:?}, late share {late_share}"
                );
            }
        }
    }

    #[test]
    fn a_batch_that_nets_to_zero_owes_no_payout_and_is_matched() {
        let o = SimulationOptions::default();
        let t = start_of(&o);
        let eur = Currency::from_code("EUR").unwrap();
        let mut plan = PayoutPlan {
            o: &o,
            currencies: &[eur],
            rules: o.payout_rules(),
            stream_end: t + chrono::Duration::days(30),
            judged_by: t + chrono::Duration::days(20),
            issued: 0,
        };
        let batch = Batch {
            id: "batch-42-merchant-000-2026-01-02-EUR".into(),
            merchant: "merchant-000".into(),
            currency: eur,
            net: Decimal::ZERO,
            last_line: t,
            last_index: Some(0),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            assert!(plan.payouts(&mut rng, &batch).is_empty());
        }
        let line = |net: i64| SettlementLine {
            line_id: format!("l{net}"),
            batch_id: batch.id.clone(),
            payment_reference: format!("p{net}"),
            merchant_id: batch.merchant.clone(),
            gross: Decimal::new(net, 2),
            fee: Decimal::ZERO,
            net: Decimal::new(net, 2),
            currency: eur,
            settlement_date: t.date_naive(),
            event_time: t,
        };
        let (a, b) = (line(5_000), line(-5_000));
        let state = PayoutState::of([&a, &b], []);
        let key = PayoutKey::Batch(batch.id.clone());
        let v = payout::judge(&key, &state, t + chrono::Duration::days(20), &plan.rules);
        assert_eq!(v.status, PayoutStatus::Matched, "{}", v.reason);
    }

    #[test]
    fn without_the_payout_leg_the_other_streams_are_unchanged() {
        // Without malformed records, whose positions depend on the stream's length.
        let o = SimulationOptions {
            malformed: 0,
            ..options(2_000, 11)
        };
        let on = simulate(&o, 1).unwrap();
        let off = simulate(
            &SimulationOptions {
                payouts: false,
                ..o.clone()
            },
            1,
        )
        .unwrap();
        assert_eq!(payouts(&off).count(), 0);
        assert!(off.payout_statuses.is_empty() && off.totals.payout_statuses.is_empty());
        assert_eq!(
            (off.totals.statement_lines, off.totals.payouts.len()),
            (0, 0)
        );
        let others = |s: &Simulation| {
            (s.records.iter())
                .filter(|r| !matches!(r, Generated::Payout(_)))
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
        };
        let (a, b) = (others(&on), others(&off));
        let first = (a.iter().zip(&b)).position(|(x, y)| x != y);
        assert!(a.len() == b.len() && first.is_none(), "differ at {first:?}");
        assert_eq!(on.statuses, off.statuses);
        assert_eq!(
            on.totals.records - off.totals.records,
            payouts(&on).count() as i64
        );
    }

    #[test]
    fn expected_payout_totals_count_each_statement_line_once() {
        let s = simulate(&options(2_000, 12), 1).unwrap();
        let mut distinct: BTreeMap<&str, &BankPayout> = BTreeMap::new();
        for p in payouts(&s) {
            distinct.insert(&p.statement_line_id, p);
        }
        assert!(payouts(&s).count() > distinct.len(), "no duplicate payout");
        assert_eq!(s.totals.statement_lines, distinct.len() as i64);
        let mut totals: BTreeMap<String, PayoutTotal> = BTreeMap::new();
        for p in distinct.values() {
            let t = totals
                .entry(format!("{}/{}", p.account_id, p.currency))
                .or_default();
            t.count += 1;
            t.sum += p.amount;
        }
        assert_eq!(s.totals.payouts, totals);
        assert_eq!(s.totals.records, s.records.len() as i64);
    }

    #[test]
    fn the_payout_leg_is_on_by_default_and_takes_the_services_deadline() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            o: SimulationOptions,
        }
        assert!(SimulationOptions::default().payouts);
        assert!(
            !Wrapper::parse_from(["simulate", "--payouts", "false"])
                .o
                .payouts
        );
        let mut settings = crate::config::Settings::load(None).unwrap().reconciliation;
        settings.payout_deadline = Duration::from_secs(5 * 3600);
        let o = SimulationOptions::default().with_rules(&settings);
        assert_eq!(o.payout_rules().deadline, chrono::Duration::hours(5));
    }
}
