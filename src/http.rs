//! The operations endpoint: `/metrics` (Prometheus), `/health/live`, `/health/ready`.
//!
//! Served from the moment the service starts, before any dependency answers: while it
//! starts, `/health/ready` answers 503 with what it waits for (a [`Stage`]); once the
//! consumer runs, it checks the database, the broker, the group and the stall detector.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::kafka::{Assignment, Progress};
use crate::store::Store;

/// What the handlers need.
#[derive(Clone)]
pub struct OpsState {
    /// Renders the process-wide Prometheus registry.
    pub metrics: Option<PrometheusHandle>,
    /// Starting (and waiting for what) or running (and what readiness checks).
    pub stage: Arc<Stage>,
}

/// Where the service is in its life: readiness answers from it.
#[derive(Default)]
pub struct Stage(Mutex<StageKind>);

#[derive(Default, Clone)]
enum StageKind {
    /// Start-up has not reached its first wait yet.
    #[default]
    Starting,
    /// Start-up waits for a dependency; the text says which and why (redacted).
    Waiting(String),
    /// The consumer runs; readiness checks these.
    Running(Arc<Checks>),
}

impl Stage {
    /// Start-up waits for something: `/health/ready` says so.
    pub fn waiting(&self, what: impl Into<String>) {
        *self.0.lock().expect("stage lock") = StageKind::Waiting(what.into());
    }

    /// Start-up is over: readiness checks the running service.
    pub fn running(&self, checks: Checks) {
        *self.0.lock().expect("stage lock") = StageKind::Running(Arc::new(checks));
    }

    fn get(&self) -> StageKind {
        self.0.lock().expect("stage lock").clone()
    }
}

/// What readiness checks once the consumer runs.
pub struct Checks {
    /// Readiness needs a database that answers.
    pub store: Store,
    /// Readiness needs a joined group (partitions assigned, or none because the group has
    /// more members than partitions).
    pub assignment: Arc<Mutex<Assignment>>,
    /// Readiness needs a consumer that makes progress (not stalled, see [`Progress`]).
    pub progress: Arc<Progress>,
    /// Unix ms of the last successful broker round trip (the lag reporter's watermarks).
    pub broker_seen: Arc<AtomicI64>,
    /// How old that round trip may be before the broker counts as unreachable.
    pub broker_max_silence: Duration,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { "ok" }))
        .route("/health/ready", get(ready))
        .with_state(state)
}

/// Serves the router on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: OpsState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(state): State<OpsState>) -> (StatusCode, String) {
    match &state.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed in this process\n".into(),
        ),
    }
}

/// Ready when PostgreSQL answers, the broker answered recently, this instance has joined the
/// group (it may own no partition when there are more members than partitions), and it is not
/// stalled (records waiting that it neither commits nor fetches, or a partition it cannot
/// position).
async fn ready(State(state): State<OpsState>) -> (StatusCode, String) {
    let state = match state.stage.get() {
        StageKind::Running(checks) => checks,
        StageKind::Starting => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: starting\n".to_owned(),
            );
        }
        StageKind::Waiting(what) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {what}\n"),
            );
        }
    };
    let db = state.store.ping().await;
    let (joined, assigned) = state
        .assignment
        .lock()
        .map(|a| (a.joined, a.partitions.len()))
        .unwrap_or((false, 0));
    let seen = state.broker_seen.load(Ordering::Relaxed);
    let silence_ms = chrono::Utc::now().timestamp_millis() - seen;
    let mut problems = Vec::new();
    if let Err(e) = db {
        problems.push(format!(
            "database: {}",
            crate::redact::redact_text(&crate::store::describe(&e))
        ));
    }
    if seen == 0 || silence_ms > state.broker_max_silence.as_millis() as i64 {
        problems.push("broker: no successful round trip recently".to_owned());
    }
    if !joined {
        problems.push("consumer group: not joined yet".to_owned());
    }
    if let Some(reason) = state.progress.stalled() {
        problems.push(format!("consumer stalled: {reason}"));
    }
    // Which server (host:port) and when it last switched, when database.url lists several.
    let server = state.store.primary().map_or(String::new(), |p| {
        let s = p.status();
        let last = s.last_switch.map_or("never".into(), |t| t.to_rfc3339());
        format!(
            " (server {}, switches {}, last switch {last})",
            s.server, s.switches
        )
    });
    if problems.is_empty() {
        (
            StatusCode::OK,
            format!("ready: database ok{server}, broker ok, {assigned} partitions assigned\n"),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}{server}\n", problems.join("; ")),
        )
    }
}
