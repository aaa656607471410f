//! The run fingerprint, computed per request for agents with `runs.max_repeats`: an agent
//! loop's request with a growing context (1 KiB, 32 KiB, 256 KiB of messages, a few
//! tools, one tool call whose arguments are canonicalized).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use tokenwarden::guard::runs::fingerprint;

fn agent_request(context: usize) -> Vec<u8> {
    let mut messages = vec![json!({"role": "system", "content": "You are a careful agent."})];
    let mut size = 0;
    let mut turn = 0;
    while size < context {
        let text = format!(
            "step {turn}: read the file, then {}",
            "lorem ipsum ".repeat(20)
        );
        size += text.len();
        messages.push(json!({"role": "user", "content": text}));
        messages.push(json!({
            "role": "assistant",
            "content": null,
            "tool_calls": [{"id": format!("call_{turn}"), "type": "function",
                "function": {"name": "read_file", "arguments": "{\"path\": \"src/main.rs\", \"lines\": [1, 200]}"}}]
        }));
        messages.push(json!({"role": "tool", "tool_call_id": format!("call_{turn}"), "content": "fn main() {}\n"}));
        turn += 1;
    }
    let tools: Vec<_> = (0..5)
        .map(|i| {
            json!({"type": "function", "function": {"name": format!("tool_{i}"),
            "description": "does one thing well",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}})
        })
        .collect();
    serde_json::to_vec(&json!({"model": "gpt-4o-mini", "messages": messages, "tools": tools}))
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("runs");
    for context in [1 << 10, 32 << 10, 256 << 10] {
        let body = agent_request(context);
        assert!(fingerprint(&body).is_some());
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("fingerprint/{} KiB", context >> 10), |b| {
            b.iter(|| fingerprint(std::hint::black_box(&body)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
