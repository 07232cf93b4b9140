//! Conversion between Avro values and domain records.
//!
//! Fields are looked up by name, so a writer schema with extra fields (newer producer) or
//! without an optional field (older producer) still converts.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::types::Value;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use super::{DecodeError, PoisonKind, Stream};
use crate::domain::{
    BankPayout, Currency, InvalidRecord, PaymentEvent, PaymentEventKind, Record, SettlementLine,
};

/// Scale used when *writing* decimals; matches `precision 18, scale 4` in `schemas/`.
const WRITE_SCALE: u32 = 4;

/// Encodes `value` as an Avro datum (no container, no header) with `schema`.
pub fn encode_datum(schema: &Schema, value: Value) -> apache_avro::AvroResult<Vec<u8>> {
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()?
        .write_value_to_vec(value)
}

/// Collects the scale of every top-level decimal field of a record schema.
pub fn decimal_scales(schema: &Schema) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    if let Schema::Record(record) = schema {
        for field in &record.fields {
            if let Schema::Decimal(d) = &field.schema {
                out.insert(field.name.clone(), d.scale as u32);
            }
        }
    }
    out
}

/// Converts a decoded Avro value from `stream` into a domain record (not yet validated).
pub(super) fn to_record(
    stream: Stream,
    value: &Value,
    scales: &HashMap<String, u32>,
) -> Result<Record, DecodeError> {
    let Value::Record(fields) = value else {
        return Err(DecodeError::Poison {
            kind: PoisonKind::WrongRecordType,
            message: "top-level value is not an Avro record".into(),
        });
    };
    let r = Fields { fields, scales };
    let has = |name: &str| fields.iter().any(|(n, _)| n == name);
    let invalid = |e: InvalidRecord| DecodeError::Poison {
        kind: PoisonKind::InvalidField,
        message: e.to_string(),
    };
    match stream {
        Stream::Payments if has("event_id") => Ok(Record::Payment(PaymentEvent {
            event_id: r.string("event_id").map_err(invalid)?,
            payment_reference: r.string("payment_reference").map_err(invalid)?,
            merchant_id: r.string("merchant_id").map_err(invalid)?,
            kind: r.kind("kind").map_err(invalid)?,
            amount: r.decimal("amount").map_err(invalid)?,
            currency: r.currency("currency").map_err(invalid)?,
            event_time: r.timestamp("event_time").map_err(invalid)?,
            psp_reference: r.optional_string("psp_reference").map_err(invalid)?,
        })),
        Stream::Settlements if has("line_id") => Ok(Record::Settlement(SettlementLine {
            line_id: r.string("line_id").map_err(invalid)?,
            batch_id: r.string("batch_id").map_err(invalid)?,
            payment_reference: r.string("payment_reference").map_err(invalid)?,
            merchant_id: r.string("merchant_id").map_err(invalid)?,
            gross: r.decimal("gross").map_err(invalid)?,
            fee: r.decimal("fee").map_err(invalid)?,
            net: r.decimal("net").map_err(invalid)?,
            currency: r.currency("currency").map_err(invalid)?,
            settlement_date: r.date("settlement_date").map_err(invalid)?,
            event_time: r.timestamp("event_time").map_err(invalid)?,
        })),
        Stream::Payouts if has("statement_line_id") => Ok(Record::Payout(BankPayout {
            statement_line_id: r.string("statement_line_id").map_err(invalid)?,
            account_id: r.string("account_id").map_err(invalid)?,
            value_date: r.date("value_date").map_err(invalid)?,
            amount: r.decimal("amount").map_err(invalid)?,
            currency: r.currency("currency").map_err(invalid)?,
            // As printed, less surrounding spaces (statements pad fixed-width fields); a
            // field of spaces only is no reference: the credit is still money to explain
            // (PAYOUT_UNEXPECTED), not a record to set aside.
            batch_reference: (r.optional_string("batch_reference").map_err(invalid)?)
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
            description: r
                .optional_string("description")
                .map_err(invalid)?
                .unwrap_or_default(),
            event_time: r.timestamp("event_time").map_err(invalid)?,
        })),
        _ => Err(DecodeError::Poison {
            kind: PoisonKind::WrongRecordType,
            message: format!(
                "record with fields [{}] is not a {} record",
                fields
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                stream.record_name()
            ),
        }),
    }
}

/// Named access to a record's fields with errors that name the field.
struct Fields<'a> {
    fields: &'a [(String, Value)],
    scales: &'a HashMap<String, u32>,
}

impl Fields<'_> {
    fn get(&self, name: &'static str) -> Result<&Value, InvalidRecord> {
        let v = self
            .fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| missing(name, "absent"))?;
        // Unwrap a union branch, e.g. ["null","string"].
        Ok(match v {
            Value::Union(_, inner) => inner,
            other => other,
        })
    }

    fn string(&self, name: &'static str) -> Result<String, InvalidRecord> {
        match self.get(name)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(missing(name, &format!("expected a string, got {other:?}"))),
        }
    }

    fn optional_string(&self, name: &'static str) -> Result<Option<String>, InvalidRecord> {
        match self.get(name) {
            Err(_) | Ok(Value::Null) => Ok(None),
            Ok(Value::String(s)) => Ok(Some(s.clone())),
            Ok(other) => Err(missing(name, &format!("expected a string, got {other:?}"))),
        }
    }

    fn kind(&self, name: &'static str) -> Result<PaymentEventKind, InvalidRecord> {
        let symbol = match self.get(name)? {
            Value::Enum(_, s) | Value::String(s) => s,
            other => return Err(missing(name, &format!("expected an enum, got {other:?}"))),
        };
        PaymentEventKind::parse(symbol).ok_or_else(|| InvalidRecord::Value {
            field: name,
            detail: format!("unknown kind {symbol:?}"),
        })
    }

    fn currency(&self, name: &'static str) -> Result<Currency, InvalidRecord> {
        let code = self.string(name)?;
        Currency::from_code(&code).map_err(|source| InvalidRecord::Currency {
            field: name,
            source,
        })
    }

    fn decimal(&self, name: &'static str) -> Result<Decimal, InvalidRecord> {
        let Value::Decimal(d) = self.get(name)? else {
            return Err(missing(name, "expected an Avro decimal"));
        };
        let scale = *self
            .scales
            .get(name)
            .ok_or_else(|| missing(name, "writer schema has no decimal scale"))?;
        let bytes: Vec<u8> = d.try_into().map_err(|e| InvalidRecord::Amount {
            field: name,
            amount: "?".into(),
            reason: format!("unreadable decimal bytes: {e}"),
        })?;
        decimal_from_be_bytes(&bytes, scale).ok_or_else(|| InvalidRecord::Amount {
            field: name,
            amount: format!("{} bytes at scale {scale}", bytes.len()),
            reason: "does not fit in 96 bits / scale 28".into(),
        })
    }

    fn timestamp(&self, name: &'static str) -> Result<DateTime<Utc>, InvalidRecord> {
        let millis = match self.get(name)? {
            Value::TimestampMillis(ms) | Value::Long(ms) => *ms,
            Value::TimestampMicros(us) => us.div_euclid(1000),
            other => {
                return Err(missing(
                    name,
                    &format!("expected a timestamp, got {other:?}"),
                ));
            }
        };
        DateTime::from_timestamp_millis(millis).ok_or_else(|| InvalidRecord::Value {
            field: name,
            detail: format!("timestamp {millis} ms is out of range"),
        })
    }

    fn date(&self, name: &'static str) -> Result<NaiveDate, InvalidRecord> {
        let days = match self.get(name)? {
            Value::Date(d) | Value::Int(d) => *d,
            other => return Err(missing(name, &format!("expected a date, got {other:?}"))),
        };
        NaiveDate::from_ymd_opt(1970, 1, 1)
            .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::days(days.into())))
            .ok_or_else(|| InvalidRecord::Value {
                field: name,
                detail: format!("date {days} days after 1970-01-01 is out of range"),
            })
    }
}

fn missing(field: &'static str, detail: &str) -> InvalidRecord {
    InvalidRecord::MissingField {
        field,
        detail: detail.to_owned(),
    }
}

/// Two's-complement big-endian unscaled integer plus scale to a `Decimal`.
fn decimal_from_be_bytes(bytes: &[u8], scale: u32) -> Option<Decimal> {
    if bytes.is_empty() || bytes.len() > 16 || scale > 28 {
        return None;
    }
    let negative = bytes[0] & 0x80 != 0;
    let mut buf = if negative { [0xffu8; 16] } else { [0u8; 16] };
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    let unscaled = i128::from_be_bytes(buf);
    Decimal::try_from_i128_with_scale(unscaled, scale).ok()
}

/// A `Decimal` as an Avro decimal at [`WRITE_SCALE`] (minimal two's-complement bytes).
pub(crate) fn decimal_value(d: Decimal) -> Value {
    let mut d = d;
    d.rescale(WRITE_SCALE);
    let unscaled = d.mantissa();
    let bytes = unscaled.to_be_bytes();
    // Strip redundant sign-extension bytes, keeping the sign bit right.
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    Value::Decimal(apache_avro::Decimal::from(&bytes[start..]))
}

/// The Avro value of a payment event in the shipped schema's field order.
pub fn payment_to_value(p: &PaymentEvent) -> Value {
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

/// The Avro value of a settlement line in the shipped schema's field order.
pub fn settlement_to_value(s: &SettlementLine) -> Value {
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

/// The Avro value of a bank statement line in the shipped schema's field order.
pub fn payout_to_value(b: &BankPayout) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_round_trip_through_avro_bytes() {
        for s in [
            "0",
            "1.5",
            "-1.5",
            "12345678901234.5678",
            "-0.0001",
            "127",
            "-128",
            "32768",
        ] {
            let d: Decimal = s.parse().unwrap();
            let Value::Decimal(avro) = decimal_value(d) else {
                panic!("not a decimal")
            };
            let bytes: Vec<u8> = (&avro).try_into().unwrap();
            assert_eq!(decimal_from_be_bytes(&bytes, WRITE_SCALE), Some(d), "{s}");
        }
    }

    #[test]
    fn payments_round_trip_through_the_shipped_schema() {
        let schema = Schema::parse_str(super::super::PAYMENT_EVENT_SCHEMA).unwrap();
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
        let body = encode_datum(&schema, payment_to_value(&p)).unwrap();
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut &body[..])
            .unwrap();
        let scales = decimal_scales(&schema);
        assert_eq!(
            to_record(Stream::Payments, &value, &scales).unwrap(),
            Record::Payment(p)
        );
    }

    #[test]
    fn a_settlement_on_the_payments_topic_is_the_wrong_record_type() {
        let schema = Schema::parse_str(super::super::SETTLEMENT_LINE_SCHEMA).unwrap();
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
        let body = encode_datum(&schema, settlement_to_value(&s)).unwrap();
        let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut &body[..])
            .unwrap();
        let scales = decimal_scales(&schema);
        assert_eq!(
            to_record(Stream::Settlements, &value, &scales).unwrap(),
            Record::Settlement(s)
        );
        match to_record(Stream::Payments, &value, &scales) {
            Err(DecodeError::Poison { kind, .. }) => assert_eq!(kind, PoisonKind::WrongRecordType),
            other => panic!("{other:?}"),
        }
    }
}
