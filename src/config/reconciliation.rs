//! `[reconciliation]`: matching tolerances, deadlines and the watermark's clock.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// Global matching rules; a merchant's reference data can override tolerances and deadlines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconciliationSettings {
    /// `false`: ingestion only. Records, running totals, dead letters and offsets are
    /// committed as always, but no reconciliation item, history, outbox row or item count
    /// in the daily totals is written (`payrecon bench` measures the ingestion path so).
    pub enabled: bool,
    /// Absolute tolerance in settlement currency (a decimal string, e.g. "0.01").
    #[serde(with = "rust_decimal::serde::str")]
    pub tolerance_abs: rust_decimal::Decimal,
    /// Relative tolerance as a fraction of the expected amount (e.g. "0.0001" = 1 bp).
    #[serde(with = "rust_decimal::serde::str")]
    pub tolerance_rel: rust_decimal::Decimal,
    /// How long after its last payment event a reference may still be settled.
    #[serde(with = "humantime_serde")]
    pub settlement_deadline: Duration,
    /// How long after a settlement line its payment event may still arrive.
    #[serde(with = "humantime_serde")]
    pub payment_deadline: Duration,
    /// How long after a settlement batch's last line its payout may still arrive on the bank
    /// statement (and how long an unexplained credit waits for its batch).
    #[serde(with = "humantime_serde")]
    pub payout_deadline: Duration,
    /// Absolute tolerance between a batch's net total and its payouts (a decimal string).
    #[serde(with = "rust_decimal::serde::str")]
    pub payout_tolerance_abs: rust_decimal::Decimal,
    /// Relative tolerance of the payout leg as a fraction of the batch's net total.
    #[serde(with = "rust_decimal::serde::str")]
    pub payout_tolerance_rel: rust_decimal::Decimal,
    /// A partition's highest event time counts in the watermark minus this (how late a
    /// record may arrive and still be in time).
    #[serde(with = "humantime_serde")]
    pub allowed_lateness: Duration,
    /// A caught-up input partition whose last record's broker timestamp is more than this
    /// behind the group's stream time (the highest broker timestamp applied) stops holding
    /// the watermark back; see `reconcile::watermark`. Broker time, not the wall clock, so a
    /// replay judges it the same.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Per input topic overrides of `idle_timeout` and `allowed_lateness`, keyed by topic
    /// name (a settlements topic that receives one burst a day needs a longer idle timeout).
    #[serde(default)]
    pub topics: BTreeMap<String, TopicClockSettings>,
    /// Items the watermark made due that one batch re-evaluates at most (the rest follow in
    /// the next batches).
    pub due_sweep_limit: i64,
    /// Full reload of the reference cache, besides the reload on every change notification.
    #[serde(with = "humantime_serde")]
    pub reference_full_reload: Duration,
}

/// One input topic's watermark overrides; unset fields take the global value.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicClockSettings {
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub allowed_lateness: Option<Duration>,
}
