//! Spikes against an agent's own baseline: a burst far past its steady rate is an audit
//! line, a metric and, when configured, a pause.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;

async fn chat(proxy: &Proxy, extra: &[(&str, &str)]) -> u16 {
    let auth = bearer(KEY_A);
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    post_json(&proxy.url("/openai/v1/chat/completions"), &headers, CHAT)
        .await
        .0
        .as_u16()
}

#[tokio::test]
async fn a_spike_past_the_baseline_is_reported_and_pauses_the_agent() {
    let mock = Mock::start();
    let config = config(&mock)
        + "[anomalies]\nwindow = \"100ms\"\nfactor = 5.0\nmin_tokens = 1000\npause = true\n";
    let proxy = Proxy::start(&config);
    // A steady agent: one small call per window, long enough to make a baseline.
    for _ in 0..8 {
        assert_eq!(chat(&proxy, &[]).await, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!proxy
        .metrics_text()
        .await
        .contains("tokenwarden_anomalies_total{"));
    // A burst: one answer reports 20,000 output tokens.
    assert_eq!(chat(&proxy, &[("x-mock-usage-output", "20000")]).await, 200);
    proxy
        .wait_for_metric("tokenwarden_anomalies_total{agent=\"agent-a\"} 1")
        .await;
    let lines = proxy.wait_for_audit_lines(11).await;
    let anomaly = lines.iter().find(|l| l["kind"] == "anomaly").unwrap();
    assert_eq!(anomaly["agent"], "agent-a");
    assert_eq!(anomaly["outcome"], "paused");
    assert!(anomaly["detail"]
        .as_str()
        .unwrap()
        .contains("tokens in this window"));
    let pause = lines.iter().find(|l| l["kind"] == "admin").unwrap();
    assert_eq!(pause["reason"], "pause");
    assert_eq!(pause["by"], "anomaly");
    // Paused: the agent is refused, the others are not.
    assert_eq!(chat(&proxy, &[]).await, 403);
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_B))],
        CHAT,
    )
    .await;
    assert_eq!(status, 200);
}
