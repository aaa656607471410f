//! `tokenwarden audit verify`: checks the chain across files, line by line.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use super::{LineHasher, GENESIS_HASH};

/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// A verified log.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub files: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// The first place the chain breaks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}:{line}: {reason}")]
pub struct Broken {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// Verifies the files in chain order (files are sorted by name; directories are read for
/// their `audit-*.jsonl` files). The first record may continue an older chain whose
/// files are gone; after it every `prev_hash` must be the hash before it, every `seq`
/// one more, and every `hash` must match the line's bytes.
pub fn verify(paths: &[PathBuf], key: Option<&[u8]>) -> Result<Verified, Broken> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            files.extend(super::log_files(path).map_err(|e| broken(path, 0, e.to_string()))?);
        } else {
            files.push(path.clone());
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));

    let mut chain = Chain::new(key);
    let mut verified = Verified {
        files: files.len(),
        records: 0,
        first_seq: None,
        last_seq: None,
    };
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| broken(file, 0, e.to_string()))?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            let line = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
            return Err(broken(file, line, "torn last line (no newline)".into()));
        }
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let links: Links<'_> = serde_json::from_slice(line)
                .map_err(|e| broken(file, i + 1, format!("not a JSON line: {e}")))?;
            let (seq, prev_hash, hash) = (
                links
                    .seq
                    .ok_or_else(|| broken(file, i + 1, "no seq".into()))?,
                links
                    .prev_hash
                    .ok_or_else(|| broken(file, i + 1, "no prev_hash".into()))?,
                links
                    .hash
                    .ok_or_else(|| broken(file, i + 1, "no hash".into()))?,
            );
            chain
                .check(line, seq, &prev_hash, &hash)
                .map_err(|reason| broken(file, i + 1, reason))?;
            verified.first_seq.get_or_insert(seq);
            verified.last_seq = Some(seq);
            verified.records += 1;
        }
    }
    Ok(verified)
}

/// The fields that chain a line.
#[derive(serde::Deserialize)]
struct Links<'a> {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    prev_hash: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    hash: Option<Cow<'a, str>>,
}

/// The chain as it is read, line by line: checks each line's hash against its bytes and
/// its link to the line before, without allocating (`tokenwarden audit verify` and
/// `tokenwarden report` both read through it).
pub struct Chain {
    hasher: LineHasher,
    /// The last linked line: its seq and its hash as written (hex).
    prev: Option<(u64, [u8; 64])>,
}

impl Chain {
    pub fn new(key: Option<&[u8]>) -> Chain {
        Chain {
            hasher: LineHasher::new(key),
            prev: None,
        }
    }

    /// Checks one line, given its `seq`, `prev_hash` and `hash` fields: the hash must be
    /// the last field and match the line's bytes, and the line must follow the one
    /// checked before. The first line may continue an older chain whose files are gone.
    pub fn check(
        &mut self,
        line: &[u8],
        seq: u64,
        prev_hash: &str,
        hash: &str,
    ) -> Result<(), String> {
        self.check_hash(line, seq, hash)?;
        self.link(seq, prev_hash, hash)
    }

    /// The half of [`Chain::check`] that needs no other line: the hash is the last field
    /// and matches the line's bytes. Takes `&self`, so lines can be hashed in parallel
    /// and then linked in order.
    pub fn check_hash(&self, line: &[u8], seq: u64, hash: &str) -> Result<(), String> {
        let suffix_ok = line.len() >= HASH_SUFFIX_LEN
            && hash.len() == 64
            && line.ends_with(b"\"}")
            && line[line.len() - HASH_SUFFIX_LEN..].starts_with(b",\"hash\":\"")
            && &line[line.len() - 66..line.len() - 2] == hash.as_bytes();
        if !suffix_ok {
            return Err("the hash is not the last field".into());
        }
        let covered = &line[..line.len() - HASH_SUFFIX_LEN];
        let got = self.hasher.hash(covered);
        // The writer writes lower-case hex: compare as text, no decoding.
        if got != hash.as_bytes() {
            return Err(format!("seq {seq}: the line was altered (hash mismatch)"));
        }
        Ok(())
    }

    /// The other half: the line follows the one linked before (its `seq` is one more and
    /// its `prev_hash` is that line's hash).
    pub fn link(&mut self, seq: u64, prev_hash: &str, hash: &str) -> Result<(), String> {
        let result = match &self.prev {
            Some((prev_seq, prev_want)) => {
                if seq != prev_seq + 1 {
                    Err(format!(
                        "seq {seq} follows seq {prev_seq}: a line is missing or out of order"
                    ))
                } else if prev_hash.as_bytes() != &prev_want[..] {
                    Err(format!(
                        "seq {seq}: prev_hash does not match the line before"
                    ))
                } else {
                    Ok(())
                }
            }
            None if seq == 1 && prev_hash != GENESIS_HASH => {
                Err("seq 1 must chain to the genesis hash".into())
            }
            None => Ok(()),
        };
        if result.is_ok() {
            self.resume_after(seq, hash);
        }
        result
    }

    /// Goes on after a broken line as if the chain began again at the next line, so a
    /// reader that keeps going reports one break once, not every line after it.
    pub fn restart(&mut self) {
        self.prev = None;
    }

    /// Goes on after a line whose link was broken but whose own hash is sound: the next
    /// line must follow it.
    pub fn resume_after(&mut self, seq: u64, hash: &str) {
        self.prev = <[u8; 64]>::try_from(hash.as_bytes()).ok().map(|h| (seq, h));
    }
}

fn broken(file: &Path, line: usize, reason: String) -> Broken {
    Broken {
        file: file.display().to_string(),
        line,
        reason,
    }
}
