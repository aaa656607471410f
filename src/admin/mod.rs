//! The admin listener.
//!
//! Open to anyone who can reach it (loopback by default): `/metrics` (Prometheus text
//! format), `/healthz`, `/readyz`. Behind a bearer token ([`auth`]): `/admin/*`, the
//! agents and their budgets, runs, pauses and config reloads ([`reload`]). Every request
//! to `/admin/*` writes an audit line of kind `admin`: who (the token's name), what (the
//! `reason`), how it went (`outcome`); a refused token writes one too, with the client's
//! address and never the token.
//!
//! Pauses are kept in [`crate::guard::Switches`] and replayed from their admin lines at
//! start; run stops and resumes are written as `run` lines, which
//! [`crate::guard::runs::Runs::restore`] restores (see [`crate::audit::standing`]).

mod agents;
pub mod auth;
mod dashboard;
pub mod overview;
pub mod reload;
mod runs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::json;

use crate::audit::Record;
use crate::guard::SwitchAction;
use crate::proxy::AppState;
use agents::{list_agents, metrics, switch_agent, switch_all};
use auth::AuthError;
use reload::ReloadError;
use runs::{get_run, list_runs, resume_run, stop_run};

/// The admin API takes no request body worth the name; anything larger is refused.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub async fn handle(
    state: &AppState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => metrics(state).await,
        (&Method::GET, "/readyz") if state.is_draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        (&Method::GET, "/readyz") => text(StatusCode::OK, "ready\n"),
        // The page holds no data: it asks for an admin token and reads `/admin/overview`.
        (&Method::GET, "/dashboard") => dashboard::page(),
        _ if path == "/admin" || path.starts_with("/admin/") => admin(state, req, peer).await,
        _ => error_response(&AdminError::NotFound(path.to_owned())),
    }
}

// === errors ===

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}; use {allow}")]
    MethodNotAllowed {
        method: Method,
        path: String,
        allow: &'static str,
    },
    #[error("the request body is over {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("cannot read the request body")]
    BodyRead,
    #[error("{0}")]
    BadRequest(String),
    #[error("unknown agent {0:?}")]
    UnknownAgent(String),
    #[error("no run {run:?}{}", match .agent { Some(a) => format!(" of agent {a:?}"), None => " (to stop a run ahead of time, name its agent with ?agent=ID)".to_owned() })]
    UnknownRun { run: String, agent: Option<String> },
    #[error("run {run:?} belongs to several agents ({agents}); name one with ?agent=ID")]
    AmbiguousRun { run: String, agents: String },
    #[error("cannot read the budgets from Redis: {0}")]
    Store(String),
    #[error(transparent)]
    Reload(#[from] ReloadError),
    #[error(transparent)]
    Outcome(#[from] crate::outcomes::OutcomeError),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Auth(_) => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_)
            | AdminError::UnknownAgent(_)
            | AdminError::UnknownRun { .. } => StatusCode::NOT_FOUND,
            AdminError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::BodyRead | AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::AmbiguousRun { .. } => StatusCode::CONFLICT,
            AdminError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Reload(ReloadError::NoConfigFile) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::Reload(_) => StatusCode::BAD_REQUEST,
            AdminError::Outcome(e) => {
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST)
            }
        }
    }
}

/// `{"error":{"message":…}}`, with the problems of a config a reload refused.
fn error_response(error: &AdminError) -> Response<Full<Bytes>> {
    let mut body = json!({ "error": { "message": error.to_string() } });
    if let AdminError::Reload(e) = error {
        body["error"]["problems"] = json!(e.problems());
    }
    let mut response = json_response(error.status(), &body);
    if let AdminError::MethodNotAllowed { allow, .. } = error {
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    response
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    // Serialising plain data (strings, numbers, maps with string keys) cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
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

// === the audit lines ===

/// Who asked for an admin action, and how.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The admin token's name, or `SIGHUP`.
    pub by: String,
    pub client: Option<SocketAddr>,
    pub method: String,
    /// Without the query string.
    pub path: String,
}

impl Caller {
    /// A reload asked for by the signal.
    pub fn sighup() -> Caller {
        Caller {
            by: crate::config::SIGHUP_NAME.to_owned(),
            client: None,
            method: String::new(),
            path: String::new(),
        }
    }
}

/// What an admin line says beyond its caller.
pub struct Entry<'a> {
    /// The action: `list_agents`, `pause`, `stop_run`, `reload`, …
    pub reason: &'static str,
    /// `ok`, or `failed` with the error in `detail`.
    pub outcome: &'static str,
    pub status: u16,
    pub agent: Option<&'a str>,
    pub run: Option<&'a str>,
    pub detail: String,
}

pub fn audit_line(state: &AppState, caller: &Caller, entry: Entry<'_>) {
    let team = entry.agent.and_then(|id| {
        let live = state.live.load();
        live.config
            .agents
            .iter()
            .find(|a| a.id == id)
            .and_then(|a| a.team.as_deref().map(Arc::from))
    });
    state.audit.append(Record {
        ts: jiff::Timestamp::now(),
        kind: "admin",
        agent: entry.agent.map(Arc::from),
        team,
        run: entry.run.map(Arc::from),
        method: caller.method.clone().into(),
        path: caller.path.as_str().into(),
        status: entry.status,
        outcome: entry.outcome,
        reason: entry.reason.into(),
        client: caller.client,
        detail: Some(entry.detail),
        // A refused attempt has no one to name: never the token it presented.
        by: (!caller.by.is_empty()).then(|| caller.by.clone()),
        ..Record::default()
    });
}

// === routing ===

/// The endpoints behind the token.
#[derive(Debug)]
enum Route {
    Agents,
    Agent(String, SwitchAction),
    Outcome(String),
    Overview,
    Runs,
    Run(String),
    StopRun(String),
    ResumeRun(String),
    All(SwitchAction),
    Reload,
}

impl Route {
    /// Parses the path after `/admin`; run and agent ids are percent-decoded segments
    /// (a run id holding `/` is sent as `%2F`).
    fn parse(path: &str) -> Result<Route, AdminError> {
        let not_found = || AdminError::NotFound(path.to_owned());
        let rest = path.strip_prefix("/admin/").ok_or_else(not_found)?;
        let segments: Vec<&str> = rest.split('/').collect();
        let id = |s: &str| {
            percent_decode(s, false)
                .filter(|id| !id.is_empty())
                .ok_or_else(|| AdminError::BadRequest(format!("bad id in the path: {s:?}")))
        };
        Ok(match segments.as_slice() {
            ["agents"] => Route::Agents,
            ["overview"] => Route::Overview,
            ["agents", agent, "pause"] => Route::Agent(id(agent)?, SwitchAction::Pause),
            ["agents", agent, "resume"] => Route::Agent(id(agent)?, SwitchAction::Resume),
            ["agents", agent, "outcomes"] => Route::Outcome(id(agent)?),
            ["runs"] => Route::Runs,
            ["runs", run] => Route::Run(id(run)?),
            ["runs", run, "stop"] => Route::StopRun(id(run)?),
            ["runs", run, "resume"] => Route::ResumeRun(id(run)?),
            ["pause-all"] => Route::All(SwitchAction::PauseAll),
            ["resume-all"] => Route::All(SwitchAction::ResumeAll),
            ["reload"] => Route::Reload,
            _ => return Err(not_found()),
        })
    }

    /// The one method the endpoint takes.
    fn allow(&self) -> &'static str {
        match self {
            Route::Agents | Route::Overview | Route::Runs | Route::Run(_) => "GET",
            _ => "POST",
        }
    }

    /// The agent and the run the path names, for the audit line of a failure.
    fn ids(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Route::Agent(agent, _) | Route::Outcome(agent) => (Some(agent), None),
            Route::Run(run) | Route::StopRun(run) | Route::ResumeRun(run) => (None, Some(run)),
            _ => (None, None),
        }
    }

    /// The action, as the audit line's `reason` names it.
    fn action(&self) -> &'static str {
        match self {
            Route::Agents => "list_agents",
            Route::Overview => "overview",
            Route::Outcome(_) => "record_outcome",
            Route::Agent(_, action) | Route::All(action) => action.as_str(),
            Route::Runs => "list_runs",
            Route::Run(_) => "get_run",
            Route::StopRun(_) => "stop_run",
            Route::ResumeRun(_) => "resume_run",
            Route::Reload => "reload",
        }
    }
}

/// What an action did: the answer, and what its audit line names.
struct Done {
    body: serde_json::Value,
    agent: Option<String>,
    run: Option<String>,
    detail: String,
}

async fn admin(
    state: &AppState,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let live = state.live.load_full();
    let mut caller = Caller {
        by: String::new(),
        client: Some(peer),
        method: method.as_str().to_owned(),
        path,
    };
    match live.admin_tokens.check(req.headers()) {
        Ok(name) => caller.by = name.to_owned(),
        Err(e) => {
            tracing::warn!(client = %peer, %method, path = caller.path, "admin request refused: {e}");
            let error = AdminError::Auth(e);
            audit_line(
                state,
                &caller,
                Entry {
                    reason: "unauthorized",
                    outcome: "rejected",
                    status: error.status().as_u16(),
                    agent: None,
                    run: None,
                    detail: error.to_string(),
                },
            );
            return error_response(&error);
        }
    }
    let route = match Route::parse(&caller.path) {
        Ok(route) => route,
        Err(error) => return failed(state, &caller, "unknown", (None, None), error),
    };
    let ids = route.ids();
    if method.as_str() != route.allow() {
        let error = AdminError::MethodNotAllowed {
            method,
            path: caller.path.clone(),
            allow: route.allow(),
        };
        return failed(state, &caller, route.action(), ids, error);
    }
    let query = match parse_query(req.uri().query().unwrap_or_default()) {
        Ok(query) => query,
        Err(error) => return failed(state, &caller, route.action(), ids, error),
    };
    let ids = (query.get("agent").map(String::as_str).or(ids.0), ids.1);
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(error) => return failed(state, &caller, route.action(), ids, error),
    };
    let result = match &route {
        // A reload writes its own audit line, as one by SIGHUP does.
        Route::Reload => {
            return match reload::reload(state, &caller).await {
                Ok(reloaded) => json_response(StatusCode::OK, &reloaded),
                Err(e) => error_response(&AdminError::Reload(e)),
            }
        }
        Route::Agents => list_agents(state, &live).await,
        // Polled by the dashboard: audited once per token per period, not per read.
        Route::Overview => {
            let body = overview::overview(state, &live).await;
            if let Some(reads) = state.overview.audit_due(&caller.by) {
                let detail = format!(
                    "{reads} overview reads (at most one line per token every {})",
                    humantime::format_duration(overview::AUDIT_EVERY)
                );
                let entry = Entry {
                    reason: route.action(),
                    outcome: "ok",
                    status: 200,
                    agent: None,
                    run: None,
                    detail,
                };
                audit_line(state, &caller, entry);
            }
            return json_response(StatusCode::OK, &body);
        }
        Route::Agent(agent, action) => switch_agent(state, &live, agent, *action),
        Route::Outcome(agent) => record_outcome(state, &caller, agent, &body),
        Route::All(action) => switch_all(state, &live, *action),
        Route::Runs => list_runs(state, &live, query.get("agent")),
        Route::Run(run) => get_run(state, run, query.get("agent")),
        Route::StopRun(run) => stop_run(state, &live, &caller, run, query.get("agent")),
        Route::ResumeRun(run) => resume_run(state, &live, &caller, run, query.get("agent")),
    };
    match result {
        Ok(done) => {
            audit_line(
                state,
                &caller,
                Entry {
                    reason: route.action(),
                    outcome: "ok",
                    status: 200,
                    agent: done.agent.as_deref(),
                    run: done.run.as_deref(),
                    detail: done.detail,
                },
            );
            json_response(StatusCode::OK, &done.body)
        }
        Err(error) => failed(state, &caller, route.action(), ids, error),
    }
}

/// `POST /admin/agents/{id}/outcomes`: an outcome for any configured agent, with the
/// body of `POST /v1/outcomes`. Its `outcome` line names the admin token in `by`.
fn record_outcome(
    state: &AppState,
    caller: &Caller,
    agent: &str,
    body: &[u8],
) -> Result<Done, AdminError> {
    let origin = crate::outcomes::Origin {
        request_id: None,
        method: caller.method.clone(),
        path: caller.path.clone(),
        client: caller.client,
        by: Some(caller.by.clone()),
    };
    let outcome = crate::outcomes::Outcome::from_json(body)?;
    let recorded = crate::outcomes::record_outcome(state, agent, outcome, origin)?;
    Ok(Done {
        detail: format!(
            "recorded {} x {} for agent {agent}",
            recorded.count, recorded.kind
        ),
        run: recorded.run.clone(),
        body: json!({ "recorded": recorded }),
        agent: Some(agent.to_owned()),
    })
}

/// Audits a refused admin request and answers it.
fn failed(
    state: &AppState,
    caller: &Caller,
    action: &'static str,
    (agent, run): (Option<&str>, Option<&str>),
    error: AdminError,
) -> Response<Full<Bytes>> {
    audit_line(
        state,
        caller,
        Entry {
            reason: action,
            outcome: "failed",
            status: error.status().as_u16(),
            agent,
            run,
            detail: error.to_string(),
        },
    );
    error_response(&error)
}

/// Reads the request body, refusing one over [`MAX_BODY_BYTES`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, AdminError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(AdminError::BodyTooLarge);
    }
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(AdminError::BodyTooLarge),
        Err(_) => Err(AdminError::BodyRead),
    }
}

/// `a=1&b=x%20y`, percent-decoded (`+` is a space); the last of a repeated key wins.
fn parse_query(query: &str) -> Result<HashMap<String, String>, AdminError> {
    let mut out = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_decode(s, true)
                .ok_or_else(|| AdminError::BadRequest(format!("bad query string: {pair:?}")))
        };
        out.insert(decode(key)?, decode(value)?);
    }
    if out.get("agent").is_some_and(String::is_empty) {
        return Err(AdminError::BadRequest("?agent= needs an agent id".into()));
    }
    Ok(out)
}

/// Decodes `%XX` escapes (and `+` as a space in a query); `None` for a broken escape or
/// bytes that are not UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_in_paths_are_percent_decoded_segments() {
        match Route::parse("/admin/runs/a%2Fb%20c/stop").unwrap() {
            Route::StopRun(id) => assert_eq!(id, "a/b c"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Route::parse("/admin/agents/x/pause").unwrap(),
            Route::Agent(id, SwitchAction::Pause) if id == "x"
        ));
        assert!(matches!(
            Route::parse("/admin/runs/a/b"),
            Err(AdminError::NotFound(_))
        ));
        assert!(matches!(
            Route::parse("/admin/runs/%zz"),
            Err(AdminError::BadRequest(_))
        ));
        assert!(matches!(
            Route::parse("/admin"),
            Err(AdminError::NotFound(_))
        ));
    }

    #[test]
    fn queries_are_decoded() {
        let q = parse_query("agent=agent%2Da&x=a+b&flag").unwrap();
        assert_eq!(q["agent"], "agent-a");
        assert_eq!(q["x"], "a b");
        assert_eq!(q["flag"], "");
        assert!(parse_query("agent=").is_err());
        assert!(parse_query("agent=%f").is_err());
    }
}
