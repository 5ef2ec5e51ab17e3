//! HTTPS served by `conch serve` itself: a real TLS client (reqwest, and
//! tokio-rustls under the WebSocket) that trusts only the test's
//! certificate, for the API, the page's cookies and the console's socket;
//! the certificate files reloaded when they change; `--tls-self-signed`
//! with `conch exec --ca-file`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::start_server;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn provider() {
    common::tls_provider();
}

/// A certificate for 127.0.0.1 and localhost, written as PEM files.
fn certificate(dir: &std::path::Path, stem: &str) -> (String, String, CertificateDer<'static>) {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
        made.cert.der().clone(),
    )
}

fn client(cert: &CertificateDer<'static>) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_der(cert).unwrap()])
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The certificate the server presents now (read by a client that accepts
/// any, since the point is to see which).
async fn presented(addr: std::net::SocketAddr) -> CertificateDer<'static> {
    #[derive(Debug)]
    struct Any(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn the_api_the_cookies_and_the_console_over_https() {
    provider();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = certificate(dir.path(), "server");
    let server = start_server(&["--tls-cert", &cert, "--tls-key", &key], &[]);
    let base = format!("https://127.0.0.1:{}", server.addr.port());
    let c = client(&der);

    // The REST API, with HSTS.
    let resp = c
        .post(format!("{base}/api/v1/exec"))
        .bearer_auth(&server.token)
        .json(&json!({"command": "echo over-tls"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["strict-transport-security"],
        "max-age=31536000"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["stdout"], "over-tls\n");

    // Login: the session cookie is __Host- and Secure.
    let resp = c
        .post(format!("{base}/login"))
        .form(&[("token", server.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("__Host-conch_session="), "{set}");
    assert!(set.contains("Secure"), "{set}");
    let cookie = set.split(';').next().unwrap().to_owned();

    // The console's WebSocket over TLS (wss), with the page's Origin.
    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                roots.add(der.clone()).unwrap();
                roots
            })
            .with_no_client_auth(),
    ));
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let stream = tls
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let mut req = format!("wss://127.0.0.1:{}/ws", server.addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    req.headers_mut().insert("origin", base.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    ws.send(Message::text(
        json!({"type": "exec", "id": 1, "cmd": "echo wss"}).to_string(),
    ))
    .await
    .unwrap();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.len() > 5 => out.extend_from_slice(&b[5..]),
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"exit\"") => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("the console ended early: {other:?}"),
        }
    }
    assert_eq!(out, b"wss\n");

    // Plain HTTP on the HTTPS port gets nothing served.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", server.addr.port()))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
}

#[tokio::test]
async fn a_client_that_stalls_its_tls_handshake_is_dropped_and_holds_up_nobody() {
    provider();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = certificate(dir.path(), "server");
    let server = start_server(
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--header-timeout-ms",
            "500",
        ],
        &[],
    );
    // Connected, never a byte of ClientHello.
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Others are served meanwhile.
    let resp = client(&der)
        .get(format!("https://127.0.0.1:{}/healthz", server.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // And the stalled one is closed by the header deadline (bounded wait).
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut buf))
        .await
        .expect("closed within the deadline");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn changed_certificate_files_are_served_without_a_restart() {
    provider();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, first) = certificate(dir.path(), "server");
    let server = start_server(&["--tls-cert", &cert, "--tls-key", &key], &[]);
    assert_eq!(presented(server.addr).await, first);
    // A renewal: new files written over the old (as certbot's hooks do).
    let (new_cert, new_key, second) = certificate(dir.path(), "renewed");
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    // Checked every 5 s: wait (bounded) for the new one.
    for _ in 0..300 {
        if presented(server.addr).await == second {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the renewed certificate was never served");
}

#[tokio::test]
async fn a_self_signed_server_is_reached_by_conch_exec_trusting_its_certificate() {
    provider();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let server = start_server(&["--tls-self-signed", "--data-dir", &data_dir], &[]);
    let pem = data.path().join("tls-self-signed.pem");
    assert!(
        pem.exists(),
        "the public certificate is written for clients"
    );
    let written = std::fs::read_to_string(&pem).unwrap();
    assert!(
        written.contains("BEGIN CERTIFICATE") && !written.contains("PRIVATE KEY"),
        "only the public certificate is written: {written}"
    );
    let base = format!("https://127.0.0.1:{}", server.addr.port());
    let exec = |ca: Option<&std::path::Path>| {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.args(["exec", "--server", &base])
            .env("CONCH_TOKEN", &server.token);
        if let Some(ca) = ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.args(["--", "exit 7"]).output().unwrap()
    };
    let out = exec(Some(&pem));
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    // Without trusting it, the connection is refused: conch exits 255.
    let out = exec(None);
    assert_eq!(out.status.code(), Some(255), "{out:?}");

    // The container health check probes over HTTPS when told to (by flag,
    // or the server's own CONCH_TLS_* environment).
    let listen = server.addr.to_string();
    let probe = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.args(["healthcheck", "--listen", &listen]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap().status.success()
    };
    assert!(probe(&["--https"], &[]));
    assert!(probe(&[], &[("CONCH_TLS_SELF_SIGNED", "1")]));
    assert!(!probe(&[], &[]), "plain HTTP finds no health here");
}
