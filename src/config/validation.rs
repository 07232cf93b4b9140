//! `[validation]`: bounds every record must respect before it reaches the store.

use std::time::Duration;

use serde::Deserialize;

use crate::domain::Limits;

/// Bounds every record must respect before it reaches the store (see [`Limits`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationSettings {
    /// Longest id or reference, in UTF-8 bytes.
    pub max_id_bytes: usize,
    /// How far an event time may lie after its record's broker timestamp.
    #[serde(with = "humantime_serde")]
    pub max_event_time_ahead: Duration,
    /// How far an event time may lie before its record's broker timestamp.
    #[serde(with = "humantime_serde")]
    pub max_event_time_behind: Duration,
    /// How far a settlement or value date may lie after its record's event date.
    #[serde(with = "humantime_serde", default = "default_business_date_window")]
    pub max_business_date_ahead: Duration,
    /// How far a settlement or value date may lie before its record's event date.
    #[serde(with = "humantime_serde", default = "default_business_date_window")]
    pub max_business_date_behind: Duration,
}

/// A quarter: T+N settlement, forward value dates and month-end statements fit easily; a
/// date years away does not.
fn default_business_date_window() -> Duration {
    Duration::from_secs(92 * 86_400)
}

impl ValidationSettings {
    /// The codec's bounds.
    pub fn limits(&self) -> Limits {
        let chrono = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        Limits {
            max_id_bytes: self.max_id_bytes,
            max_event_time_ahead: chrono(self.max_event_time_ahead),
            max_event_time_behind: chrono(self.max_event_time_behind),
            max_business_date_ahead: chrono(self.max_business_date_ahead),
            max_business_date_behind: chrono(self.max_business_date_behind),
        }
    }
}
