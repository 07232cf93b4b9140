//! Avro records in the Confluent Schema Registry wire format.
//!
//! Owns the bytes-to-Avro boundary: magic byte, 4-byte big-endian schema id, Avro body
//! (decoded with the *writer* schema fetched by id through `schema_registry_converter`, so
//! producers on older or newer compatible versions still decode), read through
//! [`AvroRecord`]; each input binds the fields to its record and validates it
//! (`crate::inputs`). Every failure is classified once, here: a record that can never
//! succeed is [`DecodeError::Poison`] (dead-letter it); a registry that cannot be reached or
//! answers oddly is [`DecodeError::Transient`] (retry the same record, never dead-letter).
//!
//! It does not talk to Kafka or PostgreSQL.

mod avro;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::{SrSettings, post_schema};
use schema_registry_converter::error::SRCError;

use crate::redact::redact_text;
use schema_registry_converter::schema_registry_common::{RawError, SchemaType, SuppliedSchema};

use crate::domain::InvalidRecord;

pub use avro::{AvroRecord, decimal_scales, decimal_value, encode_datum};

/// The Avro schema of a payment event, as shipped in `schemas/`.
pub const PAYMENT_EVENT_SCHEMA: &str = include_str!("../../schemas/payment_event.avsc");
/// The Avro schema of a settlement line, as shipped in `schemas/`.
pub const SETTLEMENT_LINE_SCHEMA: &str = include_str!("../../schemas/settlement_line.avsc");

/// The Avro schema of a bank statement line (payout), as shipped in `schemas/`.
pub const BANK_PAYOUT_SCHEMA: &str = include_str!("../../schemas/bank_payout.avsc");

/// Which input stream a record came from; decides the record type expected. Each has its
/// module in `crate::inputs` (see "How to add an input" there); the consumer, replay reader
/// and lag tracking iterate over the configured input topics and need no change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Payments,
    Settlements,
    Payouts,
}

impl Stream {
    /// Every input stream, in topic-index order.
    pub const ALL: [Stream; 3] = [Stream::Payments, Stream::Settlements, Stream::Payouts];

    /// The Avro record name the stream's topic carries.
    pub fn record_name(&self) -> &'static str {
        match self {
            Stream::Payments => "PaymentEvent",
            Stream::Settlements => "SettlementLine",
            Stream::Payouts => "BankPayout",
        }
    }

    /// The schema shipped for the stream.
    pub fn schema(&self) -> &'static str {
        match self {
            Stream::Payments => PAYMENT_EVENT_SCHEMA,
            Stream::Settlements => SETTLEMENT_LINE_SCHEMA,
            Stream::Payouts => BANK_PAYOUT_SCHEMA,
        }
    }
}

/// Classes of records that can never be applied. Stored as `dead_letters.error_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoisonKind {
    /// Not the Confluent wire format: empty, shorter than 5 bytes, or first byte not 0.
    BadMagicByte,
    /// The registry answered that no schema has this id.
    UnknownSchemaId,
    /// The body does not decode with the writer schema named by its id.
    UndecodableBody,
    /// The record decoded but a field value breaks a rule (currency, amount, ids, net).
    InvalidField,
    /// The record decoded as a type this topic does not carry (e.g. a settlement on payments).
    WrongRecordType,
    /// A string with characters PostgreSQL text cannot hold (NUL) or an id with control
    /// characters.
    InvalidText,
    /// An id or reference longer than `validation.max_id_bytes`.
    FieldTooLong,
    /// An amount beyond what the columns hold.
    AmountOutOfRange,
    /// An event time (or settlement date) outside the storable range, or too far ahead of or
    /// behind the record's broker timestamp (`validation.max_event_time_ahead`/`_behind`).
    ImplausibleEventTime,
    /// A settlement or value date too far from the record's own event time
    /// (`validation.max_business_date_ahead`/`_behind`).
    ImplausibleBusinessDate,
    /// Passed every check and still refused by PostgreSQL for a reason in the record (data
    /// exception, integrity violation, program limit); the message carries the SQLSTATE.
    /// Assigned by the store's refusal isolation, never by the codec.
    DatabaseRefused,
}

impl PoisonKind {
    /// Every class, for metrics registration and reports.
    pub const ALL: [PoisonKind; 11] = [
        PoisonKind::BadMagicByte,
        PoisonKind::UnknownSchemaId,
        PoisonKind::UndecodableBody,
        PoisonKind::InvalidField,
        PoisonKind::WrongRecordType,
        PoisonKind::InvalidText,
        PoisonKind::FieldTooLong,
        PoisonKind::AmountOutOfRange,
        PoisonKind::ImplausibleEventTime,
        PoisonKind::ImplausibleBusinessDate,
        PoisonKind::DatabaseRefused,
    ];

    /// The stable name stored in PostgreSQL and used as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            PoisonKind::BadMagicByte => "bad_magic_byte",
            PoisonKind::UnknownSchemaId => "unknown_schema_id",
            PoisonKind::UndecodableBody => "undecodable_body",
            PoisonKind::InvalidField => "invalid_field",
            PoisonKind::WrongRecordType => "wrong_record_type",
            PoisonKind::InvalidText => "invalid_text",
            PoisonKind::FieldTooLong => "field_too_long",
            PoisonKind::AmountOutOfRange => "amount_out_of_range",
            PoisonKind::ImplausibleEventTime => "implausible_event_time",
            PoisonKind::ImplausibleBusinessDate => "implausible_business_date",
            PoisonKind::DatabaseRefused => "database_refused",
        }
    }

    /// The dead-letter reason of a record that decoded but breaks a rule or a bound.
    pub fn of_invalid(e: &InvalidRecord) -> PoisonKind {
        match e.class() {
            "text" => PoisonKind::InvalidText,
            "too_long" => PoisonKind::FieldTooLong,
            "amount_range" => PoisonKind::AmountOutOfRange,
            "event_time" => PoisonKind::ImplausibleEventTime,
            "business_date" => PoisonKind::ImplausibleBusinessDate,
            _ => PoisonKind::InvalidField,
        }
    }
}

/// The two dispositions of a decode failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    /// The record can never succeed; keep its bytes with this reason and move on.
    #[error("{}: {message}", kind.as_str())]
    Poison { kind: PoisonKind, message: String },
    /// The registry is unreachable or misbehaving; retry the same record later.
    #[error("schema registry unavailable: {0}")]
    Transient(String),
}

/// A decoded Avro value and the decimal scales of the schema it was written with.
pub struct Decoded {
    pub value: apache_avro::types::Value,
    pub scales: Arc<HashMap<String, u32>>,
}

impl DecodeError {
    pub fn poison(kind: PoisonKind, message: impl Into<String>) -> Self {
        DecodeError::Poison {
            kind,
            message: message.into(),
        }
    }
}

/// The largest allocation the Avro reader may make for one value: above any Kafka record
/// (`message.max.bytes` defaults to 1 MB), far below what would hurt the process.
pub const MAX_AVRO_ALLOCATION: usize = 16 * 1024 * 1024;

/// Decimal scales of a writer schema's decimal fields, by field name. Avro decimals carry
/// their scale in the schema, not in the value, so each writer schema is inspected once.
type Scales = HashMap<String, u32>;

/// Decodes Confluent-framed Avro records into Avro values with their writer schema's decimal
/// scales.
pub struct Codec {
    /// The crate-provided registry client and its id-keyed schema cache.
    decoder: AvroDecoder,
    /// Writer-schema decimal scales by schema id (filled on first sight of an id).
    scales: RwLock<HashMap<u32, Arc<Scales>>>,
}

/// Builds registry client settings for `url` with a bounded request timeout, so an
/// unresponsive registry surfaces as a transient error instead of a hang. No credentials and
/// no TLS settings: the service builds its client from `[registry]` with
/// [`crate::config::RegistrySettings::client`]; this is for the embedded registry (tests,
/// benchmark).
pub fn registry_settings(url: &str, timeout: Duration) -> Result<SrSettings, DecodeError> {
    SrSettings::new_builder(url.to_owned())
        .set_timeout(timeout)
        .build()
        .map_err(|e| DecodeError::Transient(redact_text(&e.to_string())))
}

impl Codec {
    pub fn new(settings: SrSettings) -> Self {
        // A body can claim a string or array of any length in a few bytes; the Avro reader
        // allocates what it claims before finding the bytes missing. Nothing in one Kafka
        // record can be larger than the record, so bound every allocation (process-wide,
        // first call wins) far below the 512 MiB default.
        apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
        Codec {
            decoder: AvroDecoder::new(settings),
            scales: RwLock::new(HashMap::new()),
        }
    }

    /// Decodes one payload: the wire-format header, then the Avro body with the writer
    /// schema named by its id.
    pub async fn decode_value(&self, payload: Option<&[u8]>) -> Result<Decoded, DecodeError> {
        let bytes = payload.unwrap_or_default();
        if bytes.len() < 5 || bytes[0] != 0 {
            let detail = match bytes.first() {
                None => "empty payload".to_owned(),
                Some(b) if bytes.len() < 5 => format!(
                    "payload of {} bytes (first byte {b:#04x}) is shorter than the 5-byte header",
                    bytes.len()
                ),
                Some(b) => format!("first byte is {b:#04x}, expected the magic byte 0x00"),
            };
            return Err(DecodeError::poison(
                PoisonKind::BadMagicByte,
                format!("not Confluent wire format: {detail}"),
            ));
        }
        let schema_id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let decoded = match self.decoder.decode(Some(bytes)).await {
            Ok(d) => d,
            Err(e) => return Err(self.classify(schema_id, e)),
        };
        let scales = self.scales_for(schema_id).await?;
        Ok(Decoded {
            value: decoded.value,
            scales,
        })
    }

    /// Maps a converter error to a disposition. Only an answer *from the registry* that the
    /// id does not exist (Confluent error code 40403) or a body that fails to decode is
    /// poison; anything else (connection refused, timeouts, 5xx, 401, an unparsable answer)
    /// is transient, and any cached error is evicted so an outage cannot poison the cache.
    fn classify(&self, schema_id: u32, e: SRCError) -> DecodeError {
        let raw = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<RawError>());
        if raw.is_some_and(|r| r.error_code == 40403) {
            return DecodeError::poison(
                PoisonKind::UnknownSchemaId,
                format!("schema registry has no schema with id {schema_id}"),
            );
        }
        if e.error
            .starts_with("Could not transform bytes using schema")
        {
            return DecodeError::poison(
                PoisonKind::UndecodableBody,
                format!(
                    "body does not decode with writer schema {schema_id}: {}",
                    e.cause.as_deref().unwrap_or("unknown cause")
                ),
            );
        }
        self.decoder.remove_errors_from_cache();
        // The converter's message carries reqwest's, which prints the request URL with its
        // user info: the registry's basic-auth credentials when they are in registry.url.
        DecodeError::Transient(redact_text(&e.to_string()))
    }

    async fn scales_for(&self, schema_id: u32) -> Result<Arc<Scales>, DecodeError> {
        if let Some(s) = self.scales.read().expect("scales lock").get(&schema_id) {
            return Ok(s.clone());
        }
        let schema = self
            .decoder
            .get_schema(schema_id)
            .await
            .map_err(|e| self.classify(schema_id, e))?;
        let scales = Arc::new(decimal_scales(&schema.parsed));
        self.scales
            .write()
            .expect("scales lock")
            .insert(schema_id, scales.clone());
        Ok(scales)
    }
}

/// Frames an Avro datum in the Confluent wire format: magic byte 0, schema id, body.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Registers `schema` under `<topic>-value` and returns its id and parsed form.
pub async fn register_schema(
    settings: &SrSettings,
    topic: &str,
    schema: &str,
) -> anyhow::Result<(u32, Schema)> {
    let registered = post_schema(
        settings,
        format!("{topic}-value"),
        SuppliedSchema::new(None, SchemaType::Avro, schema.to_owned()),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "registering the schema for {topic}: {}",
            redact_text(&e.to_string())
        )
    })?;
    Ok((registered.id, Schema::parse_str(schema)?))
}
