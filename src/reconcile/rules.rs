//! The matching rules as configured, and the reference data that prices a reference:
//! [`Rules`] fills a merchant version's gaps with the global defaults ([`Rules::terms`]);
//! [`Priced`] answers the matcher's questions ([`ReferenceData`]) from one reference-data
//! [`Snapshot`].

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::state::ReferenceData;
use super::{ClockRules, Terms, Tolerance, TopicClock};
use crate::config::ReconciliationSettings;
use crate::domain::Currency;
use crate::reference::{MerchantVersionRef, Snapshot};

/// Global matching rules (the merchant's reference data can override them).
#[derive(Debug, Clone)]
pub struct Rules {
    pub tolerance: Tolerance,
    pub settlement_deadline: chrono::Duration,
    pub payment_deadline: chrono::Duration,
    pub allowed_lateness: chrono::Duration,
    /// Idle timeout and allowed lateness per input topic (the watermark's rules).
    pub clock: ClockRules,
    pub due_sweep_limit: i64,
    /// The payout leg's deadline and tolerance.
    pub payout: super::PayoutRules,
}

fn chrono_duration(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Rules {
    pub fn from_settings(s: &ReconciliationSettings) -> Rules {
        Rules {
            tolerance: Tolerance {
                absolute: s.tolerance_abs,
                relative: s.tolerance_rel,
            },
            settlement_deadline: chrono_duration(s.settlement_deadline),
            payment_deadline: chrono_duration(s.payment_deadline),
            allowed_lateness: chrono_duration(s.allowed_lateness),
            clock: ClockRules {
                default: TopicClock {
                    idle_timeout: chrono_duration(s.idle_timeout),
                    allowed_lateness: chrono_duration(s.allowed_lateness),
                },
                topics: (s.topics.iter())
                    .map(|(topic, o)| {
                        let clock = TopicClock {
                            idle_timeout: chrono_duration(o.idle_timeout.unwrap_or(s.idle_timeout)),
                            allowed_lateness: chrono_duration(
                                o.allowed_lateness.unwrap_or(s.allowed_lateness),
                            ),
                        };
                        (topic.clone(), clock)
                    })
                    .collect(),
            },
            due_sweep_limit: s.due_sweep_limit.max(1),
            payout: super::PayoutRules {
                deadline: chrono_duration(s.payout_deadline),
                tolerance: Tolerance {
                    absolute: s.payout_tolerance_abs,
                    relative: s.payout_tolerance_rel,
                },
            },
        }
    }

    /// The merchant version's terms with the global defaults filled in.
    pub fn terms(&self, m: MerchantVersionRef<'_>) -> Terms {
        Terms {
            settlement_currency: m.settlement_currency,
            fee_bps: m.fee_bps,
            fee_fixed: m.fee_fixed,
            tolerance: Tolerance {
                absolute: m.tolerance_abs.unwrap_or(self.tolerance.absolute),
                relative: m.tolerance_rel.unwrap_or(self.tolerance.relative),
            },
            settlement_deadline: m
                .settlement_deadline
                .map_or(self.settlement_deadline, chrono_duration),
            payment_deadline: m
                .payment_deadline
                .map_or(self.payment_deadline, chrono_duration),
        }
    }
}

/// The reference data of one snapshot with the rules' defaults: what prices a reference.
#[derive(Clone, Copy)]
pub struct Priced<'a> {
    pub rules: &'a Rules,
    pub snapshot: &'a Snapshot,
}

impl ReferenceData for Priced<'_> {
    fn terms_at(&self, merchant_id: &str, at: DateTime<Utc>) -> Option<Terms> {
        (self.snapshot.merchant_at(merchant_id, at)).map(|m| self.rules.terms(m))
    }

    fn rate_at(&self, from: Currency, to: Currency, at: DateTime<Utc>) -> Option<Decimal> {
        self.snapshot.rate_at(from, to, at)
    }

    fn rate_fingerprint(&self, from: Currency, to: Currency, up_to: DateTime<Utc>) -> u64 {
        self.snapshot.rate_fingerprint(from, to, up_to)
    }
}
