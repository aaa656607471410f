//! `tokenwarden report`: insights from the audit log, per agent and per team: spend,
//! outcomes and cost per outcome, redundant requests, stopped runs, context growth and
//! anomalies. Pure: it reads files and returns a [`Report`]; each format renders it in
//! its own file ([`json`], [`table`], [`csv`], [`html`]).
//!
//! The log is read in one pass ([`scan`]): the chain is verified line by line as the
//! figures are summed, and a broken chain is reported beside the figures rather than
//! stopping them (a reviewer wants both: what the log says, and whether to trust it).

pub mod csv;
pub mod html;
pub mod json;
pub mod live;
pub mod scan;
pub mod table;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use scan::Line;

/// Runs listed under context growth.
pub const TOP_RUNS: usize = 10;
/// Spans up to this long are charted per hour, longer ones per day.
const HOURLY_UP_TO_MS: i64 = 3 * 24 * 3_600_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot list the audit log in {dir}: {source}")]
    List {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// What to report on.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only lines from this long before `now`; `None`: the whole log.
    pub since: Option<Duration>,
    /// The report's "now" (injected, so tests can pin it).
    pub now: SystemTime,
    /// Only these agents (empty: all).
    pub agents: Vec<String>,
    /// Only these teams (empty: all).
    pub teams: Vec<String>,
    /// A request repeating a fingerprint its agent sent within this long is redundant.
    pub redundancy_window: Duration,
}

// === the report ===

/// Everything a report shows. Field names are the JSON format's.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub period: Period,
    pub chain: ChainStatus,
    pub lines: LineCounts,
    /// The redundancy window, humantime (`1h`).
    pub redundancy_window: String,
    pub agents: BTreeMap<String, Figures>,
    pub teams: BTreeMap<String, Figures>,
    /// The runs whose prompts grew the most, largest first.
    pub context_growth: Vec<RunGrowth>,
    pub spend_over_time: SpendSeries,
}

#[derive(Debug, Clone, Serialize)]
pub struct Period {
    /// RFC 3339; the start of `--since`, or the first line of the log (`None`: empty log).
    pub from: Option<String>,
    pub to: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChainStatus {
    /// Every line is sound and follows the one before.
    pub ok: bool,
    /// Lines read as audit records (sound or not).
    pub records: u64,
    /// The first break, as `file:line: why`.
    pub error: Option<String>,
    /// How many places the chain breaks.
    pub errors: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LineCounts {
    /// Lines in the period that passed the filters and were counted.
    pub counted: u64,
    /// Lines of kinds a report does not read (`admin`, kinds added later).
    pub skipped: u64,
    /// Lines that are not an audit record: counted, named here, never fatal.
    pub malformed: u64,
    pub malformed_at: Vec<String>,
    /// Requests refused before an agent was known (no virtual key).
    pub unattributed: u64,
}

/// The figures of one agent or one team.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// The agent's team (agents only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Request lines: forwarded and refused.
    pub requests: u64,
    /// Uncached prompt tokens.
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost_usd: f64,
    /// Outcomes reported, by kind.
    pub outcomes: BTreeMap<String, u64>,
    /// `cost_usd` divided by the outcomes of each kind.
    pub cost_per_outcome_usd: BTreeMap<String, f64>,
    /// `redundant_requests / requests`.
    pub redundant_share: f64,
    /// Requests whose body the same agent had sent within the redundancy window.
    pub redundant_requests: u64,
    /// Their tokens (input, cached, cache writes and output).
    pub redundant_tokens: u64,
    pub redundant_cost_usd: f64,
    /// Runs stopped, by condition.
    pub runs_stopped: BTreeMap<String, u64>,
    /// Anomaly lines, and by signal.
    pub anomalies: u64,
    pub anomalies_by_signal: BTreeMap<String, u64>,
}

/// How one run's prompt grew from its first call to its last.
#[derive(Debug, Clone, Serialize)]
pub struct RunGrowth {
    pub agent: String,
    pub run: String,
    pub calls: u64,
    /// Prompt tokens (input, cached and cache writes) of the first and the last call.
    pub first_input_tokens: u64,
    pub last_input_tokens: u64,
    /// `(last - first) / (calls - 1)`.
    pub growth_per_call: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpendSeries {
    /// `hour` or `day` (UTC), by the span of the period.
    pub bucket: &'static str,
    pub points: Vec<SpendPoint>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpendPoint {
    /// Start of the bucket, RFC 3339.
    pub start: String,
    pub cost_usd: f64,
    pub by_agent: BTreeMap<String, f64>,
}

// === building it ===

/// Reads the audit log in `dir` (all its files, in chain order) and reports on it.
pub fn build(dir: &Path, key: Option<&[u8]>, options: &Options) -> Result<Report, ReportError> {
    let files = crate::audit::log_files(dir).map_err(|source| ReportError::List {
        dir: dir.to_path_buf(),
        source,
    })?;
    build_from_files(&files, key, options)
}

/// [`build`] over the given files, in chain order.
pub fn build_from_files(
    files: &[PathBuf],
    key: Option<&[u8]>,
    options: &Options,
) -> Result<Report, ReportError> {
    let mut agg = Aggregator::new(options.clone());
    let findings = scan::scan(files, key, |line| agg.add(line))?;
    Ok(agg.report(&findings, options.now))
}

#[derive(Default)]
struct Tally {
    figures: Figures,
    /// Prompt growth per run (agents only).
    runs: HashMap<String, Growth>,
}

#[derive(Clone, Copy)]
struct Growth {
    first: u64,
    last: u64,
    calls: u64,
}

impl Growth {
    fn growth(&self) -> i64 {
        self.last as i64 - self.first as i64
    }
}

/// Runs per agent whose prompt growth is followed; past twice this many, the ones that
/// grew least are dropped.
const MAX_GROWTH_RUNS: usize = 10_000;

struct Aggregator {
    options: Options,
    since_ms: Option<i64>,
    window_ms: i64,
    first_ms: Option<i64>,
    agents: Vec<(String, Tally)>,
    agent_index: HashMap<String, u32>,
    teams: HashMap<String, Figures>,
    /// When each agent last sent each body: (agent, fingerprint) → ms. Pruned of
    /// entries older than the window as it grows, so it holds about one window's worth.
    seen: HashMap<(u32, [u8; 32]), i64>,
    prune_at: usize,
    /// Spend per (hour, agent).
    spend: BTreeMap<(i64, u32), f64>,
    counted: u64,
    skipped: u64,
    unattributed: u64,
}

/// Fingerprints remembered before the first pruning.
const SEEN_PRUNE_MIN: usize = 100_000;

impl Aggregator {
    fn new(options: Options) -> Aggregator {
        let now_ms = system_ms(options.now);
        Aggregator {
            since_ms: options
                .since
                .map(|s| now_ms.saturating_sub(i64::try_from(s.as_millis()).unwrap_or(i64::MAX))),
            window_ms: i64::try_from(options.redundancy_window.as_millis()).unwrap_or(i64::MAX),
            options,
            first_ms: None,
            agents: Vec::new(),
            agent_index: HashMap::new(),
            teams: HashMap::new(),
            seen: HashMap::new(),
            prune_at: SEEN_PRUNE_MIN,
            spend: BTreeMap::new(),
            counted: 0,
            skipped: 0,
            unattributed: 0,
        }
    }

    fn agent(&mut self, id: &str) -> u32 {
        if let Some(&i) = self.agent_index.get(id) {
            return i;
        }
        let i = u32::try_from(self.agents.len()).unwrap_or(u32::MAX);
        self.agents.push((id.to_owned(), Tally::default()));
        self.agent_index.insert(id.to_owned(), i);
        i
    }

    fn passes_filters(&self, line: &Line<'_>) -> bool {
        let agent_ok = self.options.agents.is_empty()
            || line
                .agent
                .as_deref()
                .is_some_and(|a| self.options.agents.iter().any(|f| f == a));
        let team_ok = self.options.teams.is_empty()
            || line
                .team
                .as_deref()
                .is_some_and(|t| self.options.teams.iter().any(|f| f == t));
        agent_ok && team_ok
    }

    fn add(&mut self, line: &Line<'_>) {
        let kind = line.kind.as_ref();
        if !matches!(kind, "request" | "outcome" | "run" | "anomaly") {
            self.skipped += 1;
            return;
        }
        let Some(at) = ts_millis(&line.ts) else {
            self.skipped += 1;
            return;
        };
        let in_period = self.since_ms.is_none_or(|since| at >= since);
        if !self.passes_filters(line) {
            return;
        }
        let Some(agent_id) = line.agent.as_deref() else {
            if in_period && kind == "request" {
                self.unattributed += 1;
            }
            return;
        };
        let agent = self.agent(agent_id);
        // Lines before the period still count as seen: a request repeating one sent a
        // minute before the period began is redundant all the same.
        let redundant = kind == "request" && self.redundant(agent, line, at);
        if !in_period {
            return;
        }
        self.counted += 1;
        self.first_ms = Some(self.first_ms.map_or(at, |f| f.min(at)));
        let team = line.team.as_deref();
        let mut delta = Figures::default();
        match kind {
            "request" => {
                delta.requests = 1;
                delta.input_tokens = line.input_tokens;
                delta.output_tokens = line.output_tokens;
                delta.cached_input_tokens = line.cached_input_tokens;
                delta.cache_write_tokens = line.cache_write_tokens;
                delta.cost_usd = line.cost_usd;
                if redundant {
                    delta.redundant_requests = 1;
                    delta.redundant_tokens = tokens_of(line);
                    delta.redundant_cost_usd = line.cost_usd;
                }
                if line.cost_usd != 0.0 {
                    *self
                        .spend
                        .entry((at.div_euclid(HOUR_MS), agent))
                        .or_default() += line.cost_usd;
                }
                self.grow(agent, line);
            }
            "outcome" => {
                let (Some(outcome_kind), Some(count)) = (line.outcome_kind.as_deref(), line.count)
                else {
                    return;
                };
                delta.outcomes.insert(outcome_kind.to_owned(), count);
            }
            "run" => {
                if line.outcome.as_deref() != Some("stopped") {
                    return;
                }
                let condition = line.reason.as_deref().unwrap_or("unknown");
                delta.runs_stopped.insert(condition.to_owned(), 1);
            }
            _ => {
                let signal = line.reason.as_deref().unwrap_or("unknown");
                delta.anomalies = 1;
                delta.anomalies_by_signal.insert(signal.to_owned(), 1);
            }
        }
        let tally = &mut self.agents[agent as usize].1;
        if let Some(team) = team {
            if tally.figures.team.as_deref() != Some(team) {
                tally.figures.team = Some(team.to_owned());
            }
        }
        merge(&mut tally.figures, &delta);
        if let Some(team) = team {
            match self.teams.get_mut(team) {
                Some(figures) => merge(figures, &delta),
                None => {
                    let mut figures = Figures::default();
                    merge(&mut figures, &delta);
                    self.teams.insert(team.to_owned(), figures);
                }
            }
        }
    }

    /// Whether this request's body was sent by the same agent within the window; it is
    /// remembered either way.
    fn redundant(&mut self, agent: u32, line: &Line<'_>, at: i64) -> bool {
        let mut fingerprint = [0u8; 32];
        let Some(hex_fp) = line.fingerprint.as_deref() else {
            return false;
        };
        if hex::decode_to_slice(hex_fp, &mut fingerprint).is_err() {
            return false;
        }
        let previous = self.seen.insert((agent, fingerprint), at);
        if self.seen.len() >= self.prune_at {
            let oldest = at.saturating_sub(self.window_ms);
            self.seen.retain(|_, &mut t| t >= oldest);
            self.prune_at = (self.seen.len() * 2).max(SEEN_PRUNE_MIN);
        }
        // Lines are in write order, which can differ from time order by a few ms.
        previous.is_some_and(|p| at.abs_diff(p) <= self.window_ms.unsigned_abs())
    }

    fn grow(&mut self, agent: u32, line: &Line<'_>) {
        let (Some(run), Some(outcome)) = (line.run.as_deref(), line.outcome.as_deref()) else {
            return;
        };
        if outcome == "rejected" {
            return;
        }
        let prompt = line.input_tokens + line.cached_input_tokens + line.cache_write_tokens;
        let runs = &mut self.agents[agent as usize].1.runs;
        match runs.get_mut(run) {
            Some(g) => {
                g.last = prompt;
                g.calls += 1;
            }
            None => {
                runs.insert(
                    run.to_owned(),
                    Growth {
                        first: prompt,
                        last: prompt,
                        calls: 1,
                    },
                );
                if runs.len() > 2 * MAX_GROWTH_RUNS {
                    // Keep the runs that grew the most so far: memory stays bounded on
                    // any log, and the top of the list is all a report shows.
                    let mut by_growth: Vec<(i64, String)> = runs
                        .iter()
                        .map(|(id, g)| (g.growth(), id.clone()))
                        .collect();
                    let drop = by_growth.len() - MAX_GROWTH_RUNS;
                    by_growth.select_nth_unstable(drop);
                    for (_, id) in &by_growth[..drop] {
                        runs.remove(id);
                    }
                }
            }
        }
    }

    /// The report of the lines added so far, as of `now`.
    fn report(&self, findings: &scan::Findings, now: SystemTime) -> Report {
        let names: Vec<&str> = self.agents.iter().map(|(id, _)| id.as_str()).collect();
        let spend_over_time = spend_series(&self.spend, &names);
        let mut context_growth = Vec::new();
        for (agent, tally) in &self.agents {
            for (run, g) in &tally.runs {
                if g.calls < 2 {
                    continue;
                }
                context_growth.push(RunGrowth {
                    agent: agent.clone(),
                    run: run.clone(),
                    calls: g.calls,
                    first_input_tokens: g.first,
                    last_input_tokens: g.last,
                    growth_per_call: (g.last as f64 - g.first as f64) / (g.calls - 1) as f64,
                });
            }
        }
        context_growth.sort_by(|a, b| {
            let growth = |r: &RunGrowth| r.last_input_tokens as i64 - r.first_input_tokens as i64;
            growth(b)
                .cmp(&growth(a))
                .then_with(|| (&a.agent, &a.run).cmp(&(&b.agent, &b.run)))
        });
        context_growth.truncate(TOP_RUNS);

        let agents = self
            .agents
            .iter()
            .filter(|(_, t)| !t.figures.is_empty())
            .map(|(id, t)| (id.clone(), finish_figures(t.figures.clone())))
            .collect();
        let teams = self
            .teams
            .iter()
            .map(|(id, f)| (id.clone(), finish_figures(f.clone())))
            .collect();
        let from = self.since_ms.or(self.first_ms).map(format_ms);
        Report {
            period: Period {
                from,
                to: format_ms(system_ms(now)),
            },
            chain: ChainStatus {
                ok: findings.chain_errors == 0,
                records: findings.records,
                error: findings.first_chain_error.clone(),
                errors: findings.chain_errors,
            },
            lines: LineCounts {
                counted: self.counted,
                skipped: self.skipped,
                malformed: findings.malformed,
                malformed_at: findings.malformed_at.clone(),
                unattributed: self.unattributed,
            },
            redundancy_window: humantime::format_duration(self.options.redundancy_window)
                .to_string(),
            agents,
            teams,
            context_growth,
            spend_over_time,
        }
    }
}

impl Figures {
    /// Nothing counted: an agent known only from lines outside the period.
    fn is_empty(&self) -> bool {
        self.requests == 0
            && self.outcomes.is_empty()
            && self.runs_stopped.is_empty()
            && self.anomalies == 0
    }
}

fn tokens_of(line: &Line<'_>) -> u64 {
    line.input_tokens + line.cached_input_tokens + line.cache_write_tokens + line.output_tokens
}

fn merge(into: &mut Figures, delta: &Figures) {
    into.requests += delta.requests;
    into.input_tokens += delta.input_tokens;
    into.output_tokens += delta.output_tokens;
    into.cached_input_tokens += delta.cached_input_tokens;
    into.cache_write_tokens += delta.cache_write_tokens;
    into.cost_usd += delta.cost_usd;
    into.redundant_requests += delta.redundant_requests;
    into.redundant_tokens += delta.redundant_tokens;
    into.redundant_cost_usd += delta.redundant_cost_usd;
    into.anomalies += delta.anomalies;
    for (target, add) in [
        (&mut into.outcomes, &delta.outcomes),
        (&mut into.runs_stopped, &delta.runs_stopped),
        (&mut into.anomalies_by_signal, &delta.anomalies_by_signal),
    ] {
        for (k, n) in add {
            match target.get_mut(k.as_str()) {
                Some(v) => *v += n,
                None => {
                    target.insert(k.clone(), *n);
                }
            }
        }
    }
}

fn finish_figures(mut f: Figures) -> Figures {
    f.cost_per_outcome_usd = f
        .outcomes
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(k, &n)| (k.clone(), f.cost_usd / n as f64))
        .collect();
    f.redundant_share = if f.requests == 0 {
        0.0
    } else {
        f.redundant_requests as f64 / f.requests as f64
    };
    f
}

fn spend_series(spend: &BTreeMap<(i64, u32), f64>, agents: &[&str]) -> SpendSeries {
    let first = spend.keys().next().map(|k| k.0);
    let last = spend.keys().next_back().map(|k| k.0);
    let daily = matches!((first, last), (Some(f), Some(l)) if (l - f) * HOUR_MS > HOURLY_UP_TO_MS);
    let (bucket, width) = if daily {
        ("day", DAY_MS)
    } else {
        ("hour", HOUR_MS)
    };
    let mut points: BTreeMap<i64, SpendPoint> = BTreeMap::new();
    for (&(hour, agent), &cost) in spend {
        let start = (hour * HOUR_MS).div_euclid(width) * width;
        let point = points.entry(start).or_insert_with(|| SpendPoint {
            start: format_ms(start),
            cost_usd: 0.0,
            by_agent: BTreeMap::new(),
        });
        point.cost_usd += cost;
        let name = agents.get(agent as usize).copied().unwrap_or("unknown");
        *point.by_agent.entry(name.to_owned()).or_default() += cost;
    }
    // Empty buckets in between are shown as such, not skipped.
    let mut filled = Vec::new();
    if let (Some(&first), Some(&last)) = (points.keys().next(), points.keys().next_back()) {
        let mut t = first;
        while t <= last {
            filled.push(points.remove(&t).unwrap_or_else(|| SpendPoint {
                start: format_ms(t),
                cost_usd: 0.0,
                by_agent: BTreeMap::new(),
            }));
            t += width;
        }
    }
    SpendSeries {
        bucket,
        points: filled,
    }
}

// === time ===

fn system_ms(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

fn format_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Milliseconds since the epoch of an audit timestamp. The proxy writes one fixed form
/// (`2026-11-29T15:30:00.123Z`), read here without a general parser; anything else
/// goes through jiff.
pub fn ts_millis(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    let fixed = b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z';
    if fixed {
        let num = |from: usize, to: usize| -> Option<i64> {
            b[from..to].iter().try_fold(0i64, |acc, &c| {
                c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
            })
        };
        let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
        let (h, mi, s, ms) = (num(11, 13)?, num(14, 16)?, num(17, 19)?, num(20, 23)?);
        if (1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && s < 61 {
            let days = days_from_civil(y, mo, d);
            return Some(((days * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms);
        }
    }
    ts.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
