//! Encoding records for producers (simulator, benchmark, tests): each input's Avro binding
//! in the Confluent wire format.

use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::SrSettings;

use crate::codec::{
    BANK_PAYOUT_SCHEMA, PAYMENT_EVENT_SCHEMA, SETTLEMENT_LINE_SCHEMA, encode_datum, frame,
    register_schema,
};
use crate::domain::{BankPayout, PaymentEvent, SettlementLine};

/// Encodes records for producers (simulator, tests) with schemas registered under the
/// topic-name strategy (`<topic>-value`).
pub struct Encoder {
    payment: (u32, Schema),
    settlement: (u32, Schema),
    payout: Option<(u32, Schema)>,
}

impl Encoder {
    /// Registers (or looks up) both shipped schemas for the given topics.
    pub async fn register(
        settings: &SrSettings,
        payments_topic: &str,
        settlements_topic: &str,
    ) -> anyhow::Result<Self> {
        let payment = register_schema(settings, payments_topic, PAYMENT_EVENT_SCHEMA).await?;
        let settlement =
            register_schema(settings, settlements_topic, SETTLEMENT_LINE_SCHEMA).await?;
        Ok(Encoder {
            payment,
            settlement,
            payout: None,
        })
    }

    /// Also registers (or looks up) the bank statement schema for `payouts_topic`.
    pub async fn with_payouts(
        mut self,
        settings: &SrSettings,
        payouts_topic: &str,
    ) -> anyhow::Result<Self> {
        self.payout = Some(register_schema(settings, payouts_topic, BANK_PAYOUT_SCHEMA).await?);
        Ok(self)
    }

    pub fn encode_payout(&self, b: &BankPayout) -> anyhow::Result<Vec<u8>> {
        let (id, schema) = (self.payout.as_ref())
            .ok_or_else(|| anyhow::anyhow!("the payouts schema is not registered"))?;
        let body = encode_datum(schema, super::payouts::to_avro(b))?;
        Ok(frame(*id, &body))
    }

    pub fn payment_schema_id(&self) -> u32 {
        self.payment.0
    }

    pub fn encode_payment(&self, p: &PaymentEvent) -> anyhow::Result<Vec<u8>> {
        let body = encode_datum(&self.payment.1, super::payments::to_avro(p))?;
        Ok(frame(self.payment.0, &body))
    }

    pub fn encode_settlement(&self, s: &SettlementLine) -> anyhow::Result<Vec<u8>> {
        let body = encode_datum(&self.settlement.1, super::settlements::to_avro(s))?;
        Ok(frame(self.settlement.0, &body))
    }
}
