//! The admin API end to end: bearer tokens and the audit of every attempt, pausing agents
//! (one or all), stopping runs by id, what survives a restart, the figures it reports,
//! and config reloads by HTTP and by SIGHUP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

const ADMIN_TOKEN: &str = "tw-test-admin-token-for-the-admin-api";
const OPS_TOKEN: &str = "tw-test-ops-token-for-the-admin-api";
const KEY_C: &str = "tw-test-virtual-key-agent-c";
const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":20,"messages":[{"role":"user","content":"hello"}]}"#;
const MESSAGES: &str = r#"{"model":"claude-3-5-haiku-latest","max_tokens":20,"messages":[{"role":"user","content":"hello"}]}"#;

/// The usual config with an `admin` token and a named `ops` token.
fn admin_config(mock: &Mock) -> String {
    with_admin_tokens(&config(mock))
}

fn with_admin_tokens(config: &str) -> String {
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    assert!(config.contains(admin));
    config.replacen(
        admin,
        &format!(
            "{admin}token_env = \"TW_TEST_ADMIN_TOKEN\"\n\
             [[admin.tokens]]\nname = \"ops\"\ntoken_env = \"TW_TEST_OPS_TOKEN\"\n"
        ),
        1,
    )
}

/// The config with a third agent, known by `KEY_C`.
fn with_agent_c(config: &str) -> String {
    format!(
        "{config}\n[[agents]]\nid = \"agent-c\"\nkey_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_C)
    )
}

fn start(config: &str) -> Proxy {
    Proxy::start_with_env(
        config,
        &[
            ("TW_TEST_OPENAI_KEY", OPENAI_KEY),
            ("TW_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY),
            ("TW_TEST_ADMIN_TOKEN", ADMIN_TOKEN),
            ("TW_TEST_OPS_TOKEN", OPS_TOKEN),
        ],
    )
}

/// An admin request with `token` (if any); the answer's status, headers and JSON body.
async fn admin(
    proxy: &Proxy,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let auth = token.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let (status, headers, body) = send(request(
        method,
        &proxy.admin_url(path),
        &headers,
        Bytes::new(),
    ))
    .await;
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/json",
        "{method} {path}"
    );
    (status, headers, json(&body))
}

/// `admin` with the `admin` token, expecting 200.
async fn admin_ok(proxy: &Proxy, method: &str, path: &str) -> Value {
    let (status, _, body) = admin(proxy, method, path, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{method} {path}: {body}");
    body
}

/// A chat completion (OpenAI format) with `key`, in run `run` if given.
async fn chat(proxy: &Proxy, key: &str, run: Option<&str>) -> (StatusCode, HeaderMap, Bytes) {
    let auth = bearer(key);
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(run) = run {
        headers.push(("x-tokenwarden-run", run));
    }
    post_json(&proxy.url("/openai/v1/chat/completions"), &headers, CHAT).await
}

async fn chat_status(proxy: &Proxy, key: &str, run: Option<&str>) -> u16 {
    chat(proxy, key, run).await.0.as_u16()
}

/// An Anthropic message with `key`.
async fn message(proxy: &Proxy, key: &str) -> (StatusCode, HeaderMap, Bytes) {
    post_json(
        &proxy.url("/anthropic/v1/messages"),
        &[("x-api-key", key), ("anthropic-version", "2023-06-01")],
        MESSAGES,
    )
    .await
}

/// Admin lines of the audit log in `dir` with this `reason`.
fn admin_lines<'a>(lines: &'a [Value], reason: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["kind"] == "admin" && l["reason"] == reason)
        .collect()
}

/// Waits until the audit log in `dir` holds a line that `pred` accepts.
async fn wait_for_line(dir: &Path, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    for _ in 0..250 {
        let lines = audit_lines_in(dir);
        if lines.iter().any(&pred) {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no such audit line in {:?}", audit_lines_in(dir));
}

fn audit_dir(proxy: &Proxy) -> std::path::PathBuf {
    proxy.dir.path().join("data/audit")
}

fn tokens_of(line: &Value) -> u64 {
    [
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
    ]
    .iter()
    .map(|k| line[*k].as_u64().unwrap())
    .sum()
}

#[tokio::test]
async fn admin_requests_need_a_token_and_every_refusal_is_audited() {
    let mock = Mock::start();
    let proxy = start(&admin_config(&mock));

    let (status, _, body) = admin(&proxy, "GET", "/admin/agents", None).await;
    assert_eq!(status, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("admin token"));
    let wrong = "tw-wrong-admin-token-never-to-be-written";
    let (status, _, _) = admin(&proxy, "POST", "/admin/pause-all", Some(wrong)).await;
    assert_eq!(status, 401);
    // An agent's virtual key is no admin token either.
    let (status, _, _) = admin(&proxy, "GET", "/admin/runs", Some(KEY_A)).await;
    assert_eq!(status, 401);
    assert_eq!(
        chat_status(&proxy, KEY_A, None).await,
        200,
        "nothing was paused"
    );

    // Open without a token.
    assert!(proxy
        .metrics_text()
        .await
        .contains("tokenwarden_paused_agents 0"));
    let (status, _, body) = get(&proxy.admin_url("/healthz"), &[]).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"ok\n"[..]));
    let (status, _, _) = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(status, 200);

    // Lines are written in order: the last attempt's line comes with the others.
    let lines = wait_for_line(&audit_dir(&proxy), |l| {
        l["reason"] == "unauthorized" && l["path"] == "/admin/runs"
    })
    .await;
    let refused = admin_lines(&lines, "unauthorized");
    assert_eq!(refused.len(), 3, "{refused:?}");
    for line in &refused {
        assert_eq!(line["outcome"], "rejected");
        assert_eq!(line["status"], 401);
        assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(line.get("by").is_none(), "no one was identified: {line}");
    }
    assert_eq!(refused[1]["method"], "POST");
    assert_eq!(refused[1]["path"], "/admin/pause-all");
    // The tokens presented are nowhere in the log.
    for file in tokenwarden::audit::log_files(&audit_dir(&proxy)).unwrap() {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(!text.contains(wrong));
        assert!(!text.contains(KEY_A));
    }

    // With the token: unknown endpoints, wrong methods and large bodies, in JSON.
    let (status, _, body) = admin(&proxy, "GET", "/admin/nothing", Some(OPS_TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    let (status, headers, body) = admin(&proxy, "GET", "/admin/pause-all", Some(OPS_TOKEN)).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(headers.get("allow").unwrap(), "POST");
    let auth = bearer(ADMIN_TOKEN);
    let (status, _, body) = send(request(
        "POST",
        &proxy.admin_url("/admin/resume-all"),
        &[("authorization", &auth)],
        vec![b'x'; 65 * 1024],
    ))
    .await;
    assert_eq!(status, 413);
    assert!(json(&body)["error"]["message"].is_string());
    let (status, _, _) = admin(
        &proxy,
        "POST",
        "/admin/agents/nobody/pause",
        Some(OPS_TOKEN),
    )
    .await;
    assert_eq!(status, 404);
    let lines = wait_for_line(&audit_dir(&proxy), |l| l["reason"] == "pause").await;
    let failed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "admin" && l["outcome"] == "failed")
        .collect();
    assert_eq!(failed.len(), 4, "{failed:?}");
    assert_eq!(failed[0]["by"], "ops");
    assert_eq!(failed[3]["agent"], "nobody");
}

#[tokio::test]
async fn without_a_token_configured_the_answer_says_what_to_set() {
    let mock = Mock::start();
    let proxy = start(&config(&mock));
    let (status, _, body) = admin(&proxy, "GET", "/admin/agents", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 401);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("set admin.token_env"), "{message}");
    proxy.metrics_text().await;
}

#[tokio::test]
async fn a_paused_agent_is_refused_and_the_others_are_not() {
    let mock = Mock::start();
    let proxy = start(&admin_config(&mock));

    let body = admin(
        &proxy,
        "POST",
        "/admin/agents/agent-a/pause",
        Some(OPS_TOKEN),
    )
    .await
    .2;
    assert_eq!(body["state"], "paused");
    assert_eq!(body["changed"], true);
    let (status, headers, body) = chat(&proxy, KEY_A, None).await;
    assert_eq!(status, 403);
    assert_eq!(headers.get("x-should-retry").unwrap(), "false");
    let error = &json(&body)["error"];
    assert_eq!(error["code"], "agent_paused");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("agent agent-a is paused"));
    let (status, headers, body) = message(&proxy, KEY_A).await;
    assert_eq!(status, 403);
    assert_eq!(headers.get("x-should-retry").unwrap(), "false");
    assert_eq!(json(&body)["error"]["type"], "permission_error");
    assert_eq!(chat_status(&proxy, KEY_B, None).await, 200);

    let agents = admin_ok(&proxy, "GET", "/admin/agents").await;
    assert_eq!(agents["agents"][0]["id"], "agent-a");
    assert_eq!(agents["agents"][0]["state"], "paused");
    assert_eq!(
        agents["agents"][0]["paused_by"],
        serde_json::json!(["agent"])
    );
    assert_eq!(agents["agents"][1]["state"], "active");
    proxy.wait_for_metric("tokenwarden_paused_agents 1").await;

    admin_ok(&proxy, "POST", "/admin/agents/agent-a/resume").await;
    assert_eq!(chat_status(&proxy, KEY_A, None).await, 200);

    // Pause-all holds from the very next request of every agent.
    let body = admin_ok(&proxy, "POST", "/admin/pause-all").await;
    assert_eq!(body["pause_all"], true);
    assert_eq!(body["paused_agents"], 2);
    let (status, _, body) = chat(&proxy, KEY_B, None).await;
    assert_eq!(status, 403);
    assert!(json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("every agent is paused"));
    assert_eq!(chat_status(&proxy, KEY_A, None).await, 403);
    let agents = admin_ok(&proxy, "GET", "/admin/agents").await;
    assert_eq!(agents["pause_all"], true);
    assert_eq!(
        agents["agents"][1]["paused_by"],
        serde_json::json!(["pause_all"])
    );
    proxy.wait_for_metric("tokenwarden_paused_agents 2").await;
    admin_ok(&proxy, "POST", "/admin/resume-all").await;
    assert_eq!(chat_status(&proxy, KEY_A, None).await, 200);
    assert_eq!(chat_status(&proxy, KEY_B, None).await, 200);
    proxy.wait_for_metric("tokenwarden_paused_agents 0").await;

    // Each act is audited with who did it.
    let lines = wait_for_line(&audit_dir(&proxy), |l| l["reason"] == "resume_all").await;
    let acts: Vec<(String, String, String)> = lines
        .iter()
        .filter(|l| l["kind"] == "admin" && l["outcome"] == "ok")
        .map(|l| {
            (
                l["reason"].as_str().unwrap().to_owned(),
                l["by"].as_str().unwrap().to_owned(),
                l["agent"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want = [
        ("pause", "ops", "agent-a"),
        ("list_agents", "admin", ""),
        ("resume", "admin", "agent-a"),
        ("pause_all", "admin", ""),
        ("list_agents", "admin", ""),
        ("resume_all", "admin", ""),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(acts, want);
    let paused = lines
        .iter()
        .filter(|l| l["kind"] == "request" && l["reason"] == "paused")
        .count();
    assert_eq!(paused, 4, "each refused request has its own line");
}

#[tokio::test]
async fn a_run_stopped_by_id_is_refused_until_resumed() {
    let mock = Mock::start();
    let proxy = start(&admin_config(&mock));
    assert_eq!(chat_status(&proxy, KEY_A, Some("r1")).await, 200);

    let body = admin_ok(&proxy, "POST", "/admin/runs/r1/stop").await;
    assert_eq!(body["changed"], true);
    assert_eq!(body["run"]["state"], "stopped");
    assert_eq!(body["run"]["stopped"]["condition"], "admin");
    let (status, headers, body) = chat(&proxy, KEY_A, Some("r1")).await;
    assert_eq!(status, 403);
    assert_eq!(headers.get("x-should-retry").unwrap(), "false");
    let message = json(&body)["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("stopped by admin"), "{message}");
    assert_eq!(chat_status(&proxy, KEY_A, Some("r2")).await, 200);
    assert_eq!(chat_status(&proxy, KEY_A, None).await, 200);
    proxy
        .wait_for_metric("tokenwarden_runs_stopped_total{agent=\"agent-a\",condition=\"admin\"} 1")
        .await;

    let runs = admin_ok(&proxy, "GET", "/admin/runs/r1").await;
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1);
    assert_eq!(runs["runs"][0]["agent"], "agent-a");
    assert_eq!(runs["runs"][0]["state"], "stopped");

    let body = admin(&proxy, "POST", "/admin/runs/r1/resume", Some(OPS_TOKEN))
        .await
        .2;
    assert_eq!(body["changed"], true);
    assert_eq!(body["run"]["state"], "idle");
    assert_eq!(chat_status(&proxy, KEY_A, Some("r1")).await, 200);

    // The same run id in two agents: an action must say which.
    assert_eq!(chat_status(&proxy, KEY_A, Some("shared")).await, 200);
    assert_eq!(chat_status(&proxy, KEY_B, Some("shared")).await, 200);
    let both = admin_ok(&proxy, "GET", "/admin/runs/shared").await;
    assert_eq!(both["runs"].as_array().unwrap().len(), 2);
    let one = admin_ok(&proxy, "GET", "/admin/runs/shared?agent=agent-b").await;
    assert_eq!(one["runs"].as_array().unwrap().len(), 1);
    let (status, _, body) =
        admin(&proxy, "POST", "/admin/runs/shared/stop", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("?agent="));
    admin_ok(&proxy, "POST", "/admin/runs/shared/stop?agent=agent-b").await;
    assert_eq!(chat_status(&proxy, KEY_B, Some("shared")).await, 403);
    assert_eq!(chat_status(&proxy, KEY_A, Some("shared")).await, 200);

    // A run not seen yet: 404 without its agent, stopped ahead of time with it.
    let (status, _, body) =
        admin(&proxy, "POST", "/admin/runs/later/stop", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    let (status, _, _) = admin(&proxy, "GET", "/admin/runs/later", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 404);
    admin_ok(&proxy, "POST", "/admin/runs/later/stop?agent=agent-a").await;
    assert_eq!(chat_status(&proxy, KEY_A, Some("later")).await, 403);
    // A run id with a slash travels as %2F.
    admin_ok(&proxy, "POST", "/admin/runs/a%2Fb/stop?agent=agent-b").await;
    assert_eq!(chat_status(&proxy, KEY_B, Some("a/b")).await, 403);

    let lines = wait_for_line(&audit_dir(&proxy), |l| {
        l["kind"] == "run" && l["run"] == "a/b"
    })
    .await;
    let run_lines: Vec<(&str, &str, &str, &str)> = lines
        .iter()
        .filter(|l| l["kind"] == "run")
        .map(|l| {
            (
                l["run"].as_str().unwrap(),
                l["agent"].as_str().unwrap(),
                l["outcome"].as_str().unwrap(),
                l["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        run_lines,
        [
            ("r1", "agent-a", "stopped", "admin"),
            ("r1", "agent-a", "resumed", "admin"),
            ("shared", "agent-b", "stopped", "admin"),
            ("later", "agent-a", "stopped", "admin"),
            ("a/b", "agent-b", "stopped", "admin"),
        ]
    );
    let stops = admin_lines(&lines, "stop_run");
    assert_eq!(stops.len(), 6, "the 409 and the 404 are audited too");
    assert_eq!(stops[0]["by"], "admin");
    assert_eq!(stops[0]["outcome"], "ok");
    assert_eq!(stops[1]["outcome"], "failed");
    assert_eq!(stops[1]["status"], 409);
    let resumes = admin_lines(&lines, "resume_run");
    assert_eq!(resumes.len(), 1);
    assert_eq!(
        (&resumes[0]["by"], &resumes[0]["run"]),
        (&"ops".into(), &"r1".into())
    );
}

#[tokio::test]
async fn stops_and_pauses_survive_a_restart() {
    let mock = Mock::start();
    let config = admin_config(&mock);
    let proxy = start(&config);
    assert_eq!(chat_status(&proxy, KEY_A, Some("r1")).await, 200);
    assert_eq!(chat_status(&proxy, KEY_A, Some("r2")).await, 200);
    admin_ok(&proxy, "POST", "/admin/agents/agent-b/pause").await;
    admin_ok(&proxy, "POST", "/admin/pause-all").await;
    admin_ok(&proxy, "POST", "/admin/resume-all").await;
    admin_ok(&proxy, "POST", "/admin/runs/r1/stop").await;
    admin_ok(&proxy, "POST", "/admin/runs/r2/stop").await;
    admin_ok(&proxy, "POST", "/admin/runs/r2/resume").await;
    admin_ok(&proxy, "POST", "/admin/runs/ahead/stop?agent=agent-a").await;
    // Everything is on disk once the last admin line is.
    let data = proxy.dir.path().join("data");
    wait_for_line(&data.join("audit"), |l| {
        l["reason"] == "stop_run" && l["run"] == "ahead"
    })
    .await;

    // A crash, not a clean stop: what survives is what the log holds.
    let mut proxy = proxy;
    let proc = &mut proxy.proc;
    std::process::Command::new("kill")
        .args(["-9", &proc.pid().to_string()])
        .status()
        .unwrap();
    proc.child.wait().unwrap();
    let proxy = start(&with_storage(&config, &data));

    assert_eq!(
        chat_status(&proxy, KEY_B, None).await,
        403,
        "agent-b stays paused"
    );
    assert_eq!(
        chat_status(&proxy, KEY_A, Some("r1")).await,
        403,
        "r1 stays stopped"
    );
    assert_eq!(chat_status(&proxy, KEY_A, Some("ahead")).await, 403);
    assert_eq!(
        chat_status(&proxy, KEY_A, Some("r2")).await,
        200,
        "r2 was resumed"
    );
    assert_eq!(
        chat_status(&proxy, KEY_A, None).await,
        200,
        "pause-all was lifted"
    );

    let agents = admin_ok(&proxy, "GET", "/admin/agents").await;
    assert_eq!(agents["pause_all"], false);
    assert_eq!(agents["agents"][1]["state"], "paused");
    assert_eq!(
        agents["agents"][1]["paused_by"],
        serde_json::json!(["agent"])
    );
    let r1 = admin_ok(&proxy, "GET", "/admin/runs/r1").await;
    assert_eq!(r1["runs"][0]["stopped"]["condition"], "admin");
    assert!(r1["runs"][0]["stopped"]["message"]
        .as_str()
        .unwrap()
        .contains("stopped by admin"));

    // And a resume after the restart holds.
    admin_ok(&proxy, "POST", "/admin/agents/agent-b/resume").await;
    admin_ok(&proxy, "POST", "/admin/runs/r1/resume").await;
    assert_eq!(chat_status(&proxy, KEY_B, None).await, 200);
    assert_eq!(chat_status(&proxy, KEY_A, Some("r1")).await, 200);
}

#[tokio::test]
async fn agents_and_runs_report_what_was_sent() {
    let mock = Mock::start();
    let key_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_A)
    );
    let budgets = "[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000\nusd = 1.0\n";
    let config = admin_config(&mock).replacen(&key_line, &format!("{key_line}{budgets}"), 1);
    let proxy = start(&config);
    for _ in 0..3 {
        assert_eq!(chat_status(&proxy, KEY_A, Some("count")).await, 200);
    }
    assert_eq!(chat_status(&proxy, KEY_B, None).await, 200);
    let lines = proxy.wait_for_audit_lines(4).await;
    let sent: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "request" && l["agent"] == "agent-a")
        .collect();
    assert_eq!(sent.len(), 3);
    let tokens: u64 = sent.iter().map(|l| tokens_of(l)).sum();
    let cost: f64 = sent.iter().map(|l| l["cost_usd"].as_f64().unwrap()).sum();
    assert!(tokens > 0 && cost > 0.0);

    let runs = admin_ok(&proxy, "GET", "/admin/runs?agent=agent-a").await;
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(run["id"], "count");
    assert_eq!(run["requests"], 3);
    assert_eq!(run["tokens"], tokens);
    assert!(
        (run["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-9,
        "{run}"
    );
    assert_eq!(run["state"], "idle");
    assert!(run["stopped"].is_null());
    let one = admin_ok(&proxy, "GET", "/admin/runs/count").await;
    assert_eq!(one["runs"][0]["tokens"], tokens);
    let all = admin_ok(&proxy, "GET", "/admin/runs").await;
    assert_eq!(
        all["runs"].as_array().unwrap().len(),
        2,
        "agent-b's run began by itself"
    );
    let (status, _, _) = admin(&proxy, "GET", "/admin/runs?agent=nobody", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 404);

    let agents = admin_ok(&proxy, "GET", "/admin/agents").await;
    let a = &agents["agents"][0];
    assert_eq!(a["id"], "agent-a");
    assert_eq!(a["team"], "team-1");
    assert_eq!(a["state"], "active");
    assert_eq!(a["active_runs"], 1);
    assert_eq!(a["stopped_runs"], 0);
    let budget = &a["budgets"][0];
    assert_eq!(
        (&budget["scope"], &budget["period"]),
        (&"agent".into(), &"day".into())
    );
    assert_eq!(budget["tokens"]["limit"], 100000);
    assert_eq!(budget["tokens"]["spent"], tokens);
    assert_eq!(budget["tokens"]["reserved"], 0);
    assert_eq!(budget["tokens"]["remaining"], 100000 - tokens);
    assert!((budget["usd"]["spent"].as_f64().unwrap() - cost).abs() < 1e-6);
    let b = &agents["agents"][1];
    assert_eq!((&b["id"], &b["team"]), (&"agent-b".into(), &Value::Null));
    assert_eq!(b["active_runs"], 1);
    assert_eq!(b["budgets"], serde_json::json!([]));
    proxy.wait_for_metric("tokenwarden_runs_active 2").await;
}

#[tokio::test]
async fn a_reload_keeps_a_broken_config_and_takes_a_good_one() {
    let mock = Mock::start();
    let config = admin_config(&mock);
    let proxy = start(&config);
    let path = proxy.dir.path().join("tokenwarden.toml");
    assert_eq!(chat_status(&proxy, KEY_C, None).await, 401);
    admin_ok(&proxy, "POST", "/admin/agents/agent-b/pause").await;

    let broken = with_agent_c(&config)
        .replace(
            &tokenwarden::identity::key_digest_hex(KEY_C),
            "not-a-digest",
        )
        .replacen("[upstream]\n", "[upstream]\nidle_timeout = \"0s\"\n", 1);
    std::fs::write(&path, broken).unwrap();
    let (status, _, body) = admin(&proxy, "POST", "/admin/reload", Some(OPS_TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    let problems: Vec<&str> = body["error"]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("agents[2].key_sha256:")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("upstream.idle_timeout:")),
        "{problems:?}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("running one is kept"));
    assert_eq!(
        chat_status(&proxy, KEY_A, None).await,
        200,
        "the old config serves"
    );
    assert_eq!(chat_status(&proxy, KEY_C, None).await, 401);

    // A good one: the new agent is known at once; a new listen address waits for a restart.
    let good = with_agent_c(&config).replacen(
        "listen = \"127.0.0.1:0\"\nmax_body_bytes",
        "listen = \"127.0.0.1:1\"\nmax_body_bytes",
        1,
    );
    std::fs::write(&path, good).unwrap();
    let body = admin_ok(&proxy, "POST", "/admin/reload").await;
    assert_eq!(body["agents"], 3);
    assert_eq!(body["admin_tokens"], 2);
    assert_eq!(body["ignored"], serde_json::json!(["server.listen"]));
    assert_eq!(chat_status(&proxy, KEY_C, None).await, 200);
    assert_eq!(
        chat_status(&proxy, KEY_B, None).await,
        403,
        "the pause outlives the reload"
    );
    let agents = admin_ok(&proxy, "GET", "/admin/agents").await;
    assert_eq!(agents["agents"][2]["id"], "agent-c");

    let lines = wait_for_line(&audit_dir(&proxy), |l| {
        l["reason"] == "reload" && l["outcome"] == "ok"
    })
    .await;
    let reloads = admin_lines(&lines, "reload");
    assert_eq!(reloads.len(), 2);
    assert_eq!(
        (&reloads[0]["by"], &reloads[0]["outcome"]),
        (&"ops".into(), &"failed".into())
    );
    assert!(reloads[0]["detail"]
        .as_str()
        .unwrap()
        .contains("agents[2].key_sha256"));
    assert_eq!(
        (&reloads[1]["by"], &reloads[1]["outcome"]),
        (&"admin".into(), &"ok".into())
    );
    assert!(reloads[1]["detail"]
        .as_str()
        .unwrap()
        .contains("ignored until a restart: server.listen"));
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let mock = Mock::start();
    let config = admin_config(&mock);
    let proxy = start(&config);
    let path = proxy.dir.path().join("tokenwarden.toml");
    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &proxy.proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };

    // A broken file: logged at error level and audited; the proxy keeps serving.
    std::fs::write(&path, config.replace("[[agents]]", "[[agent]]")).unwrap();
    hup();
    let lines = wait_for_line(&audit_dir(&proxy), |l| l["reason"] == "reload").await;
    let failed = admin_lines(&lines, "reload")[0];
    assert_eq!(
        (&failed["by"], &failed["outcome"]),
        (&"SIGHUP".into(), &"failed".into())
    );
    proxy.wait_for_log("config reload failed", 1).await;
    assert!(proxy.proc.log_text().contains("ERROR"));
    assert_eq!(chat_status(&proxy, KEY_A, None).await, 200);

    std::fs::write(&path, with_agent_c(&config)).unwrap();
    hup();
    let mut status = 0;
    for _ in 0..250 {
        status = chat_status(&proxy, KEY_C, None).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "the new agent never became known");
    let lines = wait_for_line(&audit_dir(&proxy), |l| {
        l["reason"] == "reload" && l["outcome"] == "ok"
    })
    .await;
    assert_eq!(admin_lines(&lines, "reload")[1]["by"], "SIGHUP");
    // Still running, still serving the admin API.
    admin_ok(&proxy, "GET", "/admin/agents").await;
}

#[tokio::test]
async fn in_redis_mode_agents_show_the_shared_budget() {
    let mut redis = Redis::start();
    let mock = Mock::start();
    let key_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_A)
    );
    let budgets = "[[agents.budgets]]\nperiod = \"day\"\ntokens = 100000\n";
    let config = admin_config(&mock).replacen(&key_line, &format!("{key_line}{budgets}"), 1)
        + &format!("[storage]\nredis_url = \"{}\"\n", redis.url());
    let proxy = start(&config);
    assert_eq!(chat_status(&proxy, KEY_A, None).await, 200);
    let lines = proxy.wait_for_audit_lines(1).await;
    let tokens = tokens_of(&lines[0]);
    // Settlement in Redis trails the audit line by a round trip: poll the figure.
    let mut spent = Value::Null;
    for _ in 0..250 {
        let agents = admin_ok(&proxy, "GET", "/admin/agents").await;
        spent = agents["agents"][0]["budgets"][0]["tokens"]["spent"].clone();
        if spent == tokens {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(spent, tokens);

    // Redis down: the budgets cannot be shown (503), the switches still work.
    redis.stop();
    let (status, _, body) = admin(&proxy, "GET", "/admin/agents", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("Redis"));
    admin_ok(&proxy, "POST", "/admin/agents/agent-b/pause").await;
    assert_eq!(chat_status(&proxy, KEY_B, None).await, 403);
    // The dashboard's overview still answers, without budgets and saying why.
    let overview = admin_ok(&proxy, "GET", "/admin/overview").await;
    assert!(overview["budgets_error"]
        .as_str()
        .unwrap()
        .contains("Redis"));
    assert_eq!(overview["agents"][0]["budgets"], serde_json::json!([]));
    assert_eq!(overview["agents"][1]["state"], "paused");
    assert_eq!(overview["insights"]["chain"]["ok"], true);
}

#[tokio::test]
async fn an_admin_records_outcomes_for_any_agent() {
    let mock = Mock::start();
    let proxy = start(&admin_config(&mock));
    let ops = bearer(OPS_TOKEN);
    let post = |path: &str, body: &str| {
        let url = proxy.admin_url(path);
        let ops = ops.clone();
        let body = body.to_owned();
        async move { post_json(&url, &[("authorization", ops.as_str())], &body).await }
    };

    let (status, _, body) = post(
        "/admin/agents/agent-b/outcomes",
        r#"{"kind":"pr_merged","count":3,"run":"r-9","ref":"PR-7"}"#,
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let recorded = &json(&body)["recorded"];
    assert_eq!(recorded["agent"], "agent-b");
    assert_eq!(recorded["kind"], "pr_merged");
    assert_eq!(recorded["count"], 3);

    // Refused: unknown agent, a bad body, no token. None records anything.
    let (status, _, body) = post("/admin/agents/nobody/outcomes", r#"{"kind":"x"}"#).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = post("/admin/agents/agent-b/outcomes", r#"{"kind":"x","n":1}"#).await;
    assert_eq!(status, 400);
    assert!(json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown field"));
    let (status, _, _) = post_json(
        &proxy.admin_url("/admin/agents/agent-b/outcomes"),
        &[],
        r#"{"kind":"x"}"#,
    )
    .await;
    assert_eq!(status, 401);

    proxy
        .wait_for_metric("tokenwarden_outcomes_total{agent=\"agent-b\",kind=\"pr_merged\"} 3")
        .await;
    let lines = wait_for_line(&proxy.dir.path().join("data/audit"), |l| {
        l["kind"] == "admin" && l["reason"] == "unauthorized"
    })
    .await;
    let outcomes: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "outcome").collect();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes[0]["agent"], "agent-b");
    assert_eq!(outcomes[0]["by"], "ops");
    assert_eq!(outcomes[0]["outcome_kind"], "pr_merged");
    assert_eq!(outcomes[0]["count"], 3);
    assert_eq!(outcomes[0]["run"], "r-9");
    assert_eq!(outcomes[0]["ref"], "PR-7");
    let admin_lines: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["kind"] == "admin")
        .map(|l| {
            (
                l["reason"].as_str().unwrap(),
                l["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        admin_lines,
        [
            ("record_outcome", "ok"),
            ("record_outcome", "failed"),
            ("record_outcome", "failed"),
            ("unauthorized", "rejected"),
        ]
    );
}

#[tokio::test]
async fn stops_pauses_and_outcome_kinds_come_back_from_the_snapshot_alone() {
    let mock = Mock::start();
    let data = tempfile::tempdir().unwrap();
    let config = |interval: &str| {
        let config = admin_config(&mock).replace(
            "[upstream]",
            &format!("[storage]\nsnapshot_interval = \"{interval}\"\n[upstream]"),
        );
        let config = with_storage(&config, data.path());
        format!("{config}\n[outcomes]\nmax_kinds_per_agent = 1\n")
    };
    let proxy = start(&config("100ms"));
    assert_eq!(chat_status(&proxy, KEY_A, Some("r1")).await, 200);
    admin_ok(&proxy, "POST", "/admin/runs/r1/stop").await;
    admin_ok(&proxy, "POST", "/admin/agents/agent-b/pause").await;
    let outcome = |proxy: &Proxy, kind: &str| {
        let url = proxy.url("/v1/outcomes");
        let body = format!(r#"{{"kind":"{kind}"}}"#);
        async move {
            let auth = bearer(KEY_A);
            post_json(&url, &[("authorization", auth.as_str())], &body)
                .await
                .0
        }
    };
    assert_eq!(outcome(&proxy, "fixed").await, 201);
    let lines = wait_for_line(data.path().join("audit").as_path(), |l| {
        l["kind"] == "outcome"
    })
    .await;
    let last = lines.last().unwrap()["seq"].as_u64().unwrap();
    let snapshot = wait_for_snapshot(data.path(), last).await;
    assert_eq!(
        snapshot["standing"]["paused"],
        serde_json::json!(["agent-b"])
    );
    let mut proxy = proxy;
    std::process::Command::new("kill")
        .args(["-9", &proxy.proc.pid().to_string()])
        .status()
        .unwrap();
    proxy.proc.child.wait().unwrap();

    // The start reads no line of the log: all it restores is in the snapshot.
    let proxy = start(&config("1h"));
    proxy
        .wait_for_log(
            &format!("budgets rebuilt from snapshot at seq {last} plus 0 audit lines"),
            1,
        )
        .await;
    assert_eq!(
        chat_status(&proxy, KEY_B, None).await,
        403,
        "agent-b paused"
    );
    assert_eq!(
        chat_status(&proxy, KEY_A, Some("r1")).await,
        403,
        "r1 stopped"
    );
    assert_eq!(outcome(&proxy, "fixed").await, 201, "a kind it had");
    assert_eq!(outcome(&proxy, "other").await, 422, "one kind at most");
    let r1 = admin_ok(&proxy, "GET", "/admin/runs/r1").await;
    assert_eq!(r1["runs"][0]["stopped"]["condition"], "admin");
}

#[tokio::test]
async fn the_overview_lists_the_runs_that_need_a_look_first() {
    let mock = Mock::start();
    let proxy = start(&admin_config(&mock));
    for i in 0..102 {
        assert_eq!(
            chat_status(&proxy, KEY_A, Some(&format!("run-{i}"))).await,
            200
        );
    }
    admin_ok(&proxy, "POST", "/admin/runs/run-0/stop").await;
    // Every line before it is on disk once the stop's admin line is.
    wait_for_line(&audit_dir(&proxy), |l| l["reason"] == "stop_run").await;
    let overview = admin_ok(&proxy, "GET", "/admin/overview").await;
    assert_eq!(overview["runs_total"], 102);
    let runs = overview["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 100);
    assert_eq!(runs[0]["id"], "run-0", "the stopped run first");
    assert_eq!(runs[0]["state"], "stopped");
    // Then the most recently active: the oldest idle run is the one left out.
    assert_eq!(runs[1]["id"], "run-101");
    assert!(runs.iter().all(|r| r["id"] != "run-1"));
    assert_eq!(overview["insights"]["agents"]["agent-a"]["requests"], 102);
    assert_eq!(overview["insights"]["chain"]["ok"], true);
}
