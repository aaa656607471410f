//! The audit log end to end: one chained line per request, what a security reviewer
//! needs and no secret, and `tokenwarden audit verify` catching any edit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn audit_lines(proxy: &Proxy) -> Vec<Value> {
    let dir = proxy.dir.path().join("data/audit");
    let files = tokenwarden::audit::log_files(&dir).unwrap();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

/// Waits until the log holds `n` lines (the writer commits in groups, asynchronously).
async fn wait_for_lines(proxy: &Proxy, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let lines = audit_lines(proxy);
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!(
        "the audit log never reached {n} lines: {:?}",
        audit_lines(proxy)
    );
}

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

    let lines = wait_for_lines(&proxy, 2).await;
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
    let m = get(&proxy.admin_url("/metrics"), &[]).await.2;
    assert!(String::from_utf8_lossy(&m).contains("tokenwarden_audit_records_total 2"));

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
    wait_for_lines(&proxy, 3).await;

    // A graceful restart on the same data directory continues the chain.
    let dir = proxy.dir;
    let mut proc = proxy.proc;
    Command::new("kill")
        .args(["-TERM", &proc.pid().to_string()])
        .status()
        .unwrap();
    proc.child.wait().unwrap();
    let data = dir.path().join("data");
    let config2 = config.replace(
        "[upstream]",
        &format!("[storage]\ndir = \"{}\"\n[upstream]", data.display()),
    );
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
