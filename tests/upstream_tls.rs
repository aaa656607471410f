//! Providers reached over TLS, as every hosted provider is: the mock serves HTTPS with the
//! test certificate, which the proxy trusts through `upstream.ca_file`, and the proxy's
//! pooled client negotiates HTTP/2 with it by ALPN. Streams, bytes, keys, endings and the
//! no-retry rule, end to end over that path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const MESSAGES_STREAM: &str = r#"{"model":"claude-sonnet-4-6","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// The usual test config with both providers on the TLS mock, trusted by `ca_file`.
fn tls_config(mock: &Mock, upstream: &str) -> String {
    assert!(mock.url().starts_with("https://"));
    config_with(mock, &format!("ca_file = \"{TLS_CERT}\"\n{upstream}"))
}

fn chat(
    proxy: &Proxy,
    headers: &[(&str, &str)],
    body: &str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let auth = bearer(KEY_A);
    let mut all = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    all.extend_from_slice(headers);
    request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &all,
        body.to_owned(),
    )
}

#[tokio::test]
async fn a_tls_provider_gets_http2_the_real_key_and_the_body_and_answers_byte_for_byte() {
    let mock = Mock::start_tls();
    let proxy = Proxy::start(&tls_config(&mock, ""));
    for body in [CHAT, CHAT_STREAM] {
        let direct = send(request(
            "POST",
            &format!("{}/v1/chat/completions", mock.url()),
            &[("content-type", "application/json")],
            body.to_owned(),
        ))
        .await;
        let proxied = send(chat(&proxy, &[], body)).await;
        assert_eq!(proxied.0, 200, "{body}: {:?}", proxied.2);
        assert_eq!(proxied.2, direct.2, "{body}");
        assert!(!direct.2.is_empty());
    }
    let direct = send(request(
        "POST",
        &format!("{}/v1/messages", mock.url()),
        &[
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ],
        MESSAGES_STREAM,
    ))
    .await;
    let proxied = send(request(
        "POST",
        &proxy.url("/anthropic/v1/messages"),
        &[
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
            ("x-api-key", KEY_B),
        ],
        MESSAGES_STREAM,
    ))
    .await;
    assert_eq!(proxied.0, 200);
    assert_eq!(proxied.2, direct.2);

    // What reached the provider through the proxy: HTTP/2, the real key, the body as sent.
    let seen: Vec<_> = mock
        .requests()
        .await
        .into_iter()
        .filter(|r| {
            r["headers"].to_string().contains(OPENAI_KEY)
                || r["headers"].to_string().contains(ANTHROPIC_KEY)
        })
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for r in &seen {
        assert_eq!(r["version"], "HTTP/2.0", "{r}");
        let text = r.to_string();
        assert!(
            !text.contains(KEY_A) && !text.contains(KEY_B),
            "a virtual key reached the provider: {text}"
        );
    }
    assert!(seen[0]["headers"]
        .to_string()
        .contains(&format!("Bearer {OPENAI_KEY}")));
    assert_eq!(
        seen[0]["body_sha256"],
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(CHAT.as_bytes()))
    );
    assert!(seen[2]["headers"].to_string().contains(ANTHROPIC_KEY));
}

#[tokio::test]
async fn a_tls_providers_stream_reaches_the_client_chunk_by_chunk() {
    let mock = Mock::start_tls();
    let proxy = Proxy::start(&tls_config(&mock, ""));
    let start = Instant::now();
    let response = client()
        .request(chat(
            &proxy,
            &[("x-mock-chunks", "20"), ("x-mock-delay-ms", "50")],
            CHAT_STREAM,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        if frame.unwrap().data_ref().is_some() {
            arrivals.push(start.elapsed());
        }
    }
    let (first, last) = (arrivals[0], *arrivals.last().unwrap());
    assert!(
        last >= Duration::from_millis(900),
        "the stream took only {last:?}"
    );
    assert!(
        first < last / 3,
        "first chunk at {first:?}, last at {last:?}: buffered"
    );
    assert!(
        arrivals.len() >= 15,
        "only {} separate frames",
        arrivals.len()
    );
}

#[tokio::test]
async fn over_tls_a_client_leaving_closes_the_upstream_and_an_upstream_dying_is_no_clean_end() {
    let mock = Mock::start_tls();
    let proxy = Proxy::start(&tls_config(&mock, ""));

    let response = client()
        .request(chat(
            &proxy,
            &[("x-mock-chunks", "200"), ("x-mock-delay-ms", "20")],
            CHAT_STREAM,
        ))
        .await
        .unwrap();
    let mut body = response.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    let seen = mock.wait_for_outcome().await;
    assert_eq!(seen["outcome"], "client_gone");
    assert!(seen["chunks_sent"].as_u64().unwrap() < 100, "{seen}");

    // The provider resets its HTTP/2 stream after some chunks, which often reach the proxy
    // together with the reset: the client still gets the answer's head and what came
    // before the cut, then an error, never a clean end (and never no answer at all,
    // which an SDK would retry).
    let response = client()
        .request(chat(
            &proxy,
            &[("x-mock-chunks", "10"), ("x-mock-fault", "drop-mid-stream")],
            CHAT_STREAM,
        ))
        .await
        .expect("the answer's head arrives before the cut");
    assert_eq!(response.status(), 200);
    let (text, end) = read_all(response.into_body()).await;
    assert!(end.is_err(), "a cut stream ended cleanly");
    assert!(!String::from_utf8_lossy(&text).contains("[DONE]"));
    proxy.wait_for_log("end=\"upstream_error\"", 1).await;

    let (status, _, _) = send(chat(&proxy, &[], CHAT)).await;
    assert_eq!(status, 200, "the pooled HTTP/2 connection serves on");
}

#[tokio::test]
async fn a_tls_provider_resetting_before_headers_gets_502_and_is_not_retried() {
    let mock = Mock::start_tls();
    let proxy = Proxy::start(&tls_config(&mock, ""));
    let (status, _, b) = send(chat(&proxy, &[("x-mock-fault", "reset")], CHAT)).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["error"]["code"], "upstream_unreachable");
    assert_eq!(mock.requests().await.len(), 1, "the proxy retried");
}

/// Without `ca_file` the test certificate is trusted by no one: the proxy refuses the
/// provider rather than talk to it unverified.
#[tokio::test]
async fn a_provider_whose_certificate_is_not_trusted_is_not_reached() {
    let mock = Mock::start_tls();
    let proxy = Proxy::start(&config(&mock));
    let (status, _, b) = send(chat(&proxy, &[], CHAT)).await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&b));
    assert!(
        mock.requests().await.is_empty(),
        "a request went to an unverified provider"
    );
    assert!(
        proxy.proc.log_text().contains("certificate"),
        "{}",
        proxy.proc.log_text()
    );
}

#[tokio::test]
async fn an_unreadable_ca_file_stops_check_and_start_with_its_field() {
    let mock = Mock::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    for ca in [
        not_pem.display().to_string(),
        "/nonexistent/ca.pem".to_owned(),
    ] {
        let config = config_with(&mock, &format!("ca_file = \"{ca}\""));
        let path = dir.path().join("tokenwarden.toml");
        std::fs::write(&path, &config).unwrap();
        let out = std::process::Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{ca}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("upstream.ca_file"), "{ca}: {err}");
    }
}

/// An upload streamed to an HTTP/2 provider that the client stops sending, or that runs
/// past `max_body_bytes`, is the client's doing: 408 and 413, as over plain TCP, not a 502
/// that blames the provider (hyper's HTTP/2 client reports such a body as its own reset).
#[tokio::test]
async fn a_stalled_or_oversized_upload_to_a_tls_provider_is_blamed_on_the_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start_tls();
    let proxy = Proxy::start(&with_server(
        &tls_config(&mock, ""),
        "body_read_timeout = \"1s\"",
    ));
    // Stalled: half of a declared length, then nothing.
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /openai/v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n\
         content-type: application/octet-stream\r\ncontent-length: 100\r\n\r\n0123456789"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");

    // Oversized, with no length declared: chunks until past the limit (1 MiB here).
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>(4);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = http::Request::post(proxy.url("/openai/v1/files"))
        .header("authorization", bearer(KEY_A))
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let feeder = tokio::spawn(async move {
        for _ in 0..40 {
            let chunk = bytes::Bytes::from(vec![b'a'; 64 * 1024]);
            if tx.send(Ok(http_body::Frame::data(chunk))).await.is_err() {
                break;
            }
        }
    });
    let plain = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = plain.request(req).await.unwrap();
    assert_eq!(response.status(), 413);
    feeder.abort();

    let metrics = proxy.metrics_text().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("tokenwarden_requests_total{")
                && l.contains("outcome=\"upstream_error\"")),
        "{metrics}"
    );
    let (status, _, _) = send(chat(&proxy, &[], CHAT)).await;
    assert_eq!(status, 200);
}
