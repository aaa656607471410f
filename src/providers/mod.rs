//! Providers: where a path prefix leads, which credential header the provider expects,
//! and how its errors look. One file per wire format.

pub mod anthropic;
mod fields;
pub mod openai;

pub(crate) use fields::JsonKey;
pub use fields::{read_fields, TopKeys};

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{StatusCode, Uri};

use crate::config::{ProviderConfig, ProviderKindConfig};
use crate::identity::X_API_KEY;
use crate::metering::Endpoint;
use crate::secret::Secret;

/// The wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
}

/// What went wrong, in words both providers' SDKs map to an exception class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    InvalidRequest,
    Authentication,
    NotFound,
    RequestTooLarge,
    Unavailable,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// The client stopped sending its request body (408).
    RequestTimeout,
    /// A budget is spent (402; SDKs must not retry).
    BudgetExhausted,
    /// Policy forbids it: a model not on the allow-list, a stopped run (403).
    PermissionDenied,
    /// An admin paused the agent, or every agent (403; SDKs must not retry).
    Paused,
    /// Too many requests or tokens this minute, or too many at once (429).
    RateLimited,
}

impl ErrorClass {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorClass::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorClass::Authentication => StatusCode::UNAUTHORIZED,
            ErrorClass::NotFound => StatusCode::NOT_FOUND,
            ErrorClass::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorClass::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorClass::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorClass::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorClass::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorClass::BudgetExhausted => StatusCode::PAYMENT_REQUIRED,
            ErrorClass::PermissionDenied | ErrorClass::Paused => StatusCode::FORBIDDEN,
            ErrorClass::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl ProviderKind {
    /// An error body in this provider's own shape, so SDKs raise their usual exceptions.
    /// The provider's error body for `class`. `reason` names a refusal more precisely
    /// where the format has room for it (OpenAI's `code` of a 403).
    pub fn error_body(self, class: ErrorClass, reason: &str, message: &str) -> Bytes {
        match self {
            ProviderKind::OpenAi => openai::error_body(class, reason, message),
            ProviderKind::Anthropic => anthropic::error_body(class, message),
        }
    }
}

impl From<ProviderKindConfig> for ProviderKind {
    fn from(kind: ProviderKindConfig) -> Self {
        match kind {
            ProviderKindConfig::Openai => ProviderKind::OpenAi,
            ProviderKindConfig::Anthropic => ProviderKind::Anthropic,
        }
    }
}

/// A string borrowed from the body where it has no escapes: serde copies a `Cow` that
/// sits in an `Option`.
pub(super) fn borrowed_str<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::borrow::Cow<'de, str>>, D::Error> {
    use std::borrow::Cow;
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or null")
        }

        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }

        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    deserializer.deserialize_option(Text)
}

/// The few request fields the proxy reads, in either wire format, without building the
/// whole document.
#[derive(Debug, Default, serde::Deserialize)]
pub struct RequestFields<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed_str")]
    pub model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<openai::StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// Choices per request (chat, legacy completions): each may use the output limit.
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub best_of: Option<u64>,
    /// The body's top-level keys, when [`read_fields`] read them on the way.
    #[serde(skip)]
    pub keys: Option<TopKeys>,
}

impl RequestFields<'_> {
    /// A streamed request that did not ask for usage: the proxy should ask for it.
    pub fn wants_usage_injected(&self) -> bool {
        self.stream == Some(true)
            && self.stream_options.as_ref().and_then(|o| o.include_usage) != Some(true)
    }

    /// How many completions the request asks for; each may use the whole output limit.
    pub fn choices(&self) -> u64 {
        self.n.unwrap_or(1).max(self.best_of.unwrap_or(1)).max(1)
    }

    /// The output limit the request sets for `endpoint`, and the field that carries it
    /// (the field to write when the request sets none).
    pub fn output_limit(&self, endpoint: Endpoint) -> (Option<u64>, &'static str) {
        match endpoint {
            Endpoint::ChatCompletions => match (self.max_completion_tokens, self.max_tokens) {
                (Some(n), _) => (Some(n), "max_completion_tokens"),
                (None, Some(n)) => (Some(n), "max_tokens"),
                (None, None) => (None, "max_completion_tokens"),
            },
            // The legacy API's own default when the field is absent.
            Endpoint::Completions => (Some(self.max_tokens.unwrap_or(16)), "max_tokens"),
            Endpoint::Responses => (self.max_output_tokens, "max_output_tokens"),
            Endpoint::Messages => (self.max_tokens, "max_tokens"),
            Endpoint::Embeddings | Endpoint::Other => (Some(0), "max_tokens"),
        }
    }
}

/// The body with top-level `field` set to `value`, its keys read by [`ObjectKeys::read`]
/// with the same `field`. An absent field is spliced in before the closing brace,
/// leaving every other byte as sent; a present one means rewriting the document.
pub fn set_json_field_in(
    body: &[u8],
    field: &str,
    value: serde_json::Value,
    keys: ObjectKeys,
) -> Option<Bytes> {
    if keys.has_field {
        let mut value_map: serde_json::Value = serde_json::from_slice(body).ok()?;
        let object = value_map.as_object_mut()?;
        object.insert(field.to_owned(), value);
        return serde_json::to_vec(&value_map).ok().map(Bytes::from);
    }
    let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
    let mut out = Vec::with_capacity(body.len() + field.len() + 32);
    out.extend_from_slice(&body[..end]);
    if !keys.empty {
        out.push(b',');
    }
    out.extend_from_slice(serde_json::to_string(field).ok()?.as_bytes());
    out.push(b':');
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(&body[end..]);
    Some(Bytes::from(out))
}

/// What setting a top-level field needs to know of a body: whether it is empty and
/// whether it has the field already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectKeys {
    has_field: bool,
    empty: bool,
}

impl ObjectKeys {
    /// Whether the object has the field already.
    pub fn has_field(&self) -> bool {
        self.has_field
    }

    /// The keys of a JSON object; `None` for anything that is not one, or that a parse
    /// into `Value` would refuse. The usual case, an absent field, needs only the
    /// top-level keys: they are read without building the document (a tree of every
    /// message would cost more than the splice).
    pub fn read(body: &[u8], field: &str) -> Option<ObjectKeys> {
        let keys = TopLevelKeys::read(body, field)?;
        Some(ObjectKeys {
            has_field: keys.has_field,
            empty: keys.empty,
        })
    }
}

// === reading a JSON object's top-level keys ===

/// What [`set_json_field_in`] needs of a body: whether it is empty and whether it has the
/// field. Every value is checked as a parse into `Value` checks it (serde_json's own
/// string, number and nesting checks, through `deserialize_any`), but nothing is built.
#[derive(Clone, Copy)]
struct TopLevelKeys<'f> {
    field: &'f str,
    has_field: bool,
    empty: bool,
}

impl<'f> TopLevelKeys<'f> {
    /// The keys of a JSON object; `None` for anything that is not one.
    fn read(body: &[u8], field: &'f str) -> Option<Self> {
        use serde::de::DeserializeSeed;
        let mut de = serde_json::Deserializer::from_slice(body);
        let keys = TopLevelKeys {
            field,
            has_field: false,
            empty: true,
        }
        .deserialize(&mut de)
        .ok()?;
        de.end().ok()?;
        Some(keys)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for TopLevelKeys<'_> {
    type Value = Self;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Self, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TopLevelKeys<'_> {
    type Value = Self;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<Self, A::Error> {
        while let Some(is_field) = map.next_key_seed(IsKey(self.field))? {
            self.empty = false;
            self.has_field |= is_field;
            map.next_value::<Valid>()?;
        }
        Ok(self)
    }
}

/// Whether a key is the one named, read without copying it.
struct IsKey<'f>(&'f str);

impl<'de> serde::de::DeserializeSeed<'de> for IsKey<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<bool, D::Error> {
        de.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for IsKey<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

/// Any JSON value, checked as a parse into `Value` checks it, and dropped.
pub(crate) struct Valid;

impl<'de> serde::Deserialize<'de> for Valid {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_any(Valid)
    }
}

impl<'de> serde::de::Visitor<'de> for Valid {
    type Value = Valid;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_str<E>(self, _: &str) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_unit<E>(self) -> Result<Valid, E> {
        Ok(Valid)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Valid, A::Error> {
        while seq.next_element::<Valid>()?.is_some() {}
        Ok(Valid)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Valid, A::Error> {
        while map.next_key::<Valid>()?.is_some() {
            map.next_value::<Valid>()?;
        }
        Ok(Valid)
    }
}

/// A configured upstream, ready to build request URIs and credentials.
#[derive(Debug)]
pub struct Provider {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    pub prefix: String,
    /// Ask for usage on streams that did not (OpenAI format only).
    pub inject_usage: bool,
    scheme: Scheme,
    authority: Authority,
    /// Path of `base_url` without a trailing slash; empty for a bare host.
    base_path: String,
    credential: Credential,
}

#[derive(Debug)]
enum Credential {
    /// The provider takes no key.
    None,
    /// The header to set, value marked sensitive so hyper never logs it.
    Header(HeaderName, Secret<HeaderValue>),
    /// `api_key_env` names a variable that is not set; requests are refused with a
    /// clear message rather than sent without a key.
    Missing(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("providers.{name}.base_url: {reason}")]
    BaseUrl { name: String, reason: String },
    #[error("providers.{name}.api_key_env: the key in {env} is not a valid header value")]
    BadKey { name: String, env: String },
}

impl Provider {
    /// Builds a provider from validated config, reading its key through `lookup_env`.
    pub fn from_config(
        cfg: &ProviderConfig,
        lookup_env: impl Fn(&str) -> Option<String>,
    ) -> Result<Provider, ProviderError> {
        let base_err = |reason: &str| ProviderError::BaseUrl {
            name: cfg.name.clone(),
            reason: reason.into(),
        };
        let uri: Uri = cfg.base_url.parse().map_err(|_| base_err("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| base_err("no scheme"))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| base_err("no host"))?;
        let base_path = uri.path().trim_end_matches('/').to_string();
        let kind = ProviderKind::from(cfg.kind);

        let credential = match &cfg.api_key_env {
            None => Credential::None,
            Some(env) => match lookup_env(env).filter(|k| !k.is_empty()) {
                None => Credential::Missing(env.clone()),
                Some(key) => {
                    let (name, value) = match kind {
                        ProviderKind::OpenAi => (AUTHORIZATION, format!("Bearer {key}")),
                        ProviderKind::Anthropic => (X_API_KEY, key.clone()),
                    };
                    let mut value =
                        HeaderValue::from_str(&value).map_err(|_| ProviderError::BadKey {
                            name: cfg.name.clone(),
                            env: env.clone(),
                        })?;
                    value.set_sensitive(true);
                    Credential::Header(name, Secret::new(value))
                }
            },
        };

        Ok(Provider {
            name: Arc::from(cfg.name.as_str()),
            kind,
            prefix: cfg.prefix.clone(),
            inject_usage: cfg.inject_usage && kind == ProviderKind::OpenAi,
            scheme,
            authority,
            base_path,
            credential,
        })
    }

    /// The upstream URI for the part of the path after the prefix, with the query kept.
    pub fn upstream_uri(&self, rest: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut path = String::with_capacity(
            self.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1,
        );
        path.push_str(&self.base_path);
        if !rest.starts_with('/') {
            path.push('/');
        }
        path.push_str(rest);
        if let Some(q) = query {
            path.push('?');
            path.push_str(q);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(path)?)
            .build()
    }

    /// Which metered API a path (after the prefix) belongs to.
    pub fn endpoint(&self, rest: &str) -> Endpoint {
        let path = rest.trim_end_matches('/');
        match self.kind {
            ProviderKind::OpenAi if path.ends_with("/chat/completions") => {
                Endpoint::ChatCompletions
            }
            ProviderKind::OpenAi if path.ends_with("/completions") => Endpoint::Completions,
            ProviderKind::OpenAi if path.ends_with("/responses") => Endpoint::Responses,
            ProviderKind::OpenAi if path.ends_with("/embeddings") => Endpoint::Embeddings,
            ProviderKind::Anthropic if path.ends_with("/messages") => Endpoint::Messages,
            _ => Endpoint::Other,
        }
    }

    /// The header carrying the provider's real key, or why there is none to send.
    /// `Ok(None)` means this provider takes no key.
    pub fn credential(&self) -> Result<Option<(&HeaderName, &HeaderValue)>, &str> {
        match &self.credential {
            Credential::None => Ok(None),
            Credential::Header(name, value) => Ok(Some((name, value.expose()))),
            Credential::Missing(env) => Err(env),
        }
    }
}

/// Finds the provider for a path: the longest matching prefix wins, matching whole
/// path segments only (`/openai` takes `/openai/v1/...` but not `/openaiX`).
#[derive(Debug, Default)]
pub struct Router {
    /// Sorted by prefix length, longest first.
    providers: Vec<Provider>,
}

impl Router {
    pub fn new(mut providers: Vec<Provider>) -> Self {
        providers.sort_by_key(|p| std::cmp::Reverse(p.prefix.len()));
        Router { providers }
    }

    /// The provider and the rest of the path to append to its base URL.
    pub fn route<'p>(&self, path: &'p str) -> Option<(&Provider, &'p str)> {
        self.providers.iter().find_map(|p| {
            if p.prefix == "/" {
                return Some((p, path));
            }
            let rest = path.strip_prefix(p.prefix.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then_some((p, rest))
        })
    }

    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body with `field` set, its keys read first, as admission does it.
    fn set_json_field(body: &[u8], field: &str, value: serde_json::Value) -> Option<Bytes> {
        set_json_field_in(body, field, value, ObjectKeys::read(body, field)?)
    }

    mod properties {
        use super::set_json_field;
        use bytes::Bytes;
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        /// `set_json_field` as it was: the whole body parsed into `Value`.
        pub(super) fn by_whole_parse(body: &[u8], field: &str, value: Value) -> Option<Bytes> {
            let mut value_map: Value = serde_json::from_slice(body).ok()?;
            let object = value_map.as_object_mut()?;
            if object.contains_key(field) {
                object.insert(field.to_owned(), value);
                return serde_json::to_vec(&value_map).ok().map(Bytes::from);
            }
            let end = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
            let empty = object.is_empty();
            let mut out = body[..end].to_vec();
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(serde_json::to_string(field).ok()?.as_bytes());
            out.push(b':');
            out.extend_from_slice(value.to_string().as_bytes());
            out.extend_from_slice(&body[end..]);
            Some(Bytes::from(out))
        }

        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                "[ -~]{0,12}".prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
                Just(Value::Null),
            ]
        }

        fn object() -> impl Strategy<Value = Map<String, Value>> {
            let value = leaf().prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            });
            prop::collection::btree_map("[a-z_]{1,10}", value, 0..6)
                .prop_map(|m| m.into_iter().collect())
        }

        proptest! {
            /// Any JSON object, compact or pretty: the field is set, everything else
            /// stays, and the result is JSON.
            #[test]
            fn set_json_field_sets_the_field_and_keeps_the_rest(
                doc in object(),
                pretty in any::<bool>(),
                field in prop_oneof![Just("max_tokens".to_owned()), "[a-z_]{1,10}"],
            ) {
                let body = if pretty {
                    serde_json::to_vec_pretty(&doc).unwrap()
                } else {
                    serde_json::to_vec(&doc).unwrap()
                };
                let out = set_json_field(&body, &field, Value::from(42)).unwrap();
                let parsed: Map<String, Value> = serde_json::from_slice(&out).unwrap();
                prop_assert_eq!(&parsed[&field], &Value::from(42));
                for (k, v) in &doc {
                    if k != &field {
                        prop_assert_eq!(&parsed[k], v);
                    }
                }
                prop_assert_eq!(parsed.len(), doc.len() + usize::from(!doc.contains_key(&field)));
            }

            /// The same answer as the version that parses the whole body into `Value`,
            /// for objects, objects with the field, and bytes of any kind.
            #[test]
            fn set_json_field_answers_as_a_whole_parse_does(
                doc in object(),
                field in prop_oneof![Just("max_tokens".to_owned()), "[a-z_]{1,10}"],
                cut in any::<prop::sample::Index>(),
                noise in prop::collection::vec(any::<u8>(), 0..4),
            ) {
                let body = serde_json::to_vec(&doc).unwrap();
                prop_assert_eq!(
                    set_json_field(&body, &field, Value::from(7)),
                    by_whole_parse(&body, &field, Value::from(7))
                );
                // Cut and spliced with noise: mostly not JSON, sometimes still JSON.
                let at = cut.index(body.len() + 1);
                let mut broken = body[..at].to_vec();
                broken.extend_from_slice(&noise);
                broken.extend_from_slice(&body[at..]);
                prop_assert_eq!(
                    set_json_field(&broken, &field, Value::from(7)),
                    by_whole_parse(&broken, &field, Value::from(7))
                );
            }

            #[test]
            fn set_json_field_refuses_what_is_not_an_object(body in prop::collection::vec(any::<u8>(), 0..64)) {
                if let Some(out) = set_json_field(&body, "max_tokens", Value::from(1)) {
                    let parsed: Value = serde_json::from_slice(&out).unwrap();
                    prop_assert!(parsed.is_object());
                }
            }
        }
    }

    fn provider(name: &str, kind: ProviderKindConfig, base: &str, prefix: &str) -> Provider {
        let cfg = ProviderConfig {
            name: name.into(),
            kind,
            base_url: base.into(),
            prefix: prefix.into(),
            api_key_env: Some("KEY".into()),
            inject_usage: true,
        };
        Provider::from_config(&cfg, |_| Some("sk-real".into())).unwrap()
    }

    fn router() -> Router {
        Router::new(vec![
            provider(
                "any",
                ProviderKindConfig::Openai,
                "http://local:8000/base/",
                "/",
            ),
            provider(
                "oa",
                ProviderKindConfig::Openai,
                "https://api.openai.com",
                "/openai",
            ),
            provider(
                "an",
                ProviderKindConfig::Anthropic,
                "https://api.anthropic.com",
                "/anthropic",
            ),
            provider(
                "oa2",
                ProviderKindConfig::Openai,
                "https://eu.example",
                "/openai/eu",
            ),
        ])
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let r = router();
        let (p, rest) = r.route("/openai/v1/chat/completions").unwrap();
        assert_eq!((&*p.name, rest), ("oa", "/v1/chat/completions"));
        let (p, rest) = r.route("/openai/eu/v1/models").unwrap();
        assert_eq!((&*p.name, rest), ("oa2", "/v1/models"));
        let (p, rest) = r.route("/openaiX/v1").unwrap();
        assert_eq!((&*p.name, rest), ("any", "/openaiX/v1"));
        let (p, rest) = r.route("/anthropic").unwrap();
        assert_eq!((&*p.name, rest), ("an", ""));
    }

    #[test]
    fn no_catch_all_means_no_route() {
        let r = Router::new(vec![provider(
            "oa",
            ProviderKindConfig::Openai,
            "https://a",
            "/openai",
        )]);
        assert!(r.route("/v1/models").is_none());
    }

    #[test]
    fn upstream_uri_keeps_base_path_and_query() {
        let r = router();
        let (p, rest) = r.route("/v1/models").unwrap();
        assert_eq!(
            p.upstream_uri(rest, Some("limit=2")).unwrap().to_string(),
            "http://local:8000/base/v1/models?limit=2"
        );
        let (p, rest) = r.route("/anthropic").unwrap();
        assert_eq!(
            p.upstream_uri(rest, None).unwrap().to_string(),
            "https://api.anthropic.com/"
        );
    }

    #[test]
    fn credentials_use_each_providers_header_and_hide_the_key() {
        let r = router();
        let (p, _) = r.route("/openai/v1").unwrap();
        let (name, value) = p.credential().unwrap().unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("authorization", "Bearer sk-real")
        );
        assert!(value.is_sensitive());
        let (p, _) = r.route("/anthropic/v1").unwrap();
        let (name, _) = p.credential().unwrap().unwrap();
        assert_eq!(name.as_str(), "x-api-key");
        assert!(!format!("{p:?}").contains("sk-real"));
    }

    #[test]
    fn fields_are_set_in_place_or_spliced_in() {
        let out = set_json_field(b"{\"a\": 1 }", "max_tokens", serde_json::json!(5)).unwrap();
        assert_eq!(&out[..], b"{\"a\": 1 ,\"max_tokens\":5}");
        let out = set_json_field(
            b"{\"max_tokens\":900,\"a\":1}",
            "max_tokens",
            serde_json::json!(5),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["max_tokens"].as_u64(), v["a"].as_u64()),
            (Some(5), Some(1))
        );
        assert_eq!(
            &set_json_field(b"{}", "n", serde_json::json!(1)).unwrap()[..],
            b"{\"n\":1}"
        );
        assert!(set_json_field(b"[]", "n", serde_json::json!(1)).is_none());
    }

    #[test]
    fn set_json_field_refuses_and_accepts_what_a_whole_parse_does() {
        use properties::by_whole_parse;
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        let cases: [&[u8]; 12] = [
            br#"{"a":1e999}"#,
            br#"{"a":"\ud800"}"#,
            b"{\"a\":\"\xff\"}",
            br#"{"a":"tab\there"}"#,
            b"{\"a\":\"raw\ttab\"}",
            br#"{"max\u005ftokens":1}"#,
            br#"{"max_tokens":1,"max_tokens":2}"#,
            br#"{"a":[1,2,{"b":null}]} x"#,
            br#"{"a":18446744073709551616}"#,
            br#"  {"a":{"\u00e9":true}}  "#,
            br#"{"a":1,}"#,
            deep.as_bytes(),
        ];
        for body in cases {
            assert_eq!(
                set_json_field(body, "max_tokens", serde_json::json!(3)),
                by_whole_parse(body, "max_tokens", serde_json::json!(3)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_model_is_borrowed_from_the_body_unless_escaped() {
        use std::borrow::Cow;
        let model = |json: &str| {
            serde_json::from_str::<RequestFields<'_>>(json)
                .map(|f| {
                    f.model
                        .map(|m| (matches!(m, Cow::Borrowed(_)), m.into_owned()))
                })
                .map_err(|_| ())
        };
        assert_eq!(
            model(r#"{"model":"gpt-4o"}"#),
            Ok(Some((true, "gpt-4o".into())))
        );
        assert_eq!(
            model(r#"{"model":"a\"b"}"#),
            Ok(Some((false, "a\"b".into())))
        );
        assert_eq!(model(r#"{"model":null}"#), Ok(None));
        assert_eq!(model(r#"{}"#), Ok(None));
        assert_eq!(model(r#"{"model":5}"#), Err(()));
    }

    #[test]
    fn output_limits_by_endpoint() {
        let f: RequestFields<'_> = serde_json::from_str(r#"{"max_tokens":50}"#).unwrap();
        assert_eq!(
            f.output_limit(Endpoint::ChatCompletions),
            (Some(50), "max_tokens")
        );
        assert_eq!(f.output_limit(Endpoint::Messages), (Some(50), "max_tokens"));
        assert_eq!(
            f.output_limit(Endpoint::Responses),
            (None, "max_output_tokens")
        );
        let none = RequestFields::default();
        assert_eq!(
            none.output_limit(Endpoint::ChatCompletions),
            (None, "max_completion_tokens")
        );
        assert_eq!(
            none.output_limit(Endpoint::Completions),
            (Some(16), "max_tokens")
        );
        assert_eq!(
            none.output_limit(Endpoint::Embeddings),
            (Some(0), "max_tokens")
        );
    }

    #[test]
    fn endpoints_by_path() {
        let r = router();
        let (oa, _) = r.route("/openai").unwrap();
        assert_eq!(
            oa.endpoint("/v1/chat/completions"),
            Endpoint::ChatCompletions
        );
        assert_eq!(oa.endpoint("/v1/completions"), Endpoint::Completions);
        assert_eq!(oa.endpoint("/v1/responses"), Endpoint::Responses);
        assert_eq!(oa.endpoint("/v1/embeddings"), Endpoint::Embeddings);
        assert_eq!(oa.endpoint("/v1/responses/resp_1"), Endpoint::Other);
        assert_eq!(oa.endpoint("/v1/messages"), Endpoint::Other);
        let (an, _) = r.route("/anthropic").unwrap();
        assert_eq!(an.endpoint("/v1/messages"), Endpoint::Messages);
        assert_eq!(an.endpoint("/v1/messages/count_tokens"), Endpoint::Other);
    }

    #[test]
    fn a_missing_key_variable_is_reported_not_skipped() {
        let cfg = ProviderConfig {
            name: "oa".into(),
            kind: ProviderKindConfig::Openai,
            base_url: "https://a".into(),
            prefix: "/openai".into(),
            api_key_env: Some("NOT_SET".into()),
            inject_usage: true,
        };
        let p = Provider::from_config(&cfg, |_| None).unwrap();
        assert_eq!(p.credential().unwrap_err(), "NOT_SET");
    }
}
