//! Reserve + settle throughput of the embedded ledger with 1, 8 and 64 agents, four
//! threads at once (every agent also draws on one shared team budget, as in production,
//! so the single lock is contended).
//!
//! Beside it, for comparison only, a minimal lock-free variant: a `DashMap` from budget
//! key to an account of atomics, reserved by a compare-and-swap per key in order and
//! rolled back if a later key does not fit. It is not the production ledger: it has no
//! calendar windows (no period rollover, no window cache to consult) and no all-keys
//! snapshot for `remaining`, so it does less work per request than the real one.
//! Ids: `mutex/N` is the production ledger, `dashmap/N` the variant, N agents.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dashmap::DashMap;
use tokenwarden::ledger::{Amount, BudgetKey, Ledger, Limit, Period, Scope, SystemClock};

const THREADS: u64 = 4;
const PER_THREAD: u64 = 10_000;

const WORST: Amount = Amount {
    tokens: 5000,
    nanos: 20_000,
};
const ACTUAL: Amount = Amount {
    tokens: 1200,
    nanos: 4_000,
};

fn limits(agents: usize) -> Vec<Vec<Limit>> {
    (0..agents)
        .map(|a| {
            vec![
                Limit {
                    key: BudgetKey {
                        scope: Scope::Agent,
                        id: format!("agent-{a}").into(),
                        period: Period::Day,
                    },
                    nanos: Some(u64::MAX / 4),
                    tokens: Some(u64::MAX / 4),
                },
                Limit {
                    key: BudgetKey {
                        scope: Scope::Team,
                        id: "team".into(),
                        period: Period::Month,
                    },
                    nanos: Some(u64::MAX / 4),
                    tokens: None,
                },
            ]
        })
        .collect()
}

// === the DashMap-of-atomics variant ===

/// One budget. `used` is spent plus reserved in one atomic, so that the check against
/// the limit and the reservation are one compare-and-swap: with spent and reserved in
/// two atomics, a settle moving an amount from one to the other could be seen half done
/// and let a reservation past the limit.
#[derive(Default)]
struct AtomicAccount {
    used_tokens: AtomicU64,
    used_nanos: AtomicU64,
    spent_tokens: AtomicU64,
    spent_nanos: AtomicU64,
}

/// Adds `n` to `used` if the sum stays within `max` (no limit: always).
fn try_add(used: &AtomicU64, n: u64, max: Option<u64>) -> bool {
    let Some(max) = max else {
        used.fetch_add(n, Ordering::AcqRel);
        return true;
    };
    used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
        u.checked_add(n).filter(|&sum| sum <= max)
    })
    .is_ok()
}

#[derive(Default)]
struct DashLedger {
    accounts: DashMap<BudgetKey, Arc<AtomicAccount>>,
}

struct DashReservation {
    accounts: Vec<Arc<AtomicAccount>>,
    worst: Amount,
}

impl DashLedger {
    fn account(&self, key: &BudgetKey) -> Arc<AtomicAccount> {
        if let Some(a) = self.accounts.get(key) {
            return a.clone();
        }
        self.accounts.entry(key.clone()).or_default().clone()
    }

    /// Reserves `worst` against every limit in order, or none of them.
    fn reserve(&self, limits: &[Limit], worst: Amount) -> Option<DashReservation> {
        let mut taken: Vec<Arc<AtomicAccount>> = Vec::with_capacity(limits.len());
        for limit in limits {
            let account = self.account(&limit.key);
            let ok = try_add(&account.used_tokens, worst.tokens, limit.tokens);
            if ok && try_add(&account.used_nanos, worst.nanos, limit.nanos) {
                taken.push(account);
                continue;
            }
            if ok {
                account
                    .used_tokens
                    .fetch_sub(worst.tokens, Ordering::AcqRel);
            }
            for a in &taken {
                a.used_tokens.fetch_sub(worst.tokens, Ordering::AcqRel);
                a.used_nanos.fetch_sub(worst.nanos, Ordering::AcqRel);
            }
            return None;
        }
        Some(DashReservation {
            accounts: taken,
            worst,
        })
    }
}

impl DashReservation {
    /// Swaps the reservation for the real spend (at most the reservation here).
    fn settle(self, actual: Amount) {
        for a in &self.accounts {
            a.spent_tokens.fetch_add(actual.tokens, Ordering::AcqRel);
            a.spent_nanos.fetch_add(actual.nanos, Ordering::AcqRel);
            a.used_tokens
                .fetch_sub(self.worst.tokens - actual.tokens, Ordering::AcqRel);
            a.used_nanos
                .fetch_sub(self.worst.nanos - actual.nanos, Ordering::AcqRel);
        }
    }
}

// === the bench ===

/// Runs `THREADS` threads of `PER_THREAD` reserve + settle each, `iters` times, against
/// a fresh ledger from `new` each time; the time of the threads only.
fn contended<L: Sync>(
    iters: u64,
    limits: &[Vec<Limit>],
    new: impl Fn() -> L,
    one: impl Fn(&L, &[Limit]) + Sync,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let ledger = new();
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (ledger, one) = (&ledger, &one);
                s.spawn(move || {
                    for i in 0..PER_THREAD {
                        let l = &limits[((t * PER_THREAD + i) as usize) % limits.len()];
                        one(ledger, l);
                    }
                });
            }
        });
        total += start.elapsed();
    }
    total
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ledger_reserve_settle");
    group.throughput(Throughput::Elements(THREADS * PER_THREAD));
    group.sample_size(10);
    for agents in [1usize, 8, 64] {
        let limits = limits(agents);
        group.bench_with_input(BenchmarkId::new("mutex", agents), &limits, |b, limits| {
            b.iter_custom(|iters| {
                contended(
                    iters,
                    limits,
                    || Ledger::new(jiff::tz::TimeZone::UTC, Arc::new(SystemClock)),
                    |ledger, l| ledger.reserve(l, WORST).unwrap().settle(ACTUAL),
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("dashmap", agents), &limits, |b, limits| {
            b.iter_custom(|iters| {
                contended(iters, limits, DashLedger::default, |ledger, l| {
                    ledger.reserve(l, WORST).unwrap().settle(ACTUAL)
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
