//! `/admin/agents`, the pauses, and the gauges `/metrics` sets at scrape time.

use std::collections::HashMap;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::Response;
use http_body_util::Full;
use serde::Serialize;
use serde_json::json;

use super::runs::run_counts;
use super::{AdminError, Done};
use crate::guard::SwitchAction;
use crate::ledger::{nanos_to_usd, Account, BudgetKey, Limit, Scope};
use crate::proxy::{AppState, Live};

#[derive(Serialize)]
struct AgentView {
    id: String,
    team: Option<String>,
    /// `active` or `paused`.
    state: &'static str,
    /// Why it is paused: `agent` (paused itself), `pause_all`, or both.
    paused_by: Vec<&'static str>,
    active_runs: u64,
    stopped_runs: u64,
    budgets: Vec<BudgetView>,
}

#[derive(Serialize)]
struct BudgetView {
    /// `agent` or `team`.
    scope: &'static str,
    id: String,
    period: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    usd: Option<Figures<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<Figures<u64>>,
}

/// One unit of a budget in its current period; `remaining` is the limit less the
/// settled spend (what `tokenwarden_budget_remaining` shows), `reserved` what requests
/// in flight hold on top.
#[derive(Serialize)]
struct Figures<T> {
    limit: T,
    spent: T,
    reserved: T,
    remaining: T,
}

fn paused_by(state: &AppState, agent: &str) -> Vec<&'static str> {
    let mut by = Vec::new();
    if state.switches.paused_agents().iter().any(|a| a == agent) {
        by.push("agent");
    }
    if state.switches.all_paused() {
        by.push("pause_all");
    }
    by
}

pub(super) async fn list_agents(state: &AppState, live: &Live) -> Result<Done, AdminError> {
    let accounts = budget_accounts(state, live)
        .await
        .map_err(AdminError::Store)?;
    let agents = agent_views(state, live, Some(&accounts));
    Ok(Done {
        detail: format!("listed {} agents", agents.len()),
        body: json!({ "pause_all": state.switches.all_paused(), "agents": agents }),
        agent: None,
        run: None,
    })
}

/// The current period's account of every budget of the config, from the ledger or Redis.
pub(super) async fn budget_accounts(
    state: &AppState,
    live: &Live,
) -> Result<HashMap<BudgetKey, Account>, String> {
    accounts(state, &live.policies.all_limits()).await
}

/// Every configured agent, with its budgets when their `accounts` could be read (none
/// listed otherwise: figures that cannot be read are not shown as zero).
pub(super) fn agent_views(
    state: &AppState,
    live: &Live,
    accounts: Option<&HashMap<BudgetKey, Account>>,
) -> Vec<impl Serialize> {
    let runs = run_counts(state, live);
    live.config
        .agents
        .iter()
        .map(|a| {
            let paused_by = paused_by(state, &a.id);
            let (active_runs, stopped_runs) = runs.get(a.id.as_str()).copied().unwrap_or((0, 0));
            let budgets = match accounts {
                Some(accounts) => live
                    .policies
                    .get(&a.id)
                    .map(|p| p.budgets())
                    .unwrap_or_default()
                    .iter()
                    .map(|limit| {
                        budget_view(limit, accounts.get(&limit.key).copied().unwrap_or_default())
                    })
                    .collect(),
                None => Vec::new(),
            };
            AgentView {
                id: a.id.clone(),
                team: a.team.clone(),
                state: if paused_by.is_empty() {
                    "active"
                } else {
                    "paused"
                },
                paused_by,
                active_runs,
                stopped_runs,
                budgets,
            }
        })
        .collect()
}

fn budget_view(limit: &Limit, account: Account) -> BudgetView {
    BudgetView {
        scope: limit.key.scope.as_str(),
        id: limit.key.id.to_string(),
        period: limit.key.period.as_str(),
        usd: limit.nanos.map(|max| Figures {
            limit: nanos_to_usd(max),
            spent: nanos_to_usd(account.spent.nanos),
            reserved: nanos_to_usd(account.reserved.nanos),
            remaining: nanos_to_usd(max.saturating_sub(account.spent.nanos)),
        }),
        tokens: limit.tokens.map(|max| Figures {
            limit: max,
            spent: account.spent.tokens,
            reserved: account.reserved.tokens,
            remaining: max.saturating_sub(account.spent.tokens),
        }),
    }
}

pub(super) fn switch_agent(
    state: &AppState,
    live: &Live,
    agent: &str,
    action: SwitchAction,
) -> Result<Done, AdminError> {
    if !live.config.agents.iter().any(|a| a.id == agent) {
        return Err(AdminError::UnknownAgent(agent.to_owned()));
    }
    let changed = state.switches.apply(action, Some(agent));
    if let Some(redis) = &state.redis {
        // Every replica refuses a paused agent: the admission script reads this.
        let tag = live.policies.get(agent).map_or(agent, |p| p.tag.as_str());
        redis.share_pause(&[tag.to_owned()], agent, action == SwitchAction::Pause);
    }
    let paused_by = paused_by(state, agent);
    let verb = if action == SwitchAction::Pause {
        "paused"
    } else {
        "resumed"
    };
    tracing::warn!(agent, "agent {verb} by an admin");
    Ok(Done {
        detail: format!(
            "agent {agent} {}{verb}",
            if changed { "" } else { "was already " }
        ),
        body: json!({
            "agent": agent,
            "state": if paused_by.is_empty() { "active" } else { "paused" },
            "paused_by": paused_by,
            "changed": changed,
        }),
        agent: Some(agent.to_owned()),
        run: None,
    })
}

pub(super) fn switch_all(
    state: &AppState,
    live: &Live,
    action: SwitchAction,
) -> Result<Done, AdminError> {
    let changed = state.switches.apply(action, None);
    let on = state.switches.all_paused();
    if let Some(redis) = &state.redis {
        // Under every agent's tag: each admission script reads only its own.
        let mut tags: Vec<String> = live
            .config
            .agents
            .iter()
            .filter_map(|a| live.policies.get(&a.id).map(|p| p.tag.clone()))
            .collect();
        tags.sort();
        tags.dedup();
        redis.share_pause(&tags, "*", on);
    }
    tracing::warn!(
        "pause-all turned {} by an admin",
        if on { "on" } else { "off" }
    );
    Ok(Done {
        detail: format!(
            "pause-all {}{}",
            if changed { "" } else { "was already " },
            if on { "on" } else { "off" }
        ),
        body: json!({
            "pause_all": on,
            "changed": changed,
            "paused_agents": paused_agent_count(state, live),
        }),
        agent: None,
        run: None,
    })
}

/// Configured agents that may not send requests now.
fn paused_agent_count(state: &AppState, live: &Live) -> usize {
    if state.switches.all_paused() {
        return live.config.agents.len();
    }
    let paused = state.switches.paused_agents();
    live.config
        .agents
        .iter()
        .filter(|a| paused.contains(&a.id))
        .count()
}

// === metrics ===

pub(super) async fn metrics(state: &AppState) -> Response<Full<Bytes>> {
    let live = state.live.load_full();
    update_budget_gauges(state, &live).await;
    let active: u64 = run_counts(state, &live).values().map(|(a, _)| a).sum();
    state.metrics.runs_active.set(active as i64);
    state
        .metrics
        .paused_agents
        .set(paused_agent_count(state, &live) as i64);
    let mut response = Response::new(Full::new(Bytes::from(state.metrics.render())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// The current period's account of each limit, from the ledger or Redis.
async fn accounts(
    state: &AppState,
    limits: &[(Limit, String)],
) -> Result<HashMap<BudgetKey, Account>, String> {
    let accounts = match &state.redis {
        None => state.ledger.accounts(),
        Some(redis) => {
            let (limits, tags): (Vec<_>, Vec<_>) = limits.iter().cloned().unzip();
            redis
                .accounts(&limits, &tags)
                .await
                .map_err(|e| e.to_string())?
        }
    };
    Ok(accounts.into_iter().collect())
}

/// Sets the budget gauges from the ledger (or Redis), at scrape time: nothing on the
/// request path. When Redis cannot be read, the gauges keep their last values.
async fn update_budget_gauges(state: &AppState, live: &Live) {
    let limits = live.policies.all_limits();
    let accounts = match accounts(state, &limits).await {
        Ok(accounts) => accounts,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read budgets from Redis for the metrics");
            return;
        }
    };
    let metrics = &state.metrics;
    for (limit, _) in limits {
        let account = accounts.get(&limit.key).copied().unwrap_or_default();
        let (agent, team) = match limit.key.scope {
            Scope::Agent => (&*limit.key.id, ""),
            Scope::Team => ("", &*limit.key.id),
        };
        let period = limit.key.period.as_str();
        if let Some(max) = limit.nanos {
            let labels = [agent, team, period, "usd"];
            let left = max.saturating_sub(account.spent.nanos);
            metrics
                .budget_remaining
                .with_label_values(&labels)
                .set(nanos_to_usd(left));
            metrics
                .budget_reserved
                .with_label_values(&labels)
                .set(nanos_to_usd(account.reserved.nanos));
        }
        if let Some(max) = limit.tokens {
            let labels = [agent, team, period, "tokens"];
            let left = max.saturating_sub(account.spent.tokens);
            metrics
                .budget_remaining
                .with_label_values(&labels)
                .set(left as f64);
            metrics
                .budget_reserved
                .with_label_values(&labels)
                .set(account.reserved.tokens as f64);
        }
    }
}
