//! The repetition key of a request, for `runs.max_repeats`: its model and its
//! conversation (`messages`, or `input`, `prompt` and `system`) in a canonical form,
//! hashed, so that key order, whitespace and the spelling of tool-call arguments do not
//! matter.
//!
//! The canonical form of a field is serde_json's compact text of it as a `Value` (keys
//! sorted, the last of duplicate keys kept, numbers and strings written as serde_json
//! writes them), with every `arguments` string that holds JSON replaced by the compact
//! text of that JSON. It is made without building `Value`s, which cost a map and a
//! string allocation per object and per string: each field is read into a tree that
//! borrows the body's unescaped strings, each object's keys are sorted in place, and the
//! text goes straight into the hash (`benches/runs.rs`). The other fields are checked
//! as a parse into `Value` would check them, and dropped: a body that parse refuses has
//! no fingerprint. A property test holds this to the `Value` form.

use std::borrow::Cow;
use std::io::Write;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

use crate::providers::{JsonKey, Valid};

/// The fields that make two requests the same request, in the order they are hashed.
const FIELDS: [&str; 5] = ["model", "system", "messages", "input", "prompt"];

/// The request's repetition key; `None` for a body that is not a JSON object.
pub fn fingerprint(body: &[u8]) -> Option<[u8; 16]> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut fields = de::Deserializer::deserialize_map(&mut de, Fields).ok()?;
    de.end().ok()?;
    let mut hash = std::io::BufWriter::with_capacity(4096, HashWriter(Sha256::new()));
    for (name, value) in FIELDS.iter().zip(fields.iter_mut()) {
        if let Some(value) = value {
            hash.write_all(name.as_bytes()).ok()?;
            hash.write_all(&[0]).ok()?;
            write_canonical(value, &mut hash, true).ok()?;
            hash.write_all(&[0]).ok()?;
        }
    }
    let digest = hash.into_inner().ok()?.0.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    Some(out)
}

/// A JSON value whose strings borrow the body where they have no escapes.
enum Node<'a> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

/// Writes `node` as serde_json writes it as a compact `Value` and, with `arguments`,
/// the `arguments` strings that hold JSON as that JSON's compact text (not recursively:
/// those within that JSON stay as they are). Sorts objects' keys in place.
fn write_canonical(
    node: &mut Node<'_>,
    out: &mut impl Write,
    arguments: bool,
) -> std::io::Result<()> {
    match node {
        Node::Null => out.write_all(b"null"),
        Node::Bool(true) => out.write_all(b"true"),
        Node::Bool(false) => out.write_all(b"false"),
        Node::Number(n) => serde_json::to_writer(out, n).map_err(std::io::Error::other),
        Node::String(s) => write_string(s, out),
        Node::Array(items) => {
            out.write_all(b"[")?;
            for (i, item) in items.iter_mut().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                write_canonical(item, out, arguments)?;
            }
            out.write_all(b"]")
        }
        Node::Object(entries) => {
            // Stable: of equal keys the last one given stays last, and is the one kept,
            // as a `Value`'s map keeps it.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            out.write_all(b"{")?;
            let mut first = true;
            for i in 0..entries.len() {
                if entries
                    .get(i + 1)
                    .is_some_and(|next| next.0 == entries[i].0)
                {
                    continue;
                }
                if !first {
                    out.write_all(b",")?;
                }
                first = false;
                let (key, value) = &mut entries[i];
                write_string(key, out)?;
                out.write_all(b":")?;
                match value {
                    Node::String(text) if arguments && key == "arguments" => {
                        match canonical_json(text) {
                            Some(json) => serde_json::to_writer(&mut *out, &json)
                                .map_err(std::io::Error::other)?,
                            None => write_string(text, out)?,
                        }
                    }
                    value => write_canonical(value, out, arguments)?,
                }
            }
            out.write_all(b"}")
        }
    }
}

/// The compact text of the JSON in `text`, as a `Value` would print it; `None` if it is
/// not JSON.
fn canonical_json(text: &str) -> Option<String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let mut node: Node<'_> = serde::Deserialize::deserialize(&mut de).ok()?;
    de.end().ok()?;
    let mut json = Vec::with_capacity(text.len());
    write_canonical(&mut node, &mut json, false).ok()?;
    String::from_utf8(json).ok()
}

/// Writes a string as serde_json writes it. One that the body held without escapes (a
/// borrowed one) is written as it came: valid JSON text has no unescaped quote,
/// backslash or control character, the only characters serde_json escapes.
#[allow(clippy::ptr_arg)] // the variant is the point: borrowed means unescaped
fn write_string(text: &Cow<'_, str>, out: &mut impl Write) -> std::io::Result<()> {
    match text {
        Cow::Borrowed(raw) => {
            out.write_all(b"\"")?;
            out.write_all(raw.as_bytes())?;
            out.write_all(b"\"")
        }
        Cow::Owned(text) => serde_json::to_writer(out, text).map_err(std::io::Error::other),
    }
}

/// Feeds what is written to the hash.
struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// === reading ===

/// The top-level object: the fields of [`FIELDS`] as trees (the last of duplicates
/// kept), everything else checked and dropped.
struct Fields;

impl<'de> Visitor<'de> for Fields {
    type Value = [Option<Node<'de>>; 5];

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields: [Option<Node<'de>>; 5] = Default::default();
        while let Some(key) = map.next_key_seed(JsonKey)? {
            match FIELDS.iter().position(|f| *f == key) {
                Some(i) => fields[i] = Some(map.next_value::<Node<'de>>()?),
                None => {
                    map.next_value::<Valid>()?;
                }
            }
        }
        Ok(fields)
    }
}

impl<'de> serde::Deserialize<'de> for Node<'de> {
    fn deserialize<D: de::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node<'de>, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node<'de>, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node<'de>, E> {
        Ok(Node::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node<'de>, E> {
        // As `Value` reads it.
        Ok(serde_json::Number::from_f64(v).map_or(Node::Null, Node::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node<'de>, E> {
        Ok(Node::String(Cow::Owned(v.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key_seed(JsonKey)? {
            entries.push((key, map.next_value()?));
        }
        Ok(Node::Object(entries))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use proptest::prelude::*;
    use serde_json::{json, Map, Value};
    use sha2::{Digest, Sha256};

    use super::fingerprint;

    /// The fingerprint as it was first written, through `Value`: the form this one is
    /// held to.
    fn by_value(body: &[u8]) -> Option<[u8; 16]> {
        let Value::Object(mut doc) = serde_json::from_slice(body).ok()? else {
            return None;
        };
        let mut hasher = Sha256::new();
        for field in ["model", "system", "messages", "input", "prompt"] {
            if let Some(mut value) = doc.remove(field) {
                canonical_arguments(&mut value);
                hasher.update(field.as_bytes());
                hasher.update([0]);
                hasher.update(value.to_string().as_bytes());
                hasher.update([0]);
            }
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&hasher.finalize()[..16]);
        Some(out)
    }

    fn canonical_arguments(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    if key == "arguments" {
                        if let Value::String(s) = v {
                            if let Ok(parsed) = serde_json::from_str::<Value>(s) {
                                *s = parsed.to_string();
                            }
                        }
                    }
                    canonical_arguments(v);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(canonical_arguments),
            _ => {}
        }
    }

    fn same(body: &[u8]) {
        assert_eq!(
            fingerprint(body),
            by_value(body),
            "{}",
            String::from_utf8_lossy(body)
        );
    }

    #[test]
    fn agrees_with_the_value_form_on_hand_picked_bodies() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        let bodies: Vec<Vec<u8>> = vec![
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":1}"#.to_vec(),
            br#"{ "messages" : [ {"content":"x","role":"user"} ], "model":"m" }"#.to_vec(),
            // Duplicate keys: the last one counts, at the top and inside.
            br#"{"model":"a","model":"b","messages":[{"role":"x","role":"y","content":1}]}"#.to_vec(),
            // Escapes written differently, numbers of every kind.
            br#"{"messages":["\u0041\n\"\\\/\ud83d\ude00","A\u000a",-0,1e3,1.50,-7,18446744073709551615,1.0e-5]}"#.to_vec(),
            // Keys that need escaping, and sorting among them.
            br#"{"input":{"b\"":1,"a\\":2,"\u00e9":3,"z":4,"":5}}"#.to_vec(),
            // Tool-call arguments: JSON, JSON with spaces, not JSON, not a string.
            br#"{"messages":[{"tool_calls":[{"function":{"arguments":"{ \"b\": [1, 2], \"a\": {\"y\":1,\"x\":2} }"}},{"function":{"arguments":"not json"}},{"arguments":{"b":1,"a":2}},{"arguments":"{\"arguments\":\"{ \\\"z\\\": 1 }\"}"}]}]}"#.to_vec(),
            br#"{"prompt":"plain","system":[{"type":"text","text":"s"}],"other":{"x":[1,2,{"y":null}]}}"#.to_vec(),
            br#"{}"#.to_vec(),
            // No fingerprint: not an object, not JSON, past the nesting limit, a lone
            // surrogate or bytes that are not UTF-8 in a field nobody reads.
            br#"[1,2]"#.to_vec(),
            br#""text""#.to_vec(),
            br#"{"model":"m""#.to_vec(),
            br#"{"model":"m"} x"#.to_vec(),
            format!(r#"{{"messages":{deep}}}"#).into_bytes(),
            format!(r#"{{"tools":{deep}}}"#).into_bytes(),
            br#"{"tools":"\ud800"}"#.to_vec(),
            b"{\"tools\":\"\xff\",\"model\":\"m\"}".to_vec(),
            br#"{"model":"m","messages":[1,]}"#.to_vec(),
        ];
        for body in &bodies {
            same(body);
        }
        assert!(fingerprint(br#"{"model":"m"}"#).is_some());
        assert!(fingerprint(br#"{"tools":"\ud800"}"#).is_none());
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "[a-z\"\\\\/\u{0}-\u{1f}\u{e9}\u{1f600} ]{0,12}".prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                prop::collection::vec(
                    (
                        prop_oneof![Just("arguments".to_owned()), "[a-z_]{1,6}"],
                        inner.clone()
                    ),
                    0..5
                )
                .prop_map(|entries| {
                    Value::Object(entries.into_iter().collect::<Map<String, Value>>())
                }),
                // A tool call's arguments: JSON text in a string, spelled loosely.
                inner.prop_map(|v| {
                    json!({ "arguments": serde_json::to_string_pretty(&v).unwrap() })
                }),
            ]
        })
    }

    /// Writes `value` as a client might: keys in any order, some keys twice (the
    /// earlier copy with another value), compact or with spaces.
    fn write_loosely(value: &Value, seed: u64, out: &mut String) {
        let spaced = seed % 3 == 0;
        let gap = if spaced { " " } else { "" };
        match value {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                let n = entries.len();
                if n > 1 {
                    entries.rotate_left((seed as usize) % n);
                }
                if seed % 2 == 1 {
                    entries.reverse();
                }
                out.push('{');
                for (i, (k, v)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(gap);
                    let key = serde_json::to_string(k).unwrap();
                    if seed % 5 == 0 {
                        // A duplicate that the later copy overrides.
                        out.push_str(&format!("{key}:{gap}\"shadowed\",{gap}"));
                    }
                    out.push_str(&key);
                    out.push(':');
                    out.push_str(gap);
                    write_loosely(v, seed.wrapping_mul(31).wrapping_add(i as u64), out);
                }
                out.push_str(gap);
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        out.push_str(gap);
                    }
                    write_loosely(v, seed.wrapping_mul(17).wrapping_add(i as u64), out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }

    proptest! {
        /// Any request, written any way: the same fingerprint as the `Value` form, and
        /// the same as the same request written compactly with sorted keys.
        #[test]
        fn agrees_with_the_value_form(
            fields in prop::collection::vec(
                (prop_oneof![
                    Just("model"), Just("system"), Just("messages"), Just("input"),
                    Just("prompt"), Just("tools"), Just("temperature"),
                ], value()),
                0..6,
            ),
            seed in any::<u64>(),
        ) {
            let doc = Value::Object(
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            );
            let mut loose = String::new();
            write_loosely(&doc, seed, &mut loose);
            prop_assert_eq!(fingerprint(loose.as_bytes()), by_value(loose.as_bytes()), "{}", loose);
            let compact = serde_json::to_vec(&doc).unwrap();
            prop_assert_eq!(fingerprint(loose.as_bytes()), fingerprint(&compact));
        }
    }
}
