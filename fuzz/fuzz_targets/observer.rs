//! The usage observers of every wire format: any response bytes, cut anywhere, never
//! panic, and a stream read in pieces reports what it reports in one piece.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokenwarden::metering::{Endpoint, UsageObserver};

const ENDPOINTS: [Endpoint; 6] = [
    Endpoint::ChatCompletions,
    Endpoint::Completions,
    Endpoint::Responses,
    Endpoint::Embeddings,
    Endpoint::Messages,
    Endpoint::Other,
];

fn observe(endpoint: Endpoint, sse: bool, chunks: &[&[u8]]) -> String {
    // Never estimate: the fallback tokenizer is tested on its own, and is slow to build.
    let mut observer = UsageObserver::new(endpoint, sse).estimating(false);
    for chunk in chunks {
        observer.observe(&Bytes::copy_from_slice(chunk));
        let _ = observer.running_usage();
        let _ = observer.between_events();
    }
    format!("{:?}", observer.finish("gpt-4o-mini", b"{}"))
}

fuzz_target!(|input: &[u8]| {
    let [how, cut, data @ ..] = input else {
        return;
    };
    let endpoint = ENDPOINTS[usize::from(*how) % ENDPOINTS.len()];
    let sse = how & 0x80 != 0;
    let cut = usize::from(*cut) % (data.len() + 1);
    let whole = observe(endpoint, sse, &[data]);
    let split = observe(endpoint, sse, &[&data[..cut], &data[cut..]]);
    assert_eq!(whole, split);
});
