//! The audit log end to end: one chained line per request, what a security reviewer
//! needs and no secret, and `tokenwarden audit verify` catching any edit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn verify(proxy: &Proxy) -> (bool, String) {
    let out = Command::new(bin())
        .args([
            "audit",
            "verify",
            "--config",
            proxy.dir.path().join("tokenwarden.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn every_request_is_one_chained_line_without_secrets() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let body =
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"a secret prompt"}]}"#;
    let (status, headers, _) = post_json(
        &proxy.url("/openai/v1/chat/completions?api-key=query-secret"),
        &[("authorization", &bearer(KEY_A)), ("x-mock-chunks", "3")],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let request_id = headers
        .get("x-tokenwarden-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let (status, _, _) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", "tw-not-a-key")],
        "{}",
    )
    .await;
    assert_eq!(status, 401);

    let lines = proxy.wait_for_audit_lines(2).await;
    assert_eq!(lines.len(), 2);
    let ok = &lines[0];
    assert_eq!(ok["seq"], 1);
    assert_eq!(ok["kind"], "request");
    assert_eq!(ok["request_id"], request_id.as_str());
    assert_eq!(ok["agent"], "agent-a");
    assert_eq!(ok["team"], "team-1");
    assert_eq!(ok["provider"], "openai");
    assert_eq!(ok["model"], "gpt-4o-mini");
    assert_eq!(ok["method"], "POST");
    assert_eq!(ok["path"], "/openai/v1/chat/completions", "no query string");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["outcome"], "ok");
    assert_eq!(ok["reason"], "complete");
    let prompt = (body.len() / 4) as u64;
    assert_eq!(ok["input_tokens"], prompt);
    assert_eq!(ok["output_tokens"], 3);
    assert_eq!(ok["estimated"], false);
    let cost = (prompt as f64 * 0.15 + 3.0 * 0.60) / 1e6;
    assert!((ok["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12);
    assert_eq!(
        ok["fingerprint"],
        hex::encode(Sha256::digest(body.as_bytes()))
    );
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["ttfb_ms"].as_f64().is_some());
    assert!(ok["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        ok.get("request_body").is_none(),
        "no prompt text by default"
    );

    let rejected = &lines[1];
    assert_eq!(rejected["seq"], 2);
    assert_eq!(rejected["prev_hash"], ok["hash"]);
    assert_eq!(rejected["outcome"], "rejected");
    assert_eq!(rejected["reason"], "unauthorized");
    assert_eq!(rejected["status"], 401);
    assert!(rejected["agent"].is_null());

    let raw: String = tokenwarden::audit::log_files(&proxy.dir.path().join("data/audit"))
        .unwrap()
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    for secret in [
        KEY_A,
        OPENAI_KEY,
        ANTHROPIC_KEY,
        "tw-not-a-key",
        "query-secret",
        "a secret prompt",
    ] {
        assert!(!raw.contains(secret), "{secret} leaked into the audit log");
    }
    proxy
        .wait_for_metric("tokenwarden_audit_records_total 2")
        .await;

    let (ok, text) = verify(&proxy);
    assert!(ok, "{text}");
    assert!(text.contains("ok: 2 records"), "{text}");
}

#[tokio::test]
async fn verify_finds_an_edited_line_and_restarts_continue_the_chain() {
    let mock = Mock::start();
    let config = config(&mock);
    let proxy = Proxy::start(&config);
    for _ in 0..3 {
        let (status, _, _) = post_json(
            &proxy.url("/openai/v1/embeddings"),
            &[("authorization", &bearer(KEY_B))],
            r#"{"model":"text-embedding-3-small","input":"x"}"#,
        )
        .await;
        assert_eq!(status, 200);
    }
    proxy.wait_for_audit_lines(3).await;

    // A graceful restart on the same data directory continues the chain.
    let mut first = proxy;
    Command::new("kill")
        .args(["-TERM", &first.proc.pid().to_string()])
        .status()
        .unwrap();
    first.proc.child.wait().unwrap();
    let data = first.dir.path().join("data");
    let config2 = with_storage(&config, &data);
    let proxy = Proxy::start(&config2);
    let (status, _, _) = get(
        &proxy.url("/openai/v1/models"),
        &[("authorization", &bearer(KEY_B))],
    )
    .await;
    assert_eq!(status, 200);
    let lines = {
        let mut lines = Vec::new();
        for _ in 0..200 {
            lines = tokenwarden::audit::log_files(&data.join("audit"))
                .unwrap()
                .iter()
                .flat_map(|f| {
                    std::fs::read_to_string(f)
                        .unwrap()
                        .lines()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect();
            if lines.len() == 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        lines
    };
    assert_eq!(lines.len(), 4);
    let last: Value = serde_json::from_str(&lines[3]).unwrap();
    assert_eq!(last["seq"], 4);
    assert_eq!(last["path"], "/openai/v1/models");
    assert_eq!(last["input_tokens"], 0, "unmetered endpoints cost nothing");

    let check = |paths: &[&std::path::Path]| {
        let out = Command::new(bin())
            .arg("audit")
            .arg("verify")
            .args(paths)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let audit_dir = data.join("audit");
    let (ok, text) = check(&[&audit_dir]);
    assert!(ok, "{text}");
    assert!(text.contains("ok: 4 records"), "{text}");

    // Change one figure in line 2: verify names the line and exits 1.
    let file = tokenwarden::audit::log_files(&audit_dir).unwrap().remove(0);
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text
        .replacen("\"cost_usd\":", "\"cost_usd\":1", 2)
        .replacen("\"cost_usd\":1", "\"cost_usd\":", 1);
    std::fs::write(&file, edited).unwrap();
    let (ok, text) = check(&[&audit_dir]);
    assert!(!ok);
    assert!(text.contains(":2: seq 2: the line was altered"), "{text}");
}

#[tokio::test]
async fn audit_lines_agree_with_the_metrics_for_a_mixed_load() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    let auth = bearer(KEY_A);
    let chat =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"a"}]}"#;
    for headers in [
        vec![("x-mock-chunks", "4")],
        vec![("x-mock-chunks", "10"), ("x-mock-fault", "drop-mid-stream")],
    ] {
        let mut all = vec![
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
        ];
        all.extend(headers);
        let response = client()
            .request(request(
                "POST",
                &proxy.url("/openai/v1/chat/completions"),
                &all,
                chat,
            ))
            .await
            .unwrap();
        let mut body = response.into_body();
        while let Some(Ok(_)) = http_body_util::BodyExt::frame(&mut body).await {}
    }
    let (status, _, _) = post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", KEY_A), ("x-mock-cached-tokens", "7")],
        r#"{"model":"claude-haiku-4-5","max_tokens":9,"messages":[]}"#,
    )
    .await;
    assert_eq!(status, 200);

    let lines = proxy.wait_for_audit_lines(3).await;
    assert_eq!(lines.len(), 3);
    // Lines are in settlement order: the cut stream settles last (it counts tokens).
    let by = |provider: &str, outcome: &str| {
        lines
            .iter()
            .find(|l| l["provider"] == provider && l["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {provider} {outcome} line in {lines:?}"))
    };
    assert_eq!(
        by("openai", "ok")["estimated"],
        false,
        "usage was injected and reported"
    );
    assert_eq!(by("openai", "upstream_error")["estimated"], true);
    assert_eq!(by("anthropic", "ok")["cached_input_tokens"], 7);

    let metrics = proxy.metrics_text().await;
    let metric_sum = |name: &str, filter: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    };
    for (field, kind) in [
        ("input_tokens", "input"),
        ("cached_input_tokens", "cached_input"),
        ("output_tokens", "output"),
    ] {
        let audited: u64 = lines.iter().map(|l| l[field].as_u64().unwrap()).sum();
        let counted = metric_sum("tokenwarden_tokens_total{", &format!("kind=\"{kind}\""));
        assert_eq!(audited as f64, counted, "{field}");
    }
    let audited_cost: f64 = lines.iter().map(|l| l["cost_usd"].as_f64().unwrap()).sum();
    assert!((audited_cost - metric_sum("tokenwarden_cost_usd_total{", "")).abs() < 1e-9);
    let (ok, text) = verify(&proxy);
    assert!(ok, "{text}");
}

#[tokio::test]
async fn bodies_are_written_only_when_asked() {
    let mock = Mock::start();
    let config = config(&mock).replace("[upstream]", "[audit]\ninclude_bodies = true\n[upstream]");
    let proxy = Proxy::start(&config);
    let body =
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"the prompt text"}]}"#;
    let (status, _, _) = post_json(
        &proxy.url("/openai/v1/chat/completions"),
        &[("authorization", &bearer(KEY_A))],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let line = proxy.wait_for_audit_lines(1).await.remove(0);
    assert_eq!(line["request_body"], body);
    assert!(line["response_body"]
        .as_str()
        .unwrap()
        .contains("tok0 tok1"));
}

/// A proxy whose audit log gives every record a file of its own (bodies in the log, a
/// small file size), so the name of the next file is known and can be blocked; and a
/// request body large enough for that.
fn proxy_with_a_file_per_record(mock: &Mock) -> (Proxy, String) {
    let config = config(mock).replace(
        "[upstream]",
        "[audit]\ninclude_bodies = true\nmax_file_bytes = 4096\n[upstream]",
    );
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(5000)
    );
    (Proxy::start(&config), big)
}

#[tokio::test]
async fn an_unwritable_log_fails_closed_with_503_and_recovers() {
    let mock = Mock::start();
    let (proxy, big) = proxy_with_a_file_per_record(&mock);
    let auth = bearer(KEY_A);
    let url = proxy.url("/openai/v1/chat/completions");
    let headers = [("authorization", auth.as_str())];
    let send_one = || post_json(&url, &headers, &big);
    assert_eq!(send_one().await.0, 200);
    proxy.wait_for_audit_lines(1).await;
    let blocker = proxy.dir.path().join("data/audit/audit-000000000002.jsonl");
    std::fs::create_dir(&blocker).unwrap();
    assert_eq!(
        send_one().await.0,
        200,
        "in flight when the disk failed: served, record kept"
    );

    let mut refused = None;
    for _ in 0..200 {
        let (status, _, body) = send_one().await;
        if status == 503 {
            refused = Some(body);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let body = refused.expect("the proxy kept serving with an unwritable audit log");
    let v = json(&body);
    assert_eq!(v["error"]["code"], "service_unavailable");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("audit log"),
        "{v}"
    );

    std::fs::remove_dir(&blocker).unwrap();
    let mut recovered = false;
    for _ in 0..200 {
        if send_one().await.0 == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(recovered, "the proxy did not recover when the disk did");
    let m = proxy.metrics_text().await;
    assert!(
        !m.contains("tokenwarden_audit_write_errors_total 0"),
        "write errors were counted"
    );
    // Nothing was lost: the chain verifies and holds every request, refused ones too.
    let (ok, text) = verify(&proxy);
    assert!(ok, "{text}");
}

/// The scheduling policy of a thread of `pid` by name, from `/proc` (0 normal, 5 idle).
fn thread_policy(pid: u32, name: &str) -> Option<u32> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let task = task.ok()?.path();
        if std::fs::read_to_string(task.join("comm")).ok()?.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        // Fields after the name in parentheses begin with the third, `state`; the policy
        // is the 41st.
        let after_name = &stat[stat.rfind(')')? + 2..];
        return after_name.split(' ').nth(41 - 3)?.parse().ok();
    }
    None
}

/// Whether this process may raise a thread's priority (`CAP_SYS_NICE`), as the proxy it
/// starts may.
fn may_renice() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    caps & (1 << 23) != 0
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_writer_yields_the_core_to_requests_where_it_may_take_it_back() {
    let mock = Mock::start();
    let proxy = Proxy::start(&config(&mock));
    for _ in 0..20 {
        let (status, _, _) = post_json(
            &proxy.url("/openai/v1/chat/completions"),
            &[("authorization", &bearer(KEY_A))],
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(proxy.wait_for_audit_lines(20).await.len(), 20);
    // SCHED_IDLE where the proxy could move the writer back when it falls behind; the
    // normal class where it could not.
    let want = if may_renice() { 5 } else { 0 };
    assert_eq!(thread_policy(proxy.proc.pid(), "audit-writer"), Some(want));
    assert_eq!(thread_policy(proxy.proc.pid(), "tokio-rt-worker"), Some(0));
    let (ok, text) = verify(&proxy);
    assert!(ok, "{text}");
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_writer_that_falls_behind_gets_the_normal_class_until_it_has_caught_up() {
    if !may_renice() {
        // It never leaves the normal class: the test above holds that.
        return;
    }
    let mock = Mock::start();
    let (proxy, big) = proxy_with_a_file_per_record(&mock);
    let auth = bearer(KEY_A);
    let url = proxy.url("/openai/v1/chat/completions");
    let headers = [("authorization", auth.as_str())];
    assert_eq!(post_json(&url, &headers, &big).await.0, 200);
    proxy.wait_for_audit_lines(1).await;
    let pid = proxy.proc.pid();
    assert_eq!(thread_policy(pid, "audit-writer"), Some(5));

    // The writer retries a failing write while every refusal queues a record of its own:
    // past 256 queued, the request path moves it to the normal class.
    let blocker = proxy.dir.path().join("data/audit/audit-000000000002.jsonl");
    std::fs::create_dir(&blocker).unwrap();
    let mut refused = 0;
    for _ in 0..2000 {
        if post_json(&url, &headers, &big).await.0 == 503 {
            refused += 1;
            if refused > 300 {
                break;
            }
        }
    }
    assert!(refused > 300, "only {refused} requests refused");
    assert_eq!(thread_policy(pid, "audit-writer"), Some(0));

    // Once the disk is back and the backlog written, the writer returns to the idle class
    // (a second after it was moved, at a take of few records).
    std::fs::remove_dir(&blocker).unwrap();
    let mut back = false;
    for _ in 0..100 {
        let _ = post_json(&url, &headers, &big).await;
        if thread_policy(pid, "audit-writer") == Some(5) {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(back, "the writer stayed in the normal class");
    let (ok, text) = verify(&proxy);
    assert!(ok, "{text}");
}
