//! Hostile input on the wire: smuggling, absolute-form and CONNECT requests, a `Host`
//! that names another server, oversized headers, deeply nested JSON. The proxy only ever
//! reaches the configured upstream, under the provider's prefix, and answers everything
//! else with the documented status; the next request still works.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `raw` on a fresh connection and reads until the proxy closes it (or 5 s).
async fn raw(proxy: &Proxy, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status codes of every response in `text`, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

async fn still_serves(proxy: &Proxy) {
    let (status, _, _) = get(
        &proxy.url("/openai/v1/models"),
        &[("authorization", &bearer(KEY_A))],
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn length_and_chunked_together_cannot_smuggle_a_request_upstream() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    // The chunked body carries a second request after its end; Content-Length claims
    // only part of it. Whatever the proxy makes of this, the provider must see at most
    // the one request, re-framed by the proxy, and never the smuggled one.
    let smuggled = "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
    let request = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n\
         Content-Type: application/json\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n{smuggled}",
        body.len()
    );
    let answer = raw(&proxy, request.as_bytes()).await;
    let statuses = statuses(&answer);
    assert!(!statuses.is_empty(), "no answer: {answer:?}");
    let seen = mock.requests().await;
    assert!(seen.len() <= 1, "the provider saw {seen:?}");
    if let Some(one) = seen.first() {
        assert_eq!(one["path"], "/v1/chat/completions");
        assert_eq!(one["body_len"], body.len());
    }
    // The smuggled request, if answered at all, was answered by the proxy (401: no key).
    assert!(statuses[1..].iter().all(|&s| s == 401), "{statuses:?}");
    still_serves(&proxy).await;
}

#[tokio::test]
async fn absolute_form_uris_and_foreign_hosts_never_choose_the_upstream() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let answer = raw(
        &proxy,
        format!(
            "GET http://169.254.169.254/openai/v1/models HTTP/1.1\r\nHost: 169.254.169.254\r\n\
             Authorization: Bearer {KEY_A}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(statuses(&answer), vec![200], "{answer}");
    // It went to the configured provider, by path, with the provider's own host.
    let seen = mock.last_request().await;
    assert_eq!(seen["path"], "/v1/models");
    let host = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "host")
        .map(|h| h[1].as_str().unwrap().to_owned())
        .unwrap();
    assert_eq!(
        host,
        mock.addr.to_string(),
        "the client's Host is not forwarded"
    );

    // A path outside every prefix, in absolute form, goes nowhere.
    let before = mock.requests().await.len();
    let answer = raw(
        &proxy,
        b"GET http://internal.example/latest/meta-data HTTP/1.1\r\nHost: internal.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&answer), vec![404], "{answer}");
    assert_eq!(mock.requests().await.len(), before);
}

#[tokio::test]
async fn connect_and_paths_outside_the_prefix_are_refused() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let answer = raw(
        &proxy,
        format!(
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nAuthorization: Bearer {KEY_A}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let status = statuses(&answer);
    assert!(matches!(status.first(), Some(400 | 404 | 405)), "{answer}");
    for path in [
        "/openai/../admin",
        "/openai/%2e%2e/v1/models",
        "/openai/v1%2fmodels",
        "/openai/v1/%2E/models",
    ] {
        let answer = raw(
            &proxy,
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let status = statuses(&answer);
        assert!(
            matches!(status.first(), Some(400 | 404)),
            "{path}: {answer}"
        );
    }
    assert!(
        mock.requests().await.is_empty(),
        "nothing reached the provider"
    );
    still_serves(&proxy).await;
}

#[tokio::test]
async fn too_many_or_too_large_headers_are_refused() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let mut many = String::from("GET /openai/v1/models HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        many.push_str(&format!("x-filler-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let status = statuses(&raw(&proxy, many.as_bytes()).await);
    assert!(matches!(status.first(), Some(431 | 400)), "{status:?}");

    let huge = format!(
        "GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let answer = raw(&proxy, huge.as_bytes()).await;
    let status = statuses(&answer);
    assert!(
        status.is_empty() || matches!(status.first(), Some(431 | 400)),
        "{status:?}"
    );
    assert!(mock.requests().await.is_empty());
    still_serves(&proxy).await;
}

#[tokio::test]
async fn deeply_nested_json_is_answered_without_harm() {
    let mock = Mock::start();
    let key_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_A)
    );
    let config = config(&mock).replacen(
        &key_line,
        &format!("{key_line}[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000000\n[agents.runs]\nmax_repeats = 3\n"),
        1,
    );
    let proxy = Proxy::start(&config);
    let depth = 100_000;
    let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // Deep nesting where the proxy reads nothing: its fields are read, the body is
    // forwarded as sent and charged by its length (the repetition key, which would need
    // the whole document, is not made; nothing overflows).
    let nested = format!(r#"{{"model":"gpt-4o-mini","max_tokens":5,"messages":{deep}}}"#);
    for key in [KEY_A, KEY_B] {
        let (status, _, _) = post_json(
            &proxy.url("/openai/v1/chat/completions"),
            &[("authorization", &bearer(key))],
            &nested,
        )
        .await;
        assert_eq!(status, 200, "forwarded as sent");
    }
    // Deep nesting in a field the proxy must read: a budget cannot be held to it.
    let unreadable = format!(r#"{{"model":{deep},"max_tokens":5,"messages":[]}}"#);
    let (status, _, body) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        &unreadable,
    )
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("not JSON the proxy can read"));
    assert_eq!(
        mock.requests().await.len(),
        2,
        "the unreadable one never left"
    );
    still_serves(&proxy).await;
}
