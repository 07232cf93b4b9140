//! HTTP routes: Confluent REST paths, bodies and status codes mapped onto [`Store`].

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::RegistryError;
use super::store::{Parsed, Store, VersionInfo, VersionSel};

/// Content type Confluent answers with; clients accept it as JSON.
const SR_CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

type Shared = State<Arc<Store>>;
type Reply = Result<Response, RegistryError>;

pub(super) fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/", get(|| async { ok(json!({})) }))
        .route("/config", get(config))
        .route("/config/{subject}", get(config))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/versions", get(usages_of_id))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(raw_schema),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatibility),
        )
        .fallback(|| async { RegistryError::NoSuchEndpoint })
        .with_state(store)
}

pub(super) fn reply(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, SR_CONTENT_TYPE)], body).into_response()
}

fn ok(body: Value) -> Reply {
    Ok(reply(StatusCode::OK, body.to_string()))
}

/// Body of register / lookup / compatibility requests. Unknown fields (`metadata`, `ruleSet`,
/// ...) are ignored, as are query parameters such as `?deleted=true` or `?normalize=true`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaRequest {
    schema: String,
    schema_type: Option<String>,
    references: Option<Vec<Value>>,
}

impl SchemaRequest {
    /// Accepts any content type (Confluent's vnd type, `application/json`, or none) and checks
    /// the parts this registry does not support before parsing the schema itself.
    fn parse(body: &[u8]) -> Result<(Self, Parsed), RegistryError> {
        let req: Self =
            serde_json::from_slice(body).map_err(|e| RegistryError::BadRequest(e.to_string()))?;
        if let Some(kind) = req
            .schema_type
            .as_deref()
            .filter(|t| !t.eq_ignore_ascii_case("AVRO"))
        {
            return Err(RegistryError::InvalidSchema(format!(
                "schemaType {kind} is not supported by this registry; only AVRO is"
            )));
        }
        if req.references.as_ref().is_some_and(|r| !r.is_empty()) {
            return Err(RegistryError::InvalidSchema(
                "schema references are not supported by this registry".into(),
            ));
        }
        let parsed = Parsed::new(&req.schema)?;
        Ok((req, parsed))
    }
}

fn parse_id(raw: &str) -> Result<u32, RegistryError> {
    raw.parse().map_err(|_| RegistryError::SchemaNotFound)
}

fn version_json(subject: &str, v: &VersionInfo<'_>) -> Value {
    json!({ "subject": subject, "version": v.version, "id": v.id, "schema": v.schema })
}

async fn config() -> Reply {
    ok(json!({ "compatibilityLevel": "BACKWARD" }))
}

async fn schema_by_id(State(store): Shared, Path(id): Path<String>) -> Reply {
    let state = store.read().await;
    // `schemaType` is omitted for AVRO, as Confluent does.
    ok(json!({ "schema": state.schema(parse_id(&id)?)? }))
}

async fn usages_of_id(State(store): Shared, Path(id): Path<String>) -> Reply {
    let state = store.read().await;
    let usages = state.usages(parse_id(&id)?)?;
    let list: Vec<Value> = usages
        .iter()
        .map(|(s, v)| json!({ "subject": s, "version": v }))
        .collect();
    ok(Value::Array(list))
}

async fn subjects(State(store): Shared) -> Reply {
    ok(json!(store.read().await.subjects().collect::<Vec<_>>()))
}

async fn versions(State(store): Shared, Path(subject): Path<String>) -> Reply {
    ok(json!(store.read().await.versions(&subject)?))
}

async fn version(State(store): Shared, Path((subject, version)): Path<(String, String)>) -> Reply {
    let sel = VersionSel::parse(&version)?;
    let state = store.read().await;
    ok(version_json(&subject, &state.version(&subject, sel)?))
}

async fn raw_schema(
    State(store): Shared,
    Path((subject, version)): Path<(String, String)>,
) -> Reply {
    let sel = VersionSel::parse(&version)?;
    let state = store.read().await;
    Ok(reply(
        StatusCode::OK,
        state.version(&subject, sel)?.schema.to_owned(),
    ))
}

async fn register(State(store): Shared, Path(subject): Path<String>, body: Bytes) -> Reply {
    let (req, parsed) = SchemaRequest::parse(&body)?;
    let registered = store.register(&subject, &req.schema, &parsed).await?;
    tracing::debug!(
        subject = %subject,
        id = registered.id,
        version = registered.version,
        created = registered.created,
        "schema registration"
    );
    ok(json!({ "id": registered.id }))
}

async fn lookup(State(store): Shared, Path(subject): Path<String>, body: Bytes) -> Reply {
    let (_, parsed) = SchemaRequest::parse(&body)?;
    let state = store.read().await;
    ok(version_json(&subject, &state.lookup(&subject, &parsed)?))
}

async fn compatibility(
    State(store): Shared,
    Path((subject, version)): Path<(String, String)>,
    body: Bytes,
) -> Reply {
    let sel = VersionSel::parse(&version)?;
    let (_, parsed) = SchemaRequest::parse(&body)?;
    let state = store.read().await;
    let is_compatible = match state.check_backward(&subject, sel, &parsed) {
        Ok(()) => true,
        Err(RegistryError::Incompatible(reason)) => {
            tracing::debug!(subject = %subject, %reason, "compatibility check failed");
            false
        }
        Err(e) => return Err(e),
    };
    ok(json!({ "is_compatible": is_compatible }))
}
