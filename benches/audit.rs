//! The audit writer: records per second through the queue, chain and group commit
//! (fsync per batch) on this machine's disk.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prometheus::IntCounter;
use tokenwarden::audit::{AuditLog, AuditSettings, Record};

fn record(i: u64) -> Record {
    Record {
        ts: "2026-11-29T15:30:00.123Z".parse().unwrap_or_default(),
        kind: "request",
        request_id: http::HeaderValue::from_str(&format!("req_{i:016x}")).ok(),
        agent: Some("support-bot".into()),
        team: Some("support".into()),
        provider: Some("openai".into()),
        model: Some("gpt-4o-mini".into()),
        method: "POST".into(),
        path: "/openai/v1/chat/completions".into(),
        status: 200,
        outcome: "ok",
        reason: "complete".into(),
        input_tokens: 1200,
        output_tokens: 300,
        cost_usd: 0.00036,
        latency_ms: 812.5,
        ttfb_ms: Some(201.0),
        fingerprint: Some(
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        ),
        client: "127.0.0.1:50312".parse().ok(),
        ..Record::default()
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("audit");
    const N: u64 = 10_000;
    group.throughput(Throughput::Elements(N));
    group.sample_size(10);
    group.bench_function("append_and_commit_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("temp dir");
                let records = IntCounter::new("r", "r").expect("counter");
                let log = AuditLog::open(
                    AuditSettings {
                        dir: dir.path().to_path_buf(),
                        max_file_bytes: 64 << 20,
                        commit_interval: std::time::Duration::from_millis(5),
                        hmac_key: None,
                        snapshot: None,
                    },
                    records.clone(),
                    IntCounter::new("e", "e").expect("counter"),
                )
                .expect("open");
                let start = Instant::now();
                for i in 0..N {
                    log.append(record(i));
                }
                log.close();
                total += start.elapsed();
                assert_eq!(records.get(), N);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
