//! `tokenwarden report` over a synthetic chained log: read, verify the chain, parse and
//! aggregate (the log is written once, outside the measurement).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/synthetic.rs"]
mod synthetic;

use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokenwarden::report::{self, Options};

const LINES: u64 = 100_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    synthetic::write_log(dir.path(), LINES, Duration::from_secs(7 * 86_400));
    let options = Options {
        since: None,
        now: SystemTime::now(),
        agents: Vec::new(),
        teams: Vec::new(),
        redundancy_window: Duration::from_secs(3600),
    };
    let mut group = c.benchmark_group("report");
    group.throughput(Throughput::Elements(LINES));
    group.sample_size(10);
    group.bench_function("verify_and_aggregate_100k_lines", |b| {
        b.iter(|| {
            let r = report::build(dir.path(), None, &options).expect("report");
            assert!(r.chain.ok);
            assert_eq!(r.chain.records, LINES);
            r
        })
    });
    group.finish();
    // Rendering does not grow with the log, only with agents and buckets: no throughput.
    let r = report::build(dir.path(), None, &options).expect("report");
    c.bench_function("report/render_html_20_agents_7_days", |b| {
        b.iter(|| report::html::render(&r))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
