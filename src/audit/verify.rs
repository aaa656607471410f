//! `tokenwarden audit verify`: checks the chain across files, line by line.

use std::path::{Path, PathBuf};

use super::{chain_hash, GENESIS_HASH};

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

    let mut prev: Option<(u64, String)> = None;
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
            let (seq, hash) = check_line(line, key, prev.as_ref())
                .map_err(|reason| broken(file, i + 1, reason))?;
            verified.first_seq.get_or_insert(seq);
            verified.last_seq = Some(seq);
            verified.records += 1;
            prev = Some((seq, hash));
        }
    }
    Ok(verified)
}

fn check_line(
    line: &[u8],
    key: Option<&[u8]>,
    prev: Option<&(u64, String)>,
) -> Result<(u64, String), String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON line: {e}"))?;
    let seq = value["seq"].as_u64().ok_or("no seq")?;
    let hash = value["hash"].as_str().ok_or("no hash")?;
    let prev_hash = value["prev_hash"].as_str().ok_or("no prev_hash")?;
    if line.len() < HASH_SUFFIX_LEN || !line.ends_with(format!(",\"hash\":\"{hash}\"}}").as_bytes())
    {
        return Err("the hash is not the last field".into());
    }
    let mut covered = line[..line.len() - HASH_SUFFIX_LEN].to_vec();
    covered.push(b'}');
    if chain_hash(key, &covered) != hash {
        return Err(format!("seq {seq}: the line was altered (hash mismatch)"));
    }
    match prev {
        Some((prev_seq, prev_hash_want)) => {
            if seq != prev_seq + 1 {
                return Err(format!(
                    "seq {seq} follows seq {prev_seq}: a line is missing or out of order"
                ));
            }
            if prev_hash != prev_hash_want {
                return Err(format!(
                    "seq {seq}: prev_hash does not match the line before"
                ));
            }
        }
        None if seq == 1 && prev_hash != GENESIS_HASH => {
            return Err("seq 1 must chain to the genesis hash".into());
        }
        None => {}
    }
    Ok((seq, hash.to_owned()))
}

fn broken(file: &Path, line: usize, reason: String) -> Broken {
    Broken {
        file: file.display().to_string(),
        line,
        reason,
    }
}
