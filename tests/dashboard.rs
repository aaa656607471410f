//! `/dashboard` in a real headless browser (Debian's chromium): after a known sequence
//! of requests, outcomes, a stopped run and a paused agent, the page shows each of them,
//! with the figures of the audit log. A screenshot is left in
//! `target/test-artifacts/dashboard.png`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use serde_json::Value;

const ADMIN_TOKEN: &str = "tw-test-admin-token-for-the-dashboard";

fn dashboard_config(mock: &Mock) -> String {
    let config = config(mock).replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"TW_TEST_ADMIN_TOKEN\"\n",
        1,
    );
    let key_line = format!(
        "key_sha256 = \"{}\"\n",
        tokenwarden::identity::key_digest_hex(KEY_A)
    );
    config.replacen(
        &key_line,
        &format!(
            "{key_line}[agents.runs]\nmax_repeats = 2\n\
             [[agents.budgets]]\nperiod = \"day\"\nusd = 2.0\n"
        ),
        1,
    )
}

fn start(mock: &Mock) -> Proxy {
    Proxy::start_with_env(
        &dashboard_config(mock),
        &[
            ("TW_TEST_OPENAI_KEY", OPENAI_KEY),
            ("TW_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY),
            ("TW_TEST_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    )
}

fn chat(text: &str) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":20,"messages":[{{"role":"user","content":"{text}"}}]}}"#
    )
}

async fn call(proxy: &Proxy, key: &str, run: Option<&str>, body: &str) -> u16 {
    let auth = bearer(key);
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(run) = run {
        headers.push(("x-tokenwarden-run", run));
    }
    let (status, _, _) = send(request(
        "POST",
        &proxy.url("/openai/v1/chat/completions"),
        &headers,
        Bytes::from(body.to_owned()),
    ))
    .await;
    status.as_u16()
}

async fn admin_post(proxy: &Proxy, path: &str) {
    let auth = bearer(ADMIN_TOKEN);
    let (status, _, body) = send(request(
        "POST",
        &proxy.admin_url(path),
        &[("authorization", auth.as_str())],
        Bytes::new(),
    ))
    .await;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
}

// === the browser ===

fn chromium() -> PathBuf {
    let found = std::env::var_os("TOKENWARDEN_CHROMIUM")
        .map(PathBuf::from)
        .or_else(|| {
            ["chromium", "chromium-browser", "google-chrome"]
                .iter()
                .find_map(|name| {
                    std::env::var_os("PATH").and_then(|paths| {
                        std::env::split_paths(&paths)
                            .map(|dir| dir.join(name))
                            .find(|p| p.is_file())
                    })
                })
        });
    found.expect(
        "the dashboard test needs a headless browser: apt-get install -y chromium \
         (scripts/test does so when run as root), or set TOKENWARDEN_CHROMIUM",
    )
}

/// Loads `url` in headless chromium, lets its script run (fetches included), and
/// returns the DOM as the page then shows it; with `screenshot`, also a PNG of it.
fn browse(url: &str, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-extensions",
        "--disable-sync",
        "--window-size=1280,1100",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let mut child = cmd
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("chromium did not finish loading {url}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "chromium failed on {url}");
    String::from_utf8(output.stdout).unwrap()
}

// === reading the DOM ===

/// The element that starts with `start` (`<tr data-agent="x"`), up to its end tag.
fn element<'a>(dom: &'a str, start: &str, end: &str) -> &'a str {
    let at = dom
        .find(start)
        .unwrap_or_else(|| panic!("no {start} in the page:\n{dom}"));
    let len = dom[at..].find(end).unwrap();
    &dom[at..at + len]
}

/// The text of the cell `data-field="field"` in `row`, tags removed.
fn cell(row: &str, field: &str) -> String {
    let cell = element(row, &format!("data-field=\"{field}\""), "</td>");
    text(cell.split_once('>').unwrap().1)
}

fn text(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&").trim().to_owned()
}

/// Dollars as the page writes them.
fn usd(v: f64) -> String {
    if v.abs() >= 1.0 {
        format!("${v:.2}")
    } else {
        format!("${v:.6}")
    }
}

fn cost_of(lines: &[Value], agent: &str) -> (u64, f64) {
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "request" && l["agent"] == agent)
        .collect();
    let cost = requests
        .iter()
        .map(|l| l["cost_usd"].as_f64().unwrap())
        .sum();
    (requests.len() as u64, cost)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_spend_outcomes_stopped_runs_and_pauses() {
    let mock = Mock::start();
    let proxy = start(&mock);

    // agent-a: a run that repeats itself until its run limit stops it, one other
    // request, and two tickets resolved.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(call(&proxy, KEY_A, Some("loop-1"), &chat("same again")).await);
    }
    assert_eq!(statuses, [200, 200, 403], "stopped at the second repeat");
    assert_eq!(
        call(&proxy, KEY_A, None, &chat("something else")).await,
        200
    );
    let auth = bearer(KEY_A);
    let (status, _, _) = post_json(
        &proxy.url("/v1/outcomes"),
        &[("authorization", auth.as_str())],
        r#"{"kind":"ticket_resolved","count":2,"ref":"T-1"}"#,
    )
    .await;
    assert_eq!(status, 201);
    // agent-b: one request, then paused by an admin.
    assert_eq!(call(&proxy, KEY_B, None, &chat("b")).await, 200);
    admin_post(&proxy, "/admin/agents/agent-b/pause").await;
    // 5 requests, 1 run line, 1 outcome, 1 admin line.
    let lines = proxy.wait_for_audit_lines(8).await;
    let (a_requests, a_cost) = cost_of(&lines, "agent-a");
    let (b_requests, b_cost) = cost_of(&lines, "agent-b");
    assert_eq!((a_requests, b_requests), (4, 1));
    assert!(a_cost > 0.0 && b_cost > 0.0);

    let url = proxy.admin_url(&format!("/dashboard#token={ADMIN_TOKEN}"));
    let dom = browse(&url, None);

    assert!(dom.contains("Audit chain verified"), "{dom}");
    let a = element(&dom, "<tr data-agent=\"agent-a\"", "</tr>");
    assert_eq!(cell(a, "team"), "team-1");
    assert!(cell(a, "state").starts_with("active"), "{a}");
    assert_eq!(cell(a, "requests"), a_requests.to_string());
    assert_eq!(cell(a, "cost"), usd(a_cost));
    assert_eq!(cell(a, "outcomes"), "ticket_resolved 2");
    assert_eq!(
        cell(a, "cost_per_outcome"),
        format!("ticket_resolved {}", usd(a_cost / 2.0))
    );
    assert_eq!(cell(a, "runs_stopped"), "max_repeats 1");
    // Of 4 requests, the second repeated the first (the refused third burned nothing).
    let redundant = lines
        .iter()
        .find(|l| l["agent"] == "agent-a" && l["outcome"] == "ok" && l["run"] == "loop-1")
        .unwrap();
    assert_eq!(
        cell(a, "redundant"),
        format!("25.0% · {}", usd(redundant["cost_usd"].as_f64().unwrap()))
    );
    let budget = cell(a, "budgets");
    assert!(
        budget.starts_with(&format!("day · {} of $2.00", usd(a_cost))),
        "{budget}"
    );

    let b = element(&dom, "<tr data-agent=\"agent-b\"", "</tr>");
    assert_eq!(cell(b, "state"), "paused Resume");
    assert!(
        b.contains(r#"data-action="POST /admin/agents/agent-b/resume""#),
        "{b}"
    );
    assert_eq!(cell(b, "cost"), usd(b_cost));
    assert_eq!(cell(b, "budgets"), "no budget");

    let run = element(&dom, "<tr data-run=\"loop-1\"", "</tr>");
    assert_eq!(cell(run, "state"), "stopped");
    assert!(cell(run, "why").starts_with("max_repeats: "), "{run}");
    assert_eq!(cell(run, "requests"), "2");
    assert!(
        run.contains(
            r#"data-action="POST /admin/runs/loop-1/resume?agent=agent-a">Resume</button>"#
        ),
        "{run}"
    );

    // The spend chart has a bar per agent that spent.
    let spend = element(&dom, "<div id=\"spend\"", "</div>");
    assert_eq!(spend.matches("<rect").count(), 2, "{spend}");
    // The token left the address bar and never reached the server's log.
    assert!(!proxy.proc.log_text().contains(ADMIN_TOKEN));

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    browse(&url, Some(&png));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000);

    // What the two buttons send, sent: the next look shows agent-b active and the run
    // going again.
    admin_post(&proxy, "/admin/agents/agent-b/resume").await;
    admin_post(&proxy, "/admin/runs/loop-1/resume?agent=agent-a").await;
    let dom = browse(&url, None);
    let b = element(&dom, "<tr data-agent=\"agent-b\"", "</tr>");
    assert_eq!(cell(b, "state"), "active Pause");
    let run = element(&dom, "<tr data-run=\"loop-1\"", "</tr>");
    assert_ne!(cell(run, "state"), "stopped");
    assert!(run.contains(">Stop</button>"), "{run}");

    // Three page loads, one audit line for the reads of the overview: polling a
    // dashboard does not flood the log.
    let lines = proxy.audit_lines();
    let reads: Vec<&Value> = lines
        .iter()
        .filter(|l| l["kind"] == "admin" && l["reason"] == "overview")
        .collect();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0]["by"], "admin");
    for line in &lines {
        assert!(!line.to_string().contains(ADMIN_TOKEN));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_good_token_the_page_shows_nothing_but_the_sign_in() {
    let mock = Mock::start();
    let proxy = start(&mock);
    assert_eq!(call(&proxy, KEY_A, None, &chat("x")).await, 200);

    // The page itself is served to anyone, with a policy that lets nothing else in.
    let (status, headers, body) = get(&proxy.admin_url("/dashboard"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(csp.contains("connect-src 'self'"));
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(!String::from_utf8_lossy(&body).contains("agent-a"));

    let dom = browse(&proxy.admin_url("/dashboard"), None);
    assert!(element(&dom, "<form id=\"login\"", ">").ends_with("\"login\""));
    assert!(dom.contains("<main id=\"main\" hidden"), "{dom}");
    assert!(!dom.contains("agent-a"));

    let dom = browse(&proxy.admin_url("/dashboard#token=wrong-token"), None);
    assert!(dom.contains("The token was refused."), "{dom}");
    assert!(!dom.contains("agent-a"));
    // The refusal is audited, without the token it tried.
    let lines = proxy.wait_for_audit_lines(2).await;
    let refused = lines
        .iter()
        .find(|l| l["kind"] == "admin" && l["outcome"] == "rejected")
        .unwrap();
    assert_eq!(refused["path"], "/admin/overview");
    assert!(!refused.to_string().contains("wrong-token"));
}
