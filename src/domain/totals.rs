//! Totals per merchant and currency: what the simulator expects and what the store holds,
//! in one comparable shape.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Count and sum of one (merchant, currency, kind) of payment events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentTotal {
    pub count: i64,
    pub sum: Decimal,
}

/// Count and sums of one (merchant, currency) of settlement lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementTotal {
    pub count: i64,
    pub gross: Decimal,
    pub fee: Decimal,
    pub net: Decimal,
}

/// Count and signed sum (credits less debits) of one (account, currency) of bank statement
/// lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutTotal {
    pub count: i64,
    pub sum: Decimal,
}

/// The outcome of consuming a stream, in comparable form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Keyed `merchant/currency/KIND`.
    pub payments: BTreeMap<String, PaymentTotal>,
    /// Keyed `merchant/currency`.
    pub settlements: BTreeMap<String, SettlementTotal>,
    /// Distinct payment events / settlement lines (a duplicate counts once).
    pub payment_events: i64,
    pub settlement_lines: i64,
    /// Records that must be (or are) in `dead_letters`.
    pub dead_letters: i64,
    /// Log records in all: produced (simulator) or applied through the offsets (store).
    pub records: i64,
    /// Reconciliation items by status (`MATCHED`, `AMOUNT_MISMATCH`, ...).
    #[serde(default)]
    pub statuses: BTreeMap<String, i64>,
    /// Bank statement lines keyed `account/currency`, and how many distinct ones (the
    /// payout leg; `serde(default)`: expected totals written before it read as none).
    #[serde(default)]
    pub payouts: BTreeMap<String, PayoutTotal>,
    #[serde(default)]
    pub statement_lines: i64,
    /// Payout items by status (`PAYOUT_MATCHED`, `PAYOUT_MISSING`, ...).
    #[serde(default)]
    pub payout_statuses: BTreeMap<String, i64>,
}

impl Totals {
    /// Human-readable differences between `self` (expected) and `actual`; empty when equal.
    pub fn differences(&self, actual: &Totals) -> Vec<String> {
        let mut out = Vec::new();
        let mut scalar = |name: &str, e: i64, a: i64| {
            if e != a {
                out.push(format!("{name}: expected {e}, found {a}"));
            }
        };
        scalar("payment events", self.payment_events, actual.payment_events);
        scalar(
            "settlement lines",
            self.settlement_lines,
            actual.settlement_lines,
        );
        scalar(
            "statement lines",
            self.statement_lines,
            actual.statement_lines,
        );
        scalar("dead letters", self.dead_letters, actual.dead_letters);
        scalar("records applied", self.records, actual.records);
        diff_maps("payments", &self.payments, &actual.payments, &mut out);
        diff_maps(
            "settlements",
            &self.settlements,
            &actual.settlements,
            &mut out,
        );
        diff_maps("statuses", &self.statuses, &actual.statuses, &mut out);
        diff_maps("payouts", &self.payouts, &actual.payouts, &mut out);
        diff_maps(
            "payout statuses",
            &self.payout_statuses,
            &actual.payout_statuses,
            &mut out,
        );
        out
    }
}

fn diff_maps<V: PartialEq + Default + std::fmt::Debug>(
    what: &str,
    expected: &BTreeMap<String, V>,
    actual: &BTreeMap<String, V>,
    out: &mut Vec<String>,
) {
    let zero = V::default();
    for key in expected
        .keys()
        .chain(actual.keys().filter(|k| !expected.contains_key(*k)))
    {
        let (e, a) = (
            expected.get(key).unwrap_or(&zero),
            actual.get(key).unwrap_or(&zero),
        );
        if e != a {
            out.push(format!("{what} {key}: expected {e:?}, found {a:?}"));
        }
    }
}
