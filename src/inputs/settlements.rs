//! PSP settlement lines (`payments.settlements`, schema `schemas/settlement_line.avsc`): what
//! the acquirer settled for each payment, in settlement batches (the payout leg's unit).

use apache_avro::types::Value;
use chrono::NaiveDate;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use super::{Fields, Input, PROBE, Stored, amount, by_id, time};
use crate::codec::{AvroRecord, DecodeError, decimal_value};
use crate::domain::{InvalidRecord, SettlementLine};
use crate::reconcile::{DailyDeltas, Targets};
use crate::store::{Source, records};

/// The record a decoded value holds (not yet validated).
pub fn from_avro(r: &AvroRecord<'_>) -> Result<SettlementLine, DecodeError> {
    if !r.has("line_id") {
        return Err(r.wrong_type("SettlementLine"));
    }
    let read = || -> Result<SettlementLine, InvalidRecord> {
        Ok(SettlementLine {
            line_id: r.string("line_id")?,
            batch_id: r.string("batch_id")?,
            payment_reference: r.string("payment_reference")?,
            merchant_id: r.string("merchant_id")?,
            gross: r.decimal("gross")?,
            fee: r.decimal("fee")?,
            net: r.decimal("net")?,
            currency: r.currency("currency")?,
            settlement_date: r.date("settlement_date")?,
            event_time: r.timestamp("event_time")?,
        })
    };
    read().map_err(super::invalid)
}

/// The Avro value of a settlement line in the shipped schema's field order.
pub fn to_avro(s: &SettlementLine) -> Value {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid epoch");
    Value::Record(vec![
        ("line_id".into(), Value::String(s.line_id.clone())),
        ("batch_id".into(), Value::String(s.batch_id.clone())),
        (
            "payment_reference".into(),
            Value::String(s.payment_reference.clone()),
        ),
        ("merchant_id".into(), Value::String(s.merchant_id.clone())),
        ("gross".into(), decimal_value(s.gross)),
        ("fee".into(), decimal_value(s.fee)),
        ("net".into(), decimal_value(s.net)),
        ("currency".into(), Value::String(s.currency.code().into())),
        (
            "settlement_date".into(),
            Value::Date((s.settlement_date - epoch).num_days() as i32),
        ),
        (
            "event_time".into(),
            Value::TimestampMillis(s.event_time.timestamp_millis()),
        ),
    ])
}

impl Input for SettlementLine {
    const TYPE: &'static str = "settlement_line";

    fn id(&self) -> &str {
        &self.line_id
    }

    fn fields(&self) -> Fields {
        vec![
            ("batch_id", Some(self.batch_id.clone())),
            ("payment_reference", Some(self.payment_reference.clone())),
            ("merchant_id", Some(self.merchant_id.clone())),
            ("gross", amount(self.gross)),
            ("fee", amount(self.fee)),
            ("net", amount(self.net)),
            ("currency", Some(self.currency.code().to_owned())),
            ("settlement_date", Some(self.settlement_date.to_string())),
            ("event_time", time(self.event_time)),
        ]
    }

    fn twin(&self) -> Self {
        SettlementLine {
            line_id: PROBE.into(),
            batch_id: PROBE.into(),
            payment_reference: PROBE.into(),
            merchant_id: PROBE.into(),
            gross: Decimal::ONE,
            fee: Decimal::ZERO,
            net: Decimal::ONE,
            currency: self.currency,
            settlement_date: self.settlement_date,
            event_time: self.event_time,
        }
    }

    fn insert<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        topics: &'a [String],
        shard: &'a str,
        records: &'a [&'a (Self, Source)],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(records::insert_settlements(tx, topics, shard, records))
    }

    fn stored<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Stored, sqlx::Error>> {
        Box::pin(async move { Ok(by_id(records::lines_by_id(tx, ids).await?)) })
    }

    fn contribute<'r>(&'r self, targets: &mut Targets<'r>, daily: &mut DailyDeltas) {
        targets.line(self);
        daily.settlement(self);
    }
}
