//! The body tap against plain forwarding: the same 500-chunk stream polled to its end,
//! raw, through the tap with a usage observer, and through the tap plus the stripping of
//! injected usage.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokenwarden::metering::{Endpoint, UsageObserver};
use tokenwarden::proxy::strip::StripUsage;
use tokenwarden::proxy::tap::{Flow, Observer, StreamEnd, StreamLimits, TapBody};

struct Meter(UsageObserver);

impl Observer for Meter {
    fn on_data(&mut self, data: &Bytes) -> Flow {
        self.0.observe(data);
        Flow::Continue
    }
    fn on_end(self, _end: StreamEnd) {
        std::hint::black_box(self.0.finish("gpt-4o", b"{}"));
    }
}

fn frames() -> Vec<Bytes> {
    let mut frames: Vec<Bytes> = (0..500)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\
                 \"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" w{i}\"}},\
                 \"finish_reason\":null}}],\"usage\":null}}\n\n"
            ))
        })
        .collect();
    frames.push(Bytes::from_static(
        b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":500}}\n\n",
    ));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

type Frames = tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::io::Error>>>;

fn body(frames: &[Bytes]) -> StreamBody<Frames> {
    let items: Vec<_> = frames.iter().cloned().map(|f| Ok(Frame::data(f))).collect();
    StreamBody::new(tokio_stream::iter(items))
}

fn limits() -> StreamLimits {
    StreamLimits {
        idle: Duration::from_secs(60),
        deadline: tokio::time::Instant::now() + Duration::from_secs(600),
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let frames = frames();
    let bytes: usize = frames.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("tap_500_chunks");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("plain", |b| {
        b.iter(|| rt.block_on(async { body(&frames).collect().await.map(|c| c.to_bytes().len()) }))
    });
    group.bench_function("tap_and_meter", |b| {
        b.iter(|| {
            rt.block_on(async {
                let observer = Meter(UsageObserver::new(Endpoint::ChatCompletions, true));
                let tap = TapBody::new(body(&frames), observer, limits());
                tap.collect().await.map(|c| c.to_bytes().len())
            })
        })
    });
    group.bench_function("tap_meter_and_strip", |b| {
        b.iter(|| {
            rt.block_on(async {
                let observer = Meter(UsageObserver::new(Endpoint::ChatCompletions, true));
                let tap = TapBody::new(body(&frames), observer, limits());
                StripUsage::new(tap)
                    .collect()
                    .await
                    .map(|c| c.to_bytes().len())
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
