//! The body tap: the one place a response body passes through the proxy.
//!
//! Every frame is handed to the client at once and unchanged; the observer sees a
//! reference to the same `Bytes` (no copy). The stream is settled exactly once, whichever
//! way it ends: the upstream finishes, the upstream fails, a time limit passes, or the
//! client goes away (the body is dropped before its end). Settling consumes the observer,
//! so a second settlement cannot be written.
//!
//! Time limits live here too, because a timeout that stops at the response headers lets a
//! stalled stream hang forever: `idle` bounds the silence between two frames and
//! `deadline` the life of the whole request. Both share one timer that is re-armed only
//! when it fires, so a frame costs a clock read, not a timer-wheel update.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{sleep_until, Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a response stream ended, as the observer is told exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The upstream finished the body.
    Complete,
    /// The upstream connection failed or was reset mid-body.
    UpstreamError,
    /// No frame arrived within the idle limit.
    IdleTimeout,
    /// The request outlived its total time limit.
    TotalTimeout,
    /// The client went away before the end (the body was dropped unfinished).
    ClientGone,
    /// The proxy shut down with the stream unfinished: the grace period ran out.
    Shutdown,
    /// The proxy ended the stream itself (a run crossed a stop condition), closing the
    /// upstream after a last frame of its own.
    Stopped,
}

impl StreamEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEnd::Complete => "complete",
            StreamEnd::UpstreamError => "upstream_error",
            StreamEnd::IdleTimeout => "idle_timeout",
            StreamEnd::TotalTimeout => "total_timeout",
            StreamEnd::ClientGone => "client_gone",
            StreamEnd::Shutdown => "shutdown",
            StreamEnd::Stopped => "stopped",
        }
    }
}

/// How long an upstream failure is held back before it reaches the server (see
/// `TapBody::poll_frame`).
const HOLD_FAILURE: Duration = Duration::from_millis(10);

/// Set once the shutdown's grace period is over: the streams dropped from then on are cut
/// by the proxy, not left by their clients. One flag for the process, which serves one
/// proxy and sets it only on its way out.
static GRACE_OVER: AtomicBool = AtomicBool::new(false);

/// Marks every stream still open as cut by the shutdown (see [`StreamEnd::Shutdown`]).
pub fn grace_over() {
    GRACE_OVER.store(true, Ordering::Relaxed);
}

/// What an observer wants after seeing a frame.
#[derive(Debug)]
pub enum Flow {
    Continue,
    /// Send this frame after the current one, then end the stream and close the upstream.
    End(Bytes),
}

/// Watches a response body go by.
pub trait Observer: Send + 'static {
    /// Called with every data frame, before the client gets it.
    fn on_data(&mut self, data: &Bytes) -> Flow;
    /// Called exactly once, when the stream ends for any reason.
    fn on_end(self, end: StreamEnd);
}

/// A large observer rides boxed, so the response that carries it stays small to move.
impl<O: Observer> Observer for Box<O> {
    fn on_data(&mut self, data: &Bytes) -> Flow {
        (**self).on_data(data)
    }

    fn on_end(self, end: StreamEnd) {
        (*self).on_end(end);
    }
}

/// Time limits for one response body.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Longest gap between two frames.
    pub idle: Duration,
    /// When the whole request must be over.
    pub deadline: Instant,
}

/// Why the tap cut a stream. The server aborts the client's response on any body error
/// (for HTTP/1.1: no terminating chunk), so a cut stream never looks complete.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("upstream body failed: {0}")]
    Upstream(BoxError),
    #[error("upstream sent nothing for {0:?}")]
    Idle(Duration),
    #[error("request exceeded its total time limit")]
    Total,
}

pin_project! {
    /// A response body that forwards frames untouched and reports them to an observer.
    pub struct TapBody<B, O: Observer> {
        // `None` only while the tap is dropped: the upstream body goes first.
        #[pin]
        inner: Option<B>,
        #[pin]
        timer: Sleep,
        limits: StreamLimits,
        last_frame: Instant,
        // `Some` until the stream is settled; taking it is what makes settlement single.
        observer: Option<O>,
        // The observer's last frame, sent before the stream ends early.
        last: Option<Bytes>,
        // An upstream failure held back a moment (see `poll_frame`).
        failed: Option<BoxError>,
    }

    impl<B, O: Observer> PinnedDrop for TapBody<B, O> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            // Close the upstream first, so the provider stops generating at once, then
            // settle (which may count tokens).
            this.inner.set(None);
            if let Some(observer) = this.observer.take() {
                let end = if GRACE_OVER.load(Ordering::Relaxed) {
                    StreamEnd::Shutdown
                } else {
                    StreamEnd::ClientGone
                };
                observer.on_end(end);
            }
        }
    }
}

impl<B, O: Observer> TapBody<B, O> {
    pub fn new(inner: B, observer: O, limits: StreamLimits) -> Self {
        let now = Instant::now();
        let first_check = (now + limits.idle).min(limits.deadline);
        TapBody {
            inner: Some(inner),
            timer: sleep_until(first_check),
            limits,
            last_frame: now,
            observer: Some(observer),
            last: None,
            failed: None,
        }
    }
}

fn settle<O: Observer>(observer: &mut Option<O>, end: StreamEnd) {
    if let Some(observer) = observer.take() {
        observer.on_end(end);
    }
}

impl<B, O> Body for TapBody<B, O>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    O: Observer,
{
    type Data = Bytes;
    type Error = TapError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, TapError>>> {
        let mut this = self.project();
        if let Some(last) = this.last.take() {
            // Ended early: close the upstream, so generation stops, then settle.
            this.inner.set(None);
            settle(this.observer, StreamEnd::Stopped);
            return Poll::Ready(Some(Ok(Frame::data(last))));
        }
        if this.failed.is_some() {
            ready!(this.timer.as_mut().poll(cx));
            if let Some(e) = this.failed.take() {
                return Poll::Ready(Some(Err(TapError::Upstream(e))));
            }
        }
        let Some(mut inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        if this.observer.is_none() {
            // Settled: after a clean end only trailers (or nothing) can follow; after a
            // failure the server does not poll again.
            return inner
                .poll_frame(cx)
                .map_err(|e| TapError::Upstream(e.into()));
        }
        match inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.last_frame = Instant::now();
                if let (Some(data), Some(observer)) = (frame.data_ref(), this.observer.as_mut()) {
                    if let Flow::End(last) = observer.on_data(data) {
                        *this.last = Some(last);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                if inner.is_end_stream() {
                    settle(this.observer, StreamEnd::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                settle(this.observer, StreamEnd::UpstreamError);
                // A server drops what it queued but has not written yet when a body fails:
                // hyper's HTTP/1.1 server its write buffer, its HTTP/2 server the stream's
                // send queue, the response head included. A client then gets no answer at
                // all, and an SDK retries a request the provider took (and may bill). Held
                // back a moment, the failure comes after the server wrote what it had, and
                // the client sees the answer cut short where the provider cut it.
                *this.failed = Some(e.into());
                this.timer.as_mut().reset(Instant::now() + HOLD_FAILURE);
                ready!(this.timer.as_mut().poll(cx));
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                settle(this.observer, StreamEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                ready!(this.timer.as_mut().poll(cx));
                let now = Instant::now();
                if now >= this.limits.deadline {
                    settle(this.observer, StreamEnd::TotalTimeout);
                    return Poll::Ready(Some(Err(TapError::Total)));
                }
                let idle_at = *this.last_frame + this.limits.idle;
                if now >= idle_at {
                    settle(this.observer, StreamEnd::IdleTimeout);
                    return Poll::Ready(Some(Err(TapError::Idle(this.limits.idle))));
                }
                // Frames arrived since the timer was set: re-arm for the next check and
                // poll it once more so it registers the waker.
                this.timer.as_mut().reset(idle_at.min(this.limits.deadline));
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        // Until settled, claim more may come, so the server polls once more and the
        // tap sees the end of an empty body instead of being dropped unpolled.
        self.observer.is_none() && self.inner.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), B::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    #[derive(Default, Clone)]
    struct Seen(Arc<Mutex<(Vec<u8>, Vec<StreamEnd>)>>);

    impl Observer for Seen {
        fn on_data(&mut self, data: &Bytes) -> Flow {
            self.0.lock().unwrap().0.extend_from_slice(data);
            Flow::Continue
        }
        fn on_end(self, end: StreamEnd) {
            self.0.lock().unwrap().1.push(end);
        }
    }

    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn channel_body() -> (mpsc::Sender<Item>, StreamBody<ReceiverStream<Item>>) {
        let (tx, rx) = mpsc::channel(8);
        (tx, StreamBody::new(ReceiverStream::new(rx)))
    }

    fn limits(idle_ms: u64, total_ms: u64) -> StreamLimits {
        StreamLimits {
            idle: Duration::from_millis(idle_ms),
            deadline: Instant::now() + Duration::from_millis(total_ms),
        }
    }

    #[tokio::test]
    async fn frames_pass_unchanged_and_complete_settles_once() {
        let seen = Seen::default();
        let (tx, body) = channel_body();
        let mut tap = Box::pin(TapBody::new(body, seen.clone(), limits(1000, 5000)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"data: a\n\n"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"data: b\n\n"))))
            .await
            .unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(frame) = tap.frame().await {
            got.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        drop(tap);
        let seen = seen.0.lock().unwrap();
        assert_eq!(got, b"data: a\n\ndata: b\n\n");
        assert_eq!(seen.0, got);
        assert_eq!(seen.1, vec![StreamEnd::Complete]);
    }

    /// Ends the stream after the second frame with a frame of its own.
    struct Brake(Seen, usize);

    impl Observer for Brake {
        fn on_data(&mut self, data: &Bytes) -> Flow {
            self.1 += 1;
            self.0.on_data(data);
            if self.1 == 2 {
                Flow::End(Bytes::from_static(b"data: stop\n\n"))
            } else {
                Flow::Continue
            }
        }
        fn on_end(self, end: StreamEnd) {
            self.0.on_end(end);
        }
    }

    #[tokio::test]
    async fn an_observer_can_end_the_stream_with_a_last_frame() {
        let seen = Seen::default();
        let (tx, body) = channel_body();
        let mut tap = Box::pin(TapBody::new(
            body,
            Brake(seen.clone(), 0),
            limits(1000, 5000),
        ));
        for chunk in ["data: a\n\n", "data: b\n\n", "data: c\n\n"] {
            tx.send(Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        while let Some(frame) = tap.frame().await {
            got.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        assert_eq!(got, b"data: a\n\ndata: b\n\ndata: stop\n\n");
        assert!(tx.is_closed(), "the upstream was closed at once");
        assert!(tap.is_end_stream());
        drop(tap);
        assert_eq!(seen.0.lock().unwrap().1, vec![StreamEnd::Stopped]);
    }

    #[tokio::test]
    async fn dropping_midway_settles_as_client_gone() {
        let seen = Seen::default();
        let (tx, body) = channel_body();
        let mut tap = Box::pin(TapBody::new(body, seen.clone(), limits(1000, 5000)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        tap.frame().await.unwrap().unwrap();
        drop(tap);
        assert_eq!(seen.0.lock().unwrap().1, vec![StreamEnd::ClientGone]);
    }

    #[tokio::test]
    async fn upstream_error_is_passed_on_and_settled() {
        let seen = Seen::default();
        let (tx, body) = channel_body();
        let mut tap = Box::pin(TapBody::new(body, seen.clone(), limits(1000, 5000)));
        tx.send(Err(std::io::Error::other("reset"))).await.unwrap();
        assert!(matches!(
            tap.frame().await,
            Some(Err(TapError::Upstream(_)))
        ));
        drop(tap);
        assert_eq!(seen.0.lock().unwrap().1, vec![StreamEnd::UpstreamError]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gap_cuts_the_stream() {
        let seen = Seen::default();
        let (tx, body) = channel_body();
        let mut tap = Box::pin(TapBody::new(body, seen.clone(), limits(100, 60_000)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        tap.frame().await.unwrap().unwrap();
        assert!(matches!(tap.frame().await, Some(Err(TapError::Idle(_)))));
        assert_eq!(seen.0.lock().unwrap().1, vec![StreamEnd::IdleTimeout]);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn steady_frames_still_hit_the_total_limit() {
        let seen = Seen::default();
        let (tx, body) = channel_body();
        let mut tap = Box::pin(TapBody::new(body, seen.clone(), limits(100, 250)));
        let feeder = tokio::spawn(async move {
            for _ in 0..100 {
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut frames = 0;
        let err = loop {
            match tap.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break e,
                None => panic!("stream ended cleanly"),
            }
        };
        assert!(matches!(err, TapError::Total), "{err}");
        assert!((4..=6).contains(&frames), "{frames} frames before the cut");
        assert_eq!(seen.0.lock().unwrap().1, vec![StreamEnd::TotalTimeout]);
        drop(tap);
        feeder.await.unwrap();
    }

    #[tokio::test]
    async fn empty_body_settles_complete_when_polled() {
        let seen = Seen::default();
        let mut tap = Box::pin(TapBody::new(
            http_body_util::Empty::<Bytes>::new(),
            seen.clone(),
            limits(1000, 5000),
        ));
        assert!(!tap.is_end_stream());
        assert!(tap.frame().await.is_none());
        assert!(tap.is_end_stream());
        drop(tap);
        assert_eq!(seen.0.lock().unwrap().1, vec![StreamEnd::Complete]);
    }
}
