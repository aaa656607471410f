//! Undoing the one change the proxy makes to a stream: when it asked an OpenAI-format
//! provider for usage the client did not request, the client must get the stream it
//! would have got without it. The body is cut at SSE event boundaries; each complete
//! event goes through [`openai::strip_injected_usage`]; an event split across frames
//! waits for its end. Frames that need no change pass as the same `Bytes`.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::providers::openai;

/// Past this much of one unfinished event, the event passes as is (not held, not
/// stripped) up to its end; stripping resumes with the next event.
const MAX_PENDING: usize = 1024 * 1024;

pin_project! {
    pub struct StripUsage<B> {
        #[pin]
        inner: B,
        pending: BytesMut,
        // Inside an event too large to hold: its bytes pass as they come.
        oversized: bool,
        // The last bytes passed of an oversized event, to find its end across frames.
        tail: Vec<u8>,
        // Output ready for the next poll (what followed the end of an oversized event).
        queued: Option<Bytes>,
    }
}

impl<B> StripUsage<B> {
    pub fn new(inner: B) -> Self {
        StripUsage {
            inner,
            pending: BytesMut::new(),
            oversized: false,
            tail: Vec::new(),
            queued: None,
        }
    }
}

/// Where the event under way ends in `data`, given the last bytes before it (`tail`,
/// which holds no end of its own).
fn end_in(tail: &[u8], data: &[u8]) -> Option<usize> {
    let mut seam = tail.to_vec();
    seam.extend_from_slice(&data[..data.len().min(3)]);
    if let Some(end) = event_end(&seam).filter(|&end| end > tail.len()) {
        return Some(end - tail.len());
    }
    event_end(data)
}

/// The last three bytes of `tail` followed by `data`.
fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    tail.extend_from_slice(&data[data.len().saturating_sub(3)..]);
    let excess = tail.len().saturating_sub(3);
    tail.drain(..excess);
}

/// The end of the first SSE event in `buf` (after its blank line), if it is complete.
fn event_end(buf: &[u8]) -> Option<usize> {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static LF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
    static CRLF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\r\n\r\n"));
    let lf = LF.find(buf).map(|i| i + 2);
    // A CRLF boundary only matters if it comes before the first LF one.
    let crlf = CRLF.find(&buf[..lf.unwrap_or(buf.len())]).map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Strips every complete event of `buf`; returns the output and how much was consumed.
fn strip_events(buf: &Bytes) -> (Bytes, usize) {
    let mut at = 0;
    let mut out: Option<Vec<u8>> = None;
    while let Some(len) = event_end(&buf[at..]) {
        let event = &buf[at..at + len];
        match openai::strip_injected_usage(event) {
            Some(Cow::Borrowed(_)) => {
                if let Some(out) = &mut out {
                    out.extend_from_slice(event);
                }
            }
            changed => {
                let out = out.get_or_insert_with(|| buf[..at].to_vec());
                if let Some(kept) = changed {
                    out.extend_from_slice(&kept);
                }
            }
        }
        at += len;
    }
    match out {
        Some(out) => (Bytes::from(out), at),
        None => (buf.slice(..at), at),
    }
}

impl<B> Body for StripUsage<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(queued) = this.queued.take() {
            return Poll::Ready(Some(Ok(Frame::data(queued))));
        }
        loop {
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None if this.pending.is_empty() => return Poll::Ready(None),
                // An unfinished last event goes out as it came.
                None => return Poll::Ready(Some(Ok(Frame::data(this.pending.split().freeze())))),
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            };
            let data = if *this.oversized {
                let Some(end) = end_in(this.tail, &data) else {
                    keep_tail(this.tail, &data);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                };
                // The oversized event ends here: it goes out as it came, and what follows
                // is stripped as usual.
                *this.oversized = false;
                this.tail.clear();
                let (out, used) = strip_events(&data.slice(end..));
                this.pending.extend_from_slice(&data[end + used..]);
                if !out.is_empty() {
                    *this.queued = Some(out);
                }
                return Poll::Ready(Some(Ok(Frame::data(data.slice(..end)))));
            } else {
                data
            };
            let buf = if this.pending.is_empty() {
                data
            } else {
                // Only the new bytes (and the three before them) can hold the end of the
                // event under way: an event arriving in many small frames costs linear
                // time, not a rescan of all it has so far per frame.
                let from = this.pending.len().saturating_sub(3);
                this.pending.extend_from_slice(&data);
                if event_end(&this.pending[from..]).is_none() {
                    if this.pending.len() > MAX_PENDING {
                        *this.oversized = true;
                        let held = this.pending.split().freeze();
                        keep_tail(this.tail, &held);
                        return Poll::Ready(Some(Ok(Frame::data(held))));
                    }
                    continue;
                }
                this.pending.split().freeze()
            };
            let (out, used) = strip_events(&buf);
            if used < buf.len() {
                this.pending.extend_from_slice(&buf[used..]);
                if this.pending.len() > MAX_PENDING {
                    *this.oversized = true;
                    let held = this.pending.split();
                    keep_tail(this.tail, &held);
                    let mut all = BytesMut::from(&out[..]);
                    all.extend_from_slice(&held);
                    return Poll::Ready(Some(Ok(Frame::data(all.freeze()))));
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.queued.is_none() && self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const WITH: &[u8] =
        b"data: {\"id\":1,\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
data: {\"id\":1,\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":1,\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n\
data: [DONE]\n\n";
    const WITHOUT: &[u8] = b"data: {\"id\":1,\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
data: {\"id\":1,\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: [DONE]\n\n";

    async fn run(chunks: Vec<Bytes>) -> Vec<u8> {
        let stream = tokio_stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Frame::data(c))),
        );
        let body = StripUsage::new(http_body_util::StreamBody::new(stream));
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn every_split_gives_the_stream_without_the_option() {
        for i in 0..=WITH.len() {
            let chunks = vec![
                Bytes::copy_from_slice(&WITH[..i]),
                Bytes::copy_from_slice(&WITH[i..]),
            ];
            assert_eq!(run(chunks).await, WITHOUT, "split at {i}");
        }
        let bytewise = WITH.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
        assert_eq!(run(bytewise).await, WITHOUT);
    }

    #[tokio::test]
    async fn unchanged_frames_pass_as_the_same_bytes() {
        let done = Bytes::from_static(b"data: [DONE]\n\n");
        let (out, used) = strip_events(&done);
        assert_eq!(used, done.len());
        assert_eq!(out.as_ptr(), done.as_ptr(), "no copy");
    }

    #[tokio::test]
    async fn an_oversized_event_passes_as_is_and_stripping_resumes_after_it() {
        let big = format!("data: {}\n\n", "x".repeat(MAX_PENDING + 10));
        let mut with = big.clone().into_bytes();
        with.extend_from_slice(WITH);
        let mut without = big.into_bytes();
        without.extend_from_slice(WITHOUT);
        for frame in [7, 4096, 65536, MAX_PENDING + 9, MAX_PENDING + 16] {
            let chunks = with.chunks(frame).map(Bytes::copy_from_slice).collect();
            assert_eq!(run(chunks).await, without, "frames of {frame}");
        }
    }

    #[tokio::test]
    async fn an_unfinished_last_event_is_passed_on() {
        let out = run(vec![Bytes::from_static(b"data: [DONE]\n\ndata: cut")]).await;
        assert_eq!(out, b"data: [DONE]\n\ndata: cut");
    }
}
