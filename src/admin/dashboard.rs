//! `GET /dashboard`: one self-contained page (inline style and script, nothing fetched
//! from elsewhere) that asks for an admin token, polls `/admin/overview` and draws it,
//! with the pause, resume and stop buttons of the admin API.
//!
//! The page holds no data, so it is served to anyone who can reach the admin listener;
//! every figure it shows comes through the token. Its Content-Security-Policy allows
//! exactly its own inline script and style (by hash) and requests to this origin.

use std::sync::LazyLock;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use http::Response;
use http_body_util::Full;
use sha2::{Digest, Sha256};

const HTML: &str = include_str!("dashboard/page.html");
const CSS: &str = include_str!("dashboard/page.css");
const JS: &str = include_str!("dashboard/page.js");

struct Page {
    html: Bytes,
    csp: HeaderValue,
}

static PAGE: LazyLock<Page> = LazyLock::new(|| {
    let hash = |text: &str| {
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
    };
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
         connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'",
        hash(JS),
        hash(CSS)
    );
    Page {
        html: Bytes::from(HTML.replace("{{CSS}}", CSS).replace("{{JS}}", JS)),
        // Base64 and ASCII text: always a valid header value.
        csp: HeaderValue::from_str(&csp)
            .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'")),
    }
});

pub(super) fn page() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(PAGE.html.clone()));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CONTENT_SECURITY_POLICY, PAGE.csp.clone());
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_whole_and_its_policy_names_its_own_script_and_style() {
        let html = std::str::from_utf8(&PAGE.html).unwrap();
        assert!(!html.contains("{{"), "every placeholder filled");
        assert!(html.contains(JS) && html.contains(CSS));
        // Nothing from elsewhere.
        for outside in ["http://", "https://", "src=", "href="] {
            let hits: Vec<_> = html.match_indices(outside).collect();
            // The SVG namespace is a name, not a fetch.
            assert!(
                hits.iter()
                    .all(|(i, _)| html[*i..].starts_with("http://www.w3.org/2000/svg")),
                "{outside} in the page"
            );
        }
        let csp = PAGE.csp.to_str().unwrap();
        let js_hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(JS));
        assert!(
            csp.contains(&format!("script-src 'sha256-{js_hash}'")),
            "{csp}"
        );
        assert!(csp.starts_with("default-src 'none'"));
    }
}
