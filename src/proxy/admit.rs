//! Admission: what may go out, decided before a byte reaches the provider.
//!
//! In order: the agent's model allow-list (403), its cap on output tokens (clamped), then
//! the budgets: the worst case of the request (an upper bound of its input, which costs no
//! tokenizer pass, plus its output limit, priced) is reserved against every budget that
//! covers it, in one atomic step (402 when it does not fit). A request with no output
//! limit is clamped to what the budgets still afford (at most `max_tokens_cap`, or
//! `default_reserve_output_tokens` when there is no cap), reserved at a default, or
//! refused, as `budgets.on_missing_max_tokens` says; the clamp is the only change
//! admission makes to a body.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::error::ProxyError;
use crate::config::{BudgetConfig, Config, MissingMaxTokens};
use crate::guard::{Guards, Slot};
use crate::ledger::snapshot::Aggregate;
use crate::ledger::{
    usd_to_nanos, Amount, BudgetKey, Exhausted, Ledger, Limit, Period, Reservation, Scope,
};
use crate::metering::pricing::glob_match;
use crate::metering::{Endpoint, Price};
use crate::providers::{set_json_field, RequestFields};

/// An agent's rules, from the config.
#[derive(Debug, Default)]
pub struct Policy {
    pub models: Option<Vec<String>>,
    pub max_tokens_cap: Option<u64>,
    /// The agent's budgets and its team's, then its tokens-per-minute limit, if any:
    /// everything a request reserves against.
    pub limits: Vec<Limit>,
    /// How many of `limits` are budgets (the rest is the per-minute limit).
    budgets: usize,
    pub requests_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
}

impl Policy {
    /// The budgets alone, without the per-minute rate limit.
    pub fn budgets(&self) -> &[Limit] {
        &self.limits[..self.budgets]
    }
}

/// Every agent's policy, by agent id.
#[derive(Debug, Default)]
pub struct Policies(HashMap<String, Arc<Policy>>);

fn limits<'a>(
    scope: Scope,
    id: &str,
    budgets: &'a [BudgetConfig],
) -> impl Iterator<Item = Limit> + 'a {
    let id: Arc<str> = id.into();
    budgets.iter().map(move |b| Limit {
        key: BudgetKey {
            scope,
            id: id.clone(),
            period: b.period,
        },
        nanos: b.usd.map(usd_to_nanos),
        tokens: b.tokens,
    })
}

impl Policies {
    pub fn from_config(config: &Config) -> Policies {
        let mut map = HashMap::new();
        for agent in &config.agents {
            let mut all: Vec<Limit> = limits(Scope::Agent, &agent.id, &agent.budgets).collect();
            if let Some(team) = agent.team.as_deref() {
                if let Some(t) = config.teams.iter().find(|t| t.id == team) {
                    all.extend(limits(Scope::Team, &t.id, &t.budgets));
                }
            }
            let budgets = all.len();
            if let Some(tpm) = agent.limits.tokens_per_minute {
                all.push(Limit {
                    key: BudgetKey {
                        scope: Scope::Agent,
                        id: agent.id.as_str().into(),
                        period: Period::Minute,
                    },
                    nanos: None,
                    tokens: Some(tpm),
                });
            }
            let policy = Policy {
                models: agent.models.clone(),
                max_tokens_cap: agent.max_tokens_cap,
                limits: all,
                budgets,
                requests_per_minute: agent.limits.requests_per_minute,
                max_concurrent: agent.limits.max_concurrent,
            };
            map.insert(agent.id.clone(), Arc::new(policy));
        }
        Policies(map)
    }

    pub fn get(&self, agent: &str) -> Option<&Arc<Policy>> {
        self.0.get(agent)
    }

    /// Every limit of every agent and team, once each, for metrics and the admin API.
    pub fn all_limits(&self) -> Vec<Limit> {
        let mut all: Vec<Limit> = self
            .0
            .values()
            .flat_map(|p| p.limits.iter().cloned())
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all.dedup_by(|a, b| a.key == b.key);
        all
    }
}

/// What admission decided for a request it lets through.
pub struct Admitted {
    pub reservation: Option<Reservation>,
    /// The body with its output limit clamped, if admission changed it.
    pub body: Option<Bytes>,
    /// What the tightest budgets have left (settled spend): nano-dollars, tokens.
    pub remaining: (Option<u64>, Option<u64>),
    /// A place among the agent's requests in flight, held to the end of the response.
    pub slot: Option<Slot>,
}

/// What one request needs from admission.
pub struct Request<'a> {
    pub agent: &'a str,
    /// The body parsed as JSON (a budget cannot be enforced on a body it cannot read).
    pub readable: bool,
    pub model: &'a str,
    pub endpoint: Endpoint,
    pub fields: &'a RequestFields<'a>,
    /// The JSON body as the client sent it (empty for other bodies).
    pub body: &'a Bytes,
    pub price: Option<Price>,
}

/// Nano-dollars a token costs at a price in dollars per million tokens.
fn nanos_per_token(usd_per_mtok: f64) -> f64 {
    usd_per_mtok * 1e3
}

/// A refused reservation: over a budget (402), or over the per-minute token limit,
/// which a wait cures (429).
fn refused(e: Exhausted, ledger: &Ledger) -> ProxyError {
    if e.key.period == Period::Minute {
        let wait = e.resets_at.map_or(60, |at| at - ledger.now().as_second());
        return ProxyError::RateLimited {
            what: format!("agent {} is over its tokens per minute", e.key.id),
            retry_after: wait.clamp(1, 60) as u64,
        };
    }
    ProxyError::BudgetExhausted(Box::new(e))
}

pub fn admit(
    ledger: &Arc<Ledger>,
    guards: &Guards,
    policy: &Policy,
    config: &Config,
    req: Request<'_>,
) -> Result<Admitted, ProxyError> {
    if let Some(models) = &policy.models {
        if !models.iter().any(|m| glob_match(m, req.model)) {
            return Err(ProxyError::ModelNotAllowed(req.model.to_owned()));
        }
    }
    let slot = match policy.max_concurrent {
        None => None,
        Some(max) => Some(
            guards
                .enter(req.agent, max)
                .ok_or_else(|| ProxyError::RateLimited {
                    what: format!("agent {} has {max} requests in flight already", req.agent),
                    retry_after: 1,
                })?,
        ),
    };
    if let Some(rpm) = policy.requests_per_minute {
        guards
            .check_rate(req.agent, rpm)
            .map_err(|wait| ProxyError::RateLimited {
                what: format!(
                    "agent {} is limited to {rpm} requests per minute",
                    req.agent
                ),
                retry_after: wait.clamp(1, 60),
            })?;
    }
    if req.endpoint == Endpoint::Other
        || (policy.limits.is_empty() && policy.max_tokens_cap.is_none())
    {
        return Ok(Admitted {
            reservation: None,
            body: None,
            remaining: (None, None),
            slot,
        });
    }

    if !policy.limits.is_empty() {
        if !req.readable {
            return Err(ProxyError::Unreadable);
        }
        if req.price.is_none() && policy.limits.iter().any(|l| l.nanos.is_some()) {
            return Err(ProxyError::Unpriced(req.model.to_owned()));
        }
    }

    // No tokenizer pass: a token is at least one byte, so the body's length bounds it.
    let input_tokens = req.body.len() as u64;
    let (input_price, output_price) = req.price.map_or((0.0, 0.0), |p| {
        (
            nanos_per_token(p.input.max(p.cache_write)),
            nanos_per_token(p.output),
        )
    });
    let input = Amount {
        tokens: input_tokens,
        nanos: (input_tokens as f64 * input_price).ceil() as u64,
    };

    let (asked, field) = req.fields.output_limit(req.endpoint);
    let cap = policy.max_tokens_cap;
    let (output, write) = match asked {
        Some(n) => match cap {
            Some(cap) if n > cap => (cap, true),
            _ => (n, false),
        },
        None if policy.limits.is_empty() => match cap {
            Some(cap) => (cap, true),
            None => (0, false),
        },
        None => match config.budgets.on_missing_max_tokens {
            MissingMaxTokens::Reject => return Err(ProxyError::OutputLimitRequired(field)),
            MissingMaxTokens::ReserveDefault => {
                let n = config.budgets.default_reserve_output_tokens;
                (cap.map_or(n, |c| n.min(c)), false)
            }
            MissingMaxTokens::Clamp => {
                let affordable = ledger
                    .affordable_output(&policy.limits, input, output_price)
                    .unwrap_or(u64::MAX)
                    / req.fields.choices();
                // Never everything the budget affords: one request would hold the whole
                // budget and every concurrent one would be refused.
                let ceiling = cap.unwrap_or(config.budgets.default_reserve_output_tokens);
                let n = affordable.min(ceiling);
                if n == 0 {
                    // Nothing left for even one token: refuse as the ledger would.
                    let worst = Amount {
                        tokens: input.tokens + 1,
                        nanos: input.nanos + output_price.ceil() as u64,
                    };
                    return Err(ledger
                        .reserve(&policy.limits, worst)
                        .err()
                        .map_or(ProxyError::OutputLimitRequired(field), |e| {
                            refused(e, ledger)
                        }));
                }
                (n, true)
            }
        },
    };

    let body = if write && !req.body.is_empty() {
        set_json_field(req.body, field, serde_json::Value::from(output))
    } else {
        None
    };
    let remaining = ledger.remaining(policy.budgets());
    // Every choice (`n`, `best_of`) may use the whole output limit.
    let all_output = output.saturating_mul(req.fields.choices());
    let worst = Amount {
        tokens: input.tokens + all_output,
        nanos: input.nanos + (all_output as f64 * output_price).ceil() as u64,
    };
    let reservation = if policy.limits.is_empty() {
        None
    } else {
        Some(
            ledger
                .reserve(&policy.limits, worst)
                .map_err(|e: Exhausted| refused(e, ledger))?,
        )
    };
    Ok(Admitted {
        reservation,
        body,
        remaining,
        slot,
    })
}

impl Policies {
    /// Rebuilds the ledger's current periods from the settled spend of the audit log, so
    /// a restart (or a crash) resumes with the same remaining budget. Each of an agent's
    /// budgets, its team's included, gets the agent's spend of that period: a team's
    /// budget is the sum of its agents under this config, whatever team a line named.
    pub fn restore(&self, ledger: &Ledger, spend: &Aggregate) {
        for (agent, policy) in &self.0 {
            for limit in &policy.limits {
                if let Some(s) = spend.spend(agent, limit.key.period) {
                    ledger.restore(&limit.key, s.amount(), s.window);
                }
            }
        }
    }
}
