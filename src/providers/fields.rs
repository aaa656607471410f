//! Reading a request's fields in one pass.
//!
//! The proxy reads a few fields of each request ([`RequestFields`]) and, when admission
//! writes an output limit into the body, must know that the body is an object a parse
//! into `Value` accepts, whether it is empty and whether it has the limit's field
//! ([`ObjectKeys`]). The lax read of the fields skips what it does not need; checking
//! the body for the splice was a second pass over it, which for a large body (images
//! travel as base64) is a pass of its own. [`read_fields`] does both in one pass where it
//! can: it checks every value as a parse into `Value` would and notes the top-level keys
//! on the way ([`TopKeys`]); a body that check refuses falls back to the lax read and
//! carries no keys, and so does one with `stream_options` (read as the lax read reads
//! it), so the splice reads them as before. The fields are the same either
//! way, and the keys the same as [`ObjectKeys::read`] finds (a property test holds both).

use std::borrow::Cow;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};

use super::{borrowed_str, ObjectKeys, RequestFields, Valid};

/// Which output-limit fields the body's top level has, and whether it has no key at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopKeys {
    empty: bool,
    max_tokens: bool,
    max_completion_tokens: bool,
    max_output_tokens: bool,
}

impl TopKeys {
    /// The keys as [`ObjectKeys::read`] finds them for `field`; `None` for a field not
    /// noted here.
    pub fn get(&self, field: &str) -> Option<ObjectKeys> {
        let has_field = match field {
            "max_tokens" => self.max_tokens,
            "max_completion_tokens" => self.max_completion_tokens,
            "max_output_tokens" => self.max_output_tokens,
            _ => return None,
        };
        Some(ObjectKeys {
            has_field,
            empty: self.empty,
        })
    }
}

/// The request's fields as `serde_json::from_slice::<RequestFields>` reads them, with the
/// top-level keys where the body is JSON a parse into `Value` accepts.
pub fn read_fields(body: &[u8]) -> Option<RequestFields<'_>> {
    let mut de = serde_json::Deserializer::from_slice(body);
    if let Ok(fields) = de::Deserializer::deserialize_map(&mut de, Checked) {
        if de.end().is_ok() {
            return Some(fields);
        }
    }
    serde_json::from_slice(body).ok()
}

/// The fields, every other value checked as a parse into `Value` checks it.
struct Checked;

/// The fields [`Checked`] reads, in the order of the bits that catch a field given twice
/// (which the lax read refuses too).
const NAMES: [&str; 8] = [
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
];

impl<'de> Visitor<'de> for Checked {
    type Value = RequestFields<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = RequestFields::default();
        let mut keys = TopKeys {
            empty: true,
            ..TopKeys::default()
        };
        let mut seen = 0u16;
        let mut checked = true;
        while let Some(key) = map.next_key_seed(JsonKey)? {
            keys.empty = false;
            let Some(i) = NAMES.iter().position(|name| *name == key) else {
                map.next_value::<Valid>()?;
                continue;
            };
            if seen & (1 << i) != 0 {
                return Err(de::Error::duplicate_field(NAMES[i]));
            }
            seen |= 1 << i;
            match i {
                0 => fields.model = map.next_value_seed(Model)?,
                1 => fields.stream = map.next_value()?,
                2 => {
                    // As the lax read reads it, which skips the object's other keys
                    // unchecked: the body's keys are then not noted.
                    fields.stream_options = map.next_value()?;
                    checked = false;
                }
                3 => {
                    keys.max_tokens = true;
                    fields.max_tokens = map.next_value()?;
                }
                4 => {
                    keys.max_completion_tokens = true;
                    fields.max_completion_tokens = map.next_value()?;
                }
                5 => {
                    keys.max_output_tokens = true;
                    fields.max_output_tokens = map.next_value()?;
                }
                6 => fields.n = map.next_value()?,
                _ => fields.best_of = map.next_value()?,
            }
        }
        fields.keys = checked.then_some(keys);
        Ok(fields)
    }
}

/// `model`, read as the lax read reads it.
struct Model;

impl<'de> DeserializeSeed<'de> for Model {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: de::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        borrowed_str(de)
    }
}

/// An object's key, borrowed from the body where it has no escapes.
pub(crate) struct JsonKey;

impl<'de> DeserializeSeed<'de> for JsonKey {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for JsonKey {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::{read_fields, TopKeys};
    use crate::providers::{ObjectKeys, RequestFields};

    const LIMITS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

    /// The fields as the lax read alone reads them.
    fn lax(body: &[u8]) -> Option<String> {
        serde_json::from_slice::<RequestFields<'_>>(body)
            .ok()
            .map(|f| format!("{f:?}"))
    }

    fn read(body: &[u8]) -> (Option<String>, Option<TopKeys>) {
        match read_fields(body) {
            Some(mut fields) => {
                let keys = fields.keys.take();
                (Some(format!("{fields:?}")), keys)
            }
            None => (None, None),
        }
    }

    fn has_stream_options(body: &[u8]) -> bool {
        serde_json::from_slice::<Value>(body).is_ok_and(|doc| doc.get("stream_options").is_some())
    }

    /// The fields are the lax read's; the keys, where noted, are what the splice's own
    /// read finds.
    fn holds(body: &[u8]) -> Result<(), TestCaseError> {
        let (fields, keys) = read(body);
        let shown = String::from_utf8_lossy(body);
        prop_assert_eq!(&fields, &lax(body), "{}", shown);
        for field in LIMITS {
            match keys {
                Some(keys) => {
                    prop_assert_eq!(keys.get(field), ObjectKeys::read(body, field), "{}", shown)
                }
                // Not noted for a body with `stream_options`, by design; otherwise only
                // for a body the splice's own read refuses too.
                None if fields.is_some() && !has_stream_options(body) => {
                    prop_assert_eq!(ObjectKeys::read(body, field), None, "{}", shown)
                }
                None => {}
            }
        }
        Ok(())
    }

    #[test]
    fn hand_picked_bodies() {
        let bodies: [&[u8]; 13] = [
            br#"{"model":"m","messages":[]}"#,
            br#"{}"#,
            br#"{"max_tokens":null,"model":"m"}"#,
            br#"{"model":"m","max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":false,"other":[1]}}"#,
            br#"{"model":"m","messages":[{"content":"\ud800"}]}"#,
            b"{\"model\":\"m\",\"messages\":[{\"content\":\"\xff\"}]}",
            br#"{"model":"m","stream_options":{"x":"\ud800"}}"#,
            br#"{"model":"m","stream_options":{"include_usage":true,"include_usage":false}}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"tools":1,"tools":2,"max_output_tokens":3}"#,
            br#"{"model":"m"} trailing"#,
            br#"{"stream":"yes"}"#,
            br#"[{"model":"m"}]"#,
        ];
        for body in bodies {
            holds(body).unwrap();
        }
        let fields = read_fields(br#"{"model":"m","max_tokens":null}"#).unwrap();
        let keys = fields.keys.expect("plain JSON: keys noted");
        assert_eq!(
            keys.get("max_tokens"),
            ObjectKeys::read(b"{\"max_tokens\":null}", "max_tokens")
        );
        assert!(read_fields(br#"{"model":"m","x":"\ud800"}"#)
            .unwrap()
            .keys
            .is_none());
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u32>().prop_map(Value::from),
            "[ -~\u{e9}]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Requests with the fields read and others, of the right type or not, written
        /// compactly or not, then spoiled in one of the ways that separate the two reads.
        #[test]
        fn reads_as_the_lax_read_and_notes_the_splices_keys(
            fields in prop::collection::vec(
                (prop_oneof![
                    Just("model"), Just("stream"), Just("stream_options"), Just("max_tokens"),
                    Just("max_completion_tokens"), Just("max_output_tokens"), Just("n"),
                    Just("best_of"), Just("messages"), Just("temperature"),
                ], prop_oneof![
                    value(),
                    "[a-z]{1,5}".prop_map(Value::from),
                    any::<u32>().prop_map(Value::from),
                    any::<bool>().prop_map(Value::from),
                ]),
                0..6,
            ),
            pretty in any::<bool>(),
            spoil in 0..6usize,
        ) {
            let doc: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let mut body = if pretty {
                serde_json::to_vec_pretty(&doc).unwrap()
            } else {
                serde_json::to_vec(&doc).unwrap()
            };
            let insert = |body: &mut Vec<u8>, bytes: &[u8]| {
                let at = 1;
                let tail = body.split_off(at);
                body.extend_from_slice(bytes);
                if doc.is_empty() {
                    body.pop();
                }
                body.extend_from_slice(&tail);
            };
            match spoil {
                1 => insert(&mut body, br#""x":"\udc00","#),
                2 => insert(&mut body, b"\"x\":\"\xfe\","),
                3 => insert(&mut body, br#""n":1,"#),
                4 => body.extend_from_slice(b" x"),
                5 => {
                    let half = body.len() / 2;
                    body.truncate(half);
                }
                _ => {}
            }
            holds(&body)?;
        }
    }
}
