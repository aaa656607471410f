//! `GET /admin/overview`: everything the dashboard shows, in one answer: the agents with
//! their budgets and pauses, the runs, and the report of the audit log so far (outcomes
//! and cost per outcome, redundancy, stopped runs, anomalies, context growth, spend over
//! time), read as the log grows ([`crate::report::live`]).
//!
//! A dashboard polls every few seconds. Each read is not worth an audit line of its own:
//! one line per admin token per [`AUDIT_EVERY`] says who has been reading, and how often.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::agents::{agent_views, budget_accounts};
use crate::proxy::{AppState, Live};
use crate::report::live::Tail;
use crate::report::{Options, Report};

/// At most one audit line per admin token this often for overview reads.
pub const AUDIT_EVERY: Duration = Duration::from_secs(600);

/// The log reader and who has read, kept across requests.
#[derive(Default)]
pub struct Overview {
    /// `None` when the proxy keeps no audit log to read (tests that build a bare state).
    tail: Option<Arc<tokio::sync::Mutex<Tail>>>,
    /// Per admin token: when its last overview line was written, and reads since.
    reads: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Overview {
    /// Reads the audit log in `dir` (with the chain's HMAC key, if any).
    pub fn new(dir: PathBuf, key: Option<&[u8]>, redundancy_window: Duration) -> Overview {
        let options = Options {
            since: None,
            now: SystemTime::now(),
            agents: Vec::new(),
            teams: Vec::new(),
            redundancy_window,
        };
        Overview {
            tail: Some(Arc::new(tokio::sync::Mutex::new(Tail::new(
                dir, key, options,
            )))),
            reads: Mutex::default(),
        }
    }

    /// The report of the whole log as it stands, read off the async workers (the first
    /// read takes the whole log; the next ones only what was written since).
    async fn insights(&self) -> Result<Option<Report>, String> {
        let Some(tail) = &self.tail else {
            return Ok(None);
        };
        let mut tail = tail.clone().lock_owned().await;
        tokio::task::spawn_blocking(move || {
            tail.refresh().map_err(|e| e.to_string())?;
            Ok(Some(tail.report(SystemTime::now())))
        })
        .await
        .map_err(|e| format!("the log reader failed: {e}"))?
    }

    /// Counts a read by `by`; `Some(reads)` when it is time for an audit line (the first
    /// read of a token, then one per [`AUDIT_EVERY`]), with the reads it stands for.
    pub(super) fn audit_due(&self, by: &str) -> Option<u64> {
        self.audit_due_at(by, Instant::now())
    }

    fn audit_due_at(&self, by: &str, now: Instant) -> Option<u64> {
        let mut reads = self
            .reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match reads.get_mut(by) {
            Some((last, count)) if now.duration_since(*last) < AUDIT_EVERY => {
                *count += 1;
                None
            }
            Some((last, count)) => {
                let n = *count + 1;
                *last = now;
                *count = 0;
                Some(n)
            }
            None => {
                reads.insert(by.to_owned(), (now, 0));
                Some(1)
            }
        }
    }
}

/// Runs listed in an overview: those that need a look first (stopped, then running, then
/// the most recent idle ones). `/admin/runs` lists them all.
pub const MAX_RUNS: usize = 100;

/// The overview's answer. It never fails: what cannot be read (budgets in Redis, the
/// audit log) is left out and said so.
pub(super) async fn overview(state: &AppState, live: &Live) -> serde_json::Value {
    // Redis unreachable: everything else is still worth showing (in an incident most of
    // all), with the budgets left out and said so.
    let (accounts, budgets_error) = match budget_accounts(state, live).await {
        Ok(accounts) => (Some(accounts), None),
        Err(e) => (
            None,
            Some(format!("cannot read the budgets from Redis: {e}")),
        ),
    };
    let agents = agent_views(state, live, accounts.as_ref());
    let mut runs = state.runs.list(None);
    let runs_total = runs.len();
    let rank = |state: &str| match state {
        "stopped" => 0,
        "running" => 1,
        _ => 2,
    };
    runs.sort_by(|a, b| {
        rank(a.state)
            .cmp(&rank(b.state))
            .then_with(|| a.idle_seconds.total_cmp(&b.idle_seconds))
    });
    runs.truncate(MAX_RUNS);
    let (insights, insights_error) = match state.overview.insights().await {
        Ok(report) => (report, None),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the audit log for the overview");
            (None, Some(e))
        }
    };
    json!({
        "generated_at": crate::audit::now_rfc3339(),
        "pause_all": state.switches.all_paused(),
        "agents": agents,
        "budgets_error": budgets_error,
        "runs": runs,
        "runs_total": runs_total,
        "insights": insights,
        "insights_error": insights_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_audited_once_per_token_per_period() {
        let overview = Overview::default();
        let start = Instant::now();
        let later = start + AUDIT_EVERY;
        assert_eq!(overview.audit_due_at("ops", start), Some(1));
        assert_eq!(overview.audit_due_at("ops", start), None);
        assert_eq!(overview.audit_due_at("ops", start), None);
        assert_eq!(overview.audit_due_at("sre", start), Some(1));
        assert_eq!(overview.audit_due_at("ops", later), Some(3));
        assert_eq!(overview.audit_due_at("ops", later), None);
        assert_eq!(overview.audit_due_at("sre", later), Some(1));
    }
}
