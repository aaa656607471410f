//! The forwarding service: route, identify, read the body within its bound, swap the
//! key, send through the pooled client, and tap the response on its way back.

pub mod admit;
mod connect;
mod detach;
pub mod error;
pub mod h1;
pub mod headers;
pub mod outcomes;
pub mod settle;
pub mod strip;
pub mod tap;
pub mod upload;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::admin::auth::AdminTokens;
use crate::audit::AuditLog;
use crate::config::{Config, ServerConfig, UpstreamConfig};
use crate::guard::anomaly::{Anomalies, AnomalySettings};
use crate::guard::runs::{self, Runs, Verdict};
use crate::guard::{Guards, Switches};
use crate::identity::{Agent, Identities};
use crate::ledger::redis::RedisLedger;
use crate::ledger::Ledger;
use crate::metering::decode::Decoder;
use crate::metering::{Endpoint, Pricing, UsageObserver};
use crate::metrics::Metrics;
use crate::providers::openai;
use crate::providers::{Provider, ProviderError, ProviderKind, Router};
use admit::Policies;
use connect::{Bounded, TcpConnector};
use error::{error_response, ProxyError, REQUEST_ID_HEADER};
use settle::Settlement;
use strip::StripUsage;
use tap::{StreamLimits, TapBody};
use upload::{Stalled, TooLarge, Upload};

/// What the proxy sends upstream: a body read whole (JSON, which the proxy may need to
/// read) or a streamed one (uploads), both bounded by `max_body_bytes`.
pub type UpstreamBody = Either<Full<Bytes>, Upload>;
/// What the proxy answers: a tapped provider response or an error it made itself.
pub type ResponseBody = Either<Either<Tapped, StripUsage<Tapped>>, Full<Bytes>>;
/// A provider's response body on its way to the client.
pub type Tapped = TapBody<FromUpstream, Box<Settlement>>;
/// A provider's response body as it arrives: from hyper's client (TLS, HTTP/2) or from
/// the plain-TCP HTTP/1.1 client.
pub type FromUpstream = Either<Incoming, h1::H1Body>;
pub type UpstreamClient = Client<Bounded<HttpsConnector<TcpConnector>>, UpstreamBody>;

/// Everything derived from one version of the config; swapped whole on reload.
#[derive(Debug)]
pub struct Live {
    pub config: Config,
    pub router: Router,
    pub identities: Identities,
    pub pricing: Pricing,
    pub policies: Policies,
    /// Who may use the admin API.
    pub admin_tokens: AdminTokens,
    /// `runs.headers`, parsed once.
    pub run_headers: Vec<HeaderName>,
}

impl Live {
    pub fn new(
        config: Config,
        lookup_env: impl Fn(&str) -> Option<String>,
    ) -> Result<Live, ProviderError> {
        let providers = config
            .providers
            .iter()
            .map(|p| Provider::from_config(p, &lookup_env))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Live {
            router: Router::new(providers),
            identities: Identities::from_config(&config.agents),
            pricing: Pricing::new([&config.base_pricing, &config.pricing]),
            policies: Policies::from_config(&config),
            admin_tokens: AdminTokens::from_config(&config.admin, &lookup_env),
            // Validated with the config: each is a header name.
            run_headers: (config.runs.headers.iter())
                .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
                .collect(),
            config,
        })
    }
}

/// State shared by every request.
pub struct AppState {
    pub live: ArcSwap<Live>,
    pub client: Upstreams,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    /// Budgets outlive config reloads.
    pub ledger: Arc<Ledger>,
    /// So do rate limits.
    pub guards: Guards,
    /// Runs and their stops outlive reloads too.
    pub runs: Arc<Runs>,
    /// The kill switches.
    pub switches: Arc<Switches>,
    /// Each agent's baseline of tokens, for spikes.
    pub anomalies: Arc<Anomalies>,
    /// The outcome kinds each agent has reported (bounded per agent).
    pub outcome_kinds: crate::outcomes::OutcomeKinds,
    /// Budgets, rate limits and requests in flight shared with other replicas, when
    /// `storage.redis_url` is set; the ledger and guards above are then unused.
    pub redis: Option<Arc<RedisLedger>>,
    /// Runs settlements that count tokens, off the async workers.
    pub settler: settle::Settler,
    /// Set when shutdown begins; `/readyz` then answers 503.
    pub draining: AtomicBool,
    /// The config file the proxy started with, which a reload reads again.
    pub config_path: Option<std::path::PathBuf>,
    /// One reload at a time (SIGHUP and `POST /admin/reload` may meet), so each compares
    /// against the config it replaces.
    pub reloading: tokio::sync::Mutex<()>,
    /// What the dashboard reads: the audit log as it grows.
    pub overview: crate::admin::overview::Overview,
}

impl AppState {
    pub fn new(
        live: Live,
        metrics: Arc<Metrics>,
        audit: Arc<AuditLog>,
        ledger: Arc<Ledger>,
        redis: Option<Arc<RedisLedger>>,
    ) -> anyhow::Result<AppState> {
        let client = Upstreams::new(&live.config.upstream)?;
        Ok(AppState {
            live: ArcSwap::from_pointee(live),
            client,
            metrics,
            audit,
            ledger,
            guards: Guards::default(),
            runs: Arc::new(Runs::default()),
            switches: Arc::new(Switches::default()),
            anomalies: Arc::new(Anomalies::default()),
            outcome_kinds: crate::outcomes::OutcomeKinds::default(),
            redis,
            settler: settle::Settler::start(),
            draining: AtomicBool::new(false),
            config_path: None,
            reloading: tokio::sync::Mutex::new(()),
            overview: crate::admin::overview::Overview::default(),
        })
    }

    /// Lets `/admin/overview` report on the audit log in `dir`.
    pub fn with_overview(mut self, overview: crate::admin::overview::Overview) -> AppState {
        self.overview = overview;
        self
    }

    /// Names the config file that reloads read.
    pub fn with_config_path(mut self, path: std::path::PathBuf) -> AppState {
        self.config_path = Some(path);
        self
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// The clients to the providers: plain-TCP upstreams are spoken to by the lean HTTP/1.1
/// client of [`h1`], TLS ones by hyper's pooled client, HTTP/1.1 or HTTP/2 by ALPN.
///
/// Neither retries a request that reached the wire: a retry could bill twice, and the
/// SDKs retry on their own. (hyper's re-sends a request only when a pooled connection
/// turns out closed before any byte of it was written; the HTTP/1.1 client checks a
/// pooled connection before it writes.)
pub struct Upstreams {
    tls: UpstreamClient,
    plain: h1::Client,
}

/// Why a request got no response from its provider.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Tls(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    Plain(#[from] h1::Error),
}

impl UpstreamError {
    fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Tls(e) => e.is_connect(),
            UpstreamError::Plain(e) => e.is_connect(),
        }
    }

    fn is_connect_timeout(&self) -> bool {
        matches!(self, UpstreamError::Plain(h1::Error::ConnectTimeout))
    }
}

impl Upstreams {
    fn new(cfg: &UpstreamConfig) -> anyhow::Result<Upstreams> {
        Ok(Upstreams {
            tls: build_client(cfg, upstream_tls(cfg)?),
            plain: h1::Client::new(h1::Settings {
                connect_timeout: cfg.connect_timeout,
                idle_timeout: cfg.pool_idle_timeout,
                max_idle_per_host: cfg.pool_max_idle_per_host,
            }),
        })
    }

    /// Sends a request; the response comes back once its head has arrived.
    pub async fn request(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<FromUpstream>, UpstreamError> {
        if req.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
            let response = self.plain.request(req).await?;
            Ok(response.map(Either::Right))
        } else {
            let response = self.tls.request(req).await?;
            Ok(response.map(Either::Left))
        }
    }
}

/// TLS to providers: the public (webpki) roots, and the certificates in
/// `upstream.ca_file` if it is set.
pub fn upstream_tls(cfg: &UpstreamConfig) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(file) = &cfg.ca_file {
        let what = || format!("upstream.ca_file {}", file.display());
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(file)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(what)?;
        if certs.is_empty() {
            anyhow::bail!("{}: no PEM certificate in it", what());
        }
        for cert in certs {
            roots.add(cert).with_context(what)?;
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn build_client(cfg: &UpstreamConfig, tls: rustls::ClientConfig) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(TcpConnector(http));
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .build(Bounded {
            inner: https,
            limit: cfg.connect_timeout,
        })
}

/// A fresh request id: 64 random bits, hex. Its bytes are shared from the start, so the
/// response header, the settlement and the audit record hold it without a copy.
fn new_request_id() -> HeaderValue {
    let mut id = *b"req_0000000000000000";
    // Cannot fail: 8 bytes are exactly 16 hex digits.
    let _ = hex::encode_to_slice(rand::random::<u64>().to_be_bytes(), &mut id[4..]);
    // Hex digits and an underscore are always a valid header value.
    HeaderValue::from_maybe_shared(Bytes::from_owner(id))
        .unwrap_or_else(|_| HeaderValue::from_static("req_unknown"))
}

/// Serves one request from a client.
///
/// A client that goes away before the response headers must not cancel the request
/// halfway, which would lose its spend and its audit record: the request then runs on
/// in a task of its own ([`detach`]), and dropping its response settles it as
/// `client_gone`.
pub async fn handle(
    state: Arc<AppState>,
    req: Request<Incoming>,
    client_addr: SocketAddr,
) -> Response<ResponseBody> {
    detach::run_to_end(serve(state, req, client_addr, new_request_id())).await
}

async fn serve(
    state: Arc<AppState>,
    req: Request<Incoming>,
    client_addr: SocketAddr,
    request_id: HeaderValue,
) -> Response<ResponseBody> {
    let meta = RequestMeta {
        started: Instant::now(),
        request_id,
        method: req.method().clone(),
        path: Arc::from(req.uri().path()),
        client_addr,
    };
    let live = state.live.load_full();
    // The shape errors take before a provider is known.
    let fallback_kind = if req.headers().contains_key(ANTHROPIC_VERSION) {
        ProviderKind::Anthropic
    } else {
        ProviderKind::OpenAi
    };

    // Served by the proxy itself, before routing: a provider with prefix `/` would
    // otherwise take this path too.
    if *meta.path == *outcomes::PATH {
        return outcomes::handle(&state, &live, req, &meta).await;
    }

    match forward(&state, &live, req, &meta).await {
        Ok(response) => response,
        Err(rejected) => {
            let response = error_response(
                rejected.kind.unwrap_or(fallback_kind),
                &rejected.error,
                &meta.request_id,
            );
            settle::reject(&state, &meta, rejected);
            response
        }
    }
}

/// What is known of a request from its first line.
pub struct RequestMeta {
    pub started: Instant,
    pub request_id: HeaderValue,
    pub method: http::Method,
    /// Without the query string, which may carry credentials of its own.
    pub path: Arc<str>,
    pub client_addr: SocketAddr,
}

/// A request the proxy answered itself, with what was known when it stopped.
pub struct Rejected {
    pub kind: Option<ProviderKind>,
    pub error: ProxyError,
    pub agent: Option<Arc<Agent>>,
    pub provider: Option<Arc<str>>,
    pub model: Option<Arc<str>>,
    /// The run the request belonged to, once known.
    pub run: Option<Arc<str>>,
}

async fn forward(
    state: &AppState,
    live: &Live,
    req: Request<Incoming>,
    meta: &RequestMeta,
) -> Result<Response<ResponseBody>, Rejected> {
    let Some((provider, rest)) = live.router.route(req.uri().path()) else {
        return Err(Rejected {
            kind: None,
            error: ProxyError::NoRoute,
            agent: None,
            provider: None,
            model: None,
            run: None,
        });
    };
    let agent = live.identities.identify(req.headers());
    let reject = |error: ProxyError| Rejected {
        kind: Some(provider.kind),
        error,
        agent: agent.clone(),
        provider: Some(provider.name.clone()),
        model: None,
        run: None,
    };

    if is_unsafe_path(rest) {
        return Err(reject(ProxyError::UnsafePath));
    }
    let Some(agent) = agent.clone() else {
        return Err(reject(ProxyError::Unauthorized));
    };
    if live.config.audit.fail_closed {
        state
            .audit
            .accepting()
            .map_err(|why| reject(ProxyError::AuditUnavailable(why)))?;
    }
    let credential = provider.credential().map_err(|env| {
        reject(ProxyError::ProviderKeyMissing {
            provider: provider.name.to_string(),
            env: env.to_owned(),
        })
    })?;
    let uri = provider
        .upstream_uri(rest, req.uri().query())
        .map_err(|_| reject(ProxyError::BadUpstreamRequest))?;
    let endpoint = provider.endpoint(rest);

    let (mut parts, body) = req.into_parts();
    let limit = live.config.server.max_body_bytes;
    let (body, json, rest) = read_body(&parts.headers, body, &live.config.server)
        .await
        .map_err(&reject)?;
    let parsed = json.as_deref().and_then(crate::providers::read_fields);
    let readable = parsed.is_some();
    let fields = parsed.unwrap_or_default();
    let model: Arc<str> = Arc::from(fields.model.as_deref().unwrap_or_default());
    let reject = |error: ProxyError| Rejected {
        model: Some(model.clone()),
        ..reject(error)
    };
    let price = live.pricing.price(&model).copied();
    let original = json.clone().unwrap_or_default();
    let policy = live.policies.get(&agent.id).cloned().unwrap_or_default();

    // The kill switches, then the run's stop conditions.
    if let Some(scope) = state.switches.paused(&agent.id) {
        return Err(reject(ProxyError::Paused {
            agent: agent.id.to_string(),
            all: scope == "all",
        }));
    }
    let named = run_name(&parts.headers, &live.run_headers);
    let fingerprint = policy
        .runs
        .max_repeats
        .and(json.as_deref())
        .and_then(runs::fingerprint);
    let (ticket, warnings) = match state.runs.enter(
        agent.id.clone(),
        named.as_deref(),
        &policy.runs,
        fingerprint,
    ) {
        Verdict::Go { ticket, warnings } => (ticket, warnings),
        Verdict::Stop {
            run,
            crossed,
            newly,
        } => {
            if newly {
                settle::run_event(
                    &state.audit,
                    &state.metrics,
                    state.redis.as_ref(),
                    &agent,
                    &run,
                    settle::RunEvent::Stopped,
                    &crossed,
                );
            }
            return Err(Rejected {
                run: Some(run.clone()),
                ..reject(ProxyError::RunStopped(Box::new(crossed)))
            });
        }
    };
    let run_id = ticket.run.clone();
    let reject = |error: ProxyError| Rejected {
        run: Some(run_id.clone()),
        ..reject(error)
    };
    for warning in &warnings {
        settle::run_event(
            &state.audit,
            &state.metrics,
            state.redis.as_ref(),
            &agent,
            &run_id,
            settle::RunEvent::Warning,
            warning,
        );
    }

    let stores = admit::Stores {
        ledger: &state.ledger,
        guards: &state.guards,
        redis: state.redis.as_ref(),
    };
    let admitted = admit::admit(
        stores,
        &policy,
        &live.config,
        admit::Request {
            agent: &agent.id,
            readable,
            model: &model,
            endpoint,
            fields: &fields,
            body: &original,
            price,
            run: &run_id,
        },
    )
    .await
    .map_err(|error| {
        if let ProxyError::RunStopped(crossed) = &error {
            // Stopped on another replica: this one learns it too.
            state.runs.restore_stop(
                &agent.id,
                &run_id,
                (**crossed).clone(),
                jiff::Timestamp::now().to_string(),
                Duration::ZERO,
            );
        }
        reject(error)
    })?;

    // The only changes made to a body: the output limit admission clamped, and asking
    // for the usage report the client did not.
    let mut upstream_json = admitted.body.clone();
    let inject = provider.inject_usage
        && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
        && fields.wants_usage_injected();
    let mut injected = false;
    if inject && json.is_some() {
        let current = upstream_json.as_ref().unwrap_or(&original);
        if let Some(with_usage) =
            openai::inject_include_usage(current, fields.stream_options.is_some())
        {
            upstream_json = Some(with_usage);
            injected = true;
        }
    }
    if injected {
        // The usage chunk must be removed from the stream on its way back, which needs
        // the stream uncompressed: ask for it so (identity is always acceptable).
        parts.headers.remove(http::header::ACCEPT_ENCODING);
    }
    let mut body = body;
    if let Some(new_body) = &upstream_json {
        parts
            .headers
            .insert(CONTENT_LENGTH, HeaderValue::from(new_body.len()));
        body = Either::Left(Full::new(new_body.clone()));
    }

    headers::to_upstream(&mut parts.headers, credential);
    parts.uri = uri;
    // The client's HTTP version says nothing about the upstream connection: the pooled
    // client speaks HTTP/1.1 or, where ALPN agrees, HTTP/2.
    parts.version = http::Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);

    let timeouts = &live.config.upstream;
    let deadline = meta.started + timeouts.total_timeout;
    let first_byte = timeouts.first_byte_timeout.min(timeouts.total_timeout);
    let sent = Instant::now();
    let before_upstream = sent - meta.started;
    let response = match tokio::time::timeout(first_byte, state.client.request(upstream_req)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            // An upload's own failure first: an HTTP/2 upstream client reports it as a
            // reset stream of its own, which would blame the provider.
            let error = match rest.as_ref().and_then(upload::Rest::failure) {
                Some(upload::Failure::TooLarge) => ProxyError::BodyTooLarge { limit },
                Some(upload::Failure::Stalled) => {
                    ProxyError::body_timeout(live.config.server.body_read_timeout)
                }
                None => classify_upstream_error(&e, provider, &live.config),
            };
            if let (ProxyError::BodyTooLarge { .. }, Some(rest)) = (&error, rest) {
                rest.drain(limit);
            }
            if error.outcome() != "rejected" {
                settle_failed(state, &agent, ticket);
            }
            return Err(reject(error));
        }
        Err(_) => {
            settle_failed(state, &agent, ticket);
            return Err(reject(ProxyError::FirstByteTimeout {
                provider: provider.name.to_string(),
                timeout: humantime::format_duration(first_byte).to_string(),
            }));
        }
    };
    let headers_at = Instant::now();

    let (mut parts, body) = response.into_parts();
    // Nor does the upstream's say anything about the client's: an HTTP/1.0 upstream would
    // otherwise make hyper answer an HTTP/1.1 client in HTTP/1.0 and close its connection.
    parts.version = http::Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(REQUEST_ID_HEADER, meta.request_id.clone());
    let sse = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let compressed = parts
        .headers
        .get(http::header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    let strip = injected && sse && parts.status.is_success() && !compressed;
    insert_remaining(&mut parts.headers, admitted.remaining);
    if !warnings.is_empty() {
        insert_warnings(&mut parts.headers, &warnings);
    }
    if strip {
        parts.headers.remove(CONTENT_LENGTH);
    }
    let brake = (sse && !ticket.allowance.is_unbounded()).then(|| settle::Brake {
        kind: provider.kind,
        allowance: ticket.allowance,
        run: ticket.run.clone(),
        agent: agent.id.to_string(),
        cut: None,
    });
    let settlement = Settlement {
        metrics: state.metrics.clone(),
        audit: state.audit.clone(),
        include_bodies: live.config.audit.include_bodies,
        request_id: meta.request_id.clone(),
        price,
        hold: admitted.hold,
        settler: state.settler.sender(),
        slot: admitted.slot,
        agent,
        provider: provider.name.clone(),
        endpoint,
        model,
        method: meta.method.clone(),
        path: meta.path.clone(),
        status: parts.status.as_u16(),
        client_addr: meta.client_addr,
        request: json.unwrap_or_default(),
        // A provider's error answer is not billed: its usage counts if reported, and is
        // never estimated.
        observer: UsageObserver::new(endpoint, sse)
            .estimating(parts.status.is_success())
            .holding_frames(live.config.audit.include_bodies),
        decoder: parts
            .headers
            .get(http::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .and_then(Decoder::for_encoding),
        started: meta.started,
        upstream_ttfb: headers_at - sent,
        brake,
        ticket: Some(ticket),
        redis: state.redis.clone(),
        watch: live.config.anomalies.enabled.then(|| settle::Watch {
            anomalies: state.anomalies.clone(),
            switches: state.switches.clone(),
            settings: AnomalySettings {
                window: live.config.anomalies.window,
                factor: live.config.anomalies.factor,
                min_tokens: live.config.anomalies.min_tokens,
            },
            pause: live.config.anomalies.pause,
        }),
    };
    state.metrics.active_streams.inc();
    let limits = StreamLimits {
        idle: timeouts.idle_timeout,
        deadline,
    };
    let tapped = TapBody::new(body, Box::new(settlement), limits);
    let body = if strip {
        Either::Right(StripUsage::new(tapped))
    } else {
        Either::Left(tapped)
    };
    let response = Response::from_parts(parts, Either::Left(body));
    state
        .metrics
        .proxy_overhead
        .observe((before_upstream + headers_at.elapsed()).as_secs_f64());
    Ok(response)
}

/// The run a request names in the first of `names` it carries.
fn run_name(headers: &HeaderMap, names: &[HeaderName]) -> Option<String> {
    names.iter().find_map(|name| {
        let value = headers.get(name)?.to_str().ok()?.trim();
        // Bounded: a run id is attribution, kept in memory and written to the audit log.
        (!value.is_empty() && value.len() <= 200).then(|| value.to_owned())
    })
}

/// `x-tokenwarden-warning`: the conditions a run crossed under `action = "warn"`.
fn insert_warnings(headers: &mut HeaderMap, warnings: &[runs::Crossed]) {
    let text = warnings
        .iter()
        .map(|w| w.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let value = HeaderValue::from_str(&text).unwrap_or_else(|_| {
        let names: Vec<&str> = warnings.iter().map(|w| w.condition.as_str()).collect();
        HeaderValue::from_str(&names.join(", ")).unwrap_or(HeaderValue::from_static("warning"))
    });
    headers.insert(WARNING, value);
}

/// A request that never got an answer from the provider counts as an upstream error
/// of its run.
fn settle_failed(state: &AppState, agent: &Agent, ticket: runs::Ticket) {
    let run = ticket.run.clone();
    if let Some(crossed) = ticket.settle(0, 0, runs::Ending::UpstreamError) {
        settle::run_event(
            &state.audit,
            &state.metrics,
            state.redis.as_ref(),
            agent,
            &run,
            settle::RunEvent::Stopped,
            &crossed,
        );
    }
}

const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
const REMAINING_USD: HeaderName = HeaderName::from_static("x-tokenwarden-budget-remaining-usd");
const REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-tokenwarden-budget-remaining-tokens");
const WARNING: HeaderName = HeaderName::from_static("x-tokenwarden-warning");

/// `x-tokenwarden-budget-remaining-usd` and `-tokens`: what the tightest budget of each
/// unit had left when the request was admitted.
fn insert_remaining(headers: &mut HeaderMap, remaining: crate::ledger::Remaining) {
    if let Some(nanos) = remaining.nanos {
        headers.insert(REMAINING_USD, usd_value(nanos));
    }
    if let Some(tokens) = remaining.tokens {
        headers.insert(REMAINING_TOKENS, HeaderValue::from(tokens));
    }
}

/// Nano-dollars as dollars with six decimals (`12.345679`), as `{:.6}` of the dollars as
/// a float shows them, in integer arithmetic: float formatting costs more than the rest
/// of the header. The float's own rounding is kept where integers would differ: at an
/// exact half micro-dollar (the float lies just above or below it) and past 2^53 nanos.
fn usd_value(nanos: u64) -> HeaderValue {
    if nanos % 1_000 == 500 || nanos > 1 << 53 {
        let text = format!("{:.6}", crate::ledger::nanos_to_usd(nanos));
        return HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("0"));
    }
    use std::io::Write;
    let micros = nanos / 1_000 + u64::from(nanos % 1_000 > 500);
    // At most 20 digits, a point and six more.
    let mut text = [0u8; 27];
    let mut rest = &mut text[..];
    let _ = write!(rest, "{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    let len = 27 - rest.len();
    // Digits and a point are always a valid header value.
    HeaderValue::from_bytes(&text[..len]).unwrap_or(HeaderValue::from_static("0"))
}

/// Reads a JSON body whole (the proxy may need its fields), and streams any other body.
/// Both stop at `limit`; a declared length past it is refused before reading a byte.
async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    server: &ServerConfig,
) -> Result<(UpstreamBody, Option<Bytes>, Option<upload::Rest>), ProxyError> {
    let limit = server.max_body_bytes;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let (upload, rest) = Upload::new(body, limit, server.body_read_timeout);
    if !is_json(headers) {
        return Ok((Either::Right(upload), None, Some(rest)));
    }
    match upload.collect().await {
        Ok(collected) => {
            // One copy of exactly the body's size, also for a body that came in one
            // frame: that frame is a slice of the connection's read buffer (8 KiB and
            // up), which the settlement would otherwise keep for as long as the response
            // streams. (`to_bytes` copies a body of several frames anyway.)
            let bytes = exact_copy(collected.aggregate());
            Ok((Either::Left(Full::new(bytes.clone())), Some(bytes), None))
        }
        Err(e) if e.is::<TooLarge>() => {
            rest.drain(limit);
            Err(ProxyError::BodyTooLarge { limit })
        }
        Err(e) if e.is::<Stalled>() => Err(ProxyError::body_timeout(server.body_read_timeout)),
        Err(_) => Err(ProxyError::BodyRead),
    }
}

/// The bytes of `buf` in an allocation of their own, of exactly their size.
fn exact_copy(mut buf: impl Buf) -> Bytes {
    let mut exact = Vec::with_capacity(buf.remaining());
    while buf.has_remaining() {
        let chunk = buf.chunk();
        exact.extend_from_slice(chunk);
        let n = chunk.len();
        buf.advance(n);
    }
    Bytes::from(exact)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let essence = v.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/json")
        })
}

/// `.` and `..` segments (literal or percent-encoded) and encoded slashes could climb out
/// of the provider's base path once the upstream decodes and normalises the URL; such
/// paths are refused.
fn is_unsafe_path(path: &str) -> bool {
    path.split('/').any(|segment| {
        is_dot_segment(segment.as_bytes()) || contains_encoded_separator(segment.as_bytes())
    })
}

fn is_dot_segment(mut segment: &[u8]) -> bool {
    let mut dots = 0;
    while !segment.is_empty() {
        segment = match segment {
            [b'.', rest @ ..] => rest,
            [b'%', b'2', e, rest @ ..] if e.eq_ignore_ascii_case(&b'e') => rest,
            _ => return false,
        };
        dots += 1;
    }
    (1..=2).contains(&dots)
}

/// An encoded slash or backslash, or an encoded character that never needs encoding
/// (letters, digits, `-._~`): no SDK sends those, and an upstream that decodes them
/// would see another path than the one the proxy routed and metered.
fn contains_encoded_separator(segment: &[u8]) -> bool {
    segment.windows(3).any(|w| {
        if w[0] != b'%' {
            return false;
        }
        let Some(c) = std::str::from_utf8(&w[1..])
            .ok()
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        else {
            return false;
        };
        c == b'/' || c == b'\\' || c.is_ascii_alphanumeric() || b"-._~".contains(&c)
    })
}

fn classify_upstream_error(
    error: &UpstreamError,
    provider: &Provider,
    config: &Config,
) -> ProxyError {
    let mut timed_out = false;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        timed_out |= e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
        source = e.source();
    }
    tracing::warn!(provider = &*provider.name, error = %ErrorChain(error), "upstream request failed");
    let provider = provider.name.to_string();
    if error.is_connect() && (timed_out || error.is_connect_timeout()) {
        ProxyError::ConnectTimeout {
            provider,
            timeout: humantime::format_duration(config.upstream.connect_timeout).to_string(),
        }
    } else if error.is_connect() {
        ProxyError::UpstreamUnreachable { provider }
    } else {
        ProxyError::UpstreamClosed { provider }
    }
}

/// Formats an error with all its sources, for logs.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_dollars_read_as_float_formatting_would_show_them() {
        for (nanos, shown) in [
            (0, "0.000000"),
            (1, "0.000000"),
            (499, "0.000000"),
            (501, "0.000001"),
            (1_234_567_890, "1.234568"),
            (5_000_000_000, "5.000000"),
            (999_999_999, "1.000000"),
        ] {
            assert_eq!(usd_value(nanos), shown, "{nanos} nano-dollars");
        }
        let float = |nanos: u64| format!("{:.6}", crate::ledger::nanos_to_usd(nanos));
        let ties = (0..200_000u64).map(|m| m * 1_000 + 500);
        let near_ties = (0..200_000u64).flat_map(|m| [m * 1_000 + 499, m * 1_000 + 501]);
        let grid = (0..10_000_000_000u64).step_by(7_777_777);
        let huge = [
            (1 << 53) - 1,
            1 << 53,
            (1 << 53) + 1,
            u64::MAX / 3,
            u64::MAX,
        ];
        for nanos in ties.chain(near_ties).chain(grid).chain(huge) {
            assert_eq!(
                usd_value(nanos),
                float(nanos).as_str(),
                "{nanos} nano-dollars"
            );
        }
    }

    #[test]
    fn request_ids_are_sixteen_hex_digits() {
        let id = new_request_id();
        let id = id.to_str().unwrap();
        assert_eq!(id.len(), 20, "{id}");
        assert!(id.starts_with("req_"), "{id}");
        assert!(id[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn unsafe_paths_are_found_in_any_spelling() {
        for bad in [
            "/v1/../admin",
            "/..",
            "/v1/%2e%2e/x",
            "/v1/%2E./x",
            "/./v1",
            "/v1%2F..%2Fadmin",
            "/v1/a%5cb",
            "/v1/chat/completion%73",
        ] {
            assert!(is_unsafe_path(bad), "{bad}");
        }
        for ok in [
            "/v1/chat/completions",
            "/v1/files/a..b",
            "/v1/...",
            "",
            "/v1/%20x",
        ] {
            assert!(!is_unsafe_path(ok), "{ok}");
        }
    }

    #[test]
    fn a_body_read_whole_holds_no_connection_buffer() {
        let mut read_buf = bytes::BytesMut::with_capacity(8192);
        read_buf.extend_from_slice(b"POST / HTTP/1.1\r\n\r\n{\"model\":\"m\"}");
        let body = read_buf.split_off(19).freeze();
        let copy = exact_copy(body.clone().chain(Bytes::new()));
        assert_eq!(copy, body);
        assert!(copy.is_unique());
        let frames = Bytes::from_static(b"{\"a\":").chain(Bytes::from_static(b"1}"));
        assert_eq!(exact_copy(frames), Bytes::from_static(b"{\"a\":1}"));
    }

    #[test]
    fn json_is_recognised_with_parameters() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(is_json(&h));
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=x"),
        );
        assert!(!is_json(&h));
    }
}
