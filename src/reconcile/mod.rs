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
//!
//! ## The watermark: idle partitions, replayable ([`watermark`])
//! The group's watermark is the lowest, over the input partitions that *count*, of their
//! highest applied event time minus the topic's allowed lateness. A partition counts unless
//! it is **idle**, and it is idle only when both hold:
//! 1. it is **caught up**: its stored `next_offset` is at least its high watermark as last
//!    fetched from the broker (a partition without a stored row starts at the log's low
//!    watermark, so an empty partition is caught up). A high watermark older than a bound
//!    (three lag refreshes plus 5 s) counts as unknown, and unknown is never idle;
//! 2. nothing with an event time was ever applied on it (**empty**), or its last record's
//!    *broker timestamp* is more than the topic's `idle_timeout` behind the group's
//!    **stream time**, the highest broker timestamp applied on any input partition
//!    (**quiet**).
//!
//! Why these inputs. A partition that is merely behind (a backlog after an outage, an
//! instance that is down or frozen) has records below its high watermark, so it always
//! counts: no deadline passes because a partition was not read yet. Idleness is judged by
//! broker timestamps in the log and stored offsets, never by the wall clock (Flink's
//! `withIdleness` is judged by processing time, and its users see replays differ from live
//! runs; Kafka Streams' `max.task.idle.ms` waits by the wall clock too). At the end of a run
//! every partition is caught up in the service and in `payrecon replay` alike, and the
//! broker timestamps are the same records', so both reach the same final watermark; an
//! item's final status is a function of its records and the watermark it was judged at, so
//! the final statuses agree. If every partition is idle, none has an event time (the
//! partition that sets the stream time is never quiet), and the watermark stays at the
//! epoch.
//!
//! **The fetch race, and the cap that closes it.** A high watermark is fetched every lag
//! refresh, so a record can reach a caught-up partition after the fetch, while records on
//! other partitions (maybe produced after it) push their event times ahead. Hence, in the
//! service, an idle partition is not simply left out: it counts with the group's highest
//! event time *as read before its high watermark was fetched* (`LogEnd::seen_up_to`). That
//! record was produced after every record behind that time, so if it turns out to be late,
//! it is late by what was produced before it, as any late record; records applied since
//! cannot carry the watermark past it until the next fetch shows the partition as it is.
//! The price: the watermark follows the data one lag refresh late. A replay's log ends are
//! fixed (the ends of its ranges), so there is no race and no cap; at the end of a run the
//! cap is the highest event time, above every contribution, so it changes nothing there.
//!
//! **Late records and monotonicity.** A partition that becomes active again with older
//! event times lowers the group watermark; an item never goes back: it is evaluated at the
//! higher of the group watermark and the watermark it was last judged at (stored with the
//! item), so a judged deadline is never reopened by a lower watermark. No row shared by
//! all instances is needed for that.
//!
//! **Not done.** Deadlines in business days of the acquirer's settlement calendar ("T+2"):
//! deadlines are durations of event time; a settlements topic that is quiet over a weekend
//! is idle once the payments run `idle_timeout` of broker time past its last burst.

mod evaluate;
mod outcome;
pub mod payout;
mod rules;
pub mod state;
mod status;
mod targets;
mod terms;
pub mod watermark;

pub use evaluate::evaluate;
pub use outcome::{PayoutOutcome, ReconcileOutcome};
pub use payout::{PayoutKey, PayoutRules, PayoutState, PayoutStatus, PayoutVerdict};
pub use rules::{Priced, Rules};
pub use state::{Bucket, ItemState, ReferenceData, fold, judge, recompute};
pub use status::{Status, Transition, transition};
pub use targets::{Cause, DAILY_COLUMNS, DailyDeltas, DailyRow, Target, Targets};
pub use terms::{Amounts, Evaluation, MissingData, PricedEvent, Terms, Tolerance};
pub use watermark::{ClockRules, GroupWatermark, LogEnd, PartitionClock, TopicClock};
