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
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rust_decimal::Decimal;

use std::collections::BTreeMap;

use crate::codec::frame;
use crate::config::Settings;
use crate::domain::{
    BankPayout, Currency, PaymentEvent, PaymentEventKind, SettlementLine, Totals as ExpectedTotals,
};
use crate::inputs::Encoder;
use crate::inputs::payments::to_avro as payment_to_value;
use crate::kafka::producer::{FutureProducer, Sender};
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
    /// Write the settlement lines and bank payouts as files in this directory (settlement
    /// reports and bank statements, the formats in turn) and import them where they stand in
    /// the stream, instead of producing them to their topics; every file is then imported a
    /// second time, which must change nothing.
    #[arg(long)]
    pub files: Option<std::path::PathBuf>,
    /// With `--files`: `exact` writes only the formats that keep every field the predictions
    /// need (Stripe and Adyen reports, camt.053 and camt.054); `all` adds MT940 and BAI2,
    /// whose entries read back with their value date's midnight as event time.
    #[arg(long, value_enum, default_value = "exact")]
    pub file_formats: FileFormats,
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

/// The file formats a simulation written as files uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FileFormats {
    Exact,
    All,
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

pub mod files;
mod malformed;
mod payments;
mod payouts;
mod produce;
#[cfg(test)]
mod tests;

pub use malformed::malformed_records;
pub use payments::simulate;
use payouts::*;
pub use produce::{command, produce, produce_stamped};
