//! Reading usage out of responses, per wire format, as the bytes go by.
//!
//! The observer is shown every response frame (a refcounted `Bytes`; the client's copy
//! is never touched) and keeps only what it needs: the usage reports, and, up to a
//! bound, what the fallback count would read if the provider never reports usage: of an
//! event stream, the generated text of each event, picked out as it passes (a tenth of
//! the bytes of a chat stream); of a whole body, the body. JSON is parsed only for SSE
//! events that carry a usage report, and for non-streamed bodies once, at the end.
//!
//! The bytes are copied, not kept as `Bytes`: a frame from hyper is a slice of the
//! connection's read buffer (8 KiB and up), so keeping the slice keeps the whole buffer,
//! and hyper allocates a new one for its next read. One small frame per read, as a slow
//! stream sends, then cost a read buffer per frame for the life of the stream.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::{tokenizer, Metered, Usage};
use crate::sse::{Event, SseParser};

/// Frames kept for the fallback count, per response.
const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;
/// Largest single SSE event the observer reads (a 10 MB line is skipped, not buffered).
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Which API a request went to, as far as metering cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// OpenAI `/chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `/completions`.
    Completions,
    /// OpenAI `/responses`.
    Responses,
    /// OpenAI `/embeddings`.
    Embeddings,
    /// Anthropic `/messages`.
    Messages,
    /// Anything else: forwarded, metered as zero tokens.
    Other,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
            Endpoint::Other => "other",
        }
    }
}

/// What the provider reported so far. Anthropic's figures are cumulative, so every
/// report overwrites the fields it names and leaves the others.
#[derive(Debug, Default, Clone, Copy)]
struct Reported {
    usage: Usage,
    input_seen: bool,
    output_seen: bool,
}

pub struct UsageObserver {
    endpoint: Endpoint,
    sse: Option<SseParser>,
    /// The frames, one after the other, grown on demand: of a whole body (read at the
    /// end), or of any body when it is to be written to the audit log.
    held: Vec<u8>,
    /// Whether `held` keeps the frames.
    hold_frames: bool,
    /// Of an event stream: the generated text of its events, for the fallback count.
    text: String,
    /// Bytes seen past the bound, counted roughly if an estimate is needed.
    unheld_bytes: usize,
    reported: Reported,
    /// Count tokens when the provider reports none (off for error answers).
    estimate: bool,
    /// Events seen with data: a stream sends about one token per event.
    events: u64,
}

impl UsageObserver {
    /// `sse`: the response is an event stream (`text/event-stream`).
    pub fn new(endpoint: Endpoint, sse: bool) -> Self {
        UsageObserver {
            endpoint,
            sse: sse.then(|| SseParser::new(MAX_EVENT_BYTES)),
            held: Vec::new(),
            hold_frames: !sse,
            text: String::new(),
            unheld_bytes: 0,
            reported: Reported::default(),
            estimate: true,
            events: 0,
        }
    }

    /// `false`: never estimate; usage is what the provider reported, or nothing. For
    /// error answers, which providers do not bill.
    pub fn estimating(mut self, estimate: bool) -> Self {
        self.estimate = estimate;
        self
    }

    /// Keeps the frames of an event stream too, for [`UsageObserver::held_text`].
    pub fn holding_frames(mut self, hold: bool) -> Self {
        self.hold_frames |= hold;
        self
    }

    /// Shows the observer the next frame of the response body.
    pub fn observe(&mut self, data: &Bytes) {
        if self.endpoint == Endpoint::Other || data.is_empty() {
            return;
        }
        if self.hold_frames {
            if self.held.len() + data.len() <= MAX_HELD_BYTES {
                self.held.extend_from_slice(data);
            } else if self.sse.is_none() {
                self.unheld_bytes += data.len();
            }
        }
        if let Some(parser) = &mut self.sse {
            let (endpoint, reported, events, text, unheld) = (
                self.endpoint,
                &mut self.reported,
                &mut self.events,
                &mut self.text,
                &mut self.unheld_bytes,
            );
            parser.feed(data, &mut |event| {
                *events += 1;
                if text.len() < MAX_HELD_BYTES {
                    generated_text(event.data, text);
                } else {
                    let mut past = String::new();
                    generated_text(event.data, &mut past);
                    *unheld += past.len();
                }
                read_event(endpoint, event, reported)
            });
        }
    }

    /// Whether the stream seen so far ends between two events (see
    /// [`SseParser::between_events`]); never for a body that is not an event stream.
    pub fn between_events(&self) -> bool {
        self.sse.as_ref().is_some_and(SseParser::between_events)
    }

    /// The usage so far, while a stream runs: what the provider reported, with at least
    /// one output token per event seen (providers report output only at the end).
    pub fn running_usage(&self) -> Usage {
        let mut usage = self.reported.usage;
        usage.output = usage.output.max(self.events);
        usage
    }

    /// Whether the provider has not (yet) reported everything, so that `finish` would
    /// run the tokenizer.
    pub fn needs_estimate(&self) -> bool {
        if !self.estimate {
            return false;
        }
        match self.endpoint {
            Endpoint::Other => false,
            // A whole body is read at the end; only its size can tell beforehand.
            _ if self.sse.is_none() => self.unheld_bytes > 0,
            Endpoint::Embeddings => !self.reported.input_seen,
            _ => !(self.reported.input_seen && self.reported.output_seen),
        }
    }

    /// The response as far as it was kept, for `audit.include_bodies` (see
    /// [`UsageObserver::holding_frames`]).
    pub fn held_text(&self) -> String {
        String::from_utf8_lossy(&self.held).into_owned()
    }

    /// Bytes of the response kept: its frames, or the text of its events.
    pub fn held_bytes(&self) -> usize {
        self.held.len() + self.text.len()
    }

    /// SSE events dropped for exceeding the event bound.
    pub fn dropped_events(&self) -> u64 {
        self.sse.as_ref().map_or(0, SseParser::dropped)
    }

    /// The usage of the response: as reported where the provider reported it, estimated
    /// from `request` (the request body) and the response text where it did not.
    pub fn finish(mut self, model: &str, request: &[u8]) -> Metered {
        if self.endpoint == Endpoint::Other {
            return Metered::default();
        }
        if self.sse.is_none() && self.unheld_bytes == 0 {
            read_body(self.endpoint, &self.held, &mut self.reported);
        }
        let Reported {
            mut usage,
            input_seen,
            output_seen,
        } = self.reported;
        if !self.estimate || (input_seen && (output_seen || self.endpoint == Endpoint::Embeddings))
        {
            return Metered {
                usage,
                estimated: false,
            };
        }
        let counter = tokenizer::for_model(model);
        if !input_seen {
            usage.input = counter.count(&request_text(request));
            usage.cached_input = 0;
            usage.cache_write = 0;
        }
        if !output_seen && self.endpoint != Endpoint::Embeddings {
            let text = self.response_text();
            usage.output = counter.count(&text) + (self.unheld_bytes / 4) as u64;
            usage.reasoning = 0;
        }
        Metered {
            usage,
            estimated: true,
        }
    }

    /// The generated text of the response, for the fallback count.
    fn response_text(&mut self) -> String {
        if self.sse.is_some() {
            return std::mem::take(&mut self.text);
        }
        let mut text = String::new();
        if let Ok(value) = serde_json::from_slice::<Value>(&self.held) {
            collect_generated_text(&value, &mut text);
        }
        text
    }
}

// === wire formats ===

#[derive(Deserialize)]
struct WithUsage<U> {
    usage: Option<U>,
}

/// Chat completions, legacy completions and embeddings.
#[derive(Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<CachedDetails>,
    #[serde(default)]
    completion_tokens_details: Option<ReasoningDetails>,
}

/// The Responses API.
#[derive(Deserialize)]
struct ResponsesUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<CachedDetails>,
    #[serde(default)]
    output_tokens_details: Option<ReasoningDetails>,
}

#[derive(Deserialize)]
struct CachedDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ReasoningDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ResponsesEvent {
    response: Option<WithUsage<ResponsesUsage>>,
}

/// Anthropic messages; every field may be absent or null in a `message_delta`.
#[derive(Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct AnthropicEvent {
    message: Option<WithUsage<AnthropicUsage>>,
    usage: Option<AnthropicUsage>,
}

impl OpenAiUsage {
    fn apply(self, r: &mut Reported) {
        let cached = self
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        let prompt = self.prompt_tokens.unwrap_or(0);
        r.usage.input = prompt.saturating_sub(cached);
        r.usage.cached_input = cached.min(prompt);
        r.usage.output = self.completion_tokens.unwrap_or(0);
        r.usage.reasoning = self
            .completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0);
        r.input_seen = true;
        r.output_seen = true;
    }
}

impl ResponsesUsage {
    fn apply(self, r: &mut Reported) {
        OpenAiUsage {
            prompt_tokens: self.input_tokens,
            completion_tokens: self.output_tokens,
            prompt_tokens_details: self.input_tokens_details,
            completion_tokens_details: self.output_tokens_details,
        }
        .apply(r);
    }
}

impl AnthropicUsage {
    /// Merges a report into what is known: fields present overwrite, absent ones stay.
    /// `final_output`: this report's `output_tokens` is a real count, not the
    /// placeholder of `message_start`.
    fn merge(self, r: &mut Reported, final_output: bool) {
        if let Some(n) = self.input_tokens {
            r.usage.input = n;
            r.input_seen = true;
        }
        if let Some(n) = self.cache_creation_input_tokens {
            r.usage.cache_write = n;
        }
        if let Some(n) = self.cache_read_input_tokens {
            r.usage.cached_input = n;
        }
        if let Some(n) = self.output_tokens {
            r.usage.output = n;
            r.output_seen |= final_output;
        }
    }
}

/// Whether a JSON text has a `"usage"` key whose value is an object (not `null`), found
/// without parsing: most chunks carry `"usage":null` or no usage at all.
fn has_usage_object(data: &[u8]) -> bool {
    static USAGE_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    USAGE_KEY.find_iter(data).any(|at| {
        let rest = data[at + 7..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|v| v.trim_ascii_start().starts_with(b"{"))
    })
}

/// Reads one SSE event; JSON is parsed only when the event carries a usage report.
fn read_event(endpoint: Endpoint, event: Event<'_>, r: &mut Reported) {
    if !has_usage_object(event.data) {
        return;
    }
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings => {
            if let Ok(WithUsage { usage: Some(u) }) =
                serde_json::from_slice::<WithUsage<OpenAiUsage>>(event.data)
            {
                u.apply(r);
            }
        }
        Endpoint::Responses => {
            if let Ok(ResponsesEvent {
                response: Some(WithUsage { usage: Some(u) }),
            }) = serde_json::from_slice(event.data)
            {
                u.apply(r);
            }
        }
        Endpoint::Messages => {
            if let Ok(e) = serde_json::from_slice::<AnthropicEvent>(event.data) {
                if let Some(WithUsage { usage: Some(u) }) = e.message {
                    u.merge(r, false);
                }
                if let Some(u) = e.usage {
                    u.merge(r, true);
                }
            }
        }
        Endpoint::Other => {}
    }
}

/// Reads the usage of a whole (non-streamed) JSON body.
fn read_body(endpoint: Endpoint, body: &[u8], r: &mut Reported) {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings => {
            if let Ok(WithUsage { usage: Some(u) }) =
                serde_json::from_slice::<WithUsage<OpenAiUsage>>(body)
            {
                u.apply(r);
            }
        }
        Endpoint::Responses => {
            if let Ok(WithUsage { usage: Some(u) }) =
                serde_json::from_slice::<WithUsage<ResponsesUsage>>(body)
            {
                u.apply(r);
            }
        }
        Endpoint::Messages => {
            if let Ok(WithUsage { usage: Some(u) }) =
                serde_json::from_slice::<WithUsage<AnthropicUsage>>(body)
            {
                u.merge(r, true);
            }
        }
        Endpoint::Other => {}
    }
}

// === text for the fallback count ===

/// Keys whose string values are generated text in any of the formats: chat deltas and
/// messages (`content`), legacy completions and Anthropic deltas (`text`), tool calls
/// (`arguments`, `partial_json`), thinking, and Responses deltas (`delta`).
const GENERATED_KEYS: [&str; 6] = [
    "content",
    "text",
    "arguments",
    "partial_json",
    "thinking",
    "delta",
];

fn collect_generated_text(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(s) if GENERATED_KEYS.contains(&key.as_str()) => {
                        out.push_str(s);
                    }
                    _ => collect_generated_text(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_generated_text(v, out)),
        _ => {}
    }
}

/// Appends the string values of [`GENERATED_KEYS`] anywhere in a JSON document, in
/// document order, as [`collect_generated_text`] finds them in a parsed one, without
/// parsing it. Each key is searched for as a whole token, `"content"` with its quotes, by
/// a vector search: in JSON an unescaped quote followed by a key's name and a closing
/// quote can only open that key or a string of that text, and only a key is followed by
/// a colon. A document that is not JSON gives what such a search finds (it is only ever
/// counted).
fn generated_text(json: &[u8], out: &mut String) {
    static FINDERS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 6]> =
        std::sync::LazyLock::new(|| {
            GENERATED_KEYS.map(|key| {
                memchr::memmem::Finder::new(format!("\"{key}\"").as_bytes()).into_owned()
            })
        });
    let mut keys = FINDERS.each_ref().map(|f| f.find_iter(json).peekable());
    // The matches of every key, merged by position.
    loop {
        let mut first: Option<(usize, usize)> = None;
        for (i, found) in keys.iter_mut().enumerate() {
            if let Some(&at) = found.peek() {
                if first.is_none_or(|(earliest, _)| at < earliest) {
                    first = Some((at, i));
                }
            }
        }
        let Some((at, i)) = first else {
            return;
        };
        keys[i].next();
        let len = FINDERS[i].needle().len();
        let escaped = json[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1;
        if escaped {
            continue;
        }
        let Some(value) = json[at + len..].trim_ascii_start().strip_prefix(b":") else {
            continue;
        };
        let value = value.trim_ascii_start();
        if value.first() != Some(&b'"') {
            continue;
        }
        let start = json.len() - value.len() + 1;
        let end = string_end(json, start);
        push_json_string(
            &json[start - 1..(end + 1).min(json.len())],
            &json[start..end],
            out,
        );
    }
}

/// Where the string whose content begins at `start` ends: its closing quote, or the end.
/// A plain loop: the strings of an event are mostly a few bytes long, shorter than a
/// vector search takes to start.
fn string_end(json: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < json.len() {
        match json[i] {
            b'"' => return i,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    json.len()
}

/// Appends a JSON string (`quoted`, with its quotes; `raw`, the bytes between them).
fn push_json_string(quoted: &[u8], raw: &[u8], out: &mut String) {
    if !raw.contains(&b'\\') {
        out.push_str(&String::from_utf8_lossy(raw));
    } else if let Ok(s) = serde_json::from_slice::<std::borrow::Cow<'_, str>>(quoted) {
        out.push_str(&s);
    } else {
        out.push_str(&String::from_utf8_lossy(raw));
    }
}

/// Keys of a request whose strings are what the model reads.
const PROMPT_KEYS: [&str; 6] = [
    "messages",
    "input",
    "prompt",
    "system",
    "instructions",
    "tools",
];

/// The prompt text of a request body, for the fallback count; a body that is not JSON
/// is counted as it is.
fn request_text(request: &[u8]) -> String {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(request) else {
        return String::from_utf8_lossy(request).into_owned();
    };
    let mut out = String::new();
    for key in PROMPT_KEYS {
        if let Some(v) = map.get(key) {
            collect_strings(v, &mut out);
        }
    }
    out
}

fn collect_strings(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observe_all(endpoint: Endpoint, sse: bool, body: &str, split: usize) -> UsageObserver {
        let mut o = UsageObserver::new(endpoint, sse);
        for chunk in body.as_bytes().chunks(split.max(1)) {
            o.observe(&Bytes::copy_from_slice(chunk));
        }
        o
    }

    const CHAT_STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello there\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":9,",
        "\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":6}}}\n\n",
        "data: [DONE]\n\n"
    );

    #[test]
    fn openai_stream_usage_with_cache_and_reasoning() {
        for split in [1, 7, 64, 10_000] {
            let m = observe_all(Endpoint::ChatCompletions, true, CHAT_STREAM, split)
                .finish("gpt-4o", b"{}");
            let want = Usage {
                input: 16,
                cached_input: 4,
                cache_write: 0,
                output: 9,
                reasoning: 6,
            };
            assert_eq!(
                m,
                Metered {
                    usage: want,
                    estimated: false
                },
                "split {split}"
            );
        }
    }

    #[test]
    fn anthropic_stream_merges_cumulative_usage_field_by_field() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":30,",
            "\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":50,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":12}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
        for split in [1, 13, 10_000] {
            let m = observe_all(Endpoint::Messages, true, body, split).finish("claude", b"{}");
            assert!(!m.estimated);
            assert_eq!(m.usage.input, 30);
            assert_eq!(m.usage.cache_write, 100);
            assert_eq!(m.usage.cached_input, 50);
            assert_eq!(
                m.usage.output, 15,
                "cumulative: the last report wins, never a sum"
            );
        }
    }

    #[test]
    fn anthropic_stream_cut_after_start_estimates_only_the_output() {
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":30,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"hello world\"}}\n\n",
        );
        let m = observe_all(Endpoint::Messages, true, body, 5).finish("claude-sonnet-4-6", b"{}");
        assert!(m.estimated);
        assert_eq!(m.usage.input, 30, "the reported input stays exact");
        assert_eq!(m.usage.output, 2, "'hello world' is two tokens");
    }

    #[test]
    fn responses_stream_and_body() {
        let stream = concat!(
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":",
            "{\"input_tokens\":11,\"input_tokens_details\":{\"cached_tokens\":1},\"output_tokens\":5,",
            "\"output_tokens_details\":{\"reasoning_tokens\":2}}}}\n\n"
        );
        let m = observe_all(Endpoint::Responses, true, stream, 3).finish("gpt-4o", b"{}");
        assert_eq!(
            (
                m.usage.input,
                m.usage.cached_input,
                m.usage.output,
                m.usage.reasoning
            ),
            (10, 1, 5, 2)
        );
        let body =
            "{\"id\":\"r\",\"output\":[],\"usage\":{\"input_tokens\":11,\"output_tokens\":5}}";
        let m = observe_all(Endpoint::Responses, false, body, 4).finish("gpt-4o", b"{}");
        assert_eq!((m.usage.input, m.usage.output, m.estimated), (11, 5, false));
    }

    #[test]
    fn embeddings_have_input_only() {
        let body =
            "{\"object\":\"list\",\"data\":[],\"usage\":{\"prompt_tokens\":8,\"total_tokens\":8}}";
        let m = observe_all(Endpoint::Embeddings, false, body, 5)
            .finish("text-embedding-3-small", b"{}");
        assert_eq!((m.usage.input, m.usage.output, m.estimated), (8, 0, false));
    }

    #[test]
    fn a_stream_without_usage_is_estimated_from_prompt_and_text() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hello world\"}}]}\n\n",
            "data: [DONE]\n\n"
        );
        let request = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#;
        let m = observe_all(Endpoint::ChatCompletions, true, body, 9).finish("gpt-4o", request);
        assert!(m.estimated);
        assert_eq!(m.usage.output, 2);
        // "user\nhello world\n": the role, the text and two newlines.
        assert!((3..=6).contains(&m.usage.input), "{m:?}");
    }

    #[test]
    fn usage_objects_are_told_from_nulls_without_parsing() {
        assert!(has_usage_object(br#"{"usage":{"a":1}}"#));
        assert!(has_usage_object(br#"{"usage" : {"a":1}}"#));
        assert!(has_usage_object(br#"{"x":"usage","usage":{}}"#));
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(!has_usage_object(
            br#"{"usage": null, "text": "\"usage\""}"#
        ));
        assert!(!has_usage_object(br#"{"usage""#));
    }

    #[test]
    fn frames_are_copied_not_kept() {
        // A frame as hyper hands it on: a slice of a larger read buffer.
        let mut read_buf = bytes::BytesMut::with_capacity(8192);
        read_buf.extend_from_slice(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n");
        let frame = read_buf.split().freeze();
        drop(read_buf);
        let mut o = UsageObserver::new(Endpoint::ChatCompletions, true);
        o.observe(&frame);
        assert!(
            frame.is_unique(),
            "the observer keeps no reference to the frame"
        );
        assert_eq!(
            o.held_bytes(),
            2,
            "of an event stream, only the text 'hi' is kept"
        );
        let m = o.finish("gpt-4o", b"{}");
        assert!(m.estimated);
        assert_eq!(m.usage.output, 1, "'hi' is one token");
    }

    #[test]
    fn frames_are_kept_whole_for_the_audit_log_when_asked() {
        let mut o = UsageObserver::new(Endpoint::ChatCompletions, true).holding_frames(true);
        for chunk in CHAT_STREAM.as_bytes().chunks(7) {
            o.observe(&Bytes::copy_from_slice(chunk));
        }
        assert_eq!(o.held_text(), CHAT_STREAM);
        assert!(!o.finish("gpt-4o", b"{}").estimated);
    }

    #[test]
    fn the_text_of_events_is_picked_out_as_a_parse_would_find_it() {
        let cases = [
            r#"{"choices":[{"delta":{"content":"a \"quoted\" \u00e9 \ud83d\ude00 word"}}]}"#,
            r#"{"type":"content_block_delta","delta":{"type":"input_json_delta","partial_json":"{\"k\": 1}"}}"#,
            r#"{"type":"response.output_text.delta","delta":"x","content":["not","keyed"]}"#,
            r#"{ "content" : "spaced" , "text":{"content":"nested"}, "role":"content"}"#,
            r#"{"tool_calls":[{"function":{"name":"f","arguments":"{\"a\":[1,2]}"}}]}"#,
        ];
        for json in cases {
            let mut scanned = String::new();
            generated_text(json.as_bytes(), &mut scanned);
            let mut parsed = String::new();
            collect_generated_text(&serde_json::from_str(json).unwrap(), &mut parsed);
            assert_eq!(sorted(&scanned), sorted(&parsed), "{json}");
        }
        // Not JSON: whatever the scan finds, and no panic.
        for (data, found) in [
            ("[DONE]", ""),
            (r#"{"content":"cut off"#, "cut off"),
            (r#"{"content":"ends in \"#, r#"ends in \"#),
            ("{{{{[[[", ""),
        ] {
            let mut scanned = String::new();
            generated_text(data.as_bytes(), &mut scanned);
            assert_eq!(scanned, found, "{data}");
        }
        // No depth to keep track of: deep nesting is found as a parse finds it.
        let deep = "[".repeat(100) + r#"{"content":"deep"}"# + &"]".repeat(100);
        let mut scanned = String::new();
        generated_text(deep.as_bytes(), &mut scanned);
        assert_eq!(scanned, "deep");
        // In document order, whatever the key.
        let mut scanned = String::new();
        generated_text(
            br#"{"text":"1","content":"2","delta":{"text":"3"},"arguments":"4","text":"5"}"#,
            &mut scanned,
        );
        assert_eq!(scanned, "12345");
        // A key's name as a value, or escaped inside one, is not a key.
        let mut scanned = String::new();
        generated_text(
            br#"{"role":"content","note":"say "text": no","x\":1,"content" :"yes"}"#,
            &mut scanned,
        );
        assert_eq!(scanned, "yes");
    }

    fn sorted(s: &str) -> Vec<char> {
        let mut chars: Vec<char> = s.chars().collect();
        chars.sort_unstable();
        chars
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop_oneof![
            proptest::sample::select(GENERATED_KEYS.to_vec()).prop_map(str::to_owned),
            "[a-z_]{1,8}",
            ".{0,6}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::vec((key.clone(), inner), 0..5)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn scanning_finds_what_parsing_finds(value in json_value(), pretty in proptest::bool::ANY) {
            let json = if pretty {
                serde_json::to_vec_pretty(&value).unwrap()
            } else {
                serde_json::to_vec(&value).unwrap()
            };
            let mut scanned = String::new();
            generated_text(&json, &mut scanned);
            let mut parsed = String::new();
            collect_generated_text(&value, &mut parsed);
            proptest::prop_assert_eq!(sorted(&scanned), sorted(&parsed));
        }
    }

    #[test]
    fn other_endpoints_cost_nothing() {
        let m = observe_all(
            Endpoint::Other,
            false,
            "{\"usage\":{\"prompt_tokens\":5}}",
            3,
        )
        .finish("x", b"");
        assert_eq!(m, Metered::default());
    }
}
