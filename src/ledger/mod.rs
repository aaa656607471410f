//! Budgets that never overshoot: reserve the worst case before a request goes out,
//! settle the real cost when it ends.
//!
//! Every budget that covers a request (the agent's and its team's, each period) is
//! checked and reserved in one step under one lock, so concurrent requests cannot
//! together pass a limit. A [`Reservation`] is released when it is settled or dropped,
//! so no way a request ends can leak one. Money is kept in integer nano-dollars.

pub mod period;
pub mod redis;
pub mod snapshot;

use std::sync::{Arc, Mutex};

// Keyed by budgets from the config: a fast hash, seeded per process.
use hashbrown::HashMap;
use jiff::tz::TimeZone;
use jiff::Timestamp;

pub use period::Period;

/// Nano-dollars per dollar: money is counted in integers.
pub const NANOS_PER_USD: f64 = 1e9;

pub fn usd_to_nanos(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS_PER_USD).round() as u64
    } else {
        0
    }
}

pub fn nanos_to_usd(nanos: u64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Agent,
    Team,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Agent => "agent",
            Scope::Team => "team",
        }
    }
}

/// One budget: whose, over which period.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetKey {
    pub scope: Scope,
    pub id: Arc<str>,
    pub period: Period,
}

impl std::fmt::Display for BudgetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} budget",
            self.scope.as_str(),
            self.id,
            self.period.as_str()
        )
    }
}

/// A budget's limits; either or both units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub key: BudgetKey,
    pub nanos: Option<u64>,
    pub tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Usd,
    Tokens,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Usd => "usd",
            Unit::Tokens => "tokens",
        }
    }
}

/// An amount of spend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub tokens: u64,
    pub nanos: u64,
}

/// Why a reservation was refused: the first budget it did not fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhausted {
    pub key: BudgetKey,
    pub unit: Unit,
    /// What the request needed at worst, and what was left (after other reservations).
    pub needed: u64,
    pub available: u64,
    /// Unix seconds when the budget's period starts anew; `None` for `total`.
    pub resets_at: Option<i64>,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |n: u64| match self.unit {
            Unit::Usd => format!("${:.6}", nanos_to_usd(n)),
            Unit::Tokens => format!("{n} tokens"),
        };
        write!(
            f,
            "{} exhausted: this request may cost up to {}, {} is available",
            self.key,
            show(self.needed),
            show(self.available)
        )?;
        match self.resets_at.and_then(|s| Timestamp::from_second(s).ok()) {
            Some(at) => write!(f, "; it resets at {at}"),
            None => write!(f, "; it does not reset"),
        }
    }
}

/// The state of one budget in its current window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Account {
    /// Start of the window the spend belongs to (Unix seconds).
    pub window: i64,
    pub spent: Amount,
    pub reserved: Amount,
}

/// How a request's output is bounded when it is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The request's own limit (or the cap it was clamped to).
    Fixed(u64),
    /// No limit was sent: take what every budget still affords, at most `ceiling`, so
    /// that one call cannot overrun and cannot hold the whole budget either.
    Clamp { ceiling: u64 },
}

/// What a request asks of its budgets.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    /// The bound of its input: tokens, and their price.
    pub input: Amount,
    pub output: Output,
    /// Completions asked for (`n`, `best_of`): each may use the whole output limit.
    pub choices: u64,
    pub nanos_per_output_token: f64,
}

impl Ask {
    /// The worst case with `output` tokens per choice.
    pub fn worst(&self, output: u64) -> Amount {
        let all = output.saturating_mul(self.choices.max(1));
        Amount {
            tokens: self.input.tokens.saturating_add(all),
            nanos: self
                .input
                .nanos
                .saturating_add((all as f64 * self.nanos_per_output_token).ceil() as u64),
        }
    }

    /// The output limit to send: the request's own, or the clamp given what each budget
    /// has left (`left` yields, per limit, the tokens and nano-dollars not yet spent or
    /// reserved, `None` for a unit it does not bound). Never zero: a request that cannot
    /// afford one token is refused by the check that follows.
    pub fn output_limit(&self, left: impl Iterator<Item = (Option<u64>, Option<u64>)>) -> u64 {
        let ceiling = match self.output {
            Output::Fixed(n) => return n,
            Output::Clamp { ceiling } => ceiling,
        };
        let mut affordable = u64::MAX;
        for (tokens, nanos) in left {
            if let Some(t) = tokens {
                affordable = affordable.min(t.saturating_sub(self.input.tokens));
            }
            if let (Some(n), true) = (nanos, self.nanos_per_output_token > 0.0) {
                let n = n.saturating_sub(self.input.nanos) as f64;
                affordable = affordable.min((n / self.nanos_per_output_token).floor() as u64);
            }
        }
        (affordable / self.choices.max(1)).min(ceiling).max(1)
    }
}

/// What admission granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The output limit per choice.
    pub output: u64,
    pub worst: Amount,
    /// What the tightest budget of each unit has left, counting settled spend only.
    pub remaining: Remaining,
}

/// Nano-dollars and tokens left, `None` for a unit no budget bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Remaining {
    pub nanos: Option<u64>,
    pub tokens: Option<u64>,
}

impl Remaining {
    /// Folds in one budget's limits and settled spend.
    pub fn include(&mut self, limit: &Limit, spent: Amount) {
        let least = |cur: Option<u64>, left: u64| Some(cur.map_or(left, |c| c.min(left)));
        if let Some(max) = limit.nanos {
            self.nanos = least(self.nanos, max.saturating_sub(spent.nanos));
        }
        if let Some(max) = limit.tokens {
            self.tokens = least(self.tokens, max.saturating_sub(spent.tokens));
        }
    }
}

/// The first of `limits` that `worst` does not fit, given what each has used (spent
/// and reserved) and when its window ends.
pub fn first_exceeded(
    limits: &[Limit],
    used: impl Iterator<Item = (Amount, Option<i64>)>,
    worst: Amount,
) -> Option<Exhausted> {
    for (limit, (used, resets_at)) in limits.iter().zip(used) {
        let checks = [
            (Unit::Usd, limit.nanos, used.nanos, worst.nanos),
            (Unit::Tokens, limit.tokens, used.tokens, worst.tokens),
        ];
        for (unit, max, used, needed) in checks {
            let Some(max) = max else { continue };
            let available = max.saturating_sub(used);
            if needed > available {
                return Some(Exhausted {
                    key: limit.key.clone(),
                    unit,
                    needed,
                    available,
                    resets_at,
                });
            }
        }
    }
    None
}

/// What time it is; injectable so that period rollover can be tested.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// The clock and time zone that place spend in periods.
pub struct Calendar {
    clock: Arc<dyn Clock>,
    tz: TimeZone,
    /// The current window of each period, computed once and reused until it ends: the
    /// calendar arithmetic costs microseconds, a request needs it several times.
    windows: Mutex<[Option<Window>; PERIODS]>,
}

/// A period's window: its start and, unless it never ends, its end (Unix seconds).
pub type Window = (i64, Option<i64>);

impl Calendar {
    pub fn new(tz: TimeZone, clock: Arc<dyn Clock>) -> Calendar {
        Calendar {
            clock,
            tz,
            windows: Mutex::new([None; PERIODS]),
        }
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    /// The window of `period` containing `now`, from the cache while it lasts.
    pub fn window(&self, period: Period, now: Timestamp) -> Window {
        let mut cache = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        cached_window(&mut cache, period, now, &self.tz)
    }
}

pub struct Ledger {
    accounts: Mutex<HashMap<BudgetKey, Account>>,
    calendar: Calendar,
}

pub(crate) const PERIODS: usize = Period::ALL.len();

/// The window of `period` containing `now`, from `cache` while it lasts, else computed
/// and cached.
pub(crate) fn cached_window(
    cache: &mut [Option<Window>; PERIODS],
    period: Period,
    now: Timestamp,
    tz: &TimeZone,
) -> Window {
    let slot = &mut cache[period.index()];
    let second = now.as_second();
    if let Some((start, end)) = *slot {
        if second >= start && end.is_none_or(|end| second < end) {
            return (start, end);
        }
    }
    let fresh = period.window(now, tz);
    *slot = Some(fresh);
    fresh
}

impl Ledger {
    pub fn new(tz: TimeZone, clock: Arc<dyn Clock>) -> Arc<Ledger> {
        Arc::new(Ledger {
            accounts: Mutex::new(HashMap::new()),
            calendar: Calendar::new(tz, clock),
        })
    }

    /// The ledger's clock.
    pub fn now(&self) -> Timestamp {
        self.calendar.now()
    }

    fn window(&self, period: Period, now: Timestamp) -> Window {
        self.calendar.window(period, now)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BudgetKey, Account>> {
        // Every update below leaves the map consistent before it can panic.
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The account of `key` in the window containing `now`, rolled over if its window
    /// has passed (spend starts at zero; reservations in flight stay).
    fn account<'a>(
        accounts: &'a mut HashMap<BudgetKey, Account>,
        key: &BudgetKey,
        window: i64,
    ) -> &'a mut Account {
        let account = accounts.entry(key.clone()).or_default();
        if account.window != window {
            account.window = window;
            account.spent = Amount::default();
        }
        account
    }

    /// Reserves `worst` against every limit, or none of them.
    pub fn reserve(
        self: &Arc<Self>,
        limits: &[Limit],
        worst: Amount,
    ) -> Result<Reservation, Exhausted> {
        let ask = Ask {
            input: worst,
            output: Output::Fixed(0),
            choices: 1,
            nanos_per_output_token: 0.0,
        };
        self.admit(limits, 0, &ask).map(|(r, _)| r)
    }

    /// Admits a request in one step under one lock: picks its output limit (clamped to
    /// what the budgets afford if it sent none), checks the worst case against every
    /// limit, reserves it against all of them or none, and says what the first
    /// `budgets` limits have left.
    pub fn admit(
        self: &Arc<Self>,
        limits: &[Limit],
        budgets: usize,
        ask: &Ask,
    ) -> Result<(Reservation, Grant), Exhausted> {
        let now = self.calendar.now();
        let mut accounts = self.lock();
        let mut current = Vec::with_capacity(limits.len());
        for limit in limits {
            let (window, resets_at) = self.window(limit.key.period, now);
            let account = *Self::account(&mut accounts, &limit.key, window);
            current.push((account, resets_at));
        }
        let used = |a: &Account| Amount {
            tokens: a.spent.tokens.saturating_add(a.reserved.tokens),
            nanos: a.spent.nanos.saturating_add(a.reserved.nanos),
        };
        let output = ask.output_limit(limits.iter().zip(&current).map(|(l, (a, _))| {
            let used = used(a);
            (
                l.tokens.map(|max| max.saturating_sub(used.tokens)),
                l.nanos.map(|max| max.saturating_sub(used.nanos)),
            )
        }));
        let worst = ask.worst(output);
        let exceeded = first_exceeded(
            limits,
            current.iter().map(|(a, resets_at)| (used(a), *resets_at)),
            worst,
        );
        if let Some(e) = exceeded {
            return Err(e);
        }
        let mut remaining = Remaining::default();
        for (limit, (account, _)) in limits.iter().zip(&current).take(budgets) {
            remaining.include(limit, account.spent);
        }
        for limit in limits {
            if let Some(account) = accounts.get_mut(&limit.key) {
                account.reserved.tokens += worst.tokens;
                account.reserved.nanos += worst.nanos;
            }
        }
        let reservation = Reservation {
            ledger: self.clone(),
            keys: limits.iter().map(|l| l.key.clone()).collect(),
            worst,
            done: false,
        };
        Ok((
            reservation,
            Grant {
                output,
                worst,
                remaining,
            },
        ))
    }

    /// What is left of each unit, for the tightest budget of that unit, counting only
    /// settled spend.
    pub fn remaining(&self, limits: &[Limit]) -> Remaining {
        let now = self.calendar.now();
        let mut accounts = self.lock();
        let mut remaining = Remaining::default();
        for limit in limits {
            let (window, _) = self.window(limit.key.period, now);
            let account = Self::account(&mut accounts, &limit.key, window);
            remaining.include(limit, account.spent);
        }
        remaining
    }

    /// Adds settled spend of the window starting at `window` to `key` (rebuilding the
    /// ledger at start): it counts only if that window is still the current one.
    pub fn restore(&self, key: &BudgetKey, spend: Amount, window: i64) {
        let now = self.calendar.now();
        let mut accounts = self.lock();
        let (current, _) = self.window(key.period, now);
        if window != current {
            return;
        }
        let account = Self::account(&mut accounts, key, current);
        account.spent.tokens += spend.tokens;
        account.spent.nanos += spend.nanos;
    }

    /// Every account in its current window, for metrics and the admin API.
    pub fn accounts(&self) -> Vec<(BudgetKey, Account)> {
        let now = self.calendar.now();
        let mut accounts = self.lock();
        let keys: Vec<BudgetKey> = accounts.keys().cloned().collect();
        let mut out: Vec<(BudgetKey, Account)> = keys
            .into_iter()
            .map(|key| {
                let (window, _) = self.window(key.period, now);
                let account = *Self::account(&mut accounts, &key, window);
                (key, account)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn finish(&self, keys: &[BudgetKey], worst: Amount, actual: Amount) {
        let now = self.calendar.now();
        let mut accounts = self.lock();
        for key in keys {
            let (window, _) = self.window(key.period, now);
            let account = Self::account(&mut accounts, key, window);
            account.reserved.tokens = account.reserved.tokens.saturating_sub(worst.tokens);
            account.reserved.nanos = account.reserved.nanos.saturating_sub(worst.nanos);
            account.spent.tokens += actual.tokens;
            account.spent.nanos += actual.nanos;
        }
    }
}

/// Budget held for one request in flight. Settling swaps it for the real spend;
/// dropping it unsettled releases it.
pub struct Reservation {
    ledger: Arc<Ledger>,
    keys: Vec<BudgetKey>,
    worst: Amount,
    done: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("keys", &self.keys)
            .field("worst", &self.worst)
            .finish()
    }
}

impl Reservation {
    pub fn worst(&self) -> Amount {
        self.worst
    }

    /// Replaces the reservation by the real spend.
    pub fn settle(mut self, actual: Amount) {
        self.done = true;
        self.ledger.finish(&self.keys, self.worst, actual);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.ledger
                .finish(&self.keys, self.worst, Amount::default());
        }
    }
}

/// Budget held for one request in flight, in this process or in Redis.
#[derive(Debug)]
pub enum Hold {
    Local(Reservation),
    Remote(redis::RemoteHold),
}

impl Hold {
    /// Replaces the hold by the real spend (dropping it unsettled releases it).
    pub fn settle(self, actual: Amount) {
        match self {
            Hold::Local(r) => r.settle(actual),
            Hold::Remote(r) => r.settle(actual),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    struct FakeClock(AtomicI64);

    impl Clock for FakeClock {
        fn now(&self) -> Timestamp {
            Timestamp::from_second(self.0.load(Ordering::SeqCst)).unwrap()
        }
    }

    fn key(scope: Scope, id: &str, period: Period) -> BudgetKey {
        BudgetKey {
            scope,
            id: id.into(),
            period,
        }
    }

    fn ledger(at: &str) -> (Arc<Ledger>, Arc<FakeClock>) {
        let t: Timestamp = at.parse().unwrap();
        let clock = Arc::new(FakeClock(AtomicI64::new(t.as_second())));
        (Ledger::new(TimeZone::UTC, clock.clone()), clock)
    }

    fn tokens(n: u64) -> Amount {
        Amount {
            tokens: n,
            nanos: 0,
        }
    }

    #[test]
    fn reservations_never_pass_a_limit_and_settle_to_the_real_spend() {
        let (l, _) = ledger("2026-11-29T10:00:00Z");
        let limits = [Limit {
            key: key(Scope::Agent, "a", Period::Day),
            nanos: None,
            tokens: Some(100),
        }];
        let r1 = l.reserve(&limits, tokens(60)).unwrap();
        let err = l.reserve(&limits, tokens(60)).err().unwrap();
        assert_eq!(
            (err.unit, err.needed, err.available),
            (Unit::Tokens, 60, 40)
        );
        r1.settle(tokens(10));
        let r2 = l.reserve(&limits, tokens(60)).unwrap();
        drop(r2); // released unsettled: costs nothing
        assert_eq!(l.remaining(&limits).tokens, Some(90));
        let acc = l.accounts();
        assert_eq!(acc[0].1.reserved, Amount::default());
        assert_eq!(acc[0].1.spent, tokens(10));
    }

    #[test]
    fn all_or_nothing_across_agent_and_team() {
        let (l, _) = ledger("2026-11-29T10:00:00Z");
        let agent = Limit {
            key: key(Scope::Agent, "a", Period::Day),
            nanos: Some(usd_to_nanos(1.0)),
            tokens: None,
        };
        let team = Limit {
            key: key(Scope::Team, "t", Period::Month),
            nanos: Some(usd_to_nanos(0.5)),
            tokens: None,
        };
        let worst = Amount {
            tokens: 0,
            nanos: usd_to_nanos(0.6),
        };
        let err = l
            .reserve(&[agent.clone(), team.clone()], worst)
            .err()
            .unwrap();
        assert_eq!(err.key.scope, Scope::Team);
        assert!(
            err.to_string().contains("team t month budget exhausted"),
            "{err}"
        );
        assert!(
            err.to_string().contains("resets at 2026-12-01T00:00:00Z"),
            "{err}"
        );
        assert!(
            l.accounts()
                .iter()
                .all(|(_, a)| a.reserved == Amount::default()),
            "nothing held"
        );
    }

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let (l, _) = ledger("2026-11-29T10:00:00Z");
        let limits = [Limit {
            key: key(Scope::Agent, "a", Period::Total),
            nanos: None,
            tokens: Some(1000),
        }];
        let granted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(r) = l.reserve(&limits, tokens(7)) {
                            granted.fetch_add(1, Ordering::SeqCst);
                            r.settle(tokens(7));
                        }
                    }
                });
            }
        });
        let spent = l.accounts()[0].1.spent.tokens;
        assert!(spent <= 1000, "{spent}");
        assert_eq!(spent, granted.load(Ordering::SeqCst) * 7);
        assert_eq!(spent, 994, "every token that fits is used");
    }

    #[test]
    fn periods_roll_over_on_the_calendar() {
        let (l, clock) = ledger("2026-11-29T23:59:00Z");
        let limits = [Limit {
            key: key(Scope::Agent, "a", Period::Day),
            nanos: None,
            tokens: Some(100),
        }];
        l.reserve(&limits, tokens(90)).unwrap().settle(tokens(90));
        assert!(l.reserve(&limits, tokens(20)).is_err());
        clock.0.fetch_add(120, Ordering::SeqCst); // 00:01 the next day
        assert_eq!(l.remaining(&limits).tokens, Some(100));
        assert!(l.reserve(&limits, tokens(20)).is_ok());
    }

    #[test]
    fn admission_clamps_to_what_every_budget_affords() {
        let (l, _) = ledger("2026-11-29T10:00:00Z");
        let limits = [Limit {
            key: key(Scope::Agent, "a", Period::Day),
            nanos: Some(usd_to_nanos(0.001)),
            tokens: Some(5000),
        }];
        // $0.001 left, the input costs $0.0002, an output token 1000 nano-dollars.
        let ask = |price: f64, ceiling: u64| Ask {
            input: Amount {
                tokens: 100,
                nanos: usd_to_nanos(0.0002),
            },
            output: Output::Clamp { ceiling },
            choices: 1,
            nanos_per_output_token: price,
        };
        let (r, grant) = l.admit(&limits, 1, &ask(1000.0, 10_000)).unwrap();
        assert_eq!(grant.output, 800, "dollars bind");
        assert_eq!(grant.worst.nanos, usd_to_nanos(0.001));
        assert_eq!(grant.remaining.tokens, Some(5000), "settled spend only");
        drop(r);
        let (r, grant) = l.admit(&limits, 1, &ask(10.0, 10_000)).unwrap();
        assert_eq!(grant.output, 4900, "tokens bind");
        drop(r);
        let (small, grant) = l.admit(&limits, 1, &ask(10.0, 64)).unwrap();
        assert_eq!(grant.output, 64, "the ceiling binds");
        drop(small);
        let (r, grant) = l.admit(&limits, 1, &ask(1000.0, 10_000)).unwrap();
        let err = l.admit(&limits, 1, &ask(1000.0, 10_000)).unwrap_err();
        assert_eq!(err.unit, Unit::Usd, "nothing left for one more token");
        r.settle(grant.worst);
        assert_eq!(
            l.remaining(&limits).nanos,
            Some(usd_to_nanos(0.001) - grant.worst.nanos)
        );
    }

    #[test]
    fn restore_counts_only_current_windows() {
        let (l, _) = ledger("2026-11-29T10:00:00Z");
        let day = key(Scope::Agent, "a", Period::Day);
        let total = key(Scope::Agent, "a", Period::Total);
        let yesterday: Timestamp = "2026-11-28T00:00:00Z".parse().unwrap();
        let today: Timestamp = "2026-11-29T00:00:00Z".parse().unwrap();
        l.restore(&day, tokens(5), yesterday.as_second());
        l.restore(&total, tokens(5), 0);
        l.restore(&day, tokens(7), today.as_second());
        l.restore(&total, tokens(7), 0);
        let limits = [
            Limit {
                key: day,
                nanos: None,
                tokens: Some(100),
            },
            Limit {
                key: total,
                nanos: None,
                tokens: Some(1000),
            },
        ];
        let acc = l.accounts();
        assert_eq!(
            acc.iter().map(|(_, a)| a.spent.tokens).collect::<Vec<_>>(),
            vec![7, 12]
        );
        assert_eq!(
            l.remaining(&limits),
            Remaining {
                nanos: None,
                tokens: Some(93)
            }
        );
    }
}
