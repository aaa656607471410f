//! The report of a running proxy: the audit log read as it grows, for the dashboard.
//!
//! A [`Tail`] reads the log once, then on each [`Tail::refresh`] only the lines written
//! since, through the same chain check and the same figures as `tokenwarden report`, so
//! the dashboard and the report never disagree. The files only grow and are never
//! renamed (a rotation starts a new file), so where reading stopped is a file name and
//! an offset into it.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::scan::{parse, take, Findings};
use super::{Aggregator, Options, Report, ReportError};
use crate::audit::verify::Chain;
use crate::secret::Secret;

/// Where reading stopped: the file (and its inode), the bytes of it taken (whole lines
/// only) and the lines among them.
struct Position {
    file: PathBuf,
    inode: u64,
    offset: u64,
    lines: usize,
}

pub struct Tail {
    dir: PathBuf,
    key: Option<Secret<Vec<u8>>>,
    options: Options,
    chain: Chain,
    findings: Findings,
    aggregator: Aggregator,
    at: Option<Position>,
    /// Bytes read at a time ([`CHUNK_BYTES`]; smaller in tests, to cut lines in two).
    chunk: usize,
}

impl Tail {
    /// A reader of the log in `dir`; nothing is read before the first
    /// [`Tail::refresh`]. `options.since` and the filters hold for its whole life.
    pub fn new(dir: PathBuf, key: Option<&[u8]>, options: Options) -> Tail {
        Tail {
            dir,
            key: key.map(|k| Secret::new(k.to_vec())),
            chain: Chain::new(key),
            findings: Findings::default(),
            aggregator: Aggregator::new(options.clone()),
            options,
            at: None,
            chunk: CHUNK_BYTES,
        }
    }

    /// Forgets everything read, to read the log again from its first line.
    fn restart(&mut self) {
        self.chain = Chain::new(self.key.as_ref().map(|k| k.expose().as_slice()));
        self.findings = Findings::default();
        self.aggregator = Aggregator::new(self.options.clone());
        self.at = None;
    }

    /// Reads the lines written since the last call (all of them the first time). A line
    /// being written is left for the next call, unless a newer file shows that it was
    /// cut short for good.
    pub fn refresh(&mut self) -> Result<(), ReportError> {
        let files = crate::audit::log_files(&self.dir).map_err(|source| ReportError::List {
            dir: self.dir.clone(),
            source,
        })?;
        // The file being read is shorter than what was taken of it, is another file by
        // the same name, or is gone: the log was changed under the reader, not appended
        // to. Read it all again rather than go on from a place that means nothing now.
        if let Some(at) = &self.at {
            let same = std::fs::metadata(&at.file)
                .is_ok_and(|m| m.ino() == at.inode && m.len() >= at.offset);
            if !same {
                tracing::warn!(file = %at.file.display(), "the audit log changed under the dashboard's reader; reading it again");
                self.restart();
            }
        }
        for (i, file) in files.iter().enumerate() {
            let offset = match &self.at {
                Some(at) if *file < at.file => continue,
                Some(at) if *file == at.file => at.offset,
                _ => 0,
            };
            if offset == 0 && self.at.as_ref().is_none_or(|at| at.file != *file) {
                let inode = std::fs::metadata(file)
                    .map_err(|source| ReportError::Read {
                        file: file.clone(),
                        source,
                    })?
                    .ino();
                self.at = Some(Position {
                    file: file.clone(),
                    inode,
                    offset: 0,
                    lines: 0,
                });
            }
            let last_file = i + 1 == files.len();
            self.read_file(file, offset, last_file)?;
        }
        Ok(())
    }

    /// Reads `file` from `offset` to its end, a bounded chunk at a time, taking its
    /// whole lines.
    fn read_file(&mut self, file: &Path, offset: u64, last_file: bool) -> Result<(), ReportError> {
        let failed = |source| ReportError::Read {
            file: file.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(file).map_err(failed)?;
        f.seek(SeekFrom::Start(offset)).map_err(failed)?;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            // What is left of the last chunk (a line cut in two) goes first.
            let kept = buf.len();
            buf.resize(kept + self.chunk, 0);
            let n = f.read(&mut buf[kept..]).map_err(failed)?;
            buf.truncate(kept + n);
            let end = n == 0;
            // Part of one long line: nothing to take until its newline comes.
            if !end && memchr::memchr(b'\n', &buf[kept..]).is_none() {
                continue;
            }
            let taken = self.take(file, &buf, last_file, end);
            buf.drain(..taken);
            if end {
                return Ok(());
            }
        }
    }

    /// The figures of every line read so far, as of `now`.
    pub fn report(&self, now: SystemTime) -> Report {
        self.aggregator.report(&self.findings, now)
    }

    /// Takes the whole lines of `bytes` (read from the current position of `file`) and
    /// returns how many bytes it took. At the file's `end`, a rest without a newline is
    /// taken as a torn line unless the file is the log's last (`being_written`): then it
    /// is a line being written, left for the next refresh.
    fn take(&mut self, file: &Path, bytes: &[u8], being_written: bool, end: bool) -> usize {
        let whole = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |newline| newline + 1);
        let Some(at) = self.at.as_mut() else {
            return 0;
        };
        let aggregator = &mut self.aggregator;
        let mut each = |line: &super::scan::Line<'_>| aggregator.add(line);
        for line in bytes[..whole].split(|&b| b == b'\n') {
            at.lines += 1;
            if line.is_empty() {
                continue;
            }
            let parsed = parse(&self.chain, line);
            take(
                &mut self.chain,
                &mut self.findings,
                (file, at.lines),
                parsed,
                &mut each,
            );
        }
        // `split` yields an empty piece after the last newline.
        at.lines = at.lines.saturating_sub(1);
        at.offset += whole as u64;
        if end && whole < bytes.len() && !being_written {
            let why = "torn last line (no newline)";
            at.lines += 1;
            self.findings.malformed(file, at.lines, why);
            self.findings.chain_error(file, at.lines, why);
            at.offset += (bytes.len() - whole) as u64;
            return bytes.len();
        }
        whole
    }
}

/// Bytes read at a time: the reader's memory stays bounded however large the files.
const CHUNK_BYTES: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLog, AuditSettings, Record};
    use prometheus::IntCounter;
    use std::time::Duration;

    fn options() -> Options {
        Options {
            since: None,
            now: SystemTime::now(),
            agents: Vec::new(),
            teams: Vec::new(),
            redundancy_window: Duration::from_secs(3600),
        }
    }

    fn request(agent: &str, cost: f64, fingerprint: &str) -> Record {
        Record {
            ts: jiff::Timestamp::now(),
            kind: "request",
            request_id: Some(http::HeaderValue::from_static("req")),
            agent: Some(agent.into()),
            team: Some("team-a".into()),
            status: 200,
            outcome: "ok",
            input_tokens: 10,
            output_tokens: 5,
            cost_usd: cost,
            fingerprint: Some(fingerprint.into()),
            ..Record::default()
        }
    }

    fn open(dir: &Path, max_file_bytes: u64) -> AuditLog {
        let settings = AuditSettings {
            dir: dir.to_path_buf(),
            max_file_bytes,
            commit_interval: Duration::from_millis(1),
            hmac_key: None,
            snapshot: None,
        };
        let counter = |name: &str| IntCounter::new(name, "test").unwrap();
        AuditLog::open(settings, counter("records"), counter("errors")).unwrap()
    }

    fn wait_for_lines(dir: &Path, n: usize) {
        for _ in 0..500 {
            let lines: usize = crate::audit::log_files(dir)
                .unwrap()
                .iter()
                .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
                .sum();
            if lines >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the log never reached {n} lines");
    }

    const FP_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const FP_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn reads_only_what_was_added_and_agrees_with_the_whole_report() {
        let dir = tempfile::tempdir().unwrap();
        // Small files: the lines below span several rotations.
        let log = open(dir.path(), 600);
        let mut tail = Tail::new(dir.path().to_path_buf(), None, options());
        // Reads smaller than a line: every line is cut across reads.
        tail.chunk = 97;
        tail.refresh().unwrap();
        assert_eq!(tail.report(SystemTime::now()).chain.records, 0);

        log.append(request("agent-a", 0.5, FP_A));
        log.append(request("agent-a", 0.25, FP_A));
        wait_for_lines(dir.path(), 2);
        tail.refresh().unwrap();
        let report = tail.report(SystemTime::now());
        assert_eq!(report.agents["agent-a"].requests, 2);
        assert_eq!(report.agents["agent-a"].redundant_requests, 1);

        for i in 0..6 {
            let fp = if i % 2 == 0 { FP_A } else { FP_B };
            log.append(request("agent-b", 0.125, fp));
        }
        wait_for_lines(dir.path(), 8);
        log.close();
        tail.refresh().unwrap();
        // Nothing new: a second refresh changes nothing.
        tail.refresh().unwrap();
        let live = tail.report(SystemTime::now());
        assert!(
            crate::audit::log_files(dir.path()).unwrap().len() > 2,
            "rotated"
        );
        let whole = super::super::build(dir.path(), None, &options()).unwrap();
        assert!(live.chain.ok, "{:?}", live.chain);
        assert_eq!(live.chain.records, 8);
        assert_eq!(
            serde_json::to_value(&live.agents).unwrap(),
            serde_json::to_value(&whole.agents).unwrap()
        );
        assert_eq!(live.agents["agent-b"].redundant_requests, 4);
        assert!((live.agents["agent-b"].cost_usd - 0.75).abs() < 1e-9);
    }

    #[test]
    fn a_log_changed_under_the_reader_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 1 << 20);
        for _ in 0..3 {
            log.append(request("agent-a", 0.5, FP_A));
        }
        wait_for_lines(dir.path(), 3);
        log.close();
        let mut tail = Tail::new(dir.path().to_path_buf(), None, options());
        tail.refresh().unwrap();
        assert_eq!(tail.report(SystemTime::now()).agents["agent-a"].requests, 3);

        // The file cut back to its first line (an operator's doing, not the writer's).
        let file = crate::audit::log_files(dir.path()).unwrap().remove(0);
        let text = std::fs::read_to_string(&file).unwrap();
        let first = text.split_inclusive('\n').next().unwrap().to_owned();
        std::fs::write(&file, &first).unwrap();
        tail.refresh().unwrap();
        let report = tail.report(SystemTime::now());
        assert_eq!(report.agents["agent-a"].requests, 1);
        assert!(report.chain.ok);

        // Replaced by another file of the same name, longer than what was read.
        let replaced = dir.path().join("replacement");
        std::fs::write(&replaced, &text).unwrap();
        std::fs::rename(&replaced, &file).unwrap();
        tail.refresh().unwrap();
        assert_eq!(tail.report(SystemTime::now()).agents["agent-a"].requests, 3);
    }

    #[test]
    fn a_line_being_written_waits_and_an_edited_line_is_a_break() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 1 << 20);
        log.append(request("agent-a", 0.5, FP_A));
        log.append(request("agent-a", 0.5, FP_B));
        wait_for_lines(dir.path(), 2);
        log.close();
        let file = crate::audit::log_files(dir.path()).unwrap().remove(0);
        let text = std::fs::read_to_string(&file).unwrap();
        let (first, second) = text.split_once('\n').unwrap();

        // Half of the second line is on disk: only the first is taken.
        let half = second.len() / 2;
        std::fs::write(&file, format!("{first}\n{}", &second[..half])).unwrap();
        let mut tail = Tail::new(dir.path().to_path_buf(), None, options());
        tail.refresh().unwrap();
        let report = tail.report(SystemTime::now());
        assert_eq!(report.chain.records, 1);
        assert_eq!(report.lines.malformed, 0);

        // The rest arrives, with one figure changed: a break, and the line still counted.
        let edited = second.replacen("\"output_tokens\":5", "\"output_tokens\":6", 1);
        assert_ne!(edited, second);
        std::fs::write(&file, format!("{first}\n{edited}\n")).unwrap();
        tail.refresh().unwrap();
        let report = tail.report(SystemTime::now());
        assert_eq!(report.chain.records, 2);
        assert!(!report.chain.ok);
        assert!(
            report
                .chain
                .error
                .as_deref()
                .is_some_and(|e| e.ends_with(":2: seq 2: the line was altered (hash mismatch)")),
            "{:?}",
            report.chain.error
        );
        assert_eq!(report.agents["agent-a"].output_tokens, 11);
    }
}
