//! Faults on either side of the proxy: each gets its documented answer, nothing hangs,
//! and the proxy keeps serving the next request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

async fn still_serves(proxy: &Proxy) {
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        CHAT,
    )
    .await;
    assert_eq!(status, 200, "the proxy stopped serving");
}

/// Reads a streamed response to its end and says whether it ended cleanly.
async fn read_stream(
    proxy: &Proxy,
    headers: &[(&str, &str)],
) -> (u16, Vec<u8>, Result<(), String>) {
    let auth = bearer(KEY_A);
    let mut all = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    all.extend_from_slice(headers);
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &all,
        CHAT_STREAM,
    );
    let response = client().request(req).await.unwrap();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    loop {
        match body.frame().await {
            None => return (status, bytes, Ok(())),
            Some(Ok(frame)) => {
                bytes.extend_from_slice(frame.data_ref().map(|d| &d[..]).unwrap_or_default())
            }
            Some(Err(e)) => return (status, bytes, Err(e.to_string())),
        }
    }
}

#[tokio::test]
async fn an_unreachable_upstream_gets_502_in_the_providers_shape() {
    // A port that was free a moment ago and has no listener now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mock = Mock::start();
    let config = config(&mock).replacen(&mock.url(), &format!("http://127.0.0.1:{port}"), 1);
    let proxy = Proxy::start(&config);
    let (status, h, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        CHAT,
    )
    .await;
    assert_eq!(status, 502);
    assert!(h.get("x-tokenwarden-request-id").is_some());
    let v = json(&b);
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["code"], "upstream_unreachable");
    // The Anthropic route still reaches the mock.
    let (status, _, _) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A)],
        r#"{"model":"claude-sonnet-4-6","max_tokens":10,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_reset_before_headers_gets_502() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let (status, _, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A)), ("x-mock-fault", "reset")],
        CHAT,
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(json(&b)["error"]["code"], "upstream_unreachable");
    assert_eq!(
        mock.requests().await.len(),
        1,
        "the proxy must not retry on its own"
    );
    still_serves(&proxy).await;
}

#[tokio::test]
async fn an_upstream_dying_mid_stream_never_looks_like_a_clean_end() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let (status, bytes, end) = read_stream(
        &proxy,
        &[("x-mock-chunks", "10"), ("x-mock-fault", "drop-mid-stream")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        end.is_err(),
        "a cut stream ended cleanly after {} bytes",
        bytes.len()
    );
    let text = String::from_utf8(bytes).unwrap();
    assert!(
        text.contains("tok0 "),
        "the chunks before the cut arrived: {text}"
    );
    assert!(!text.contains("[DONE]"));
    proxy.wait_for_log("end=\"upstream_error\"", 1).await;
    still_serves(&proxy).await;
}

#[tokio::test]
async fn a_client_leaving_mid_stream_closes_the_upstream_at_once() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-chunks", "200"),
            ("x-mock-delay-ms", "20"),
        ],
        CHAT_STREAM,
    );
    let response = client().request(req).await.unwrap();
    let mut body = response.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    let left = Instant::now();
    drop(body);
    let seen = mock.wait_for_outcome().await;
    assert_eq!(seen["outcome"], "client_gone");
    assert!(
        seen["chunks_sent"].as_u64().unwrap() < 50,
        "the upstream kept generating: {seen}"
    );
    assert!(left.elapsed() < Duration::from_secs(3));
    still_serves(&proxy).await;
    proxy.wait_for_log("end=\"client_gone\"", 1).await;
}

#[tokio::test]
async fn a_slow_first_byte_gets_504() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config_with(&mock, "first_byte_timeout = \"300ms\""));
    let started = Instant::now();
    let (status, _, b) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A), ("x-mock-first-byte-ms", "5000")],
        r#"{"model":"claude-sonnet-4-6","max_tokens":10,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the timeout did not fire"
    );
    let v = json(&b);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "timeout_error");
    still_serves(&proxy).await;
}

#[tokio::test]
async fn a_stalled_stream_is_cut_after_the_idle_limit() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config_with(&mock, "idle_timeout = \"300ms\""));
    for fault in ["stall", "stall-mid-stream"] {
        let started = Instant::now();
        let (status, _, end) =
            read_stream(&proxy, &[("x-mock-chunks", "10"), ("x-mock-fault", fault)]).await;
        assert_eq!(status, 200);
        assert!(end.is_err(), "{fault}: a stalled stream ended cleanly");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{fault}: nothing cut the stall"
        );
    }
    proxy.wait_for_log("end=\"idle_timeout\"", 2).await;
    // The cut reached the mock too: its stream saw the client go.
    assert_eq!(mock.wait_for_outcome().await["outcome"], "client_gone");
    still_serves(&proxy).await;
}

#[tokio::test]
async fn a_stream_past_the_total_limit_is_cut() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config_with(
        &mock,
        "idle_timeout = \"5s\"\ntotal_timeout = \"600ms\"",
    ));
    let started = Instant::now();
    let (status, bytes, end) = read_stream(
        &proxy,
        &[("x-mock-chunks", "100"), ("x-mock-delay-ms", "50")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(end.is_err(), "the stream ran past its total limit");
    assert!(!bytes.is_empty(), "chunks before the limit arrived");
    assert!(started.elapsed() < Duration::from_secs(4));
    proxy.wait_for_log("end=\"total_timeout\"", 1).await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish_and_refuses_new_connections() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let url = proxy.url("/openai/v1/chat/completions");
    let auth = bearer(KEY_A);
    let req = request(
        "POST",
        &url,
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
            ("x-mock-chunks", "20"),
            ("x-mock-delay-ms", "40"),
        ],
        CHAT_STREAM,
    );
    let response = client().request(req).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();

    let status = std::process::Command::new("kill")
        .args(["-TERM", &proxy.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let mut rest = Vec::new();
    while let Some(frame) = body.frame().await {
        rest.extend_from_slice(
            frame
                .expect("the in-flight stream was cut")
                .data_ref()
                .unwrap(),
        );
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));

    // Wait for the process to exit by itself within the grace period.
    let mut proxy = proxy;
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = proxy.proc.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    assert!(
        std::net::TcpStream::connect(proxy.addr).is_err(),
        "still accepting"
    );
}
