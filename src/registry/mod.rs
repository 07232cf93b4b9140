//! A small Confluent-Schema-Registry-compatible HTTP server for local runs and tests.
//!
//! Owns: global Avro schema ids, subjects with their version lists, the BACKWARD compatibility
//! check on registration, and optional persistence of all of that to one JSON file.
//!
//! Does not: support schema types other than AVRO, schema references, deletes, modes, contexts,
//! per-subject compatibility configuration (always BACKWARD), auth or TLS. It must not be used
//! as a production registry — production points at a real Confluent Schema Registry, and only
//! the REST subset that `schema_registry_converter` and ordinary Confluent clients use is served
//! here. One file must not be shared by two running registries.

mod api;
mod store;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use store::Store;

/// How the registry is run.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Where schemas and subjects live; see [`Storage`].
    pub storage: Storage,
}

/// Where registry state is kept.
#[derive(Debug, Clone)]
pub enum Storage {
    /// Nothing survives the process; for tests that want a clean registry.
    Memory,
    /// JSON file rewritten atomically on every change and loaded at start, so schema ids stay
    /// stable across restarts (records already in Kafka carry those ids).
    File(PathBuf),
}

/// Request failures, each mapped to Confluent's `{"error_code", "message"}` body.
#[derive(Debug, thiserror::Error)]
enum RegistryError {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version not found.")]
    VersionNotFound,
    #[error("Schema not found")]
    SchemaNotFound,
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    #[error("Schema being registered is incompatible with an earlier schema (BACKWARD): {0}")]
    Incompatible(String),
    #[error("Invalid request body: {0}")]
    BadRequest(String),
    #[error("HTTP 404 Not Found")]
    NoSuchEndpoint,
    #[error("Error in the backend data store: {0}")]
    Internal(String),
}

impl RegistryError {
    fn codes(&self) -> (StatusCode, u32) {
        match self {
            Self::SubjectNotFound(_) => (StatusCode::NOT_FOUND, 40401),
            Self::VersionNotFound => (StatusCode::NOT_FOUND, 40402),
            Self::SchemaNotFound => (StatusCode::NOT_FOUND, 40403),
            Self::NoSuchEndpoint => (StatusCode::NOT_FOUND, 404),
            Self::InvalidSchema(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42201),
            Self::InvalidVersion(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42202),
            Self::Incompatible(_) => (StatusCode::CONFLICT, 409),
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, 400),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, 50001),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, error_code) = self.codes();
        if status.is_server_error() {
            tracing::error!(error = %self, "schema registry request failed");
        }
        let body = serde_json::json!({ "error_code": error_code, "message": self.to_string() });
        api::reply(status, body.to_string())
    }
}

/// Serves the registry on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: RegistryConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let store = Store::open(&config.storage).await?;
    run(listener, store, shutdown).await
}

async fn run(
    listener: tokio::net::TcpListener,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "schema registry listening");
    axum::serve(listener, api::router(Arc::new(store)))
        .with_graceful_shutdown(shutdown)
        .await
        .context("schema registry server failed")
}

/// Convenience for tests/demo: binds 127.0.0.1:0, spawns serve on the current tokio runtime,
/// returns the base URL ("http://127.0.0.1:PORT") and a handle whose drop (or
/// `.shutdown().await`) stops the server.
pub async fn spawn_local(config: RegistryConfig) -> anyhow::Result<(String, RegistryHandle)> {
    // Load before spawning so a corrupt state file fails here, not inside a detached task.
    let store = Store::open(&config.storage).await?;
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run(listener, store, cancel.clone().cancelled_owned()));
    Ok((
        url,
        RegistryHandle {
            cancel,
            task: Some(task),
        },
    ))
}

/// Owns a registry started by [`spawn_local`].
#[derive(Debug)]
pub struct RegistryHandle {
    /// Cancelled on drop or [`RegistryHandle::shutdown`] so the server never outlives its owner.
    cancel: CancellationToken,
    /// Awaited by `shutdown` to surface serve errors and to guarantee the port and file are
    /// released; a plain drop just detaches it.
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RegistryHandle {
    /// Stops the server and waits until it has finished serving in-flight requests.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        match self.task.take() {
            Some(task) => task.await.context("schema registry task panicked")?,
            None => Ok(()),
        }
    }
}

impl Drop for RegistryHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
