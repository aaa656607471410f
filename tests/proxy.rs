//! End to end through the real binary: forwarding is transparent, streaming is live,
//! credentials are swapped, and every kind of bad input gets its documented answer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

/// The endpoints an SDK uses, each stream and not: (method, path after /v1, body).
fn endpoints() -> Vec<(&'static str, &'static str, &'static str)> {
    vec![
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"model":"gpt-3.5-turbo-instruct","prompt":"hi","stream":true}"#,
        ),
        (
            "POST",
            "/v1/responses",
            r#"{"model":"gpt-4o-mini","input":"hi"}"#,
        ),
        (
            "POST",
            "/v1/responses",
            r#"{"model":"gpt-4o-mini","input":"hi","stream":true}"#,
        ),
        (
            "POST",
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":["a","b"]}"#,
        ),
        ("GET", "/v1/models", ""),
    ]
}

fn anthropic_endpoints() -> Vec<&'static str> {
    vec![
        r#"{"model":"claude-sonnet-4-6","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"claude-sonnet-4-6","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    ]
}

#[tokio::test]
async fn bytes_through_the_proxy_equal_bytes_direct() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let auth = bearer(KEY_A);
    for (method, path, body) in endpoints() {
        let direct = send(request(
            method,
            &format!("{}{path}", mock.url()),
            &[("content-type", "application/json")],
            body.to_owned(),
        ))
        .await;
        let proxied = send(request(
            method,
            &proxy.url(&format!("/openai{path}")),
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
            ],
            body.to_owned(),
        ))
        .await;
        assert_eq!(proxied.0, 200, "{method} {path} {body}: {:?}", proxied.2);
        assert!(!direct.2.is_empty());
        assert_eq!(proxied.2, direct.2, "{method} {path} {body}");
        assert_eq!(proxied.1.get("content-type"), direct.1.get("content-type"));
    }
    for body in anthropic_endpoints() {
        let headers = [
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ];
        let direct = send(request(
            "POST",
            &format!("{}/v1/messages", mock.url()),
            &headers,
            body,
        ))
        .await;
        let proxied = send(request(
            "POST",
            &proxy.url("/anthropic/v1/messages"),
            &[headers[0], headers[1], ("x-api-key", KEY_B)],
            body,
        ))
        .await;
        assert_eq!(proxied.0, 200, "{body}: {:?}", proxied.2);
        assert_eq!(proxied.2, direct.2, "{body}");
    }
}

#[tokio::test]
async fn streams_reach_the_client_chunk_by_chunk() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#;
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-chunks", "20"),
            ("x-mock-delay-ms", "50"),
        ],
        body,
    );
    let start = Instant::now();
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            arrivals.push(start.elapsed());
            bytes.extend_from_slice(data);
        }
    }
    // 1 role chunk + 20 pieces + finish + [DONE], the 20 pieces 50 ms apart: about 1 s.
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.matches("data: ").count(), 23, "{text}");
    let first = arrivals[0];
    let last = *arrivals.last().unwrap();
    assert!(
        last >= Duration::from_millis(900),
        "the stream took only {last:?}"
    );
    assert!(
        first < last / 3,
        "first chunk at {first:?}, last at {last:?}: the proxy buffered the stream"
    );
    assert!(
        arrivals.len() >= 15,
        "only {} separate frames arrived",
        arrivals.len()
    );
}

#[tokio::test]
async fn the_upstream_gets_the_body_byte_for_byte_and_the_real_key_only() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    // Odd spacing, unknown fields and key order must all survive untouched.
    let body = "{ \"zeta\":1,  \"model\" : \"gpt-4o-mini\",\n\"messages\":[{\"role\":\"user\",\"content\":\"h\u{e9}llo\"}], \"x_unknown\": {\"deep\": [1,2,3]} }";
    let (status, headers, _) = post_json(
        &proxy.url("/openai/v1/chat/completions?api-version=2024-01-01"),
        &[
            ("authorization", &bearer(KEY_A)),
            ("x-stainless-lang", "python"),
            ("openai-organization", "org-123"),
            ("x-custom", "kept"),
            // Hop-by-hop (RFC 9110 7.6.1): for this connection only, never forwarded.
            ("connection", "keep-alive, x-hop-me"),
            ("x-hop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
        ],
        body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("x-request-id").unwrap(),
        "req_mock",
        "response headers pass through"
    );
    assert!(headers.get("x-tokenwarden-request-id").is_some());

    let seen = mock.last_request().await;
    assert_eq!(seen["path"], "/v1/chat/completions");
    assert_eq!(seen["query"], "api-version=2024-01-01");
    assert_eq!(
        seen["body_sha256"],
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    assert_eq!(seen["body_len"], body.len());
    let header = |name: &str| {
        seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(header("authorization"), [format!("Bearer {OPENAI_KEY}")]);
    assert_eq!(header("x-stainless-lang"), ["python"]);
    assert_eq!(header("openai-organization"), ["org-123"]);
    assert_eq!(header("x-custom"), ["kept"]);
    for hop in ["x-hop-me", "keep-alive", "proxy-authorization"] {
        assert!(header(hop).is_empty(), "{hop} was forwarded");
    }
    assert!(!header("connection").concat().contains("x-hop-me"));
    assert_eq!(header("host"), [mock.addr.to_string()]);
    assert!(
        !seen.to_string().contains(KEY_A),
        "the virtual key reached the provider"
    );

    // Anthropic: x-api-key carries the real key, version and beta headers as sent.
    let (status, _, _) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[
            ("authorization", &bearer(KEY_B)),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
        ],
        anthropic_endpoints()[0],
    )
    .await;
    assert_eq!(status, 200);
    let seen = mock.last_request().await;
    let names: Vec<_> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h[0].as_str().unwrap().to_owned())
        .collect();
    assert!(!names.contains(&"authorization".to_owned()), "{names:?}");
    let text = seen.to_string();
    assert!(
        text.contains(&format!("[\"x-api-key\",\"{ANTHROPIC_KEY}\"]")),
        "{text}"
    );
    assert!(text.contains("[\"anthropic-version\",\"2023-06-01\"]"));
    assert!(text.contains("[\"anthropic-beta\",\"prompt-caching-2024-07-31\"]"));
    assert!(!text.contains(KEY_B));
}

#[tokio::test]
async fn unknown_or_missing_keys_get_401_in_the_providers_shape() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let body = endpoints()[0].2;
    for headers in [
        vec![("authorization", "Bearer tw-wrong")],
        vec![],
        vec![("x-api-key", "nope")],
    ] {
        let (status, h, b) =
            post_json(&proxy.url("/openai/v1/chat/completions"), &headers, body).await;
        assert_eq!(status, 401);
        let v = json(&b);
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tokenwarden:"));
        assert!(h.get("x-tokenwarden-request-id").is_some());
    }
    let (status, _, b) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", "sk-ant-guess")],
        body,
    )
    .await;
    assert_eq!(status, 401);
    let v = json(&b);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    assert!(
        mock.requests().await.is_empty(),
        "a rejected request reached the provider"
    );
    // And the next client with a good key is served.
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 200);
}

/// A client may send a credential for something else in `Authorization` (a Basic login
/// for a gateway in front, a stale token) and its key in `x-api-key`: the key is found,
/// and neither credential reaches the provider.
#[tokio::test]
async fn a_key_in_x_api_key_counts_beside_another_authorization() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    for other in ["Basic Zm9vOmJhcg==", "Bearer tw-something-else"] {
        let (status, _, b) = post_json(
            &proxy.url("/openai/v1/chat/completions"),
            &[("authorization", other), ("x-api-key", KEY_A)],
            endpoints()[0].2,
        )
        .await;
        assert_eq!(status, 200, "{other}: {}", String::from_utf8_lossy(&b));
        let seen = mock.last_request().await.to_string();
        assert!(seen.contains(&format!("Bearer {OPENAI_KEY}")), "{seen}");
        for secret in [other, KEY_A] {
            assert!(
                !seen.contains(secret),
                "{secret} reached the provider: {seen}"
            );
        }
    }
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let big = format!(
        r#"{{"model":"gpt-4o-mini","pad":"{}"}}"#,
        "x".repeat(1_100_000)
    );
    let (status, _, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        &big,
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(json(&b)["error"]["code"], "request_too_large");

    // No content-length: a streamed upload cut off at the limit.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = http::Request::post(proxy.url("/anthropic/v1/files"))
        .header("x-api-key", KEY_A)
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let feeder = tokio::spawn(async move {
        for _ in 0..40 {
            if tx
                .send(Ok(http_body::Frame::data(Bytes::from(vec![
                    b'a';
                    64 * 1024
                ]))))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), 413);
    let v = json(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(v["error"]["type"], "request_too_large");
    feeder.abort();

    // And the proxy still serves.
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        endpoints()[0].2,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn malformed_json_is_forwarded_as_is_for_the_provider_to_judge() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let body = r#"{"model": "gpt-4o-mini", "messages": [ oops"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 200, "the mock answers anything");
    let seen = mock.last_request().await;
    assert_eq!(
        seen["body_sha256"],
        hex::encode(Sha256::digest(body.as_bytes()))
    );
}

#[tokio::test]
async fn unknown_endpoints_and_upstream_errors_pass_through() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let auth = bearer(KEY_A);
    let (status, _, b) = post_json(
        &proxy.url("/openai/v1/brand/new/endpoint"),
        &[("authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        json(&b)["error"]["message"],
        "mock: unknown path",
        "the provider's own answer"
    );

    let (status, h, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &auth), ("x-mock-status", "429")],
        endpoints()[0].2,
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(json(&b)["error"]["message"], "mock failure");
}

#[tokio::test]
async fn unrouted_and_unsafe_paths_are_refused() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let auth = bearer(KEY_A);
    let (status, _, b) = get(&proxy.url("/v1/models"), &[("authorization", &auth)]).await;
    assert_eq!(status, 404);
    assert_eq!(json(&b)["error"]["code"], "unknown_url");
    for path in [
        "/openai/v1/%2e%2e/admin",
        "/openai/v1%2Fadmin",
        "/openai/./v1/models",
    ] {
        let (status, _, b) = get(&proxy.url(path), &[("authorization", &auth)]).await;
        assert_eq!(status, 400, "{path}");
        assert_eq!(json(&b)["error"]["type"], "invalid_request_error");
    }
    assert!(mock.requests().await.is_empty());
}

#[tokio::test]
async fn a_catch_all_prefix_serves_sdks_at_the_root() {
    let mock = Mock::start();
    let config = config(&mock).replace("prefix = \"/openai\"", "prefix = \"/\"");
    let proxy = Proxy::start(&config);
    let (status, _, b) = get(
        &proxy.url("/v1/models"),
        &[("authorization", &bearer(KEY_A))],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&b)["object"], "list");
    let (status, _, _) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A)],
        anthropic_endpoints()[0],
    )
    .await;
    assert_eq!(status, 200, "the longer prefix still wins");
    assert_eq!(mock.last_request().await["path"], "/v1/messages");
}

#[tokio::test]
async fn http2_clients_are_served() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let body = endpoints()[1].2;
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
        ],
        body,
    );
    let response = client.request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert!(bytes.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn compressed_responses_pass_through_compressed() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let (status, h, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("authorization", &bearer(KEY_A)),
            ("x-mock-gzip", "1"),
            ("accept-encoding", "gzip"),
        ],
        endpoints()[0].2,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(h.get("content-encoding").unwrap(), "gzip");
    assert_eq!(&b[..2], &[0x1f, 0x8b], "gzip magic");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&b[..]), &mut text).unwrap();
    assert_eq!(json(text.as_bytes())["object"], "chat.completion");
}

#[tokio::test]
async fn a_provider_without_its_key_variable_answers_503_with_the_reason() {
    let mock = Mock::start();
    let proxy = Proxy::start_with_env(&config(&mock), &[("TW_TEST_OPENAI_KEY", OPENAI_KEY)]);
    let (status, _, b) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A)],
        anthropic_endpoints()[0],
    )
    .await;
    assert_eq!(status, 503);
    let v = json(&b);
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TW_TEST_ANTHROPIC_KEY"),
        "{v}"
    );
    assert!(mock.requests().await.is_empty());
}

#[tokio::test]
async fn health_endpoints_answer_on_the_admin_listener() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let (status, _, b) = get(&proxy.admin_url("/healthz"), &[]).await;
    assert_eq!((status.as_u16(), &b[..]), (200, &b"ok\n"[..]));
    let (status, _, _) = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(status, 200);
}
