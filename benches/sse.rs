//! SSE parsing and usage observation throughput, on a recorded-shape OpenAI stream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokenwarden::metering::{Endpoint, UsageObserver};
use tokenwarden::sse::SseParser;

/// A chat completion stream of `pieces` content chunks with a final usage chunk.
fn openai_stream(pieces: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..pieces {
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG\",\"object\":\"chat.completion.chunk\",\
             \"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_4d82a6e2cd\",\
             \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\
             \"usage\":null}}\n\n"
        ));
    }
    s.push_str("data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":500,\
                \"prompt_tokens_details\":{\"cached_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0}}}\n\n");
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

fn bench(c: &mut Criterion) {
    let stream = openai_stream(500);
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for frame in [64usize, 1024, 16 * 1024] {
        let frames: Vec<Bytes> = stream.chunks(frame).map(Bytes::copy_from_slice).collect();
        group.bench_with_input(BenchmarkId::new("parse", frame), &frames, |b, frames| {
            b.iter(|| {
                let mut parser = SseParser::new(1 << 20);
                let mut events = 0usize;
                for f in frames {
                    parser.feed(f, &mut |_| events += 1);
                }
                events
            })
        });
        group.bench_with_input(
            BenchmarkId::new("observe_usage", frame),
            &frames,
            |b, frames| {
                b.iter(|| {
                    let mut observer = UsageObserver::new(Endpoint::ChatCompletions, true);
                    for f in frames {
                        observer.observe(f);
                    }
                    observer.finish("gpt-4o", b"{}")
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
