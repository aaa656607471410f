//! The OpenAI wire format (also vLLM, Ollama and other compatible servers).

use bytes::Bytes;
use serde_json::json;

use super::ErrorClass;

/// `{"error":{"message","type","param","code"}}`, as the OpenAI API answers.
pub fn error_body(class: ErrorClass, message: &str) -> Bytes {
    let (kind, code) = match class {
        ErrorClass::InvalidRequest => ("invalid_request_error", "invalid_request"),
        ErrorClass::Authentication => ("invalid_request_error", "invalid_api_key"),
        ErrorClass::NotFound => ("invalid_request_error", "unknown_url"),
        ErrorClass::RequestTooLarge => ("invalid_request_error", "request_too_large"),
        ErrorClass::Unavailable => ("server_error", "service_unavailable"),
        ErrorClass::UpstreamUnreachable => ("server_error", "upstream_unreachable"),
        ErrorClass::UpstreamTimeout => ("server_error", "upstream_timeout"),
    };
    let body = json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shape_matches_the_api() {
        let v: serde_json::Value =
            serde_json::from_slice(&error_body(ErrorClass::Authentication, "bad key")).unwrap();
        assert_eq!(v["error"]["message"], "bad key");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
    }
}
