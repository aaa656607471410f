//! Outcomes, `tokenwarden report` and the SRE files, end to end: outcomes posted to the
//! real binary are audited and counted (and refused ones change nothing); a known
//! sequence of traffic through the proxy comes back out of `tokenwarden report` with
//! the audit log's own sums; the Grafana dashboard and alert rules name only metrics a
//! live `/metrics` page really has.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

const OUTCOMES: &str = "/v1/outcomes";

/// `config` with extra top-level tables before `[[providers]]` and lines appended to
/// agent-a's entry.
fn config_plus(mock: &Mock, tables: &str, agent_a: &str) -> String {
    let key_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_A)
    );
    config(mock)
        .replacen("[[providers]]", &format!("{tables}\n[[providers]]"), 1)
        .replacen(&key_line, &format!("{key_line}{agent_a}\n"), 1)
}

async fn post_outcome(proxy: &Proxy, auth: &[(&str, &str)], body: &str) -> (u16, Value) {
    let (status, headers, body) = post_json(&proxy.url(OUTCOMES), auth, body).await;
    if status != 201 {
        assert_eq!(
            headers.get("content-type").unwrap(),
            "application/json",
            "errors are JSON"
        );
    }
    (
        status.as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn outcome_lines(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["kind"] == "outcome").collect()
}

#[tokio::test]
async fn outcomes_are_recorded_audited_and_counted_before_any_provider_route() {
    let mock = Mock::start();
    // A catch-all provider would take /v1/outcomes if the proxy did not answer it first.
    let catch_all = format!(
        "[[providers]]\nname = \"everything\"\nkind = \"openai\"\nbase_url = \"{}\"\nprefix = \"/\"\n",
        mock.url()
    );
    let proxy = Proxy::start(&config_plus(&mock, &catch_all, ""));
    let auth_a = bearer(KEY_A);
    let (status, body) = post_outcome(
        &proxy,
        &[("authorization", &auth_a)],
        r#"{"kind":"ticket_resolved","count":2,"run":"loop-7","ref":"JIRA-123"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let recorded = &body["recorded"];
    assert_eq!(recorded["kind"], "ticket_resolved");
    assert_eq!(recorded["count"], 2);
    assert_eq!(recorded["agent"], "agent-a");
    assert_eq!(recorded["team"], "team-1");
    assert_eq!(recorded["run"], "loop-7");
    assert_eq!(recorded["ref"], "JIRA-123");
    // x-api-key works too; count defaults to 1.
    let (status, body) =
        post_outcome(&proxy, &[("x-api-key", KEY_B)], r#"{"kind":"pr_merged"}"#).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["recorded"]["count"], 1);

    let lines = proxy.wait_for_audit_lines(2).await;
    let outcomes = outcome_lines(&lines);
    assert_eq!(outcomes.len(), 2, "{lines:?}");
    let a = outcomes[0];
    assert_eq!(a["outcome_kind"], "ticket_resolved");
    assert_eq!(a["count"], 2);
    assert_eq!(a["ref"], "JIRA-123");
    assert_eq!(a["run"], "loop-7");
    assert_eq!(a["agent"], "agent-a");
    assert_eq!(a["team"], "team-1");
    assert_eq!(a["ts"], recorded["ts"]);
    assert!(a["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let b = outcomes[1];
    assert_eq!(
        (b["outcome_kind"].as_str(), b["count"].as_u64()),
        (Some("pr_merged"), Some(1))
    );
    assert!(b.get("ref").is_none(), "absent fields are not written: {b}");
    assert!(
        mock.requests().await.is_empty(),
        "no provider saw the outcome"
    );

    proxy
        .wait_for_metric(r#"tokenwarden_outcomes_total{agent="agent-a",kind="ticket_resolved"} 2"#)
        .await;
    proxy
        .wait_for_metric(r#"tokenwarden_outcomes_total{agent="agent-b",kind="pr_merged"} 1"#)
        .await;
    assert!(
        tokenwarden::audit::verify::verify(&[proxy.dir.path().join("data/audit")], None).is_ok()
    );
}

#[tokio::test]
async fn refused_outcomes_change_nothing_and_kinds_stay_bounded_across_a_restart() {
    let mock = Mock::start();
    let data = tempfile::tempdir().unwrap();
    let config = with_storage(
        &config_plus(&mock, "[outcomes]\nmax_kinds_per_agent = 2\n", ""),
        data.path(),
    );
    let proxy = Proxy::start(&config);
    let auth_a = bearer(KEY_A);
    let a = [("authorization", auth_a.as_str())];
    let long = "x".repeat(201);
    let bad: Vec<(String, &str)> = vec![
        (r#"{"kind":"#.into(), "malformed JSON"),
        ("[]".into(), "not an object"),
        (r#""ticket_resolved""#.into(), "a string"),
        (
            r#"{"kind":"ticket_resolved","extra":1}"#.into(),
            "unknown field",
        ),
        (r#"{"count":1}"#.into(), "no kind"),
        (r#"{"kind":""}"#.into(), "empty kind"),
        (r#"{"kind":"ticket resolved"}"#.into(), "space in kind"),
        (r#"{"kind":"ticket/resolved"}"#.into(), "slash in kind"),
        (
            format!(r#"{{"kind":"{}"}}"#, "k".repeat(65)),
            "kind too long",
        ),
        (r#"{"kind":5}"#.into(), "kind a number"),
        (r#"{"kind":"a","count":0}"#.into(), "count 0"),
        (r#"{"kind":"a","count":1000001}"#.into(), "count too large"),
        (r#"{"kind":"a","count":-3}"#.into(), "count negative"),
        (r#"{"kind":"a","count":1.5}"#.into(), "count fractional"),
        (r#"{"kind":"a","count":"2"}"#.into(), "count a string"),
        (format!(r#"{{"kind":"a","ref":"{long}"}}"#), "ref too long"),
        (format!(r#"{{"kind":"a","run":"{long}"}}"#), "run too long"),
    ];
    for (body, what) in &bad {
        let (status, v) = post_outcome(&proxy, &a, body).await;
        assert_eq!(status, 400, "{what}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
        assert_eq!(v["error"]["code"], "invalid_outcome", "{what}: {v}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tokenwarden: "));
    }
    let (status, v) = post_outcome(&proxy, &a, r#"{"kind":"a","count":0}"#).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("count")));

    // Missing or unknown key: 401 in the OpenAI shape.
    for auth in [vec![], vec![("authorization", "Bearer tw-nobody")]] {
        let (status, v) = post_outcome(&proxy, &auth, r#"{"kind":"a"}"#).await;
        assert_eq!(status, 401, "{v}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let (status, _, _) = get(&proxy.url(OUTCOMES), &a).await;
    assert_eq!(status, 405);

    // Two kinds per agent: a third is refused, a known one is still fine, and the bound
    // is per agent.
    assert_eq!(post_outcome(&proxy, &a, r#"{"kind":"k1"}"#).await.0, 201);
    assert_eq!(
        post_outcome(&proxy, &a, r#"{"kind":"k2","count":5}"#)
            .await
            .0,
        201
    );
    let (status, v) = post_outcome(&proxy, &a, r#"{"kind":"k3"}"#).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "outcome_kinds_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_kinds_per_agent"));
    assert_eq!(post_outcome(&proxy, &a, r#"{"kind":"k1"}"#).await.0, 201);
    assert_eq!(
        post_outcome(&proxy, &[("x-api-key", KEY_B)], r#"{"kind":"k3"}"#)
            .await
            .0,
        201
    );

    let audit = data.path().join("audit");
    let lines = wait_for_audit_lines_in(&audit, 4).await;
    let kinds: Vec<(&str, &str)> = outcome_lines(&lines)
        .iter()
        .map(|l| {
            (
                l["agent"].as_str().unwrap(),
                l["outcome_kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("agent-a", "k1"),
            ("agent-a", "k2"),
            ("agent-a", "k1"),
            ("agent-b", "k3")
        ]
    );
    assert_eq!(lines.len(), 4, "refusals write no line: {lines:?}");
    let metrics = proxy
        .wait_for_metric(r#"tokenwarden_outcomes_total{agent="agent-a",kind="k2"} 5"#)
        .await;
    assert!(metrics.contains(r#"tokenwarden_outcomes_total{agent="agent-a",kind="k1"} 2"#));
    assert!(!metrics.contains(r#"tokenwarden_outcomes_total{agent="agent-a",kind="k3"}"#));
    assert!(
        !metrics.contains(r#"kind="a""#),
        "no refused kind became a label"
    );
    assert!(metrics.contains(&format!(
        r#"tokenwarden_rejections_total{{agent="agent-a",reason="invalid_outcome"}} {}"#,
        bad.len() + 1
    )));
    drop(proxy);

    // The kinds come back from the audit log: the bound holds across a restart.
    let proxy = Proxy::start(&config);
    let (status, _) = post_outcome(&proxy, &a, r#"{"kind":"k3"}"#).await;
    assert_eq!(status, 422);
    assert_eq!(post_outcome(&proxy, &a, r#"{"kind":"k2"}"#).await.0, 201);
}

// === the report ===

fn chat(content: &str) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":5,"messages":[{{"role":"user","content":"{content}"}}]}}"#
    )
}

async fn call(proxy: &Proxy, key: &str, run: &str, body: &str) -> u16 {
    let auth = bearer(key);
    let headers = [("authorization", auth.as_str()), ("x-tokenwarden-run", run)];
    post_json(&proxy.url("/openai/v1/chat/completions"), &headers, body)
        .await
        .0
        .as_u16()
}

/// Runs `tokenwarden report ARGS --config CONFIG`: (exit code, stdout, stderr).
fn report(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .arg("report")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn report_json(config: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = report(config, &all);
    assert_eq!(code, 0, "{stderr}");
    json(stdout.as_bytes())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1e-9)
}

/// Sums of an agent's request lines, as the audit log has them.
struct Sums {
    requests: u64,
    input: u64,
    output: u64,
    cached: u64,
    cost: f64,
}

fn sums(lines: &[Value], agent: &str) -> Sums {
    let mine: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "request" && l["agent"] == agent)
        .collect();
    let n = |l: &Value, f: &str| l[f].as_u64().unwrap();
    Sums {
        requests: mine.len() as u64,
        input: mine.iter().map(|l| n(l, "input_tokens")).sum(),
        output: mine.iter().map(|l| n(l, "output_tokens")).sum(),
        cached: mine.iter().map(|l| n(l, "cached_input_tokens")).sum(),
        cost: mine.iter().map(|l| l["cost_usd"].as_f64().unwrap()).sum(),
    }
}

#[tokio::test]
async fn the_report_gives_the_audit_logs_own_figures_in_every_format() {
    let mock = Mock::start();
    let data = tempfile::tempdir().unwrap();
    let config = with_storage(
        &config_plus(&mock, "", "[agents.runs]\nmax_requests = 4"),
        data.path(),
    );
    let proxy = Proxy::start(&config);
    // agent-a, run "work": the third body is byte for byte the first: redundant.
    for body in [chat("alpha"), chat("beta"), chat("alpha"), chat("gamma")] {
        assert_eq!(call(&proxy, KEY_A, "work", &body).await, 200);
    }
    // Run "loop": its prompt grows every call, and its fifth call crosses max_requests.
    let mut context = String::new();
    for i in 0..4 {
        context.push_str(&format!(
            "step {i} of a long conversation that keeps growing; "
        ));
        assert_eq!(call(&proxy, KEY_A, "loop", &chat(&context)).await, 200);
    }
    assert_eq!(call(&proxy, KEY_A, "loop", &chat("one more")).await, 403);
    let auth_a = bearer(KEY_A);
    let a = [("authorization", auth_a.as_str())];
    for body in [
        r#"{"kind":"ticket_resolved","count":2}"#,
        r#"{"kind":"ticket_resolved","ref":"JIRA-9"}"#,
        r#"{"kind":"pr_merged","run":"work"}"#,
    ] {
        assert_eq!(post_outcome(&proxy, &a, body).await.0, 201);
    }
    // agent-b (no team): the same body as one of agent-a's is not redundant for it.
    assert_eq!(call(&proxy, KEY_B, "b-1", &chat("alpha")).await, 200);
    assert_eq!(call(&proxy, KEY_B, "b-1", &chat("delta")).await, 200);
    let b = [("x-api-key", KEY_B)];
    assert_eq!(
        post_outcome(&proxy, &b, r#"{"kind":"ticket_resolved"}"#)
            .await
            .0,
        201
    );

    // 9 + 2 request lines, 1 run stop, 4 outcomes.
    let audit = data.path().join("audit");
    let lines = wait_for_audit_lines_in(&audit, 16).await;
    drop(proxy);
    assert_eq!(lines.len(), 16);
    let config_path = data.path().join("tokenwarden.toml");
    std::fs::write(&config_path, &config).unwrap();

    let r = report_json(&config_path, &[]);
    assert_eq!(r["chain"]["ok"], true, "{}", r["chain"]);
    assert_eq!(r["chain"]["records"], 16);
    assert_eq!(r["lines"]["malformed"], 0);
    let agent_a = &r["agents"]["agent-a"];
    let want = sums(&lines, "agent-a");
    assert_eq!(want.requests, 9);
    assert_eq!(agent_a["requests"], 9);
    assert_eq!(agent_a["input_tokens"], want.input);
    assert_eq!(agent_a["output_tokens"], want.output);
    assert_eq!(agent_a["cached_input_tokens"], want.cached);
    let cost = agent_a["cost_usd"].as_f64().unwrap();
    assert!(
        cost > 0.0 && close(cost, want.cost),
        "{cost} vs {}",
        want.cost
    );
    assert_eq!(agent_a["outcomes"]["ticket_resolved"], 3);
    assert_eq!(agent_a["outcomes"]["pr_merged"], 1);
    let per = &agent_a["cost_per_outcome_usd"];
    assert!(close(per["ticket_resolved"].as_f64().unwrap(), cost / 3.0));
    assert!(close(per["pr_merged"].as_f64().unwrap(), cost));
    assert_eq!(agent_a["redundant_requests"], 1);
    assert!(close(
        agent_a["redundant_share"].as_f64().unwrap(),
        1.0 / 9.0
    ));
    let repeated = lines
        .iter()
        .filter(|l| l["kind"] == "request" && l["run"] == "work")
        .nth(2)
        .unwrap();
    let tokens_of = |l: &Value| -> u64 {
        [
            "input_tokens",
            "cached_input_tokens",
            "cache_write_tokens",
            "output_tokens",
        ]
        .iter()
        .map(|f| l[*f].as_u64().unwrap())
        .sum()
    };
    assert_eq!(agent_a["redundant_tokens"], tokens_of(repeated));
    assert!(close(
        agent_a["redundant_cost_usd"].as_f64().unwrap(),
        repeated["cost_usd"].as_f64().unwrap()
    ));
    assert_eq!(
        agent_a["runs_stopped"],
        serde_json::json!({"max_requests": 1})
    );
    assert_eq!(agent_a["anomalies"], 0);
    assert_eq!(agent_a["team"], "team-1");

    let agent_b = &r["agents"]["agent-b"];
    let want_b = sums(&lines, "agent-b");
    assert_eq!(agent_b["requests"], 2);
    assert_eq!(agent_b["input_tokens"], want_b.input);
    assert_eq!(agent_b["redundant_requests"], 0);
    assert_eq!(agent_b["redundant_share"], 0.0);
    assert_eq!(agent_b["outcomes"]["ticket_resolved"], 1);
    assert!(close(
        agent_b["cost_per_outcome_usd"]["ticket_resolved"]
            .as_f64()
            .unwrap(),
        want_b.cost
    ));
    // agent-b has no team: the only team is agent-a's, with agent-a's figures.
    let teams = r["teams"].as_object().unwrap();
    assert_eq!(teams.keys().collect::<Vec<_>>(), ["team-1"]);
    assert_eq!(teams["team-1"]["requests"], 9);
    assert_eq!(teams["team-1"]["outcomes"]["ticket_resolved"], 3);

    let growth = &r["context_growth"][0];
    assert_eq!(
        (growth["agent"].as_str(), growth["run"].as_str()),
        (Some("agent-a"), Some("loop"))
    );
    assert_eq!(growth["calls"], 4);
    let loop_inputs: Vec<u64> = lines
        .iter()
        .filter(|l| l["kind"] == "request" && l["run"] == "loop" && l["status"] == 200)
        .map(|l| l["input_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(growth["first_input_tokens"], loop_inputs[0]);
    assert_eq!(growth["last_input_tokens"], loop_inputs[3]);
    assert!(growth["growth_per_call"].as_f64().unwrap() > 0.0);
    let points = r["spend_over_time"]["points"].as_array().unwrap();
    let charted: f64 = points.iter().map(|p| p["cost_usd"].as_f64().unwrap()).sum();
    assert!(close(charted, want.cost + want_b.cost));

    // Filters.
    let only_b = report_json(&config_path, &["--agent", "agent-b"]);
    assert_eq!(
        only_b["agents"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["agent-b"]
    );
    let both = report_json(&config_path, &["--agent", "agent-a,agent-b"]);
    assert_eq!(both["agents"].as_object().unwrap().len(), 2);
    let team = report_json(&config_path, &["--team", "team-1"]);
    assert_eq!(
        team["agents"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["agent-a"]
    );
    let recent = report_json(&config_path, &["--since", "1h"]);
    assert_eq!(recent["agents"]["agent-a"]["requests"], 9);

    // The other formats.
    let (code, table, _) = report(&config_path, &["--format", "table"]);
    assert_eq!(code, 0);
    assert!(table.contains("audit chain: ok (16 records)"), "{table}");
    let row = table.lines().find(|l| l.starts_with("agent-a ")).unwrap();
    assert!(row.split_whitespace().nth(1) == Some("9"), "{row}");
    let (code, csv, _) = report(&config_path, &["--format", "csv"]);
    assert_eq!(code, 0);
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 4, "header, two agents, one team: {csv}");
    assert!(rows[0].starts_with("scope,id,team,requests,"));
    assert!(rows[0].contains("outcomes:ticket_resolved"));
    assert!(rows[0].contains("cost_per_outcome_usd:pr_merged"));
    assert!(rows[0].contains("runs_stopped:max_requests"));
    assert!(rows[1].starts_with("agent,agent-a,team-1,9,"));
    assert!(rows[3].starts_with("team,team-1,,9,"));
    let (code, html, _) = report(&config_path, &["--format", "html"]);
    assert_eq!(code, 0);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches("<svg").count(), 3, "three charts");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "self-contained"
    );
    assert!(!html.contains("<script"));
    assert!(html.contains("agent-a · ticket_resolved"));

    // An edited line: the chain is reported broken, loudly, and the figures still come.
    let file = tokenwarden::audit::log_files(&audit).unwrap().remove(0);
    let text = std::fs::read_to_string(&file).unwrap();
    let first = &lines[0];
    let needle = format!("\"input_tokens\":{},", first["input_tokens"]);
    assert!(text.contains(&needle));
    std::fs::write(&file, text.replacen(&needle, "\"input_tokens\":1,", 1)).unwrap();
    let (code, stdout, stderr) = report(&config_path, &["--format", "json"]);
    assert_eq!(code, 2, "a broken chain is exit status 2");
    assert!(stderr.contains("AUDIT CHAIN BROKEN"), "{stderr}");
    let r = json(stdout.as_bytes());
    assert_eq!(r["chain"]["ok"], false);
    let error = r["chain"]["error"].as_str().unwrap();
    assert!(error.contains(":1: seq 1: the line was altered"), "{error}");
    assert_eq!(r["chain"]["errors"], 1, "one edited line is one break");
    assert_eq!(
        r["agents"]["agent-a"]["input_tokens"],
        want.input - first["input_tokens"].as_u64().unwrap() + 1
    );
    let (code, table, _) = report(&config_path, &["--format", "table"]);
    assert_eq!(code, 2);
    assert!(table.contains("AUDIT CHAIN BROKEN"));
}

#[tokio::test]
async fn since_leaves_out_older_lines_and_malformed_lines_are_counted() {
    use tokenwarden::audit::{AuditLog, AuditSettings, Record};
    let data = tempfile::tempdir().unwrap();
    let audit = data.path().join("audit");
    let log = AuditLog::open(
        AuditSettings {
            dir: audit.clone(),
            max_file_bytes: 1 << 20,
            commit_interval: std::time::Duration::ZERO,
            hmac_key: None,
            snapshot: None,
        },
        prometheus::IntCounter::new("r", "r").unwrap(),
        prometheus::IntCounter::new("e", "e").unwrap(),
    )
    .unwrap();
    let at = |days_ago: u64| {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(days_ago * 86_400);
        jiff::Timestamp::try_from(t).unwrap()
    };
    for (days_ago, agent, cost) in [
        (10, "x", 1.0),
        (3, "x", 0.5),
        (1, "y", 0.25),
        (0, "x", 0.125),
    ] {
        log.append(Record {
            ts: at(days_ago),
            kind: "request",
            agent: Some(agent.into()),
            outcome: "ok",
            input_tokens: 100,
            cost_usd: cost,
            ..Record::default()
        });
    }
    log.append(Record {
        ts: at(0),
        kind: "admin",
        ..Record::default()
    });
    log.close();
    let file = tokenwarden::audit::log_files(&audit).unwrap().remove(0);
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("this is not a record\n");
    std::fs::write(&file, text).unwrap();
    let config = data.path().join("tokenwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndir = \"{}\"\n[[providers]]\nname = \"p\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9\"\nprefix = \"/p\"\n",
            data.path().display()
        ),
    )
    .unwrap();

    let (code, stdout, stderr) = report(&config, &["--format", "json", "--since", "7d"]);
    assert_eq!(code, 2, "the junk line breaks the chain: {stderr}");
    assert!(stderr.contains("malformed"), "{stderr}");
    let r = json(stdout.as_bytes());
    assert_eq!(r["lines"]["malformed"], 1);
    assert!(r["lines"]["malformed_at"][0]
        .as_str()
        .unwrap()
        .contains(":6: "));
    assert_eq!(r["lines"]["skipped"], 1, "the admin line");
    assert_eq!(r["agents"]["x"]["requests"], 2);
    assert_eq!(r["agents"]["x"]["cost_usd"], 0.625);
    assert_eq!(r["agents"]["y"]["requests"], 1);
    let (_, stdout, _) = report(
        &config,
        &["--format", "json", "--since", "2d", "--agent", "x"],
    );
    let r = json(stdout.as_bytes());
    assert_eq!(
        r["agents"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["x"]
    );
    assert_eq!(r["agents"]["x"]["requests"], 1);
    let (_, stdout, _) = report(&config, &["--format", "json"]);
    let r = json(stdout.as_bytes());
    assert_eq!(r["agents"]["x"]["requests"], 3);
    assert_eq!(
        r["spend_over_time"]["bucket"], "day",
        "ten days are charted per day"
    );
}

// === the SRE files ===

/// Every `tokenwarden_…` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tokenwarden_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_alert_rules_name_only_metrics_the_proxy_exports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard_text =
        std::fs::read_to_string(root.join("config/grafana/tokenwarden.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&dashboard_text).unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 8);
    let alerts_text = std::fs::read_to_string(root.join("config/prometheus/alerts.yml")).unwrap();
    let alerts: serde_norway::Value = serde_norway::from_str(&alerts_text).unwrap();
    let rules = alerts["groups"][0]["rules"].as_sequence().unwrap();
    assert!(rules.len() >= 5);
    for rule in rules {
        assert!(
            rule["alert"].as_str().is_some() && rule["expr"].as_str().is_some(),
            "{rule:?}"
        );
    }

    // Make every family appear: a budget (budget gauges), a run stopped by max_requests
    // (runs_stopped, rejections), an outcome, an unauthorised call, a token spike of
    // agent-b against its steady baseline (anomalies).
    let mock = Mock::start();
    let proxy = Proxy::start(&config_plus(
        &mock,
        "[anomalies]\nwindow = \"50ms\"\nfactor = 2.0\nmin_tokens = 100\n",
        "[[agents.budgets]]\nperiod = \"day\"\nusd = 100.0\ntokens = 1000000\n[agents.runs]\nmax_requests = 1",
    ));
    for i in 0..8 {
        assert_eq!(
            call(&proxy, KEY_B, "steady", &chat(&i.to_string())).await,
            200
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        call(&proxy, KEY_B, "burst", &chat(&"x".repeat(40_000))).await,
        200
    );
    proxy
        .wait_for_metric(r#"tokenwarden_anomalies_total{agent="agent-b"} 1"#)
        .await;
    assert_eq!(call(&proxy, KEY_A, "r", &chat("one")).await, 200);
    assert_eq!(call(&proxy, KEY_A, "r", &chat("two")).await, 403);
    assert_eq!(call(&proxy, "tw-nobody", "r", &chat("x")).await, 401);
    let auth = bearer(KEY_A);
    assert_eq!(
        post_outcome(
            &proxy,
            &[("authorization", &auth)],
            r#"{"kind":"ticket_resolved"}"#
        )
        .await
        .0,
        201
    );
    let text = proxy
        .wait_for_metric(r#"tokenwarden_outcomes_total{agent="agent-a",kind="ticket_resolved"} 1"#)
        .await;
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    for (file, named) in [
        (
            "config/grafana/tokenwarden.json",
            metric_names(&dashboard_text),
        ),
        ("config/prometheus/alerts.yml", metric_names(&alerts_text)),
    ] {
        assert!(!named.is_empty());
        for name in named {
            assert!(
                exported.contains(&name),
                "{file} names {name}, which /metrics does not export:\n{text}"
            );
        }
    }
}
