//! Everything that stops a request inside the proxy, and the one place that turns it
//! into a response in the provider's own error shape.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::Response;
use http_body_util::{Either, Full};

use crate::providers::{ErrorClass, ProviderKind};

/// Response header naming the request in the proxy's logs (and later its audit log).
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-tokenwarden-request-id");

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no provider is configured for this path")]
    NoRoute,
    #[error("the path must not contain . or .. segments or encoded slashes")]
    UnsafePath,
    #[error("missing or unknown API key")]
    Unauthorized,
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("could not read the request body")]
    BodyRead,
    #[error("provider {provider} has no API key: environment variable {env} is not set")]
    ProviderKeyMissing { provider: String, env: String },
    #[error("provider {provider} is unreachable")]
    UpstreamUnreachable { provider: String },
    #[error("provider {provider} closed the connection without answering")]
    UpstreamClosed { provider: String },
    #[error("provider {provider} sent no response within {timeout}")]
    FirstByteTimeout { provider: String, timeout: String },
    #[error("could not connect to provider {provider} within {timeout}")]
    ConnectTimeout { provider: String, timeout: String },
    #[error("the request body stalled: nothing came for {timeout}")]
    BodyTimeout { timeout: String },
    #[error("invalid upstream request")]
    BadUpstreamRequest,
    #[error("the audit log cannot be written ({0}); requests are refused until it can")]
    AuditUnavailable(String),
    #[error("the budget store (Redis) cannot be reached; requests of agents with limits are refused until it can")]
    StoreUnavailable,
    #[error("{}; the run is stopped until an admin resumes it or a new run begins", .0.message)]
    RunStopped(Box<crate::guard::runs::Crossed>),
    #[error("agent {agent} is paused by an admin{}", if *.all { " (every agent is paused)" } else { "" })]
    Paused { agent: String, all: bool },
    #[error("{0}")]
    BudgetExhausted(Box<crate::ledger::Exhausted>),
    #[error("model {0:?} is not allowed for this agent")]
    ModelNotAllowed(String),
    #[error("set {0}: a budget applies and this proxy refuses requests without an output limit")]
    OutputLimitRequired(&'static str),
    #[error("model {0:?} has no price, so the agent's dollar budget cannot be enforced; add [pricing.\"{0}\"]")]
    Unpriced(String),
    #[error("the request body is not JSON the proxy can read, and a budget or an output cap applies to this agent")]
    Unreadable,
    #[error("{what}; retry in {retry_after} s")]
    RateLimited {
        what: String,
        /// Seconds, at most 60.
        retry_after: u64,
    },
}

impl ProxyError {
    /// The client's body stalled for `limit`.
    pub fn body_timeout(limit: std::time::Duration) -> ProxyError {
        ProxyError::BodyTimeout {
            timeout: humantime::format_duration(limit).to_string(),
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ProxyError::NoRoute => ErrorClass::NotFound,
            ProxyError::UnsafePath | ProxyError::BodyRead | ProxyError::BadUpstreamRequest => {
                ErrorClass::InvalidRequest
            }
            ProxyError::Unauthorized => ErrorClass::Authentication,
            ProxyError::BodyTooLarge { .. } => ErrorClass::RequestTooLarge,
            ProxyError::ProviderKeyMissing { .. }
            | ProxyError::AuditUnavailable(_)
            | ProxyError::StoreUnavailable => ErrorClass::Unavailable,
            ProxyError::UpstreamUnreachable { .. } | ProxyError::UpstreamClosed { .. } => {
                ErrorClass::UpstreamUnreachable
            }
            ProxyError::FirstByteTimeout { .. } | ProxyError::ConnectTimeout { .. } => {
                ErrorClass::UpstreamTimeout
            }
            ProxyError::BodyTimeout { .. } => ErrorClass::RequestTimeout,
            ProxyError::BudgetExhausted(_) => ErrorClass::BudgetExhausted,
            ProxyError::ModelNotAllowed(_) | ProxyError::RunStopped(_) => {
                ErrorClass::PermissionDenied
            }
            ProxyError::Paused { .. } => ErrorClass::Paused,
            ProxyError::OutputLimitRequired(_) => ErrorClass::InvalidRequest,
            ProxyError::RateLimited { .. } => ErrorClass::RateLimited,
            ProxyError::Unpriced(_) => ErrorClass::PermissionDenied,
            ProxyError::Unreadable => ErrorClass::InvalidRequest,
        }
    }

    /// The `outcome` label of `tokenwarden_requests_total` for this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProxyError::UpstreamUnreachable { .. } | ProxyError::UpstreamClosed { .. } => {
                "upstream_error"
            }
            ProxyError::FirstByteTimeout { .. } | ProxyError::ConnectTimeout { .. } => "timeout",
            _ => "rejected",
        }
    }

    /// A short, stable name for logs and (later) metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::UnsafePath => "unsafe_path",
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BodyRead => "body_read",
            ProxyError::ProviderKeyMissing { .. } => "provider_key_missing",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamClosed { .. } => "upstream_closed",
            ProxyError::FirstByteTimeout { .. } => "upstream_timeout",
            ProxyError::ConnectTimeout { .. } => "upstream_connect_timeout",
            ProxyError::BodyTimeout { .. } => "body_timeout",
            ProxyError::BadUpstreamRequest => "bad_upstream_request",
            ProxyError::AuditUnavailable(_) => "audit_unavailable",
            ProxyError::StoreUnavailable => "store_unavailable",
            ProxyError::BudgetExhausted(_) => "budget_exhausted",
            ProxyError::ModelNotAllowed(_) => "model_not_allowed",
            ProxyError::RunStopped(_) => "run_stopped",
            ProxyError::Paused { .. } => "paused",
            ProxyError::OutputLimitRequired(_) => "output_limit_required",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::Unpriced(_) => "unpriced_model",
            ProxyError::Unreadable => "unreadable_body",
        }
    }
}

/// A response made by the proxy itself, in `kind`'s error shape.
pub fn error_response<B>(
    kind: ProviderKind,
    error: &ProxyError,
    request_id: &HeaderValue,
) -> Response<Either<B, Full<Bytes>>> {
    let class = error.class();
    let message = format!("tokenwarden: {error}");
    let mut response = Response::new(Either::Right(Full::new(kind.error_body(
        class,
        error.reason(),
        &message,
    ))));
    *response.status_mut() = class.status();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(REQUEST_ID_HEADER, request_id.clone());
    if let ProxyError::RateLimited { retry_after, .. } = error {
        headers.insert(RETRY_AFTER, HeaderValue::from((*retry_after).clamp(1, 60)));
    }
    if matches!(
        class,
        ErrorClass::BudgetExhausted | ErrorClass::PermissionDenied | ErrorClass::Paused
    ) {
        // Retrying cannot help until a budget resets or an admin acts.
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
    }
    response
}
