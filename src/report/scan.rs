//! Reading the audit log for a report: each file whole, line by line, the chain checked
//! and the few fields a report needs parsed in one pass, borrowing from the file's bytes
//! (a string is copied only when it holds an escape).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ReportError;
use crate::audit::verify::Chain;

/// The fields of an audit line a report reads; every other field is skipped unread.
#[derive(Debug, Deserialize)]
pub struct Line<'a> {
    pub seq: u64,
    #[serde(borrow)]
    pub ts: Cow<'a, str>,
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub agent: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub team: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub run: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub outcome: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub reason: Option<Cow<'a, str>>,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(borrow, default)]
    pub fingerprint: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub outcome_kind: Option<Cow<'a, str>>,
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(borrow)]
    pub prev_hash: Cow<'a, str>,
    #[serde(borrow)]
    pub hash: Cow<'a, str>,
}

/// What reading found wrong, besides the figures.
#[derive(Debug, Default)]
pub struct Findings {
    /// Lines read whole (parsed), sound or not.
    pub records: u64,
    /// Lines that are not an audit record (not JSON, fields missing or of another type).
    pub malformed: u64,
    /// The first few malformed lines, as `file:line: why`.
    pub malformed_at: Vec<String>,
    /// Places where the chain breaks (a line altered, missing, out of order, torn).
    pub chain_errors: u64,
    /// The first break, as `file:line: why`.
    pub first_chain_error: Option<String>,
}

/// Malformed lines named in the report; the rest are only counted.
const MALFORMED_EXAMPLES: usize = 5;

impl Findings {
    fn chain_error(&mut self, file: &Path, line: usize, reason: &str) {
        self.chain_errors += 1;
        if self.first_chain_error.is_none() {
            self.first_chain_error = Some(format!("{}:{line}: {reason}", file.display()));
        }
    }

    fn malformed(&mut self, file: &Path, line: usize, reason: &str) {
        self.malformed += 1;
        if self.malformed_at.len() < MALFORMED_EXAMPLES {
            self.malformed_at
                .push(format!("{}:{line}: {reason}", file.display()));
        }
    }
}

/// Reads `files` in chain order, checks the chain and hands every sound or merely
/// unchained line to `each`. A malformed line is counted and skipped, never fatal; only
/// a file that cannot be read stops the scan.
pub fn scan(
    files: &[PathBuf],
    key: Option<&[u8]>,
    mut each: impl FnMut(&Line<'_>),
) -> Result<Findings, ReportError> {
    let mut chain = Chain::new(key);
    let mut findings = Findings::default();
    for file in files {
        let bytes = std::fs::read(file).map_err(|source| ReportError::Read {
            file: file.clone(),
            source,
        })?;
        let mut number = 0;
        let mut rest: &[u8] = &bytes;
        while !rest.is_empty() {
            let (line, after, torn) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], &rest[i + 1..], false),
                None => (rest, &[][..], true),
            };
            rest = after;
            number += 1;
            if line.is_empty() {
                continue;
            }
            if torn {
                // A crash mid-write; the proxy cuts it off at its next start.
                findings.chain_error(file, number, "torn last line (no newline)");
                findings.malformed(file, number, "torn last line (no newline)");
                continue;
            }
            let parsed = match serde_json::from_slice::<Line<'_>>(line) {
                Ok(parsed) => parsed,
                Err(e) => {
                    let why = format!("not an audit record: {e}");
                    findings.malformed(file, number, &why);
                    findings.chain_error(file, number, &why);
                    chain.restart();
                    continue;
                }
            };
            findings.records += 1;
            if let Err(why) = chain.check(line, parsed.seq, &parsed.prev_hash, &parsed.hash) {
                findings.chain_error(file, number, &why);
                // Go on from this line, so one edited line is one break, not two.
                chain.resume_after(parsed.seq, &parsed.hash);
            }
            each(&parsed);
        }
    }
    Ok(findings)
}
