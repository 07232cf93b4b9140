//! Structured logging via `tracing`: text or JSON, filter in RUST_LOG syntax.
//! Logs never carry secrets (URLs are redacted by `config`) or record payloads.

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
