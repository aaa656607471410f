//! Who may use `/admin/*`: a bearer token, one of those the config names (`admin.token_env`,
//! named `admin`, and `[[admin.tokens]]`). Only SHA-256 digests of the tokens are kept,
//! and a presented token is compared against every digest in constant time.

use http::header::{HeaderMap, AUTHORIZATION};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{AdminConfig, ADMIN_TOKEN_NAME};

/// The admin tokens of one version of the config, read from the environment.
#[derive(Debug, Default)]
pub struct AdminTokens {
    tokens: Vec<([u8; 32], String)>,
    /// Variables the config names that are unset or empty, to say so in the 401.
    unset: Vec<String>,
}

/// Why a request gets no admin access.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no admin token is configured: set admin.token_env (or [[admin.tokens]]) to the name of an environment variable holding one")]
    NoneConfigured,
    #[error("no admin token is set: the environment variables {0} named by the config are unset or empty")]
    NoneSet(String),
    #[error("missing or wrong admin token (Authorization: Bearer TOKEN)")]
    Unauthorized,
}

impl AdminTokens {
    pub fn from_config(cfg: &AdminConfig, lookup_env: impl Fn(&str) -> Option<String>) -> Self {
        let named = cfg
            .token_env
            .iter()
            .map(|env| (ADMIN_TOKEN_NAME, env.as_str()))
            .chain(
                cfg.tokens
                    .iter()
                    .map(|t| (t.name.as_str(), t.token_env.as_str())),
            );
        let mut out = AdminTokens::default();
        for (name, env) in named {
            match lookup_env(env).filter(|t| !t.trim().is_empty()) {
                Some(token) => {
                    let digest = Sha256::digest(token.trim().as_bytes()).into();
                    out.tokens.push((digest, name.to_owned()));
                }
                None => out.unset.push(env.to_owned()),
            }
        }
        out
    }

    /// Whether any token can be presented at all.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How many tokens can be presented.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Environment variables the config names but the process does not have.
    pub fn unset(&self) -> &[String] {
        &self.unset
    }

    /// The name of the token the request carries. Every digest is compared, with no
    /// early exit, so the time taken does not tell which token (if any) matched.
    pub fn check(&self, headers: &HeaderMap) -> Result<&str, AuthError> {
        if self.tokens.is_empty() {
            return Err(if self.unset.is_empty() {
                AuthError::NoneConfigured
            } else {
                AuthError::NoneSet(self.unset.join(", "))
            });
        }
        let presented = bearer(headers).ok_or(AuthError::Unauthorized)?;
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (candidate, name) in &self.tokens {
            if bool::from(candidate.ct_eq(&digest)) {
                found = Some(name.as_str());
            }
        }
        found.ok_or(AuthError::Unauthorized)
    }
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let bytes = headers.get(AUTHORIZATION)?.as_bytes();
    let scheme = bytes.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = bytes[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AdminTokenConfig;
    use http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    fn config() -> AdminConfig {
        AdminConfig {
            token_env: Some("MAIN".into()),
            tokens: vec![
                AdminTokenConfig {
                    name: "ops".into(),
                    token_env: "OPS".into(),
                },
                AdminTokenConfig {
                    name: "ci".into(),
                    token_env: "CI_UNSET".into(),
                },
            ],
            ..AdminConfig::default()
        }
    }

    #[test]
    fn each_token_is_known_by_its_name() {
        let env = |name: &str| match name {
            "MAIN" => Some("main-secret".to_owned()),
            "OPS" => Some("ops-secret".to_owned()),
            _ => None,
        };
        let tokens = AdminTokens::from_config(&config(), env);
        assert_eq!(tokens.check(&headers("Bearer main-secret")), Ok("admin"));
        assert_eq!(tokens.check(&headers("bearer  ops-secret ")), Ok("ops"));
        assert_eq!(
            tokens.check(&headers("Bearer nope")),
            Err(AuthError::Unauthorized)
        );
        assert_eq!(
            tokens.check(&headers("Basic main-secret")),
            Err(AuthError::Unauthorized)
        );
        assert_eq!(
            tokens.check(&HeaderMap::new()),
            Err(AuthError::Unauthorized)
        );
        assert_eq!(tokens.unset(), ["CI_UNSET".to_owned()]);
    }

    #[test]
    fn without_any_token_the_answer_says_what_to_set() {
        let none = AdminTokens::from_config(&AdminConfig::default(), |_| None);
        let err = none.check(&headers("Bearer x")).unwrap_err();
        assert_eq!(err, AuthError::NoneConfigured);
        assert!(err.to_string().contains("admin.token_env"));
        let unset = AdminTokens::from_config(&config(), |_| Some(" ".into()));
        assert!(matches!(
            unset.check(&headers("Bearer x")),
            Err(AuthError::NoneSet(vars)) if vars == "MAIN, OPS, CI_UNSET"
        ));
    }
}
