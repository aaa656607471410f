//! `/admin/runs`: list, view, stop and resume runs by id.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{AdminError, Caller, Done};
use crate::guard::runs::{Condition, Crossed, RunLimits, RunView};
use crate::identity::Agent;
use crate::proxy::settle::{self, RunEvent};
use crate::proxy::{AppState, Live};

/// A configured agent's id, or 404.
fn known_agent<'a>(live: &Live, agent: &'a str) -> Result<&'a str, AdminError> {
    if live.config.agents.iter().any(|a| a.id == agent) {
        Ok(agent)
    } else {
        Err(AdminError::UnknownAgent(agent.to_owned()))
    }
}

pub(super) fn list_runs(
    state: &AppState,
    live: &Live,
    agent: Option<&String>,
) -> Result<Done, AdminError> {
    let agent = agent.map(|a| known_agent(live, a)).transpose()?;
    let runs = state.runs.list(agent);
    Ok(Done {
        detail: format!("listed {} runs", runs.len()),
        body: json!({ "runs": runs }),
        agent: agent.map(str::to_owned),
        run: None,
    })
}

/// The runs with this id, of `agent` if given.
fn find_runs(state: &AppState, run: &str, agent: Option<&str>) -> Vec<RunView> {
    let mut found = state.runs.get(run);
    if let Some(agent) = agent {
        found.retain(|r| r.agent == agent);
    }
    found.sort_by(|a, b| a.agent.cmp(&b.agent));
    found
}

pub(super) fn get_run(
    state: &AppState,
    run: &str,
    agent: Option<&String>,
) -> Result<Done, AdminError> {
    let agent = agent.map(String::as_str);
    let runs = find_runs(state, run, agent);
    if runs.is_empty() {
        return Err(AdminError::UnknownRun {
            run: run.to_owned(),
            agent: agent.map(str::to_owned),
        });
    }
    Ok(Done {
        detail: format!("viewed run {run} ({} found)", runs.len()),
        body: json!({ "runs": runs }),
        agent: agent.map(str::to_owned),
        run: Some(run.to_owned()),
    })
}

/// The agent whose run `run` an action is about: `?agent=` if given (a configured agent),
/// else the one agent with a run of that id.
fn run_owner(
    state: &AppState,
    live: &Live,
    run: &str,
    agent: Option<&String>,
) -> Result<(Agent, Option<RunView>), AdminError> {
    let owner = match agent {
        Some(agent) => known_agent(live, agent)?.to_owned(),
        None => {
            let found = find_runs(state, run, None);
            match found.as_slice() {
                [] => {
                    return Err(AdminError::UnknownRun {
                        run: run.to_owned(),
                        agent: None,
                    })
                }
                [one] => one.agent.clone(),
                many => {
                    return Err(AdminError::AmbiguousRun {
                        run: run.to_owned(),
                        agents: many
                            .iter()
                            .map(|r| r.agent.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
    };
    let view = find_runs(state, run, Some(&owner)).pop();
    // An agent a reload removed may still have runs; it has no team then.
    let team = live
        .config
        .agents
        .iter()
        .find(|a| a.id == owner)
        .and_then(|a| a.team.as_deref().map(Arc::from));
    Ok((
        Agent {
            id: Arc::from(owner),
            team,
        },
        view,
    ))
}

pub(super) fn stop_run(
    state: &AppState,
    live: &Live,
    caller: &Caller,
    run: &str,
    agent: Option<&String>,
) -> Result<Done, AdminError> {
    let (agent, before) = run_owner(state, live, run, agent)?;
    let already = before.as_ref().is_some_and(|r| r.stopped.is_some());
    if !already {
        let crossed = state.runs.stop(&agent.id, run, &caller.by);
        // The `run` line is what a restart replays the stop from.
        settle::run_event(
            &state.audit,
            &state.metrics,
            state.redis.as_ref(),
            &agent,
            run,
            RunEvent::Stopped,
            &crossed,
        );
    }
    let view = find_runs(state, run, Some(&agent.id)).pop();
    Ok(Done {
        detail: format!(
            "run {run} of agent {} {}",
            agent.id,
            if already {
                "was already stopped"
            } else if before.is_none() {
                "stopped ahead of its first request"
            } else {
                "stopped"
            }
        ),
        body: json!({ "run": view, "changed": !already }),
        agent: Some(agent.id.to_string()),
        run: Some(run.to_owned()),
    })
}

pub(super) fn resume_run(
    state: &AppState,
    live: &Live,
    caller: &Caller,
    run: &str,
    agent: Option<&String>,
) -> Result<Done, AdminError> {
    let (agent, before) = run_owner(state, live, run, agent)?;
    if before.is_none() {
        return Err(AdminError::UnknownRun {
            run: run.to_owned(),
            agent: Some(agent.id.to_string()),
        });
    }
    let changed = state.runs.resume(&agent.id, run);
    if changed {
        let resumed = Crossed {
            condition: Condition::Admin,
            message: format!(
                "run {run} of agent {} was resumed by {}",
                agent.id, caller.by
            ),
        };
        settle::run_event(
            &state.audit,
            &state.metrics,
            state.redis.as_ref(),
            &agent,
            run,
            RunEvent::Resumed,
            &resumed,
        );
    }
    let view = find_runs(state, run, Some(&agent.id)).pop();
    Ok(Done {
        detail: format!(
            "run {run} of agent {} {}",
            agent.id,
            if changed {
                "resumed"
            } else {
                "was not stopped"
            }
        ),
        body: json!({ "run": view, "changed": changed }),
        agent: Some(agent.id.to_string()),
        run: Some(run.to_owned()),
    })
}

/// Per agent: runs active (a request in flight, or one within the agent's idle gap) and
/// runs stopped.
pub(super) fn run_counts(state: &AppState, live: &Live) -> HashMap<String, (u64, u64)> {
    let default_gap = RunLimits::default().idle_gap;
    let mut out: HashMap<String, (u64, u64)> = HashMap::new();
    for run in state.runs.list(None) {
        let gap = live
            .policies
            .get(&run.agent)
            .map_or(default_gap, |p| p.runs.idle_gap);
        let entry = out.entry(run.agent.clone()).or_default();
        if run.stopped.is_some() {
            entry.1 += 1;
        } else if run.in_flight > 0 || Duration::from_secs_f64(run.idle_seconds) < gap {
            entry.0 += 1;
        }
    }
    out
}
