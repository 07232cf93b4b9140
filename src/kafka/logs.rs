//! librdkafka's own log lines and error callbacks, rate limited.
//!
//! During a broker outage librdkafka reports the same failure many times a second (every
//! connection attempt of every client, as a log line *and* an error callback). Each distinct
//! report (its facility or error code, digits ignored) is logged at most once per
//! [`INTERVAL`]; the next one that gets through says how many were held back. End of
//! partition, which readers with `enable.partition.eof` wait for, is never an error.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// At most one line per distinct report in this long.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Per-report state: when one was last logged, how many were held back since.
#[derive(Debug, Default)]
pub struct Throttle {
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Throttle {
    /// `Some(held back since the last one)` when this report may be logged now.
    fn admit(&self, key: String, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 1000 {
            seen.clear(); // bounded: keys are few, but never let them grow without end
        }
        match seen.get_mut(&key) {
            Some((last, held)) if now.duration_since(*last) < INTERVAL => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let n = *held;
                *last = now;
                *held = 0;
                Some(n)
            }
            None => {
                seen.insert(key, (now, 0));
                Some(0)
            }
        }
    }

    /// A librdkafka log line, at its level, rate limited per facility and text shape.
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let level = if mirror_commit_refused(message) {
            RDKafkaLogLevel::Debug
        } else {
            level
        };
        let key = format!("{fac}:{}", shape(message));
        let Some(held) = self.admit(key, Instant::now()) else {
            return;
        };
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", %fac, held_back = held, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", %fac, held_back = held, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", %fac, held_back = held, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", %fac, held_back = held, "{message}")
            }
        }
    }

    /// A librdkafka error callback, rate limited per error; end of partition at DEBUG.
    ///
    /// (Offset commits the broker refuses during a rebalance are logged by [`Self::log`] at
    /// DEBUG: see [`mirror_commit_refused`].)
    pub fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error,
            KafkaError::Global(RDKafkaErrorCode::PartitionEOF) | KafkaError::PartitionEOF(_)
        ) {
            tracing::debug!(%reason, "end of partition");
            return;
        }
        let key = format!("{error}:{}", shape(reason));
        if let Some(held) = self.admit(key, Instant::now()) {
            tracing::error!(target: "librdkafka", %error, held_back = held, "{reason}");
        }
    }
}

/// The text with digits removed, so "after 5002ms" and "after 5003ms" are one report.
fn shape(text: &str) -> String {
    text.chars().filter(|c| !c.is_ascii_digit()).collect()
}

/// An offset commit to Kafka the group coordinator refused because a rebalance is in
/// progress. payrecon commits offsets to Kafka only as a mirror for lag tools (PostgreSQL holds
/// the offsets it reads), and the next batch's mirror commit carries the same positions, so
/// this is normal during every rebalance and not worth a warning.
fn mirror_commit_refused(message: &str) -> bool {
    message.contains("Offset commit")
        && (message.contains("rebalance in progress") || message.contains("REBALANCE_IN_PROGRESS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_report_is_admitted_once_per_interval_and_counts_what_it_held_back() {
        let t = Throttle::default();
        let t0 = Instant::now();
        let key = || {
            format!(
                "fail:{}",
                shape("connect to 127.0.0.1:9092 failed after 5001ms")
            )
        };
        assert_eq!(t.admit(key(), t0), Some(0));
        for i in 1..=12 {
            assert_eq!(t.admit(key(), t0 + Duration::from_millis(80 * i)), None);
        }
        // Another report is not held back by the first.
        assert_eq!(t.admit("other".into(), t0), Some(0));
        assert_eq!(t.admit(key(), t0 + INTERVAL), Some(12));
        assert_eq!(t.admit(key(), t0 + INTERVAL + Duration::from_secs(1)), None);
    }

    #[test]
    fn mirror_commits_refused_during_a_rebalance_are_not_warnings() {
        assert!(super::mirror_commit_refused(
            "Offset commit (manual) failed for 3/3 partition(s) in join-state steady: Broker: Group rebalance in progress: t[1]@2017(Broker: Group rebalance in progress)"
        ));
        assert!(!super::mirror_commit_refused(
            "Offset commit (manual) failed: Broker: Not coordinator"
        ));
        assert!(!super::mirror_commit_refused("Group rebalance in progress"));
    }
}
