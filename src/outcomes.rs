//! Outcomes: work an agent reports done (a ticket resolved, a PR merged), so that reports
//! can show cost per outcome instead of tokens per person.
//!
//! An outcome arrives on the main listener (`POST /v1/outcomes`, served by
//! [`crate::proxy::outcomes`], authenticated by the agent's own virtual key) or through
//! the admin API for any agent (`POST /admin/agents/{id}/outcomes`). Both end in [`record_outcome`]: it checks the
//! agent's bound on distinct kinds, counts the outcome in
//! `tokenwarden_outcomes_total{agent,kind}` and writes an audit line of kind `outcome`.
//! A refused outcome changes nothing: no audit line, no count, no new kind.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit::{Millis, Record};
use crate::proxy::AppState;

/// Longest outcome kind, in characters (it becomes a metric label).
pub const MAX_KIND_LEN: usize = 64;
/// Longest `run` and `ref`, in characters.
pub const MAX_TEXT_LEN: usize = 200;
/// Largest `count` of one call.
pub const MAX_COUNT: u64 = 1_000_000;
/// Largest body of `POST /v1/outcomes`: four short fields need far less.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// One validated outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub kind: String,
    pub count: u64,
    pub run: Option<String>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
}

/// The body as sent. Kind and count are read as plain JSON values so that a wrong type
/// is reported against its field, not as a generic parse error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    kind: Option<Value>,
    #[serde(default)]
    count: Option<Value>,
    #[serde(default)]
    run: Option<String>,
    #[serde(default, rename = "ref")]
    reference: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutcomeError {
    #[error("the body must be a JSON object with kind, and optionally count, run and ref: {0}")]
    Body(String),
    #[error("kind must be a string of 1 to {MAX_KIND_LEN} characters from A-Z a-z 0-9 _ . : -")]
    Kind,
    #[error("count must be an integer from 1 to {MAX_COUNT}")]
    Count,
    #[error("{field} must be at most {MAX_TEXT_LEN} characters")]
    TooLong { field: &'static str },
    #[error("agent {agent} has already reported {max} outcome kinds; {kind:?} would be one more (outcomes.max_kinds_per_agent)")]
    TooManyKinds {
        agent: String,
        kind: String,
        max: usize,
    },
    #[error("no agent {0:?} in the config")]
    UnknownAgent(String),
    #[error("the audit log cannot be written ({0}); outcomes are refused until it can")]
    AuditUnavailable(String),
}

impl OutcomeError {
    /// A short, stable name for the `reason` label of `tokenwarden_rejections_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            OutcomeError::Body(_)
            | OutcomeError::Kind
            | OutcomeError::Count
            | OutcomeError::TooLong { .. } => "invalid_outcome",
            OutcomeError::TooManyKinds { .. } => "outcome_kinds_exceeded",
            OutcomeError::UnknownAgent(_) => "unknown_agent",
            OutcomeError::AuditUnavailable(_) => "audit_unavailable",
        }
    }

    /// The body field at fault, for the `param` of an OpenAI-shaped error.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            OutcomeError::Kind | OutcomeError::TooManyKinds { .. } => Some("kind"),
            OutcomeError::Count => Some("count"),
            OutcomeError::TooLong { field } => Some(field),
            _ => None,
        }
    }

    /// The HTTP status the caller gets.
    pub fn status(&self) -> u16 {
        match self {
            OutcomeError::TooManyKinds { .. } => 422,
            OutcomeError::UnknownAgent(_) => 404,
            OutcomeError::AuditUnavailable(_) => 503,
            _ => 400,
        }
    }
}

impl Outcome {
    /// Validates the fields of an outcome.
    pub fn new(
        kind: String,
        count: u64,
        run: Option<String>,
        reference: Option<String>,
    ) -> Result<Outcome, OutcomeError> {
        if !valid_kind(&kind) {
            return Err(OutcomeError::Kind);
        }
        if !(1..=MAX_COUNT).contains(&count) {
            return Err(OutcomeError::Count);
        }
        for (field, text) in [("run", &run), ("ref", &reference)] {
            if text
                .as_ref()
                .is_some_and(|t| t.chars().count() > MAX_TEXT_LEN)
            {
                return Err(OutcomeError::TooLong { field });
            }
        }
        // An empty run or ref says nothing; it is not written.
        let run = run.filter(|r| !r.is_empty());
        let reference = reference.filter(|r| !r.is_empty());
        Ok(Outcome {
            kind,
            count,
            run,
            reference,
        })
    }

    /// Parses and validates `{"kind": …, "count": …, "run": …, "ref": …}` (count defaults
    /// to 1; unknown fields are refused).
    pub fn from_json(body: &[u8]) -> Result<Outcome, OutcomeError> {
        // serde would also take a struct from an array of its fields in order.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(OutcomeError::Body("not a JSON object".into()));
        }
        let body: Body = serde_json::from_slice(body).map_err(|e| {
            // serde_json's message names the field and the column, never the body.
            OutcomeError::Body(e.to_string())
        })?;
        let kind = match body.kind {
            Some(Value::String(kind)) => kind,
            _ => return Err(OutcomeError::Kind),
        };
        let count = match body.count {
            None => 1,
            Some(value) => value.as_u64().ok_or(OutcomeError::Count)?,
        };
        Outcome::new(kind, count, body.run, body.reference)
    }
}

fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= MAX_KIND_LEN
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The outcome kinds each agent has reported, so that they stay few (they are metric
/// labels and report columns). Rebuilt from the audit log at start.
#[derive(Debug, Default)]
pub struct OutcomeKinds {
    seen: Mutex<HashMap<String, HashSet<String>>>,
}

impl OutcomeKinds {
    /// Admits `kind` for `agent`: a kind it reported before, or a new one while it has
    /// fewer than `max`. The check and the insert are one step, so two concurrent calls
    /// cannot both take the last place.
    pub fn admit(&self, agent: &str, kind: &str, max: usize) -> Result<(), OutcomeError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let kinds = seen.entry(agent.to_owned()).or_default();
        if kinds.contains(kind) {
            return Ok(());
        }
        if kinds.len() >= max {
            return Err(OutcomeError::TooManyKinds {
                agent: agent.to_owned(),
                kind: kind.to_owned(),
                max,
            });
        }
        kinds.insert(kind.to_owned());
        Ok(())
    }

    /// Learns the kinds the audit log holds; returns how many. Kinds past a
    /// since-lowered limit stay known: they were accepted once.
    pub fn restore(&self, standing: &crate::audit::standing::Standing) -> usize {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for (agent, kinds) in &standing.outcome_kinds {
            seen.entry(agent.clone())
                .or_default()
                .extend(kinds.iter().cloned());
        }
        seen.values().map(HashSet::len).sum()
    }
}

/// Where an outcome came from, for its audit line.
#[derive(Debug, Clone)]
pub struct Origin {
    pub request_id: Option<http::HeaderValue>,
    pub method: String,
    pub path: String,
    /// The client's address.
    pub client: Option<std::net::SocketAddr>,
    /// The admin token's name, when an admin recorded it for the agent.
    pub by: Option<String>,
}

/// What was recorded, as the caller is told.
#[derive(Debug, Clone, Serialize)]
pub struct Recorded {
    pub ts: String,
    pub agent: String,
    pub team: Option<String>,
    pub kind: String,
    pub count: u64,
    pub run: Option<String>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
}

/// Records an outcome of the agent `agent_id`: the bound on its kinds, the metric and an
/// audit line of kind `outcome`. The main listener calls it for the agent its key names;
/// the admin API may call it for any agent of the config.
pub fn record_outcome(
    state: &AppState,
    agent_id: &str,
    outcome: Outcome,
    origin: Origin,
) -> Result<Recorded, OutcomeError> {
    let live = state.live.load();
    let agent = live
        .config
        .agents
        .iter()
        .find(|a| a.id == agent_id)
        .ok_or_else(|| OutcomeError::UnknownAgent(agent_id.to_owned()))?;
    if live.config.audit.fail_closed {
        state
            .audit
            .accepting()
            .map_err(OutcomeError::AuditUnavailable)?;
    }
    state.outcome_kinds.admit(
        &agent.id,
        &outcome.kind,
        live.config.outcomes.max_kinds_per_agent,
    )?;
    state
        .metrics
        .outcomes
        .with_label_values(&[&agent.id, &outcome.kind])
        .inc_by(outcome.count);
    let now = jiff::Timestamp::now();
    state.audit.append(Record {
        ts: now,
        kind: "outcome",
        request_id: origin.request_id,
        agent: Some(Arc::from(agent.id.as_str())),
        team: agent.team.as_deref().map(Arc::from),
        run: outcome.run.as_deref().map(Arc::from),
        method: origin.method.into(),
        path: origin.path.into(),
        status: 201,
        outcome: "recorded",
        client: origin.client,
        outcome_kind: Some(outcome.kind.clone()),
        count: Some(outcome.count),
        reference: outcome.reference.clone(),
        by: origin.by,
        ..Record::default()
    });
    Ok(Recorded {
        ts: Millis::of(now).as_str().to_owned(),
        agent: agent.id.clone(),
        team: agent.team.clone(),
        kind: outcome.kind,
        count: outcome.count,
        run: outcome.run,
        reference: outcome.reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_body_and_a_minimal_one_parse() {
        let o = Outcome::from_json(
            br#"{"kind":"ticket_resolved","count":3,"run":"r1","ref":"JIRA-123"}"#,
        )
        .unwrap();
        assert_eq!(o.kind, "ticket_resolved");
        assert_eq!(o.count, 3);
        assert_eq!(o.run.as_deref(), Some("r1"));
        assert_eq!(o.reference.as_deref(), Some("JIRA-123"));
        let o = Outcome::from_json(br#"{"kind":"pr.merged:v2-x"}"#).unwrap();
        assert_eq!((o.count, o.run, o.reference), (1, None, None));
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        let long = "x".repeat(MAX_TEXT_LEN + 1);
        let cases: Vec<(String, OutcomeError)> = vec![
            ("not json".into(), OutcomeError::Body(String::new())),
            ("[1]".into(), OutcomeError::Body(String::new())),
            (
                r#"{"kind":"a","extra":1}"#.into(),
                OutcomeError::Body(String::new()),
            ),
            (r#"{"count":1}"#.into(), OutcomeError::Kind),
            (r#"{"kind":""}"#.into(), OutcomeError::Kind),
            (r#"{"kind":"has space"}"#.into(), OutcomeError::Kind),
            (r#"{"kind":"é"}"#.into(), OutcomeError::Kind),
            (r#"{"kind":7}"#.into(), OutcomeError::Kind),
            (
                format!(r#"{{"kind":"{}"}}"#, "k".repeat(MAX_KIND_LEN + 1)),
                OutcomeError::Kind,
            ),
            (r#"{"kind":"a","count":0}"#.into(), OutcomeError::Count),
            (r#"{"kind":"a","count":-1}"#.into(), OutcomeError::Count),
            (r#"{"kind":"a","count":1.5}"#.into(), OutcomeError::Count),
            (r#"{"kind":"a","count":"1"}"#.into(), OutcomeError::Count),
            (
                r#"{"kind":"a","count":1000001}"#.into(),
                OutcomeError::Count,
            ),
            (
                format!(r#"{{"kind":"a","ref":"{long}"}}"#),
                OutcomeError::TooLong { field: "ref" },
            ),
            (
                format!(r#"{{"kind":"a","run":"{long}"}}"#),
                OutcomeError::TooLong { field: "run" },
            ),
        ];
        for (body, want) in cases {
            let got = Outcome::from_json(body.as_bytes()).unwrap_err();
            match want {
                OutcomeError::Body(_) => assert!(matches!(got, OutcomeError::Body(_)), "{body}"),
                want => assert_eq!(got, want, "{body}"),
            }
            assert_eq!(got.status(), 400);
        }
        assert!(
            Outcome::from_json(&format!(r#"{{"kind":"{}"}}"#, "k".repeat(64)).into_bytes()).is_ok()
        );
        assert!(Outcome::from_json(br#"{"kind":"a","count":1000000}"#).is_ok());
    }

    #[test]
    fn kinds_are_bounded_per_agent() {
        let kinds = OutcomeKinds::default();
        assert!(kinds.admit("a", "k1", 2).is_ok());
        assert!(kinds.admit("a", "k2", 2).is_ok());
        assert!(
            kinds.admit("a", "k1", 2).is_ok(),
            "a known kind is always fine"
        );
        let err = kinds.admit("a", "k3", 2).unwrap_err();
        assert_eq!(err.status(), 422);
        assert_eq!(err.reason(), "outcome_kinds_exceeded");
        assert!(kinds.admit("b", "k3", 2).is_ok(), "per agent");
    }
}
