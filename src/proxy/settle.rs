//! Settlement: what happens, exactly once, when a forwarded response ends.
//!
//! The [`Settlement`] rides in the body tap. It shows each frame to the usage observer
//! and, at the end, turns the usage into cost, metrics and the access log line. An
//! estimate over a large body runs on the blocking pool, never on a tokio worker.

use std::net::SocketAddr;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use tokio::time::Instant;

use super::tap::{Flow, Observer, StreamEnd};
use super::{AppState, Rejected, RequestMeta};
use crate::audit::{method_name, AuditLog, Fingerprint, Record};
use crate::guard::anomaly::{Anomalies, AnomalySettings};
use crate::guard::runs::{Allowance, Condition, Crossed, Ending, Ticket};
use crate::guard::{Slot, Switches};
use crate::identity::Agent;
use crate::ledger::redis::RedisLedger;
use crate::ledger::{usd_to_nanos, Amount, Hold};
use crate::metering::decode::Decoder;
use crate::metering::{Endpoint, Metered, Price, UsageObserver};
use crate::metrics::Metrics;
use crate::providers::{ErrorClass, ProviderKind};

/// The per-request context carried to the end of the response.
pub struct Settlement {
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    pub include_bodies: bool,
    pub request_id: HeaderValue,
    pub agent: Arc<Agent>,
    pub provider: Arc<str>,
    pub endpoint: Endpoint,
    pub model: Arc<str>,
    pub price: Option<Price>,
    /// Budget held for this request; settled to the real spend at the end.
    pub hold: Option<Hold>,
    /// The agent's place among its requests in flight, given back at the end.
    pub slot: Option<Slot>,
    /// Where a settlement that counts tokens is sent; `None` once shut down.
    pub settler: Option<Sender<Job>>,
    pub method: http::Method,
    pub path: Arc<str>,
    pub status: u16,
    pub client_addr: SocketAddr,
    /// The JSON request body (empty for other bodies), for the fallback count.
    pub request: Bytes,
    pub observer: UsageObserver,
    /// For a compressed response: the observer reads a decompressed copy.
    pub decoder: Option<Decoder>,
    pub started: Instant,
    pub upstream_ttfb: Duration,
    /// The request's place in its run, settled with its spend.
    pub ticket: Option<Ticket>,
    /// For a stream of a run with stop conditions: what it may still spend.
    pub brake: Option<Brake>,
    /// Where stops are shared with other replicas.
    pub redis: Option<Arc<RedisLedger>>,
    /// Spikes against the agent's baseline, when watched.
    pub watch: Option<Watch>,
}

/// What a settlement needs to report (and, if configured, stop) a spike.
pub struct Watch {
    pub anomalies: Arc<Anomalies>,
    pub switches: Arc<Switches>,
    pub settings: AnomalySettings,
    /// Pause the agent on a spike.
    pub pause: bool,
}

impl Watch {
    fn observe(
        &self,
        audit: &AuditLog,
        metrics: &Metrics,
        redis: Option<&Arc<RedisLedger>>,
        agent: &Agent,
        tokens: u64,
    ) {
        let Some(spike) = self.anomalies.observe(&self.settings, &agent.id, tokens) else {
            return;
        };
        metrics.anomalies.with_label_values(&[&agent.id]).inc();
        tracing::warn!(agent = &*agent.id, "token spike: {spike}");
        let window = humantime::format_duration(self.settings.window);
        audit.append(Record {
            ts: jiff::Timestamp::now(),
            kind: "anomaly",
            agent: Some(agent.id.clone()),
            team: agent.team.clone(),
            outcome: if self.pause { "paused" } else { "reported" },
            reason: "tokens_per_window".into(),
            detail: Some(format!(
                "{spike} (window {window}, factor {})",
                self.settings.factor
            )),
            ..Record::default()
        });
        if self.pause && self.switches.set_agent(&agent.id, true) {
            if let Some(redis) = redis {
                redis.share_pause(&[agent.tag().to_owned()], &agent.id, true);
            }
            // The line a restart replays the pause from, as for an admin's.
            audit.append(Record {
                ts: jiff::Timestamp::now(),
                kind: "admin",
                agent: Some(agent.id.clone()),
                team: agent.team.clone(),
                outcome: "ok",
                reason: "pause".into(),
                by: Some("anomaly".to_owned()),
                detail: Some(format!("paused on a token spike: {spike}")),
                ..Record::default()
            });
        }
    }
}

/// Cuts a stream whose run crosses a stop condition on the way, with an error event in
/// the provider's own shape, so SDKs raise instead of returning a truncated answer.
pub struct Brake {
    pub kind: ProviderKind,
    pub allowance: Allowance,
    pub run: Arc<str>,
    pub agent: String,
    /// Set once the stream is cut.
    pub cut: Option<Condition>,
}

impl Brake {
    /// Looks at the stream so far, between two events only (an event is never split):
    /// the condition the stream crosses, with the figures, if any.
    fn check(&mut self, observer: &UsageObserver, price: Option<Price>) -> Option<Crossed> {
        if self.cut.is_some() || !observer.between_events() {
            return None;
        }
        let usage = observer.running_usage();
        let spent = |p: Price| usd_to_nanos(p.cost_usd(&usage));
        let (condition, figures) =
            if let Some(max) = self.allowance.tokens.filter(|&max| usage.total() >= max) {
                (
                    Condition::MaxTokens,
                    format!("{} tokens in this stream, {max} were left", usage.total()),
                )
            } else if let Some((max, p)) = self
                .allowance
                .nanos
                .zip(price)
                .filter(|&(max, p)| spent(p) >= max)
            {
                (
                    Condition::MaxUsd,
                    format!(
                        "${:.6} in this stream, ${:.6} was left",
                        crate::ledger::nanos_to_usd(spent(p)),
                        crate::ledger::nanos_to_usd(max)
                    ),
                )
            } else if self.allowance.until.is_some_and(|t| Instant::now() >= t) {
                (Condition::MaxDuration, "its time is up".to_owned())
            } else {
                return None;
            };
        self.cut = Some(condition);
        Some(Crossed {
            condition,
            message: format!(
                "run {} of agent {} crossed {} during a stream ({figures})",
                self.run,
                self.agent,
                condition.as_str()
            ),
        })
    }

    /// The provider's own in-band error event, which SDKs raise.
    fn error_event(&self, crossed: &Crossed) -> Bytes {
        let message = format!("tokenwarden: {}; the run is stopped", crossed.message);
        let body = self
            .kind
            .error_body(ErrorClass::PermissionDenied, "run_stopped", &message);
        let mut frame = Vec::with_capacity(body.len() + 32);
        if self.kind == ProviderKind::Anthropic {
            frame.extend_from_slice(b"event: error\n");
        }
        frame.extend_from_slice(b"data: ");
        frame.extend_from_slice(&body);
        frame.extend_from_slice(b"\n\n");
        Bytes::from(frame)
    }
}

/// How a forwarded request ended, as `tokenwarden_requests_total{outcome}` names it.
pub fn outcome(end: StreamEnd, status: u16) -> &'static str {
    match end {
        StreamEnd::Complete if status < 400 => "ok",
        StreamEnd::Complete => "provider_error",
        StreamEnd::UpstreamError => "upstream_error",
        StreamEnd::IdleTimeout | StreamEnd::TotalTimeout => "timeout",
        StreamEnd::ClientGone => "client_gone",
        StreamEnd::Shutdown => "shutdown",
        StreamEnd::Stopped => "stopped",
    }
}

impl Observer for Settlement {
    fn on_data(&mut self, data: &Bytes) -> Flow {
        match &mut self.decoder {
            None => self.observer.observe(data),
            Some(decoder) => self.observer.observe(&decoder.decode(data)),
        }
        let Some(brake) = &mut self.brake else {
            return Flow::Continue;
        };
        let Some(crossed) = brake.check(&self.observer, self.price) else {
            return Flow::Continue;
        };
        // Stopped now, not at settlement (which may wait for a token count): the run's
        // next request must already find it stopped.
        if self
            .ticket
            .as_ref()
            .is_some_and(|t| t.stop(crossed.clone()))
        {
            run_event(
                &self.audit,
                &self.metrics,
                self.redis.as_ref(),
                &self.agent,
                &brake.run,
                RunEvent::Stopped,
                &crossed,
            );
        }
        Flow::End(brake.error_event(&crossed))
    }

    fn on_end(self, end: StreamEnd) {
        self.metrics.active_streams.dec();
        let duration = self.started.elapsed();
        // Counting tokens is CPU work of unknown size (and the first count builds the
        // tokenizer): it goes to the settler thread, so it never holds up a worker that
        // the rest of this connection, or any other, is waiting for.
        if self.observer.needs_estimate() {
            if let Some(settler) = self.settler.clone() {
                let job: Job = Box::new(move || self.settle(end, duration));
                if let Err(std::sync::mpsc::SendError(job)) = settler.send(job) {
                    job();
                }
                return;
            }
        }
        self.settle(end, duration);
    }
}

/// A settlement waiting for the settler thread.
pub type Job = Box<dyn FnOnce() + Send>;

/// One thread that runs settlements needing the tokenizer. It is joined at shutdown
/// after the async runtime is gone, so a stream cut by the end of the grace period is
/// still counted and audited (a blocking-pool task would be cancelled then).
pub struct Settler {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Settler {
    pub fn start() -> Settler {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("settler".into())
            .spawn(move || {
                // Ends when every sender is gone: the state's and every settlement's.
                for job in rx {
                    job();
                }
            })
            .map_err(
                |e| tracing::error!(error = %e, "cannot start the settler thread; settling inline"),
            )
            .ok();
        Settler {
            tx: Mutex::new(thread.as_ref().map(|_| tx)),
            thread: Mutex::new(thread),
        }
    }

    pub fn sender(&self) -> Option<Sender<Job>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs every queued settlement and stops the thread. Call after the runtime is
    /// dropped, so no settlement can still be in flight.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the settler thread panicked");
            }
        }
    }
}

impl Settlement {
    fn settle(self, end: StreamEnd, duration: Duration) {
        let Settlement {
            metrics,
            audit,
            include_bodies,
            request_id,
            agent,
            provider,
            endpoint,
            model,
            price,
            hold,
            method,
            path,
            status,
            client_addr,
            request,
            observer,
            upstream_ttfb,
            ticket,
            brake,
            redis,
            watch,
            ..
        } = self;
        let dropped = observer.dropped_events();
        let response_body = include_bodies.then(|| observer.held_text());
        let Metered { usage, estimated } = observer.finish(&model, &request);
        let cost = price.map_or(0.0, |p| p.cost_usd(&usage));
        if let Some(hold) = hold {
            hold.settle(Amount {
                tokens: usage.total(),
                nanos: usd_to_nanos(cost),
            });
        }
        let outcome = outcome(end, status);
        let run = ticket.as_ref().map(|t| t.run.clone());
        if let Some(watch) = &watch {
            watch.observe(&audit, &metrics, redis.as_ref(), &agent, usage.total());
        }
        if let Some(ticket) = ticket {
            let ending = match (brake.and_then(|b| b.cut), end) {
                (Some(condition), _) => Ending::Cut(condition),
                (None, StreamEnd::Complete) if status < 400 => Ending::Ok,
                (None, StreamEnd::ClientGone | StreamEnd::Shutdown) => Ending::Ok,
                _ => Ending::UpstreamError,
            };
            let stopped = ticket.settle(usage.total(), usd_to_nanos(cost), ending);
            if let (Some(crossed), Some(run)) = (stopped, &run) {
                run_event(
                    &audit,
                    &metrics,
                    redis.as_ref(),
                    &agent,
                    run,
                    RunEvent::Stopped,
                    &crossed,
                );
            }
        }

        let model_label = metrics.model_label(if model.is_empty() { "none" } else { &model });
        let team = agent.team.as_deref().unwrap_or("");
        metrics
            .requests
            .with_label_values(&[&agent.id, &provider, model_label, outcome])
            .inc();
        let estimated_label = if estimated { "true" } else { "false" };
        for (kind, n) in [
            ("input", usage.input),
            ("cached_input", usage.cached_input),
            ("cache_write", usage.cache_write),
            ("output", usage.output),
            ("reasoning", usage.reasoning),
        ] {
            if n > 0 {
                metrics
                    .tokens
                    .with_label_values(&[&agent.id, model_label, kind, estimated_label])
                    .inc_by(n);
            }
        }
        if cost > 0.0 {
            metrics
                .cost_usd
                .with_label_values(&[&agent.id, team, model_label])
                .inc_by(cost);
        }
        if price.is_none() && usage.total() > 0 {
            metrics
                .unpriced_tokens
                .with_label_values(&[&agent.id, model_label])
                .inc_by(usage.total());
        }
        if dropped > 0 {
            metrics.sse_events_dropped.inc_by(dropped);
        }
        metrics.request_duration.observe(duration.as_secs_f64());
        metrics.upstream_ttfb.observe(upstream_ttfb.as_secs_f64());

        audit.append(Record {
            ts: jiff::Timestamp::now(),
            kind: "request",
            request_id: Some(request_id.clone()),
            agent: Some(agent.id.clone()),
            team: agent.team.clone(),
            run,
            provider: Some(provider.clone()),
            model: (!model.is_empty()).then(|| model.clone()),
            method: method_name(&method),
            path,
            status,
            outcome,
            reason: end.as_str().into(),
            input_tokens: usage.input,
            cached_input_tokens: usage.cached_input,
            cache_write_tokens: usage.cache_write,
            output_tokens: usage.output,
            reasoning_tokens: usage.reasoning,
            estimated,
            cost_usd: cost,
            latency_ms: duration.as_secs_f64() * 1e3,
            ttfb_ms: Some(upstream_ttfb.as_secs_f64() * 1e3),
            fingerprint: (!request.is_empty()).then(|| Fingerprint::Of(request.clone())),
            client: Some(client_addr),
            detail: None,
            by: None,
            outcome_kind: None,
            count: None,
            reference: None,
            request_body: include_bodies.then(|| String::from_utf8_lossy(&request).into_owned()),
            response_body,
        });

        tracing::info!(
            target: "tokenwarden::access",
            request_id = request_id.to_str().unwrap_or_default(),
            agent = &*agent.id,
            provider = &*provider,
            endpoint = endpoint.as_str(),
            model = &*model,
            method = %method,
            status,
            client = %client_addr,
            end = end.as_str(),
            outcome,
            input_tokens = usage.input,
            cached_input_tokens = usage.cached_input,
            cache_write_tokens = usage.cache_write,
            output_tokens = usage.output,
            reasoning_tokens = usage.reasoning,
            estimated,
            cost_usd = cost,
            first_byte_ms = upstream_ttfb.as_secs_f64() * 1e3,
            duration_ms = duration.as_secs_f64() * 1e3,
            "forwarded"
        );
    }
}

/// What happened to a run, as its audit line says.
#[derive(Debug, Clone, Copy)]
pub enum RunEvent {
    Stopped,
    Warning,
    /// An admin resumed the run; a restart forgets its stop from here on.
    Resumed,
}

/// Writes a run's stop, warning or resume: an audit line, and a metric for the first two;
/// a stop is also shared with the other replicas through Redis, when there is one.
pub fn run_event(
    audit: &AuditLog,
    metrics: &Metrics,
    redis: Option<&Arc<RedisLedger>>,
    agent: &Agent,
    run: &str,
    event: RunEvent,
    crossed: &Crossed,
) {
    let condition = crossed.condition.as_str();
    let outcome = match event {
        RunEvent::Stopped => {
            if let Some(redis) = redis {
                let why = serde_json::to_string(crossed).ok();
                redis.share_run(agent.tag(), &agent.id, run, why);
            }
            metrics
                .runs_stopped
                .with_label_values(&[&agent.id, condition])
                .inc();
            tracing::warn!(
                agent = &*agent.id,
                run,
                condition,
                "run stopped: {}",
                crossed.message
            );
            "stopped"
        }
        RunEvent::Warning => {
            metrics
                .run_warnings
                .with_label_values(&[&agent.id, condition])
                .inc();
            "warning"
        }
        RunEvent::Resumed => {
            if let Some(redis) = redis {
                redis.share_run(agent.tag(), &agent.id, run, None);
            }
            tracing::info!(agent = &*agent.id, run, "run resumed: {}", crossed.message);
            "resumed"
        }
    };
    audit.append(Record {
        ts: jiff::Timestamp::now(),
        kind: "run",
        agent: Some(agent.id.clone()),
        team: agent.team.clone(),
        run: Some(run.into()),
        outcome,
        reason: condition.into(),
        detail: Some(crossed.message.clone()),
        ..Record::default()
    });
}

/// Counts, audits and logs a request the proxy answered itself.
pub fn reject(state: &AppState, meta: &RequestMeta, rejected: Rejected) {
    let Rejected {
        error,
        agent,
        provider,
        model,
        run,
        ..
    } = rejected;
    let status = error.class().status().as_u16();
    let outcome = error.outcome();
    // A refused request's model name is whatever the client sent: it takes no place
    // among the bounded model labels.
    let model_label = "none";
    let agent_label = agent.as_ref().map_or("unknown", |a| &*a.id);
    state
        .metrics
        .rejections
        .with_label_values(&[agent_label, error.reason()])
        .inc();
    state
        .metrics
        .requests
        .with_label_values(&[
            agent_label,
            provider.as_deref().unwrap_or("none"),
            model_label,
            outcome,
        ])
        .inc();
    let latency = meta.started.elapsed();
    tracing::info!(
        target: "tokenwarden::access",
        request_id = meta.request_id.to_str().unwrap_or_default(),
        agent = agent_label,
        client = %meta.client_addr,
        method = %meta.method,
        path = &*meta.path,
        status,
        outcome,
        reason = error.reason(),
        "rejected: {error}"
    );
    state.audit.append(Record {
        ts: jiff::Timestamp::now(),
        kind: "request",
        request_id: Some(meta.request_id.clone()),
        agent: agent.as_ref().map(|a| a.id.clone()),
        team: agent.as_ref().and_then(|a| a.team.clone()),
        run,
        provider,
        model: model.filter(|m| !m.is_empty()),
        method: method_name(&meta.method),
        path: meta.path.clone(),
        status,
        outcome,
        reason: error.reason().into(),
        latency_ms: latency.as_secs_f64() * 1e3,
        client: Some(meta.client_addr),
        ..Record::default()
    });
}
