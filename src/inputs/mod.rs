//! # Inputs
//!
//! One module per input stream: [`payments`] (payment events), [`settlements`] (PSP
//! settlement lines) and [`payouts`] (bank statement lines). Each owns, in one place:
//! - its **schema binding**: which Avro fields make its record (`from_avro`) and how the
//!   record is written (`to_avro`), against the schema shipped in `schemas/`;
//! - its **row shape**: the business fields two versions of a record are compared by
//!   ([`Input::fields`]), how its rows are inserted and read back (the SQL is in
//!   [`crate::store::records`]), and a harmless *twin* for the refusal isolation;
//! - **what it adds to reconciliation** ([`Input::contribute`]): the payment references it
//!   touches and the daily totals it moves (payouts feed the payout leg instead).
//!
//! The engine ([`crate::engine`]) iterates over the inputs through the [`Input`] trait: the
//! duplicate and conflict check, the refusal isolation and the reconciliation of what was
//! inserted are written once, for every input. Validation shared by every record (text,
//! lengths, amount range, event time against the broker time) is [`crate::domain::Limits`].
//!
//! ## How to add an input
//! 1. A schema in `schemas/` and a variant of [`crate::codec::Stream`] naming it.
//! 2. Its domain record in `crate::domain` and a variant of [`crate::domain::Record`].
//! 3. A module here: `from_avro`/`to_avro`, and `impl Input` (type name, id, fields, twin,
//!    insert, stored, contribute); its arm in [`Decoder::decode`] and in the engine's
//!    `Batch` (one vector of records per input).
//! 4. A migration for its table, and its insert/read functions in `crate::store::records`.
//! 5. Its topic in `[kafka]` (the consumer, replay reader and lag tracking iterate over the
//!    configured input topics and need no change), and, if it takes part in reconciliation,
//!    what it contributes.

mod decode;
mod encode;
pub mod payments;
pub mod payouts;
pub mod settlements;

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

pub use decode::Decoder;
pub use encode::Encoder;

use crate::reconcile::{DailyDeltas, Targets};
use crate::store::{LogPosition, Source};

/// A record's business fields as canonical strings (amounts normalized, times in UTC to the
/// microsecond PostgreSQL keeps), in a fixed order, so two versions compare field by field.
pub type Fields = Vec<(&'static str, Option<String>)>;

/// The fields as a JSON object (kept with a conflicting duplicate).
pub fn fields_json(fields: &Fields) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.clone().map_or(serde_json::Value::Null, Into::into),
                )
            })
            .collect(),
    )
}

/// An amount as a canonical field value.
pub fn amount(d: Decimal) -> Option<String> {
    Some(d.normalize().to_string())
}

/// A time as a canonical field value.
pub fn time(t: DateTime<Utc>) -> Option<String> {
    Some(t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// Stored versions of records by id: their fields and where in the log each came from.
pub type Stored = HashMap<String, (Fields, LogPosition)>;

/// What the engine needs of an input's record type.
pub trait Input: Sync + Sized {
    /// `conflicting_duplicates.record_type`.
    const TYPE: &'static str;
    /// The record's id: a second record with the same id is a re-delivery or a conflict.
    fn id(&self) -> &str;
    /// The business fields two versions are compared by.
    fn fields(&self) -> Fields;
    /// A record like this one in every respect the schema could refuse for reasons of its
    /// own (kind, currency, dates), with harmless ids and amounts: tried (and rolled back)
    /// when the database refuses this record, to tell a bad record from a bad database.
    fn twin(&self) -> Self;
    /// Inserts (insert-or-ignore) with the running totals of `shard`; returns the ids
    /// inserted. (Boxed: an `async fn` in a trait does not promise a `Send` future, which
    /// the consumer task needs.)
    fn insert<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        topics: &'a [String],
        shard: &'a str,
        records: &'a [&'a (Self, Source)],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>>;
    /// The stored versions of `ids`, with where in the log each came from.
    fn stored<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Stored, sqlx::Error>>;
    /// What an inserted record adds to the payment leg's reconciliation: the reference it
    /// touches and the daily totals it moves. None by default.
    fn contribute<'r>(&'r self, _targets: &mut Targets<'r>, _daily: &mut DailyDeltas) {}
}

/// Stored versions keyed by id, with their fields (the common tail of [`Input::stored`]).
fn by_id<R: Input>(rows: Vec<(R, LogPosition)>) -> Stored {
    (rows.into_iter())
        .map(|(r, position)| (r.id().to_owned(), (r.fields(), position)))
        .collect()
}

/// Poison for a field that does not read as its type says.
fn invalid(e: crate::domain::InvalidRecord) -> crate::codec::DecodeError {
    crate::codec::DecodeError::Poison {
        kind: crate::codec::PoisonKind::InvalidField,
        message: e.to_string(),
    }
}

/// Ids and references of a refused record's twin (rolled back, never committed).
pub const PROBE: &str = "payrecon-refusal-probe";
