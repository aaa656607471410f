//! The HTTP/1.1 client for plain-TCP upstreams, against an upstream scripted byte by
//! byte: every way a response body can be framed, interim responses, kept-alive and
//! stale connections, broken heads, and uploads of unknown length.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream answers to one request.
struct Reply {
    bytes: &'static [u8],
    /// Close the connection this long after answering.
    close_after: Option<Duration>,
    /// Answer as soon as the head is read, without reading the body.
    early: bool,
}

fn reply(bytes: &'static [u8]) -> Reply {
    Reply {
        bytes,
        close_after: None,
        early: false,
    }
}

fn closing(bytes: &'static [u8]) -> Reply {
    Reply {
        bytes,
        close_after: Some(Duration::ZERO),
        early: false,
    }
}

/// The requests an upstream read, each with the number of its connection.
type Seen = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

/// An upstream that answers each request with the next scripted reply and records the
/// requests it read, with the number of the connection each came on.
struct Scripted {
    url: String,
    seen: Seen,
}

impl Scripted {
    async fn start(replies: Vec<Reply>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let replies = Arc::new(Mutex::new(VecDeque::from(replies)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            for conn in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, conn, replies.clone(), record.clone()));
            }
        });
        Scripted { url, seen }
    }

    fn requests(&self) -> Vec<(usize, Vec<u8>)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    conn: usize,
    replies: Arc<Mutex<VecDeque<Reply>>>,
    seen: Seen,
) {
    let mut buf = Vec::new();
    loop {
        let early = replies.lock().unwrap().front().is_some_and(|r| r.early);
        let request = if early {
            read_head_only(&mut stream, &mut buf).await
        } else {
            read_request(&mut stream, &mut buf).await
        };
        let Some(request) = request else {
            return;
        };
        seen.lock().unwrap().push((conn, request));
        let Some(reply) = replies.lock().unwrap().pop_front() else {
            return;
        };
        // In two writes, a moment apart: the proxy must piece a head together.
        let (first, rest) = reply.bytes.split_at(reply.bytes.len().min(12));
        if stream.write_all(first).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        if stream.write_all(rest).await.is_err() {
            return;
        }
        if let Some(after) = reply.close_after {
            tokio::time::sleep(after).await;
            return;
        }
    }
}

/// One whole request (head and body, by its length or chunked) from `stream`.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let body_start = end + 4;
            let complete = if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
            {
                let len: usize = len.trim().parse().unwrap();
                (buf.len() >= body_start + len).then_some(body_start + len)
            } else if head.contains("transfer-encoding: chunked") {
                find(&buf[body_start..], b"0\r\n\r\n").map(|i| body_start + i + 5)
            } else {
                Some(body_start)
            };
            if let Some(complete) = complete {
                return Some(buf.drain(..complete).collect());
            }
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A request's head alone.
async fn read_head_only(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    while find(buf, b"\r\n\r\n").is_none() {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(std::mem::take(buf))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn config_for(upstream: &Scripted) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[providers]]
name = "local"
kind = "openai"
base_url = "{url}"
prefix = "/openai"
[[agents]]
id = "agent-a"
key_sha256 = "{a}"
"#,
        url = upstream.url,
        a = tokenwarden::identity::key_digest_hex(KEY_A),
    )
}

async fn get_models(proxy: &Proxy) -> (http::StatusCode, http::HeaderMap, bytes::Bytes) {
    get(
        &proxy.url("/openai/v1/models"),
        &[("authorization", &bearer(KEY_A))],
    )
    .await
}

#[tokio::test]
async fn every_framing_of_a_response_body_arrives_whole() {
    let cases: [(&'static [u8], u16, &[u8]); 7] = [
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            200,
            b"hello",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\n",
            200,
            b"hello, world",
        ),
        (
            // Both: the transfer coding frames the body, and the length is dropped.
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            200,
            b"ok",
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            201,
            b"ok",
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
        (
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\ncontent-type: application/json\r\n\r\n{\"e\":404}",
            404,
            b"{\"e\":404}",
        ),
        (
            b"HTTP/1.0 200 OK\r\n\r\nuntil the connection closes",
            200,
            b"until the connection closes",
        ),
    ];
    let upstream = Scripted::start(
        cases
            .iter()
            .map(|(bytes, _, _)| Reply {
                bytes,
                // A body that ends with its connection must see that end.
                close_after: bytes.starts_with(b"HTTP/1.0").then_some(Duration::ZERO),
                early: false,
            })
            .collect(),
    )
    .await;
    let proxy = Proxy::start(&config_for(&upstream));
    for (wire, status, body) in cases {
        let (got_status, headers, got) = get_models(&proxy).await;
        let case = String::from_utf8_lossy(wire);
        assert_eq!(got_status, status, "{case}");
        assert_eq!(&got[..], body, "{case}");
        assert!(headers.contains_key("x-tokenwarden-request-id"), "{case}");
    }
    // The request went out as HTTP/1.1 with the upstream's host and no client key.
    let (_, first) = &upstream.requests()[0];
    let text = String::from_utf8_lossy(first);
    assert!(text.starts_with("GET /v1/models HTTP/1.1\r\n"), "{text}");
    assert!(
        text.contains(&format!(
            "host: {}\r\n",
            upstream.url.trim_start_matches("http://")
        )),
        "{text}"
    );
    assert!(!text.contains(KEY_A), "{text}");
}

/// The upstream's HTTP version is its connection's business: a client speaking HTTP/1.1
/// gets HTTP/1.1 answers on a connection that stays open, even from an HTTP/1.0 upstream.
#[tokio::test]
async fn an_http_1_0_upstream_does_not_make_the_client_connection_http_1_0() {
    let upstream = Scripted::start(vec![
        closing(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"a\":1}"),
        closing(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"b\":2}"),
    ])
    .await;
    let proxy = Proxy::start(&config_for(&upstream));
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    for body in ["{\"a\":1}", "{\"b\":2}"] {
        let head = format!(
            "GET /openai/v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        // The answer's body comes chunked (its length was unknown): read to its last chunk.
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while find(&answer, b"\r\n0\r\n\r\n").is_none() {
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        assert!(text.contains(body), "{text}");
    }
}

#[tokio::test]
async fn a_kept_alive_connection_serves_the_next_request_and_a_closed_one_does_not() {
    // After b and after c the upstream closes the idle connection, as servers with a
    // short keep-alive do.
    let closes_soon = |bytes| Reply {
        bytes,
        close_after: Some(Duration::from_millis(10)),
        early: false,
    };
    let upstream = Scripted::start(vec![
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"),
        closes_soon(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"),
        closes_soon(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nc"),
        reply(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nd"),
    ])
    .await;
    let proxy = Proxy::start(&config_for(&upstream));
    // Not a 502 after a close: a connection idle for moments is checked by tokio's
    // readiness, one idle for longer by asking the kernel.
    for (pause, expected) in [(0, "a"), (0, "b"), (200, "c"), (700, "d")] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let (status, _, body) = get_models(&proxy).await;
        assert_eq!((status.as_u16(), &body[..]), (200, expected.as_bytes()));
    }
    let conns: Vec<usize> = upstream.requests().iter().map(|(c, _)| *c).collect();
    assert_eq!(conns, [0, 0, 1, 2]);
}

#[tokio::test]
async fn a_broken_response_head_is_a_502_in_the_providers_shape() {
    for wire in [
        &b"HTTP/1.1 2x0 OK\r\n\r\n"[..],
        b"not http at all\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        // A head past 64 KiB.
        format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(70_000))
            .leak()
            .as_bytes(),
    ] {
        let upstream = Scripted::start(vec![closing(wire)]).await;
        let proxy = Proxy::start(&config_for(&upstream));
        let (status, _, body) = get_models(&proxy).await;
        let case = String::from_utf8_lossy(&wire[..wire.len().min(60)]);
        assert_eq!(status, 502, "{case}");
        let error = json(&body);
        assert!(error["error"]["message"].is_string(), "{case}: {error}");
        assert!(error["error"]["type"].is_string(), "{case}: {error}");
    }
}

#[tokio::test]
async fn a_body_cut_short_by_the_upstream_is_not_a_clean_end() {
    for (wire, before_the_cut) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ncontent-type: text/plain\r\n\r\nonly part"
                [..],
            &b"only part"[..],
        ),
        // Broken chunked coding in the same read as good data: the good data first.
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
            b"hello",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"hello",
        ),
    ] {
        let upstream = Scripted::start(vec![closing(wire)]).await;
        let proxy = Proxy::start(&config_for(&upstream));
        let response = client()
            .request(request(
                "GET",
                &proxy.url("/openai/v1/models"),
                &[("authorization", &bearer(KEY_A))],
                bytes::Bytes::new(),
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut received = Vec::new();
        let end = loop {
            match http_body_util::BodyExt::frame(&mut body).await {
                Some(Ok(frame)) => received.extend_from_slice(frame.data_ref().unwrap()),
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            }
        };
        let case = String::from_utf8_lossy(wire);
        assert!(end.is_err(), "{case}: a cut body ended cleanly");
        assert_eq!(received, before_the_cut, "{case}: the bytes before the cut");
    }
}

#[tokio::test]
async fn an_answer_before_the_upload_ends_reaches_the_client() {
    let upstream = Scripted::start(vec![Reply {
        bytes: b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!",
        close_after: Some(Duration::ZERO),
        early: true,
    }])
    .await;
    let proxy = Proxy::start(&config_for(&upstream));
    let upload = vec![b'x'; 8 << 20];
    let (status, _, body) = send(request(
        "POST",
        &proxy.url("/openai/v1/files"),
        &[
            ("authorization", &bearer(KEY_A)),
            ("content-type", "application/octet-stream"),
        ],
        upload,
    ))
    .await;
    assert_eq!((status.as_u16(), &body[..]), (413, &b"too big!"[..]));
}

#[tokio::test]
async fn an_upload_of_unknown_length_goes_out_chunked() {
    let upstream = Scripted::start(vec![reply(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )])
    .await;
    let proxy = Proxy::start(&config_for(&upstream));
    let addr = proxy.url("").trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(addr.trim_end_matches('/'))
        .await
        .unwrap();
    let head = format!(
        "POST /openai/v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY_A}\r\n\
         content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(b"5\r\nhello\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    stream.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while find(&answer, b"\r\n\r\nok").is_none() {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    let (_, sent) = &upstream.requests()[0];
    let text = String::from_utf8_lossy(sent).into_owned();
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let mut decoded = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        if size == 0 {
            break;
        }
        decoded.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    assert_eq!(decoded, "hello world");
}
