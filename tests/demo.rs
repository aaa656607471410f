//! `tokenwarden demo` as a newcomer runs it: the real binary, no API key, no network.
//! What they should see: the runaway loop stopped by its run limit, support-bot's
//! outcomes recorded, the report with cost per outcome and the runaway's redundant
//! share, and an audit log that `tokenwarden audit verify` accepts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bin;
use serde_json::Value;

/// The value after `label` on the line that starts with it (after indentation).
fn after<'a>(stdout: &'a str, label: &str) -> &'a str {
    stdout
        .lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no line {label:?} in:\n{stdout}"))
        .trim()
}

fn verify(audit_dir: &str) -> String {
    let out = Command::new(bin())
        .args(["audit", "verify", audit_dir])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "audit verify failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_demo_stops_the_runaway_and_reports_cost_per_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // No --dir: a fresh directory under the temporary directory (here, the test's).
    let out = Command::new(bin())
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a demo takes seconds"
    );
    // The access log stays out of the way (warnings only, and there are none).
    assert!(stderr.trim().is_empty(), "stderr: {stderr}");

    // The runaway: stopped by its run limit, in the provider's error shape.
    let refusal = stdout
        .lines()
        .position(|l| l.contains("403  refused by the proxy (x-should-retry: false)"))
        .unwrap_or_else(|| panic!("no refusal in:\n{stdout}"));
    let error = stdout.lines().nth(refusal + 1).unwrap();
    assert!(
        error.contains("run_stopped: tokenwarden: run fix-nightly-build of agent runaway-loop crossed max_tokens"),
        "{error}"
    );
    assert!(error.contains("the run is stopped"), "{error}");
    assert!(
        stdout.contains("and any later one never left the proxy"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(retry: the identical request)"),
        "{stdout}"
    );

    // support-bot: three outcomes recorded.
    assert_eq!(
        stdout
            .matches("POST /v1/outcomes ticket_resolved: 201 Created")
            .count(),
        3,
        "{stdout}"
    );

    // The report, as `tokenwarden report` prints it.
    assert!(stdout.contains("audit chain: ok"), "{stdout}");
    let outcome_row = stdout
        .lines()
        .find(|l| l.starts_with("agent support-bot") && l.contains("ticket_resolved"))
        .unwrap_or_else(|| panic!("no outcome row in:\n{stdout}"));
    let cells: Vec<&str> = outcome_row.split_whitespace().collect();
    assert_eq!(cells[3], "3", "{outcome_row}");
    let per_outcome: f64 = cells[4].parse().unwrap();
    assert!(per_outcome > 0.0, "cost per outcome: {outcome_row}");
    let runaway_row = stdout
        .lines()
        .find(|l| l.starts_with("runaway-loop ") && l.contains('%'))
        .unwrap_or_else(|| panic!("no runaway row in:\n{stdout}"));
    let share = runaway_row
        .split_whitespace()
        .find(|c| c.ends_with('%'))
        .unwrap();
    let share: f64 = share.trim_end_matches('%').parse().unwrap();
    assert!(share > 0.0, "redundant share: {runaway_row}");
    let stop_row = stdout
        .lines()
        .find(|l| l.starts_with("runaway-loop") && l.contains("max_tokens"))
        .unwrap_or_else(|| panic!("no stopped run in:\n{stdout}"));
    assert!(stop_row.trim_end().ends_with('1'), "{stop_row}");

    // The files it names are there and sound.
    let audit_dir = after(&stdout, "audit log");
    assert!(
        audit_dir.starts_with(tmp.path().to_str().unwrap()),
        "{audit_dir}"
    );
    assert!(verify(audit_dir).starts_with("ok: "));
    let config = after(&stdout, "config");
    let report = Command::new(bin())
        .args(["report", "--format", "json", "--config", config])
        .output()
        .unwrap();
    assert!(report.status.success());
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    let runaway = &report["agents"]["runaway-loop"];
    assert_eq!(runaway["runs_stopped"]["max_tokens"], 1, "{runaway}");
    assert!(runaway["redundant_share"].as_f64().unwrap() > 0.0);
    assert_eq!(
        report["agents"]["support-bot"]["outcomes"]["ticket_resolved"],
        3
    );
}

#[test]
fn a_dir_that_holds_files_is_refused_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let out = Command::new(bin())
        .args(["demo", "--dir", tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not empty: give --dir a new or empty directory"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("notes.txt")).unwrap(),
        "mine"
    );
}

#[tokio::test]
async fn keep_running_serves_until_interrupted_and_leaves_a_sound_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("kept");
    let mut child = Command::new(bin())
        .args(["demo", "--keep-running", "--dir", dir.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            text.push_str(&line);
            text.push('\n');
            if line.trim_start().starts_with("a call") {
                let _ = tx.send(text.clone());
            }
        }
    });
    let text = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the demo never said it keeps serving");
    let metrics_url = after(&text, "metrics").to_owned();
    let (status, _, body) = common::get(&metrics_url, &[]).await;
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains(
            "tokenwarden_runs_stopped_total{agent=\"runaway-loop\",condition=\"max_tokens\"} 1"
        ),
        "{body}"
    );
    // The admin token it prints opens the admin API.
    let admin = after(&text, "admin API");
    let token = admin
        .split("Bearer ")
        .nth(1)
        .and_then(|t| t.split('\'').next())
        .unwrap();
    let runs_url = admin.rsplit(' ').next().unwrap();
    let auth = format!("Bearer {token}");
    let (status, _, body) = common::get(runs_url, &[("authorization", &auth)]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let runs: Value = serde_json::from_slice(&body).unwrap();
    assert!(runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "fix-nightly-build" && r["state"] == "stopped"));
    // The dashboard link carries the same token (in the fragment, which no server sees),
    // and the overview it reads shows the stopped run and the outcomes.
    let dashboard = after(&text, "dashboard");
    let (page, fragment) = dashboard.split_once('#').unwrap();
    assert_eq!(fragment, format!("token={token}"));
    let (status, _, _) = common::get(page, &[]).await;
    assert_eq!(status, 200);
    let overview_url = page.replace("/dashboard", "/admin/overview");
    let (status, _, body) = common::get(&overview_url, &[("authorization", &auth)]).await;
    assert_eq!(status, 200);
    let overview: Value = serde_json::from_slice(&body).unwrap();
    let support = &overview["insights"]["agents"]["support-bot"];
    assert_eq!(support["outcomes"]["ticket_resolved"], 3);
    assert_eq!(
        overview["insights"]["agents"]["runaway-loop"]["runs_stopped"]["max_tokens"],
        1
    );

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    // The admin read above is in the log too, and the chain holds.
    verify(dir.join("data/audit").to_str().unwrap());
}
