//! The OpenAI wire format (also vLLM, Ollama and other compatible servers).

use bytes::Bytes;
use serde_json::json;

use super::ErrorClass;

/// `{"error":{"message","type","param","code"}}`, as the OpenAI API answers.
pub fn error_body(class: ErrorClass, reason: &str, message: &str) -> Bytes {
    let (kind, code) = match class {
        ErrorClass::InvalidRequest => ("invalid_request_error", "invalid_request"),
        ErrorClass::Authentication => ("invalid_request_error", "invalid_api_key"),
        ErrorClass::NotFound => ("invalid_request_error", "unknown_url"),
        ErrorClass::RequestTooLarge => ("invalid_request_error", "request_too_large"),
        ErrorClass::Unavailable => ("server_error", "service_unavailable"),
        ErrorClass::UpstreamUnreachable => ("server_error", "upstream_unreachable"),
        ErrorClass::UpstreamTimeout => ("server_error", "upstream_timeout"),
        ErrorClass::RequestTimeout => ("invalid_request_error", "request_timeout"),
        ErrorClass::BudgetExhausted => ("insufficient_quota", "budget_exceeded"),
        // Several refusals share the status: the code says which.
        ErrorClass::PermissionDenied => ("invalid_request_error", reason),
        ErrorClass::Paused => ("invalid_request_error", "agent_paused"),
        ErrorClass::RateLimited => ("rate_limit_exceeded", "rate_limit_exceeded"),
    };
    let body = json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    Bytes::from(body.to_string())
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The body with `stream_options.include_usage = true`. Without `stream_options` the
/// field is spliced in before the closing brace, leaving every other byte as sent;
/// otherwise the document is rewritten. `None` if the body is not a JSON object.
pub fn inject_include_usage(body: &[u8], has_stream_options: bool) -> Option<Bytes> {
    if !has_stream_options {
        let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
        if body[end] != b'}' {
            return None;
        }
        let empty = body[..end]
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .is_some_and(|i| body[i] == b'{');
        let mut out = Vec::with_capacity(body.len() + 40);
        out.extend_from_slice(&body[..end]);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
        out.extend_from_slice(&body[end..]);
        return Some(Bytes::from(out));
    }
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let options = value.as_object_mut()?.get_mut("stream_options")?;
    if !options.is_object() {
        *options = json!({});
    }
    options
        .as_object_mut()?
        .insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// What the client would have received without the injected option, for one complete
/// raw SSE event: the usage-only chunk goes entirely (`None`), and the `"usage":null`
/// field the option adds to every other chunk is cut out.
pub fn strip_injected_usage(event: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    use memchr::memmem::Finder;
    use std::borrow::Cow;
    use std::sync::LazyLock;
    // Searchers are built once: building one per event would cost more than the search.
    static USAGE_NULL: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(br#","usage":null"#));
    static NO_CHOICES: LazyLock<Finder<'static>> =
        LazyLock::new(|| Finder::new(br#""choices":[]"#));
    static USAGE_OBJECT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""usage":{"#));
    let finder = &*USAGE_NULL;
    let first = finder.find(event);
    if first.is_none() && NO_CHOICES.find(event).is_some() && USAGE_OBJECT.find(event).is_some() {
        return None;
    }
    if first.is_none() {
        return Some(Cow::Borrowed(event));
    }
    let mut out = Vec::with_capacity(event.len());
    let mut rest = event;
    while let Some(i) = finder.find(rest) {
        out.extend_from_slice(&rest[..i]);
        rest = &rest[i + finder.needle().len()..];
    }
    out.extend_from_slice(rest);
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_usage_is_spliced_in_without_touching_other_bytes() {
        let body = b"{ \"model\" : \"gpt-4o\",\n \"stream\": true }\n";
        let out = inject_include_usage(body, false).unwrap();
        assert_eq!(
            &out[..],
            &b"{ \"model\" : \"gpt-4o\",\n \"stream\": true ,\"stream_options\":{\"include_usage\":true}}\n"[..]
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(
            &inject_include_usage(b"{}", false).unwrap()[..],
            br#"{"stream_options":{"include_usage":true}}"#
        );
        assert!(inject_include_usage(b"[1]", false).is_none());
    }

    #[test]
    fn existing_stream_options_are_kept_and_completed() {
        let body = br#"{"stream":true,"stream_options":{"include_usage":false,"other":1}}"#;
        let v: serde_json::Value =
            serde_json::from_slice(&inject_include_usage(body, true).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["other"], 1);
    }

    #[test]
    fn which_requests_get_the_option() {
        let f = |b: &str| {
            serde_json::from_str::<crate::providers::RequestFields<'_>>(b)
                .unwrap()
                .wants_usage_injected()
        };
        assert!(f(r#"{"stream":true}"#));
        assert!(f(
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#
        ));
        assert!(!f(
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        ));
        assert!(!f(r#"{"stream":false}"#));
        assert!(!f(r#"{}"#));
    }

    #[test]
    fn stripping_restores_the_stream_without_the_option() {
        let chunk = b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        assert_eq!(
            &strip_injected_usage(chunk).unwrap()[..],
            &b"data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n"[..]
        );
        let usage = b"data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n";
        assert!(strip_injected_usage(usage).is_none());
        let done = b"data: [DONE]\n\n";
        assert_eq!(&strip_injected_usage(done).unwrap()[..], &done[..]);
    }

    #[test]
    fn error_shape_matches_the_api() {
        let v: serde_json::Value = serde_json::from_slice(&error_body(
            ErrorClass::Authentication,
            "unauthorized",
            "bad key",
        ))
        .unwrap();
        assert_eq!(v["error"]["message"], "bad key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
    }
}
