//! From a Kafka payload to a validated record: the wire format and Avro body
//! ([`crate::codec`]), the input's binding, then the limits every record must meet.

use std::time::Duration;

use chrono::{DateTime, Utc};
use schema_registry_converter::async_impl::schema_registry::SrSettings;

use crate::codec::{AvroRecord, Codec, DecodeError, PoisonKind, Stream};
use crate::domain::{Limits, Record};

/// Decodes Confluent-framed Avro records of every input into validated domain records.
pub struct Decoder {
    codec: Codec,
    /// Bounds checked after the business rules (configurable: `[validation]`).
    limits: Limits,
}

impl Decoder {
    pub fn new(settings: SrSettings) -> Self {
        Decoder {
            codec: Codec::new(settings),
            limits: Limits::default(),
        }
    }

    /// The same decoder checking records against `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Decodes and validates one record payload from `stream`; `broker_time` is the record's
    /// Kafka timestamp, against which its event time must be plausible.
    pub async fn decode(
        &self,
        stream: Stream,
        payload: Option<&[u8]>,
        broker_time: Option<DateTime<Utc>>,
    ) -> Result<Record, DecodeError> {
        let decoded = self.codec.decode_value(payload).await?;
        let r = AvroRecord::new(&decoded.value, &decoded.scales)?;
        let record = match stream {
            Stream::Payments => Record::Payment(super::payments::from_avro(&r)?),
            Stream::Settlements => Record::Settlement(super::settlements::from_avro(&r)?),
            Stream::Payouts => Record::Payout(super::payouts::from_avro(&r)?),
        };
        self.limits
            .check(&record, broker_time)
            .map_err(|e| DecodeError::poison(PoisonKind::of_invalid(&e), e.to_string()))?;
        Ok(record)
    }

    /// [`Decoder::decode`], retrying a transient (registry) failure for the same record with
    /// exponential backoff from `initial` up to `max`, each retry counted as a transient
    /// registry error; `None` once `shutdown` is cancelled. Poison is returned, never retried.
    pub async fn decode_retrying(
        &self,
        stream: Stream,
        payload: Option<&[u8]>,
        broker_time: Option<DateTime<Utc>>,
        (initial, max): (Duration, Duration),
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Option<Result<Record, DecodeError>> {
        let mut backoff = initial;
        loop {
            match self.decode(stream, payload, broker_time).await {
                Err(DecodeError::Transient(e)) => {
                    crate::metrics::transient_error("registry");
                    tracing::warn!(error = %e, retry_in = ?backoff, "schema registry unavailable; retrying the same record");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max);
                }
                other => return Some(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use apache_avro::Schema;
    use chrono::{DateTime, NaiveDate};

    use crate::codec::{AvroRecord, DecodeError, PoisonKind, decimal_scales, encode_datum};
    use crate::domain::{Currency, PaymentEvent, PaymentEventKind, SettlementLine};
    use crate::inputs::{payments, settlements};

    fn read(schema: &Schema, body: &[u8]) -> apache_avro::types::Value {
        apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .unwrap()
            .read_value(&mut &body[..])
            .unwrap()
    }

    #[test]
    fn payments_round_trip_through_the_shipped_schema() {
        let schema = Schema::parse_str(crate::codec::PAYMENT_EVENT_SCHEMA).unwrap();
        let p = PaymentEvent {
            event_id: "e-1".into(),
            payment_reference: "pay-1".into(),
            merchant_id: "m-1".into(),
            kind: PaymentEventKind::Refund,
            amount: "10.25".parse().unwrap(),
            currency: Currency::from_code("EUR").unwrap(),
            event_time: DateTime::from_timestamp_millis(1_700_000_000_123).unwrap(),
            psp_reference: Some("psp".into()),
        };
        let value = read(
            &schema,
            &encode_datum(&schema, payments::to_avro(&p)).unwrap(),
        );
        let scales = decimal_scales(&schema);
        let r = AvroRecord::new(&value, &scales).unwrap();
        assert_eq!(payments::from_avro(&r).unwrap(), p);
    }

    #[test]
    fn a_settlement_on_the_payments_topic_is_the_wrong_record_type() {
        let schema = Schema::parse_str(crate::codec::SETTLEMENT_LINE_SCHEMA).unwrap();
        let s = SettlementLine {
            line_id: "l".into(),
            batch_id: "b".into(),
            payment_reference: "p".into(),
            merchant_id: "m".into(),
            gross: "1".parse().unwrap(),
            fee: "0".parse().unwrap(),
            net: "1".parse().unwrap(),
            currency: Currency::from_code("USD").unwrap(),
            settlement_date: NaiveDate::from_ymd_opt(2026, 11, 26).unwrap(),
            event_time: DateTime::from_timestamp_millis(0).unwrap(),
        };
        let value = read(
            &schema,
            &encode_datum(&schema, settlements::to_avro(&s)).unwrap(),
        );
        let scales = decimal_scales(&schema);
        let r = AvroRecord::new(&value, &scales).unwrap();
        assert_eq!(settlements::from_avro(&r).unwrap(), s);
        match payments::from_avro(&r) {
            Err(DecodeError::Poison { kind, .. }) => assert_eq!(kind, PoisonKind::WrongRecordType),
            other => panic!("{other:?}"),
        }
    }
}
