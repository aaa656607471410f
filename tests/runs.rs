//! Runs and their stop conditions end to end: a scripted runaway loop against the mock
//! provider is stopped at exactly the configured figure, in the provider's own shape,
//! and stays stopped across a restart; `warn` lets calls through with a header; a stream
//! that crosses a limit is cut with an in-band error event.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::Value;

/// The usual config with `[agents.runs]` for agent-a (its `extra` lines).
fn runs_config(mock: &Mock, runs: &str) -> String {
    let key_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_A)
    );
    config(mock).replacen(&key_line, &format!("{key_line}[agents.runs]\n{runs}\n"), 1)
}

fn chat(content: &str) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":5,"messages":[{{"role":"user","content":"{content}"}}]}}"#
    )
}

/// One call of the loop in run `run` (`None`: no run header), as agent-a.
async fn call(
    proxy: &Proxy,
    run: Option<&str>,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, http::HeaderMap, Value) {
    let auth = bearer(KEY_A);
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(run) = run {
        headers.push(("x-tokenwarden-run", run));
    }
    headers.extend_from_slice(extra);
    let (status, headers, body) =
        post_json(&proxy.url("/openai/v1/chat/completions"), &headers, body).await;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status.as_u16(), headers, value)
}

fn assert_stopped(status: u16, headers: &http::HeaderMap, body: &Value, condition: &str) {
    assert_eq!(status, 403, "{body}");
    assert_eq!(headers.get("x-should-retry").unwrap(), "false");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(condition), "{message}");
    assert!(message.contains("the run is stopped"), "{message}");
}

/// The audit log's run lines, once there are `n` (the writer commits a moment later).
async fn run_lines(proxy: &Proxy, n: usize) -> Vec<Value> {
    run_lines_in(&proxy.dir.path().join("data/audit"), n).await
}

async fn run_lines_in(dir: &std::path::Path, n: usize) -> Vec<Value> {
    for _ in 0..250 {
        let lines: Vec<Value> = audit_lines_in(dir)
            .into_iter()
            .filter(|l| l["kind"] == "run")
            .collect();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} run lines in {:?}", audit_lines_in(dir));
}

#[tokio::test]
async fn max_requests_stops_the_run_at_the_figure_and_the_stop_survives_a_restart() {
    let mock = Mock::start();
    let data = tempfile::tempdir().unwrap();
    let config = with_storage(&runs_config(&mock, "max_requests = 3"), data.path());
    let proxy = Proxy::start(&config);
    for i in 0..3 {
        let (status, _, body) =
            call(&proxy, Some("loop-1"), &chat(&format!("step {i}")), &[]).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, headers, body) = call(&proxy, Some("loop-1"), &chat("step 3"), &[]).await;
    assert_stopped(status, &headers, &body, "max_requests");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request 4 of at most 3"),
        "the figures are named: {body}"
    );
    // Every later call of the run is refused; the provider saw exactly three.
    let (status, headers, body) = call(&proxy, Some("loop-1"), &chat("step 4"), &[]).await;
    assert_stopped(status, &headers, &body, "max_requests");
    assert_eq!(mock.requests().await.len(), 3);
    // A new run starts fresh, and agent-b is untouched.
    assert_eq!(call(&proxy, Some("loop-2"), &chat("x"), &[]).await.0, 200);

    let audit = data.path().join("audit");
    let lines = run_lines_in(&audit, 1).await;
    assert_eq!(lines.len(), 1, "one stop line: {lines:?}");
    assert_eq!(lines[0]["outcome"], "stopped");
    assert_eq!(lines[0]["reason"], "max_requests");
    assert_eq!(lines[0]["run"], "loop-1");
    assert_eq!(lines[0]["agent"], "agent-a");
    let refused: Vec<Value> = wait_for_audit_lines_in(&audit, 7)
        .await
        .into_iter()
        .filter(|l| l["reason"] == "run_stopped")
        .collect();
    assert_eq!(refused.len(), 2);
    assert!(refused
        .iter()
        .all(|l| l["run"] == "loop-1" && l["status"] == 403));
    proxy
        .wait_for_metric(
            "tokenwarden_runs_stopped_total{agent=\"agent-a\",condition=\"max_requests\"} 1",
        )
        .await;
    drop(proxy);

    let proxy = Proxy::start(&config);
    let (status, headers, body) = call(&proxy, Some("loop-1"), &chat("after restart"), &[]).await;
    assert_stopped(status, &headers, &body, "max_requests");
    assert_eq!(call(&proxy, Some("loop-2"), &chat("y"), &[]).await.0, 200);
}

#[tokio::test]
async fn anthropic_runs_are_stopped_with_a_permission_error() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_requests = 1"));
    let send = || async {
        post_json(
            &proxy.url("/anthropic/v1/messages"),
            &[
                ("x-api-key", KEY_A),
                ("anthropic-version", "2023-06-01"),
                ("x-tokenwarden-run", "claude-loop"),
            ],
            r#"{"model":"claude-sonnet-4-6","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await
    };
    assert_eq!(send().await.0, 200);
    let (status, headers, body) = send().await;
    assert_eq!(status, 403);
    assert_eq!(headers.get("x-should-retry").unwrap(), "false");
    let v = json(&body);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "permission_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_requests"));
}

#[tokio::test]
async fn warn_lets_calls_through_with_a_header_a_metric_and_an_audit_line() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_requests = 2\naction = \"warn\""));
    for i in 0..2 {
        let (status, headers, _) = call(&proxy, Some("w"), &chat(&i.to_string()), &[]).await;
        assert_eq!(status, 200);
        assert!(headers.get("x-tokenwarden-warning").is_none());
    }
    let (status, headers, _) = call(&proxy, Some("w"), &chat("third"), &[]).await;
    assert_eq!(status, 200, "warn never refuses");
    let warning = headers
        .get("x-tokenwarden-warning")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(warning.contains("max_requests"), "{warning}");
    assert!(warning.contains("request 3 of at most 2"), "{warning}");
    let lines = run_lines(&proxy, 1).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["outcome"], "warning");
    proxy
        .wait_for_metric(
            "tokenwarden_run_warnings_total{agent=\"agent-a\",condition=\"max_requests\"} 1",
        )
        .await;
}

#[tokio::test]
async fn identical_requests_are_counted_whatever_their_spelling() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_repeats = 2"));
    let a =
        r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"same"}]}"#;
    let b = r#"{ "messages": [ { "content": "same", "role": "user" } ], "max_tokens": 7, "model": "gpt-4o-mini" }"#;
    assert_eq!(call(&proxy, Some("r"), a, &[]).await.0, 200);
    assert_eq!(
        call(&proxy, Some("r"), &chat("different"), &[]).await.0,
        200
    );
    assert_eq!(
        call(&proxy, Some("r"), b, &[]).await.0,
        200,
        "the second of two allowed"
    );
    let (status, headers, body) = call(&proxy, Some("r"), a, &[]).await;
    assert_stopped(status, &headers, &body, "max_repeats");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("the same request 3 times"));
}

#[tokio::test]
async fn a_streak_of_upstream_errors_stops_the_run() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_error_streak = 3"));
    let failing = [("x-mock-status", "500")];
    assert_eq!(call(&proxy, Some("e"), &chat("a"), &failing).await.0, 500);
    assert_eq!(call(&proxy, Some("e"), &chat("b"), &failing).await.0, 500);
    // A success in between breaks the streak.
    assert_eq!(call(&proxy, Some("e"), &chat("c"), &[]).await.0, 200);
    for i in 0..3 {
        let body = chat(&format!("f{i}"));
        assert_eq!(call(&proxy, Some("e"), &body, &failing).await.0, 500);
    }
    // The third error in a row stops the run when it settles.
    run_lines(&proxy, 1).await;
    let (status, headers, body) = call(&proxy, Some("e"), &chat("d"), &[]).await;
    assert_stopped(status, &headers, &body, "max_error_streak");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("3 upstream errors in a row"));
}

#[tokio::test]
async fn a_stream_that_crosses_max_tokens_is_cut_with_an_error_event() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_tokens = 40"));
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-tokenwarden-run", "long"),
            ("x-mock-chunks", "500"),
            ("x-mock-delay-ms", "2"),
        ],
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"go"}]}"#,
    );
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    let last = events.last().unwrap();
    assert!(
        last.starts_with("data: {\"error\""),
        "ends with an error event: {last}"
    );
    let error: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    assert!(!text.contains("[DONE]"), "never a clean end");
    let pieces = events
        .iter()
        .filter(|e| e.contains("\"content\":\"tok"))
        .count();
    assert!(
        (30..=45).contains(&pieces),
        "cut near the limit, after {pieces} pieces"
    );
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| serde_json::from_str::<Value>(e.strip_prefix("data: ").unwrap()).is_ok()),
        "every event before the error is whole"
    );
    // The upstream was closed at once: the mock saw its client leave.
    let seen = mock.wait_for_outcome().await;
    assert_ne!(seen["outcome"], "complete", "{seen}");
    // The run is stopped for its next call, at once.
    let (status, headers, body) = call(&proxy, Some("long"), &chat("more"), &[]).await;
    assert_stopped(status, &headers, &body, "max_tokens");
    let line = proxy.wait_for_audit_lines(3).await;
    let request = line
        .iter()
        .find(|l| l["kind"] == "request" && l["status"] == 200)
        .unwrap();
    assert_eq!(request["outcome"], "stopped");
    assert_eq!(request["reason"], "stopped");
    assert_eq!(request["run"], "long");
}

#[tokio::test]
async fn an_anthropic_stream_is_cut_with_an_error_event() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_tokens = 40"));
    let req = request(
        "POST",
        &proxy.url("/anthropic/v1/messages"),
        &[
            ("content-type", "application/json"),
            ("x-api-key", KEY_A),
            ("anthropic-version", "2023-06-01"),
            ("x-mock-chunks", "500"),
        ],
        r#"{"model":"claude-sonnet-4-6","max_tokens":1000,"stream":true,"messages":[{"role":"user","content":"go"}]}"#,
    );
    let response = client().request(req).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let last = text.split("\n\n").filter(|e| !e.is_empty()).last().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{last}");
    let error: Value = serde_json::from_str(last.split_once("data: ").unwrap().1).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "permission_error");
    assert!(!text.contains("message_stop"));
}

#[tokio::test]
async fn a_run_begins_by_itself_after_the_idle_gap() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_requests = 1\nidle_gap = \"1s\""));
    let (status, _, _) = call(&proxy, None, &chat("a"), &[]).await;
    assert_eq!(status, 200);
    let (status, headers, body) = call(&proxy, None, &chat("b"), &[]).await;
    assert_stopped(status, &headers, &body, "max_requests");
    let stopped_run = run_lines(&proxy, 1).await[0]["run"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(stopped_run.starts_with("auto-"), "{stopped_run}");
    // Quiet for longer than the gap: the next call begins a new run.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(call(&proxy, None, &chat("c"), &[]).await.0, 200);
    let last = proxy.wait_for_audit_lines(4).await.pop().unwrap();
    assert_ne!(last["run"], stopped_run.as_str());
}

#[tokio::test]
async fn spend_and_velocity_conditions_stop_the_run() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_usd = 0.000001"));
    // The first call costs more than a micro-dollar: the run stops when it settles.
    assert_eq!(
        call(&proxy, Some("u"), &chat("a"), &[("x-mock-chunks", "5")])
            .await
            .0,
        200
    );
    let (status, headers, body) = call(&proxy, Some("u"), &chat("b"), &[]).await;
    assert_stopped(status, &headers, &body, "max_usd");

    let proxy = Proxy::start(&runs_config(&mock, "max_tokens_per_minute = 20"));
    assert_eq!(
        call(&proxy, Some("v"), &chat("a"), &[("x-mock-chunks", "25")])
            .await
            .0,
        200
    );
    let (status, headers, body) = call(&proxy, Some("v"), &chat("b"), &[]).await;
    assert_stopped(status, &headers, &body, "max_tokens_per_minute");
}

#[tokio::test]
async fn a_stream_past_the_runs_time_is_cut_and_the_run_stopped() {
    let mock = Mock::start();
    let proxy = Proxy::start(&runs_config(&mock, "max_duration = \"300ms\""));
    let req = request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", &bearer(KEY_A)),
            ("x-tokenwarden-run", "slow"),
            ("x-mock-chunks", "100"),
            ("x-mock-delay-ms", "10"),
        ],
        r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":200,"messages":[{"role":"user","content":"go"}]}"#,
    );
    let started = std::time::Instant::now();
    let body = client()
        .request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let last = text.split("\n\n").filter(|e| !e.is_empty()).last().unwrap();
    assert!(last.contains("max_duration"), "{last}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "cut, not run to the end"
    );
    let (status, headers, body) = call(&proxy, Some("slow"), &chat("more"), &[]).await;
    assert_stopped(status, &headers, &body, "max_duration");
}
