//! The reconciliation matcher: what a payment reference should have settled (its payment
//! events, priced with reference data) against what it did settle (its settlement lines),
//! as a [`Status`] with the numbers behind it.
//!
//! This module owns the matching rules and nothing else. It must not do I/O: no database, no
//! Kafka, no clock, no async. The caller loads a reference's events, lines and reference data
//! (resolved as of each event's own time, global defaults filled in), calls [`evaluate`] inside
//! the batch transaction and records each [`transition`] as a history row. Time enters only as
//! an event-time watermark, so the same inputs give the same verdict, on replay too.
//!
//! ## Rules where the issue left room
//! - **Rounding**: each event is converted at its own rate and rounded to the settlement
//!   currency's minor units (half away from zero), *then* summed. The acquirer settles each
//!   event as its own line, so rounding the sum instead would drift from the sum of the lines
//!   by up to half a minor unit per event. A capture's fee is
//!   `round(converted gross × fee_bps / 10000) + fee_fixed` (the fixed fee in whole minor
//!   units); refunds and chargebacks carry none.
//! - **Deadlines**: a reference is *due* once the watermark is strictly after
//!   max(last event time + settlement deadline, last line time + payment deadline). A record
//!   timed exactly at the deadline is in time, and it can still arrive while the watermark
//!   equals the deadline. Every new record restarts the clock for the other side.
//! - **Differences wait for the deadline**: a reference that does not match yet (partially
//!   settled, a refund whose line has not come) stays EXPECTED until due, so an exception is a
//!   difference no record in time can fix any more. MATCHED, CURRENCY_MISMATCH and
//!   MISSING_REFERENCE are reported at once.
//! - **Tolerance**: gross and fee each count as equal when
//!   |settled − expected| ≤ max(absolute, relative × |expected|). Net is not judged on its
//!   own: on both sides it is gross − fee.
//! - **OVER_SETTLED**: settled gross exceeds expected gross beyond tolerance *and* there are
//!   more capture lines (gross > 0) than capture events: something was settled twice, such as
//!   the same capture again in a later batch. More money on as many lines is an
//!   AMOUNT_MISMATCH; one capture split over two lines that add up is MATCHED.
//! - **Precedence** (the first that applies wins): MISSING_REFERENCE (no number can be
//!   computed), CURRENCY_MISMATCH (the sums are meaningless), MATCHED, EXPECTED,
//!   MISSING_SETTLEMENT or UNEXPECTED_SETTLEMENT (one side is empty), OVER_SETTLED (explains
//!   the gross and fee differences it causes), AMOUNT_MISMATCH (usually drags the fee along),
//!   FEE_MISMATCH.

mod evaluate;
mod status;

pub use evaluate::{Amounts, Evaluation, MissingData, PricedEvent, Terms, Tolerance, evaluate};
pub use status::{Status, Transition, transition};
