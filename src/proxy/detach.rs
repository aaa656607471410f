//! A request runs to its end even when its client goes away first.
//!
//! hyper drops a service's future when the client's connection closes under it. Cut off
//! halfway, a request would lose its spend and its audit record: budget reserved in
//! Redis but never settled, a call the provider bills but no line records. So a future
//! dropped before it finished moves into a task of its own and runs on; the response it
//! makes is then dropped, which settles it as `client_gone`. The common path, a client
//! that waits for its answer, spawns nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// `fut`, polled in place, and moved into a task of its own if dropped unfinished.
pub fn run_to_end<F>(fut: F) -> RunToEnd<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    RunToEnd(Some(Box::pin(fut)))
}

/// See [`run_to_end`]. Boxed, so that moving it into a task moves a pointer and never
/// the pinned future itself.
pub struct RunToEnd<F>(Option<Pin<Box<F>>>)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static;

impl<F> Future for RunToEnd<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(fut) = self.0.as_mut() else {
            // Polled after it finished: a caller's bug, and nothing left to run.
            return Poll::Pending;
        };
        let output = std::task::ready!(fut.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<F> Drop for RunToEnd<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(fut) = self.0.take() else { return };
        // Outside a runtime (it is shutting down) the future is dropped with the rest:
        // the holds it took give themselves back when dropped.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(fut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_future_awaited_to_its_end_runs_in_place() {
        let steps = Arc::new(AtomicUsize::new(0));
        let counted = steps.clone();
        let out = run_to_end(async move {
            tokio::task::yield_now().await;
            counted.fetch_add(1, Ordering::SeqCst);
            7
        })
        .await;
        assert_eq!(out, 7);
        assert_eq!(steps.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_future_dropped_halfway_runs_on_to_its_end() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let fut = run_to_end(async move {
            let _ = wait.await;
            let _ = tx.send("finished");
        });
        // Polled once, then dropped the way hyper drops a service future.
        let dropped = tokio::time::timeout(Duration::from_millis(20), fut).await;
        assert!(
            dropped.is_err(),
            "the future finished before it was dropped"
        );
        release.send(()).unwrap();
        let finished = tokio::time::timeout(Duration::from_secs(5), rx).await;
        assert_eq!(finished.unwrap().unwrap(), "finished");
    }

    #[test]
    fn outside_a_runtime_a_dropped_future_is_dropped() {
        struct Flag(Arc<AtomicUsize>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicUsize::new(0));
        let flag = Flag(dropped.clone());
        let fut = run_to_end(async move {
            let _flag = flag;
            std::future::pending::<()>().await;
        });
        drop(fut);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }
}
