//! A pooled HTTP/1.1 client for plain-TCP upstreams (a local vLLM or Ollama, a mock).
//!
//! Why not hyper's client here: a hyper-util connection holds an 8 KiB read buffer, an
//! 8 KiB write buffer and a request channel of 32 slots (9 KiB) for as long as it lives,
//! runs in a task of its own, and hands every frame across tasks. On an open stream that
//! is more memory than a whole nginx connection. Here a connection is a socket and a few
//! words of state: the response body reads straight from the socket inside the client's
//! own task, through a buffer on the stack, and copies each read to its exact size. TLS
//! upstreams (HTTP/2 by ALPN) keep hyper's client.
//!
//! It never retries: a retry could bill twice, and the SDKs retry on their own. A pooled
//! connection is checked before reuse (a peer that closed it has left an end of file to
//! read), so a request is not sent down a connection known to be gone.

use std::fmt::Write;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
// Keyed by the authorities of configured providers: a fast hash, seeded per process.
use hashbrown::HashMap;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Largest response head read; a provider's is a few hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers accepted, as hyper's default.
const MAX_HEADERS: usize = 100;
/// The stack buffer a response body is read through.
const READ_CHUNK: usize = 16 * 1024;
/// Below this idle time a pooled connection is checked without a system call.
const FRESH: Duration = Duration::from_millis(500);
/// The head buffer's least size: a response head fits in it.
const HEAD_BUFFER: usize = 1024;
/// A request body up to this size is written in one call with its head.
const INLINE_BODY: usize = 64 * 1024;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("the request body failed: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("connection failed: {0}")]
    Io(#[source] io::Error),
    #[error("connection closed before the response head")]
    Closed,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

impl Error {
    /// The upstream could not be reached at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_) | Error::ConnectTimeout)
    }
}

/// Settings taken from `[upstream]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
}

/// Keep-alive connections by the upstream's `host[:port]`, each with when it went idle.
struct Pool {
    settings: Settings,
    idle: Mutex<HashMap<Box<str>, Vec<Idle>>>,
}

struct Idle {
    stream: TcpStream,
    since: Instant,
}

/// The client: cheap to share, one pool for every plain-TCP provider.
#[derive(Clone)]
pub struct Client {
    pool: Arc<Pool>,
}

impl Client {
    pub fn new(settings: Settings) -> Client {
        let idle = Mutex::default();
        Client {
            pool: Arc::new(Pool { settings, idle }),
        }
    }

    /// Sends `req` (an `http://` URI) and returns the response once its head has arrived;
    /// the body then reads from the connection as the caller polls it.
    pub async fn request<B>(&self, req: Request<B>) -> Result<Response<H1Body>, Error>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let authority = parts
            .uri
            .authority()
            .ok_or(Error::Malformed("no host in the upstream URI"))?;
        let mut stream = match self.pool.check_out(authority.as_str()) {
            Some(stream) => stream,
            None => connect(authority, self.pool.settings.connect_timeout).await?,
        };

        let head_only = parts.method == Method::HEAD;
        let (head, chunked) = request_head(&parts, authority, body.size_hint().exact());
        // The client's header values are slices of the buffer hyper read them into;
        // let go of them now, or while this request waits, hyper allocates that
        // connection a second read buffer.
        let key = authority.clone();
        drop(parts);
        let (mut response, leftover) = match write_request(&mut stream, head, body, chunked).await {
            Ok(mut buf) => {
                buf.clear();
                read_head(&mut stream, buf).await?
            }
            // An upstream may answer before it has read the whole body (a 413, a 401)
            // and close: its answer, if it arrived, is the one to give.
            Err(Error::Io(e)) => match read_head(&mut stream, BytesMut::new()).await {
                Ok((mut response, rest)) => {
                    let close = HeaderValue::from_static("close");
                    response.headers_mut().insert(CONNECTION, close);
                    (response, rest)
                }
                Err(_) => return Err(Error::Io(e)),
            },
            Err(e) => return Err(e),
        };
        let framing = framing(&response, head_only)?;
        if response.headers().contains_key(TRANSFER_ENCODING) {
            // The transfer coding frames the body; a length sent beside it is wrong or
            // a smuggling attempt, and must not be forwarded (RFC 9112, section 6.3).
            response.headers_mut().remove(CONTENT_LENGTH);
        }
        let reusable = response.version() == Version::HTTP_11
            && !has_token(response.headers(), CONNECTION, "close");
        let mut body = H1Body {
            conn: Some(stream),
            leftover,
            framing,
            reusable,
            pool: self.pool.clone(),
            key,
            failed: None,
        };
        body.finish_if_done();
        Ok(response.map(|()| body))
    }
}

impl Pool {
    /// An idle connection to `key` that is still open, if any.
    fn check_out(&self, key: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(key)?;
        while let Some(Idle { stream, since }) = conns.pop() {
            if since.elapsed() >= self.settings.idle_timeout {
                continue;
            }
            // An open, quiet connection has nothing to read; one the peer closed reads
            // an end of file, and any bytes at all would be a response to nothing.
            if is_quiet(&stream, since.elapsed()) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps a connection that may serve another request, unless `key` has its fill.
    fn check_in(&self, key: &str, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.entry_ref(key).or_default();
        // Oldest first: those past the idle limit close now, not at some checkout.
        let expired = conns
            .iter()
            .position(|c| c.since.elapsed() < self.settings.idle_timeout)
            .unwrap_or(conns.len());
        conns.drain(..expired);
        if conns.len() < self.settings.max_idle_per_host {
            let since = Instant::now();
            conns.push(Idle { stream, since });
        }
    }
}

async fn connect(authority: &Authority, timeout: Duration) -> Result<TcpStream, Error> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host();
    // An IPv6 literal keeps its brackets in the URI, not in a socket address.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let stream = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| Error::ConnectTimeout)?
        .map_err(Error::Connect)?;
    stream.set_nodelay(true).map_err(Error::Connect)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    // Best effort: a connection without keepalive probes still works.
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    Ok(stream)
}

/// Whether an idle connection is still open with nothing to read. One idle for a while
/// is asked of the kernel, as servers close connections when their keep-alive runs out
/// and tokio's readiness may not yet have seen a close that arrived; one used moments
/// ago is asked of tokio's readiness, which costs no system call.
fn is_quiet(stream: &TcpStream, idle: Duration) -> bool {
    let probe = if idle < FRESH {
        stream.try_read(&mut [0u8; 1])
    } else {
        socket2::SockRef::from(stream).peek(&mut [MaybeUninit::<u8>::uninit(); 1])
    };
    matches!(probe, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// The request line and headers (the client's, less its framing, with `host` if it
/// sent none), and whether the body goes chunked: a body of unknown length does, so what
/// is on the wire is always exactly what the body gave.
fn request_head(
    parts: &http::request::Parts,
    authority: &Authority,
    body_len: Option<u64>,
) -> (BytesMut, bool) {
    // One buffer for the request head (and a small body) and then the response head,
    // whose header values end up as slices of it: sized for what goes out.
    let headers: usize = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    let body = body_len
        .filter(|&len| len <= INLINE_BODY as u64)
        .unwrap_or(0);
    let size = 128 + parts.uri.path_and_query().map_or(1, |p| p.as_str().len()) + headers;
    let mut head = BytesMut::with_capacity((size + body as usize).max(HEAD_BUFFER));
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.extend_from_slice(b" ");
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if !parts.headers.contains_key(HOST) {
        // Host and port only: credentials in a URL never go on the wire.
        head.extend_from_slice(b"host: ");
        head.extend_from_slice(authority.host().as_bytes());
        if let Some(port) = authority.port() {
            head.extend_from_slice(b":");
            head.extend_from_slice(port.as_str().as_bytes());
        }
        head.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let chunked = match body_len {
        Some(0) if !expects_body(&parts.method) && !parts.headers.contains_key(CONTENT_LENGTH) => {
            false
        }
        Some(len) => {
            write_length(&mut head, len);
            false
        }
        None => {
            head.extend_from_slice(b"transfer-encoding: chunked\r\n");
            true
        }
    };
    head.extend_from_slice(b"\r\n");
    (head, chunked)
}

/// Methods whose empty body is still sent with a length.
fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

fn write_length(head: &mut BytesMut, len: u64) {
    let _ = write!(head, "content-length: {len}\r\n");
}

/// Writes the head and the body: a small body in the same write as the head.
async fn write_request<B>(
    stream: &mut TcpStream,
    mut head: BytesMut,
    mut body: B,
    chunked: bool,
) -> Result<BytesMut, Error>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The body goes out with the head until it outgrows `INLINE_BODY`.
    let mut inlining = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::Body(e.into()))?;
        let Ok(mut data) = frame.into_data() else {
            continue; // trailers of a request are not forwarded
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let _ = write!(head, "{:x}\r\n", data.len());
        }
        if inlining && head.len() + data.len() <= INLINE_BODY {
            head.extend_from_slice(&data);
        } else {
            if !head.is_empty() {
                stream.write_all(&head).await.map_err(Error::Io)?;
                head.clear();
            }
            inlining = false;
            stream.write_all_buf(&mut data).await.map_err(Error::Io)?;
        }
        if chunked {
            head.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        head.extend_from_slice(b"0\r\n\r\n");
    }
    if !head.is_empty() {
        stream.write_all(&head).await.map_err(Error::Io)?;
    }
    Ok(head)
}

/// Reads the response head into `buf`, skipping interim (1xx) responses. Returns the
/// head, whose header values share `buf`, and the bytes read past it.
async fn read_head(
    stream: &mut TcpStream,
    mut buf: BytesMut,
) -> Result<(Response<()>, Bytes), Error> {
    use tokio::io::AsyncReadExt;
    loop {
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().max(HEAD_BUFFER));
        }
        let n = stream.read_buf(&mut buf).await.map_err(Error::Io)?;
        if n == 0 {
            return Err(Error::Closed);
        }
        // Frozen before it is parsed, so that header values can be slices of it.
        let mut read = buf.split().freeze();
        loop {
            let Some((response, len)) = parse_head(&read)? else {
                if read.len() > MAX_HEAD {
                    return Err(Error::Malformed("response head too large"));
                }
                // Incomplete: read more after what is here.
                buf = BytesMut::from(read);
                break;
            };
            if len > MAX_HEAD {
                return Err(Error::Malformed("response head too large"));
            }
            read.advance(len);
            if response.status().is_informational() {
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    return Err(Error::Malformed("a protocol switch was not asked for"));
                }
                // An interim response: the final one follows.
                continue;
            }
            return Ok((response, read));
        }
    }
}

/// The response head at the start of `buf`, with its length; `None` while incomplete.
/// Its header values are slices of `buf`, not copies.
fn parse_head(buf: &Bytes) -> Result<Option<(Response<()>, usize)>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Malformed("too many response headers"))
        }
        Err(_) => return Err(Error::Malformed("unparsable response head")),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Malformed("bad status code"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Malformed("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(h.value))
            .map_err(|_| Error::Malformed("bad header value"))?;
        map.append(name, value);
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = map;
    Ok(Some((response, len)))
}

/// Whether a comma-separated header holds `token`, in any case.
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// How the response body ends (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes more.
    Length(u64),
    /// Chunked transfer coding, in this state.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    /// Nothing more: the body is complete.
    Done,
    /// The body failed; every later poll says so again.
    Failed,
}

fn framing(response: &Response<()>, head_only: bool) -> Result<Framing, Error> {
    let status = response.status();
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Done);
    }
    let headers = response.headers();
    if headers.contains_key(TRANSFER_ENCODING) {
        let last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => {
                Framing::Chunked(Chunk::Size { size: 0, digits: 0 })
            }
            _ => Framing::Close,
        });
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let Some(first) = lengths.next() else {
        return Ok(Framing::Close);
    };
    let len = parse_length(first.as_bytes())?;
    if lengths.any(|v| parse_length(v.as_bytes()).ok() != Some(len)) {
        return Err(Error::Malformed("conflicting content lengths"));
    }
    Ok(if len == 0 {
        Framing::Done
    } else {
        Framing::Length(len)
    })
}

fn parse_length(v: &[u8]) -> Result<u64, Error> {
    let bad = Error::Malformed("bad content length");
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(bad);
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(bad)
}

/// Where the chunked decoder stands between reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size; `digits` so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size, before an extension or the line's end.
    SizeWs {
        size: u64,
    },
    /// Skipping a chunk extension up to the line's end.
    Extension {
        size: u64,
    },
    /// After the size line's CR.
    SizeLf {
        size: u64,
    },
    /// This many data bytes left in the chunk.
    Data(u64),
    /// The CR, then the LF after a chunk's data.
    DataCr,
    DataLf,
    /// In the trailer section: `at_line_start` when the last byte ended a line.
    Trailer {
        at_line_start: bool,
    },
}

/// Decodes `input` up to the end of the first chunk data in it, or to its end. Returns
/// the framing after that, how many bytes of `input` it used, and where that data lies.
fn decode_chunked(mut state: Chunk, input: &[u8]) -> Result<Decoded, Error> {
    let bad = || Error::Malformed("bad chunked encoding");
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        state = match state {
            Chunk::Size { size, digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if size > u64::MAX >> 4 {
                        return Err(bad());
                    }
                    let d = (b as char).to_digit(16).ok_or_else(bad)?;
                    Chunk::Size {
                        size: size * 16 + u64::from(d),
                        digits: digits.saturating_add(1),
                    }
                }
                b' ' | b'\t' if digits > 0 => Chunk::SizeWs { size },
                b';' if digits > 0 => Chunk::Extension { size },
                b'\r' if digits > 0 => Chunk::SizeLf { size },
                b'\n' if digits > 0 => end_of_size(size),
                _ => return Err(bad()),
            },
            Chunk::SizeWs { size } => match b {
                b' ' | b'\t' => Chunk::SizeWs { size },
                b';' => Chunk::Extension { size },
                b'\r' => Chunk::SizeLf { size },
                b'\n' => end_of_size(size),
                _ => return Err(bad()),
            },
            Chunk::Extension { size } => match b {
                b'\r' => Chunk::SizeLf { size },
                b'\n' => end_of_size(size),
                _ => Chunk::Extension { size },
            },
            Chunk::SizeLf { size } if b == b'\n' => end_of_size(size),
            Chunk::SizeLf { .. } => return Err(bad()),
            Chunk::Data(left) => {
                let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                let left = left - take as u64;
                let state = if left > 0 {
                    Chunk::Data(left)
                } else {
                    Chunk::DataCr
                };
                return Ok((Framing::Chunked(state), i + take, Some(i..i + take)));
            }
            Chunk::DataCr if b == b'\r' => Chunk::DataLf,
            Chunk::DataCr | Chunk::DataLf if b == b'\n' => Chunk::Size { size: 0, digits: 0 },
            Chunk::DataCr | Chunk::DataLf => return Err(bad()),
            Chunk::Trailer { at_line_start } => match b {
                b'\n' if at_line_start => return Ok((Framing::Done, i + 1, None)),
                b'\n' => Chunk::Trailer {
                    at_line_start: true,
                },
                b'\r' => Chunk::Trailer { at_line_start },
                _ => Chunk::Trailer {
                    at_line_start: false,
                },
            },
        };
        i += 1;
    }
    Ok((Framing::Chunked(state), i, None))
}

/// What [`decode_chunked`] found: the framing after it, the bytes it used, and where
/// the chunk data it reached lies in its input.
type Decoded = (Framing, usize, Option<std::ops::Range<usize>>);

/// After a size line: the data, or for the last chunk the trailer section.
fn end_of_size(size: u64) -> Chunk {
    if size == 0 {
        Chunk::Trailer {
            at_line_start: true,
        }
    } else {
        Chunk::Data(size)
    }
}

/// A response body read from its connection as it is polled. Complete, it gives the
/// connection back to the pool; dropped before that, it closes the connection, which is
/// how the upstream learns that the client went away.
pub struct H1Body {
    conn: Option<TcpStream>,
    /// Bytes read with the head that belong to the body.
    leftover: Bytes,
    framing: Framing,
    reusable: bool,
    pool: Arc<Pool>,
    /// The pool's key: the upstream's `host[:port]` as configured.
    key: Authority,
    /// An error held back one poll (see `poll_frame`).
    failed: Option<io::Error>,
}

impl H1Body {
    /// Once the body is complete, returns the connection to the pool if it may serve
    /// another request.
    fn finish_if_done(&mut self) {
        if self.framing != Framing::Done {
            return;
        }
        let Some(stream) = self.conn.take() else {
            return;
        };
        if self.reusable && self.leftover.is_empty() {
            self.pool.check_in(self.key.as_str(), stream);
        }
    }

    /// The next data of the body, read from the connection as needed.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, io::Error>>> {
        loop {
            if self.framing == Framing::Failed {
                let error = io::Error::other("the response body already failed");
                return Poll::Ready(Some(Err(error)));
            }
            if let Some(data) = self.next_data()? {
                return Poll::Ready(Some(Ok(data)));
            }
            if self.framing == Framing::Done {
                return Poll::Ready(None);
            }
            let Some(stream) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let mut space = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut space);
            ready!(Pin::new(stream).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                self.conn = None;
                if self.framing == Framing::Close {
                    self.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before the body's end",
                ))));
            }
            // One copy, to the read's size; the frames are slices of it.
            self.leftover = Bytes::copy_from_slice(buf.filled());
        }
    }

    /// The next data of the body among the bytes already read: at most one chunk's
    /// worth, as a slice of them, so each chunk the upstream sent is a frame of its own.
    fn next_data(&mut self) -> Result<Option<Bytes>, io::Error> {
        while !self.leftover.is_empty() {
            let data = match self.framing {
                Framing::Done => {
                    // Bytes past the end of a body: the connection is not reused.
                    self.reusable = false;
                    self.leftover.clear();
                    None
                }
                Framing::Failed => return Ok(None),
                Framing::Close => Some(std::mem::take(&mut self.leftover)),
                Framing::Length(left) => {
                    let take = self
                        .leftover
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - take as u64;
                    self.framing = if left == 0 {
                        Framing::Done
                    } else {
                        Framing::Length(left)
                    };
                    Some(self.leftover.split_to(take))
                }
                Framing::Chunked(state) => {
                    let (framing, used, data) = decode_chunked(state, &self.leftover)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    let data = data.map(|range| self.leftover.slice(range));
                    self.leftover.advance(used);
                    self.framing = framing;
                    data
                }
            };
            self.finish_if_done();
            if let Some(data) = data.filter(|d| !d.is_empty()) {
                return Ok(Some(data));
            }
        }
        self.finish_if_done();
        Ok(None)
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(error) = this.failed.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match ready!(this.poll_data(cx)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => Poll::Ready(None),
            Some(Err(error)) => {
                // The error waits one turn: hyper writes out what it has buffered of
                // the response first, so over HTTP/1.1 the bytes that arrived before
                // the cut reach the client before its response is aborted.
                this.failed = Some(error);
                this.framing = Framing::Failed;
                this.conn = None;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done && self.leftover.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` delivered in two reads, split at `split`: the data, the number of
    /// pieces it came in, and the framing at the end.
    fn decode_all(input: &[u8], split: usize) -> Result<(Vec<u8>, usize, Framing), Error> {
        let mut out = Vec::new();
        let mut pieces = 0;
        let mut framing = Framing::Chunked(Chunk::Size { size: 0, digits: 0 });
        for mut part in [&input[..split], &input[split..]] {
            while let (Framing::Chunked(state), false) = (framing, part.is_empty()) {
                let (f, used, data) = decode_chunked(state, part)?;
                if let Some(range) = data.filter(|r| !r.is_empty()) {
                    out.extend_from_slice(&part[range]);
                    pieces += 1;
                }
                framing = f;
                part = &part[used..];
            }
        }
        Ok((out, pieces, framing))
    }

    #[test]
    fn chunked_bodies_decode_at_every_split_point() {
        let wire =
            b"5\r\nhello\r\n7;ext=1\r\n, world\r\nA\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in 0..=wire.len() {
            let (data, pieces, framing) = decode_all(wire, split).unwrap();
            assert_eq!(data, b"hello, world0123456789", "split at {split}");
            assert_eq!(framing, Framing::Done, "split at {split}");
            // One piece per chunk, and one more for a chunk the split cuts in two.
            assert!(
                (3..=4).contains(&pieces),
                "split at {split}: {pieces} pieces"
            );
        }
        let bare_lf = b"3\nabc\n0\n\n";
        let (data, _, framing) = decode_all(bare_lf, 4).unwrap();
        assert_eq!((data.as_slice(), framing), (&b"abc"[..], Framing::Done));
    }

    #[test]
    fn chunk_sizes_take_leading_zeros_but_nothing_after_whitespace() {
        let padded = b"0000000000000000005\r\nhello\r\n0 ;last\r\n\r\n";
        let (data, _, framing) = decode_all(padded, 3).unwrap();
        assert_eq!((data.as_slice(), framing), (&b"hello"[..], Framing::Done));
        for wire in [&b"5 6\r\nhello\r\n"[..], b"10000000000000000\r\n"] {
            assert!(
                decode_all(wire, 0).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn broken_chunked_encoding_is_an_error() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"3\r\nabcX",
            b"3\rX",
            b"12345678901234567\r\n",
        ] {
            assert!(
                decode_all(wire, 0).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    /// The head at the start of `wire`, which must be complete.
    fn head(wire: &'static [u8]) -> Response<()> {
        parse_head(&Bytes::from_static(wire)).unwrap().unwrap().0
    }

    fn head_len(wire: &'static [u8]) -> Result<Option<usize>, Error> {
        Ok(parse_head(&Bytes::from_static(wire))?.map(|(_, len)| len))
    }

    #[test]
    fn a_head_is_parsed_and_its_framing_chosen() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\nx-a: 2\r\n\r\nhello";
        assert_eq!(head_len(wire).unwrap(), Some(54));
        let ok = head(wire);
        assert_eq!(ok.status(), 200);
        assert_eq!(ok.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(framing(&ok, false).unwrap(), Framing::Length(5));
        assert_eq!(framing(&ok, true).unwrap(), Framing::Done);
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap(), None);
        assert!(head_len(b"HTTP/1.1 2x0 OK\r\n\r\n").is_err());

        let chunked = head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n");
        assert!(matches!(
            framing(&chunked, false).unwrap(),
            Framing::Chunked(_)
        ));
        let gzip_only = head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
        assert_eq!(framing(&gzip_only, false).unwrap(), Framing::Close);
        let unframed = head(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(framing(&unframed, false).unwrap(), Framing::Close);
        let empty = head(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(framing(&empty, false).unwrap(), Framing::Done);
        let twice = head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n");
        assert!(framing(&twice, false).is_err());
        let negative = head(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n");
        assert!(framing(&negative, false).is_err());
    }
}
