//! Budgets end to end: a hard ceiling under concurrency, shared by a team, clamping,
//! model allow-lists, the answers SDKs see, and spend that survives a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::Value;

/// The usual config with more for agent-a: `extra` is keys (`models = …`) and/or its
/// sub-tables (`[[agents.budgets]]`), placed after its own keys; `tail` goes at the end.
fn budget_config(mock: &Mock, extra: &str, tail: &str) -> String {
    let key_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_A)
    );
    config(mock).replacen(&key_line, &format!("{key_line}{extra}\n"), 1) + tail
}

fn spent_tokens(lines: &[Value], agent: &str) -> u64 {
    lines
        .iter()
        .filter(|l| l["agent"] == agent)
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

const STREAM: &str = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"go"}]}"#;

#[tokio::test]
async fn concurrent_streams_never_spend_past_the_budget() {
    let mock = Mock::start();
    // Each request reserves its body length (input bound) plus max_tokens 20: about
    // 120 tokens, so the budget affords about ten at once.
    let worst = STREAM.len() as u64 + 20;
    let budget = worst * 10 + worst / 2;
    let budget_table = format!("[[agents.budgets]]\nperiod = \"day\"\ntokens = {budget}");
    let proxy = Proxy::start(&budget_config(&mock, &budget_table, ""));

    let answers = concurrent_posts(
        &[proxy.url("/openai/v1/chat/completions")],
        64,
        KEY_A,
        &[("x-mock-chunks", "20"), ("x-mock-delay-ms", "30")],
        STREAM,
    )
    .await;
    let mut ok = 0;
    let mut refused = 0;
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
                assert_eq!(v["error"]["type"], "insufficient_quota");
                assert_eq!(v["error"]["code"], "budget_exceeded");
                let message = v["error"]["message"].as_str().unwrap();
                assert!(
                    message.contains("agent agent-a day budget exhausted"),
                    "{message}"
                );
                assert!(message.contains("resets at"), "{message}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(ok >= 9, "only {ok} streams were admitted");
    assert_eq!(ok + refused, 64);
    assert!(refused > 0, "the budget never bound");
    let lines = proxy.wait_for_audit_lines(64).await;
    let spent = spent_tokens(&lines, "agent-a");
    assert!(spent <= budget, "spent {spent} of {budget}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["reason"] == "budget_exhausted")
            .count(),
        refused
    );

    // Everything settled: nothing stays reserved.
    let metrics = proxy.metrics_text().await;
    assert!(
        metrics.contains("tokenwarden_budget_reserved{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"} 0"),
        "{metrics}"
    );
    let remaining = format!(
        "tokenwarden_budget_remaining{{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"}} {}",
        budget - spent
    );
    assert!(metrics.contains(&remaining), "{remaining} not in {metrics}");
    assert!(metrics
        .contains("tokenwarden_rejections_total{agent=\"agent-a\",reason=\"budget_exhausted\"}"));
}

#[tokio::test]
async fn a_team_budget_is_shared_and_spend_survives_a_restart() {
    let mock = Mock::start();
    let config =
        config(&mock).replacen("id = \"agent-b\"", "id = \"agent-b\"\nteam = \"team-1\"", 1)
            + "\n[[teams]]\nid = \"team-1\"\n[[teams.budgets]]\nperiod = \"month\"\nusd = 0.0001\n";
    let proxy = Proxy::start(&config);
    // gpt-4o: $2.50 / $10 per Mtok. A ~100-byte request with max_tokens 5 reserves
    // about 100 x 2.5e-6 + 5 x 1e-5 = $0.0003: more than the whole team budget.
    let body = r#"{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hello there, team"}]}"#;
    let (status, _, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 402, "{}", String::from_utf8_lossy(&b));
    assert!(json(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("team team-1 month budget"));

    // A cheaper model fits; both agents draw on the same team budget.
    let cheap =
        r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let (status, h, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        cheap,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("x-tokenwarden-budget-remaining-usd").unwrap(),
        "0.000100"
    );
    let (status, h, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_B))],
        cheap,
    )
    .await;
    assert_eq!(status, 200);
    let after_one: f64 = header_num(&h, "x-tokenwarden-budget-remaining-usd");
    assert!(
        after_one < 0.0001,
        "agent-b sees agent-a's spend: {after_one}"
    );
    proxy.wait_for_audit_lines(3).await;

    // Restart on the same data directory: the remaining budget is the same.
    let (status, h, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_B))],
        cheap,
    )
    .await;
    assert_eq!(status, 200);
    let before_restart = h
        .get("x-tokenwarden-budget-remaining-usd")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    proxy.wait_for_audit_lines(4).await;
    let lines = proxy.audit_lines();
    let spent: f64 = lines.iter().map(|l| l["cost_usd"].as_f64().unwrap()).sum();
    let data = proxy.dir.path().join("data");
    let mut proxy = proxy;
    let proc = &mut proxy.proc;
    std::process::Command::new("kill")
        .args(["-9", &proc.pid().to_string()])
        .status()
        .unwrap();
    proc.child.wait().unwrap();
    let config2 = with_storage(&config, &data);
    let proxy = Proxy::start(&config2);
    let (status, h, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        cheap,
    )
    .await;
    assert_eq!(status, 200);
    let remaining: f64 = header_num(&h, "x-tokenwarden-budget-remaining-usd");
    assert!(
        (remaining - (0.0001 - spent)).abs() < 1e-6,
        "{remaining} vs {} ({before_restart} before)",
        0.0001 - spent
    );
}

#[tokio::test]
async fn a_request_without_an_output_limit_is_clamped_to_what_the_budget_affords() {
    let mock = Mock::start();
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"write a lot"}]}"#;
    let budget = body.len() as u64 + 30;
    let config = budget_config(
        &mock,
        &format!("[[agents.budgets]]\nperiod = \"hour\"\ntokens = {budget}"),
        "",
    );
    let proxy = Proxy::start(&config);
    let (status, h, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A)), ("x-mock-chunks", "500")],
        body,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        h.get("x-tokenwarden-budget-remaining-tokens")
            .unwrap()
            .to_str()
            .unwrap(),
        budget.to_string()
    );
    let seen = mock.last_request().await;
    assert_eq!(
        seen["output_limit"], 30,
        "the provider was told what the budget affords"
    );
    // The body changed only by the limit spliced in before its closing brace.
    let clamped = format!("{},\"max_completion_tokens\":30}}", &body[..body.len() - 1]);
    assert_eq!(seen["body_len"], clamped.len());
}

#[tokio::test]
async fn clamped_requests_do_not_hold_the_whole_budget() {
    let mock = Mock::start();
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"go"}]}"#;
    let config = budget_config(
        &mock,
        "[[agents.budgets]]\nperiod = \"day\"\ntokens = 1000000",
        "",
    ) + "\n[budgets]\ndefault_reserve_output_tokens = 100\n";
    let proxy = Proxy::start(&config);
    // Two slow streams at once: each reserves its bound, not the whole budget.
    let send = || {
        let req = request(
            "POST",
            &proxy.url("/openai/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer(KEY_A)),
                ("x-mock-chunks", "10"),
                ("x-mock-delay-ms", "30"),
            ],
            body,
        );
        client().request(req)
    };
    let (a, b) = tokio::join!(send(), send());
    assert_eq!(
        (a.unwrap().status().as_u16(), b.unwrap().status().as_u16()),
        (200, 200)
    );
    let seen = mock.last_request().await;
    assert_eq!(seen["output_limit"], 100, "clamped to the default ceiling");
}

#[tokio::test]
async fn reject_and_reserve_default_policies() {
    let mock = Mock::start();
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let budget = "[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000";
    let proxy = Proxy::start(&budget_config(
        &mock,
        budget,
        "\n[budgets]\non_missing_max_tokens = \"reject\"\n",
    ));
    let (status, _, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 400);
    assert!(json(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_completion_tokens"));
    assert!(mock.requests().await.is_empty());

    let proxy = Proxy::start(&budget_config(
        &mock,
        budget,
        "\n[budgets]\non_missing_max_tokens = \"reserve_default\"\ndefault_reserve_output_tokens = 50\n",
    ));
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let seen = mock.last_request().await;
    assert!(seen["output_limit"].is_null(), "the body is left as sent");
    assert_eq!(seen["body_len"], body.len());
}

#[tokio::test]
async fn models_outside_the_allow_list_get_403_and_caps_clamp() {
    let mock = Mock::start();
    let extra = "models = [\"gpt-4o-mini\", \"claude-*\"]\nmax_tokens_cap = 64";
    // Keys of agent-a itself, so before any sub-table: budget_config puts them right
    // after its key, which is its last key.
    let proxy = Proxy::start(&budget_config(&mock, extra, ""));
    let (status, h, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        r#"{"model":"gpt-4o","messages":[]}"#,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(h.get("x-should-retry").unwrap(), "false");
    assert_eq!(json(&b)["error"]["code"], "model_not_allowed");
    let (status, _, b) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A)],
        r#"{"model":"claude-opus-4-6","max_tokens":100000,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(
        mock.last_request().await["output_limit"],
        64,
        "asked 100000, capped at 64"
    );
    let (status, _, b) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A)],
        r#"{"model":"gpt-4o","max_tokens":1,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(json(&b)["error"]["type"], "permission_error");
    // Another agent without an allow-list is not affected.
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_B))],
        r#"{"model":"gpt-4o","messages":[]}"#,
    )
    .await;
    assert_eq!(status, 200);
}

/// A body whose fields can be read but that is not JSON a full parse accepts (a lone
/// surrogate in a message, invalid UTF-8 in a string) cannot take the output limit. It
/// must be refused, never sent on without the limit its reservation or cap assumed:
/// a lenient upstream would generate as much as it likes.
#[tokio::test]
async fn a_body_that_cannot_take_the_output_limit_is_refused_not_sent_without_it() {
    let mock = Mock::start();
    // agent-a: a cap and a budget; agent-b (in the tail): a cap only.
    let budget = "max_tokens_cap = 64\n[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000";
    let proxy = Proxy::start(&budget_config(&mock, budget, ""));
    let config_b = budget_config(&mock, "", "");
    let key_b_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_B)
    );
    let proxy_b = Proxy::start(&config_b.replacen(
        &key_b_line,
        &format!("{key_b_line}max_tokens_cap = 64\n"),
        1,
    ));
    let lone_surrogate =
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"\ud800"}]}"#;
    let mut bad_utf8 = br#"{"model":"gpt-4o-mini","max_completion_tokens":100000,"messages":[{"role":"user","content":"x"#.to_vec();
    bad_utf8.extend_from_slice(b"\xff\"}]}");
    let bodies: [(&str, Vec<u8>); 2] = [
        ("lone surrogate", lone_surrogate.as_bytes().to_vec()),
        ("invalid UTF-8", bad_utf8),
    ];
    for (what, body) in bodies {
        for (proxy, key) in [(&proxy, KEY_A), (&proxy_b, KEY_B)] {
            let (status, _, answer) = send(request(
                "POST",
                &proxy.url("/openai/v1/chat/completions"),
                &[
                    ("content-type", "application/json"),
                    ("authorization", &bearer(key)),
                ],
                body.clone(),
            ))
            .await;
            assert_eq!(status, 400, "{what}: {}", String::from_utf8_lossy(&answer));
            let message = json(&answer)["error"]["message"].to_string();
            assert!(
                message.contains("not JSON the proxy can read"),
                "{what}: {message}"
            );
        }
    }
    // The cap holds for a body the proxy cannot read at all: JSON not marked as such, or
    // a limit given twice (the fields' read refuses it; a lenient upstream takes the
    // last), even where the endpoint's own default limit needs no writing.
    for (content_type, path, body) in [
        (
            "text/plain",
            "/openai/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        ),
        (
            "application/json",
            "/openai/v1/completions",
            r#"{"model":"gpt-4o-mini","prompt":"x","max_tokens":1,"max_tokens":100000}"#,
        ),
    ] {
        let (status, _, answer) = send(request(
            "POST",
            &proxy_b.url(path),
            &[
                ("content-type", content_type),
                ("authorization", &bearer(KEY_B)),
            ],
            body,
        ))
        .await;
        assert_eq!(status, 400, "{path}: {}", String::from_utf8_lossy(&answer));
    }
    let lines = proxy_b.wait_for_audit_lines(4).await;
    assert!(
        lines
            .iter()
            .all(|l| l["outcome"] == "rejected" && l["reason"] == "unreadable_body"),
        "{lines:?}"
    );
    assert!(
        mock.requests().await.is_empty(),
        "nothing went upstream without its output limit"
    );
    // A readable body without a limit still gets the cap.
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(mock.last_request().await["output_limit"], 64);
    // The legacy completions' explicit null: no limit to some servers, so the cap is
    // written (absent, the API's own default of 16 is under the cap and stays).
    let (status, _, _) = post_json(
        &proxy_b.url("/openai/v1/completions"),
        &[("authorization", &bearer(KEY_B))],
        r#"{"model":"gpt-4o-mini","prompt":"x","max_tokens":null}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(mock.last_request().await["output_limit"], 64);
}

#[tokio::test]
async fn reservations_are_released_when_streams_fail_or_clients_leave() {
    let mock = Mock::start();
    let proxy = Proxy::start(&budget_config(
        &mock,
        "[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000",
        "",
    ));
    for fault in [
        vec![("x-mock-fault", "drop-mid-stream")],
        vec![("x-mock-fault", "reset")],
    ] {
        let auth = bearer(KEY_A);
        let mut headers = vec![
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
            ("x-mock-chunks", "10"),
        ];
        headers.extend(fault);
        let req = request(
            "POST",
            &proxy.url("/openai/v1/chat/completions"),
            &headers,
            STREAM,
        );
        if let Ok(response) = client().request(req).await {
            let mut body = response.into_body();
            while let Some(Ok(_)) = body.frame().await {}
        }
    }
    // A client that leaves mid-stream.
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-chunks", "20"),
            ("x-mock-delay-ms", "50"),
        ],
        STREAM,
    );
    let response = client().request(req).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);

    let want =
        "tokenwarden_budget_reserved{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"} 0";
    for _ in 0..250 {
        let m = proxy.metrics_text().await;
        if m.contains(want) && proxy.audit_lines().len() == 3 {
            let lines = proxy.audit_lines();
            let spent = spent_tokens(&lines, "agent-a");
            let remaining = format!(
                "tokenwarden_budget_remaining{{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"}} {}",
                100000 - spent
            );
            assert!(
                m.contains(&remaining),
                "spend is what was used, not what was reserved: {remaining}\n{m}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("reservations were not released");
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let mock = Mock::start();
    let limits =
        "[agents.limits]\nrequests_per_minute = 2\nmax_concurrent = 1\ntokens_per_minute = 100000";
    let proxy = Proxy::start(&budget_config(&mock, limits, ""));
    let body = r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[]}"#;

    // One slow stream in flight: a second request of the same agent is refused at once.
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-chunks", "5"),
            ("x-mock-delay-ms", "100"),
        ],
        r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":5,"messages":[]}"#,
    );
    let slow = client().request(req).await.unwrap();
    let (status, h, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(h.get("retry-after").unwrap(), "1");
    assert_eq!(json(&b)["error"]["code"], "rate_limit_exceeded");
    assert!(json(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("in flight"));
    slow.into_body().collect().await.unwrap();

    // Requests per minute: 2 allowed; the slow stream took one (the one refused for
    // concurrency took none), this takes the other, the next is refused.
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let (status, h, b) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A)],
        body,
    )
    .await;
    assert_eq!(status, 429);
    let retry: u64 = header_num(&h, "retry-after");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(json(&b)["error"]["type"], "rate_limit_error");
    // Another agent is not limited.
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_B))],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let metrics = proxy.metrics_text().await;
    assert!(
        metrics
            .contains("tokenwarden_rejections_total{agent=\"agent-a\",reason=\"rate_limited\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn tokens_per_minute_are_reserved_like_a_budget() {
    let mock = Mock::start();
    let body = r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[]}"#;
    // Room for one request's worst case, not two.
    let tpm = (body.len() as u64 + 10) * 3 / 2;
    let proxy = Proxy::start(&budget_config(
        &mock,
        &format!("[agents.limits]\ntokens_per_minute = {tpm}"),
        "",
    ));
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-chunks", "5"),
            ("x-mock-delay-ms", "100"),
        ],
        r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":10,"messages":[]}"#,
    );
    let slow = client().request(req).await.unwrap();
    assert_eq!(slow.status(), 200);
    let (status, h, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 429, "{}", String::from_utf8_lossy(&b));
    let retry: u64 = header_num(&h, "retry-after");
    assert!((1..=60).contains(&retry));
    assert!(json(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tokens per minute"));
    assert!(
        h.get("x-should-retry").is_none(),
        "a rate limit is worth retrying"
    );
    slow.into_body().collect().await.unwrap();
}

#[tokio::test]
async fn kill_9_under_load_loses_no_settled_spend_and_charges_nothing_twice() {
    let mock = Mock::start();
    let budget = "[[agents.budgets]]\nperiod = \"total\"\ntokens = 100000000";
    // Snapshots all along: the crash lands between two of them, or in one.
    let config = budget_config(&mock, budget, "").replace(
        "[upstream]",
        "[storage]\nsnapshot_interval = \"20ms\"\n[upstream]",
    );
    let proxy = Proxy::start(&config);
    let url = proxy.url("/openai/v1/chat/completions");
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"load"}]}"#;

    // 40 streams of different lengths; the proxy dies while some are in flight.
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let req = request(
            "POST",
            &url,
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer(KEY_A)),
                ("x-mock-chunks", &(5 + i % 10).to_string()),
                ("x-mock-delay-ms", &(10 * (i % 8)).to_string()),
            ],
            body,
        );
        tasks.push(tokio::spawn(async move {
            let Ok(response) = client().request(req).await else {
                return false;
            };
            let mut body = response.into_body();
            loop {
                match body.frame().await {
                    None => return true,
                    Some(Ok(_)) => {}
                    Some(Err(_)) => return false,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let data = proxy.dir.path().join("data");
    wait_for_snapshot(&data, 1).await;
    let mut proxy = proxy;
    let proc = &mut proxy.proc;
    std::process::Command::new("kill")
        .args(["-9", &proc.pid().to_string()])
        .status()
        .unwrap();
    proc.child.wait().unwrap();
    let mut completed = 0;
    for t in tasks {
        completed += usize::from(t.await.unwrap());
    }

    // The chain verifies (a torn last line, if any, is cut at the next start).
    let config2 = with_storage(&config, &data);
    let proxy = Proxy::start(&config2);
    let lines = audit_lines_in(&data.join("audit"));
    let out = std::process::Command::new(bin())
        .args(["audit", "verify"])
        .arg(data.join("audit"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every settled request is in the log once; the completed ones with the exact usage
    // the mock served.
    let ok: Vec<&Value> = lines.iter().filter(|l| l["outcome"] == "ok").collect();
    assert!(
        ok.len() <= completed,
        "{} settled ok, {completed} completed at the client",
        ok.len()
    );
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), lines.len(), "a request was written twice");
    for line in &ok {
        assert_eq!(line["estimated"], false);
        assert!(
            (5..=14).contains(&line["output_tokens"].as_u64().unwrap()),
            "{line}"
        );
    }

    // After the restart the ledger holds exactly what the log holds, rebuilt from the
    // last snapshot and the lines after it.
    let snapshot_seq = wait_for_snapshot(&data, 1).await["seq"].as_u64().unwrap();
    assert!(snapshot_seq <= lines.len() as u64, "{snapshot_seq}");
    proxy
        .wait_for_log(
            &format!(
                "budgets rebuilt from snapshot at seq {snapshot_seq} plus {} audit lines",
                lines.len() as u64 - snapshot_seq
            ),
            1,
        )
        .await;
    let spent = spent_tokens(&lines, "agent-a");
    let metrics = proxy.metrics_text().await;
    let want = format!(
        "tokenwarden_budget_remaining{{agent=\"agent-a\",period=\"total\",team=\"\",unit=\"tokens\"}} {}",
        100_000_000 - spent
    );
    assert!(metrics.contains(&want), "{want}\n{metrics}");
}

#[tokio::test]
async fn budgets_cannot_be_slipped_past() {
    let mock = Mock::start();
    let budget = "[[agents.budgets]]\nperiod = \"day\"\nusd = 1.0\ntokens = 1000";
    let proxy = Proxy::start(&budget_config(&mock, budget, ""));
    let auth = bearer(KEY_A);
    let url = proxy.url("/openai/v1/chat/completions");
    let headers = [("authorization", auth.as_str())];
    let post = |body: &'static str| post_json(&url, &headers, body);

    // A model without a price cannot be held to a dollar budget.
    let (status, _, b) = post(r#"{"model":"free-llama","max_tokens":5,"messages":[]}"#).await;
    assert_eq!(status, 403);
    assert_eq!(json(&b)["error"]["code"], "unpriced_model");
    assert!(json(&b)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("has no price"));
    // A body the proxy cannot read (here a duplicate key) cannot be held to a budget.
    let (status, _, _) = post(r#"{"model":"gpt-4o-mini","model":"gpt-4o","max_tokens":5}"#).await;
    assert_eq!(status, 400);
    // Every choice may use the whole output limit: n = 100 does not fit 1000 tokens.
    let (status, _, b) =
        post(r#"{"model":"gpt-4o-mini","n":100,"max_tokens":10,"messages":[]}"#).await;
    assert_eq!(status, 402, "{}", String::from_utf8_lossy(&b));
    // A path spelled with encoded letters is refused, not metered as an unknown endpoint.
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completion%73"),
        &[("authorization", &auth)],
        "{}",
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        mock.requests().await.is_empty(),
        "nothing reached the provider"
    );
}

#[tokio::test]
async fn provider_errors_are_not_charged() {
    let mock = Mock::start();
    let proxy = Proxy::start(&budget_config(
        &mock,
        "[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000",
        "",
    ));
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A)), ("x-mock-status", "429")],
        r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"a long prompt that would cost tokens"}]}"#,
    )
    .await;
    assert_eq!(status, 429);
    let line = proxy.wait_for_audit_lines(1).await.remove(0);
    assert_eq!(line["outcome"], "provider_error");
    assert_eq!(line["input_tokens"], 0);
    assert_eq!(line["estimated"], false);
    let metrics = proxy.metrics_text().await;
    assert!(metrics.contains(
        "tokenwarden_budget_remaining{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"} 100000"
    ));
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_still_settled_and_audited() {
    let mock = Mock::start();
    let proxy = Proxy::start(&budget_config(
        &mock,
        "[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000",
        "",
    ));
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-mock-first-byte-ms", "400"),
        ],
        r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[]}"#,
    );
    let gave_up = tokio::time::timeout(Duration::from_millis(100), client().request(req)).await;
    assert!(gave_up.is_err(), "the client gave up before the answer");
    let line = proxy.wait_for_audit_lines(1).await.remove(0);
    assert_eq!(line["outcome"], "client_gone");
    assert_eq!(line["agent"], "agent-a");
    let metrics = proxy.metrics_text().await;
    assert!(metrics.contains(
        "tokenwarden_budget_reserved{agent=\"agent-a\",period=\"day\",team=\"\",unit=\"tokens\"} 0"
    ));
}

// === restarts and the ledger snapshot ===

/// agent-a and agent-b both in team-1: agent-a has a day and a total budget, the team a
/// total budget (the tightest for both, so the remaining-tokens header shows the team's
/// spend, which a restart derives from its agents). The snapshot every `interval`.
fn restart_config(mock: &Mock, interval: &str, timezone: &str) -> String {
    let budgets = "[[agents.budgets]]\nperiod = \"day\"\ntokens = 1000000\n\
                   [[agents.budgets]]\nperiod = \"total\"\ntokens = 2000000";
    let tail = format!(
        "\n[[teams]]\nid = \"team-1\"\n[[teams.budgets]]\nperiod = \"total\"\ntokens = {TEAM_TOKENS}\n\
         [budgets]\ntimezone = \"{timezone}\"\n"
    );
    budget_config(mock, budgets, &tail)
        .replacen("id = \"agent-b\"", "id = \"agent-b\"\nteam = \"team-1\"", 1)
        .replace(
            "[upstream]",
            &format!("[storage]\nsnapshot_interval = \"{interval}\"\n[upstream]"),
        )
}

const TEAM_TOKENS: u64 = 500_000;

/// What the team budget has left after the spend in `lines`.
fn team_remaining(lines: &[Value]) -> u64 {
    TEAM_TOKENS - spent_tokens(lines, "agent-a") - spent_tokens(lines, "agent-b")
}

/// One small chat request; its response headers.
async fn chat(proxy: &Proxy, key: &str) -> http::HeaderMap {
    let (status, h, b) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(key))],
        r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    h
}

/// Stops the proxy as a crash would: nothing is written on the way out.
fn crash(proxy: Proxy) {
    let mut proxy = proxy;
    let proc = &mut proxy.proc;
    std::process::Command::new("kill")
        .args(["-9", &proc.pid().to_string()])
        .status()
        .unwrap();
    proc.child.wait().unwrap();
}

/// Stops the proxy with SIGTERM and waits until it has exited (the audit log and the
/// snapshot closed).
fn stop(proxy: Proxy) -> String {
    let mut proxy = proxy;
    let proc = &mut proxy.proc;
    std::process::Command::new("kill")
        .args(["-TERM", &proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(proc.child.wait().unwrap().success(), "{}", proc.log_text());
    proc.log_text()
}

/// The budget gauges of a metrics page, sorted.
fn budget_gauges(metrics: &str) -> Vec<String> {
    let mut lines: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("tokenwarden_budget_remaining{"))
        .map(str::to_owned)
        .collect();
    lines.sort();
    assert!(!lines.is_empty(), "no budget gauges in\n{metrics}");
    lines
}

#[tokio::test]
async fn a_restart_resumes_from_the_snapshot_plus_the_lines_after_it() {
    let mock = Mock::start();
    let data = tempfile::tempdir().unwrap();
    let start = |interval: &str| {
        Proxy::start(&with_storage(
            &restart_config(&mock, interval, "UTC"),
            data.path(),
        ))
    };

    // Snapshots every 100 ms: spend, and wait for one that holds all of it.
    let proxy = start("100ms");
    for key in [KEY_A, KEY_B, KEY_A, KEY_A, KEY_B] {
        chat(&proxy, key).await;
    }
    wait_for_audit_lines_in(&data.path().join("audit"), 5).await;
    let snapshot = wait_for_snapshot(data.path(), 5).await;
    assert_eq!(snapshot["version"], 2);
    assert_eq!(snapshot["timezone"], "UTC");
    let lines = audit_lines_in(&data.path().join("audit"));
    assert_eq!(
        snapshot["hash"], lines[4]["hash"],
        "the hash of its last line"
    );
    assert_eq!(
        snapshot["agents"]["agent-b"]["total"]["tokens"].as_u64(),
        Some(spent_tokens(&lines, "agent-b"))
    );
    crash(proxy);

    // Spend after the snapshot, in a run that writes no other before it dies.
    let proxy = start("1h");
    proxy
        .wait_for_log(
            "budgets rebuilt from snapshot at seq 5 plus 0 audit lines",
            1,
        )
        .await;
    for key in [KEY_B, KEY_A, KEY_A] {
        chat(&proxy, key).await;
    }
    wait_for_audit_lines_in(&data.path().join("audit"), 8).await;
    let lines = audit_lines_in(&data.path().join("audit"));
    let before = budget_gauges(&proxy.metrics_text().await);
    crash(proxy);
    assert_eq!(wait_for_snapshot(data.path(), 0).await["seq"], 5);

    // The snapshot plus the three lines after it: the same budgets as before.
    let proxy = start("1h");
    proxy
        .wait_for_log(
            "budgets rebuilt from snapshot at seq 5 plus 3 audit lines",
            1,
        )
        .await;
    assert_eq!(budget_gauges(&proxy.metrics_text().await), before);
    let h = chat(&proxy, KEY_A).await;
    assert_eq!(
        header_num::<u64>(&h, "x-tokenwarden-budget-remaining-tokens"),
        team_remaining(&lines)
    );
}

#[tokio::test]
async fn the_lines_a_snapshot_holds_are_not_read_again() {
    let mock = Mock::start();
    let data = tempfile::tempdir().unwrap();
    let config = with_storage(&restart_config(&mock, "1h", "UTC"), data.path());

    // A snapshot is written at shutdown, however long the interval.
    let proxy = Proxy::start(&config);
    for key in [KEY_A, KEY_A, KEY_B, KEY_A] {
        chat(&proxy, key).await;
    }
    wait_for_audit_lines_in(&data.path().join("audit"), 4).await;
    stop(proxy);
    assert_eq!(wait_for_snapshot(data.path(), 4).await["seq"], 4);
    let lines = audit_lines_in(&data.path().join("audit"));
    let remaining = team_remaining(&lines);

    // Rewrite the first line, inside the snapshot, to 1000 more input tokens.
    let file = tokenwarden::audit::log_files(&data.path().join("audit"))
        .unwrap()
        .remove(0);
    let text = std::fs::read_to_string(&file).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let n = lines[0]["input_tokens"].as_u64().unwrap();
    let edited = first.replacen(
        &format!("\"input_tokens\":{n},"),
        &format!("\"input_tokens\":{},", n + 1000),
        1,
    );
    assert_ne!(edited, first);
    std::fs::write(&file, format!("{edited}\n{rest}")).unwrap();

    // From the snapshot: the edit is not seen.
    let proxy = Proxy::start(&config);
    proxy
        .wait_for_log(
            "budgets rebuilt from snapshot at seq 4 plus 0 audit lines",
            1,
        )
        .await;
    let h = chat(&proxy, KEY_A).await;
    assert_eq!(
        header_num::<u64>(&h, "x-tokenwarden-budget-remaining-tokens"),
        remaining
    );
    wait_for_audit_lines_in(&data.path().join("audit"), 5).await;
    crash(proxy);

    // Without the snapshot the whole log is replayed, the edit with it.
    std::fs::remove_file(snapshot_path(data.path())).unwrap();
    let proxy = Proxy::start(&config);
    proxy
        .wait_for_log("budgets rebuilt from the audit log (5 lines)", 1)
        .await;
    assert!(proxy.proc.log_text().contains("no ledger snapshot"));
    let lines = audit_lines_in(&data.path().join("audit"));
    let h = chat(&proxy, KEY_A).await;
    let replayed = header_num::<u64>(&h, "x-tokenwarden-budget-remaining-tokens");
    assert_eq!(replayed, team_remaining(&lines));
    assert!(replayed + 1000 < remaining, "{replayed} vs {remaining}");
}

#[tokio::test]
async fn a_snapshot_that_does_not_fit_is_ignored_and_the_log_replayed() {
    let mock = Mock::start();
    let data = tempfile::tempdir().unwrap();
    let config = |tz: &str| with_storage(&restart_config(&mock, "1h", tz), data.path());
    let proxy = Proxy::start(&config("UTC"));
    for key in [KEY_A, KEY_B, KEY_A] {
        chat(&proxy, key).await;
    }
    wait_for_audit_lines_in(&data.path().join("audit"), 3).await;
    let before = budget_gauges(&proxy.metrics_text().await);
    stop(proxy);
    let good = std::fs::read(snapshot_path(data.path())).unwrap();
    let mut past_the_log: Value = serde_json::from_slice(&good).unwrap();
    past_the_log["seq"] = 99.into();

    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "UTC",
            b"\x00\x01 not a snapshot".to_vec(),
            "not a ledger snapshot",
        ),
        ("Europe/Berlin", good, "written for time zone \"UTC\""),
        (
            "UTC",
            serde_json::to_vec(&past_the_log).unwrap(),
            "does not hold line 99",
        ),
    ];
    for (tz, snapshot, why) in cases {
        std::fs::write(snapshot_path(data.path()), snapshot).unwrap();
        let proxy = Proxy::start(&config(tz));
        proxy
            .wait_for_log("budgets rebuilt from the audit log (3 lines)", 1)
            .await;
        let log = proxy.proc.log_text();
        assert!(
            log.contains("WARN")
                && log.contains("ignoring the ledger snapshot")
                && log.contains(why),
            "{log}"
        );
        // The periods here are total and a day of spend made just now, in either zone.
        assert_eq!(budget_gauges(&proxy.metrics_text().await), before, "{tz}");
        crash(proxy);
    }
}
