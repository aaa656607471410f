//! An incremental Server-Sent Events parser with no I/O: bytes in, events out.
//!
//! Frames from the network split events anywhere: inside a line, between `\r` and `\n`,
//! inside a multi-byte character. The parser keeps only the unfinished line and the
//! event being built, both bounded by `max_event_bytes`; an event past the bound is
//! dropped whole and counted, never truncated into something that parses differently.
//!
//! Lines end in LF, CRLF or a lone CR (WHATWG HTML §9.2.6). Comment lines (`:`) and the
//! `id` and `retry` fields are skipped; `event` names the event; `data` lines join with
//! `\n`. An event is dispatched at a blank line; one still open at the end is dropped, as
//! the specification says.

/// One complete event. `event` is empty when the stream named none (type "message").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    pub event: &'a [u8],
    pub data: &'a [u8],
}

#[derive(Debug)]
pub struct SseParser {
    max_event_bytes: usize,
    /// The unfinished line carried over from the previous chunk.
    line: Vec<u8>,
    event: Vec<u8>,
    data: Vec<u8>,
    /// Whether any `data` field arrived for the current event.
    has_data: bool,
    /// The last chunk ended in `\r`: a leading `\n` of the next one ends no line.
    after_cr: bool,
    /// The current event grew past the bound and will be dropped.
    oversized: bool,
    /// A line of the oversized event is under way; its bytes are not kept.
    skipping_line: bool,
    dropped: u64,
}

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            max_event_bytes,
            line: Vec::new(),
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            oversized: false,
            skipping_line: false,
            dropped: 0,
        }
    }

    /// Whether the bytes fed so far end exactly between two events (nothing of a next
    /// event has arrived): the one place another event can be added to the stream.
    pub fn between_events(&self) -> bool {
        self.line.is_empty()
            && !self.has_data
            && self.event.is_empty()
            && !self.oversized
            && !self.skipping_line
    }

    /// Events dropped so far for exceeding the bound.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Feeds the next chunk and calls `on_event` for every event it completes.
    pub fn feed(&mut self, mut input: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        if self.after_cr && !input.is_empty() {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = input {
                input = rest;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', input) {
            let terminator = input[end];
            if self.skipping_line {
                // The rest of an oversized line: not blank, and its event is dropped.
                self.skipping_line = false;
            } else if self.line.is_empty() {
                // The whole line is in this chunk: no copy. A line past the bound marks
                // its event oversized, exactly as it would arriving in pieces.
                let line = &input[..end];
                if line.len() > self.max_event_bytes {
                    self.oversized = true;
                } else {
                    self.process_line(line, on_event);
                }
            } else {
                self.push_line_bytes(&input[..end]);
                if self.skipping_line {
                    // The line outgrew the bound as it ended: it was not blank.
                    self.skipping_line = false;
                } else {
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, on_event);
                    self.line = line;
                    self.line.clear();
                }
            }
            input = &input[end + 1..];
            if terminator == b'\r' {
                match input {
                    [b'\n', rest @ ..] => input = rest,
                    [] => self.after_cr = true,
                    _ => {}
                }
            }
        }
        self.push_line_bytes(input);
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) {
        if self.oversized {
            // Keep no bytes, but remember a line is under way, so that its end is not
            // taken for a blank line.
            self.skipping_line |= !bytes.is_empty() || !self.line.is_empty();
            self.line.clear();
            return;
        }
        if self.line.len() + bytes.len() > self.max_event_bytes {
            self.oversized = true;
            self.skipping_line = true;
            self.line.clear();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if self.oversized || line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                let extra = value.len() + usize::from(self.has_data);
                if self.event.len() + self.data.len() + extra > self.max_event_bytes {
                    self.oversized = true;
                    return;
                }
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event
                    .extend_from_slice(&value[..value.len().min(self.max_event_bytes)]);
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(Event<'_>)) {
        if self.oversized {
            self.dropped += 1;
        } else if self.has_data {
            on_event(Event {
                event: &self.event,
                data: &self.data,
            });
        }
        self.event.clear();
        self.data.clear();
        self.has_data = false;
        self.oversized = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_past_the_bound_counts_the_same_however_it_arrives() {
        // Found by fuzzing: a long line completed in a second chunk was taken for a
        // blank one, dispatching (and counting) an event the stream never ended.
        let long = [b'x'; 40];
        let mut input = b"data: a\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\ndata: b\n\n");
        let whole = parse_chunks(&[&input], 32);
        for cut in 0..=input.len() {
            let split = parse_chunks(&[&input[..cut], &input[cut..]], 32);
            assert_eq!(split, whole, "cut at {cut}");
        }
        assert_eq!(whole, (vec![], 1), "one event, dropped whole");
    }

    #[test]
    fn knows_when_it_is_between_events() {
        let mut p = SseParser::new(1024);
        assert!(p.between_events());
        p.feed(b"data: a", &mut |_| {});
        assert!(!p.between_events(), "inside a line");
        p.feed(b"\n", &mut |_| {});
        assert!(!p.between_events(), "inside an event");
        p.feed(b"\n", &mut |_| {});
        assert!(p.between_events());
        p.feed(b"event: x\n", &mut |_| {});
        assert!(!p.between_events(), "an event has begun");
    }

    fn parse_chunks(chunks: &[&[u8]], max: usize) -> (Vec<(String, String)>, u64) {
        let mut p = SseParser::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            p.feed(chunk, &mut |e: Event<'_>| {
                out.push((
                    String::from_utf8_lossy(e.event).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                ))
            });
        }
        (out, p.dropped())
    }

    fn parse(input: &[u8]) -> Vec<(String, String)> {
        parse_chunks(&[input], 1 << 20).0
    }

    fn ev(event: &str, data: &str) -> (String, String) {
        (event.into(), data.into())
    }

    const RECORDED: &[u8] = b"event: message_start\r\ndata: {\"type\":\"message_start\"}\r\n\r\n\
: keep-alive comment\n\
event: content_block_delta\ndata: {\"text\":\"h\xc3\xa9llo\"}\n\n\
id: 7\nretry: 100\ndata: line one\ndata:line two\n\n\
data: [DONE]\r\r";

    fn recorded_events() -> Vec<(String, String)> {
        vec![
            ev("message_start", "{\"type\":\"message_start\"}"),
            ev("content_block_delta", "{\"text\":\"h\u{e9}llo\"}"),
            ev("", "line one\nline two"),
            ev("", "[DONE]"),
        ]
    }

    #[test]
    fn parses_lf_crlf_and_cr_lines_comments_and_multiline_data() {
        assert_eq!(parse(RECORDED), recorded_events());
    }

    #[test]
    fn every_single_split_point_gives_the_same_events() {
        for i in 0..=RECORDED.len() {
            let (a, b) = RECORDED.split_at(i);
            assert_eq!(
                parse_chunks(&[a, b], 1 << 20).0,
                recorded_events(),
                "split at {i}"
            );
        }
    }

    #[test]
    fn every_pair_of_split_points_gives_the_same_events() {
        for i in 0..=RECORDED.len() {
            for j in i..=RECORDED.len() {
                let chunks = [&RECORDED[..i], &RECORDED[i..j], &RECORDED[j..]];
                assert_eq!(
                    parse_chunks(&chunks, 1 << 20).0,
                    recorded_events(),
                    "{i} {j}"
                );
            }
        }
    }

    #[test]
    fn byte_by_byte_gives_the_same_events() {
        let chunks: Vec<&[u8]> = RECORDED.chunks(1).collect();
        assert_eq!(parse_chunks(&chunks, 1 << 20).0, recorded_events());
    }

    #[test]
    fn an_unfinished_event_is_not_dispatched() {
        assert_eq!(parse(b"data: a\n\ndata: cut off"), vec![ev("", "a")]);
        assert_eq!(parse(b"data: a\n\ndata: b\n"), vec![ev("", "a")]);
    }

    #[test]
    fn events_without_data_are_skipped() {
        assert_eq!(
            parse(b"event: ping\n\n: only a comment\n\ndata: x\n\n"),
            vec![ev("", "x")]
        );
    }

    #[test]
    fn oversized_events_are_dropped_whole_and_counted() {
        let big = format!("data: {}\n\ndata: small\n\n", "x".repeat(100));
        let (events, dropped) = parse_chunks(&[big.as_bytes()], 64);
        assert_eq!(events, vec![ev("", "small")]);
        assert_eq!(dropped, 1);
        // Split across chunks, many data lines: still bounded and dropped.
        let many = "data: 0123456789\n".repeat(20) + "\ndata: after\n\n";
        let chunks: Vec<&[u8]> = many.as_bytes().chunks(7).collect();
        let (events, dropped) = parse_chunks(&chunks, 64);
        assert_eq!(events, vec![ev("", "after")]);
        assert_eq!(dropped, 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Lines an SSE stream is made of, with every kind of line ending.
        fn line() -> impl Strategy<Value = Vec<u8>> {
            let body = prop_oneof![
                "[a-z ]{0,12}".prop_map(|s| format!("data: {s}")),
                "[a-z_.]{1,10}".prop_map(|s| format!("event: {s}")),
                "[a-z ]{0,8}".prop_map(|s| format!(": {s}")),
                Just("id: 1".to_owned()),
                Just(String::new()),
            ];
            let end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
            (body, end).prop_map(|(b, e)| format!("{b}{e}").into_bytes())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// However the stream is cut into frames, the events are those of the whole.
            #[test]
            fn any_framing_gives_the_same_events(
                lines in proptest::collection::vec(line(), 0..40),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
            ) {
                let stream: Vec<u8> = lines.concat();
                let whole = parse_chunks(&[&stream], 1 << 20);
                let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
                points.sort_unstable();
                let mut chunks = Vec::new();
                let mut at = 0;
                for p in points {
                    chunks.push(&stream[at..p]);
                    at = p;
                }
                chunks.push(&stream[at..]);
                prop_assert_eq!(parse_chunks(&chunks, 1 << 20), whole);
            }

            /// Arbitrary bytes never panic and never yield an event past the bound.
            #[test]
            fn arbitrary_bytes_stay_bounded(
                frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
            ) {
                let mut p = SseParser::new(32);
                for f in &frames {
                    p.feed(f, &mut |e: Event<'_>| assert!(e.data.len() <= 32 && e.event.len() <= 32));
                }
            }
        }
    }

    #[test]
    fn field_without_colon_and_without_space() {
        assert_eq!(parse(b"data\n\n"), vec![ev("", "")]);
        assert_eq!(parse(b"data:x\n\n"), vec![ev("", "x")]);
        assert_eq!(parse(b"data:  two spaces\n\n"), vec![ev("", " two spaces")]);
    }
}
