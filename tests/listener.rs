//! The main listener: TLS, and clients that are slow to send their headers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

#[tokio::test]
async fn tls_listener_serves_http1_and_http2() {
    let mock = Mock::start();
    let config = config(&mock).replace(
        "shutdown_grace = \"10s\"",
        &format!(
            "shutdown_grace = \"10s\"\n[server.tls]\ncert_file = \"{FIXTURES}/tls-cert.pem\"\nkey_file = \"{FIXTURES}/tls-key.pem\""
        ),
    );
    let proxy = Proxy::start(&config);

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(format!("{FIXTURES}/tls-cert.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    for http2 in [false, true] {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only();
        // ALPN decides: offer only http/1.1, or only h2.
        let mut client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
        let client = if http2 {
            client
                .http2_only(true)
                .build::<_, Full<Bytes>>(builder.enable_http2().build())
        } else {
            client.build::<_, Full<Bytes>>(builder.enable_http1().build())
        };
        let url = format!("https://localhost:{}/openai/v1/models", proxy.addr.port());
        let req = request(
            "GET",
            &url,
            &[("authorization", &bearer(KEY_A))],
            Bytes::new(),
        );
        let response = client.request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        let want = if http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(response.version(), want);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(json(&body)["object"], "list");
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_dropped() {
    let mock = Mock::start();
    let config = config(&mock).replace(
        "shutdown_grace = \"10s\"",
        "shutdown_grace = \"10s\"\nheader_read_timeout = \"300ms\"",
    );
    let proxy = Proxy::start(&config);
    let mut slow = std::net::TcpStream::connect(proxy.addr).unwrap();
    slow.write_all(b"POST /openai/v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the slow client was kept"
    );
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    // Others are served meanwhile and after.
    let (status, _, _) = get(
        &proxy.url("/openai/v1/models"),
        &[("authorization", &bearer(KEY_A))],
    )
    .await;
    assert_eq!(status, 200);
}
