//! A synthetic audit log for the report's bench and timing: chained by the real writer,
//! shaped like a busy proxy's (many agents and teams, runs, repeated bodies, outcomes,
//! stopped runs, a few admin lines).

use std::path::Path;
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use tokenwarden::audit::{AuditLog, AuditSettings, Fingerprint, Record};

const AGENTS: u64 = 20;

/// Writes `n` chained lines into `dir`, spread over the `span` before now.
pub fn write_log(dir: &Path, n: u64, span: Duration) {
    let log = AuditLog::open(
        AuditSettings {
            dir: dir.to_path_buf(),
            max_file_bytes: 64 << 20,
            commit_interval: Duration::from_millis(5),
            hmac_key: None,
            snapshot: None,
        },
        IntCounter::new("r", "r").expect("counter"),
        IntCounter::new("e", "e").expect("counter"),
    )
    .expect("open the audit log");
    let start = SystemTime::now() - span;
    let step = span / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    for i in 0..n {
        // The writer holds at most its queue bound; wait for it rather than grow it.
        while log.accepting().is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let at = start + step * u32::try_from(i).unwrap_or(0);
        let ts = jiff::Timestamp::try_from(at).unwrap_or_default();
        log.append(record(i, ts));
    }
    log.close();
}

fn record(i: u64, ts: jiff::Timestamp) -> Record {
    let agent = i % AGENTS;
    let base = Record {
        ts,
        agent: Some(format!("agent-{agent}").into()),
        team: Some(format!("team-{}", agent % 4).into()),
        run: Some(format!("run-{agent}-{}", i / 400).into()),
        ..Record::default()
    };
    // The line's place in its agent's own sequence: each agent gets every kind of line.
    let nth = i / AGENTS;
    match (i % 1000, nth % 50) {
        (_, 49) if nth % 200 == 199 => Record {
            kind: "run",
            outcome: "stopped",
            reason: "max_requests".into(),
            detail: Some("run crossed max_requests".into()),
            ..base
        },
        (998, _) => Record {
            kind: "admin",
            outcome: "ok",
            reason: "pause".into(),
            ..base
        },
        (_, 7) | (_, 31) => Record {
            kind: "outcome",
            outcome: "recorded",
            status: 201,
            method: "POST".into(),
            path: "/v1/outcomes".into(),
            outcome_kind: Some(
                if nth % 50 == 7 {
                    "ticket_resolved"
                } else {
                    "pr_merged"
                }
                .into(),
            ),
            count: Some(1 + i % 3),
            reference: Some(format!("JIRA-{i}")),
            client: "10.0.0.7:50312".parse().ok(),
            ..base
        },
        _ => {
            let input = 800 + (i % 400) * 10;
            Record {
                kind: "request",
                request_id: http::HeaderValue::from_str(&format!("req_{i:016x}")).ok(),
                provider: Some("openai".into()),
                model: Some("gpt-4o-mini".into()),
                method: "POST".into(),
                path: "/openai/v1/chat/completions".into(),
                status: 200,
                outcome: "ok",
                reason: "complete".into(),
                input_tokens: input,
                cached_input_tokens: input / 4,
                output_tokens: 300,
                cost_usd: input as f64 * 0.15e-6 + 300.0 * 0.6e-6,
                latency_ms: 812.5,
                ttfb_ms: Some(201.0),
                // One request in ten repeats the body its agent sent just before.
                fingerprint: Some(Fingerprint::from(format!(
                    "{:064x}",
                    if nth % 10 == 3 { i - AGENTS } else { i }
                ))),
                client: "10.0.0.7:50312".parse().ok(),
                ..base
            }
        }
    }
}
