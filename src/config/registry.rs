//! `[registry]`: the Schema Registry, its credentials and TLS, and the client built from them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::SrSettings;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::redact::{error_chain, redact_text, redact_url};

/// The Schema Registry and how payrecon authenticates to it. `Debug` never shows a secret
/// (`SecretString`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySettings {
    pub url: String,
    /// Bounds each registry request so an unresponsive registry is a retry, not a hang.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP basic auth user (Confluent Cloud: the Schema Registry API key); needs `password`.
    #[serde(default)]
    pub username: Option<String>,
    /// HTTP basic auth password (Confluent Cloud: the API secret).
    #[serde(default)]
    pub password: Option<SecretString>,
    /// A file holding `password`, read at start-up (one trailing newline trimmed).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A bearer token sent as `Authorization: Bearer ...` (instead of basic auth).
    #[serde(default)]
    pub token: Option<SecretString>,
    /// A file holding `token`, read at start-up (one trailing newline trimmed).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA certificate(s) the registry's certificate must chain to; when set,
    /// only these are trusted (not the system store).
    #[serde(default)]
    pub ca_location: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `key_location`.
    #[serde(default)]
    pub certificate_location: Option<PathBuf>,
    /// Its private key: PEM, PKCS#8, unencrypted (`openssl pkcs8 -topk8 -nocrypt`).
    #[serde(default)]
    pub key_location: Option<PathBuf>,
}

impl RegistrySettings {
    /// Combinations that cannot work, refused at start-up.
    pub(super) fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.username.is_some() == self.password.is_some(),
            "invalid configuration: registry basic auth needs both registry.username and \
             registry.password (or registry.password_file)"
        );
        anyhow::ensure!(
            !(self.username.is_some() && self.token.is_some()),
            "invalid configuration: registry.token and registry.username/password are both set; \
             a request carries one Authorization header: set only one"
        );
        anyhow::ensure!(
            self.certificate_location.is_some() == self.key_location.is_some(),
            "invalid configuration: a registry client certificate needs both \
             registry.certificate_location and registry.key_location"
        );
        Ok(())
    }

    /// The registry client's settings: URL, request timeout, credentials, CA and client
    /// certificate, through `schema_registry_converter`'s own builder (its `build_with` takes
    /// the TLS configuration as a reqwest client builder). Errors name the setting and the
    /// file, never a credential.
    pub fn client(&self) -> anyhow::Result<SrSettings> {
        let mut builder = SrSettings::new_builder(self.url.clone());
        builder.set_timeout(self.request_timeout);
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            builder.set_basic_authorization(user, Some(password.expose_secret()));
        }
        if let Some(token) = &self.token {
            builder.set_token_authorization(token.expose_secret());
        }
        let mut tls = reqwest::Client::builder();
        if let Some(path) = &self.ca_location {
            let pem = read_file("registry.ca_location", path)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "invalid configuration: registry.ca_location ({}) holds no PEM certificate",
                        path.display()
                    )
                })?;
            tls = tls.tls_certs_only(certs);
        }
        if let (Some(cert), Some(key)) = (&self.certificate_location, &self.key_location) {
            let cert_pem = read_file("registry.certificate_location", cert)?;
            let key_pem = read_file("registry.key_location", key)?;
            // native-tls's error describes the parse failure, not the bytes.
            let identity = reqwest::Identity::from_pkcs8_pem(&cert_pem, &key_pem).map_err(|e| {
                anyhow::anyhow!(
                    "invalid configuration: registry.certificate_location ({}) and registry.key_location ({}) \
                     are not a PEM certificate and an unencrypted PKCS#8 PEM key: {}",
                    cert.display(),
                    key.display(),
                    redact_text(&error_chain(&e))
                )
            })?;
            tls = tls.identity(identity);
        }
        builder.build_with(tls).map_err(|e| {
            anyhow::anyhow!(
                "invalid configuration: cannot build the schema registry client for {}: {}",
                redact_url(&self.url),
                redact_text(&e.to_string())
            )
        })
    }
}

/// Reads a (non-secret) file given as setting `key`; the error names both.
fn read_file(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration: cannot read {key} ({}): {e}",
            path.display()
        )
    })
}
