//! Runs of unattended agents and the conditions that stop them.
//!
//! A run is named by a request header (`runs.headers`), or begins by itself for an agent
//! after `idle_gap` without a request. Each run counts its requests, tokens, cost, the
//! identical requests it repeats, its upstream errors in a row and its tokens over the
//! last minute. Before a request goes out, [`Runs::enter`] checks every condition of the
//! agent's `[agents.runs]`: `warn` lets the request go with warnings; `stop` refuses it
//! and every later request of the run, until an admin resumes the run or a new run
//! begins. A request let through carries a [`Ticket`] that settles its spend into the run
//! and, for a stream, says how much more the run may spend before the stream is cut.
//!
//! Run ids are attribution only: identity comes from the virtual key, and runs are kept
//! per agent, so one agent cannot touch another's run by naming it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::time::Instant;

pub use super::fingerprint::fingerprint;
use crate::config::{RunAction, RunLimitsConfig};
use crate::ledger::{nanos_to_usd, usd_to_nanos};

/// How long a stopped run is remembered after its last request.
pub const STOPPED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Runs of one agent kept at most; the longest idle go first.
const MAX_RUNS_PER_AGENT: usize = 10_000;
/// Distinct request fingerprints remembered per run, for `max_repeats`.
const MAX_FINGERPRINTS: usize = 10_000;
/// The start of the id of a run that began by itself.
const AUTO_PREFIX: &str = "auto-";
/// How often idle runs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A stop condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    MaxRequests,
    MaxTokens,
    MaxUsd,
    MaxDuration,
    MaxRepeats,
    MaxErrorStreak,
    MaxTokensPerMinute,
    /// An admin stopped the run.
    Admin,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::MaxRequests => "max_requests",
            Condition::MaxTokens => "max_tokens",
            Condition::MaxUsd => "max_usd",
            Condition::MaxDuration => "max_duration",
            Condition::MaxRepeats => "max_repeats",
            Condition::MaxErrorStreak => "max_error_streak",
            Condition::MaxTokensPerMinute => "max_tokens_per_minute",
            Condition::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Condition> {
        [
            Condition::MaxRequests,
            Condition::MaxTokens,
            Condition::MaxUsd,
            Condition::MaxDuration,
            Condition::MaxRepeats,
            Condition::MaxErrorStreak,
            Condition::MaxTokensPerMinute,
            Condition::Admin,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// A condition a run crossed, with the figures, in words for the client and the log.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Crossed {
    pub condition: Condition,
    pub message: String,
}

/// An agent's stop conditions, from `[agents.runs]`.
#[derive(Debug, Clone)]
pub struct RunLimits {
    pub max_requests: Option<u64>,
    pub max_tokens: Option<u64>,
    pub max_nanos: Option<u64>,
    pub max_duration: Option<Duration>,
    pub idle_gap: Duration,
    pub max_repeats: Option<u64>,
    pub max_error_streak: Option<u64>,
    pub max_tokens_per_minute: Option<u64>,
    pub action: RunAction,
}

impl Default for RunLimits {
    /// No conditions: runs are only counted, and begin after ten idle minutes.
    fn default() -> Self {
        RunLimits {
            max_requests: None,
            max_tokens: None,
            max_nanos: None,
            max_duration: None,
            idle_gap: Duration::from_secs(600),
            max_repeats: None,
            max_error_streak: None,
            max_tokens_per_minute: None,
            action: RunAction::Stop,
        }
    }
}

impl From<&RunLimitsConfig> for RunLimits {
    fn from(c: &RunLimitsConfig) -> Self {
        RunLimits {
            max_requests: c.max_requests,
            max_tokens: c.max_tokens,
            max_nanos: c.max_usd.map(usd_to_nanos),
            max_duration: c.max_duration,
            idle_gap: c.idle_gap,
            max_repeats: c.max_repeats,
            max_error_streak: c.max_error_streak,
            max_tokens_per_minute: c.max_tokens_per_minute,
            action: c.action,
        }
    }
}

/// Why a run was stopped, and when.
#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    #[serde(flatten)]
    pub crossed: Crossed,
    pub at: String,
}

/// One run's figures.
#[derive(Debug)]
struct Run {
    id: Arc<str>,
    started: Instant,
    started_at: Timestamp,
    last_seen: Instant,
    requests: u64,
    tokens: u64,
    nanos: u64,
    in_flight: u32,
    repeats: HashMap<[u8; 16], u64>,
    error_streak: u64,
    /// Tokens settled in the last minute, oldest first, summed per second.
    recent: VecDeque<(Instant, u64)>,
    /// The sum of `recent`, kept as it changes: a busy run settles thousands of requests
    /// a minute, and summing them per request would cost that much each time.
    recent_sum: u64,
    stopped: Option<Stopped>,
}

impl Run {
    fn new(id: Arc<str>, now: Instant) -> Run {
        Run {
            id,
            started: now,
            started_at: Timestamp::now(),
            last_seen: now,
            requests: 0,
            tokens: 0,
            nanos: 0,
            in_flight: 0,
            repeats: HashMap::new(),
            error_streak: 0,
            recent: VecDeque::new(),
            recent_sum: 0,
            stopped: None,
        }
    }

    fn tokens_last_minute(&mut self, now: Instant) -> u64 {
        while let Some(&(at, n)) = self.recent.front() {
            if now.duration_since(at) < Duration::from_secs(60) {
                break;
            }
            self.recent.pop_front();
            self.recent_sum -= n;
        }
        self.recent_sum
    }

    /// Every condition this request would cross (`fingerprint`: its repetition key).
    fn crossed(
        &mut self,
        agent: &str,
        limits: &RunLimits,
        fingerprint: Option<&[u8; 16]>,
        now: Instant,
    ) -> Vec<Crossed> {
        let mut out = Vec::new();
        let run = self.id.clone();
        let mut cross = |condition: Condition, figures: String| {
            out.push(Crossed {
                condition,
                message: format!(
                    "run {run} of agent {agent} crossed {}: {figures}",
                    condition.as_str()
                ),
            });
        };
        if let Some(max) = limits.max_requests {
            if self.requests + 1 > max {
                cross(
                    Condition::MaxRequests,
                    format!(
                        "this would be request {} of at most {max}",
                        self.requests + 1
                    ),
                );
            }
        }
        if let Some(max) = limits.max_tokens {
            if self.tokens >= max {
                cross(
                    Condition::MaxTokens,
                    format!("{} tokens used of at most {max}", self.tokens),
                );
            }
        }
        if let Some(max) = limits.max_nanos {
            if self.nanos >= max {
                cross(
                    Condition::MaxUsd,
                    format!(
                        "${:.6} spent of at most ${:.6}",
                        nanos_to_usd(self.nanos),
                        nanos_to_usd(max)
                    ),
                );
            }
        }
        if let Some(max) = limits.max_duration {
            let age = now.duration_since(self.started);
            if age >= max {
                cross(
                    Condition::MaxDuration,
                    format!(
                        "running for {} of at most {}",
                        humantime::format_duration(Duration::from_secs(age.as_secs())),
                        humantime::format_duration(max)
                    ),
                );
            }
        }
        if let (Some(max), Some(fp)) = (limits.max_repeats, fingerprint) {
            let seen = self.repeats.get(fp).copied().unwrap_or(0);
            if seen + 1 > max {
                cross(
                    Condition::MaxRepeats,
                    format!("the same request {} times, at most {max}", seen + 1),
                );
            }
        }
        if let Some(max) = limits.max_error_streak {
            if self.error_streak >= max {
                cross(
                    Condition::MaxErrorStreak,
                    format!(
                        "{} upstream errors in a row, at most {max}",
                        self.error_streak
                    ),
                );
            }
        }
        if let Some(max) = limits.max_tokens_per_minute {
            let minute = self.tokens_last_minute(now);
            if minute >= max {
                cross(
                    Condition::MaxTokensPerMinute,
                    format!("{minute} tokens in the last minute, at most {max}"),
                );
            }
        }
        out
    }
}

#[derive(Debug, Default)]
struct AgentRuns {
    runs: HashMap<Arc<str>, Run>,
    /// The run begun by itself (no run header), while it lasts.
    auto: Option<Arc<str>>,
}

/// Every agent's runs, and the kill switches.
#[derive(Debug, Default)]
pub struct Runs {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Keyed by agent ids from the config: a fast hash, seeded per process. (Run ids
    /// come from clients: their maps keep the standard, DoS-resistant one.)
    agents: hashbrown::HashMap<Arc<str>, AgentRuns>,
    last_sweep: Option<Instant>,
}

/// The outcome of [`Runs::enter`].
#[derive(Debug)]
pub enum Verdict {
    /// The request may go; `warnings` lists conditions crossed under `action = "warn"`.
    Go {
        ticket: Ticket,
        warnings: Vec<Crossed>,
    },
    /// The run is stopped. `newly` when this request stopped it.
    Stop {
        run: Arc<str>,
        crossed: Crossed,
        newly: bool,
    },
}

/// What the run may still spend on a stream before it is cut (stop conditions only).
#[derive(Debug, Clone, Copy, Default)]
pub struct Allowance {
    pub tokens: Option<u64>,
    pub nanos: Option<u64>,
    pub until: Option<Instant>,
}

impl Allowance {
    pub fn is_unbounded(&self) -> bool {
        self.tokens.is_none() && self.nanos.is_none() && self.until.is_none()
    }
}

/// A request admitted into a run; settle it with what it spent.
#[derive(Debug)]
pub struct Ticket {
    runs: Arc<Runs>,
    agent: Arc<str>,
    pub run: Arc<str>,
    pub allowance: Allowance,
    limits: Arc<RunLimits>,
    done: bool,
}

/// How a request ended, for its run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Ok,
    /// The provider answered with an error, or could not be reached.
    UpstreamError,
    /// The proxy cut the stream for crossing this condition.
    Cut(Condition),
}

impl Ticket {
    /// Stops the run now, for a condition crossed while this request runs (a stream
    /// about to be cut). Returns whether the run was running until now.
    pub fn stop(&self, crossed: Crossed) -> bool {
        self.runs.stop_if_running(&self.agent, &self.run, crossed)
    }

    /// Adds the request's spend to its run and stops the run if it now crosses a
    /// condition that only spend can cross. Returns the stop, if this made one.
    pub fn settle(mut self, tokens: u64, nanos: u64, ending: Ending) -> Option<Crossed> {
        self.done = true;
        self.runs
            .settle(&self.agent, &self.run, &self.limits, tokens, nanos, ending)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.runs.leave(&self.agent, &self.run);
        }
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // Every update leaves the maps consistent before anything can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A run's figures, for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub id: String,
    pub agent: String,
    pub started_at: String,
    pub duration_seconds: f64,
    pub idle_seconds: f64,
    pub requests: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    pub in_flight: u32,
    pub error_streak: u64,
    pub state: &'static str,
    pub stopped: Option<Stopped>,
}

impl Runs {
    /// Checks a request against its run's conditions and, if it may go, counts it in.
    /// `named`: the run id the request named, if any.
    pub fn enter(
        self: &Arc<Self>,
        agent: impl Into<Arc<str>>,
        named: Option<&str>,
        limits: &Arc<RunLimits>,
        fingerprint: Option<[u8; 16]>,
    ) -> Verdict {
        // The ticket keeps the agent's name: shared, not copied, when it comes shared.
        let agent: Arc<str> = agent.into();
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        inner.sweep(now);
        let agent_runs = inner.agents.entry_ref(&*agent).or_default();
        let id: Arc<str> = match named {
            Some(id) => id.into(),
            None => match &agent_runs.auto {
                Some(id)
                    if agent_runs.runs.get(id).is_some_and(|r| {
                        r.in_flight > 0 || now.duration_since(r.last_seen) < limits.idle_gap
                    }) =>
                {
                    id.clone()
                }
                _ => {
                    let id: Arc<str> = format!(
                        "{AUTO_PREFIX}{}-{:08x}",
                        Timestamp::now().strftime("%Y%m%dT%H%M%SZ"),
                        rand::random::<u32>()
                    )
                    .into();
                    agent_runs.auto = Some(id.clone());
                    id
                }
            },
        };
        if agent_runs.runs.len() >= MAX_RUNS_PER_AGENT && !agent_runs.runs.contains_key(&id) {
            agent_runs.evict_one();
        }
        let run = agent_runs
            .runs
            .entry(id.clone())
            .or_insert_with(|| Run::new(id.clone(), now));
        run.last_seen = now;
        if let Some(stopped) = &run.stopped {
            return Verdict::Stop {
                run: id,
                crossed: stopped.crossed.clone(),
                newly: false,
            };
        }
        let crossed = run.crossed(&agent, limits, fingerprint.as_ref(), now);
        let warnings = match limits.action {
            RunAction::Warn => crossed,
            RunAction::Stop => {
                if let Some(first) = crossed.into_iter().next() {
                    run.stopped = Some(Stopped {
                        crossed: first.clone(),
                        at: Timestamp::now().to_string(),
                    });
                    return Verdict::Stop {
                        run: id,
                        crossed: first,
                        newly: true,
                    };
                }
                Vec::new()
            }
        };
        run.requests += 1;
        run.in_flight += 1;
        if let Some(fp) = fingerprint {
            if run.repeats.len() < MAX_FINGERPRINTS || run.repeats.contains_key(&fp) {
                *run.repeats.entry(fp).or_default() += 1;
            }
        }
        let allowance = if limits.action == RunAction::Stop {
            Allowance {
                tokens: limits.max_tokens.map(|m| m.saturating_sub(run.tokens)),
                nanos: limits.max_nanos.map(|m| m.saturating_sub(run.nanos)),
                until: limits.max_duration.map(|d| run.started + d),
            }
        } else {
            Allowance::default()
        };
        Verdict::Go {
            ticket: Ticket {
                runs: self.clone(),
                agent,
                run: id,
                allowance,
                limits: limits.clone(),
                done: false,
            },
            warnings,
        }
    }

    fn settle(
        &self,
        agent: &str,
        run: &str,
        limits: &RunLimits,
        tokens: u64,
        nanos: u64,
        ending: Ending,
    ) -> Option<Crossed> {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let run = inner.agents.get_mut(agent)?.runs.get_mut(run)?;
        run.in_flight = run.in_flight.saturating_sub(1);
        run.tokens += tokens;
        run.nanos += nanos;
        run.last_seen = now;
        if tokens > 0 {
            // One entry per second at most: a minute is then 60 entries, however busy.
            match run.recent.back_mut() {
                Some((at, n)) if now.duration_since(*at) < Duration::from_secs(1) => *n += tokens,
                _ => run.recent.push_back((now, tokens)),
            }
            run.recent_sum += tokens;
        }
        match ending {
            Ending::UpstreamError => run.error_streak += 1,
            Ending::Ok | Ending::Cut(_) => run.error_streak = 0,
        }
        if run.stopped.is_some() || limits.action != RunAction::Stop {
            return None;
        }
        let crossed = match ending {
            // Stopped when the stream was cut (`Ticket::stop`), unless resumed since.
            Ending::Cut(_) => None,
            // Spend alone can cross these; the request count waits for the next one.
            _ => run.crossed(agent, limits, None, now).into_iter().find(|c| {
                matches!(
                    c.condition,
                    Condition::MaxTokens
                        | Condition::MaxUsd
                        | Condition::MaxErrorStreak
                        | Condition::MaxTokensPerMinute
                )
            }),
        }?;
        run.stopped = Some(Stopped {
            crossed: crossed.clone(),
            at: Timestamp::now().to_string(),
        });
        Some(crossed)
    }

    fn leave(&self, agent: &str, run: &str) {
        let mut inner = lock(&self.inner);
        if let Some(run) = inner
            .agents
            .get_mut(agent)
            .and_then(|a| a.runs.get_mut(run))
        {
            run.in_flight = run.in_flight.saturating_sub(1);
        }
    }

    /// Stops a run by hand (`by`: who). A run not seen yet is made, stopped: a run id an
    /// admin stops ahead of time is refused when it arrives.
    pub fn stop(&self, agent: &str, run: &str, by: &str) -> Crossed {
        let now = Instant::now();
        let crossed = Crossed {
            condition: Condition::Admin,
            message: format!("run {run} of agent {agent} was stopped by {by}"),
        };
        self.mark_stopped(
            agent,
            run,
            crossed.clone(),
            now,
            Timestamp::now().to_string(),
        );
        crossed
    }

    fn stop_if_running(&self, agent: &str, run: &str, crossed: Crossed) -> bool {
        let mut inner = lock(&self.inner);
        let Some(run) = inner
            .agents
            .get_mut(agent)
            .and_then(|a| a.runs.get_mut(run))
        else {
            return false;
        };
        if run.stopped.is_some() {
            return false;
        }
        run.stopped = Some(Stopped {
            crossed,
            at: Timestamp::now().to_string(),
        });
        true
    }

    /// Restores a stop written in the audit log (at start), `age` ago: the run is kept as
    /// long as it would have been had the proxy not restarted.
    pub fn restore_stop(
        &self,
        agent: &str,
        run: &str,
        crossed: Crossed,
        at: String,
        age: Duration,
    ) {
        let now = Instant::now();
        self.mark_stopped(agent, run, crossed, now.checked_sub(age).unwrap_or(now), at);
    }

    fn mark_stopped(&self, agent: &str, run: &str, crossed: Crossed, now: Instant, at: String) {
        let mut inner = lock(&self.inner);
        let agent_runs = inner.agents.entry_ref(agent).or_default();
        let id: Arc<str> = run.into();
        if id.starts_with(AUTO_PREFIX) {
            // A run that began by itself stays the agent's current one, stopped, until
            // the agent has been quiet for its idle gap.
            agent_runs.auto = Some(id.clone());
        }
        let run = agent_runs
            .runs
            .entry(id.clone())
            .or_insert_with(|| Run::new(id, now));
        run.stopped = Some(Stopped { crossed, at });
    }

    /// Resumes a stopped run: its conditions count afresh from now (its totals stay,
    /// except the figures that stopped it: repeats, errors in a row, the clock).
    /// Returns whether there was a stopped run to resume.
    pub fn resume(&self, agent: &str, run: &str) -> bool {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let Some(run) = inner
            .agents
            .get_mut(agent)
            .and_then(|a| a.runs.get_mut(run))
        else {
            return false;
        };
        if run.stopped.take().is_none() {
            return false;
        }
        run.started = now;
        run.requests = 0;
        run.tokens = 0;
        run.nanos = 0;
        run.repeats.clear();
        run.error_streak = 0;
        run.recent.clear();
        run.recent_sum = 0;
        true
    }

    /// Every run of `agent` (or of every agent), newest first.
    pub fn list(&self, agent: Option<&str>) -> Vec<RunView> {
        let now = Instant::now();
        let inner = lock(&self.inner);
        let mut out: Vec<RunView> = inner
            .agents
            .iter()
            .filter(|(id, _)| agent.is_none_or(|a| a == &***id))
            .flat_map(|(id, a)| a.runs.values().map(move |r| view(id, r, now)))
            .collect();
        out.sort_by(|a, b| b.started_at.cmp(&a.started_at));
        out
    }

    /// One run, found by its id among every agent's (or `agent`'s) runs.
    pub fn get(&self, run: &str) -> Vec<RunView> {
        let now = Instant::now();
        let inner = lock(&self.inner);
        inner
            .agents
            .iter()
            .filter_map(|(id, a)| a.runs.get(run).map(|r| view(id, r, now)))
            .collect()
    }

    /// Runs with a request in flight or one within their agent's idle gap, and stopped runs.
    pub fn counts(&self, active_within: Duration) -> (u64, u64) {
        let now = Instant::now();
        let inner = lock(&self.inner);
        let mut active = 0;
        let mut stopped = 0;
        for run in inner.agents.values().flat_map(|a| a.runs.values()) {
            if run.stopped.is_some() {
                stopped += 1;
            } else if run.in_flight > 0 || now.duration_since(run.last_seen) < active_within {
                active += 1;
            }
        }
        (active, stopped)
    }
}

impl Runs {
    /// Restores the runs stopped (and not resumed since), as the audit log left them, so
    /// a stop survives a restart. Returns how many runs are stopped.
    ///
    /// A stop older than [`STOPPED_RETENTION`] is not restored: a running proxy would
    /// have forgotten it by now (an idle stopped run is swept after that long).
    pub fn restore(&self, standing: &crate::audit::standing::Standing) -> usize {
        let now = Timestamp::now();
        let mut count = 0;
        for (agent, runs) in &standing.stopped_runs {
            for (run, stop) in runs {
                let age = stop
                    .at
                    .parse::<Timestamp>()
                    .ok()
                    .and_then(|at| now.duration_since(at).try_into().ok())
                    .unwrap_or_default();
                if age >= STOPPED_RETENTION {
                    continue;
                }
                let crossed = Crossed {
                    condition: Condition::parse(&stop.condition).unwrap_or(Condition::Admin),
                    message: stop.message.clone(),
                };
                self.restore_stop(agent, run, crossed, stop.at.clone(), age);
                count += 1;
            }
        }
        count
    }
}

fn view(agent: &str, r: &Run, now: Instant) -> RunView {
    RunView {
        id: r.id.to_string(),
        agent: agent.to_owned(),
        started_at: r.started_at.to_string(),
        duration_seconds: now.duration_since(r.started).as_secs_f64(),
        idle_seconds: now.duration_since(r.last_seen).as_secs_f64(),
        requests: r.requests,
        tokens: r.tokens,
        cost_usd: nanos_to_usd(r.nanos),
        in_flight: r.in_flight,
        error_streak: r.error_streak,
        state: if r.stopped.is_some() {
            "stopped"
        } else if r.in_flight > 0 {
            "running"
        } else {
            "idle"
        },
        stopped: r.stopped.clone(),
    }
}

impl AgentRuns {
    /// Drops the run idle longest, stopped runs last.
    fn evict_one(&mut self) {
        let victim = self
            .runs
            .values()
            .filter(|r| r.in_flight == 0)
            .min_by_key(|r| (r.stopped.is_some(), r.last_seen))
            .map(|r| r.id.clone());
        if let Some(id) = victim {
            self.runs.remove(&id);
        }
    }
}

impl Inner {
    /// Forgets runs idle for long: an hour after their last request (a day for runs
    /// with requests still counted against a minute), a week for stopped ones.
    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|at| now.duration_since(at) < SWEEP_EVERY)
        {
            return;
        }
        self.last_sweep = Some(now);
        for agent in self.agents.values_mut() {
            agent.runs.retain(|_, r| {
                let idle = now.duration_since(r.last_seen);
                r.in_flight > 0
                    || if r.stopped.is_some() {
                        idle < STOPPED_RETENTION
                    } else {
                        idle < Duration::from_secs(3600)
                    }
            });
            if agent
                .auto
                .as_ref()
                .is_some_and(|id| !agent.runs.contains_key(id))
            {
                agent.auto = None;
            }
        }
        self.agents.retain(|_, a| !a.runs.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut RunLimits)) -> Arc<RunLimits> {
        let mut l = RunLimits::default();
        f(&mut l);
        Arc::new(l)
    }

    fn go(v: Verdict) -> (Ticket, Vec<Crossed>) {
        match v {
            Verdict::Go { ticket, warnings } => (ticket, warnings),
            Verdict::Stop { crossed, .. } => panic!("stopped: {crossed:?}"),
        }
    }

    fn stop(v: Verdict) -> Crossed {
        match v {
            Verdict::Go { .. } => panic!("not stopped"),
            Verdict::Stop { crossed, .. } => crossed,
        }
    }

    #[tokio::test]
    async fn max_requests_stops_at_exactly_the_figure_and_stays_stopped() {
        let runs = Arc::new(Runs::default());
        let l = limits(|l| l.max_requests = Some(3));
        for _ in 0..3 {
            go(runs.enter("a", Some("r1"), &l, None))
                .0
                .settle(1, 0, Ending::Ok);
        }
        let crossed = stop(runs.enter("a", Some("r1"), &l, None));
        assert_eq!(crossed.condition, Condition::MaxRequests);
        assert!(
            crossed.message.contains("request 4 of at most 3"),
            "{}",
            crossed.message
        );
        assert!(matches!(
            runs.enter("a", Some("r1"), &l, None),
            Verdict::Stop { newly: false, .. }
        ));
        // Another run, or the same id of another agent, starts fresh.
        go(runs.enter("a", Some("r2"), &l, None));
        go(runs.enter("b", Some("r1"), &l, None));
        assert!(runs.resume("a", "r1"));
        go(runs.enter("a", Some("r1"), &l, None));
    }

    #[tokio::test]
    async fn warn_lets_requests_through_with_the_condition() {
        let runs = Arc::new(Runs::default());
        let l = limits(|l| {
            l.max_requests = Some(1);
            l.action = RunAction::Warn;
        });
        assert!(go(runs.enter("a", Some("r"), &l, None)).1.is_empty());
        let warnings = go(runs.enter("a", Some("r"), &l, None)).1;
        assert_eq!(warnings[0].condition, Condition::MaxRequests);
    }

    #[tokio::test]
    async fn spend_conditions_stop_the_run_when_it_settles() {
        let runs = Arc::new(Runs::default());
        let l = limits(|l| {
            l.max_tokens = Some(100);
            l.max_error_streak = Some(2);
        });
        let (t, _) = go(runs.enter("a", Some("r"), &l, None));
        assert_eq!(t.allowance.tokens, Some(100));
        let crossed = t.settle(100, 0, Ending::Ok).unwrap();
        assert_eq!(crossed.condition, Condition::MaxTokens);
        assert_eq!(
            stop(runs.enter("a", Some("r"), &l, None)).condition,
            Condition::MaxTokens
        );

        let (t, _) = go(runs.enter("a", Some("e"), &l, None));
        assert!(t.settle(0, 0, Ending::UpstreamError).is_none());
        let (t, _) = go(runs.enter("a", Some("e"), &l, None));
        assert_eq!(
            t.settle(0, 0, Ending::UpstreamError).unwrap().condition,
            Condition::MaxErrorStreak
        );
    }

    #[tokio::test]
    async fn repeats_are_counted_by_canonical_fingerprint() {
        let runs = Arc::new(Runs::default());
        let l = limits(|l| l.max_repeats = Some(2));
        let a = fingerprint(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1}"#,
        );
        let b = fingerprint(br#"{ "messages" : [ {"content":"x","role":"user"} ], "model":"m" }"#);
        assert_eq!(a, b, "key order, whitespace and other fields do not matter");
        let call = |args: &str| {
            fingerprint(
                format!(r#"{{"model":"m","messages":[{{"role":"assistant","tool_calls":[{{"function":{{"name":"f","arguments":{args:?}}}}}]}}]}}"#)
                    .as_bytes(),
            )
        };
        assert_eq!(call(r#"{"a":1,"b":2}"#), call(r#"{ "b": 2, "a": 1 }"#));
        assert_ne!(call(r#"{"a":1}"#), call(r#"{"a":2}"#));
        go(runs.enter("a", Some("r"), &l, a));
        go(runs.enter("a", Some("r"), &l, b));
        assert_eq!(
            stop(runs.enter("a", Some("r"), &l, a)).condition,
            Condition::MaxRepeats
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_begins_by_itself_after_the_idle_gap() {
        let runs = Arc::new(Runs::default());
        let l = limits(|l| {
            l.max_requests = Some(1);
            l.idle_gap = Duration::from_secs(60);
        });
        let (t, _) = go(runs.enter("a", None, &l, None));
        let first = t.run.clone();
        drop(t);
        assert!(matches!(
            runs.enter("a", None, &l, None),
            Verdict::Stop { .. }
        ));
        tokio::time::advance(Duration::from_secs(61)).await;
        let (t, _) = go(runs.enter("a", None, &l, None));
        assert_ne!(t.run, first, "a new run began");
    }
}
