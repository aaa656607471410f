//! The fallback token count: bpe-openai (used) against tiktoken-rs, same text.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn text(bytes: usize) -> String {
    let base = "The proxy meters every call, enforces per-agent budgets and stops runaway loops. \
                fn main() { println!(\"{}\", 40 + 2); } Grüße, 東京, emojis 🎉 and numbers 1234567. ";
    base.repeat(bytes / base.len() + 1)
}

fn bench(c: &mut Criterion) {
    let bpe = bpe_openai::o200k_base();
    let tiktoken = tiktoken_rs::o200k_base_singleton();
    let mut group = c.benchmark_group("tokenizer_o200k");
    for size in [1024usize, 64 * 1024] {
        let t = text(size);
        group.throughput(Throughput::Bytes(t.len() as u64));
        group.bench_with_input(BenchmarkId::new("bpe-openai", size), t.as_str(), |b, t| {
            b.iter(|| bpe.count(t))
        });
        group.bench_with_input(BenchmarkId::new("tiktoken-rs", size), t.as_str(), |b, t| {
            b.iter(|| tiktoken.encode_ordinary(t).len())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
