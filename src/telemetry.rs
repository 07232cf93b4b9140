//! How the service reports itself: structured logging via `tracing` (text or JSON, filter
//! in RUST_LOG syntax), and the metric events of reconciliation outcomes and the watermark
//! (read from the engine's types, emitted through the primitive functions of `metrics`,
//! which imports nothing of the crate). Logs never carry secrets (URLs are redacted, see
//! `redact`) or record payloads.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Whether logs go out as JSON (then a failing command's last error is a JSON log line too).
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`init`] installed the JSON format.
pub fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global subscriber; `RUST_LOG` wins over the configured filter. Safe to call
/// twice (the second call is ignored).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{},librdkafka=warn,rdkafka=warn", settings.filter))
    });
    // Colours only for a person at a terminal: never escape codes in files or log collectors.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours)
        .with_writer(std::io::stderr);
    JSON.store(
        settings.format == LogFormat::Json,
        std::sync::atomic::Ordering::Relaxed,
    );
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Installs the global subscriber writing to the file `path` (created or truncated), without
/// colours: the demo's log while its terminal shows the progress.
pub fn init_to_file(settings: &LogSettings, path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{},librdkafka=warn,rdkafka=warn", settings.filter))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file));
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

/// Every series starts at zero, so a rate over a fresh process is defined: per input topic,
/// per dead-letter reason, per status of both reconciliation legs.
pub fn register_zeroes(topics: &[&str], dead_letter_reasons: &[&'static str]) {
    let statuses: Vec<(&'static str, bool)> = (crate::reconcile::Status::ALL.iter())
        .map(|s| (s.as_str(), s.is_exception()))
        // The payout leg's statuses (PAYOUT_*) count in the same series.
        .chain((crate::reconcile::PayoutStatus::ALL.iter()).map(|s| (s.as_str(), s.is_exception())))
        .collect();
    crate::metrics::register_zeroes(topics, dead_letter_reasons, &statuses);
}

/// What reconciliation changed in one committed transaction.
pub fn reconciled(outcome: &crate::reconcile::ReconcileOutcome) {
    for (status, n) in &outcome.status_changes {
        crate::metrics::status_changed(status.as_str(), status.is_exception(), *n);
    }
    let p = &outcome.payouts;
    for (status, n) in &p.status_changes {
        crate::metrics::status_changed(status.as_str(), status.is_exception(), *n);
    }
    crate::metrics::exceptions(
        outcome.exceptions_opened + p.exceptions_opened,
        outcome.exceptions_resolved + p.exceptions_resolved,
    );
    if let Some(w) = outcome.watermark {
        crate::metrics::watermark(w);
    }
}

/// The watermark was judged (after a lag refresh): the group's, and every partition's part.
pub fn group_watermark(w: &crate::reconcile::GroupWatermark) {
    let partitions = w.partitions.iter().map(|p| crate::metrics::PartitionClock {
        topic: &p.topic,
        partition: p.partition,
        contribution: p.contribution,
        standing: p.standing.as_str(),
        idle: p.standing.is_idle(),
    });
    crate::metrics::group_watermark(
        w.watermark,
        w.stream_time,
        partitions,
        &crate::reconcile::watermark::STANDINGS,
    );
}
