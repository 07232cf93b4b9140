//! Avro values: reading a decoded record's fields by name, writing decimals and datums.
//! Which fields make which record is each input's own binding (`crate::inputs`).
//!
//! Fields are looked up by name, so a writer schema with extra fields (newer producer) or
//! without an optional field (older producer) still converts.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::types::Value;
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use super::{DecodeError, PoisonKind};
use crate::domain::{Currency, InvalidRecord, PaymentEventKind};

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

/// Named access to a record's fields with errors that name the field: what an input's
/// schema binding reads a decoded value through (`crate::inputs`).
pub struct AvroRecord<'a> {
    fields: &'a [(String, Value)],
    scales: &'a HashMap<String, u32>,
}

impl<'a> AvroRecord<'a> {
    /// The top-level record of a decoded value, or poison if it is not a record.
    pub fn new(value: &'a Value, scales: &'a HashMap<String, u32>) -> Result<Self, DecodeError> {
        let Value::Record(fields) = value else {
            return Err(DecodeError::Poison {
                kind: PoisonKind::WrongRecordType,
                message: "top-level value is not an Avro record".into(),
            });
        };
        Ok(AvroRecord { fields, scales })
    }

    /// Whether the record has a field `name` (tells one record type from another).
    pub fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|(n, _)| n == name)
    }

    /// Poison for a record of another type than `expected` (names the fields it has).
    pub fn wrong_type(&self, expected: &str) -> DecodeError {
        DecodeError::Poison {
            kind: PoisonKind::WrongRecordType,
            message: format!(
                "record with fields [{}] is not a {expected} record",
                (self.fields.iter())
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        }
    }

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

    pub fn string(&self, name: &'static str) -> Result<String, InvalidRecord> {
        match self.get(name)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(missing(name, &format!("expected a string, got {other:?}"))),
        }
    }

    pub fn optional_string(&self, name: &'static str) -> Result<Option<String>, InvalidRecord> {
        match self.get(name) {
            Err(_) | Ok(Value::Null) => Ok(None),
            Ok(Value::String(s)) => Ok(Some(s.clone())),
            Ok(other) => Err(missing(name, &format!("expected a string, got {other:?}"))),
        }
    }

    pub fn kind(&self, name: &'static str) -> Result<PaymentEventKind, InvalidRecord> {
        let symbol = match self.get(name)? {
            Value::Enum(_, s) | Value::String(s) => s,
            other => return Err(missing(name, &format!("expected an enum, got {other:?}"))),
        };
        PaymentEventKind::parse(symbol).ok_or_else(|| InvalidRecord::Value {
            field: name,
            detail: format!("unknown kind {symbol:?}"),
        })
    }

    pub fn currency(&self, name: &'static str) -> Result<Currency, InvalidRecord> {
        let code = self.string(name)?;
        Currency::from_code(&code).map_err(|source| InvalidRecord::Currency {
            field: name,
            source,
        })
    }

    pub fn decimal(&self, name: &'static str) -> Result<Decimal, InvalidRecord> {
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

    pub fn timestamp(&self, name: &'static str) -> Result<DateTime<Utc>, InvalidRecord> {
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

    pub fn date(&self, name: &'static str) -> Result<NaiveDate, InvalidRecord> {
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
pub fn decimal_value(d: Decimal) -> Value {
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
}
