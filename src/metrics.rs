//! The Prometheus registry. Names carry the `tokenwarden_` prefix, base units and
//! `_total` for counters. Labels stay low-cardinality: agent and team ids come from the
//! config; model names come from requests, so at most [`MAX_MODEL_LABELS`] distinct ones
//! are used and the rest are counted as `other`. No key, run id or path is ever a label.

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Distinct model label values before the rest become `other`.
pub const MAX_MODEL_LABELS: usize = 64;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost_usd: CounterVec,
    pub unpriced_tokens: IntCounterVec,
    pub request_duration: Histogram,
    pub upstream_ttfb: Histogram,
    pub proxy_overhead: Histogram,
    pub active_streams: IntGauge,
    pub sse_events_dropped: IntCounter,
    pub audit_records: IntCounter,
    pub rejections: IntCounterVec,
    pub budget_remaining: GaugeVec,
    pub budget_reserved: GaugeVec,
    pub audit_write_errors: IntCounter,
    pub runs_active: IntGauge,
    pub runs_stopped: IntCounterVec,
    pub run_warnings: IntCounterVec,
    pub paused_agents: IntGauge,
    pub anomalies: IntCounterVec,
    /// Outcomes agents reported; kinds are bounded per agent (`outcomes.max_kinds_per_agent`).
    pub outcomes: IntCounterVec,
    models: Mutex<HashSet<String>>,
}

/// Buckets for request and first-byte times: 5 ms to 10 min.
const SLOW_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0, 600.0,
];
/// Buckets for the proxy's own time: 10 µs to 100 ms.
const FAST_BUCKETS: [f64; 10] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.025, 0.1,
];

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("tokenwarden_requests_total", "Requests by how they ended"),
            &["agent", "provider", "model", "outcome"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new("tokenwarden_tokens_total", "Tokens metered"),
            &["agent", "model", "kind", "estimated"],
        )?;
        let cost_usd = CounterVec::new(
            Opts::new("tokenwarden_cost_usd_total", "Spend in US dollars"),
            &["agent", "team", "model"],
        )?;
        let unpriced_tokens = IntCounterVec::new(
            Opts::new(
                "tokenwarden_unpriced_tokens_total",
                "Tokens of models without a price (costed at zero)",
            ),
            &["agent", "model"],
        )?;
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tokenwarden_request_duration_seconds",
                "From request arrival to the end of the response body",
            )
            .buckets(SLOW_BUCKETS.to_vec()),
        )?;
        let upstream_ttfb = Histogram::with_opts(
            HistogramOpts::new(
                "tokenwarden_upstream_time_to_first_byte_seconds",
                "From sending the request upstream to its response headers",
            )
            .buckets(SLOW_BUCKETS.to_vec()),
        )?;
        let proxy_overhead = Histogram::with_opts(
            HistogramOpts::new(
                "tokenwarden_proxy_overhead_seconds",
                "Time spent in the proxy itself before the request goes upstream",
            )
            .buckets(FAST_BUCKETS.to_vec()),
        )?;
        let active_streams = IntGauge::new(
            "tokenwarden_active_streams",
            "Responses being forwarded right now",
        )?;
        let sse_events_dropped = IntCounter::new(
            "tokenwarden_sse_events_dropped_total",
            "SSE events too large for the observer (forwarded, not read)",
        )?;
        let audit_records = IntCounter::new(
            "tokenwarden_audit_records_total",
            "Audit records written and fsynced",
        )?;
        let audit_write_errors = IntCounter::new(
            "tokenwarden_audit_write_errors_total",
            "Failed writes of the audit log (each retried)",
        )?;
        let rejections = IntCounterVec::new(
            Opts::new(
                "tokenwarden_rejections_total",
                "Requests the proxy refused, by reason",
            ),
            &["agent", "reason"],
        )?;
        let budget_remaining = GaugeVec::new(
            Opts::new(
                "tokenwarden_budget_remaining",
                "What a budget has left in its current period (settled spend)",
            ),
            &["agent", "team", "period", "unit"],
        )?;
        let budget_reserved = GaugeVec::new(
            Opts::new(
                "tokenwarden_budget_reserved",
                "What requests in flight hold of a budget",
            ),
            &["agent", "team", "period", "unit"],
        )?;
        let runs_active = IntGauge::new(
            "tokenwarden_runs_active",
            "Runs with a request in flight or within their idle gap",
        )?;
        let runs_stopped = IntCounterVec::new(
            Opts::new(
                "tokenwarden_runs_stopped_total",
                "Runs stopped, by the condition that stopped them",
            ),
            &["agent", "condition"],
        )?;
        let run_warnings = IntCounterVec::new(
            Opts::new(
                "tokenwarden_run_warnings_total",
                "Requests let through with a warning, by condition",
            ),
            &["agent", "condition"],
        )?;
        let paused_agents = IntGauge::new(
            "tokenwarden_paused_agents",
            "Agents an admin paused (every agent while pause-all is on)",
        )?;
        let anomalies = IntCounterVec::new(
            Opts::new(
                "tokenwarden_anomalies_total",
                "Spikes of an agent's tokens against its own baseline",
            ),
            &["agent"],
        )?;
        registry.register(Box::new(anomalies.clone()))?;
        let outcomes = IntCounterVec::new(
            Opts::new(
                "tokenwarden_outcomes_total",
                "Outcomes agents reported (tickets resolved, PRs merged, ...), by kind",
            ),
            &["agent", "kind"],
        )?;
        registry.register(Box::new(outcomes.clone()))?;
        registry.register(Box::new(runs_active.clone()))?;
        registry.register(Box::new(runs_stopped.clone()))?;
        registry.register(Box::new(run_warnings.clone()))?;
        registry.register(Box::new(paused_agents.clone()))?;
        registry.register(Box::new(rejections.clone()))?;
        registry.register(Box::new(budget_remaining.clone()))?;
        registry.register(Box::new(budget_reserved.clone()))?;
        registry.register(Box::new(audit_records.clone()))?;
        registry.register(Box::new(audit_write_errors.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(cost_usd.clone()))?;
        registry.register(Box::new(unpriced_tokens.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_ttfb.clone()))?;
        registry.register(Box::new(proxy_overhead.clone()))?;
        registry.register(Box::new(active_streams.clone()))?;
        registry.register(Box::new(sse_events_dropped.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            tokens,
            cost_usd,
            unpriced_tokens,
            request_duration,
            upstream_ttfb,
            proxy_overhead,
            active_streams,
            sse_events_dropped,
            audit_records,
            audit_write_errors,
            rejections,
            budget_remaining,
            budget_reserved,
            runs_active,
            runs_stopped,
            run_warnings,
            paused_agents,
            anomalies,
            outcomes,
            models: Mutex::new(HashSet::new()),
        })
    }

    /// Registers another collector (the audit log's, the ledger's) in the same registry.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// The label for a model name: itself while fewer than the cap have been seen, else
    /// `other`. Names are also cut to 64 characters.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        let mut end = model.len().min(64);
        while !model.is_char_boundary(end) {
            end -= 1;
        }
        let model = &model[..end];
        let mut seen = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(model) {
            return model;
        }
        if seen.len() < MAX_MODEL_LABELS {
            seen.insert(model.to_owned());
            return model;
        }
        "other"
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot render metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_labels_are_capped() {
        let m = Metrics::new().unwrap();
        for i in 0..MAX_MODEL_LABELS {
            assert_eq!(m.model_label(&format!("m{i}")), format!("m{i}"));
        }
        assert_eq!(m.model_label("one-too-many"), "other");
        assert_eq!(m.model_label("m3"), "m3");
    }

    #[test]
    fn renders_the_documented_names() {
        let m = Metrics::new().unwrap();
        m.requests
            .with_label_values(&["a", "openai", "gpt-4o", "ok"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("tokenwarden_requests_total{agent=\"a\",model=\"gpt-4o\",outcome=\"ok\",provider=\"openai\"} 1"), "{text}");
        assert!(text.contains("tokenwarden_active_streams 0"));
    }
}
