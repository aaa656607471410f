//! Listeners: accept connections (TCP_NODELAY, optional TLS, a bound on open
//! connections), serve HTTP/1.1 and HTTP/2 on them, and shut down gracefully: stop
//! accepting, let in-flight requests finish within the grace period, then close.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
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

    let graceful = GracefulShutdown::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let connection_stop = stop_rx.clone();
    let connections = Arc::new(Semaphore::new(server_cfg.max_connections));
    let grace = server_cfg.shutdown_grace;
    let handshake_timeout = server_cfg.header_read_timeout;
    drop(live);

    let proxy_state = state.clone();
    let proxy_builder = builder.clone();
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
            let builder = proxy_builder.clone();
            let watcher = graceful.watcher();
            match &tls {
                None => {
                    let http1_only = http1_only.clone();
                    let mut stop = connection_stop.clone();
                    tokio::spawn(async move {
                        let opens_as_http1 = tokio::select! {
                            http1 = opens_as_http1(&stream) => http1,
                            // Shutting down before the client said anything: close.
                            _ = stop.wait_for(|&stop| stop) => return,
                        };
                        let builder = if opens_as_http1 { http1_only } else { builder };
                        serve_connection(builder, stream, service, watcher, permit).await
                    })
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                    tokio::spawn(async move {
                        match handshake.await {
                            Ok(Ok(tls)) => {
                                serve_connection(builder, tls, service, watcher, permit).await
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    })
                }
            };
        },
    );
    let admin_state = state.clone();
    let admin_loop = accept_loop(listeners.admin, stop_rx, None, |stream, peer, permit| {
        let state = admin_state.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(crate::admin::handle(&state, req, peer).await) }
        });
        let watcher = graceful.watcher();
        tokio::spawn(serve_connection(
            builder.clone(),
            stream,
            service,
            watcher,
            permit,
        ));
    });

    let stopper = async {
        shutdown.await;
        state.draining.store(true, Ordering::Relaxed);
        tracing::info!(grace = ?grace, "shutting down: no new connections, draining");
        let _ = stop_tx.send(true);
    };
    tokio::join!(proxy_loop, admin_loop, stopper);

    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(grace = ?grace, "grace period over, closing open connections"),
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

/// Whether a client's first bytes already differ from HTTP/2's connection preface, seen
/// without taking them from the socket. Such a connection is served as HTTP/1.1 at once
/// (which is what the version check would decide), so hyper's first read gets the whole
/// request head: after the check, it got only the few bytes the check had read, and the
/// read that followed doubled its read buffer to 16 KiB for the life of the connection.
/// `false` (let the usual check decide) when nothing or too little has come yet.
async fn opens_as_http1(stream: &TcpStream) -> bool {
    const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut first = [0u8; 24];
    match stream.peek(&mut first).await {
        Ok(n) => n > 0 && first[..n] != H2_PREFACE[..n],
        Err(_) => false,
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one connection, watched by the graceful shutdown. The
/// connection permit, if any, is held until the connection closes.
async fn serve_connection<S, B>(
    builder: auto::Builder<TokioExecutor>,
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    service: S,
    watcher: Watcher,
    permit: Option<OwnedSemaphorePermit>,
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
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    drop(permit);
}
