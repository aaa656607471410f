//! The SSE parser: any bytes, cut at any point, give the same events as in one piece,
//! and the parser never holds more than its bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenwarden::sse::SseParser;

const MAX: usize = 256;

fn events(chunks: &[&[u8]]) -> (Vec<(Vec<u8>, Vec<u8>)>, u64) {
    let mut parser = SseParser::new(MAX);
    let mut out = Vec::new();
    for chunk in chunks {
        parser.feed(chunk, &mut |e| {
            assert!(e.data.len() + e.event.len() <= MAX, "an event past the bound");
            out.push((e.event.to_vec(), e.data.to_vec()));
        });
    }
    (out, parser.dropped())
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else {
        return;
    };
    let cut = usize::from(cut) % (data.len() + 1);
    let whole = events(&[data]);
    let split = events(&[&data[..cut], &data[cut..]]);
    assert_eq!(whole, split, "cut at {cut}");
    let bytewise: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(whole, events(&bytewise), "one byte at a time");
});
