//! A request body streamed to the provider and cut at `max_body_bytes`.
//!
//! When a client sends a body without a declared length and it runs past the limit, the
//! proxy answers 413 at once. If it then closed the connection, the client, still
//! writing, would get a reset before it could read the answer; so the rest of the body
//! is read and dropped for a bounded time and size first (a lingering close).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Sleep;

/// The body ran past the limit.
#[derive(Debug, thiserror::Error)]
#[error("request body over the size limit")]
pub struct TooLarge;

/// Nothing of the body came for the configured time (`server.body_read_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("request body stalled")]
pub struct Stalled;

/// Longest the rest of an oversized body is read after the 413.
const DRAIN_FOR: Duration = Duration::from_secs(5);

/// What the upload and its [`Rest`] share: the client's body, and why the upload failed
/// if it did. The reason is kept here because an HTTP/2 upstream client does not pass a
/// body's error on (it resets the stream and reports its own).
struct Shared {
    body: Mutex<Option<Incoming>>,
    failed: AtomicU8,
}

const FAILED_TOO_LARGE: u8 = 1;
const FAILED_STALLED: u8 = 2;

/// Why an upload failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    TooLarge,
    Stalled,
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Option<Incoming>> {
    // Held only inside one poll; no invariant to break.
    shared.body.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Upload {
    inner: Arc<Shared>,
    seen: u64,
    limit: u64,
    /// Longest wait for the client's next frame; the timer, made at the first wait; and
    /// whether a wait is under way.
    gap: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

/// What is left of an upload: why it failed, and the rest of the body to drain after
/// answering 413.
pub struct Rest(Arc<Shared>);

impl Upload {
    pub fn new(body: Incoming, limit: u64, gap: Duration) -> (Upload, Rest) {
        let inner = Arc::new(Shared {
            body: Mutex::new(Some(body)),
            failed: AtomicU8::new(0),
        });
        (
            Upload {
                inner: inner.clone(),
                seen: 0,
                limit,
                gap,
                timer: None,
                waiting: false,
            },
            Rest(inner),
        )
    }
}

impl Rest {
    /// Why the upload failed, if it did.
    pub fn failure(&self) -> Option<Failure> {
        match self.0.failed.load(Ordering::Relaxed) {
            FAILED_TOO_LARGE => Some(Failure::TooLarge),
            FAILED_STALLED => Some(Failure::Stalled),
            _ => None,
        }
    }

    /// Reads and drops the rest of the body (at most four times the limit, for at most a
    /// few seconds), so that the client can finish writing and read the answer.
    pub fn drain(self, limit: u64) {
        let Some(mut body) = lock(&self.0).take() else {
            return;
        };
        tokio::spawn(async move {
            let mut left = limit.saturating_mul(4);
            let _ = tokio::time::timeout(DRAIN_FOR, async {
                while let Some(Ok(frame)) = body.frame().await {
                    let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                    left = match left.checked_sub(n) {
                        Some(left) => left,
                        None => break,
                    };
                }
            })
            .await;
        });
    }
}

impl Upload {
    /// Records why the upload failed, for [`Rest::failure`], and fails with `error`.
    fn fail<E: std::error::Error + Send + Sync + 'static>(
        &self,
        why: u8,
        error: E,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.inner.failed.store(why, Ordering::Relaxed);
        Poll::Ready(Some(Err(Box::new(error))))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let shared = self.inner.clone();
        let mut guard = lock(&shared);
        let Some(body) = guard.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(TooLarge))));
        };
        let polled = Pin::new(body).poll_frame(cx);
        drop(guard);
        let this = &mut *self;
        let Poll::Ready(polled) = polled else {
            // Nothing from the client: the wait for its next frame is timed (one timer
            // per upload, set again at each wait).
            let gap = this.gap;
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            if !this.waiting {
                this.waiting = true;
                timer.as_mut().reset(tokio::time::Instant::now() + gap);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return this.fail(FAILED_STALLED, Stalled);
            }
            return Poll::Pending;
        };
        this.waiting = false;
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return this.fail(FAILED_TOO_LARGE, TooLarge);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        lock(&self.inner).as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        lock(&self.inner)
            .as_ref()
            .map_or_else(SizeHint::default, Body::size_hint)
    }
}
