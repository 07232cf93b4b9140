//! What one transaction evaluates, and the daily totals it moves: the references to judge,
//! why ([`Cause`]), the records inserted for each, and the per merchant/day/currency deltas.
//! Pure bookkeeping (no I/O): the engine fills these from the inputs and the sweeps, and the
//! store writes what they add up to.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use rust_decimal::Decimal;

use super::{Bucket, Status};
use crate::domain::{Currency, PaymentEvent, PaymentEventKind, SettlementLine};

/// Why a reference is evaluated; recorded with every status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Records of the reference were inserted (their ids are recorded).
    Records,
    /// The watermark passed the item's deadline.
    Deadline,
    /// Reference data changed while the item waited for it, or a correction changed the
    /// reference data it was judged with.
    ReferenceData,
}

impl Cause {
    pub fn as_str(&self) -> &'static str {
        match self {
            Cause::Records => "RECORDS",
            Cause::Deadline => "DEADLINE",
            Cause::ReferenceData => "REFERENCE_DATA",
        }
    }
}

/// The references to evaluate in one transaction, with why, and the records this
/// transaction inserted for each (folded into its state).
#[derive(Debug, Default)]
pub struct Targets<'r> {
    pub refs: BTreeMap<String, Target<'r>>,
}

#[derive(Debug)]
pub struct Target<'r> {
    pub cause: Cause,
    /// Ids of the records that caused it.
    pub caused_by: Vec<String>,
    pub events: Vec<&'r PaymentEvent>,
    pub lines: Vec<&'r SettlementLine>,
}

impl<'r> Targets<'r> {
    fn target(&mut self, reference: &str) -> &mut Target<'r> {
        let t = (self.refs.entry(reference.to_owned())).or_insert(Target {
            cause: Cause::Records,
            caused_by: Vec::new(),
            events: Vec::new(),
            lines: Vec::new(),
        });
        t.cause = Cause::Records;
        t
    }

    /// A payment event was inserted.
    pub fn event(&mut self, e: &'r PaymentEvent) {
        let t = self.target(&e.payment_reference);
        t.caused_by.push(e.event_id.clone());
        t.events.push(e);
    }

    /// A settlement line was inserted.
    pub fn line(&mut self, l: &'r SettlementLine) {
        let t = self.target(&l.payment_reference);
        t.caused_by.push(l.line_id.clone());
        t.lines.push(l);
    }

    /// `reference` is evaluated for `cause` unless records already cause it.
    pub fn other(&mut self, reference: String, cause: Cause) {
        self.refs.entry(reference).or_insert(Target {
            cause,
            caused_by: Vec::new(),
            events: Vec::new(),
            lines: Vec::new(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }
}

/// One row of daily increments: (merchant, business date, currency) and the
/// [`DAILY_COLUMNS`] increments.
pub type DailyRow = ((String, NaiveDate, &'static str), [Decimal; 13]);

/// Per merchant/day/currency increments, applied in one statement in key order at the end of
/// the transaction (the rows are hot: holding their locks briefly and in one order keeps
/// concurrent instances from waiting long or deadlocking).
#[derive(Debug, Default)]
pub struct DailyDeltas {
    rows: BTreeMap<(String, NaiveDate, &'static str), [Decimal; 13]>,
}

/// The counted columns of `merchant_daily_totals`, in [`DailyDeltas`] row order: the first
/// ten sum events and lines, the last three count items by status.
pub const DAILY_COLUMNS: [&str; 13] = [
    "captured_count",
    "captured",
    "refunded_count",
    "refunded",
    "charged_back_count",
    "charged_back",
    "settled_count",
    "settled_gross",
    "settled_fees",
    "settled_net",
    "matched_count",
    "expected_count",
    "exception_count",
];

impl DailyDeltas {
    fn row(&mut self, merchant: &str, date: NaiveDate, currency: Currency) -> &mut [Decimal; 13] {
        self.rows
            .entry((merchant.to_owned(), date, currency.code()))
            .or_insert([Decimal::ZERO; 13])
    }

    /// A payment event was inserted.
    pub fn payment(&mut self, e: &PaymentEvent) {
        let row = self.row(&e.merchant_id, e.event_time.date_naive(), e.currency);
        let i = match e.kind {
            PaymentEventKind::Capture => 0,
            PaymentEventKind::Refund => 2,
            PaymentEventKind::Chargeback => 4,
        };
        row[i] += Decimal::ONE;
        row[i + 1] += e.amount;
    }

    /// A settlement line was inserted.
    pub fn settlement(&mut self, l: &SettlementLine) {
        let row = self.row(&l.merchant_id, l.settlement_date, l.currency);
        row[6] += Decimal::ONE;
        row[7] += l.gross;
        row[8] += l.fee;
        row[9] += l.net;
    }

    /// An item enters (`sign` 1) or leaves (−1) a bucket with `status`.
    pub fn item(&mut self, bucket: &Bucket, status: Status, sign: i64) {
        let row = self.row(&bucket.merchant_id, bucket.date, bucket.currency);
        let i = match status {
            Status::Matched => 10,
            Status::Expected => 11,
            _ => 12,
        };
        row[i] += Decimal::from(sign);
    }

    /// The rows with a non-zero change, in key order: (merchant, business date, currency)
    /// and the [`DAILY_COLUMNS`] increments.
    pub fn into_rows(self) -> Vec<DailyRow> {
        (self.rows.into_iter())
            .filter(|(_, v)| v.iter().any(|d| !d.is_zero()))
            .collect()
    }
}
