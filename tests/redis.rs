//! Limits shared by replicas through Redis, end to end: two proxies in front of one
//! agent enforce one budget, one rate and one cap on requests in flight together; Redis
//! down fails closed and recovers by itself. Each test starts its own redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use serde_json::Value;

const STREAM: &str = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"go"}]}"#;
const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

/// The usual config on Redis, with `a` and `b` placed after each agent's own keys.
fn shared_config(mock: &Mock, redis: &Redis, a: &str, b: &str) -> String {
    let mut config = config(mock);
    for (key, extra) in [(KEY_A, a), (KEY_B, b)] {
        let line = format!(
            "key_sha256 = \"{}\"\n",
            tokenwarden::identity::key_digest_hex(key)
        );
        config = config.replacen(&line, &format!("{line}{extra}\n"), 1);
    }
    config + &format!("[storage]\nredis_url = \"{}\"\n", redis.url())
}

async fn send_chat(proxy: &Proxy, key: &str, body: &str) -> (u16, http::HeaderMap, Bytes) {
    let (status, headers, body) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(key))],
        body,
    )
    .await;
    (status.as_u16(), headers, body)
}

fn tokens_of(lines: &[Value]) -> u64 {
    lines
        .iter()
        .filter(|l| l["agent"] == "agent-a")
        .map(|l| {
            [
                "input_tokens",
                "cached_input_tokens",
                "cache_write_tokens",
                "output_tokens",
            ]
            .iter()
            .map(|k| l[*k].as_u64().unwrap())
            .sum::<u64>()
        })
        .sum()
}

#[tokio::test]
async fn two_replicas_never_spend_past_one_budget_together() {
    let redis = Redis::start();
    let mock = Mock::start();
    let worst = STREAM.len() as u64 + 20;
    let budget = worst * 10 + worst / 2;
    let table = format!("[[agents.budgets]]\nperiod = \"day\"\ntokens = {budget}");
    let config = shared_config(&mock, &redis, &table, "");
    let replicas = [Proxy::start(&config), Proxy::start(&config)];

    let answers = concurrent_posts(
        &[
            replicas[0].url("/openai/v1/chat/completions"),
            replicas[1].url("/openai/v1/chat/completions"),
        ],
        64,
        KEY_A,
        &[("x-mock-chunks", "20"), ("x-mock-delay-ms", "30")],
        STREAM,
    )
    .await;
    let (mut ok, mut refused) = (0, 0);
    for (status, retry, body) in answers {
        match status {
            200 => {
                ok += 1;
                assert!(body.ends_with(b"data: [DONE]\n\n"));
            }
            402 => {
                refused += 1;
                assert_eq!(retry.as_deref(), Some("false"));
                let v = json(&body);
                assert_eq!(v["error"]["code"], "budget_exceeded");
                let message = v["error"]["message"].as_str().unwrap();
                assert!(
                    message.contains("agent agent-a day budget exhausted"),
                    "{message}"
                );
            }
            other => panic!(
                "unexpected status {other}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
    assert!(ok >= 9, "only {ok} streams were admitted");
    assert!(refused > 0, "the budget never bound");
    assert_eq!(ok + refused, 64);

    let mut lines = Vec::new();
    for (replica, n) in replicas.iter().zip([32, 32]) {
        lines.extend(replica.wait_for_audit_lines(n).await);
    }
    let spent = tokens_of(&lines);
    assert!(spent <= budget, "the replicas spent {spent} of {budget}");

    // Both replicas read the same figures from Redis once every hold is settled.
    let reserved =
        "tokenwarden_budget_reserved{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"} 0";
    let remaining = format!(
        "tokenwarden_budget_remaining{{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"}} {}",
        budget - spent
    );
    for replica in &replicas {
        replica.wait_for_metric(reserved).await;
        replica.wait_for_metric(&remaining).await;
    }
}

#[tokio::test]
async fn rate_and_requests_in_flight_are_counted_across_replicas() {
    let redis = Redis::start();
    let mock = Mock::start();
    let config = shared_config(
        &mock,
        &redis,
        "[agents.limits]\nrequests_per_minute = 4",
        "[agents.limits]\nmax_concurrent = 2",
    );
    let replicas = [Proxy::start(&config), Proxy::start(&config)];

    // Four per minute in all, whichever replica they reach.
    for i in 0..4 {
        let (status, _, body) = send_chat(&replicas[i % 2], KEY_A, CHAT).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    for replica in &replicas {
        let (status, headers, body) = send_chat(replica, KEY_A, CHAT).await;
        assert_eq!(status, 429);
        let wait: u64 = header_num(&headers, "retry-after");
        assert!((1..=60).contains(&wait), "{wait}");
        let message = json(&body)["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("4 requests per minute"), "{message}");
    }

    // Two in flight in all: two slow streams on one replica fill agent-b's places.
    let mut open = Vec::new();
    for _ in 0..2 {
        let req = request(
            "POST",
            &replicas[0].url("/openai/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer(KEY_B)),
                ("x-mock-chunks", "3"),
                ("x-mock-delay-ms", "300"),
            ],
            STREAM,
        );
        let response = client().request(req).await.unwrap();
        assert_eq!(response.status(), 200);
        open.push(response);
    }
    let (status, headers, body) = send_chat(&replicas[1], KEY_B, CHAT).await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    assert!(String::from_utf8_lossy(&body).contains("2 requests in flight"));
    for response in open {
        response.into_body().collect().await.unwrap();
    }
    // The places come back when the streams end (settled a moment later).
    let mut status = 0;
    for _ in 0..100 {
        status = send_chat(&replicas[1], KEY_B, CHAT).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn redis_down_fails_closed_for_limited_agents_and_recovers() {
    let mut redis = Redis::start();
    let mock = Mock::start();
    let config = shared_config(
        &mock,
        &redis,
        "[[agents.budgets]]\nperiod = \"day\"\nusd = 1.0",
        "",
    );
    let proxy = Proxy::start(&config);
    assert_eq!(send_chat(&proxy, KEY_A, CHAT).await.0, 200);

    redis.stop();
    let (status, headers, body) = send_chat(&proxy, KEY_A, CHAT).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(headers.get("x-tokenwarden-request-id").is_some());
    let v = json(&body);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("budget store (Redis) cannot be reached"),
        "{message}"
    );
    assert!(
        !message.contains(&redis.port.to_string()),
        "no address leaks: {message}"
    );
    // An agent without limits does not need Redis.
    assert_eq!(send_chat(&proxy, KEY_B, CHAT).await.0, 200);
    assert_eq!(
        mock.requests().await.len(),
        2,
        "the refused request never reached the provider"
    );

    redis.restart();
    let mut status = 0;
    for _ in 0..250 {
        status = send_chat(&proxy, KEY_A, CHAT).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "the proxy did not recover when Redis did");

    let lines = proxy.audit_lines();
    assert!(lines
        .iter()
        .any(|l| l["reason"] == "store_unavailable" && l["status"] == 503));
    let metrics = proxy.metrics_text().await;
    assert!(
        metrics.contains(
            "tokenwarden_rejections_total{agent=\"agent-a\",reason=\"store_unavailable\"}"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_run_stopped_on_one_replica_is_stopped_on_every_replica() {
    let redis = Redis::start();
    let mock = Mock::start();
    let config = shared_config(&mock, &redis, "[agents.runs]\nmax_requests = 2", "");
    let replicas = [Proxy::start(&config), Proxy::start(&config)];
    let send = |replica: usize, run: &'static str| {
        let url = replicas[replica].url("/openai/v1/chat/completions");
        async move {
            let (status, _, body) = post_json(
                &url,
                &[
                    ("authorization", &bearer(KEY_A)),
                    ("x-tokenwarden-run", run),
                ],
                CHAT,
            )
            .await;
            (status.as_u16(), body)
        }
    };
    assert_eq!(send(0, "shared").await.0, 200);
    assert_eq!(send(0, "shared").await.0, 200);
    let (status, body) = send(0, "shared").await;
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains("max_requests"));

    // The other replica has seen none of the run's requests, yet refuses it.
    let mut answer = (0, Bytes::new());
    for _ in 0..100 {
        answer = send(1, "shared").await;
        if answer.0 == 403 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answer.0, 403, "{}", String::from_utf8_lossy(&answer.1));
    let message = json(&answer.1)["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("max_requests"), "{message}");
    assert!(
        message.contains("request 3 of at most 2"),
        "the figures travel: {message}"
    );
    // Other runs pass on both.
    assert_eq!(send(1, "other").await.0, 200);
    assert_eq!(send(0, "other").await.0, 200);
}

#[tokio::test]
async fn a_pause_on_one_replica_holds_on_every_replica() {
    let redis = Redis::start();
    let mock = Mock::start();
    let config = shared_config(&mock, &redis, "", "").replace(
        "[admin]\n",
        "[admin]\ntoken_env = \"TW_TEST_ADMIN_TOKEN\"\n",
    );
    let env = [
        ("TW_TEST_OPENAI_KEY", OPENAI_KEY),
        ("TW_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY),
        ("TW_TEST_ADMIN_TOKEN", "admin-secret"),
    ];
    let replicas = [
        Proxy::start_with_env(&config, &env),
        Proxy::start_with_env(&config, &env),
    ];
    let admin = |replica: usize, path: &str| {
        let url = replicas[replica].admin_url(path);
        async move {
            send(request(
                "POST",
                &url,
                &[("authorization", "Bearer admin-secret")],
                Bytes::new(),
            ))
            .await
            .0
        }
    };
    // Polls replica 1 until agent-a gets `want`.
    let until = |want: u16| {
        let replica = &replicas[1];
        async move {
            let mut last = 0;
            for _ in 0..100 {
                last = send_chat(replica, KEY_A, CHAT).await.0;
                if last == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("replica 1 answered {last}, not {want}");
        }
    };
    assert_eq!(admin(0, "/admin/agents/agent-a/pause").await, 200);
    until(403).await;
    assert_eq!(
        send_chat(&replicas[1], KEY_B, CHAT).await.0,
        200,
        "only agent-a"
    );
    assert_eq!(admin(0, "/admin/agents/agent-a/resume").await, 200);
    until(200).await;

    assert_eq!(admin(0, "/admin/pause-all").await, 200);
    until(403).await;
    assert_eq!(
        send_chat(&replicas[1], KEY_B, CHAT).await.0,
        403,
        "every agent"
    );
    assert_eq!(admin(0, "/admin/resume-all").await, 200);
    until(200).await;
}
