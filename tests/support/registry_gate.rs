//! Test doubles for a secured Schema Registry, shared by `tests/registry.rs` and `tests/it`:
//! - [`Gate`]: an HTTP front on 127.0.0.1 that demands one `Authorization` header value,
//!   answers anything else with Confluent's 401, forwards the rest to an embedded registry, and
//!   records every header it received;
//! - [`TlsRegistry`]: an HTTPS server that demands a client certificate signed by a test CA
//!   (certificates made with the `openssl` command) and answers the version-list request.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

const CT: &str = "application/vnd.schemaregistry.v1+json";

/// A registry behind an authorization check.
pub struct Gate {
    /// Where clients connect.
    pub url: String,
    /// Every `Authorization` header received, in order (`None`: the request had none).
    pub seen: Arc<Mutex<Vec<Option<String>>>>,
    /// Keeps the registry behind the gate alive.
    _registry: payrecon::registry::RegistryHandle,
}

struct GateState {
    inner: String,
    expected: String,
    seen: Arc<Mutex<Vec<Option<String>>>>,
    http: reqwest::Client,
}

impl Gate {
    /// A fresh in-memory registry that only answers requests carrying `expected` as their
    /// `Authorization` header.
    pub async fn start(expected: &str) -> Gate {
        let (inner, registry) =
            payrecon::registry::spawn_local(payrecon::registry::RegistryConfig {
                storage: payrecon::registry::Storage::Memory,
            })
            .await
            .expect("registry starts");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(GateState {
            inner,
            expected: expected.to_owned(),
            seen: seen.clone(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        });
        let app = axum::Router::new().fallback(forward).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Gate {
            url,
            seen,
            _registry: registry,
        }
    }

    /// The `Authorization` headers received so far.
    pub fn headers(&self) -> Vec<Option<String>> {
        self.seen.lock().unwrap().clone()
    }
}

async fn forward(State(gate): State<Arc<GateState>>, request: Request) -> Response {
    let auth = (request.headers().get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    gate.seen.lock().unwrap().push(auth.clone());
    if auth.as_deref() != Some(gate.expected.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, CT)],
            r#"{"error_code":40101,"message":"Unauthorized"}"#,
        )
            .into_response();
    }
    let method = request.method().clone();
    let path = (request.uri().path_and_query())
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap();
    let mut call = gate
        .http
        .request(method, format!("{}{path}", gate.inner))
        .body(body);
    if let Some(ct) = content_type {
        call = call.header(header::CONTENT_TYPE, ct);
    }
    let answer = call.send().await.unwrap();
    let status = answer.status();
    let content_type = (answer.headers().get(header::CONTENT_TYPE))
        .cloned()
        .unwrap_or(header::HeaderValue::from_static(CT));
    let bytes = answer.bytes().await.unwrap();
    (status, [(header::CONTENT_TYPE, content_type)], bytes).into_response()
}

/// Certificates for one test: a CA, a server certificate for 127.0.0.1 and a client
/// certificate with its PKCS#8 key, all signed by the CA; PEM files in a temporary directory.
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("the openssl command (Debian package openssl) makes the test certificates");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let mut ca = vec![
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=payrecon test CA",
        ];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        run(&ca);
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        for (name, ext) in [("server", Some("server.ext")), ("client", None)] {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            let mut req = vec!["req", "-nodes", "-subj"];
            req.push(if name == "server" {
                "/CN=127.0.0.1"
            } else {
                "/CN=payrecon"
            });
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr]);
            run(&req);
            let mut sign = vec![
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
            ];
            if let Some(ext) = ext {
                sign.extend(["-extfile", ext]);
            }
            run(&sign);
        }
        // The client key as PKCS#8 (what registry.key_location takes).
        run(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "client.key",
            "-out",
            "client.p8",
        ]);
        TestPki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// An HTTPS "registry" that requires a client certificate signed by the test CA and answers
/// every request with `200 [1]` (the version list of a subject).
pub struct TlsRegistry {
    pub url: String,
}

impl TlsRegistry {
    pub fn start(pki: &TestPki) -> TlsRegistry {
        use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        acceptor
            .set_private_key_file(pki.path("server.key"), SslFiletype::PEM)
            .unwrap();
        acceptor
            .set_certificate_chain_file(pki.path("server.pem"))
            .unwrap();
        acceptor.set_ca_file(pki.path("ca.pem")).unwrap();
        acceptor.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        let acceptor = Arc::new(acceptor.build());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let acceptor = acceptor.clone();
                std::thread::spawn(move || {
                    let Ok(mut tls) = acceptor.accept(stream) else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).unwrap_or(0) == 1 {
                        head.push(byte[0]);
                    }
                    let body = "[1]";
                    let _ = write!(
                        tls,
                        "HTTP/1.1 200 OK\r\nContent-Type: {CT}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.shutdown();
                });
            }
        });
        TlsRegistry { url }
    }
}

/// Basic auth header value for `user:password`.
pub fn basic(user: &str, password: &str) -> String {
    use std::fmt::Write as _;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{password}");
    let bytes = input.as_bytes();
    let mut out = String::from("Basic ");
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let _ = out.write_char(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
