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

/// Past this much of one unfinished event, stripping stops and the rest passes as is.
const MAX_PENDING: usize = 1024 * 1024;

pin_project! {
    pub struct StripUsage<B> {
        #[pin]
        inner: B,
        pending: BytesMut,
        passthrough: bool,
    }
}

impl<B> StripUsage<B> {
    pub fn new(inner: B) -> Self {
        StripUsage {
            inner,
            pending: BytesMut::new(),
            passthrough: false,
        }
    }
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
            if *this.passthrough {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let buf = if this.pending.is_empty() {
                data
            } else {
                this.pending.extend_from_slice(&data);
                this.pending.split().freeze()
            };
            let (out, used) = strip_events(&buf);
            if used < buf.len() {
                this.pending.extend_from_slice(&buf[used..]);
                if this.pending.len() > MAX_PENDING {
                    *this.passthrough = true;
                    let mut all = BytesMut::from(&out[..]);
                    all.extend_from_slice(&this.pending.split());
                    return Poll::Ready(Some(Ok(Frame::data(all.freeze()))));
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
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
    async fn an_unfinished_last_event_is_passed_on() {
        let out = run(vec![Bytes::from_static(b"data: [DONE]\n\ndata: cut")]).await;
        assert_eq!(out, b"data: [DONE]\n\ndata: cut");
    }
}
