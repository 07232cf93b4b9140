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
}

impl ValidationSettings {
    /// The codec's bounds.
    pub fn limits(&self) -> Limits {
        let chrono = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        Limits {
            max_id_bytes: self.max_id_bytes,
            max_event_time_ahead: chrono(self.max_event_time_ahead),
            max_event_time_behind: chrono(self.max_event_time_behind),
        }
    }
}
