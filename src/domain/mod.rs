//! Pure domain types: money, currencies, payment events and settlement lines.
//!
//! This module owns the *meaning* of a record and the rules a record must satisfy to be
//! applied. It does no I/O, knows nothing of Kafka, Avro or PostgreSQL, and never uses floats
//! for money: amounts are `rust_decimal::Decimal` and always travel with their [`Currency`].

mod currency;
mod events;
mod limits;
mod totals;

pub use currency::{Currency, UnknownCurrency};
pub use events::{
    BankPayout, InvalidRecord, PaymentEvent, PaymentEventKind, Record, SettlementLine, check_amount,
};
pub use limits::Limits;
pub use totals::{PaymentTotal, PayoutTotal, SettlementTotal, Totals};
