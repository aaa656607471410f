//! The Anthropic Messages wire format.

use bytes::Bytes;
use serde_json::json;

use super::ErrorClass;

/// `{"type":"error","error":{"type","message"}}`, as the Anthropic API answers.
pub fn error_body(class: ErrorClass, message: &str) -> Bytes {
    let kind = match class {
        ErrorClass::InvalidRequest => "invalid_request_error",
        ErrorClass::Authentication => "authentication_error",
        ErrorClass::NotFound => "not_found_error",
        ErrorClass::RequestTooLarge => "request_too_large",
        ErrorClass::Unavailable => "overloaded_error",
        ErrorClass::UpstreamUnreachable => "api_error",
        ErrorClass::UpstreamTimeout => "timeout_error",
        ErrorClass::RequestTimeout => "invalid_request_error",
        ErrorClass::BudgetExhausted => "billing_error",
        ErrorClass::PermissionDenied | ErrorClass::Paused => "permission_error",
        ErrorClass::RateLimited => "rate_limit_error",
    };
    let body = json!({ "type": "error", "error": { "type": kind, "message": message } });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shape_matches_the_api() {
        let v: serde_json::Value =
            serde_json::from_slice(&error_body(ErrorClass::RequestTooLarge, "too big")).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "request_too_large");
        assert_eq!(v["error"]["message"], "too big");
    }
}
