//! The admin listener: `/metrics` (Prometheus text format), `/healthz`, `/readyz`.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::ledger::{nanos_to_usd, Scope};
use crate::proxy::AppState;

pub async fn handle(state: &AppState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => {
            update_budget_gauges(state).await;
            let mut response = Response::new(Full::new(Bytes::from(state.metrics.render())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        (&Method::GET, "/readyz") if state.is_draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        (&Method::GET, "/readyz") => text(StatusCode::OK, "ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Sets the budget gauges from the ledger (or Redis), at scrape time: nothing on the
/// request path. When Redis cannot be read, the gauges keep their last values.
async fn update_budget_gauges(state: &AppState) {
    let live = state.live.load();
    let limits = live.policies.all_limits();
    let accounts = match &state.redis {
        None => state.ledger.accounts(),
        Some(redis) => {
            let (limits, tags): (Vec<_>, Vec<_>) = limits.iter().cloned().unzip();
            match redis.accounts(&limits, &tags).await {
                Ok(accounts) => accounts,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read budgets from Redis for the metrics");
                    return;
                }
            }
        }
    };
    let accounts: std::collections::HashMap<_, _> = accounts.into_iter().collect();
    let metrics = &state.metrics;
    for (limit, _) in limits {
        let account = accounts.get(&limit.key).copied().unwrap_or_default();
        let (agent, team) = match limit.key.scope {
            Scope::Agent => (&*limit.key.id, ""),
            Scope::Team => ("", &*limit.key.id),
        };
        let period = limit.key.period.as_str();
        if let Some(max) = limit.nanos {
            let labels = [agent, team, period, "usd"];
            let left = max.saturating_sub(account.spent.nanos);
            metrics
                .budget_remaining
                .with_label_values(&labels)
                .set(nanos_to_usd(left));
            metrics
                .budget_reserved
                .with_label_values(&labels)
                .set(nanos_to_usd(account.reserved.nanos));
        }
        if let Some(max) = limit.tokens {
            let labels = [agent, team, period, "tokens"];
            let left = max.saturating_sub(account.spent.tokens);
            metrics
                .budget_remaining
                .with_label_values(&labels)
                .set(left as f64);
            metrics
                .budget_reserved
                .with_label_values(&labels)
                .set(account.reserved.tokens as f64);
        }
    }
}
