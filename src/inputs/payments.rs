//! Payment events (`payments.transactions`, schema `schemas/payment_event.avsc`): captures,
//! refunds and chargebacks, the side of reconciliation that says what should settle.

use apache_avro::types::Value;
use futures::future::BoxFuture;
use rust_decimal::Decimal;
use sqlx::{Postgres, Transaction};

use super::{Fields, Input, PROBE, Stored, amount, by_id, time};
use crate::codec::{AvroRecord, DecodeError, decimal_value};
use crate::domain::{InvalidRecord, PaymentEvent};
use crate::reconcile::{DailyDeltas, Targets};
use crate::store::{Source, records};

/// The record a decoded value holds (not yet validated).
pub fn from_avro(r: &AvroRecord<'_>) -> Result<PaymentEvent, DecodeError> {
    if !r.has("event_id") {
        return Err(r.wrong_type("PaymentEvent"));
    }
    let read = || -> Result<PaymentEvent, InvalidRecord> {
        Ok(PaymentEvent {
            event_id: r.string("event_id")?,
            payment_reference: r.string("payment_reference")?,
            merchant_id: r.string("merchant_id")?,
            kind: r.kind("kind")?,
            amount: r.decimal("amount")?,
            currency: r.currency("currency")?,
            event_time: r.timestamp("event_time")?,
            psp_reference: r.optional_string("psp_reference")?,
        })
    };
    read().map_err(super::invalid)
}

/// The Avro value of a payment event in the shipped schema's field order.
pub fn to_avro(p: &PaymentEvent) -> Value {
    Value::Record(vec![
        ("event_id".into(), Value::String(p.event_id.clone())),
        (
            "payment_reference".into(),
            Value::String(p.payment_reference.clone()),
        ),
        ("merchant_id".into(), Value::String(p.merchant_id.clone())),
        (
            "kind".into(),
            Value::Enum(p.kind as u32, p.kind.as_str().into()),
        ),
        ("amount".into(), decimal_value(p.amount)),
        ("currency".into(), Value::String(p.currency.code().into())),
        (
            "event_time".into(),
            Value::TimestampMillis(p.event_time.timestamp_millis()),
        ),
        (
            "psp_reference".into(),
            match &p.psp_reference {
                None => Value::Union(0, Box::new(Value::Null)),
                Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
            },
        ),
    ])
}

impl Input for PaymentEvent {
    const TYPE: &'static str = "payment_event";

    fn id(&self) -> &str {
        &self.event_id
    }

    fn fields(&self) -> Fields {
        vec![
            ("payment_reference", Some(self.payment_reference.clone())),
            ("merchant_id", Some(self.merchant_id.clone())),
            ("kind", Some(self.kind.as_str().to_owned())),
            ("amount", amount(self.amount)),
            ("currency", Some(self.currency.code().to_owned())),
            ("event_time", time(self.event_time)),
            ("psp_reference", self.psp_reference.clone()),
        ]
    }

    fn twin(&self) -> Self {
        PaymentEvent {
            event_id: PROBE.into(),
            payment_reference: PROBE.into(),
            merchant_id: PROBE.into(),
            kind: self.kind,
            amount: Decimal::ONE,
            currency: self.currency,
            event_time: self.event_time,
            psp_reference: self.psp_reference.as_ref().map(|_| PROBE.into()),
        }
    }

    fn insert<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        topics: &'a [String],
        shard: &'a str,
        records: &'a [&'a (Self, Source)],
    ) -> BoxFuture<'a, Result<Vec<String>, sqlx::Error>> {
        Box::pin(records::insert_payments(tx, topics, shard, records))
    }

    fn stored<'a>(
        tx: &'a mut Transaction<'_, Postgres>,
        ids: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Stored, sqlx::Error>> {
        Box::pin(async move { Ok(by_id(records::payments_by_id(tx, ids).await?)) })
    }

    fn contribute<'r>(&'r self, targets: &mut Targets<'r>, daily: &mut DailyDeltas) {
        targets.event(self);
        daily.payment(self);
    }
}
