//! Reserve + settle throughput of the embedded ledger with 1, 8 and 64 agents, four
//! threads at once (every agent also draws on one shared team budget, as in production,
//! so the single lock is contended).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokenwarden::ledger::{Amount, BudgetKey, Ledger, Limit, Period, Scope, SystemClock};

const THREADS: u64 = 4;
const PER_THREAD: u64 = 10_000;

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

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ledger_reserve_settle");
    group.throughput(Throughput::Elements(THREADS * PER_THREAD));
    group.sample_size(10);
    for agents in [1usize, 8, 64] {
        let limits = limits(agents);
        group.bench_with_input(BenchmarkId::from_parameter(agents), &limits, |b, limits| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let ledger = Ledger::new(jiff::tz::TimeZone::UTC, Arc::new(SystemClock));
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for t in 0..THREADS {
                            let ledger = &ledger;
                            s.spawn(move || {
                                for i in 0..PER_THREAD {
                                    let l = &limits[((t * PER_THREAD + i) as usize) % limits.len()];
                                    let worst = Amount {
                                        tokens: 5000,
                                        nanos: 20_000,
                                    };
                                    let r = ledger.reserve(l, worst).unwrap();
                                    r.settle(Amount {
                                        tokens: 1200,
                                        nanos: 4_000,
                                    });
                                }
                            });
                        }
                    });
                    total += start.elapsed();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
