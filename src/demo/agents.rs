//! The demo's two simulated agents. They know nothing of the proxy's insides: like any
//! agent pointed at it, they send HTTP requests with their virtual key to the
//! OpenAI-compatible paths and read the answers (and the proxy's refusals) they get.

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// The run header (`runs.headers` default).
pub const RUN_HEADER: &str = "x-tokenwarden-run";
/// The model both agents ask for (priced by the built-in table).
pub const MODEL: &str = "gpt-4o";
/// Longest wait for one answer: the mock answers at once, so this only ends a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A plain HTTP client, as an agent's SDK would hold.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

/// One answer, read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl Http {
    pub fn new() -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body))
            .with_context(|| format!("cannot build a request to {url}"))?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("no answer from {url} within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("request to {url} failed"))
    }

    /// POSTs JSON with an agent's virtual key, in a run when `run` is set.
    pub async fn post(
        &self,
        url: &str,
        key: &str,
        run: Option<&str>,
        extra: &[(&str, &str)],
        body: &Value,
    ) -> anyhow::Result<Answer> {
        let auth = format!("Bearer {key}");
        let mut headers = vec![
            (AUTHORIZATION.as_str(), auth.as_str()),
            (CONTENT_TYPE.as_str(), "application/json"),
        ];
        if let Some(run) = run {
            headers.push((RUN_HEADER, run));
        }
        headers.extend_from_slice(extra);
        self.send(Method::POST, url, &headers, Bytes::from(body.to_string()))
            .await
    }
}

/// Tokens an answer reports (`usage.total_tokens`), 0 without.
pub fn total_tokens(usage: &Value) -> u64 {
    usage["total_tokens"].as_u64().unwrap_or(0)
}

/// What a streamed chat completion delivered: its content pieces and its usage chunk.
pub fn read_stream(body: &[u8]) -> (usize, Value) {
    let mut pieces = 0;
    let mut usage = Value::Null;
    for line in body.split(|&b| b == b'\n') {
        let Some(data) = line.strip_prefix(b"data: ") else {
            continue;
        };
        let Ok(event) = serde_json::from_slice::<Value>(data) else {
            continue; // `[DONE]`
        };
        if event["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            pieces += 1;
        }
        if event["usage"].is_object() {
            usage = event["usage"].clone();
        }
    }
    (pieces, usage)
}

/// The error an SDK would raise from a refusal: `(code, message)` of the OpenAI shape.
pub fn error_of(answer: &Answer) -> (String, String) {
    let body = answer.json();
    let field = |name: &str| body["error"][name].as_str().unwrap_or("?").to_owned();
    (field("code"), field("message"))
}

// === support-bot ===

/// One ticket support-bot works on.
pub struct Ticket {
    pub reference: &'static str,
    pub text: &'static str,
}

pub const TICKETS: [Ticket; 3] = [
    Ticket {
        reference: "JIRA-101",
        text: "I was charged twice for my March invoice. Please refund one of the charges.",
    },
    Ticket {
        reference: "JIRA-102",
        text: "How do I add a second admin to our workspace? The settings page has no button.",
    },
    Ticket {
        reference: "JIRA-103",
        text: "Password reset emails never arrive at our company domain since Monday.",
    },
];

/// The first call of a ticket: sort it (a short answer, not streamed).
pub fn classify_request(ticket: &Ticket) -> Value {
    json!({
        "model": MODEL,
        "max_tokens": 16,
        "messages": [
            {"role": "system", "content": "Classify the support ticket: billing, account, \
                delivery or other. Answer with one word."},
            {"role": "user", "content": ticket.text}
        ]
    })
}

/// The second call: draft the reply to the customer, streamed as a chat UI would.
pub fn reply_request(ticket: &Ticket) -> Value {
    json!({
        "model": MODEL,
        "max_tokens": 300,
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [
            {"role": "system", "content": "You are the support agent of a SaaS company. \
                Write a short, friendly reply that solves the customer's problem."},
            {"role": "user", "content": ticket.text}
        ]
    })
}

// === runaway-loop ===

/// The task the runaway loop never finishes.
pub const RUNAWAY_TASK: &str = "The nightly build of payments-service fails. Make it pass.";

/// The conversation the loop starts from.
pub fn runaway_start() -> Vec<Value> {
    vec![
        json!({"role": "system", "content": "You are a build agent with the tools read_file, \
            edit_file and run_tests. Find why the build fails and fix it. Run the tests \
            after every change and show their output."}),
        json!({"role": "user", "content": RUNAWAY_TASK}),
    ]
}

/// The message the loop appends after step `step`: the same failing test log, again.
pub fn test_log(step: usize) -> Value {
    let mut log = format!(
        "run_tests (attempt {step}): 1 failed, 212 passed in 41.8s\n\
         FAILED tests/test_retry.py::test_payment_retry_backoff\n"
    );
    for frame in [
        "tests/test_retry.py:88: in test_payment_retry_backoff",
        "    result = client.charge(order, retry=RetryPolicy(attempts=3, backoff=0.2))",
        "payments/client.py:214: in charge",
        "    return self._with_retry(lambda: self._post('/charges', body), policy)",
        "payments/client.py:131: in _with_retry",
        "    if policy.should_retry(error) and attempt < policy.attempts:",
        "payments/retry.py:52: in should_retry",
        "    return error.status in self.retry_on and not error.permanent",
        "E   AssertionError: expected 3 attempts, got 1",
        "E   +  where 1 = len(recorded_calls)",
    ] {
        log.push_str(frame);
        log.push('\n');
    }
    log.push_str(
        "Captured log: WARNING payments.retry: status 503 is not in retry_on (429, 500, 502); \
         giving up after 1 attempt. The test expects 503 to be retried with backoff.",
    );
    json!({"role": "user", "content": log})
}

/// One call of the loop: the whole conversation so far.
pub fn runaway_request(messages: &[Value]) -> Value {
    json!({"model": MODEL, "max_tokens": 40, "messages": messages})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_read_for_its_pieces_and_usage() {
        let body = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"Hi \"}}]}\n\n\
            data: {\"choices\":[{\"delta\":{\"content\":\"there\"}}]}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n\
            data: [DONE]\n\n";
        let (pieces, usage) = read_stream(body);
        assert_eq!(pieces, 2);
        assert_eq!(total_tokens(&usage), 9);
    }

    #[test]
    fn the_loop_resends_everything_and_grows_by_one_message() {
        let mut messages = runaway_start();
        let first = runaway_request(&messages).to_string();
        messages.push(test_log(1));
        let second = runaway_request(&messages).to_string();
        assert!(
            second.len() > first.len() + 500,
            "each step adds a test log"
        );
        assert_eq!(
            runaway_request(&messages).to_string(),
            second,
            "a retry is identical"
        );
    }
}
