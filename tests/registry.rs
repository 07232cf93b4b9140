//! Black-box tests of the local schema registry over HTTP, with raw requests and with
//! `schema_registry_converter`, the client payrecon uses against the real Confluent registry.

use apache_avro::types::Value as Avro;
use payrecon::registry::{RegistryConfig, RegistryHandle, Storage, spawn_local};
use reqwest::StatusCode;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};
use serde_json::{Value, json};

const CT: &str = "application/vnd.schemaregistry.v1+json";

const PAYMENT_V1: &str = r#"{"type":"record","name":"Payment","namespace":"payrecon",
  "fields":[{"name":"id","type":"string"},{"name":"amount_cents","type":"long"}]}"#;

/// v1 plus a field with a default: BACKWARD compatible.
const PAYMENT_V2: &str = r#"{"type":"record","name":"Payment","namespace":"payrecon",
  "fields":[{"name":"id","type":"string"},{"name":"amount_cents","type":"long"},
            {"name":"currency","type":"string","default":"EUR"}]}"#;

/// v1 plus a field without a default: v2-as-reader cannot read v1 data.
const PAYMENT_NO_DEFAULT: &str = r#"{"type":"record","name":"Payment","namespace":"payrecon",
  "fields":[{"name":"id","type":"string"},{"name":"amount_cents","type":"long"},
            {"name":"currency","type":"string"}]}"#;

async fn memory_registry() -> (String, RegistryHandle) {
    spawn_local(RegistryConfig {
        storage: Storage::Memory,
    })
    .await
    .expect("registry starts")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("http client")
}

fn sr_settings(url: &str) -> SrSettings {
    SrSettings::new_builder(url.to_owned())
        .no_proxy()
        .build()
        .expect("sr settings")
}

/// Sends a request and returns status plus parsed JSON body, checking the Confluent content type.
async fn call(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(
        content_type.as_deref(),
        Some(CT),
        "content type for {status}"
    );
    (status, resp.json().await.expect("json body"))
}

async fn register(url: &str, subject: &str, schema: &str) -> (StatusCode, Value) {
    call(
        http()
            .post(format!("{url}/subjects/{subject}/versions"))
            .header("content-type", CT)
            .json(&json!({ "schema": schema })),
    )
    .await
}

async fn register_id(url: &str, subject: &str, schema: &str) -> u64 {
    let (status, body) = register(url, subject, schema).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["id"].as_u64().expect("id in body")
}

async fn get(url: &str, path: &str) -> (StatusCode, Value) {
    call(http().get(format!("{url}{path}"))).await
}

fn payment(id: &str, cents: i64) -> Vec<(&'static str, Avro)> {
    vec![
        ("id", Avro::String(id.into())),
        ("amount_cents", Avro::Long(cents)),
    ]
}

fn record(fields: Vec<(&str, Avro)>) -> Avro {
    Avro::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn with_schema(topic: &str, schema: &str) -> SubjectNameStrategy {
    let supplied = SuppliedSchema::new(
        Some("payrecon.Payment".into()),
        SchemaType::Avro,
        schema.into(),
    );
    SubjectNameStrategy::TopicNameStrategyWithSchema(topic.into(), false, supplied)
}

#[tokio::test]
async fn registering_the_same_schema_twice_returns_the_same_id() {
    let (url, _registry) = memory_registry().await;
    let first = register_id(&url, "payments-value", PAYMENT_V1).await;
    // Same schema, different whitespace and attribute order: still the same schema.
    let reformatted = r#"{"namespace":"payrecon","name":"Payment","type":"record","fields":[
        {"type":"string","name":"id"},{"type":"long","name":"amount_cents"}]}"#;
    let second = register_id(&url, "payments-value", reformatted).await;
    assert_eq!((first, second), (1, 1));
    assert_eq!(
        get(&url, "/subjects/payments-value/versions").await,
        (StatusCode::OK, json!([1]))
    );
}

#[tokio::test]
async fn the_same_schema_under_another_subject_reuses_the_global_id() {
    let (url, _registry) = memory_registry().await;
    let a = register_id(&url, "a-value", PAYMENT_V1).await;
    let other = register_id(&url, "a-value", PAYMENT_V2).await;
    let b = register_id(&url, "b-value", PAYMENT_V1).await;
    assert_eq!((a, other, b), (1, 2, 1));
    assert_eq!(
        get(&url, "/subjects").await,
        (StatusCode::OK, json!(["a-value", "b-value"]))
    );
    let (status, usages) = get(&url, "/schemas/ids/1/versions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        usages,
        json!([{"subject":"a-value","version":1},{"subject":"b-value","version":1}])
    );
}

#[tokio::test]
async fn an_incompatible_schema_is_rejected_with_409() {
    let (url, _registry) = memory_registry().await;
    register_id(&url, "payments-value", PAYMENT_V1).await;

    let (status, body) = register(&url, "payments-value", PAYMENT_NO_DEFAULT).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error_code"], 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("currency"),
        "{body}"
    );
    assert_eq!(
        get(&url, "/subjects/payments-value/versions").await,
        (StatusCode::OK, json!([1]))
    );

    let check = |schema: &'static str| {
        let url = url.clone();
        async move {
            call(
                http()
                    .post(format!(
                        "{url}/compatibility/subjects/payments-value/versions/latest"
                    ))
                    .json(&json!({ "schema": schema })),
            )
            .await
        }
    };
    assert_eq!(
        check(PAYMENT_NO_DEFAULT).await,
        (StatusCode::OK, json!({"is_compatible": false}))
    );
    assert_eq!(
        check(PAYMENT_V2).await,
        (StatusCode::OK, json!({"is_compatible": true}))
    );
    assert_eq!(register_id(&url, "payments-value", PAYMENT_V2).await, 2);
    assert_eq!(
        get(&url, "/subjects/payments-value/versions").await,
        (StatusCode::OK, json!([1, 2]))
    );
}

#[tokio::test]
async fn subject_versions_can_be_read_and_looked_up() {
    let (url, _registry) = memory_registry().await;
    // Clients send subjects containing '/' percent-encoded, as schema_registry_converter does.
    let subject = "team%2Fpayments-value";
    register_id(&url, subject, PAYMENT_V1).await;
    register_id(&url, subject, PAYMENT_V2).await;

    let (status, latest) = get(&url, &format!("/subjects/{subject}/versions/latest")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            latest["subject"].clone(),
            latest["id"].clone(),
            latest["version"].clone()
        ),
        (json!("team/payments-value"), json!(2), json!(2))
    );
    assert_eq!(latest["schema"], PAYMENT_V2);
    assert_eq!(
        get(&url, &format!("/subjects/{subject}/versions/1"))
            .await
            .1["id"],
        1
    );

    let raw = http()
        .get(format!("{url}/subjects/{subject}/versions/1/schema"))
        .send()
        .await
        .expect("raw schema");
    assert_eq!(raw.status(), StatusCode::OK);
    assert_eq!(raw.text().await.expect("text"), PAYMENT_V1);

    let lookup = |subject: &'static str, schema: &'static str| {
        let url = url.clone();
        async move {
            call(
                http()
                    .post(format!("{url}/subjects/{subject}?deleted=false"))
                    .json(&json!({ "schema": schema })),
            )
            .await
        }
    };
    let (status, found) = lookup(subject, PAYMENT_V1).await;
    assert_eq!(
        (status, found["id"].clone(), found["version"].clone()),
        (StatusCode::OK, json!(1), json!(1))
    );
    let (status, missing) = lookup(subject, PAYMENT_NO_DEFAULT).await;
    assert_eq!(
        (status, missing["error_code"].clone()),
        (StatusCode::NOT_FOUND, json!(40403))
    );
    let (status, missing) = lookup("nobody-value", PAYMENT_V1).await;
    assert_eq!(
        (status, missing["error_code"].clone()),
        (StatusCode::NOT_FOUND, json!(40401))
    );

    assert_eq!(
        get(&url, &format!("/subjects/{subject}/versions/3"))
            .await
            .1["error_code"],
        40402
    );
    assert_eq!(
        get(&url, "/subjects/nobody-value/versions").await.1["error_code"],
        40401
    );
    assert_eq!(
        get(&url, &format!("/subjects/{subject}/versions/first"))
            .await
            .1["error_code"],
        42202
    );
    assert_eq!(
        get(&url, "/config").await,
        (StatusCode::OK, json!({"compatibilityLevel": "BACKWARD"}))
    );
    assert_eq!(
        get(&url, &format!("/config/{subject}")).await.1["compatibilityLevel"],
        "BACKWARD"
    );
}

#[tokio::test]
async fn an_unknown_schema_id_answers_404_with_code_40403() {
    let (url, _registry) = memory_registry().await;
    register_id(&url, "payments-value", PAYMENT_V1).await;
    let (status, body) = get(&url, "/schemas/ids/1?deleted=true&subject=x").await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({ "schema": PAYMENT_V1 }))
    );
    for path in [
        "/schemas/ids/42?deleted=true",
        "/schemas/ids/42/versions",
        "/schemas/ids/not-a-number",
    ] {
        let (status, body) = get(&url, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["error_code"], 40403, "{path}");
    }
}

#[tokio::test]
async fn invalid_or_non_avro_schemas_are_rejected_with_422() {
    let (url, _registry) = memory_registry().await;
    let (status, body) = register(&url, "x-value", r#"{"type":"record","name":"R"}"#).await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!(42201))
    );

    let post = |body: Value| {
        call(
            http()
                .post(format!("{url}/subjects/x-value/versions"))
                .json(&body),
        )
    };
    let (status, body) =
        post(json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"})).await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!(42201))
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("PROTOBUF"),
        "{body}"
    );
    let (status, body) = post(json!({"schemaType": "AVRO"})).await;
    assert_eq!(
        (status, body["error_code"].clone()),
        (StatusCode::BAD_REQUEST, json!(400))
    );
    assert_eq!(get(&url, "/subjects").await, (StatusCode::OK, json!([])));
}

#[tokio::test]
async fn ids_survive_a_restart_with_file_storage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RegistryConfig {
        storage: Storage::File(dir.path().join("state/registry.json")),
    };

    let (url, registry) = spawn_local(config.clone()).await.expect("first start");
    assert_eq!(register_id(&url, "a-value", PAYMENT_V1).await, 1);
    assert_eq!(register_id(&url, "b-value", PAYMENT_V2).await, 2);
    registry.shutdown().await.expect("clean shutdown");

    let (url, registry) = spawn_local(config).await.expect("restart");
    assert_eq!(get(&url, "/schemas/ids/2").await.1["schema"], PAYMENT_V2);
    assert_eq!(
        get(&url, "/subjects").await.1,
        json!(["a-value", "b-value"])
    );
    // Existing schemas keep their ids; new ones continue after the highest id.
    assert_eq!(register_id(&url, "c-value", PAYMENT_V1).await, 1);
    assert_eq!(register_id(&url, "c-value", PAYMENT_V2).await, 2);
    let v3 = PAYMENT_V2.replace(
        r#""default":"EUR"}"#,
        r#""default":"EUR"},{"name":"note","type":["null","string"],"default":null}"#,
    );
    assert_eq!(register_id(&url, "c-value", &v3).await, 3);
    registry.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn schema_registry_converter_round_trips_a_record() {
    let (url, _registry) = memory_registry().await;
    let encoder = AvroEncoder::new(sr_settings(&url));
    let bytes = encoder
        .encode(payment("p-1", 1999), with_schema("payments", PAYMENT_V1))
        .await
        .expect("encode");
    assert_eq!(&bytes[..5], &[0, 0, 0, 0, 1], "magic byte + schema id 1");

    let decoded = AvroDecoder::new(sr_settings(&url))
        .decode(Some(&bytes))
        .await
        .expect("decode");
    assert_eq!(decoded.value, record(payment("p-1", 1999)));
    assert_eq!(
        decoded.name.map(|n| n.fullname(None)).as_deref(),
        Some("payrecon.Payment")
    );

    // TopicNameStrategy without a schema fetches `versions/latest` of "payments-value".
    let latest = AvroEncoder::new(sr_settings(&url));
    let again = latest
        .encode(
            payment("p-1", 1999),
            SubjectNameStrategy::TopicNameStrategy("payments".into(), false),
        )
        .await
        .expect("encode latest");
    assert_eq!(again, bytes);
}

#[tokio::test]
async fn a_record_written_with_v1_still_decodes_after_v2_is_registered() {
    let (url, _registry) = memory_registry().await;
    // Each encoder caches its schema per subject, so each schema version gets its own encoder.
    let v1_bytes = AvroEncoder::new(sr_settings(&url))
        .encode(payment("p-1", 500), with_schema("payments", PAYMENT_V1))
        .await
        .expect("encode v1");

    let mut v2_fields = payment("p-2", 700);
    v2_fields.push(("currency", Avro::String("USD".into())));
    let v2_bytes = AvroEncoder::new(sr_settings(&url))
        .encode(v2_fields.clone(), with_schema("payments", PAYMENT_V2))
        .await
        .expect("encode v2");
    assert_eq!(
        (v1_bytes[4], v2_bytes[4]),
        (1, 2),
        "schema ids embedded in the payloads"
    );
    assert_eq!(
        get(&url, "/subjects/payments-value/versions").await.1,
        json!([1, 2])
    );

    let decoder = AvroDecoder::new(sr_settings(&url));
    assert_eq!(
        decoder
            .decode(Some(&v1_bytes))
            .await
            .expect("decode v1")
            .value,
        record(payment("p-1", 500))
    );
    assert_eq!(
        decoder
            .decode(Some(&v2_bytes))
            .await
            .expect("decode v2")
            .value,
        record(v2_fields)
    );
}

#[tokio::test]
async fn schemas_differing_only_in_a_logical_type_get_different_ids() {
    let (url, _registry) = memory_registry().await;
    let plain = r#"{"type":"record","name":"T","fields":[{"name":"at","type":"long"}]}"#;
    let timestamp = r#"{"type":"record","name":"T","fields":[{"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;
    assert_eq!(register_id(&url, "plain-value", plain).await, 1);
    assert_eq!(register_id(&url, "ts-value", timestamp).await, 2);
}

#[tokio::test]
async fn the_project_schemas_register_and_are_served_verbatim() {
    let (url, _registry) = memory_registry().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("schemas dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let files: Vec<_> = files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "avsc"))
        .collect();
    assert!(!files.is_empty(), "no .avsc files in {}", dir.display());
    for (n, file) in files.iter().enumerate() {
        let schema = std::fs::read_to_string(file).expect("schema file");
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("file name");
        let id = register_id(&url, &format!("{stem}-value"), &schema).await;
        assert_eq!(id, n as u64 + 1, "{}", file.display());
        assert_eq!(
            get(&url, &format!("/schemas/ids/{id}")).await.1,
            json!({ "schema": schema })
        );
    }
}

// --- A secured registry: credentials and TLS through payrecon's `[registry]` settings ---

#[path = "support/registry_gate.rs"]
mod registry_gate;

use payrecon::app::{RegistryProblem, probe_registry};
use registry_gate::{Gate, TestPki, TlsRegistry, basic};

/// Default settings pointed at `url`.
fn settings_for(url: &str) -> payrecon::config::Settings {
    let mut s = payrecon::config::Settings::load_from(None, Vec::new()).unwrap();
    s.registry.url = url.to_owned();
    s
}

#[test]
fn the_test_basic_auth_encoding_is_rfc_7617s() {
    assert_eq!(
        basic("Aladdin", "open sesame"),
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    );
}

/// Registers payrecon's schemas and decodes a record through `settings`' client: the whole
/// path the service takes, every request authorized.
async fn round_trip(settings: &payrecon::config::Settings) {
    let sr = settings.registry.client().unwrap();
    let encoder = payrecon::inputs::Encoder::register(&sr, "pay", "settle")
        .await
        .unwrap();
    let (records, _) = payrecon::tools::simulate::generate(
        &payrecon::tools::simulate::SimulationOptions {
            payments: 1,
            malformed: 0,
            ..Default::default()
        },
        encoder.payment_schema_id(),
    )
    .unwrap();
    let payment = records
        .iter()
        .find_map(|r| match r {
            payrecon::tools::simulate::Generated::Payment(p) => Some(p),
            _ => None,
        })
        .expect("a payment");
    let bytes = encoder.encode_payment(payment).unwrap();
    let codec = payrecon::inputs::Decoder::new(settings.registry.client().unwrap());
    let decoded = codec
        .decode(
            payrecon::codec::Stream::Payments,
            Some(&bytes),
            Some(payment.event_time),
        )
        .await
        .unwrap();
    assert!(matches!(decoded, payrecon::domain::Record::Payment(_)));
}

#[tokio::test]
async fn basic_auth_credentials_are_sent_with_every_registry_request() {
    let gate = Gate::start(&basic("SR-KEY", "Sr-Sekr1t")).await;
    let mut s = settings_for(&gate.url);
    s.registry.username = Some("SR-KEY".into());
    s.registry.password = Some("Sr-Sekr1t".to_owned().into());
    probe_registry(&s).await.unwrap();
    round_trip(&s).await;
    let headers = gate.headers();
    assert!(
        headers.len() >= 4,
        "probe, two registrations, a lookup: {headers:?}"
    );
    assert!(
        headers
            .iter()
            .all(|h| h.as_deref() == Some(basic("SR-KEY", "Sr-Sekr1t").as_str())),
        "{headers:?}"
    );
}

#[tokio::test]
async fn a_bearer_token_is_sent_with_every_registry_request() {
    let gate = Gate::start("Bearer Tok-Sekr1t").await;
    let mut s = settings_for(&gate.url);
    s.registry.token = Some("Tok-Sekr1t".to_owned().into());
    probe_registry(&s).await.unwrap();
    round_trip(&s).await;
    let headers = gate.headers();
    assert!(headers.len() >= 4, "{headers:?}");
    assert!(
        headers
            .iter()
            .all(|h| h.as_deref() == Some("Bearer Tok-Sekr1t")),
        "{headers:?}"
    );
}

#[tokio::test]
async fn a_refused_credential_is_a_permanent_error_naming_the_registry_without_any_secret() {
    let gate = Gate::start(&basic("SR-KEY", "Right-Sekr1t")).await;
    // A credential in the URL too: the message shows the URL redacted.
    let url = gate.url.replace("http://", "http://url-user:Url-Sekr1t@");
    for (user, password, token) in [
        (Some("SR-KEY"), Some("Wrong-Sekr1t"), None),
        (None, None, Some("Wrong-Sekr1t")),
        (None, None, None),
    ] {
        let mut s = settings_for(&url);
        s.registry.username = user.map(str::to_owned);
        s.registry.password = password.map(|p| p.to_owned().into());
        s.registry.token = token.map(|t| t.to_owned().into());
        let err = probe_registry(&s).await.unwrap_err();
        let RegistryProblem::Refused(message) = &err else {
            panic!("a 401 must end start-up, not be waited for: {err}");
        };
        assert!(
            message.contains("refused the credentials (HTTP 401)"),
            "{message}"
        );
        let host = gate.url.trim_start_matches("http://");
        assert!(message.contains(&format!("http://***@{host}")), "{message}");
        assert!(
            !message.contains("Sekr1t") && !message.contains("url-user"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn a_registry_that_does_not_answer_is_waited_for_not_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = settings_for(&format!("http://127.0.0.1:{port}"));
    let err = probe_registry(&s).await.unwrap_err();
    assert!(matches!(err, RegistryProblem::Unavailable(_)), "{err}");
}

#[tokio::test]
async fn mutual_tls_with_a_private_ca_works_and_each_missing_piece_is_refused() {
    let pki = TestPki::new();
    let server = TlsRegistry::start(&pki);
    let mut s = settings_for(&server.url);
    s.registry.ca_location = Some(pki.path("ca.pem"));
    s.registry.certificate_location = Some(pki.path("client.pem"));
    s.registry.key_location = Some(pki.path("client.p8"));
    probe_registry(&s).await.expect("CA and client certificate");

    // Without the client certificate the server ends the handshake.
    let mut no_client_cert = s.clone();
    no_client_cert.registry.certificate_location = None;
    no_client_cert.registry.key_location = None;
    // Without the private CA the server's certificate is not trusted.
    let mut no_ca = s.clone();
    no_ca.registry.ca_location = None;
    for (what, settings) in [("no client certificate", no_client_cert), ("no CA", no_ca)] {
        let err = probe_registry(&settings).await.unwrap_err();
        let RegistryProblem::Refused(message) = &err else {
            panic!("{what}: a TLS refusal must end start-up: {err}");
        };
        assert!(
            message.contains("TLS with the schema registry"),
            "{what}: {message}"
        );
    }

    // A key that is not PKCS#8 PEM is refused when the client is built, naming both files.
    let mut bad_key = s.clone();
    bad_key.registry.key_location = Some(pki.path("ca.pem"));
    let err = bad_key.registry.client().unwrap_err().to_string();
    assert!(
        err.contains("registry.key_location") && err.contains("ca.pem"),
        "{err}"
    );
}
