//! The operations endpoint: `/metrics` (Prometheus), `/health/live`, `/health/ready`.

use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::kafka::Assignment;
use crate::store::Store;

/// What the handlers need.
#[derive(Clone)]
pub struct OpsState {
    /// Renders the process-wide Prometheus registry.
    pub metrics: Option<PrometheusHandle>,
    /// Readiness needs a database that answers.
    pub store: Store,
    /// Readiness reports assigned partitions.
    pub assignment: Arc<Mutex<Assignment>>,
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

async fn ready(State(state): State<OpsState>) -> (StatusCode, String) {
    let db = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(state.store.pool())
        .await;
    let assigned = state
        .assignment
        .lock()
        .map(|a| a.partitions.len())
        .unwrap_or(0);
    match db {
        Ok(_) => (
            StatusCode::OK,
            format!("ready: database ok, {assigned} partitions assigned\n"),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: database: {e}\n"),
        ),
    }
}
