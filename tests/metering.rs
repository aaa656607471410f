//! Metering end to end: after a known mix of requests, the metrics agree with the usage
//! the mock provider reported, to the token and to the micro-dollar; estimates are
//! marked; and the client's bytes are unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;

use common::*;
use http_body_util::BodyExt;
use sha2::Digest;
use tokenwarden::metering::tokenizer;

/// Metric samples as `name{sorted labels}` → value.
async fn scrape(proxy: &Proxy) -> HashMap<String, f64> {
    let (status, _, body) = get(&proxy.admin_url("/metrics"), &[]).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn sample(metrics: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut labels: Vec<_> = labels.to_vec();
    labels.sort();
    let key = format!(
        "{name}{{{}}}",
        labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    *metrics.get(&key).unwrap_or(&0.0)
}

fn tokens(m: &HashMap<String, f64>, agent: &str, model: &str, kind: &str, estimated: bool) -> f64 {
    let est = if estimated { "true" } else { "false" };
    sample(
        m,
        "tokenwarden_tokens_total",
        &[
            ("agent", agent),
            ("model", model),
            ("kind", kind),
            ("estimated", est),
        ],
    )
}

/// What the mock reports as prompt tokens for a body.
fn mock_prompt_tokens(body: &str) -> f64 {
    (body.len() / 4).max(1) as f64
}

#[tokio::test]
async fn metrics_agree_with_the_providers_usage() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let auth = bearer(KEY_A);

    // 1. OpenAI chat, not streamed, with cached and reasoning tokens.
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"count my tokens please"}]}"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("authorization", &auth),
            ("x-mock-cached-tokens", "3"),
            ("x-mock-reasoning-tokens", "2"),
            ("x-mock-chunks", "7"),
        ],
        chat,
    )
    .await;
    assert_eq!(status, 200);
    // 2. The same streamed, the client asking for usage: exact as well.
    let chat_stream = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"count my tokens please"}]}"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &auth), ("x-mock-chunks", "4")],
        chat_stream,
    )
    .await;
    assert_eq!(status, 200);
    // 3. Responses, streamed.
    let responses = r#"{"model":"gpt-4o-mini","input":"hello","stream":true}"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/responses"),
        &[("authorization", &auth), ("x-mock-chunks", "6")],
        responses,
    )
    .await;
    assert_eq!(status, 200);
    // 4. Embeddings: input only.
    let embed = r#"{"model":"text-embedding-3-small","input":["a","b","c"]}"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/embeddings"),
        &[("authorization", &auth)],
        embed,
    )
    .await;
    assert_eq!(status, 200);
    // 5. Anthropic, streamed, with cache read and write; agent B.
    let messages = r#"{"model":"claude-sonnet-4-6","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, _) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[
            ("x-api-key", KEY_B),
            ("x-mock-cached-tokens", "40"),
            ("x-mock-cache-write-tokens", "100"),
            ("x-mock-chunks", "9"),
        ],
        messages,
    )
    .await;
    assert_eq!(status, 200);

    let m = scrape(&proxy).await;
    let p_chat = mock_prompt_tokens(chat);
    let p_stream = mock_prompt_tokens(chat_stream);
    let p_resp = mock_prompt_tokens(responses);
    let p_embed = mock_prompt_tokens(embed);
    let p_msg = mock_prompt_tokens(messages);

    // OpenAI's prompt_tokens include cached ones; the metric counts them apart.
    assert_eq!(
        tokens(&m, "agent-a", "gpt-4o-mini", "input", false),
        (p_chat - 3.0) + p_stream + p_resp
    );
    assert_eq!(
        tokens(&m, "agent-a", "gpt-4o-mini", "cached_input", false),
        3.0
    );
    assert_eq!(
        tokens(&m, "agent-a", "gpt-4o-mini", "output", false),
        7.0 + 4.0 + 6.0
    );
    assert_eq!(
        tokens(&m, "agent-a", "gpt-4o-mini", "reasoning", false),
        2.0
    );
    assert_eq!(
        tokens(&m, "agent-a", "text-embedding-3-small", "input", false),
        p_embed
    );
    assert_eq!(
        tokens(&m, "agent-b", "claude-sonnet-4-6", "input", false),
        p_msg
    );
    assert_eq!(
        tokens(&m, "agent-b", "claude-sonnet-4-6", "cached_input", false),
        40.0
    );
    assert_eq!(
        tokens(&m, "agent-b", "claude-sonnet-4-6", "cache_write", false),
        100.0
    );
    assert_eq!(
        tokens(&m, "agent-b", "claude-sonnet-4-6", "output", false),
        9.0
    );

    // Cost from the shipped price table.
    let mini = ((p_chat - 3.0 + p_stream + p_resp) * 0.15 + 3.0 * 0.075 + 17.0 * 0.60) / 1e6;
    let cost_a = sample(
        &m,
        "tokenwarden_cost_usd_total",
        &[
            ("agent", "agent-a"),
            ("team", "team-1"),
            ("model", "gpt-4o-mini"),
        ],
    );
    assert!((cost_a - mini).abs() < 1e-9, "{cost_a} != {mini}");
    let embed_cost = p_embed * 0.02 / 1e6;
    let cost_e = sample(
        &m,
        "tokenwarden_cost_usd_total",
        &[
            ("agent", "agent-a"),
            ("team", "team-1"),
            ("model", "text-embedding-3-small"),
        ],
    );
    assert!((cost_e - embed_cost).abs() < 1e-9);
    let sonnet = (p_msg * 3.0 + 40.0 * 0.30 + 100.0 * 3.75 + 9.0 * 15.0) / 1e6;
    let cost_b = sample(
        &m,
        "tokenwarden_cost_usd_total",
        &[
            ("agent", "agent-b"),
            ("team", ""),
            ("model", "claude-sonnet-4-6"),
        ],
    );
    assert!((cost_b - sonnet).abs() < 1e-9, "{cost_b} != {sonnet}");

    let ok = |agent: &str, model: &str| {
        sample(
            &m,
            "tokenwarden_requests_total",
            &[
                ("agent", agent),
                (
                    "provider",
                    if model.starts_with("claude") {
                        "anthropic"
                    } else {
                        "openai"
                    },
                ),
                ("model", model),
                ("outcome", "ok"),
            ],
        )
    };
    assert_eq!(ok("agent-a", "gpt-4o-mini"), 3.0);
    assert_eq!(ok("agent-b", "claude-sonnet-4-6"), 1.0);
    assert_eq!(m["tokenwarden_active_streams"], 0.0);
    assert_eq!(m["tokenwarden_request_duration_seconds_count"], 5.0);
    assert!(m["tokenwarden_proxy_overhead_seconds_count"] >= 5.0);
}

#[tokio::test]
async fn streams_cut_short_are_estimated_and_marked() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let auth = bearer(KEY_A);
    let body =
        r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hello world"}]}"#;

    // The upstream dies after half of the 10 pieces.
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
            ("x-mock-chunks", "10"),
            ("x-mock-fault", "drop-mid-stream"),
        ],
        body,
    );
    let response = client().request(req).await.unwrap();
    let mut b = response.into_body();
    while let Some(Ok(_)) = b.frame().await {}

    // The client leaves after the first frames of a slow stream.
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
            ("x-mock-chunks", "100"),
            ("x-mock-delay-ms", "20"),
        ],
        body,
    );
    let response = client().request(req).await.unwrap();
    let mut b = response.into_body();
    b.frame().await.unwrap().unwrap();
    b.frame().await.unwrap().unwrap();
    drop(b);
    mock.wait_for_outcome().await;

    // Both settle on the blocking pool (they need the tokenizer): wait for both.
    let settled = |m: &HashMap<String, f64>, o: &str| {
        sample(
            m,
            "tokenwarden_requests_total",
            &[
                ("agent", "agent-a"),
                ("provider", "openai"),
                ("model", "gpt-4o"),
                ("outcome", o),
            ],
        )
    };
    let mut m = scrape(&proxy).await;
    for _ in 0..250 {
        if settled(&m, "client_gone") == 1.0 && settled(&m, "upstream_error") == 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        m = scrape(&proxy).await;
    }
    let outcome = |o: &str| {
        sample(
            &m,
            "tokenwarden_requests_total",
            &[
                ("agent", "agent-a"),
                ("provider", "openai"),
                ("model", "gpt-4o"),
                ("outcome", o),
            ],
        )
    };
    assert_eq!(outcome("upstream_error"), 1.0);
    assert_eq!(outcome("client_gone"), 1.0);

    // The cut stream delivered the role chunk and tok0..tok4 (the cut falls at event 6 of
    // 13); the abandoned one at least tok0, and only a few more before the proxy saw the
    // client go.
    let counter = tokenizer::for_model("gpt-4o");
    let least = (counter.count("tok0 tok1 tok2 tok3 tok4 ") + counter.count("tok0 ")) as f64;
    let output = tokens(&m, "agent-a", "gpt-4o", "output", true);
    assert!(
        output >= least && output <= least + 40.0,
        "{output} (at least {least})"
    );
    assert_eq!(
        tokens(&m, "agent-a", "gpt-4o", "output", false),
        0.0,
        "nothing was reported exactly"
    );
    // The prompt is counted from the request: "user" and "hello world".
    let input = tokens(&m, "agent-a", "gpt-4o", "input", true);
    assert_eq!(input, 2.0 * counter.count("user\nhello world\n") as f64);
}

#[tokio::test]
async fn unpriced_models_are_counted_and_flagged() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let body = r#"{"model":"my-local-llama","messages":[]}"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let m = scrape(&proxy).await;
    let total = mock_prompt_tokens(body) + 5.0;
    assert_eq!(
        sample(
            &m,
            "tokenwarden_unpriced_tokens_total",
            &[("agent", "agent-a"), ("model", "my-local-llama")]
        ),
        total
    );
    assert_eq!(
        sample(
            &m,
            "tokenwarden_cost_usd_total",
            &[
                ("agent", "agent-a"),
                ("team", "team-1"),
                ("model", "my-local-llama")
            ]
        ),
        0.0
    );
}

#[tokio::test]
async fn price_overrides_in_the_config_apply() {
    let mock = Mock::start();
    let config =
        config(&mock) + "\n[pricing.\"my-local-*\"]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n";
    let proxy = Proxy::start(&config);
    let body = r#"{"model":"my-local-llama","messages":[]}"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let m = scrape(&proxy).await;
    let want = (mock_prompt_tokens(body) * 1.0 + 5.0 * 2.0) / 1e6;
    let cost = sample(
        &m,
        "tokenwarden_cost_usd_total",
        &[
            ("agent", "agent-a"),
            ("team", "team-1"),
            ("model", "my-local-llama"),
        ],
    );
    assert!((cost - want).abs() < 1e-12, "{cost} != {want}");
    assert_eq!(
        sample(
            &m,
            "tokenwarden_unpriced_tokens_total",
            &[("agent", "agent-a"), ("model", "my-local-llama")]
        ),
        0.0
    );
}

#[tokio::test]
async fn usage_is_asked_for_upstream_and_hidden_from_the_client() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let cases = [
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"gpt-4o-mini","prompt":"hi","stream":true}"#,
        ),
    ];
    for (path, body) in cases {
        let headers = [("content-type", "application/json"), ("x-mock-chunks", "6")];
        let direct = send(request(
            "POST",
            &format!("{}{path}", mock.url()),
            &headers,
            body,
        ))
        .await;
        let auth = bearer(KEY_A);
        let proxied = send(request(
            "POST",
            &proxy.url(&format!("/openai{path}")),
            &[headers[0], headers[1], ("authorization", &auth)],
            body,
        ))
        .await;
        assert_eq!(proxied.0, 200);
        assert_eq!(
            proxied.2, direct.2,
            "{path}: the client must see the stream it asked for"
        );
        assert!(!String::from_utf8_lossy(&proxied.2).contains("usage"));

        // The provider was asked for usage, with every other byte as the client sent it.
        let seen = mock.last_request().await;
        let injected = format!(
            "{},\"stream_options\":{{\"include_usage\":true}}}}",
            &body[..body.len() - 1]
        );
        assert_eq!(
            seen["body_sha256"],
            hex::encode(sha2::Sha256::digest(injected.as_bytes())),
            "{path}"
        );
    }
    // Both counted exactly, from the provider's report.
    let m = scrape(&proxy).await;
    assert_eq!(tokens(&m, "agent-a", "gpt-4o-mini", "output", false), 12.0);
    assert_eq!(tokens(&m, "agent-a", "gpt-4o-mini", "output", true), 0.0);
}

#[tokio::test]
async fn usage_injection_can_be_turned_off_per_provider() {
    let mock = Mock::start();
    let config = config(&mock).replacen(
        "api_key_env = \"TW_TEST_OPENAI_KEY\"",
        "api_key_env = \"TW_TEST_OPENAI_KEY\"\ninject_usage = false",
        1,
    );
    let proxy = Proxy::start(&config);
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let seen = mock.last_request().await;
    assert_eq!(
        seen["body_sha256"],
        hex::encode(sha2::Sha256::digest(body.as_bytes())),
        "untouched"
    );
    proxy.wait_for_log("estimated=true", 1).await;
    let m = scrape(&proxy).await;
    assert!(
        tokens(&m, "agent-a", "gpt-4o-mini", "output", true) > 0.0,
        "estimated instead"
    );
}

#[tokio::test]
async fn compressed_responses_are_metered_from_a_decompressed_copy() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"zip it"}]}"#;
    let (status, headers, bytes) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("authorization", &bearer(KEY_A)),
            ("x-mock-gzip", "1"),
            ("x-mock-chunks", "8"),
        ],
        body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers.get("content-encoding").unwrap(), "gzip");
    assert_eq!(
        &bytes[..2],
        &[0x1f, 0x8b],
        "the client gets the compressed bytes"
    );
    let m = scrape(&proxy).await;
    assert_eq!(tokens(&m, "agent-a", "gpt-4o-mini", "output", false), 8.0);
    assert_eq!(
        tokens(&m, "agent-a", "gpt-4o-mini", "input", false),
        mock_prompt_tokens(body)
    );
}
