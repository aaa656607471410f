//! Listeners: accept connections (TCP_NODELAY, optional TLS, a bound on open
//! connections), serve HTTP/1.1 and HTTP/2 on them, and shut down gracefully: stop
//! accepting, let in-flight requests finish within the grace period, then close.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::proxy::{self, AppState};

/// The bound listeners of a running proxy.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(proxy: &str, admin: &str) -> anyhow::Result<Listeners> {
        let proxy = TcpListener::bind(proxy)
            .await
            .with_context(|| format!("cannot listen on {proxy}"))?;
        let admin = TcpListener::bind(admin)
            .await
            .with_context(|| format!("cannot listen on {admin} (admin)"))?;
        Ok(Listeners { proxy, admin })
    }
}

/// Loads a TLS certificate chain and key (PEM) for the main listener.
pub fn tls_acceptor(cfg: &TlsConfig) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("server.tls.cert_file {}", cfg.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .with_context(|| format!("server.tls.key_file {}", cfg.key_file.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server.tls: certificate and key do not form a valid pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves both listeners until `shutdown` resolves, then drains within the grace period.
pub async fn run(
    state: Arc<AppState>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let live = state.live.load_full();
    let server_cfg = &live.config.server;
    let tls = server_cfg.tls.as_ref().map(tls_acceptor).transpose()?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server_cfg.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let http1_only = builder.clone().http1_only();

    // tokio wakes its I/O driver (a write to an eventfd, then one more epoll_wait) each
    // time a timer is set to fire before every one it holds. hyper sets one per request on
    // a keep-alive connection (`header_read_timeout`), just after the last one went: a
    // timer that always fires within a second keeps them from being the first, and saves
    // two system calls per request for one wake-up a second.
    let heartbeat = tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
        }
    });

    // Every connection holds a sender; when the last one is gone, every connection is.
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let connections = Arc::new(Semaphore::new(server_cfg.max_connections));
    let grace = server_cfg.shutdown_grace;
    let limits = Limits {
        first_bytes: server_cfg.header_read_timeout,
        idle: server_cfg.idle_timeout,
    };
    drop(live);

    let proxy_state = state.clone();
    let proxy_builder = builder.clone();
    let proxy_stop = stop_rx.clone();
    let proxy_loop = accept_loop(
        listeners.proxy,
        stop_rx.clone(),
        Some(connections),
        |stream, peer, permit| {
            let state = proxy_state.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(proxy::handle(state, req, peer).await) }
            });
            let conn = Conn {
                stop: proxy_stop.clone(),
                alive: alive.clone(),
                permit,
                limits,
            };
            match &tls {
                None => {
                    let http1_only = http1_only.clone();
                    let builder = proxy_builder.clone();
                    tokio::spawn(async move {
                        let mut stop = conn.stop.clone();
                        let first = tokio::select! {
                            first = first_bytes(&stream, limits.first_bytes) => first,
                            // Shutting down before the client said anything: close.
                            _ = stop.wait_for(|&stop| stop) => return,
                        };
                        let builder = match first {
                            FirstBytes::Http1 => http1_only,
                            FirstBytes::Http2 => builder,
                            FirstBytes::Nothing => return,
                        };
                        conn.serve(builder, stream, service).await
                    })
                }
                Some(acceptor) => {
                    let builder = proxy_builder.clone();
                    let handshake =
                        tokio::time::timeout(limits.first_bytes, acceptor.accept(stream));
                    tokio::spawn(async move {
                        match handshake.await {
                            Ok(Ok(tls)) => conn.serve(builder, tls, service).await,
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    })
                }
            };
        },
    );
    let admin_state = state.clone();
    let admin_stop = stop_rx.clone();
    let admin_loop = accept_loop(listeners.admin, stop_rx, None, |stream, peer, permit| {
        let state = admin_state.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(crate::admin::handle(&state, req, peer).await) }
        });
        let conn = Conn {
            stop: admin_stop.clone(),
            alive: alive.clone(),
            permit,
            limits,
        };
        tokio::spawn(conn.serve(builder.clone(), stream, service));
    });

    let stopper = async {
        shutdown.await;
        state.draining.store(true, Ordering::Relaxed);
        tracing::info!(grace = ?grace, "shutting down: no new connections, draining");
        let _ = stop_tx.send(true);
    };
    tokio::join!(proxy_loop, admin_loop, stopper);
    drop(alive);

    match tokio::time::timeout(grace, all_closed.recv()).await {
        Ok(_) => tracing::info!("all connections drained"),
        Err(_) => {
            tracing::warn!(grace = ?grace, "grace period over, closing open connections");
            proxy::tap::grace_over();
        }
    }
    heartbeat.abort();
    Ok(())
}

/// Accepts until told to stop. `connections` bounds how many are open at once: past it,
/// new clients wait in the kernel's accept queue instead of costing memory here.
async fn accept_loop<F>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    connections: Option<Arc<Semaphore>>,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>),
{
    loop {
        let permit = match &connections {
            Some(sem) => tokio::select! {
                permit = sem.clone().acquire_owned() => permit.ok(),
                _ = stop.changed() => return,
            },
            None => None,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        serve(stream, peer, permit);
    }
}

/// How long a connection may go without being of use.
#[derive(Clone, Copy)]
struct Limits {
    /// For the first bytes of a plain connection, or a TLS handshake.
    first_bytes: Duration,
    /// With no request open and none begun, the connection is closed (gracefully) after
    /// this. HTTP/1.1 connections are closed sooner, at hyper's `header_read_timeout`;
    /// this is what ends an HTTP/2 connection that opens no streams.
    idle: Duration,
}

/// How often a connection that never made a request is checked once shutdown has begun.
const SHUTDOWN_CHECK: Duration = Duration::from_secs(1);

/// A check every `period`, the first one period from now. A check late by a stall of the
/// runtime does not bring the next one closer: each period is whole.
fn idle_check(period: Duration) -> tokio::time::Interval {
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check
}

/// What a plain connection's first bytes say it speaks.
enum FirstBytes {
    Http1,
    /// HTTP/2's connection preface (prior knowledge); hyper-util's version check reads it.
    Http2,
    /// Nothing that decides it within the time limit, or the client closed: close.
    Nothing,
}

/// Looks at a client's first bytes without taking them from the socket. A connection whose
/// first bytes differ from HTTP/2's connection preface is served as HTTP/1.1 at once
/// (which is what the version check would decide), so hyper's first read gets the whole
/// request head: after the check, it got only the few bytes the check had read, and the
/// read that followed doubled its read buffer to 16 KiB for the life of the connection.
/// Until this decides, no timer of hyper's runs, so this one bounds the wait.
async fn first_bytes(stream: &TcpStream, limit: Duration) -> FirstBytes {
    const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let look = async {
        let mut first = [0u8; 24];
        loop {
            match stream.peek(&mut first).await {
                Ok(0) | Err(_) => return FirstBytes::Nothing,
                Ok(n) if first[..n] != H2_PREFACE[..n] => return FirstBytes::Http1,
                Ok(24) => return FirstBytes::Http2,
                // A preface split across packets, which real clients do not send: the
                // bytes already seen stay readable, so wait a little before looking again.
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::time::timeout(limit, look)
        .await
        .unwrap_or(FirstBytes::Nothing)
}

/// One client connection's bookkeeping: the shutdown signal, the sender whose drop tells
/// the drain it closed, its connection permit and its time limits.
struct Conn {
    stop: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
    permit: Option<OwnedSemaphorePermit>,
    limits: Limits,
}

impl Conn {
    /// Serves HTTP/1.1 or HTTP/2 on the connection until it ends. On shutdown, or when it
    /// has been idle for `limits.idle`, it is shut down gracefully: requests in flight
    /// finish, no new ones start. One more idle period later it is closed outright.
    async fn serve<S, B>(
        mut self,
        builder: auto::Builder<TokioExecutor>,
        stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
        service: S,
    ) where
        S: hyper::service::Service<Request<Incoming>, Response = hyper::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Each request is counted in when it begins and out when hyper drops its response.
        let activity = Activity::new();
        let counted = activity.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let open = counted.open();
            let response = service.call(req);
            async move { Ok::<_, S::Error>(response.await?.map(|body| Counted::new(body, open))) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let mut conn = std::pin::pin!(conn);
        let mut idle = idle_check(self.limits.idle);
        // The requests begun and finished at the last tick: idle means none open, and
        // none begun or finished since, so a whole period without a request.
        let mut seen = (0, 0);
        let mut closing = false;
        let mut stopping = false;
        let ended = loop {
            tokio::select! {
                biased;
                ended = conn.as_mut() => break ended,
                _ = self.stop.wait_for(|&stop| stop), if !stopping => {
                    stopping = true;
                    if !closing {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // A connection that never made a request has nothing to finish
                    // writing: if its client ignores the GOAWAY, it is closed within
                    // seconds instead of holding up the drain. One that did may still be
                    // writing an answer's tail to a slow reader, and gets the grace period.
                    if activity.counts() == (0, 0) {
                        idle = idle_check(SHUTDOWN_CHECK);
                    }
                }
                _ = idle.tick() => {
                    let now = activity.counts();
                    if now == seen && now.0 == now.1 {
                        // Asked to close and still open with nothing in flight (an HTTP/2
                        // client that does not answer the GOAWAY's PING): close it.
                        if closing {
                            break Ok(());
                        }
                        tracing::debug!("closing an idle connection");
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    seen = now;
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        drop((self.permit, self.alive));
    }
}

/// Requests begun on a connection, and those whose response is done with.
#[derive(Default)]
struct Activity {
    begun: AtomicU64,
    finished: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity::default())
    }

    /// Counts a request in; it is finished when the returned guard is dropped.
    fn open(self: &Arc<Activity>) -> Open {
        self.begun.fetch_add(1, Ordering::Relaxed);
        Open(self.clone())
    }

    /// (begun, finished); equal when no request is open.
    fn counts(&self) -> (u64, u64) {
        // `finished` first: a request that finishes between the two loads is then seen
        // as still open, never the other way round.
        let finished = self.finished.load(Ordering::Acquire);
        (self.begun.load(Ordering::Acquire), finished)
    }
}

struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as open until it is dropped.
    struct Counted<B> {
        #[pin]
        body: B,
        open: Open,
    }
}

impl<B> Counted<B> {
    fn new(body: B, open: Open) -> Counted<B> {
        Counted { body, open }
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
