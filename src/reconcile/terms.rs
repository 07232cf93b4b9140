//! The numbers a verdict is made of: the merchant's terms, priced events, amounts, what
//! reference data is missing, and the verdict ([`Evaluation`]); the rounding, fee and
//! difference rules shared by the running state ([`super::state`]) and [`super::evaluate`].

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

use super::Status;
use crate::domain::{Currency, PaymentEvent};

/// Basis points in one whole.
const BPS: Decimal = Decimal::from_parts(10_000, 0, 0, false, 0);

/// How far a settled amount may be from the expected one and still count as equal:
/// max(`absolute`, `relative` × |expected|), both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tolerance {
    /// Floor in settlement currency, so small payments are not flagged over a rounding cent.
    pub absolute: Decimal,
    /// Fraction of the expected amount (0.001 = 0.1 %), so large payments allow proportionally
    /// more.
    pub relative: Decimal,
}

/// A merchant's terms as of the payment's time, with the global defaults already filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    /// The currency the merchant is paid in: events are converted into it, lines must be in it.
    pub settlement_currency: Currency,
    /// Percentage fee per capture, in basis points of the converted amount (150 = 1.50 %).
    pub fee_bps: Decimal,
    /// Fixed fee per capture, in settlement currency.
    pub fee_fixed: Decimal,
    /// How far settled gross and fee may be from expected and still match.
    pub tolerance: Tolerance,
    /// How long after the last payment event's time its settlement may arrive.
    pub settlement_deadline: Duration,
    /// How long after a settlement line's time its payment event may arrive.
    pub payment_deadline: Duration,
}

/// A payment event with the rate that converts it into the settlement currency.
#[derive(Debug, Clone, Copy)]
pub struct PricedEvent<'a> {
    /// The event as stored.
    pub event: &'a PaymentEvent,
    /// 1 unit of the event's currency = `fx_rate` units of settlement currency, as of the
    /// event's own time; `None` when no rate is known for then. Ignored (rate 1) when the event
    /// is already in the settlement currency.
    pub fx_rate: Option<Decimal>,
}

/// Gross, fee and net in one currency: one side of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amounts {
    /// The currency of all three amounts.
    pub currency: Currency,
    /// Signed money movement: captures add, refunds and chargebacks subtract.
    pub gross: Decimal,
    /// What the acquirer keeps.
    pub fee: Decimal,
    /// What reaches the merchant: gross − fee.
    pub net: Decimal,
}

/// Which reference data is missing, so the caller knows what to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingData {
    /// No terms for the merchant as of the payment's time.
    Merchant { merchant_id: String },
    /// No rate converting `from` into `to` as of `at`, the event's time.
    FxRate {
        from: Currency,
        to: Currency,
        at: DateTime<Utc>,
    },
}

/// The verdict on one payment reference, with the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The verdict; compare it with the stored one through [`super::transition`].
    pub status: Status,
    /// What should have been settled; `None` when reference data is missing.
    pub expected: Option<Amounts>,
    /// The sums of the lines; `None` when there are no lines or they mix currencies.
    pub settled: Option<Amounts>,
    /// For MISSING_REFERENCE: the data to wait for before evaluating again.
    pub missing_reference: Option<MissingData>,
    /// For EXPECTED: once the watermark is past this instant the status changes even if no
    /// record arrives, so the caller evaluates again then.
    pub deadline: Option<DateTime<Utc>>,
    /// For people: the verdict with its numbers.
    pub reason: String,
}

/// Rounds to the currency's minor units, half away from zero (the acquirers' convention).
pub(super) fn round(amount: Decimal, currency: Currency) -> Decimal {
    amount.round_dp_with_strategy(
        currency.minor_units(),
        RoundingStrategy::MidpointAwayFromZero,
    )
}

/// A capture's fee on its converted, rounded `gross`. Rounding after adding the fixed fee
/// equals adding it after rounding whenever it is in whole minor units, and stays
/// representable if it is not.
pub(super) fn fee_of(
    gross: Decimal,
    fee_bps: Decimal,
    fee_fixed: Decimal,
    currency: Currency,
) -> Decimal {
    round(gross * fee_bps / BPS + fee_fixed, currency)
}

/// `Some(explanation)` when `settled` is further from `expected` than the tolerance allows.
pub(super) fn difference(
    what: &str,
    expected: Decimal,
    settled: Decimal,
    tolerance: Tolerance,
    currency: Currency,
) -> Option<String> {
    // Both sides are in whole minor units, so truncating the allowance to them changes no
    // verdict and prints it the way an operator would write it.
    let allowed = tolerance.absolute.max(tolerance.relative * expected.abs());
    let allowed = allowed.round_dp_with_strategy(currency.minor_units(), RoundingStrategy::ToZero);
    let diff = settled - expected;
    (diff.abs() > allowed).then(|| {
        let [settled, expected, diff, allowed] =
            [settled, expected, diff, allowed].map(|a| money(a, currency));
        format!(
            "{what}: settled {settled} {currency}, expected {expected} {currency}, \
             difference {diff} beyond tolerance {allowed}"
        )
    })
}

/// An amount with at least its currency's decimals, e.g. `0.00`.
fn money(amount: Decimal, currency: Currency) -> String {
    // Stored numerics carry trailing zeros (1.0000); show currency precision, or more digits
    // only when the amount really has them.
    let mut amount = amount.normalize();
    if amount.scale() < currency.minor_units() {
        amount.rescale(currency.minor_units());
    }
    amount.to_string()
}

impl Amounts {
    pub(super) fn zero(currency: Currency) -> Self {
        Amounts {
            currency,
            gross: Decimal::ZERO,
            fee: Decimal::ZERO,
            net: Decimal::ZERO,
        }
    }
}

impl fmt::Display for Amounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [gross, fee, net] = [self.gross, self.fee, self.net].map(|a| money(a, self.currency));
        write!(f, "gross {gross} fee {fee} net {net} {}", self.currency)
    }
}

impl fmt::Display for MissingData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MissingData::Merchant { merchant_id } => {
                write!(f, "no terms for merchant {merchant_id:?}")
            }
            MissingData::FxRate { from, to, at } => {
                write!(f, "no {from}->{to} rate as of {}", at.to_rfc3339())
            }
        }
    }
}
