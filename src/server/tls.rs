//! HTTPS (and WSS) served by conch itself: a certificate and key from PEM
//! files, reloaded when they change (a renewed certificate takes effect
//! without a restart), or a self-signed certificate made at start for the
//! listen address, whose SHA-256 fingerprint is printed beside the login
//! URL. HTTP/2 is offered by ALPN; browsers open WebSockets over HTTP/1.1.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::transport::tls::{provider, self_signed};

/// How often the certificate files are checked for a change.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub enum WebTlsSource {
    /// PEM files: the certificate chain, and its private key.
    Files { cert: PathBuf, key: PathBuf },
    /// Made at start for these names and addresses; never written to disk.
    SelfSigned { names: Vec<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum WebTlsError {
    #[error("cannot read the certificate file {path}: {message}")]
    Cert { path: PathBuf, message: String },
    #[error("cannot read the key file {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the certificate and key do not go together: {0}")]
    Pair(rustls::Error),
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, WebTlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| WebTlsError::Cert {
            path: cert.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(WebTlsError::Cert {
            path: cert.to_owned(),
            message: "no certificate in it".into(),
        });
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| WebTlsError::Key {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| WebTlsError::Key {
            path: key.to_owned(),
            message: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(WebTlsError::Pair)?;
    Ok(certified)
}

/// The SHA-256 fingerprint of a certificate, as `AB:CD:...`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The certificate in use, swapped when its files change.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The server's TLS: an acceptor, and the fingerprint of what it serves
/// now (for the start-up message).
#[derive(Clone)]
pub struct WebTls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    pub(crate) fingerprint: String,
    /// A self-signed certificate's PEM (public), for clients to trust.
    pub(crate) self_signed_pem: Option<String>,
}

impl std::fmt::Debug for WebTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WebTls({})", self.fingerprint)
    }
}

impl WebTls {
    /// Loads (or makes) the certificate; with files, a task watches them
    /// until `shutdown` and swaps in a changed pair that loads cleanly (a
    /// broken one is logged and the current one kept).
    pub fn start(
        source: &WebTlsSource,
        shutdown: CancellationToken,
    ) -> Result<WebTls, WebTlsError> {
        let mut self_signed_pem = None;
        let certified = match source {
            WebTlsSource::Files { cert, key } => load(cert, key)?,
            WebTlsSource::SelfSigned { names } => {
                let (cert, key, pem) = self_signed(names.clone())
                    .map_err(|e| WebTlsError::SelfSigned(e.to_string()))?;
                let signing = provider()
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| WebTlsError::SelfSigned(e.to_string()))?;
                self_signed_pem = Some(pem);
                CertifiedKey::new(vec![cert], signing)
            }
        };
        let fingerprint = fingerprint(&certified.cert[0]);
        let current = Arc::new(Current(RwLock::new(Arc::new(certified))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if let WebTlsSource::Files { cert, key } = source {
            tokio::spawn(watch(cert.clone(), key.clone(), current, shutdown));
        }
        Ok(WebTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            fingerprint,
            self_signed_pem,
        })
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

async fn watch(cert: PathBuf, key: PathBuf, current: Arc<Current>, shutdown: CancellationToken) {
    let mut seen = (modified(&cert), modified(&key));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        let (c, k) = (cert.clone(), key.clone());
        match tokio::task::spawn_blocking(move || load(&c, &k)).await {
            Ok(Ok(certified)) => {
                let print = fingerprint(&certified.cert[0]);
                *current.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
                seen = now;
                tracing::info!(fingerprint = %print, "TLS certificate reloaded");
            }
            Ok(Err(e)) => {
                // Half-written files during a renewal: try again next time.
                tracing::warn!(error = %e, "the changed TLS files do not load; keeping the current certificate");
            }
            Err(_) => {}
        }
    }
}
