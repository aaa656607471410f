use std::path::Path;

use prometheus::IntCounter;

use super::*;
use crate::audit::{AuditLog, AuditSettings, Record};

const NOW: &str = "2026-11-29T12:00:00.000Z";

fn write(dir: &Path, records: Vec<Record>) {
    let log = AuditLog::open(
        AuditSettings {
            dir: dir.to_path_buf(),
            max_file_bytes: 4096,
            commit_interval: Duration::ZERO,
            hmac_key: None,
            snapshot: None,
        },
        IntCounter::new("r", "r").unwrap(),
        IntCounter::new("e", "e").unwrap(),
    )
    .unwrap();
    for r in records {
        log.append(r);
    }
    log.close();
}

fn request(ts: &str, agent: &str, fp: &str, input: u64, cost: f64) -> Record {
    Record {
        ts: ts.parse().unwrap(),
        kind: "request",
        agent: Some(agent.into()),
        team: Some("t".into()),
        run: Some("r1".into()),
        outcome: "ok",
        input_tokens: input,
        output_tokens: 2,
        cost_usd: cost,
        fingerprint: Some(fp.repeat(64).into()),
        ..Record::default()
    }
}

fn options(since: Option<Duration>) -> Options {
    Options {
        since,
        now: SystemTime::UNIX_EPOCH
            + Duration::from_millis(ts_millis(NOW).unwrap().try_into().unwrap()),
        agents: vec![],
        teams: vec![],
        redundancy_window: Duration::from_secs(3600),
    }
}

#[test]
fn timestamps_parse_in_both_ways_alike() {
    for ts in [
        "2026-11-29T15:30:00.123Z",
        "1970-01-01T00:00:00.000Z",
        "2024-02-29T23:59:59.999Z",
    ] {
        let slow = ts.parse::<jiff::Timestamp>().unwrap().as_millisecond();
        assert_eq!(ts_millis(ts), Some(slow), "{ts}");
    }
    assert_eq!(
        ts_millis("2026-11-29T15:30:00Z"),
        Some(ts_millis("2026-11-29T15:30:00.000Z").unwrap())
    );
    assert_eq!(ts_millis("yesterday"), None);
}

#[test]
fn figures_redundancy_outcomes_and_stops_are_summed() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        vec![
            request("2026-11-29T09:00:00.000Z", "a", "1", 10, 0.5),
            // Same body 30 min later: redundant. Another 2 h later: outside the window.
            request("2026-11-29T09:30:00.000Z", "a", "1", 20, 0.25),
            request("2026-11-29T11:31:00.000Z", "a", "1", 40, 0.25),
            // Same body, other agent: not redundant.
            request("2026-11-29T11:32:00.000Z", "b", "1", 5, 1.0),
            Record {
                ts: "2026-11-29T11:33:00.000Z".parse().unwrap(),
                kind: "outcome",
                agent: Some("a".into()),
                team: Some("t".into()),
                outcome_kind: Some("ticket_resolved".into()),
                count: Some(4),
                ..Record::default()
            },
            Record {
                ts: "2026-11-29T11:34:00.000Z".parse().unwrap(),
                kind: "run",
                agent: Some("a".into()),
                outcome: "stopped",
                reason: "max_requests".into(),
                ..Record::default()
            },
            Record {
                ts: "2026-11-29T11:35:00.000Z".parse().unwrap(),
                kind: "admin",
                ..Record::default()
            },
            Record {
                ts: "2026-11-29T11:36:00.000Z".parse().unwrap(),
                kind: "anomaly",
                agent: Some("b".into()),
                reason: "spend_spike".into(),
                ..Record::default()
            },
        ],
    );
    let report = build(dir.path(), None, &options(None)).unwrap();
    assert!(report.chain.ok, "{:?}", report.chain);
    assert_eq!(report.chain.records, 8);
    assert_eq!(report.lines.skipped, 1);
    let a = &report.agents["a"];
    assert_eq!(a.requests, 3);
    assert_eq!(a.input_tokens, 70);
    assert_eq!(a.output_tokens, 6);
    assert_eq!(a.cost_usd, 1.0);
    assert_eq!(a.redundant_requests, 1);
    assert_eq!(a.redundant_tokens, 22);
    assert_eq!(a.redundant_cost_usd, 0.25);
    assert!((a.redundant_share - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(a.outcomes["ticket_resolved"], 4);
    assert_eq!(a.cost_per_outcome_usd["ticket_resolved"], 0.25);
    assert_eq!(a.runs_stopped["max_requests"], 1);
    let b = &report.agents["b"];
    assert_eq!((b.redundant_requests, b.anomalies), (0, 1));
    assert_eq!(b.anomalies_by_signal["spend_spike"], 1);
    let t = &report.teams["t"];
    assert_eq!((t.requests, t.cost_usd), (4, 2.0));
    assert_eq!(t.cost_per_outcome_usd["ticket_resolved"], 0.5);
    let g = &report.context_growth[0];
    assert_eq!((g.agent.as_str(), g.calls), ("a", 3));
    assert_eq!((g.first_input_tokens, g.last_input_tokens), (10, 40));
    assert_eq!(g.growth_per_call, 15.0);
    assert_eq!(report.spend_over_time.bucket, "hour");
    assert_eq!(
        report.spend_over_time.points.len(),
        3,
        "09h, 10h (empty), 11h"
    );
    assert_eq!(report.spend_over_time.points[1].cost_usd, 0.0);

    // The last hour only: the first two requests fall out of the period, yet the third
    // still finds its body seen... 2 h before, outside the window: not redundant.
    let recent = build(dir.path(), None, &options(Some(Duration::from_secs(3600)))).unwrap();
    assert_eq!(recent.agents["a"].requests, 1);
    assert_eq!(recent.agents["a"].redundant_requests, 0);
    assert_eq!(recent.period.from.as_deref(), Some("2026-11-29T11:00:00Z"));

    let only_b = build(
        dir.path(),
        None,
        &Options {
            agents: vec!["b".into()],
            ..options(None)
        },
    )
    .unwrap();
    assert_eq!(only_b.agents.keys().collect::<Vec<_>>(), ["b"]);

    for text in [
        table::render(&report),
        csv::render(&report),
        html::render(&report),
        json::render(&report),
    ] {
        assert!(text.contains("ticket_resolved"), "{text}");
    }
}

#[test]
fn an_edited_line_and_a_malformed_one_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        (0..5)
            .map(|i| request("2026-11-29T09:00:00.000Z", "a", &i.to_string(), 10, 0.1))
            .collect(),
    );
    let file = crate::audit::log_files(dir.path()).unwrap().remove(0);
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[1] = lines[1].replace("\"input_tokens\":10", "\"input_tokens\":99");
    lines.insert(3, "{not json".into());
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let report = build(dir.path(), None, &options(None)).unwrap();
    assert!(!report.chain.ok);
    let error = report.chain.error.as_deref().unwrap();
    assert!(error.contains(":2: seq 2: the line was altered"), "{error}");
    assert_eq!(report.lines.malformed, 1);
    assert!(report.lines.malformed_at[0].contains(":4: "));
    assert_eq!(report.agents["a"].requests, 5, "figures still counted");
    assert_eq!(report.agents["a"].input_tokens, 139);
}

#[test]
fn a_torn_last_line_is_a_write_in_progress_not_a_break() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        vec![request("2026-11-29T09:00:00.000Z", "a", "1", 10, 0.1)],
    );
    let file = crate::audit::log_files(dir.path()).unwrap().remove(0);
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("{\"seq\":2,\"ts\":\"2026-11-29T09:0");
    std::fs::write(&file, text).unwrap();
    let report = build(dir.path(), None, &options(None)).unwrap();
    assert!(report.chain.ok, "{:?}", report.chain);
    assert_eq!(report.lines.malformed, 1);
    assert!(report.lines.malformed_at[0].contains(":2: torn"));
    assert_eq!(report.agents["a"].requests, 1);
}

#[test]
fn context_growth_follows_a_bounded_number_of_runs_and_keeps_the_largest() {
    let mut agg = Aggregator::new(options(None));
    let line = |run: &str, input: u64| {
        format!(
            r#"{{"seq":1,"ts":"{NOW}","kind":"request","agent":"a","run":"{run}","outcome":"ok","input_tokens":{input},"prev_hash":"","hash":""}}"#
        )
    };
    // One run that grows a lot, early; then many that do not grow at all.
    agg.add(&serde_json::from_str(&line("big", 10)).unwrap());
    agg.add(&serde_json::from_str(&line("big", 5_000)).unwrap());
    for i in 0..(2 * MAX_GROWTH_RUNS + 10) {
        let text = line(&format!("r{i}"), 7);
        agg.add(&serde_json::from_str(&text).unwrap());
    }
    let runs = &agg.agents[0].1.runs;
    assert!(runs.len() <= 2 * MAX_GROWTH_RUNS, "{}", runs.len());
    assert!(runs.len() >= MAX_GROWTH_RUNS);
    let report = agg.report(&scan::Findings::default(), SystemTime::now());
    assert_eq!(report.context_growth[0].run, "big");
    assert_eq!(report.context_growth[0].last_input_tokens, 5_000);
}
