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
    let (bytes, end) = read_all(response.into_body()).await;
    (status, bytes, end.map_err(|e| e.to_string()))
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

/// A provider that takes longer than `connect_timeout` to connect, in TCP (a listener
/// whose accept queue is full drops further handshakes) or in TLS (a listener that accepts
/// and never answers the ClientHello), gets 504 within that limit, not 502 and not after
/// the five-minute first-byte limit.
#[tokio::test]
async fn a_connect_past_its_limit_gets_504_in_the_providers_shape() {
    // TCP: fill the accept queue of a listener that never accepts.
    let full = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let full_addr = full.local_addr().unwrap();
    let mut queued = Vec::new();
    while queued.len() < 4096 {
        match std::net::TcpStream::connect_timeout(&full_addr, Duration::from_millis(200)) {
            Ok(conn) => queued.push(conn),
            Err(_) => break,
        }
    }
    // TLS: TCP connects, the handshake never finishes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let held = std::thread::spawn(move || {
        let conn = silent.accept();
        let _ = wait.recv();
        drop(conn);
    });

    let mock = Mock::start();
    let config = config_with(
        &mock,
        "connect_timeout = \"1s\"\nfirst_byte_timeout = \"60s\"",
    )
    .replacen(&mock.url(), &format!("http://{full_addr}"), 1)
    .replacen(&mock.url(), &format!("https://{silent_addr}"), 1);
    let proxy = Proxy::start(&config);

    let started = Instant::now();
    let (status, h, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        CHAT,
    )
    .await;
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&b));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(h.get("x-tokenwarden-request-id").is_some());
    let v = json(&b);
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["code"], "upstream_timeout");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("within 1s"),
        "{v}"
    );

    let started = Instant::now();
    let (status, _, b) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A)],
        r#"{"model":"claude-sonnet-4-6","max_tokens":10,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&b));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(json(&b)["error"]["type"], "timeout_error");

    let metrics = proxy.metrics_text().await;
    let timeouts: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("tokenwarden_requests_total{") && l.contains("outcome=\"timeout\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(timeouts, 2.0, "{metrics}");
    drop((queued, done));
    held.join().unwrap();
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

/// The same cut, to a client speaking HTTP/2: its stream is reset, not ended.
#[tokio::test]
async fn an_upstream_dying_mid_stream_resets_an_http2_clients_stream() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-chunks", "10"),
            ("x-mock-fault", "drop-mid-stream"),
        ],
        CHAT_STREAM,
    );
    let response = h2
        .request(req)
        .await
        .expect("the answer's head arrives before the reset");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let (text, end) = read_all(response.into_body()).await;
    let text = String::from_utf8(text).unwrap();
    let error = end.expect_err("a cut stream ended cleanly over HTTP/2");
    assert!(format!("{error:?}").contains("INTERNAL_ERROR"), "{error:?}");
    // (Chunks before the cut may or may not arrive: a reset discards what HTTP/2 had
    // queued for the stream and not yet sent. What must not arrive is a clean end.)
    assert!(!text.contains("[DONE]"), "{text}");
    // The connection itself is fine: the next request on it is served.
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
        ],
        CHAT,
    );
    assert_eq!(h2.request(req).await.unwrap().status(), 200);
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
    still_serves(&proxy).await;
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

    signal(proxy.proc.pid(), "TERM");

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
    let exit = exit_within(
        &mut proxy,
        Duration::from_secs(10),
        "the proxy did not exit after SIGTERM",
    )
    .await;
    assert!(exit.success(), "{exit:?}");
    assert!(
        std::net::TcpStream::connect(proxy.addr).is_err(),
        "still accepting"
    );
}

/// SIGINT as SIGTERM; a stream still running when the grace period ends is cut (never
/// ended cleanly), and what it used is still settled and written to the audit log.
#[tokio::test]
async fn a_stream_outliving_the_grace_period_is_cut_and_still_audited() {
    let mock = Mock::start();
    let config = config(&mock).replace("shutdown_grace = \"10s\"", "shutdown_grace = \"1s\"");
    let proxy = Proxy::start(&config);
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-chunks", "100"),
            ("x-mock-delay-ms", "100"),
        ],
        CHAT_STREAM,
    );
    let response = client().request(req).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();

    signal(proxy.proc.pid(), "INT");
    let interrupted = Instant::now();
    let (text, end) = read_all(body).await;
    assert!(end.is_err(), "the stream cut at the deadline ended cleanly");
    assert!(!String::from_utf8_lossy(&text).contains("[DONE]"));
    let cut_after = interrupted.elapsed();
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(5),
        "cut {cut_after:?} after SIGINT, with a grace period of 1 s"
    );

    let mut proxy = proxy;
    let exit = exit_within(&mut proxy, Duration::from_secs(10), "no exit after SIGINT").await;
    assert!(exit.success(), "{exit:?}");
    let lines = proxy.audit_lines();
    let line = lines
        .iter()
        .find(|l| l["kind"] == "request")
        .unwrap_or_else(|| panic!("no request line: {lines:?}"));
    assert_eq!(line["outcome"], "shutdown", "{line}");
    assert!(line["input_tokens"].as_u64().unwrap() > 0, "{line}");
    assert!(line["output_tokens"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(line["estimated"], true, "{line}");
}

#[tokio::test]
async fn a_connection_that_never_spoke_does_not_hold_up_shutdown() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    // Connected, not a byte sent: neither HTTP/1.1 nor HTTP/2 yet.
    let silent = std::net::TcpStream::connect(proxy.addr).unwrap();
    let (status, _, _) = get(
        &proxy.url("/openai/v1/models"),
        &[("authorization", &bearer(KEY_A))],
    )
    .await;
    assert_eq!(status, 200, "served while the silent connection is open");

    signal(proxy.proc.pid(), "TERM");
    let mut proxy = proxy;
    // The grace period is 10 s: an exit well before it was not waiting for the silent one.
    let exit = exit_within(
        &mut proxy,
        Duration::from_secs(5),
        "shutdown waited for a connection that never spoke",
    )
    .await;
    assert!(exit.success(), "{exit:?}");
    drop(silent);
}

/// An HTTP/2 client with nothing open that ignores the shutdown's GOAWAY does not make the
/// proxy wait out its whole grace period.
#[tokio::test]
async fn an_idle_http2_client_does_not_hold_up_shutdown() {
    use tokio::io::AsyncWriteExt;
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let mut h2 = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    h2.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    // Served beside it, so it is past its first bytes and an HTTP/2 connection.
    let (status, _, _) = get(
        &proxy.url("/openai/v1/models"),
        &[("authorization", &bearer(KEY_A))],
    )
    .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;

    signal(proxy.proc.pid(), "TERM");
    let mut proxy = proxy;
    // The grace period is 10 s.
    let exit = exit_within(
        &mut proxy,
        Duration::from_secs(5),
        "shutdown waited for an idle HTTP/2 connection",
    )
    .await;
    assert!(exit.success(), "{exit:?}");
    drop(h2);
}

/// Waits for the proxy to exit by itself; fails with `why` if it has not within `limit`.
async fn exit_within(proxy: &mut Proxy, limit: Duration, why: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(exit) = proxy.proc.child.try_wait().unwrap() {
            return exit;
        }
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === misbehaving upstreams: broken streams, disagreeing usage, provider errors ===

/// The proxy's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The usual config with a token budget for agent-a, so reservations can be watched.
fn budgeted(mock: &Mock) -> String {
    let key_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_A)
    );
    config(mock).replacen(
        &key_line,
        &format!("{key_line}[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000000\n"),
        1,
    )
}

#[tokio::test]
async fn broken_streams_reach_the_client_as_sent_and_are_settled_once() {
    let mock = Mock::start();
    let proxy = Proxy::start(&budgeted(&mock));
    let idle = rss_kib(proxy.proc.pid());
    let mut audited = 0;
    for fault in ["malformed-sse", "invalid-utf8", "huge-line"] {
        let headers = [("x-mock-fault", fault), ("x-mock-chunks", "6")];
        let mut direct_headers = vec![("content-type", "application/json")];
        direct_headers.extend_from_slice(&headers);
        let direct = send(request(
            "POST",
            &format!("{}/v1/chat/completions", mock.url()),
            &direct_headers,
            CHAT_STREAM,
        ))
        .await
        .2;
        let (status, bytes, end) = read_stream(&proxy, &headers).await;
        assert_eq!(status, 200, "{fault}");
        assert!(end.is_ok(), "{fault}: {end:?}");
        assert!(
            bytes == direct.to_vec(),
            "{fault}: the client got other bytes than a direct call ({} vs {})",
            bytes.len(),
            direct.len()
        );
        audited += 1;
        let lines = proxy.wait_for_audit_lines(audited).await;
        assert_eq!(lines.len(), audited, "{fault}: settled exactly once");
        let last = lines.last().unwrap();
        assert_eq!(last["outcome"], "ok", "{fault}");
        assert_eq!(
            last["output_tokens"], 6,
            "{fault}: the provider's report is the bill"
        );
    }
    // Nothing held, nothing grown: a 10 MB line was forwarded, not kept.
    proxy
        .wait_for_metric(
            "tokenwarden_budget_reserved{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"} 0",
        )
        .await;
    let grown = rss_kib(proxy.proc.pid()).saturating_sub(idle);
    assert!(grown < 40 * 1024, "RSS grew by {grown} KiB");
    assert!(proxy
        .metrics_text()
        .await
        .contains("tokenwarden_sse_events_dropped_total 1"));
    still_serves(&proxy).await;
}

#[tokio::test]
async fn usage_that_disagrees_with_the_text_is_billed_as_reported() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let (status, bytes, end) = read_stream(
        &proxy,
        &[("x-mock-chunks", "5"), ("x-mock-usage-output", "2")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(end.is_ok());
    assert_eq!(
        String::from_utf8_lossy(&bytes)
            .matches("\"content\":\"tok")
            .count(),
        5
    );
    let line = &proxy.wait_for_audit_lines(1).await[0];
    assert_eq!(line["output_tokens"], 2);
    assert_eq!(line["estimated"], false);
}

#[tokio::test]
async fn provider_rate_limits_and_overload_pass_through_uncharged() {
    let mock = Mock::start();
    let proxy = Proxy::start(&budgeted(&mock));
    for status in ["429", "529"] {
        let (code, headers, body) = post_json(
            &proxy.url("/openai/v1/chat/completions"),
            &[("authorization", &bearer(KEY_A)), ("x-mock-status", status)],
            CHAT,
        )
        .await;
        assert_eq!(code.as_str(), status);
        assert_eq!(
            headers.get("retry-after").unwrap(),
            "1",
            "the provider's own"
        );
        assert_eq!(json(&body)["error"]["message"], "mock failure");
    }
    let lines = proxy.wait_for_audit_lines(2).await;
    for line in &lines {
        assert_eq!(line["outcome"], "provider_error");
        assert_eq!(line["cost_usd"], 0.0);
    }
    proxy
        .wait_for_metric(
            "tokenwarden_budget_remaining{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"} 100000000",
        )
        .await;
    still_serves(&proxy).await;
}

// === misbehaving clients ===

#[tokio::test]
async fn a_slow_reader_holds_back_the_upstream_instead_of_growing_a_buffer() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-chunks", "40000"),
        ],
        CHAT_STREAM,
    );
    let response = client().request(req).await.unwrap();
    let mut body = response.into_body();
    let mut received = Vec::new();
    for _ in 0..10 {
        let frame = body.frame().await.unwrap().unwrap();
        received.extend_from_slice(frame.data_ref().unwrap());
    }
    // The client stops reading: the upstream cannot finish (its sends wait), and the
    // proxy holds no more than socket buffers' worth.
    let before = rss_kib(proxy.proc.pid());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        mock.last_request().await["outcome"],
        "pending",
        "backpressure reached the upstream"
    );
    let grown = rss_kib(proxy.proc.pid()).saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "RSS grew by {grown} KiB while the client did not read"
    );
    // Then every event arrives, however the frames were cut.
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received.extend_from_slice(&data);
        }
    }
    let events = memchr::memmem::find_iter(&received, b"data: ").count();
    assert!(events > 40_000, "{events} events");
    assert!(received.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(mock.wait_for_outcome().await["outcome"], "complete");
}

/// How many files this process may open.
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

#[tokio::test]
async fn idle_connections_and_slowloris_do_not_stop_the_proxy_serving() {
    let mock = Mock::start();
    let proxy = Proxy::start(&with_server(
        &config_with(&mock, ""),
        "header_read_timeout = \"1s\"",
    ));
    let idle_count = (open_files_limit() / 4).min(2000);
    let mut idle = Vec::with_capacity(idle_count);
    for _ in 0..idle_count {
        idle.push(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    }
    // A slowloris: headers a byte at a time, never finished.
    let mut slow = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    slow.write_all(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    still_serves(&proxy).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "served beside {idle_count} idle connections"
    );
    // The slowloris is cut at the header timeout, however it trickles.
    for _ in 0..5 {
        let _ = slow.write_all(b"x").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the slow client's connection was not closed"
    );
    drop(idle);
    still_serves(&proxy).await;
}

/// A connection is idle only after a whole `idle_timeout` with no request open: one that
/// just finished a long request is not closed under the client's next one.
#[tokio::test]
async fn a_connection_is_not_closed_as_idle_right_after_a_long_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start();
    let proxy = Proxy::start(&with_server(
        &config_with(&mock, ""),
        "idle_timeout = \"2s\"",
    ));
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    /// Sends a request and reads until `done` says the answer is complete.
    async fn exchange(
        conn: &mut tokio::net::TcpStream,
        headers: &str,
        body: &str,
        done: fn(&[u8]) -> bool,
    ) -> String {
        let head = format!(
            "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: x\r\n\
             authorization: Bearer {KEY_A}\r\ncontent-type: application/json\r\n{headers}\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        while !done(&answer) {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    }
    // About 3 s, across the first idle check.
    let first = exchange(
        &mut conn,
        "x-mock-chunks: 30\r\nx-mock-delay-ms: 100\r\n",
        CHAT_STREAM,
        |a| a.ends_with(b"\r\n0\r\n\r\n"),
    )
    .await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.contains("[DONE]"), "{first}");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Its head is enough.
    let second = exchange(&mut conn, "", CHAT, |a| {
        a.windows(4).any(|w| w == b"\r\n\r\n")
    })
    .await;
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the connection was closed 1.2 s after its last answer: {second:?}"
    );
}

/// A client that stops sending its body halfway gets 408 in the provider's shape once
/// `body_read_timeout` passes with nothing new, whether the body is JSON (read whole
/// before anything goes upstream) or an upload streamed to the provider; nothing hangs.
#[tokio::test]
async fn a_body_that_stalls_gets_408_and_nothing_hangs() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start();
    let proxy = Proxy::start(&with_server(
        &config_with(&mock, ""),
        "body_read_timeout = \"1s\"",
    ));
    for (content_type, path) in [
        ("application/json", "/openai/v1/chat/completions"),
        ("application/octet-stream", "/openai/v1/files"),
    ] {
        let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n\
             content-type: {content_type}\r\ncontent-length: 100\r\n\r\n{{\"model\":"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
        assert!(
            read.is_ok(),
            "{content_type}: no answer after {:?}",
            started.elapsed()
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{content_type}: {answer}"
        );
        assert!(
            answer.contains("\"code\":\"request_timeout\""),
            "{content_type}: {answer}"
        );
        assert!(
            answer.contains("x-tokenwarden-request-id"),
            "{content_type}: {answer}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    }
    still_serves(&proxy).await;
}

/// Connections that never make a request: one silent, one that stops inside HTTP/2's
/// connection preface, one that finishes the preface and its settings and opens no stream.
/// Each is closed within its time limit and gives its slot back, so a client that holds
/// `max_connections` of them cannot keep everyone else out.
#[tokio::test]
async fn connections_that_never_make_a_request_are_closed_and_free_their_slots() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start();
    let proxy = Proxy::start(&with_server(
        &config_with(&mock, ""),
        "header_read_timeout = \"1s\"\nidle_timeout = \"1s\"\nmax_connections = 3",
    ));
    let silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut split_preface = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    split_preface.write_all(b"PR").await.unwrap();
    let mut h2_idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    h2_idle
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
    h2_idle
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();

    let started = Instant::now();
    for (name, mut conn) in [
        ("silent", silent),
        ("split preface", split_preface),
        ("HTTP/2 without streams", h2_idle),
    ] {
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
        assert!(
            closed.is_ok(),
            "the {name} connection was still open after {:?}",
            started.elapsed()
        );
    }
    // Every slot is free again: the three limits' worth of clients can be served.
    for _ in 0..3 {
        still_serves(&proxy).await;
    }
}
