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

use std::sync::Arc;

use bytes::Bytes;
// Keyed by agent ids from the config: a fast hash, seeded per process.
use hashbrown::HashMap;

use super::error::ProxyError;
use crate::config::{BudgetConfig, Config, MissingMaxTokens};
use crate::guard::runs::{Condition, Crossed, RunLimits};
use crate::guard::{Guards, Slot};
use crate::ledger::redis::{Admission, RedisLedger, Refusal};
use crate::ledger::snapshot::Aggregate;
use crate::ledger::{
    usd_to_nanos, Amount, Ask, BudgetKey, Exhausted, Hold, Ledger, Limit, Output, Period,
    Remaining, Scope,
};
use crate::metering::pricing::glob_match;
use crate::metering::{Endpoint, Price};
use crate::providers::{set_json_field_in, ObjectKeys, RequestFields};

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
    /// The hash tag of the agent's keys in Redis: its team's id, or its own.
    pub tag: String,
    /// The stop conditions of its runs (none set: runs are only counted).
    pub runs: Arc<RunLimits>,
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
                tag: agent.team.clone().unwrap_or_else(|| agent.id.clone()),
                runs: Arc::new(agent.runs.as_ref().map(RunLimits::from).unwrap_or_default()),
            };
            map.insert(agent.id.clone(), Arc::new(policy));
        }
        Policies(map)
    }

    pub fn get(&self, agent: &str) -> Option<&Arc<Policy>> {
        self.0.get(agent)
    }

    /// Every limit of every agent and team, once each, with the hash tag of its keys in
    /// Redis, for metrics and the admin API.
    pub fn all_limits(&self) -> Vec<(Limit, String)> {
        let mut all: Vec<(Limit, String)> = self
            .0
            .values()
            .flat_map(|p| p.limits.iter().map(|l| (l.clone(), p.tag.clone())))
            .collect();
        all.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        all.dedup_by(|a, b| a.0.key == b.0.key);
        all
    }
}

/// What admission decided for a request it lets through.
pub struct Admitted {
    pub hold: Option<Hold>,
    /// The body with its output limit clamped, if admission changed it.
    pub body: Option<Bytes>,
    /// What the tightest budgets have left (settled spend).
    pub remaining: Remaining,
    /// A place among the agent's requests in flight, held to the end of the response
    /// (in Redis mode the hold carries it).
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
    /// The request's run.
    pub run: &'a str,
}

/// Where limits are kept: in this process, or in Redis shared with other replicas.
pub struct Stores<'a> {
    pub ledger: &'a Arc<Ledger>,
    pub guards: &'a Guards,
    pub redis: Option<&'a Arc<RedisLedger>>,
}

/// Nano-dollars a token costs at a price in dollars per million tokens.
fn nanos_per_token(usd_per_mtok: f64) -> f64 {
    usd_per_mtok * 1e3
}

/// A refused reservation: over a budget (402), or over the per-minute token limit,
/// which a wait cures (429).
fn refused(e: Exhausted, now: jiff::Timestamp) -> ProxyError {
    if e.key.period == Period::Minute {
        let wait = e.resets_at.map_or(60, |at| at - now.as_second());
        return ProxyError::RateLimited {
            what: format!("agent {} is over its tokens per minute", e.key.id),
            retry_after: wait.clamp(1, 60) as u64,
        };
    }
    ProxyError::BudgetExhausted(Box::new(e))
}

fn too_many_in_flight(agent: &str, max: u32) -> ProxyError {
    ProxyError::RateLimited {
        what: format!("agent {agent} has {max} requests in flight already"),
        retry_after: 1,
    }
}

fn too_many_per_minute(agent: &str, rpm: u32, wait_seconds: u64) -> ProxyError {
    ProxyError::RateLimited {
        what: format!("agent {agent} is limited to {rpm} requests per minute"),
        retry_after: wait_seconds.clamp(1, 60),
    }
}

/// What a request asks of its budgets, and whether its body must carry a new output limit.
#[derive(Default)]
struct Plan {
    /// `None` when nothing is to be reserved.
    ask: Option<Ask>,
    /// The body field to set to the output limit granted (or the cap), and the body's
    /// keys, read before anything is reserved.
    rewrite: Option<(&'static str, ObjectKeys)>,
}

fn plan(policy: &Policy, config: &Config, req: &Request<'_>) -> Result<Plan, ProxyError> {
    if req.endpoint == Endpoint::Other
        || (policy.limits.is_empty() && policy.max_tokens_cap.is_none())
    {
        return Ok(Plan::default());
    }
    // A budget or a cap holds only if the body can be read, and its limit written.
    if !req.readable {
        return Err(ProxyError::Unreadable);
    }
    if req.price.is_none() && policy.limits.iter().any(|l| l.nanos.is_some()) {
        return Err(ProxyError::Unpriced(req.model.to_owned()));
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
    let (mut asked, field) = req.fields.output_limit(req.endpoint);
    if req.endpoint == Endpoint::Completions
        && req.fields.max_tokens.is_none()
        && body_keys(req, field).is_some_and(|keys| keys.has_field())
    {
        // An explicit null is the legacy API's default of 16 to OpenAI, but no limit at
        // all to some compatible servers (vLLM): held as no limit given, so one is
        // written.
        asked = None;
    }
    let cap = policy.max_tokens_cap;
    let (output, write) = match asked {
        Some(n) => match cap {
            Some(cap) if n > cap => (Output::Fixed(cap), true),
            _ => (Output::Fixed(n), false),
        },
        None if policy.limits.is_empty() => match cap {
            Some(cap) => (Output::Fixed(cap), true),
            None => (Output::Fixed(0), false),
        },
        None => match config.budgets.on_missing_max_tokens {
            MissingMaxTokens::Reject => return Err(ProxyError::OutputLimitRequired(field)),
            MissingMaxTokens::ReserveDefault => {
                let n = config.budgets.default_reserve_output_tokens;
                (Output::Fixed(cap.map_or(n, |c| n.min(c))), false)
            }
            // Never everything the budget affords: one request would hold the whole
            // budget and every concurrent one would be refused.
            MissingMaxTokens::Clamp => (
                Output::Clamp {
                    ceiling: cap.unwrap_or(config.budgets.default_reserve_output_tokens),
                },
                true,
            ),
        },
    };
    let ask = (!policy.limits.is_empty()).then_some(Ask {
        input,
        output,
        choices: req.fields.choices(),
        nanos_per_output_token: output_price,
    });
    // Without budgets only a cap applies: the body then gets the cap (see `rewrite`).
    // A body the limit cannot be written into (its fields could be read, but it is not
    // an object a full parse accepts: a lone surrogate, a string that is not UTF-8) is
    // refused here, before anything is reserved, and never sent on without the limit
    // its reservation or cap assumes: a lenient upstream would generate without end.
    let rewrite = if write {
        let keys = body_keys(req, field).ok_or(ProxyError::Unreadable)?;
        Some((field, keys))
    } else {
        None
    };
    Ok(Plan { ask, rewrite })
}

pub async fn admit(
    stores: Stores<'_>,
    policy: &Policy,
    config: &Config,
    req: Request<'_>,
) -> Result<Admitted, ProxyError> {
    if let Some(models) = &policy.models {
        if !models.iter().any(|m| glob_match(m, req.model)) {
            return Err(ProxyError::ModelNotAllowed(req.model.to_owned()));
        }
    }
    if let Some(redis) = stores.redis {
        // Every agent asks Redis: pauses and stopped runs are shared there.
        return admit_shared(redis, policy, config, req).await;
    }

    let slot = match policy.max_concurrent {
        None => None,
        Some(max) => Some(
            stores
                .guards
                .enter(req.agent, max)
                .ok_or_else(|| too_many_in_flight(req.agent, max))?,
        ),
    };
    if let Some(rpm) = policy.requests_per_minute {
        stores
            .guards
            .check_rate(req.agent, rpm)
            .map_err(|wait| too_many_per_minute(req.agent, rpm, wait))?;
    }
    let Plan {
        ask,
        rewrite: splice,
    } = plan(policy, config, &req)?;
    let (hold, output, remaining) = match ask {
        None => (None, None, Remaining::default()),
        Some(ask) => {
            let (reservation, grant) = stores
                .ledger
                .admit(&policy.limits, policy.budgets, &ask)
                .map_err(|e| refused(e, stores.ledger.now()))?;
            (
                Some(Hold::Local(reservation)),
                Some(grant.output),
                grant.remaining,
            )
        }
    };
    Ok(Admitted {
        hold,
        body: rewrite(&req, splice, output, policy),
        remaining,
        slot,
    })
}

/// The body's keys for setting `field`: noted by the first read of the body where it
/// could, read now otherwise; `None` for a body the limit cannot be written into.
fn body_keys(req: &Request<'_>, field: &str) -> Option<ObjectKeys> {
    req.fields
        .keys
        .and_then(|keys| keys.get(field))
        .or_else(|| ObjectKeys::read(req.body, field))
}

/// The body with its output limit set to `output` (or the cap), if admission changed it.
fn rewrite(
    req: &Request<'_>,
    plan: Option<(&'static str, ObjectKeys)>,
    output: Option<u64>,
    policy: &Policy,
) -> Option<Bytes> {
    let (field, keys) = plan?;
    let n = output.or(policy.max_tokens_cap)?;
    set_json_field_in(req.body, field, serde_json::Value::from(n), keys)
}

/// Admission against limits kept in Redis: in-flight, rate and budgets in one script.
async fn admit_shared(
    redis: &Arc<RedisLedger>,
    policy: &Policy,
    config: &Config,
    req: Request<'_>,
) -> Result<Admitted, ProxyError> {
    let Plan {
        ask,
        rewrite: splice,
    } = plan(policy, config, &req)?;
    let decided = redis
        .admit(Admission {
            agent: req.agent,
            tag: &policy.tag,
            limits: &policy.limits,
            budgets: policy.budgets,
            ask,
            requests_per_minute: policy.requests_per_minute,
            max_in_flight: policy.max_concurrent,
            run: Some(req.run),
        })
        .await;
    let limited = !policy.limits.is_empty()
        || policy.requests_per_minute.is_some()
        || policy.max_concurrent.is_some();
    let (hold, grant) = match decided {
        Ok(decided) => decided,
        Err(Refusal::InFlight) => {
            return Err(too_many_in_flight(
                req.agent,
                policy.max_concurrent.unwrap_or(0),
            ))
        }
        Err(Refusal::Rate { retry_after_ms }) => {
            return Err(too_many_per_minute(
                req.agent,
                policy.requests_per_minute.unwrap_or(0),
                retry_after_ms.div_ceil(1000),
            ))
        }
        Err(Refusal::Exhausted(e)) => return Err(refused(e, redis.calendar().now())),
        Err(Refusal::Unavailable(e)) if limited => {
            tracing::error!(error = %e, agent = req.agent, "budget store unavailable; refusing");
            return Err(ProxyError::StoreUnavailable);
        }
        Err(Refusal::Unavailable(e)) => {
            // Nothing of this agent's is kept in Redis but shared pauses and stops; this
            // replica's own still apply.
            tracing::warn!(error = %e, agent = req.agent, "Redis unavailable; pauses and stops of other replicas unknown");
            (None, None)
        }
        Err(Refusal::Paused { all }) => {
            return Err(ProxyError::Paused {
                agent: req.agent.to_owned(),
                all,
            })
        }
        Err(Refusal::Stopped(why)) => {
            let crossed = serde_json::from_str(&why).unwrap_or_else(|_| Crossed {
                condition: Condition::Admin,
                message: format!("run {} of agent {} was stopped", req.run, req.agent),
            });
            return Err(ProxyError::RunStopped(Box::new(crossed)));
        }
    };
    let output = grant.map(|g| g.output);
    Ok(Admitted {
        hold: hold.map(Hold::Remote),
        body: rewrite(&req, splice, output, policy),
        remaining: grant.map(|g| g.remaining).unwrap_or_default(),
        slot: None,
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
