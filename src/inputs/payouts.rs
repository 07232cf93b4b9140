//! Bank statement lines (`payments.payouts`, schema `schemas/bank_payout.avsc`): the money
//! that reached the merchant's account, matched against settlement batches by the payout
//! leg ([`crate::engine::payout`]).

use apache_avro::types::Value;
use chrono::NaiveDate;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use super::{Fields, Input, PROBE, Stored, amount, by_id, time};
use crate::codec::{AvroRecord, DecodeError, decimal_value};
use crate::domain::{BankPayout, InvalidRecord};
use crate::store::{Source, records};

/// The record a decoded value holds (not yet validated).
pub fn from_avro(r: &AvroRecord<'_>) -> Result<BankPayout, DecodeError> {
    if !r.has("statement_line_id") {
        return Err(r.wrong_type("BankPayout"));
    }
    let read = || -> Result<BankPayout, InvalidRecord> {
        Ok(BankPayout {
            statement_line_id: r.string("statement_line_id")?,
            account_id: r.string("account_id")?,
            value_date: r.date("value_date")?,
            amount: r.decimal("amount")?,
            currency: r.currency("currency")?,
            // As printed, less surrounding spaces (statements pad fixed-width fields); a
            // field of spaces only is no reference: the credit is still money to explain
            // (PAYOUT_UNEXPECTED), not a record to set aside.
            batch_reference: (r.optional_string("batch_reference")?)
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
            description: r.optional_string("description")?.unwrap_or_default(),
            event_time: r.timestamp("event_time")?,
        })
    };
    read().map_err(super::invalid)
}

/// The Avro value of a bank statement line in the shipped schema's field order.
pub fn to_avro(b: &BankPayout) -> Value {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid epoch");
    Value::Record(vec![
        (
            "statement_line_id".into(),
            Value::String(b.statement_line_id.clone()),
        ),
        ("account_id".into(), Value::String(b.account_id.clone())),
        (
            "value_date".into(),
            Value::Date((b.value_date - epoch).num_days() as i32),
        ),
        ("amount".into(), decimal_value(b.amount)),
        ("currency".into(), Value::String(b.currency.code().into())),
        (
            "batch_reference".into(),
            match &b.batch_reference {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
            },
        ),
        ("description".into(), Value::String(b.description.clone())),
        (
            "event_time".into(),
            Value::TimestampMillis(b.event_time.timestamp_millis()),
        ),
    ])
}

impl Input for BankPayout {
    const TYPE: &'static str = "bank_payout";

    fn id(&self) -> &str {
        &self.statement_line_id
    }

    fn fields(&self) -> Fields {
        vec![
            ("account_id", Some(self.account_id.clone())),
            ("value_date", Some(self.value_date.to_string())),
            ("amount", amount(self.amount)),
            ("currency", Some(self.currency.code().to_owned())),
            ("batch_reference", self.batch_reference.clone()),
            ("description", Some(self.description.clone())),
            ("event_time", time(self.event_time)),
        ]
    }

    fn twin(&self) -> Self {
        BankPayout {
            statement_line_id: PROBE.into(),
            account_id: PROBE.into(),
            value_date: self.value_date,
            amount: Decimal::ONE,
            currency: self.currency,
            batch_reference: self.batch_reference.as_ref().map(|_| PROBE.into()),
            description: String::new(),
            event_time: self.event_time,
        }
    }

    fn insert<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        topics: &'a [String],
        shard: &'a str,
        records: &'a [&'a (Self, Source)],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(records::insert_payouts(tx, topics, shard, records))
    }

    fn stored<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Stored, sqlx::Error>> {
        Box::pin(async move { Ok(by_id(records::payouts_by_id(tx, ids).await?)) })
    }
}
