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
#[derive(Debug, Default, Clone)]
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
    pub(super) fn chain_error(&mut self, file: &Path, line: usize, reason: &str) {
        self.chain_errors += 1;
        if self.first_chain_error.is_none() {
            self.first_chain_error = Some(format!("{}:{line}: {reason}", file.display()));
        }
    }

    pub(super) fn malformed(&mut self, file: &Path, line: usize, reason: &str) {
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
///
/// Each file is parsed and hashed on every core (each worker takes a contiguous share of
/// its lines), then linked and handed to `each` in order, on this thread: the figures
/// (redundancy in particular) depend on the order of the lines.
pub fn scan(
    files: &[PathBuf],
    key: Option<&[u8]>,
    mut each: impl FnMut(&Line<'_>),
) -> Result<Findings, ReportError> {
    // Two views of one chain: `checker` hashes lines on the workers, `chain` links them
    // in order on this thread.
    let checker = Chain::new(key);
    let mut chain = Chain::new(key);
    let mut findings = Findings::default();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS));
    for (f, file) in files.iter().enumerate() {
        let bytes = std::fs::read(file).map_err(|source| ReportError::Read {
            file: file.clone(),
            source,
        })?;
        let lines: Vec<(usize, &[u8])> = bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .map(|(i, line)| (i + 1, line))
            .filter(|(_, line)| !line.is_empty())
            .collect();
        // A file that does not end in a newline ends in a line cut short.
        let torn = (!bytes.is_empty() && !bytes.ends_with(b"\n"))
            .then(|| lines.last().map(|(number, _)| *number))
            .flatten();
        let share = lines.len().div_ceil(workers * CHUNKS_PER_WORKER).max(1);
        std::thread::scope(|scope| {
            let checker = &checker;
            let parts: Vec<_> = lines
                .chunks(share)
                .map(|part| {
                    let worker = scope.spawn(move || {
                        part.iter()
                            .map(|(_, l)| parse(checker, l))
                            .collect::<Vec<_>>()
                    });
                    (worker, part)
                })
                .collect();
            // In order, as each share is ready: the first shares are summed while the
            // last are still being parsed.
            for (worker, part) in parts {
                let results = worker.join().unwrap_or_else(|_| {
                    // One entry per line whatever happens, so lines and results pair.
                    part.iter()
                        .map(|_| Parsed::Malformed("the parser failed".into()))
                        .collect()
                });
                for (&(number, _), parsed) in part.iter().zip(results) {
                    if torn == Some(number) {
                        // A write in progress (the proxy is running) or a crash (cut off
                        // at the next start): no alteration, unless a file follows it.
                        let why = "torn last line (no newline)";
                        findings.malformed(file, number, why);
                        if f + 1 < files.len() {
                            findings.chain_error(file, number, why);
                        }
                        continue;
                    }
                    take(&mut chain, &mut findings, (file, number), parsed, &mut each);
                }
            }
        });
    }
    Ok(findings)
}

/// Threads that parse and hash one file's lines.
const MAX_WORKERS: usize = 8;
/// Shares per thread: smaller shares let the summing start sooner.
const CHUNKS_PER_WORKER: usize = 4;

/// One line, parsed and hashed (not yet linked to the one before).
// Nearly every line is a record: boxing it would cost an allocation per line to save
// space only on the rare malformed one.
#[allow(clippy::large_enum_variant)]
pub(super) enum Parsed<'a> {
    Malformed(String),
    Record(Line<'a>, Result<(), String>),
}

/// Links a parsed line to the chain, notes what is wrong with it, and hands a record to
/// `each`.
pub(super) fn take(
    chain: &mut Chain,
    findings: &mut Findings,
    (file, number): (&Path, usize),
    parsed: Parsed<'_>,
    each: &mut impl FnMut(&Line<'_>),
) {
    match parsed {
        Parsed::Malformed(why) => {
            let why = format!("not an audit record: {why}");
            findings.malformed(file, number, &why);
            findings.chain_error(file, number, &why);
            chain.restart();
        }
        Parsed::Record(line, hashed) => {
            findings.records += 1;
            let linked = hashed.and_then(|()| chain.link(line.seq, &line.prev_hash, &line.hash));
            if let Err(why) = linked {
                findings.chain_error(file, number, &why);
                // Go on from this line: one edited line is one break.
                chain.resume_after(line.seq, &line.hash);
            }
            each(&line);
        }
    }
}

pub(super) fn parse<'a>(chain: &Chain, line: &'a [u8]) -> Parsed<'a> {
    match serde_json::from_slice::<Line<'a>>(line) {
        Ok(parsed) => {
            let hashed = chain.check_hash(line, parsed.seq, &parsed.hash);
            Parsed::Record(parsed, hashed)
        }
        Err(e) => Parsed::Malformed(e.to_string()),
    }
}
