//! TLS 1.3 on the agent link, with no certificate authority.
//!
//! The agent presents an ephemeral self-signed certificate made at start;
//! the client accepts any certificate whose key signed the handshake. That
//! alone would let a relay in the middle terminate TLS on both sides, so the
//! pre-shared key is bound to the TLS session instead: both MACs of the
//! handshake cover the session's exporter value (RFC 9266 `tls-exporter`,
//! RFC 8446 section 7.5), which differs on the two halves of a relayed
//! connection. A relay that does not hold the key cannot compute either
//! MAC for its own sessions, so the handshake fails and nothing is sent.
//! `docs/protocol.md` gives the reasoning in full.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

/// RFC 9266: the exporter label of the `tls-exporter` channel binding.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-Channel-Binding";
/// RFC 9266: 32 bytes, with an empty context.
pub const EXPORTER_LEN: usize = 32;

/// The name the client asks for (SNI) and the certificate carries. It
/// identifies nothing: the key does.
const SERVER_NAME: &str = "conch-agent";

/// Why TLS could not be set up or completed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot make the agent's TLS certificate: {0}")]
    Certificate(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
}

/// The session's channel binding (RFC 9266 `tls-exporter`), taken once the
/// TLS handshake is complete.
fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; EXPORTER_LEN], TlsError> {
    Ok(conn.export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, Some(b""))?)
}

/// The one TLS implementation of conch's links (agent, web).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate for `names`, made in memory: its DER, its
/// private key, and its PEM (public, for clients to trust).
pub(crate) fn self_signed(
    names: Vec<String>,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>, String), rcgen::Error> {
    let made = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    Ok((made.cert.der().clone(), key, made.cert.pem()))
}

/// The agent's side: accepts TLS 1.3 with a certificate made for this
/// process alone (never written to disk).
#[derive(Clone)]
pub struct Acceptor(tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acceptor(TLS 1.3, ephemeral certificate)")
    }
}

impl Acceptor {
    pub fn ephemeral() -> Result<Acceptor, TlsError> {
        let (cert, key, _) = self_signed(vec![SERVER_NAME.to_owned()])
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        // No resumption: every connection runs a full handshake and
        // presents the certificate, and strangers fill no session cache.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Acceptor(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }

    /// Runs the TLS handshake on `stream`; the channel binding with it.
    pub async fn accept<S>(
        &self,
        stream: S,
    ) -> Result<(tokio_rustls::server::TlsStream<S>, [u8; EXPORTER_LEN]), TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = self.0.accept(stream).await.map_err(TlsError::Handshake)?;
        let binding = binding(tls.get_ref().1)?;
        Ok((tls, binding))
    }
}

/// The client's side: TLS 1.3, any certificate that signed the handshake.
#[derive(Clone)]
pub struct Connector(tokio_rustls::TlsConnector);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector(TLS 1.3, key-bound)")
    }
}

impl Connector {
    pub fn new() -> Result<Connector, TlsError> {
        let provider = provider();
        let verifier = Arc::new(KeyBoundVerifier(provider.clone()));
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Connector(tokio_rustls::TlsConnector::from(Arc::new(
            config,
        ))))
    }

    /// Runs the TLS handshake on `stream`; the channel binding with it.
    pub async fn connect<S>(
        &self,
        stream: S,
    ) -> Result<(tokio_rustls::client::TlsStream<S>, [u8; EXPORTER_LEN]), TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
        let tls = self
            .0
            .connect(name, stream)
            .await
            .map_err(TlsError::Handshake)?;
        let binding = binding(tls.get_ref().1)?;
        Ok((tls, binding))
    }
}

/// Accepts any certificate, but still checks that its key signed the
/// handshake. Who the agent is, the pre-shared key proves, bound to this
/// session by the exporter (see the module's documentation).
#[derive(Debug)]
struct KeyBoundVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for KeyBoundVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Never reached: only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
