//! The CSV format: one row per agent and one per team, for spreadsheets. Outcome kinds,
//! stop conditions and anomaly signals get one column each (`outcomes:KIND`,
//! `cost_per_outcome_usd:KIND`, `runs_stopped:CONDITION`, `anomalies:SIGNAL`), so a
//! column means the same thing in every row.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::Report;

pub fn render(report: &Report) -> String {
    let all = || report.agents.values().chain(report.teams.values());
    let kinds: BTreeSet<&str> = all()
        .flat_map(|f| f.outcomes.keys().map(String::as_str))
        .collect();
    let conditions: BTreeSet<&str> = all()
        .flat_map(|f| f.runs_stopped.keys().map(String::as_str))
        .collect();
    let signals: BTreeSet<&str> = all()
        .flat_map(|f| f.anomalies_by_signal.keys().map(String::as_str))
        .collect();

    let mut header: Vec<String> = [
        "scope",
        "id",
        "team",
        "requests",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "cost_usd",
        "redundant_share",
        "redundant_requests",
        "redundant_tokens",
        "redundant_cost_usd",
        "anomalies",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    header.extend(kinds.iter().map(|k| format!("outcomes:{k}")));
    header.extend(kinds.iter().map(|k| format!("cost_per_outcome_usd:{k}")));
    header.extend(conditions.iter().map(|c| format!("runs_stopped:{c}")));
    header.extend(signals.iter().map(|s| format!("anomalies:{s}")));

    let mut out = String::new();
    row(&mut out, header.iter().map(String::as_str));
    let rows = report
        .agents
        .iter()
        .map(|(id, f)| ("agent", id, f))
        .chain(report.teams.iter().map(|(id, f)| ("team", id, f)));
    for (scope, id, f) in rows {
        let mut cells: Vec<String> = vec![
            scope.to_owned(),
            id.clone(),
            f.team.clone().unwrap_or_default(),
            f.requests.to_string(),
            f.input_tokens.to_string(),
            f.output_tokens.to_string(),
            f.cached_input_tokens.to_string(),
            f.cache_write_tokens.to_string(),
            f.cost_usd.to_string(),
            f.redundant_share.to_string(),
            f.redundant_requests.to_string(),
            f.redundant_tokens.to_string(),
            f.redundant_cost_usd.to_string(),
            f.anomalies.to_string(),
        ];
        cells.extend(kinds.iter().map(|k| count(f.outcomes.get(*k))));
        cells.extend(kinds.iter().map(|k| {
            f.cost_per_outcome_usd
                .get(*k)
                .map(f64::to_string)
                .unwrap_or_default()
        }));
        cells.extend(conditions.iter().map(|c| count(f.runs_stopped.get(*c))));
        cells.extend(signals.iter().map(|s| count(f.anomalies_by_signal.get(*s))));
        row(&mut out, cells.iter().map(String::as_str));
    }
    out
}

fn count(n: Option<&u64>) -> String {
    n.copied().unwrap_or(0).to_string()
}

/// One RFC 4180 row: fields with a comma, quote or line break are quoted.
fn row<'a>(out: &mut String, cells: impl Iterator<Item = &'a str>) {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        if cell.contains([',', '"', '\n', '\r']) {
            let _ = write!(out, "\"{}\"", cell.replace('"', "\"\""));
        } else {
            out.push_str(cell);
        }
    }
    out.push_str("\r\n");
}
