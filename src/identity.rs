//! Who is calling: the virtual key in `Authorization: Bearer …` or `x-api-key: …` names an
//! agent. Only SHA-256 digests of keys are stored, and a presented key is compared against
//! every agent's digest in constant time.

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{parse_sha256, AgentConfig};

pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// An agent as the proxy knows it: named in config, never by its key.
#[derive(Debug)]
pub struct Agent {
    /// Shared, not copied, by every record and settlement that names the agent.
    pub id: Arc<str>,
    pub team: Option<Arc<str>>,
}

impl Agent {
    /// The hash tag of the agent's keys in Redis: its team, or itself.
    pub fn tag(&self) -> &str {
        self.team.as_deref().unwrap_or(&self.id)
    }
}

/// The table of virtual-key digests, each as four words so that a comparison is four
/// word operations and one `subtle` check instead of one `subtle` check per byte.
#[derive(Debug, Default)]
pub struct Identities {
    agents: Vec<([u64; 4], Arc<Agent>)>,
}

impl Identities {
    /// Builds the table from validated config; agents with an unparsable digest (which
    /// validation rejects) are left out rather than trusted.
    pub fn from_config(agents: &[AgentConfig]) -> Self {
        let agents = agents
            .iter()
            .filter_map(|a| {
                let digest = parse_sha256(&a.key_sha256)?;
                let agent = Agent {
                    id: Arc::from(a.id.as_str()),
                    team: a.team.as_deref().map(Arc::from),
                };
                Some((words(digest), Arc::new(agent)))
            })
            .collect();
        Identities { agents }
    }

    /// The agent whose key the request carries, if any: the Bearer token's, else the
    /// `x-api-key` header's (a client may send both, e.g. a Basic `Authorization` for a
    /// gateway in front and the key in `x-api-key`). Every digest is compared, with no
    /// early exit, so the time taken does not depend on which agent (if any) matched.
    pub fn identify(&self, headers: &HeaderMap) -> Option<Arc<Agent>> {
        bearer_token(headers)
            .and_then(|key| self.holder_of(key))
            .or_else(|| self.holder_of(api_key(headers)?))
    }

    fn holder_of(&self, key: &[u8]) -> Option<Arc<Agent>> {
        let digest = words(Sha256::digest(key).into());
        let mut found = None;
        for (candidate, agent) in &self.agents {
            if bool::from(same_digest(candidate, &digest)) {
                found = Some(agent);
            }
        }
        found.cloned()
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}

/// Whether two digests are equal. All four words are folded whatever they hold, and
/// only the result goes through `subtle`, so the time does not depend on where they
/// differ.
fn same_digest(a: &[u64; 4], b: &[u64; 4]) -> subtle::Choice {
    let diff = a.iter().zip(b).fold(0u64, |diff, (x, y)| diff | (x ^ y));
    diff.ct_eq(&0)
}

/// A digest as four machine words.
fn words(digest: [u8; 32]) -> [u64; 4] {
    let mut words = [0u64; 4];
    for (word, bytes) in words.iter_mut().zip(digest.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        *word = u64::from_ne_bytes(b);
    }
    words
}

/// The Bearer token the client sent (OpenAI SDKs, Anthropic SDK 2.x).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let bytes = headers.get(AUTHORIZATION)?.as_bytes();
    if !bytes.get(..7)?.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = bytes[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The `x-api-key` header the client sent (Anthropic SDK 1.x).
fn api_key(headers: &HeaderMap) -> Option<&[u8]> {
    let token = headers.get(X_API_KEY)?.as_bytes().trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// A fresh virtual key: 256 bits from the OS generator, hex, with a recognisable prefix.
pub fn new_virtual_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("tw-{}", hex::encode(bytes))
}

/// Lower-case hex SHA-256 of a key, as written in `agents.key_sha256`.
pub fn key_digest_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn table() -> Identities {
        Identities::from_config(&[
            AgentConfig {
                id: "a".into(),
                team: None,
                key_sha256: key_digest_hex("key-a"),
                ..AgentConfig::default()
            },
            AgentConfig {
                id: "b".into(),
                team: Some("t".into()),
                key_sha256: key_digest_hex("key-b"),
                ..AgentConfig::default()
            },
        ])
    }

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_and_x_api_key_both_identify() {
        let t = table();
        assert_eq!(
            &*t.identify(&headers("authorization", "Bearer key-a"))
                .unwrap()
                .id,
            "a"
        );
        assert_eq!(
            &*t.identify(&headers("authorization", "bearer key-b"))
                .unwrap()
                .id,
            "b"
        );
        assert_eq!(
            &*t.identify(&headers("x-api-key", "key-b")).unwrap().id,
            "b"
        );
    }

    #[test]
    fn unknown_missing_or_malformed_keys_identify_no_one() {
        let t = table();
        assert!(t
            .identify(&headers("authorization", "Bearer key-c"))
            .is_none());
        assert!(t
            .identify(&headers("authorization", "Basic a2V5LWE="))
            .is_none());
        assert!(t.identify(&headers("authorization", "Bearer ")).is_none());
        assert!(t.identify(&headers("x-api-key", "")).is_none());
        assert!(t.identify(&HeaderMap::new()).is_none());
    }

    #[test]
    fn digests_differing_in_any_bit_are_told_apart() {
        let digest: [u8; 32] = Sha256::digest(b"key-a").into();
        assert!(bool::from(same_digest(&words(digest), &words(digest))));
        for byte in 0..32 {
            for bit in 0..8 {
                let mut other = digest;
                other[byte] ^= 1 << bit;
                assert!(
                    !bool::from(same_digest(&words(digest), &words(other))),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn new_keys_are_distinct_and_match_their_digest() {
        let (k1, k2) = (new_virtual_key(), new_virtual_key());
        assert_ne!(k1, k2);
        assert_eq!(k1.len(), 3 + 64);
        assert_eq!(key_digest_hex(&k1).len(), 64);
    }
}
