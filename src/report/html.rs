//! The HTML format: one self-contained file (inline CSS and SVG, no script, nothing
//! fetched) to open in a browser or attach to a mail. Charts first, tables after: spend
//! over time by agent, cost per outcome by agent and kind, redundant share per agent.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::{Figures, Report};

/// Series colours (colour-blind-safe palette); agents past the last share "other".
const PALETTE: [&str; 7] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#999999",
];
const CHART_WIDTH: f64 = 860.0;
/// Bars in one chart; the tables hold the rest.
const MAX_BARS: usize = 40;
const REDUNDANT: &str = "#d55e00";

pub fn render(report: &Report) -> String {
    let mut out = String::with_capacity(32 * 1024);
    out.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n",
        "<title>tokenwarden report</title>\n<style>\n",
        "body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:900px;color:#222}\n",
        "h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em}\n",
        "table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 10px;border-bottom:1px solid #ddd}\n",
        "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\n",
        ".ok{background:#e6f4ea;padding:.5em 1em}.broken{background:#fde7e9;padding:.5em 1em;font-weight:bold}\n",
        "svg text{font:11px system-ui,sans-serif;fill:#333}.legend span{display:inline-block;margin-right:1em}\n",
        ".swatch{display:inline-block;width:10px;height:10px;margin-right:4px}\n",
        "</style></head><body>\n",
    ));
    let from = report.period.from.as_deref().unwrap_or("(empty log)");
    let _ = writeln!(
        out,
        "<h1>tokenwarden report</h1>\n<p>{} to {}</p>",
        esc(from),
        esc(&report.period.to)
    );
    if report.chain.ok {
        let _ = writeln!(
            out,
            "<p class=\"ok\">Audit chain verified: {} records.</p>",
            report.chain.records
        );
    } else {
        let _ = writeln!(
            out,
            "<p class=\"broken\">Audit chain broken: {} ({} breaks in {} records). The figures come from a log that was altered.</p>",
            esc(report.chain.error.as_deref().unwrap_or("?")),
            report.chain.errors,
            report.chain.records
        );
    }
    if report.lines.malformed > 0 {
        let _ = writeln!(
            out,
            "<p class=\"broken\">{} malformed lines (first: {}).</p>",
            report.lines.malformed,
            esc(&report.lines.malformed_at.join("; "))
        );
    }

    spend_chart(&mut out, report);
    cost_per_outcome_chart(&mut out, report);
    redundancy_chart(&mut out, report);
    figures_table(&mut out, "Agents", &report.agents);
    figures_table(&mut out, "Teams", &report.teams);
    growth_table(&mut out, report);
    let _ = writeln!(
        out,
        "<p>Redundant: a request whose body its agent already sent within {}.</p>\n</body></html>",
        esc(&report.redundancy_window)
    );
    out
}

/// The agents that get a colour of their own: the costliest first.
fn series(report: &Report) -> Vec<&str> {
    let mut agents: Vec<(&str, f64)> = report
        .agents
        .iter()
        .map(|(id, f)| (id.as_str(), f.cost_usd))
        .collect();
    agents.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    agents
        .into_iter()
        .take(PALETTE.len() - 1)
        .map(|(id, _)| id)
        .collect()
}

fn colour(series: &[&str], agent: &str) -> &'static str {
    let i = series
        .iter()
        .position(|s| *s == agent)
        .unwrap_or(PALETTE.len() - 1);
    PALETTE[i]
}

fn spend_chart(out: &mut String, report: &Report) {
    let spend = &report.spend_over_time;
    let _ = writeln!(out, "<h2>Spend per {} (USD, UTC)</h2>", spend.bucket);
    if spend.points.is_empty() {
        out.push_str("<p>No spend in this period.</p>\n");
        return;
    }
    let series = series(report);
    let max = spend
        .points
        .iter()
        .map(|p| p.cost_usd)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let (height, left, bottom) = (220.0, 70.0, 30.0);
    let plot_w = CHART_WIDTH - left - 10.0;
    let slot = plot_w / spend.points.len() as f64;
    let bar_w = (slot * 0.8).max(1.0);
    let _ = writeln!(
        out,
        "<svg width=\"{CHART_WIDTH}\" height=\"{}\" role=\"img\" aria-label=\"spend over time\">",
        height + bottom
    );
    let _ = writeln!(
        out,
        "<line x1=\"{left}\" y1=\"{height}\" x2=\"{}\" y2=\"{height}\" stroke=\"#999\"/><text x=\"{}\" y=\"12\" text-anchor=\"end\">${}</text><text x=\"{}\" y=\"{height}\" text-anchor=\"end\">$0</text>",
        CHART_WIDTH - 10.0,
        left - 4.0,
        money(max),
        left - 4.0
    );
    for (i, point) in spend.points.iter().enumerate() {
        let x = left + i as f64 * slot + (slot - bar_w) / 2.0;
        let mut y = height;
        // The coloured agents bottom up, in legend order, then everyone else as one.
        let other: f64 = point
            .by_agent
            .iter()
            .filter(|(agent, _)| !series.contains(&agent.as_str()))
            .map(|(_, cost)| cost)
            .sum();
        let stack = series
            .iter()
            .filter_map(|agent| point.by_agent.get(*agent).map(|c| (*agent, *c)))
            .chain((other > 0.0).then_some(("other", other)));
        for (agent, cost) in stack {
            let h = cost / max * (height - 10.0);
            y -= h;
            let _ = writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {}: ${}</title></rect>",
                colour(&series, agent),
                esc(&point.start),
                esc(agent),
                money(cost)
            );
        }
    }
    let label_every = (spend.points.len() / 6).max(1);
    for (i, point) in spend.points.iter().enumerate().step_by(label_every) {
        let x = left + i as f64 * slot + slot / 2.0;
        if x > CHART_WIDTH - 40.0 {
            // A label this close to the edge would be cut off.
            continue;
        }
        let label = if spend.bucket == "day" {
            point.start.get(..10)
        } else {
            point.start.get(5..16)
        };
        let _ = writeln!(
            out,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            height + 18.0,
            esc(label.unwrap_or(&point.start))
        );
    }
    out.push_str("</svg>\n<p class=\"legend\">");
    for agent in &series {
        let _ = write!(
            out,
            "<span><i class=\"swatch\" style=\"background:{}\"></i>{}</span>",
            colour(&series, agent),
            esc(agent)
        );
    }
    if report.agents.len() > series.len() {
        let _ = write!(
            out,
            "<span><i class=\"swatch\" style=\"background:{}\"></i>other</span>",
            PALETTE[PALETTE.len() - 1]
        );
    }
    out.push_str("</p>\n");
}

/// Horizontal bars, one per row, scaled to the largest value.
fn bars(out: &mut String, label: &str, rows: &[(String, f64, String, &'static str)], max: f64) {
    let (row_h, left, right) = (22.0, 260.0, 110.0);
    let height = row_h * rows.len() as f64 + 4.0;
    let plot_w = CHART_WIDTH - left - right;
    let _ = writeln!(
        out,
        "<svg width=\"{CHART_WIDTH}\" height=\"{height}\" role=\"img\" aria-label=\"{}\">",
        esc(label)
    );
    let max = max.max(f64::MIN_POSITIVE);
    for (i, (name, value, text, fill)) in rows.iter().enumerate() {
        let y = i as f64 * row_h + 2.0;
        let w = (value / max * plot_w).max(if *value > 0.0 { 1.0 } else { 0.0 });
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect x=\"{left}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{}\" fill=\"{fill}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            left - 6.0,
            y + 14.0,
            esc(name),
            row_h - 6.0,
            left + w + 6.0,
            y + 14.0,
            esc(text)
        );
    }
    out.push_str("</svg>\n");
}

/// Bars of cost per outcome, coloured by kind: the costliest first within each kind.
fn cost_per_outcome_chart(out: &mut String, report: &Report) {
    out.push_str("<h2>Cost per outcome (USD)</h2>\n");
    let kinds: BTreeSet<&str> = report
        .agents
        .values()
        .flat_map(|f| f.cost_per_outcome_usd.keys().map(String::as_str))
        .collect();
    let kind_colour = |kind: &str| {
        let i = kinds.iter().position(|k| *k == kind).unwrap_or(0);
        PALETTE[i % (PALETTE.len() - 1)]
    };
    let mut rows: Vec<(String, f64, String, &'static str)> = Vec::new();
    for kind in &kinds {
        let mut of_kind: Vec<(&String, f64)> = report
            .agents
            .iter()
            .filter_map(|(agent, f)| f.cost_per_outcome_usd.get(*kind).map(|c| (agent, *c)))
            .collect();
        of_kind.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        rows.extend(of_kind.into_iter().map(|(agent, cost)| {
            (
                format!("{agent} · {kind}"),
                cost,
                format!("${}", money(cost)),
                kind_colour(kind),
            )
        }));
    }
    if rows.is_empty() {
        out.push_str(
            "<p>No outcomes reported in this period (<code>POST /v1/outcomes</code>).</p>\n",
        );
        return;
    }
    let shown = rows.len().min(MAX_BARS);
    let max = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    bars(out, "cost per outcome", &rows[..shown], max);
    out.push_str("<p class=\"legend\">");
    for kind in &kinds {
        let _ = write!(
            out,
            "<span><i class=\"swatch\" style=\"background:{}\"></i>{}</span>",
            kind_colour(kind),
            esc(kind)
        );
    }
    out.push_str("</p>\n");
    if rows.len() > shown {
        let _ = writeln!(
            out,
            "<p>{} more in the tables below.</p>",
            rows.len() - shown
        );
    }
}

fn redundancy_chart(out: &mut String, report: &Report) {
    let _ = writeln!(
        out,
        "<h2>Redundant requests (same body within {})</h2>",
        esc(&report.redundancy_window)
    );
    let mut rows: Vec<(String, f64, String, &'static str)> = report
        .agents
        .iter()
        .filter(|(_, f)| f.requests > 0)
        .map(|(agent, f)| {
            (
                agent.clone(),
                f.redundant_share,
                format!(
                    "{:.1}% · ${}",
                    f.redundant_share * 100.0,
                    money(f.redundant_cost_usd)
                ),
                REDUNDANT,
            )
        })
        .collect();
    if rows.is_empty() {
        out.push_str("<p>No requests in this period.</p>\n");
        return;
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    rows.truncate(MAX_BARS);
    bars(out, "redundant share", &rows, 1.0);
}

fn figures_table(
    out: &mut String,
    title: &str,
    rows: &std::collections::BTreeMap<String, Figures>,
) {
    let _ = writeln!(out, "<h2>{title}</h2>");
    if rows.is_empty() {
        out.push_str("<p>None.</p>\n");
        return;
    }
    out.push_str(concat!(
        "<table><tr><th></th><th class=\"n\">requests</th><th class=\"n\">input</th>",
        "<th class=\"n\">cached</th><th class=\"n\">output</th><th class=\"n\">cost USD</th>",
        "<th>outcomes</th><th class=\"n\">redundant</th><th>runs stopped</th><th class=\"n\">anomalies</th></tr>\n"
    ));
    for (id, f) in rows {
        let outcomes: Vec<String> = f
            .outcomes
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let stops: Vec<String> = f
            .runs_stopped
            .iter()
            .map(|(c, n)| format!("{c}: {n}"))
            .collect();
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{:.1}%</td><td>{}</td><td class=\"n\">{}</td></tr>",
            esc(id),
            f.requests,
            f.input_tokens,
            f.cached_input_tokens,
            f.output_tokens,
            money(f.cost_usd),
            esc(&outcomes.join(", ")),
            f.redundant_share * 100.0,
            esc(&stops.join(", ")),
            f.anomalies
        );
    }
    out.push_str("</table>\n");
}

fn growth_table(out: &mut String, report: &Report) {
    out.push_str("<h2>Context growth (largest first)</h2>\n");
    if report.context_growth.is_empty() {
        out.push_str("<p>No run with two calls or more.</p>\n");
        return;
    }
    out.push_str("<table><tr><th>agent</th><th>run</th><th class=\"n\">calls</th><th class=\"n\">first prompt</th><th class=\"n\">last prompt</th><th class=\"n\">per call</th></tr>\n");
    for g in &report.context_growth {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:+.1}</td></tr>",
            esc(&g.agent),
            esc(&g.run),
            g.calls,
            g.first_input_tokens,
            g.last_input_tokens,
            g.growth_per_call
        );
    }
    out.push_str("</table>\n");
}

fn money(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.6}")
    }
}

/// Escapes text for HTML content and attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
