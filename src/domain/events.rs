//! Payment events and settlement lines, and the validation that makes a record applicable.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use super::Currency;

/// Largest absolute amount accepted (a guard against corrupted or malicious input, far above
/// any real single payment; the database column holds 16 integer digits).
const MAX_ABS_AMOUNT: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

/// What a payment event does to the money owed to the merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PaymentEventKind {
    /// Money taken from the payer; owed to the merchant.
    Capture,
    /// Money returned to the payer at the merchant's request.
    Refund,
    /// Money pulled back by the payer's bank.
    Chargeback,
}

impl PaymentEventKind {
    /// The symbol used in Avro, PostgreSQL and reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            PaymentEventKind::Capture => "CAPTURE",
            PaymentEventKind::Refund => "REFUND",
            PaymentEventKind::Chargeback => "CHARGEBACK",
        }
    }

    /// Parses the Avro/PostgreSQL symbol.
    pub fn parse(symbol: &str) -> Option<Self> {
        match symbol {
            "CAPTURE" => Some(PaymentEventKind::Capture),
            "REFUND" => Some(PaymentEventKind::Refund),
            "CHARGEBACK" => Some(PaymentEventKind::Chargeback),
            _ => None,
        }
    }
}

/// One money movement on a payment, as published on `payments.transactions`.
#[derive(Debug, Clone, PartialEq)]
pub struct PaymentEvent {
    /// Idempotency key: a re-delivered event with the same id changes nothing.
    pub event_id: String,
    /// Joins the event to its settlement lines.
    pub payment_reference: String,
    pub merchant_id: String,
    pub kind: PaymentEventKind,
    /// Positive, at most `currency.minor_units()` decimals.
    pub amount: Decimal,
    pub currency: Currency,
    /// Event time: deadlines and reference data are judged by it, never by the wall clock.
    pub event_time: DateTime<Utc>,
    pub psp_reference: Option<String>,
}

/// One line of a settlement report, as published on `payments.settlements`.
#[derive(Debug, Clone, PartialEq)]
pub struct SettlementLine {
    /// Idempotency key: a re-delivered line with the same id changes nothing.
    pub line_id: String,
    pub batch_id: String,
    pub payment_reference: String,
    pub merchant_id: String,
    /// Signed: negative when a refund or chargeback is settled back.
    pub gross: Decimal,
    pub fee: Decimal,
    /// Always `gross - fee`.
    pub net: Decimal,
    pub currency: Currency,
    pub settlement_date: NaiveDate,
    pub event_time: DateTime<Utc>,
}

/// One line of the merchant's bank statement, as published on `payments.payouts`: the money
/// an acquirer paid out for a settlement batch (or took back).
#[derive(Debug, Clone, PartialEq)]
pub struct BankPayout {
    /// Idempotency key: a re-delivered statement line with the same id changes nothing.
    pub statement_line_id: String,
    pub account_id: String,
    pub value_date: NaiveDate,
    /// Signed: positive for a credit, negative for a debit.
    pub amount: Decimal,
    pub currency: Currency,
    /// The settlement batch id as printed on the statement (surrounding spaces trimmed by
    /// the codec); `None` when the statement carries none.
    pub batch_reference: Option<String>,
    /// Free text, for people; never matched on.
    pub description: String,
    pub event_time: DateTime<Utc>,
}

/// A decoded, validated input record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Payment(PaymentEvent),
    Settlement(SettlementLine),
    Payout(BankPayout),
}

/// Why a structurally decodable record can never be applied. The field is named so an
/// operator reading `dead_letters.error_message` knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("field `{field}` is missing or has the wrong type ({detail})")]
    MissingField { field: &'static str, detail: String },
    #[error("field `{field}` must not be empty")]
    Empty { field: &'static str },
    #[error("field `{field}`: {source}")]
    Currency {
        field: &'static str,
        #[source]
        source: super::UnknownCurrency,
    },
    #[error("field `{field}`: amount {amount} is malformed: {reason}")]
    Amount {
        field: &'static str,
        amount: String,
        reason: String,
    },
    #[error("field `{field}`: {detail}")]
    Value { field: &'static str, detail: String },
    /// Characters PostgreSQL text cannot hold (NUL) or an id must not contain (controls).
    #[error("field `{field}`: {detail}")]
    Text { field: &'static str, detail: String },
    /// An id or reference longer than [`super::Limits::max_id_bytes`].
    #[error("field `{field}` is {bytes} bytes long, more than the {max} allowed")]
    TooLong {
        field: &'static str,
        bytes: usize,
        max: usize,
    },
    /// An amount beyond what the columns hold (or any real payment needs).
    #[error("field `{field}`: amount {amount} is out of range: {reason}")]
    AmountRange {
        field: &'static str,
        amount: String,
        reason: String,
    },
    /// An event time or date outside the storable range or implausible against the broker
    /// timestamp.
    #[error("field `{field}`: {detail}")]
    EventTime { field: &'static str, detail: String },
    /// A business date (settlement date, value date) too far from the record's event time
    /// (`validation.max_business_date_ahead` / `_behind`).
    #[error("field `{field}`: {detail}")]
    BusinessDate { field: &'static str, detail: String },
}

impl InvalidRecord {
    /// The class of the refusal: the codec maps each to its own dead-letter reason.
    pub fn class(&self) -> &'static str {
        match self {
            InvalidRecord::MissingField { .. }
            | InvalidRecord::Empty { .. }
            | InvalidRecord::Currency { .. }
            | InvalidRecord::Amount { .. }
            | InvalidRecord::Value { .. } => "field",
            InvalidRecord::Text { .. } => "text",
            InvalidRecord::TooLong { .. } => "too_long",
            InvalidRecord::AmountRange { .. } => "amount_range",
            InvalidRecord::EventTime { .. } => "event_time",
            InvalidRecord::BusinessDate { .. } => "business_date",
        }
    }
}

/// Checks that `amount` is representable in `currency` and within bounds; `positive` demands
/// a strictly positive amount (payment events), otherwise any sign is allowed (settlement
/// lines carry negative lines for refunds).
pub fn check_amount(
    field: &'static str,
    amount: Decimal,
    currency: Currency,
    positive: bool,
) -> Result<(), InvalidRecord> {
    let bad = |reason: String| InvalidRecord::Amount {
        field,
        amount: amount.to_string(),
        reason,
    };
    if positive && amount <= Decimal::ZERO {
        return Err(bad("must be greater than zero".into()));
    }
    if amount.abs() > MAX_ABS_AMOUNT {
        return Err(InvalidRecord::AmountRange {
            field,
            amount: amount.to_string(),
            reason: format!("exceeds the maximum of {MAX_ABS_AMOUNT}"),
        });
    }
    if amount.normalize().scale() > currency.minor_units() {
        return Err(bad(format!(
            "has more than {} decimals, which {} does not allow",
            currency.minor_units(),
            currency
        )));
    }
    Ok(())
}

fn non_empty(field: &'static str, value: &str) -> Result<(), InvalidRecord> {
    if value.trim().is_empty() {
        Err(InvalidRecord::Empty { field })
    } else {
        Ok(())
    }
}

impl PaymentEvent {
    /// Applies every rule a payment event must satisfy before it is stored.
    pub fn validate(&self) -> Result<(), InvalidRecord> {
        non_empty("event_id", &self.event_id)?;
        non_empty("payment_reference", &self.payment_reference)?;
        non_empty("merchant_id", &self.merchant_id)?;
        check_amount("amount", self.amount, self.currency, true)
    }

    /// The effect on what the merchant is owed: captures add, refunds and chargebacks subtract.
    pub fn signed_amount(&self) -> Decimal {
        match self.kind {
            PaymentEventKind::Capture => self.amount,
            PaymentEventKind::Refund | PaymentEventKind::Chargeback => -self.amount,
        }
    }
}

impl SettlementLine {
    /// Applies every rule a settlement line must satisfy before it is stored.
    pub fn validate(&self) -> Result<(), InvalidRecord> {
        non_empty("line_id", &self.line_id)?;
        non_empty("batch_id", &self.batch_id)?;
        non_empty("payment_reference", &self.payment_reference)?;
        non_empty("merchant_id", &self.merchant_id)?;
        check_amount("gross", self.gross, self.currency, false)?;
        check_amount("fee", self.fee, self.currency, false)?;
        check_amount("net", self.net, self.currency, false)?;
        if self.gross - self.fee != self.net {
            return Err(InvalidRecord::Value {
                field: "net",
                detail: format!(
                    "net {} is not gross {} minus fee {}",
                    self.net, self.gross, self.fee
                ),
            });
        }
        Ok(())
    }
}

impl BankPayout {
    /// Applies every rule a statement line must satisfy before it is stored.
    pub fn validate(&self) -> Result<(), InvalidRecord> {
        non_empty("statement_line_id", &self.statement_line_id)?;
        non_empty("account_id", &self.account_id)?;
        if let Some(reference) = &self.batch_reference {
            non_empty("batch_reference", reference)?;
        }
        check_amount("amount", self.amount, self.currency, false)?;
        if self.amount.is_zero() {
            return Err(InvalidRecord::Value {
                field: "amount",
                detail: "a statement line moves money: zero is not a payout".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros_free::dec;

    /// Tiny stand-in for `rust_decimal_macros::dec!` so the tests need no extra crate.
    mod rust_decimal_macros_free {
        macro_rules! dec {
            ($s:expr) => {
                $s.parse::<rust_decimal::Decimal>().unwrap()
            };
        }
        pub(crate) use dec;
    }

    fn eur() -> Currency {
        Currency::from_code("EUR").unwrap()
    }

    fn payment(amount: Decimal) -> PaymentEvent {
        PaymentEvent {
            event_id: "e1".into(),
            payment_reference: "p1".into(),
            merchant_id: "m1".into(),
            kind: PaymentEventKind::Capture,
            amount,
            currency: eur(),
            event_time: DateTime::from_timestamp_millis(0).unwrap(),
            psp_reference: None,
        }
    }

    #[test]
    fn amounts_follow_the_currency_precision() {
        let cases = [
            ("12.34", true),
            ("12.3400", true),
            ("12.345", false),
            ("0", false),
            ("-1.00", false),
            ("1000000001", false),
        ];
        for (amount, ok) in cases {
            assert_eq!(
                payment(amount.parse().unwrap()).validate().is_ok(),
                ok,
                "{amount}"
            );
        }
        let jpy = Currency::from_code("JPY").unwrap();
        assert!(check_amount("amount", dec!("100"), jpy, true).is_ok());
        assert!(check_amount("amount", dec!("100.5"), jpy, true).is_err());
    }

    #[test]
    fn a_settlement_line_must_net_out() {
        let mut line = SettlementLine {
            line_id: "l1".into(),
            batch_id: "b1".into(),
            payment_reference: "p1".into(),
            merchant_id: "m1".into(),
            gross: dec!("100.00"),
            fee: dec!("1.50"),
            net: dec!("98.50"),
            currency: eur(),
            settlement_date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            event_time: DateTime::from_timestamp_millis(0).unwrap(),
        };
        assert!(line.validate().is_ok());
        line.net = dec!("98.49");
        let err = line.validate().unwrap_err().to_string();
        assert!(err.contains("net"), "{err}");
    }

    #[test]
    fn empty_ids_are_named_in_the_error() {
        let mut p = payment(dec!("1.00"));
        p.merchant_id = " ".into();
        assert_eq!(
            p.validate().unwrap_err(),
            InvalidRecord::Empty {
                field: "merchant_id"
            }
        );
    }
}
