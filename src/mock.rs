//! A scriptable mock provider for tests, benchmarks and the demo.
//!
//! It speaks enough of both wire formats for the official SDKs: OpenAI chat completions,
//! legacy completions, Responses, embeddings and models; Anthropic messages; each stream
//! and not. Every response reports usage that follows from the request, so metering can
//! be checked to the token.
//!
//! Requests script it through headers (which the proxy passes through untouched):
//!
//! | header | effect |
//! | --- | --- |
//! | `x-mock-chunks: N` | N content pieces (default 5); each is one output token |
//! | `x-mock-delay-ms: D` | D ms between streamed pieces |
//! | `x-mock-first-byte-ms: D` | wait D ms before the response headers |
//! | `x-mock-status: S` | answer status S with an error body (and `retry-after: 1`) |
//! | `x-mock-fault: reset` | close the connection without answering |
//! | `x-mock-fault: drop-mid-stream` | stream half the pieces, then reset |
//! | `x-mock-fault: stall` | send headers, then nothing |
//! | `x-mock-fault: stall-mid-stream` | stream half the pieces, then nothing |
//! | `x-mock-fault: malformed-sse` | mix broken events (bad JSON, fields without colon, stray CRs) into the stream |
//! | `x-mock-fault: invalid-utf8` | mix an event of invalid UTF-8 into the stream |
//! | `x-mock-fault: huge-line` | send one 10 MB `data:` line in the middle of the stream |
//! | `x-mock-usage-output: N` | report N output tokens, whatever was streamed |
//! | `x-mock-gzip: 1` | gzip a non-streamed body (`content-encoding: gzip`) |
//! | `x-mock-cached-tokens: N`, `x-mock-reasoning-tokens: N`, `x-mock-cache-write-tokens: N` | usage details |
//!
//! `GET /mock/requests` lists the last requests received (headers, body length and
//! SHA-256, how the response ended), for tests to check what reached the provider.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64_shim::encode_f32_le;
use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Write as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

type Chunk = Result<Frame<Bytes>, std::io::Error>;
type MockBody = Either<Full<Bytes>, StreamBody<ReceiverStream<Chunk>>>;

enum Reply {
    Json(Value),
    Stream(Vec<Bytes>),
}

/// Most recent requests kept for `/mock/requests`.
const REQUEST_LOG_LEN: usize = 1000;
const CREATED: u64 = 1_700_000_000;

/// What the mock saw of one request.
#[derive(Debug, Clone, Serialize)]
pub struct SeenRequest {
    pub seq: u64,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    pub body_sha256: String,
    /// The output limit the request set (`max_tokens`, `max_completion_tokens` or
    /// `max_output_tokens`); the mock never writes more pieces than this.
    pub output_limit: Option<u64>,
    /// `complete`, `client_gone`, `fault`, or `pending` while a stream runs.
    pub outcome: String,
    pub chunks_sent: usize,
}

#[derive(Default)]
struct Log {
    next_seq: u64,
    seen: VecDeque<SeenRequest>,
}

/// The mock's shared state.
#[derive(Clone)]
pub struct Mock {
    log: Option<Arc<Mutex<Log>>>,
}

impl Mock {
    /// `record = false` skips the request log, for load tests.
    pub fn new(record: bool) -> Mock {
        Mock {
            log: record.then(|| Arc::new(Mutex::new(Log::default()))),
        }
    }

    /// Serves on `listener`, over TLS with `tls`, until the task is dropped.
    pub async fn serve(self, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let mock = self.clone();
            let service = service_fn(move |req| {
                let mock = mock.clone();
                async move { mock.handle(req).await }
            });
            let builder = builder.clone();
            match &tls {
                None => {
                    let conn = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                Some(acceptor) => {
                    let handshake = acceptor.accept(stream);
                    tokio::spawn(async move {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(Duration::from_secs(10), handshake).await
                        else {
                            return;
                        };
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        }
    }

    fn record(&self, parts: &http::request::Parts, body: &[u8]) -> u64 {
        let Some(log) = &self.log else { return 0 };
        let seen = SeenRequest {
            seq: 0,
            version: format!("{:?}", parts.version),
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect(),
            body_len: body.len(),
            body_sha256: hex::encode(Sha256::digest(body)),
            output_limit: output_limit(body),
            outcome: "pending".into(),
            chunks_sent: 0,
        };
        let mut log = lock(log);
        log.next_seq += 1;
        let seq = log.next_seq;
        if log.seen.len() == REQUEST_LOG_LEN {
            log.seen.pop_front();
        }
        log.seen.push_back(SeenRequest { seq, ..seen });
        seq
    }

    fn finish(&self, seq: u64, outcome: &str, chunks_sent: usize) {
        let Some(log) = &self.log else { return };
        let mut log = lock(log);
        if let Some(seen) = log.seen.iter_mut().rev().find(|s| s.seq == seq) {
            seen.outcome = outcome.into();
            seen.chunks_sent = chunks_sent;
        }
    }

    fn requests_json(&self) -> Bytes {
        let seen: Vec<SeenRequest> = match &self.log {
            Some(log) => lock(log).seen.iter().cloned().collect(),
            None => Vec::new(),
        };
        Bytes::from(serde_json::to_vec(&seen).unwrap_or_default())
    }

    async fn handle(&self, req: Request<Incoming>) -> Result<Response<MockBody>, std::io::Error> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        if parts.uri.path() == "/mock/requests" {
            return Ok(full(StatusCode::OK, self.requests_json()));
        }
        let seq = self.record(&parts, &body);
        let script = Script::from_headers(&parts.headers);
        if script.first_byte_ms > 0 {
            tokio::time::sleep(Duration::from_millis(script.first_byte_ms)).await;
        }
        match script.fault.as_deref() {
            Some("reset") => {
                self.finish(seq, "fault", 0);
                return Err(std::io::Error::other("mock: reset before headers"));
            }
            Some("stall") => {
                let (tx, rx) = mpsc::channel::<Chunk>(1);
                let mock = self.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tx.closed() => {}
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                    mock.finish(seq, "client_gone", 0);
                });
                return Ok(sse_response(rx));
            }
            _ => {}
        }
        if let Some(status) = script.status {
            self.finish(seq, "complete", 0);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = full(
                status,
                Bytes::from(
                    json!({"error": {"message": "mock failure", "type": "server_error",
                                     "param": null, "code": null}})
                    .to_string(),
                ),
            );
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            return Ok(response);
        }

        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut script = script;
        if let Some(limit) = output_limit(&body) {
            script.chunks = script
                .chunks
                .min(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        let prompt_tokens = (body.len() as u64 / 4).max(1);
        let ctx = Ctx {
            model: request["model"].as_str().unwrap_or("mock-model").to_owned(),
            prompt_tokens,
            script,
        };
        let stream = request["stream"].as_bool().unwrap_or(false);
        let include_usage = request["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        let reply = match (&parts.method, parts.uri.path()) {
            (&Method::POST, "/v1/chat/completions") if stream => {
                Reply::Stream(chat_stream(&ctx, include_usage))
            }
            (&Method::POST, "/v1/chat/completions") => Reply::Json(chat(&ctx)),
            (&Method::POST, "/v1/completions") if stream => {
                Reply::Stream(completion_stream(&ctx, include_usage))
            }
            (&Method::POST, "/v1/completions") => Reply::Json(completion(&ctx)),
            (&Method::POST, "/v1/responses") if stream => Reply::Stream(responses_stream(&ctx)),
            (&Method::POST, "/v1/responses") => Reply::Json(responses(&ctx)),
            (&Method::POST, "/v1/embeddings") => Reply::Json(embeddings(&ctx, &request)),
            (&Method::GET, "/v1/models") => Reply::Json(models()),
            (&Method::POST, "/v1/messages") if stream => Reply::Stream(messages_stream(&ctx)),
            (&Method::POST, "/v1/messages") => Reply::Json(messages(&ctx)),
            _ => {
                self.finish(seq, "complete", 0);
                let body = json!({"error": {"message": "mock: unknown path",
                    "type": "invalid_request_error", "param": null, "code": "unknown_url"}});
                return Ok(full(StatusCode::NOT_FOUND, Bytes::from(body.to_string())));
            }
        };
        Ok(match reply {
            Reply::Json(body) => self.done(seq, body, &ctx.script),
            Reply::Stream(events) => self.stream(seq, events, &ctx.script),
        })
    }

    fn done(&self, seq: u64, body: Value, script: &Script) -> Response<MockBody> {
        self.finish(seq, "complete", 1);
        let body = body.to_string();
        let mut response = if script.gzip {
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            let _ = gz.write_all(body.as_bytes());
            let mut response = full(StatusCode::OK, Bytes::from(gz.finish().unwrap_or_default()));
            response
                .headers_mut()
                .insert("content-encoding", HeaderValue::from_static("gzip"));
            response
        } else {
            full(StatusCode::OK, Bytes::from(body))
        };
        response
            .headers_mut()
            .insert("x-request-id", HeaderValue::from_static("req_mock"));
        response
    }

    /// Streams pre-rendered SSE events, one frame each, with the scripted pauses and faults.
    fn stream(&self, seq: u64, mut events: Vec<Bytes>, script: &Script) -> Response<MockBody> {
        // After the first half of the pieces, wherever the events that close the stream
        // (a usage report, `[DONE]`) come.
        let middle = (1 + script.chunks / 2).min(events.len());
        match script.fault.as_deref() {
            Some("malformed-sse") => {
                let broken: [&'static [u8]; 5] = [
                    b"data: {\"choices\": [unterminated\n\n",
                    b"datawithoutcolon\n\n",
                    b"event: \rdata: stray carriage return\r\r",
                    b": a comment\ndata\n\n",
                    b"data: {\"usage\": {\"prompt_tokens\": \"many\"}}\n\n",
                ];
                for (i, b) in broken.into_iter().enumerate() {
                    events.insert(middle + i, Bytes::from_static(b));
                }
            }
            Some("invalid-utf8") => {
                events.insert(
                    middle,
                    Bytes::from_static(b"data: \xff\xfe{\"x\":\xc3\x28}\n\n"),
                );
            }
            Some("huge-line") => {
                let mut line = Vec::with_capacity(10 * 1024 * 1024 + 16);
                line.extend_from_slice(b"data: ");
                line.resize(10 * 1024 * 1024, b'a');
                line.extend_from_slice(b"\n\n");
                events.insert(middle, Bytes::from(line));
            }
            _ => {}
        }
        let (tx, rx) = mpsc::channel::<Chunk>(1);
        let mock = self.clone();
        let delay = Duration::from_millis(script.delay_ms);
        let cut_at = match script.fault.as_deref() {
            Some("drop-mid-stream") | Some("stall-mid-stream") => Some(events.len() / 2),
            _ => None,
        };
        let stall = script.fault.as_deref() == Some("stall-mid-stream");
        tokio::spawn(async move {
            let mut sent = 0;
            for (i, event) in events.into_iter().enumerate() {
                if cut_at == Some(i) {
                    let outcome = if stall {
                        tokio::select! {
                            _ = tx.closed() => "client_gone",
                            _ = tokio::time::sleep(Duration::from_secs(60)) => "fault",
                        }
                    } else {
                        let reset = std::io::Error::other("mock: drop mid-stream");
                        let _ = tx.send(Err(reset)).await;
                        "fault"
                    };
                    mock.finish(seq, outcome, sent);
                    return;
                }
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if tx.send(Ok(Frame::data(event))).await.is_err() {
                    mock.finish(seq, "client_gone", sent);
                    return;
                }
                sent += 1;
            }
            // Every frame is handed over; dropping the sender ends the body.
            drop(tx);
            mock.finish(seq, "complete", sent);
        });
        sse_response(rx)
    }
}

/// The output limit a request body sets, in any of the wire formats.
fn output_limit(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| v[*k].as_u64())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves the log usable; the mock never panics there.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn full(status: StatusCode, body: Bytes) -> Response<MockBody> {
    let mut response = Response::new(Either::Left(Full::new(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn sse_response(rx: mpsc::Receiver<Chunk>) -> Response<MockBody> {
    let mut response = Response::new(Either::Right(StreamBody::new(ReceiverStream::new(rx))));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-request-id", HeaderValue::from_static("req_mock"));
    response
}

/// What the request's `x-mock-*` headers ask for.
#[derive(Debug, Default)]
struct Script {
    chunks: usize,
    delay_ms: u64,
    first_byte_ms: u64,
    status: Option<u16>,
    fault: Option<String>,
    cached_tokens: u64,
    reasoning_tokens: u64,
    cache_write_tokens: u64,
    gzip: bool,
    /// Output tokens to report instead of the pieces streamed.
    usage_output: Option<u64>,
}

impl Script {
    fn from_headers(h: &HeaderMap) -> Script {
        let num = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Script {
            chunks: num("x-mock-chunks").unwrap_or(5) as usize,
            delay_ms: num("x-mock-delay-ms").unwrap_or(0),
            first_byte_ms: num("x-mock-first-byte-ms").unwrap_or(0),
            status: num("x-mock-status").and_then(|s| u16::try_from(s).ok()),
            fault: h
                .get("x-mock-fault")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            cached_tokens: num("x-mock-cached-tokens").unwrap_or(0),
            reasoning_tokens: num("x-mock-reasoning-tokens").unwrap_or(0),
            cache_write_tokens: num("x-mock-cache-write-tokens").unwrap_or(0),
            gzip: h.contains_key("x-mock-gzip"),
            usage_output: num("x-mock-usage-output"),
        }
    }
}

struct Ctx {
    model: String,
    prompt_tokens: u64,
    script: Script,
}

impl Ctx {
    fn output_tokens(&self) -> u64 {
        self.script
            .usage_output
            .unwrap_or(self.script.chunks as u64)
    }

    fn pieces(&self) -> impl Iterator<Item = String> {
        (0..self.script.chunks).map(|i| format!("tok{i} "))
    }

    fn text(&self) -> String {
        self.pieces().collect()
    }

    fn openai_usage(&self) -> Value {
        let (p, c) = (self.prompt_tokens, self.output_tokens());
        json!({
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": self.script.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.script.reasoning_tokens,
                                           "audio_tokens": 0}
        })
    }

    fn responses_usage(&self) -> Value {
        let (p, c) = (self.prompt_tokens, self.output_tokens());
        json!({
            "input_tokens": p,
            "input_tokens_details": {"cached_tokens": self.script.cached_tokens},
            "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens": self.script.reasoning_tokens},
            "total_tokens": p + c
        })
    }

    fn anthropic_usage(&self, output_tokens: u64) -> Value {
        json!({
            "input_tokens": self.prompt_tokens,
            "cache_creation_input_tokens": self.script.cache_write_tokens,
            "cache_read_input_tokens": self.script.cached_tokens,
            "output_tokens": output_tokens
        })
    }
}

fn data_event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn named_event(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

// === OpenAI ===

fn chat(ctx: &Ctx) -> Value {
    json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": CREATED,
        "model": ctx.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ctx.text(),
                     "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": ctx.openai_usage(),
        "system_fingerprint": "fp_mock"
    })
}

fn chat_stream(ctx: &Ctx, include_usage: bool) -> Vec<Bytes> {
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
            "model": ctx.model, "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        data_event(&c)
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    )];
    events.extend(
        ctx.pieces()
            .map(|p| chunk(json!({"content": p}), Value::Null)),
    );
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(data_event(&json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": CREATED,
            "model": ctx.model, "system_fingerprint": "fp_mock", "choices": [],
            "usage": ctx.openai_usage()
        })));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn completion(ctx: &Ctx) -> Value {
    json!({
        "id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": ctx.model,
        "choices": [{"text": ctx.text(), "index": 0, "logprobs": null, "finish_reason": "stop"}],
        "usage": ctx.openai_usage()
    })
}

fn completion_stream(ctx: &Ctx, include_usage: bool) -> Vec<Bytes> {
    let chunk = |text: String, finish: Value| {
        let mut c = json!({
            "id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": ctx.model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        data_event(&c)
    };
    let mut events: Vec<Bytes> = ctx.pieces().map(|p| chunk(p, Value::Null)).collect();
    events.push(chunk(String::new(), json!("stop")));
    if include_usage {
        events.push(data_event(&json!({
            "id": "cmpl-mock", "object": "text_completion", "created": CREATED,
            "model": ctx.model, "choices": [], "usage": ctx.openai_usage()
        })));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

fn response_object(ctx: &Ctx, status: &str, with_output: bool) -> Value {
    let output = if with_output {
        json!([{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": ctx.text(), "annotations": []}]}])
    } else {
        json!([])
    };
    json!({
        "id": "resp_mock", "object": "response", "created_at": CREATED, "status": status,
        "model": ctx.model, "output": output, "parallel_tool_calls": true,
        "tool_choice": "auto", "tools": [], "error": null, "incomplete_details": null,
        "usage": if with_output { ctx.responses_usage() } else { Value::Null }
    })
}

fn responses(ctx: &Ctx) -> Value {
    response_object(ctx, "completed", true)
}

fn responses_stream(ctx: &Ctx) -> Vec<Bytes> {
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        seq - 1
    };
    let mut events = vec![
        named_event(
            "response.created",
            &json!({"type": "response.created", "sequence_number": next(),
                    "response": response_object(ctx, "in_progress", false)}),
        ),
        named_event(
            "response.output_item.added",
            &json!({"type": "response.output_item.added", "sequence_number": next(),
                    "output_index": 0,
                    "item": {"type": "message", "id": "msg_mock", "status": "in_progress",
                             "role": "assistant", "content": []}}),
        ),
        named_event(
            "response.content_part.added",
            &json!({"type": "response.content_part.added", "sequence_number": next(),
                    "item_id": "msg_mock", "output_index": 0, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for piece in ctx.pieces() {
        events.push(named_event(
            "response.output_text.delta",
            &json!({"type": "response.output_text.delta", "sequence_number": next(),
                    "item_id": "msg_mock", "output_index": 0, "content_index": 0,
                    "delta": piece}),
        ));
    }
    events.push(named_event(
        "response.output_text.done",
        &json!({"type": "response.output_text.done", "sequence_number": next(),
                "item_id": "msg_mock", "output_index": 0, "content_index": 0,
                "text": ctx.text()}),
    ));
    events.push(named_event(
        "response.content_part.done",
        &json!({"type": "response.content_part.done", "sequence_number": next(),
                "item_id": "msg_mock", "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": ctx.text(), "annotations": []}}),
    ));
    events.push(named_event(
        "response.output_item.done",
        &json!({"type": "response.output_item.done", "sequence_number": next(),
                "output_index": 0,
                "item": {"type": "message", "id": "msg_mock", "status": "completed",
                         "role": "assistant",
                         "content": [{"type": "output_text", "text": ctx.text(),
                                      "annotations": []}]}}),
    ));
    events.push(named_event(
        "response.completed",
        &json!({"type": "response.completed", "sequence_number": next(),
                "response": response_object(ctx, "completed", true)}),
    ));
    events
}

fn embeddings(ctx: &Ctx, request: &Value) -> Value {
    let inputs = match &request["input"] {
        Value::Array(items) if !items.is_empty() && !items[0].is_number() => items.len(),
        _ => 1,
    };
    let base64 = request["encoding_format"].as_str() == Some("base64");
    let data: Vec<Value> = (0..inputs)
        .map(|i| {
            let vector = [0.1f32 * (i as f32 + 1.0), 0.2, 0.3];
            let embedding = if base64 {
                json!(encode_f32_le(&vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list", "data": data, "model": ctx.model,
        "usage": {"prompt_tokens": ctx.prompt_tokens, "total_tokens": ctx.prompt_tokens}
    })
}

fn models() -> Value {
    let model =
        |id: &str| json!({"id": id, "object": "model", "created": CREATED, "owned_by": "mock"});
    json!({"object": "list", "data": [model("gpt-4o-mini"), model("gpt-4o"), model("o3-mini")]})
}

// === Anthropic ===

fn messages(ctx: &Ctx) -> Value {
    json!({
        "id": "msg_mock", "type": "message", "role": "assistant", "model": ctx.model,
        "content": [{"type": "text", "text": ctx.text()}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": ctx.anthropic_usage(ctx.output_tokens())
    })
}

fn messages_stream(ctx: &Ctx) -> Vec<Bytes> {
    let mut events = vec![
        named_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "model": ctx.model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": ctx.anthropic_usage(1)}}),
        ),
        named_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        ),
        named_event("ping", &json!({"type": "ping"})),
    ];
    for piece in ctx.pieces() {
        events.push(named_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push(named_event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(named_event(
        "message_delta",
        &json!({"type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": ctx.output_tokens()}}),
    ));
    events.push(named_event(
        "message_stop",
        &json!({"type": "message_stop"}),
    ));
    events
}

/// Starts a mock on `addr` in the background and returns its address; for tests.
pub async fn spawn(
    addr: &str,
    record: bool,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(Mock::new(record).serve(listener, None));
    Ok((local, task))
}

mod base64_shim {
    /// Standard base64 of little-endian f32s, as OpenAI's `encoding_format: "base64"`.
    pub fn encode_f32_le(values: &[f32]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn encodes_like_base64() {
            // 1.0f32 = 00 00 80 3f
            assert_eq!(super::encode_f32_le(&[1.0]), "AACAPw==");
        }
    }
}
