//! A request body streamed to the provider and cut at `max_body_bytes`.
//!
//! When a client sends a body without a declared length and it runs past the limit, the
//! proxy answers 413 at once. If it then closed the connection, the client, still
//! writing, would get a reset before it could read the answer; so the rest of the body
//! is read and dropped for a bounded time and size first (a lingering close).

use std::future::Future;
use std::pin::Pin;
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

type Shared = Arc<Mutex<Option<Incoming>>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Option<Incoming>> {
    // Held only inside one poll; no invariant to break.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Upload {
    inner: Shared,
    seen: u64,
    limit: u64,
    /// Longest wait for the next frame, and the timer of the wait under way.
    gap: Duration,
    waiting: Option<Pin<Box<Sleep>>>,
}

/// What is left of an upload, to drain after answering 413.
pub struct Rest(Shared);

impl Upload {
    pub fn new(body: Incoming, limit: u64, gap: Duration) -> (Upload, Rest) {
        let inner = Arc::new(Mutex::new(Some(body)));
        (
            Upload {
                inner: inner.clone(),
                seen: 0,
                limit,
                gap,
                waiting: None,
            },
            Rest(inner),
        )
    }
}

impl Rest {
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

impl Body for Upload {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

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
        if polled.is_pending() {
            let gap = self.gap;
            let waiting = self
                .waiting
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            if waiting.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(Box::new(Stalled))));
            }
            return Poll::Pending;
        }
        self.waiting = None;
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.seen += data.len() as u64;
                    if self.seen > self.limit {
                        return Poll::Ready(Some(Err(Box::new(TooLarge))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
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
