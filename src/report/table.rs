//! The table format: aligned plain text for a terminal.

use std::fmt::Write as _;

use super::{Figures, Report};

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let from = report.period.from.as_deref().unwrap_or("(empty log)");
    let _ = writeln!(out, "tokenwarden report, {from} to {}", report.period.to);
    if report.chain.ok {
        let _ = writeln!(out, "audit chain: ok ({} records)", report.chain.records);
    } else {
        let _ = writeln!(
            out,
            "AUDIT CHAIN BROKEN: {} ({} breaks in {} records); the figures below come from a log that was altered",
            report.chain.error.as_deref().unwrap_or("?"),
            report.chain.errors,
            report.chain.records
        );
    }
    if report.lines.malformed > 0 {
        let _ = writeln!(
            out,
            "malformed lines: {} (first: {})",
            report.lines.malformed,
            report.lines.malformed_at.join("; ")
        );
    }

    for (title, rows) in [("agent", &report.agents), ("team", &report.teams)] {
        out.push('\n');
        let mut table = vec![vec![
            title.to_owned(),
            "requests".into(),
            "input".into(),
            "cached".into(),
            "output".into(),
            "cost usd".into(),
            "redundant".into(),
            "redundant usd".into(),
            "runs stopped".into(),
            "anomalies".into(),
        ]];
        for (id, f) in rows {
            table.push(vec![
                id.clone(),
                f.requests.to_string(),
                f.input_tokens.to_string(),
                f.cached_input_tokens.to_string(),
                f.output_tokens.to_string(),
                usd(f.cost_usd),
                format!(
                    "{:.1}% ({})",
                    f.redundant_share * 100.0,
                    f.redundant_requests
                ),
                usd(f.redundant_cost_usd),
                f.runs_stopped.values().sum::<u64>().to_string(),
                f.anomalies.to_string(),
            ]);
        }
        if rows.is_empty() {
            table.push(vec!["(none)".into()]);
        }
        aligned(&mut out, &table);
    }

    let outcome_rows: Vec<Vec<String>> = report
        .agents
        .iter()
        .map(|(id, f)| ("agent", id, f))
        .chain(report.teams.iter().map(|(id, f)| ("team", id, f)))
        .flat_map(|(scope, id, f): (&str, &String, &Figures)| {
            f.outcomes.iter().map(move |(kind, n)| {
                vec![
                    format!("{scope} {id}"),
                    kind.clone(),
                    n.to_string(),
                    f.cost_per_outcome_usd
                        .get(kind)
                        .map_or_else(|| "-".into(), |c| usd(*c)),
                ]
            })
        })
        .collect();
    out.push('\n');
    if outcome_rows.is_empty() {
        out.push_str("outcomes: none reported (POST /v1/outcomes)\n");
    } else {
        let mut table = vec![vec![
            "outcomes".to_owned(),
            "kind".into(),
            "count".into(),
            "cost per outcome usd".into(),
        ]];
        table.extend(outcome_rows);
        aligned(&mut out, &table);
    }

    let stops: Vec<Vec<String>> = report
        .agents
        .iter()
        .flat_map(|(id, f)| {
            f.runs_stopped
                .iter()
                .map(move |(c, n)| vec![id.clone(), c.clone(), n.to_string()])
        })
        .collect();
    if !stops.is_empty() {
        out.push('\n');
        let mut table = vec![vec![
            "runs stopped".to_owned(),
            "condition".into(),
            "runs".into(),
        ]];
        table.extend(stops);
        aligned(&mut out, &table);
    }

    if !report.context_growth.is_empty() {
        out.push('\n');
        let mut table = vec![vec![
            "context growth".to_owned(),
            "run".into(),
            "calls".into(),
            "first prompt".into(),
            "last prompt".into(),
            "per call".into(),
        ]];
        for g in &report.context_growth {
            table.push(vec![
                g.agent.clone(),
                g.run.clone(),
                g.calls.to_string(),
                g.first_input_tokens.to_string(),
                g.last_input_tokens.to_string(),
                format!("{:+.1}", g.growth_per_call),
            ]);
        }
        aligned(&mut out, &table);
    }
    let _ = writeln!(
        out,
        "\nredundant: a request whose body its agent already sent within {}",
        report.redundancy_window
    );
    out
}

fn usd(v: f64) -> String {
    format!("{v:.6}")
}

/// Columns padded to their widest cell: the first left-aligned, the rest right-aligned.
fn aligned(out: &mut String, rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}
