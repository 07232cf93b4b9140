//! Malformed records, one of every poison class in turn (they must be dead-lettered).

use super::*;

/// The fields of an Avro record value.
pub(super) type AvroFields = Vec<(String, apache_avro::types::Value)>;

/// `count` malformed records cycling through every poison class.
pub fn malformed_records(count: u64, payment_schema_id: u32, seed: u64) -> Vec<Generated> {
    let schema = apache_avro::Schema::parse_str(crate::codec::PAYMENT_EVENT_SCHEMA)
        .expect("shipped schema parses");
    let valid = PaymentEvent {
        event_id: String::new(),
        payment_reference: String::new(),
        merchant_id: "merchant-000".into(),
        kind: PaymentEventKind::Capture,
        amount: Decimal::new(1000, 2),
        currency: Currency::from_code("EUR").expect("EUR exists"),
        event_time: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        psp_reference: None,
    };
    let encode = |p: &PaymentEvent, patch: &dyn Fn(&mut AvroFields)| {
        let apache_avro::types::Value::Record(mut fields) = payment_to_value(p) else {
            unreachable!()
        };
        patch(&mut fields);
        let body = crate::codec::encode_datum(&schema, apache_avro::types::Value::Record(fields))
            .expect("encodes");
        frame(payment_schema_id, &body)
    };
    (0..count)
        .map(|n| {
            let mut p = valid.clone();
            p.event_id = format!("bad-{seed}-{n}");
            p.payment_reference = format!("bad-ref-{seed}-{n}");
            let bytes = match n % 6 {
                // Not the Confluent wire format at all.
                0 => b"{\"json\": \"is not avro\"}".to_vec(),
                // Wire format with a schema id the registry does not know.
                1 => frame(999_999, b"\x02ab"),
                // Valid header, truncated body.
                2 => {
                    let full = encode(&p, &|_| {});
                    full[..full.len() / 2].to_vec()
                }
                // Unknown currency code.
                3 => encode(&p, &|f| {
                    f[5].1 = apache_avro::types::Value::String("XYZ".into())
                }),
                // Amount with more decimals than EUR allows.
                4 => {
                    let mut q = p.clone();
                    q.amount = Decimal::new(12345, 3);
                    encode(&q, &|_| {})
                }
                // Negative amount.
                _ => {
                    let mut q = p.clone();
                    q.amount = Decimal::new(-500, 2);
                    encode(&q, &|_| {})
                }
            };
            Generated::Malformed {
                payments_topic: true,
                key: p.payment_reference,
                bytes,
            }
        })
        .collect()
}
