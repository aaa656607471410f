//! Header handling between client, proxy and provider (RFC 9110 §7.6.1).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message, and so never cross the proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including any the `Connection` header names. `Upgrade`
/// goes too: the proxy does not tunnel protocol switches.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares a client's request headers for the provider: hop-by-hop headers and the
/// client's own credential and `Host` go; the provider's credential comes in.
/// Everything else (`x-stainless-*`, `openai-organization`, `anthropic-version`,
/// `anthropic-beta`, custom headers) passes as sent.
pub fn to_upstream(headers: &mut HeaderMap, credential: Option<(&HeaderName, &HeaderValue)>) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(crate::identity::X_API_KEY);
    if let Some((name, value)) = credential {
        headers.insert(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.insert("retry-after", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["retry-after", "x-request-id"]);
    }

    #[test]
    fn client_credential_is_swapped_for_the_providers() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer tw-virtual"),
        );
        h.insert("x-api-key", HeaderValue::from_static("tw-virtual"));
        h.insert("host", HeaderValue::from_static("proxy:8080"));
        h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        h.insert("x-stainless-lang", HeaderValue::from_static("python"));
        let name = HeaderName::from_static("x-api-key");
        let value = HeaderValue::from_static("sk-ant-real");
        to_upstream(&mut h, Some((&name, &value)));
        assert_eq!(h.get("x-api-key").unwrap(), "sk-ant-real");
        assert!(h.get("authorization").is_none());
        assert!(h.get("host").is_none());
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(h.get("x-stainless-lang").unwrap(), "python");
    }
}
