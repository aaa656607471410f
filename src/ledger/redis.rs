//! Budgets, rate limits and requests in flight shared by several replicas through Redis.
//!
//! Admission is one Lua script: it releases holds whose replica died, checks the agent's
//! requests in flight and its requests per minute (GCRA), clamps the output limit to what
//! the budgets afford, checks the worst case against every budget, and reserves it, all
//! or nothing, atomically on the server. Settlement is a second script, run by one
//! worker task off the request path: it swaps the hold for the real spend, once (a
//! marker makes a retried settlement a no-op).
//!
//! Every key of an agent carries one hash tag (its team's id, or its own when it has no
//! team), so both scripts touch a single slot of a Redis Cluster. A hold expires on its
//! own after the longest a request may take, so a replica killed mid-stream leaks
//! nothing for long. Spend is placed in the calendar window current when it settles,
//! keyed by the window's start, so periods roll over without a sweep; window keys expire
//! an hour after their window ends.
//!
//! When Redis cannot be reached the caller fails closed: admission errors, no request of
//! a limited agent goes out, and the connection manager reconnects on the next call.

use crate::secret::Secret;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{
    Account, Amount, Ask, BudgetKey, Calendar, Exhausted, Grant, Limit, Output, Remaining, Unit,
};

/// Settlements run at once by the worker.
const SETTLE_CONCURRENCY: usize = 32;
/// How long a settlement's marker lives: longer than any retry of it.
const SETTLED_MARKER_SECONDS: u64 = 600;
/// Window keys outlive their window by this much, for the admin API and metrics.
const WINDOW_GRACE_SECONDS: i64 = 3600;

const ADMIT: &str = r#"
-- KEYS: 1 holds (zset id -> expiry ms), 2 hold data (hash id -> "tokens nanos key..."),
--       3 the agent's requests in flight (zset), 4 its GCRA time, 5 stopped runs (hash
--       "agent\nrun" -> why), 6 pauses (hash agent or "*" -> 1), 7.. budget windows
-- ARGV: 1 id, 2 hold ms, 3 max in flight (0: none), 4 requests per minute (0: none),
--       5 input tokens, 6 input nanos, 7 clamp (0|1), 8 output or clamp ceiling,
--       9 choices, 10 nanos per output token, 11 budgets among the windows,
--       12 agent, 13 the run's field in KEYS[5] ("": none),
--       then per window: max tokens, max nanos (-1: none), ttl seconds (0: none)
local function int(x) return string.format('%d', x) end
local function release(data)
  local it = string.gmatch(data, '%S+')
  local tokens, nanos = tonumber(it()), tonumber(it())
  for key in it do
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'rt', int(-tokens))
      redis.call('HINCRBY', key, 'rn', int(-nanos))
    end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = tonumber(ARGV[2])

-- Holds of requests whose replica died: released when they expire.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 64)) do
  local data = redis.call('HGET', KEYS[2], id)
  if data then release(data) end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)

-- Kill switches and stopped runs, shared by every replica.
if redis.call('HEXISTS', KEYS[6], '*') == 1 then return {5, 1} end
if redis.call('HEXISTS', KEYS[6], ARGV[12]) == 1 then return {5, 0} end
if ARGV[13] ~= '' then
  local why = redis.call('HGET', KEYS[5], ARGV[13])
  if why then return {4, why} end
end

local max_in_flight = tonumber(ARGV[3])
if max_in_flight > 0 and redis.call('ZCARD', KEYS[3]) >= max_in_flight then
  return {1}
end
local rpm = tonumber(ARGV[4])
local tat = now
if rpm > 0 then
  local emission = 60000 / rpm
  tat = math.max(tonumber(redis.call('GET', KEYS[4]) or now), now) + emission
  local allowed_at = tat - 60000
  if now < allowed_at then return {2, math.ceil(allowed_at - now)} end
end

local windows = #KEYS - 6
local input_t, input_n = tonumber(ARGV[5]), tonumber(ARGV[6])
local out, choices, price = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local budgets = tonumber(ARGV[11])
local max_t, max_n, ttl, spent_t, spent_n, used_t, used_n = {}, {}, {}, {}, {}, {}, {}
for i = 1, windows do
  local a = 13 + (i - 1) * 3
  max_t[i], max_n[i], ttl[i] = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local v = redis.call('HMGET', KEYS[6 + i], 'st', 'sn', 'rt', 'rn')
  spent_t[i], spent_n[i] = tonumber(v[1] or 0), tonumber(v[2] or 0)
  used_t[i] = spent_t[i] + tonumber(v[3] or 0)
  used_n[i] = spent_n[i] + tonumber(v[4] or 0)
end
if ARGV[7] == '1' then
  local afford = math.huge
  for i = 1, windows do
    if max_t[i] >= 0 then
      afford = math.min(afford, math.max(max_t[i] - used_t[i] - input_t, 0))
    end
    if max_n[i] >= 0 and price > 0 then
      afford = math.min(afford, math.floor(math.max(max_n[i] - used_n[i] - input_n, 0) / price))
    end
  end
  out = math.max(math.min(math.floor(afford / choices), out), 1)
end
local worst_t = input_t + out * choices
local worst_n = input_n + math.ceil(out * choices * price)
for i = 1, windows do
  if max_n[i] >= 0 and worst_n > math.max(max_n[i] - used_n[i], 0) then
    return {3, i, 0, worst_n, math.max(max_n[i] - used_n[i], 0)}
  end
  if max_t[i] >= 0 and worst_t > math.max(max_t[i] - used_t[i], 0) then
    return {3, i, 1, worst_t, math.max(max_t[i] - used_t[i], 0)}
  end
end

if rpm > 0 then
  redis.call('SET', KEYS[4], string.format('%.3f', tat), 'PX', int(math.ceil(tat - now)))
end
if max_in_flight > 0 then
  redis.call('ZADD', KEYS[3], now + hold, ARGV[1])
end
if windows > 0 then
  local data = {int(worst_t), int(worst_n)}
  for i = 1, windows do
    local key = KEYS[6 + i]
    redis.call('HINCRBY', key, 'rt', int(worst_t))
    redis.call('HINCRBY', key, 'rn', int(worst_n))
    if ttl[i] > 0 then redis.call('EXPIRE', key, ttl[i]) end
    data[#data + 1] = key
  end
  redis.call('ZADD', KEYS[1], now + hold, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], table.concat(data, ' '))
end
local rem_t, rem_n = -1, -1
for i = 1, budgets do
  if max_t[i] >= 0 then
    local left = math.max(max_t[i] - spent_t[i], 0)
    if rem_t < 0 or left < rem_t then rem_t = left end
  end
  if max_n[i] >= 0 then
    local left = math.max(max_n[i] - spent_n[i], 0)
    if rem_n < 0 or left < rem_n then rem_n = left end
  end
end
return {0, out, worst_t, worst_n, rem_t, rem_n}
"#;

const SETTLE: &str = r#"
-- KEYS: 1 holds, 2 hold data, 3 the agent's requests in flight, 4 this settlement's
--       marker, 5.. the budget windows to charge
-- ARGV: 1 id, 2 tokens, 3 nanos, 4 marker seconds, then per window a ttl (0: none)
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[4]) then return 0 end
local function int(x) return string.format('%d', x) end
local data = redis.call('HGET', KEYS[2], ARGV[1])
if data then
  local it = string.gmatch(data, '%S+')
  local tokens, nanos = tonumber(it()), tonumber(it())
  for key in it do
    if redis.call('EXISTS', key) == 1 then
      redis.call('HINCRBY', key, 'rt', int(-tokens))
      redis.call('HINCRBY', key, 'rn', int(-nanos))
    end
  end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREM', KEYS[3], ARGV[1])
for i = 5, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'st', ARGV[2])
  redis.call('HINCRBY', KEYS[i], 'sn', ARGV[3])
  local ttl = tonumber(ARGV[i])
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
return 1
"#;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub password: Option<Secret<String>>,
    /// Longest wait for one answer (or a connection) before failing closed.
    pub timeout: Duration,
    /// How long a hold outlives its request's admission at most: the longest a request
    /// may take, plus a margin for its settlement.
    pub hold: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis answered {0}, which the admission script never returns")]
    Unexpected(String),
}

/// Why admission refused a request.
#[derive(Debug)]
pub enum Refusal {
    /// The agent has its maximum of requests in flight.
    InFlight,
    /// Over the requests per minute; one more is allowed after this many milliseconds.
    Rate {
        retry_after_ms: u64,
    },
    Exhausted(Exhausted),
    /// Redis could not be asked: fail closed.
    Unavailable(RedisError),
    /// An admin paused the agent (`all`: every agent) on some replica.
    Paused {
        all: bool,
    },
    /// The run was stopped on some replica; why, as that replica wrote it (JSON of a
    /// [`Crossed`](crate::guard::runs::Crossed)).
    Stopped(String),
}

/// One admission to decide.
pub struct Admission<'a> {
    pub agent: &'a str,
    /// The hash tag of every key of the agent: its team, or itself.
    pub tag: &'a str,
    /// Budgets first, then any per-minute limit.
    pub limits: &'a [Limit],
    /// How many of `limits` are budgets (for what is left).
    pub budgets: usize,
    /// What to reserve against `limits`; `None` reserves nothing (rate limits only).
    pub ask: Option<Ask>,
    pub requests_per_minute: Option<u32>,
    pub max_in_flight: Option<u32>,
    /// The request's run, checked against the runs stopped on any replica.
    pub run: Option<&'a str>,
}

/// What the worker writes to Redis, off the request path.
enum Job {
    Settle(Settle),
    /// A run stopped (`Some`: why, JSON) or resumed (`None`).
    Run {
        prefix: String,
        field: String,
        why: Option<String>,
    },
    /// A pause (`true`) or resume of `who` (an agent, or `*` for all) under each prefix.
    Pause {
        prefixes: Vec<String>,
        who: String,
        paused: bool,
    },
}

/// The field of a run in its tag's hash of stopped runs.
fn run_field(agent: &str, run: &str) -> String {
    format!("{agent}\n{run}")
}

/// A settlement for the worker.
struct Settle {
    prefix: Arc<str>,
    id: String,
    agent: Arc<str>,
    keys: Vec<BudgetKey>,
    actual: Amount,
}

pub struct RedisLedger {
    conn: ConnectionManager,
    calendar: Calendar,
    timeout: Duration,
    hold: Duration,
    admit: Script,
    settle: Script,
    /// Taken at close, so the worker ends when the last hold is gone.
    jobs: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The prefix of every key of one hash tag.
fn prefix(tag: &str) -> String {
    format!("tw:{{{tag}}}:")
}

fn window_key(prefix: &str, key: &BudgetKey, window: i64) -> String {
    format!(
        "{prefix}budget:{}:{}:{}:{window}",
        key.scope.as_str(),
        key.id,
        key.period.as_str()
    )
}

impl RedisLedger {
    /// Sets up the connection (lazily: a Redis that is down at start is retried on the
    /// first request) and the settlement worker. Must run inside the tokio runtime.
    pub fn connect(
        settings: &RedisSettings,
        calendar: Calendar,
    ) -> Result<Arc<RedisLedger>, RedisError> {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())?;
        if let Some(password) = &settings.password {
            let redis_info = info
                .redis_settings()
                .clone()
                .set_password(password.expose().clone());
            info = info.set_redis_settings(redis_info);
        }
        let client = redis::Client::open(info)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let ledger = Arc::new(RedisLedger {
            conn,
            calendar,
            timeout: settings.timeout,
            hold: settings.hold,
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            jobs: Mutex::new(Some(tx)),
            worker: Mutex::new(None),
        });
        let worker = tokio::spawn(settle_worker(ledger.clone(), rx));
        *lock(&ledger.worker) = Some(worker);
        Ok(ledger)
    }

    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// Decides one admission; on success the hold must be settled or dropped.
    pub async fn admit(
        self: &Arc<Self>,
        a: Admission<'_>,
    ) -> Result<(Option<RemoteHold>, Option<Grant>), Refusal> {
        let prefix: Arc<str> = prefix(a.tag).into();
        let id = format!("{:032x}", rand::random::<u128>());
        let now = self.calendar.now();
        let mut windows = Vec::with_capacity(a.limits.len());
        let reserved: &[Limit] = if a.ask.is_some() { a.limits } else { &[] };
        let mut script = self.admit.prepare_invoke();
        script
            .key(format!("{prefix}holds"))
            .key(format!("{prefix}hold-data"))
            .key(format!("{prefix}in-flight:{}", a.agent))
            .key(format!("{prefix}rate:{}", a.agent))
            .key(format!("{prefix}stopped-runs"))
            .key(format!("{prefix}paused"));
        for limit in reserved {
            let (start, end) = self.calendar.window(limit.key.period, now);
            windows.push(end);
            script.key(window_key(&prefix, &limit.key, start));
        }
        let ask = a.ask.unwrap_or(Ask {
            input: Amount::default(),
            output: Output::Fixed(0),
            choices: 1,
            nanos_per_output_token: 0.0,
        });
        let (clamp, output) = match ask.output {
            Output::Fixed(n) => (0, n),
            Output::Clamp { ceiling } => (1, ceiling),
        };
        script
            .arg(&id)
            .arg(self.hold.as_millis() as u64)
            .arg(a.max_in_flight.unwrap_or(0))
            .arg(a.requests_per_minute.unwrap_or(0))
            .arg(ask.input.tokens)
            .arg(ask.input.nanos)
            .arg(clamp)
            .arg(output)
            .arg(ask.choices.max(1))
            .arg(ask.nanos_per_output_token.max(0.0))
            .arg(a.budgets.min(reserved.len()))
            .arg(a.agent)
            .arg(a.run.map(|run| run_field(a.agent, run)).unwrap_or_default());
        let none = |v: Option<u64>| v.map_or(-1, |n| n.min(i64::MAX as u64) as i64);
        for (limit, end) in reserved.iter().zip(&windows) {
            let ttl = end.map_or(0, |end| {
                (end - now.as_second() + WINDOW_GRACE_SECONDS).max(1)
            });
            script
                .arg(none(limit.tokens))
                .arg(none(limit.nanos))
                .arg(ttl);
        }
        let mut conn = self.conn.clone();
        let answer: Vec<i64> =
            match tokio::time::timeout(self.timeout, script.invoke_async(&mut conn)).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(e)) => return Err(Refusal::Unavailable(e.into())),
                Err(_) => return Err(Refusal::Unavailable(RedisError::Timeout(self.timeout))),
            };
        let unsigned = |i: usize| answer.get(i).map(|&v| v.max(0) as u64).unwrap_or(0);
        let optional = |i: usize| answer.get(i).and_then(|&v| u64::try_from(v).ok());
        match answer.first() {
            Some(0) => {
                let hold = RemoteHold {
                    ledger: self.clone(),
                    prefix,
                    id,
                    agent: a.agent.into(),
                    keys: reserved.iter().map(|l| l.key.clone()).collect(),
                    done: false,
                };
                let grant = a.ask.map(|_| Grant {
                    output: unsigned(1),
                    worst: Amount {
                        tokens: unsigned(2),
                        nanos: unsigned(3),
                    },
                    remaining: Remaining {
                        tokens: optional(4),
                        nanos: optional(5),
                    },
                });
                Ok((Some(hold), grant))
            }
            Some(1) => Err(Refusal::InFlight),
            Some(2) => Err(Refusal::Rate {
                retry_after_ms: unsigned(1),
            }),
            Some(3) => {
                let index = (unsigned(1) as usize).saturating_sub(1);
                let (Some(limit), Some(end)) = (reserved.get(index), windows.get(index)) else {
                    return Err(Refusal::Unavailable(RedisError::Unexpected(format!(
                        "{answer:?}"
                    ))));
                };
                Err(Refusal::Exhausted(Exhausted {
                    key: limit.key.clone(),
                    unit: if unsigned(2) == 0 {
                        Unit::Usd
                    } else {
                        Unit::Tokens
                    },
                    needed: unsigned(3),
                    available: unsigned(4),
                    resets_at: *end,
                }))
            }
            Some(5) => Err(Refusal::Paused {
                all: unsigned(1) == 1,
            }),
            _ => Err(Refusal::Unavailable(RedisError::Unexpected(format!(
                "{answer:?}"
            )))),
        }
    }

    /// Shares a run's stop (`why`: JSON of its `Crossed`) or resume (`None`) with every
    /// replica. Queued: written off the request path, retried until Redis takes it.
    pub fn share_run(&self, tag: &str, agent: &str, run: &str, why: Option<String>) {
        self.queue(Job::Run {
            prefix: prefix(tag),
            field: run_field(agent, run),
            why,
        });
    }

    /// Shares a pause or resume of `who` (an agent, or `*` for every agent) under each of
    /// `tags` with every replica.
    pub fn share_pause(&self, tags: &[String], who: &str, paused: bool) {
        self.queue(Job::Pause {
            prefixes: tags.iter().map(|t| prefix(t)).collect(),
            who: who.to_owned(),
            paused,
        });
    }

    /// Every limit's account in its current window, for metrics and the admin API.
    pub async fn accounts(
        &self,
        limits: &[Limit],
        tags: &[String],
    ) -> Result<Vec<(BudgetKey, Account)>, RedisError> {
        let now = self.calendar.now();
        let mut pipe = redis::pipe();
        let mut starts = Vec::with_capacity(limits.len());
        for (limit, tag) in limits.iter().zip(tags) {
            let (start, _) = self.calendar.window(limit.key.period, now);
            starts.push(start);
            pipe.cmd("HMGET")
                .arg(window_key(&prefix(tag), &limit.key, start))
                .arg(&["st", "sn", "rt", "rn"]);
        }
        let mut conn = self.conn.clone();
        let rows: Vec<Vec<Option<i64>>> =
            match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
                Ok(rows) => rows?,
                Err(_) => return Err(RedisError::Timeout(self.timeout)),
            };
        let field = |row: &[Option<i64>], i: usize| {
            row.get(i).copied().flatten().unwrap_or(0).max(0) as u64
        };
        Ok(limits
            .iter()
            .zip(starts)
            .zip(rows)
            .map(|((limit, window), row)| {
                let account = Account {
                    window,
                    spent: Amount {
                        tokens: field(&row, 0),
                        nanos: field(&row, 1),
                    },
                    reserved: Amount {
                        tokens: field(&row, 2),
                        nanos: field(&row, 3),
                    },
                };
                (limit.key.clone(), account)
            })
            .collect())
    }

    /// Stops taking settlements and waits up to `deadline` for the queued ones.
    pub async fn close(&self, deadline: Duration) {
        lock(&self.jobs).take();
        let worker = lock(&self.worker).take();
        if let Some(mut worker) = worker {
            if tokio::time::timeout(deadline, &mut worker).await.is_err() {
                tracing::error!(
                    "settlements still not written to Redis at shutdown; the audit log holds them"
                );
                worker.abort();
            }
        }
    }

    fn queue(&self, job: Job) {
        match lock(&self.jobs).as_ref() {
            Some(tx) if tx.send(job).is_ok() => {}
            _ => tracing::error!("a write to Redis came after shutdown; it is lost there"),
        }
    }

    /// Runs one job until Redis takes it.
    async fn run_job(&self, job: Job) {
        let mut pipe = redis::pipe();
        match job {
            Job::Settle(settle) => return self.settle_one(settle).await,
            Job::Run { prefix, field, why } => {
                let key = format!("{prefix}stopped-runs");
                match why {
                    Some(why) => pipe.hset(key, field, why).ignore(),
                    None => pipe.hdel(key, field).ignore(),
                };
            }
            Job::Pause {
                prefixes,
                who,
                paused,
            } => {
                for prefix in prefixes {
                    let key = format!("{prefix}paused");
                    if paused {
                        pipe.hset(key, &who, 1).ignore();
                    } else {
                        pipe.hdel(key, &who).ignore();
                    }
                }
            }
        }
        let mut delay = Duration::from_millis(50);
        loop {
            let mut conn = self.conn.clone();
            match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot share a stop or pause in Redis; retrying")
                }
                Err(_) => tracing::warn!("Redis did not answer; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// Runs one settlement until Redis takes it (the marker makes a repeat harmless).
    async fn settle_one(&self, s: Settle) {
        let now = self.calendar.now();
        let mut delay = Duration::from_millis(50);
        loop {
            let mut script = self.settle.prepare_invoke();
            script
                .key(format!("{}holds", s.prefix))
                .key(format!("{}hold-data", s.prefix))
                .key(format!("{}in-flight:{}", s.prefix, s.agent))
                .key(format!("{}settled:{}", s.prefix, s.id))
                .arg(&s.id)
                .arg(s.actual.tokens)
                .arg(s.actual.nanos)
                .arg(SETTLED_MARKER_SECONDS);
            if s.actual != Amount::default() {
                for key in &s.keys {
                    let (start, end) = self.calendar.window(key.period, now);
                    let ttl = end.map_or(0, |end| {
                        (end - now.as_second() + WINDOW_GRACE_SECONDS).max(1)
                    });
                    script.key(window_key(&s.prefix, key, start)).arg(ttl);
                }
            }
            let mut conn = self.conn.clone();
            match tokio::time::timeout(self.timeout, script.invoke_async::<i64>(&mut conn)).await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot settle in Redis; retrying"),
                Err(_) => tracing::warn!("Redis did not answer a settlement; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// Runs writes as they come, a bounded number at once, until every sender is gone.
async fn settle_worker(ledger: Arc<RedisLedger>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut running = JoinSet::new();
    while let Some(job) = rx.recv().await {
        while running.len() >= SETTLE_CONCURRENCY {
            running.join_next().await;
        }
        let ledger = ledger.clone();
        running.spawn(async move { ledger.run_job(job).await });
    }
    while running.join_next().await.is_some() {}
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Handles only: no invariant a panic could break.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A request's hold in Redis: its reservation and its place among the agent's requests
/// in flight. Settling queues the swap for the real spend; dropping it unsettled queues
/// its release. (The queue is unbounded in type but not in fact: it holds at most one
/// entry per admitted request, and admission is bounded by the listener's limits.)
pub struct RemoteHold {
    ledger: Arc<RedisLedger>,
    prefix: Arc<str>,
    id: String,
    agent: Arc<str>,
    keys: Vec<BudgetKey>,
    done: bool,
}

impl std::fmt::Debug for RemoteHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteHold")
            .field("id", &self.id)
            .field("keys", &self.keys)
            .finish()
    }
}

impl RemoteHold {
    pub fn settle(mut self, actual: Amount) {
        self.done = true;
        self.send(actual);
    }

    fn send(&mut self, actual: Amount) {
        self.ledger.queue(Job::Settle(Settle {
            prefix: self.prefix.clone(),
            id: std::mem::take(&mut self.id),
            agent: self.agent.clone(),
            keys: std::mem::take(&mut self.keys),
            actual,
        }));
    }
}

impl Drop for RemoteHold {
    fn drop(&mut self) {
        if !self.done {
            self.send(Amount::default());
        }
    }
}
