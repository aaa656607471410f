//! The audit log: one JSON line per request and per decision, hash-chained, append-only.
//!
//! Records are queued by the request path and written by one dedicated thread (file I/O
//! never runs on a tokio worker). The writer takes whatever is queued, chains each line
//! to the one before (SHA-256, or HMAC-SHA-256 with a key) and appends the batch at once,
//! so a crash of the process loses only what is still queued. One fsync covers every line
//! appended within `commit_interval` of the oldest unsynced one: group commit. Files
//! rotate by size and the chain continues across them.
//!
//! The queue never drops a settled record. It is bounded by admission instead: while the
//! writer is failing or far behind, [`AuditLog::accepting`] is false and the proxy
//! refuses new requests (fail closed), so only requests already in flight can add to it.
//!
//! The writer also keeps the ledger snapshot: it folds each record's spend once the
//! record is fsynced and every `snapshot.interval` (and at close) writes the total of the
//! lines written so far, so that a start replays only the lines after it.

mod class;
mod restore;
pub mod standing;
pub mod verify;
mod writer;

pub use restore::Restored;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use prometheus::IntCounter;
use serde::Serialize;

use crate::secret::Secret;

/// Queued records past which new requests are refused until the writer catches up.
pub const MAX_QUEUED: usize = 100_000;
/// Default size at which a file is rotated.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// `prev_hash` of the very first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit line, before the writer adds `seq`, `prev_hash` and `hash`.
///
/// No secret is ever a field: keys appear only as the agent they identify, the path
/// carries no query string, and bodies are written only with `audit.include_bodies`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// Written as RFC 3339, UTC, milliseconds, by the writer thread.
    #[serde(serialize_with = "serialize_millis")]
    pub ts: jiff::Timestamp,
    /// `request`, `run` (a run stopped, warned or resumed), `admin` or `outcome` (work an
    /// agent reported done, `POST /v1/outcomes`).
    pub kind: &'static str,
    /// The request's `x-tokenwarden-request-id`, shared with its response; `""` when
    /// no request was proxied (admin lines).
    #[serde(serialize_with = "header_or_empty")]
    pub request_id: Option<http::HeaderValue>,
    pub agent: Option<Arc<str>>,
    pub team: Option<Arc<str>>,
    pub run: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub model: Option<Arc<str>>,
    /// Empty for an action no HTTP request asked for (a reload on `SIGHUP`).
    pub method: Cow<'static, str>,
    pub path: Arc<str>,
    pub status: u16,
    /// `ok`, `provider_error`, `upstream_error`, `timeout`, `client_gone`, `shutdown`, `rejected`;
    /// run lines: `stopped`, `warning`, `resumed`; admin lines: `ok`, `rejected`, `failed`.
    pub outcome: &'static str,
    /// Why, in a stable word: the stream's end or the rejection's reason.
    pub reason: Cow<'static, str>,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub estimated: bool,
    pub cost_usd: f64,
    pub latency_ms: f64,
    pub ttfb_ms: Option<f64>,
    /// SHA-256 of the request body, hex.
    pub fingerprint: Option<Fingerprint>,
    /// The client's address; written as `""` when there was none (`SIGHUP`).
    #[serde(serialize_with = "address_or_empty")]
    pub client: Option<SocketAddr>,
    /// What happened, in words (run and admin lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Who did it (admin lines): the name of the admin token, or `SIGHUP`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Outcome lines: what was achieved (`ticket_resolved`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome_kind: Option<String>,
    /// Outcome lines: how many of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Outcome lines: the caller's own reference (a ticket or PR id), attribution only.
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
}

fn header_or_empty<S: serde::Serializer>(
    value: &Option<http::HeaderValue>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    // Request ids are made of hex digits: never anything but visible ASCII.
    serializer.serialize_str(value.as_ref().and_then(|v| v.to_str().ok()).unwrap_or(""))
}

fn address_or_empty<S: serde::Serializer>(
    addr: &Option<SocketAddr>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match addr {
        Some(addr) => serializer.collect_str(addr),
        None => serializer.serialize_str(""),
    }
}

/// An HTTP method as the audit log writes it: the standard ones without a copy.
pub fn method_name(method: &http::Method) -> Cow<'static, str> {
    use http::Method;
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    match STANDARD.iter().find(|(m, _)| m == method) {
        Some((_, name)) => Cow::Borrowed(name),
        None => Cow::Owned(method.as_str().to_owned()),
    }
}

/// The SHA-256 of a request body, written as hex. Given the body itself ([`Fingerprint::Of`]),
/// it is hashed when the line is encoded, on the writer thread: hashing a large prompt
/// then delays no response (the settlement runs before the last bytes reach the client).
#[derive(Clone)]
pub enum Fingerprint {
    /// Already hashed, as hex.
    Hex(String),
    /// The body, to hash.
    Of(bytes::Bytes),
}

impl From<String> for Fingerprint {
    fn from(hex: String) -> Fingerprint {
        Fingerprint::Hex(hex)
    }
}

impl From<&str> for Fingerprint {
    fn from(hex: &str) -> Fingerprint {
        Fingerprint::Hex(hex.to_owned())
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Fingerprint::Hex(hex) => serializer.serialize_str(hex),
            Fingerprint::Of(body) => {
                let hex = digest_hex(&<sha2::Sha256 as sha2::Digest>::digest(body).into());
                // Hex digits are UTF-8.
                serializer.serialize_str(std::str::from_utf8(&hex).unwrap_or_default())
            }
        }
    }
}

/// Never the body: a prompt is not for debug output.
impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fingerprint::Hex(hex) => write!(f, "{hex}"),
            Fingerprint::Of(body) => write!(f, "sha256 of {} bytes", body.len()),
        }
    }
}

/// The current time as the audit log writes it.
pub fn now_rfc3339() -> String {
    Millis::of(jiff::Timestamp::now()).as_str().to_owned()
}

/// A time as the audit log writes it (`2026-11-30T04:14:51.123Z`), on the stack.
pub struct Millis {
    text: [u8; 40],
    len: usize,
}

impl Millis {
    pub fn of(ts: jiff::Timestamp) -> Millis {
        let mut millis = Millis {
            text: [0; 40],
            len: 0,
        };
        const PRINTER: jiff::fmt::temporal::DateTimePrinter =
            jiff::fmt::temporal::DateTimePrinter::new().precision(Some(3));
        // A timestamp prints in at most 33 bytes ("-009999-…"), which fit.
        let _ = PRINTER.print_timestamp(&ts, &mut millis);
        millis
    }

    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are ever written to it.
        std::str::from_utf8(&self.text[..self.len]).unwrap_or_default()
    }
}

impl jiff::fmt::Write for Millis {
    fn write_str(&mut self, s: &str) -> Result<(), jiff::Error> {
        let end = self.len + s.len();
        let Some(space) = self.text.get_mut(self.len..end) else {
            return Err(jiff::Error::from_args(format_args!("timestamp too long")));
        };
        space.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn serialize_millis<S: serde::Serializer>(
    ts: &jiff::Timestamp,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(Millis::of(*ts).as_str())
}

/// How the log is kept.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub dir: PathBuf,
    pub max_file_bytes: u64,
    /// Lines are written at once and fsynced at most this long after the oldest unsynced
    /// one, together with all written since: one disk flush per interval, not per request.
    pub commit_interval: std::time::Duration,
    pub hmac_key: Option<Secret<Vec<u8>>>,
    /// Keep a ledger snapshot; without, a start has to replay the whole log.
    pub snapshot: Option<SnapshotSettings>,
}

/// Where and how often the ledger snapshot is written.
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    pub path: PathBuf,
    pub interval: std::time::Duration,
    /// `budgets.timezone`, whose calendar the snapshot's windows follow, and the zone.
    pub timezone: String,
    pub tz: jiff::tz::TimeZone,
}

struct Queue {
    pending: Vec<Record>,
    closing: bool,
    /// The writer has stopped: nothing appended now would be written.
    closed: bool,
    /// Records queued since the log was opened, and how many of them are on disk.
    appended: u64,
    written: u64,
    /// The writer waits on `wake` and has not been woken since: only then does an append
    /// signal it (a busy writer takes the record with its next batch, and a signal costs
    /// a system call).
    idle: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Signalled when a batch is on disk, and when the writer stops.
    flushed: Condvar,
    /// The last write succeeded.
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
    records_total: IntCounter,
    write_errors_total: IntCounter,
    /// The writer thread's scheduling class.
    class: class::WriterClass,
}

/// The handle the proxy holds; cheap to share.
pub struct AuditLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot prepare the audit directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot recover the audit chain from {file}: {reason}")]
    Recover { file: PathBuf, reason: String },
}

impl AuditLog {
    /// Opens (or creates) the log in `settings.dir`, recovers the chain's tail, and starts
    /// the writer thread.
    pub fn open(
        settings: AuditSettings,
        records_total: IntCounter,
        write_errors_total: IntCounter,
    ) -> Result<AuditLog, AuditError> {
        Self::open_restoring(settings, records_total, write_errors_total).map(|(log, _)| log)
    }

    /// [`AuditLog::open`], and with `settings.snapshot` also the settled spend of the log
    /// (snapshot plus the lines after it), to rebuild the ledger from. The writer goes on
    /// from the same spend, so its snapshots stay exact.
    pub fn open_restoring(
        settings: AuditSettings,
        records_total: IntCounter,
        write_errors_total: IntCounter,
    ) -> Result<(AuditLog, Option<Restored>), AuditError> {
        let state = writer::recover(&settings)?;
        // After the recovery: a torn last line is gone, the chain's tail is the log's.
        let restored = match &settings.snapshot {
            Some(snapshot) => Some(restore::restore(&settings.dir, snapshot)?),
            None => None,
        };
        let snapshots = settings
            .snapshot
            .as_ref()
            .zip(restored.as_ref())
            .map(|(s, r)| {
                let seq = r.aggregate.seq();
                let stale = seq > 0 && r.snapshot_seq != Some(seq);
                writer::Snapshots::new(s, r.aggregate.clone(), stale)
            });
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                closing: false,
                closed: false,
                appended: 0,
                written: 0,
                idle: false,
            }),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
            records_total,
            write_errors_total,
            class: class::WriterClass::default(),
        });
        let thread_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer::run(thread_shared, settings, state, snapshots))
            .map_err(|source| AuditError::Dir {
                dir: PathBuf::from("(writer thread)"),
                source,
            })?;
        let log = AuditLog {
            shared,
            writer: Mutex::new(Some(writer)),
        };
        Ok((log, restored))
    }

    /// Queues a record. Never blocks on I/O and never drops the record.
    pub fn append(&self, record: Record) {
        let mut queue = lock(&self.shared.queue);
        if queue.closed {
            tracing::error!(
                request_id = ?record.request_id,
                "audit record after close, not written"
            );
            return;
        }
        queue.pending.push(record);
        queue.appended += 1;
        let queued = queue.pending.len();
        let idle = std::mem::take(&mut queue.idle);
        drop(queue);
        if idle {
            self.shared.wake.notify_one();
        }
        self.shared.class.queued(queued);
    }

    /// Whether new requests may be admitted: the last write succeeded and the writer is
    /// not far behind. `Err` says why not.
    pub fn accepting(&self) -> Result<(), String> {
        if !self.shared.healthy.load(Ordering::Acquire) {
            let why = lock(&self.shared.last_error).clone();
            return Err(why.unwrap_or_else(|| "write failed".into()));
        }
        if lock(&self.shared.queue).pending.len() >= MAX_QUEUED {
            return Err(format!("{MAX_QUEUED} records waiting to be written"));
        }
        Ok(())
    }

    /// Waits until every record queued before the call is written and fsynced, at most
    /// `timeout`; false if some are not (the writer is failing, stopped or slower). For a
    /// reader of the log in the same process, such as the demo's report; requests never
    /// wait on it.
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut queue = lock(&self.shared.queue);
        let target = queue.appended;
        while queue.written < target && !queue.closed {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            queue = self
                .shared
                .flushed
                .wait_timeout(queue, left)
                .map_or_else(|poisoned| poisoned.into_inner().0, |(q, _)| q);
        }
        queue.written >= target
    }

    /// Writes everything queued and stops the writer. Call it after the last request has
    /// settled (the server drained and its runtime dropped).
    pub fn close(&self) {
        lock(&self.shared.queue).closing = true;
        self.shared.wake.notify_one();
        // Take the handle out before joining: no lock is held while the writer finishes.
        let handle = lock(&self.writer).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the audit writer panicked");
            }
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The lock guards plain data with no invariant a panic could break.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A SHA-256 digest as lower-case hex, on the stack.
pub(crate) fn digest_hex(digest: &[u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in digest.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    out
}

/// The hash that chains a line: SHA-256 of its bytes up to and including `prev_hash`,
/// with the object closed (`…"prev_hash":"…"}`), or HMAC-SHA-256 of them with the key;
/// lower-case hex. The writer and every reader of the log hash through this one type.
#[derive(Clone)]
pub struct LineHasher {
    /// The HMAC state after the key, cloned per line (cheaper than keying it again).
    mac: Option<hmac::Hmac<sha2::Sha256>>,
}

impl LineHasher {
    pub fn new(key: Option<&[u8]>) -> LineHasher {
        use hmac::Mac;
        LineHasher {
            // HMAC takes keys of any length: `new_from_slice` cannot fail.
            mac: key.and_then(|k| hmac::Hmac::<sha2::Sha256>::new_from_slice(k).ok()),
        }
    }

    /// The hash of a line whose bytes up to `prev_hash`'s closing quote are `covered`:
    /// the `}` that closes the object is hashed after them, not written into them.
    pub fn hash(&self, covered: &[u8]) -> [u8; 64] {
        use hmac::Mac;
        use sha2::Digest;
        let digest: [u8; 32] = match &self.mac {
            Some(mac) => {
                let mut mac = mac.clone();
                mac.update(covered);
                mac.update(b"}");
                mac.finalize().into_bytes().into()
            }
            None => {
                let mut sha = sha2::Sha256::new();
                sha.update(covered);
                sha.update(b"}");
                sha.finalize().into()
            }
        };
        digest_hex(&digest)
    }
}

/// The audit files in `dir`, in chain order.
pub fn log_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    // Names carry the zero-padded sequence number of their first line.
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(name: &str) -> IntCounter {
        IntCounter::new(name, "test").unwrap()
    }

    fn open(dir: &Path, max_file_bytes: u64, key: Option<&[u8]>) -> AuditLog {
        open_with(
            dir,
            max_file_bytes,
            key,
            std::time::Duration::from_millis(1),
        )
        .0
    }

    fn open_with(
        dir: &Path,
        max_file_bytes: u64,
        key: Option<&[u8]>,
        commit_interval: std::time::Duration,
    ) -> (AuditLog, IntCounter) {
        let settings = AuditSettings {
            dir: dir.to_path_buf(),
            max_file_bytes,
            commit_interval,
            hmac_key: key.map(|k| Secret::new(k.to_vec())),
            snapshot: None,
        };
        let records = counter("records");
        let log = AuditLog::open(settings, records.clone(), counter("errors")).unwrap();
        (log, records)
    }

    fn record(i: u64) -> Record {
        Record {
            ts: jiff::Timestamp::now(),
            kind: "request",
            request_id: http::HeaderValue::from_str(&format!("req_{i}")).ok(),
            agent: Some("agent-a".into()),
            method: "POST".into(),
            path: "/openai/v1/chat/completions".into(),
            status: 200,
            outcome: "ok",
            input_tokens: i,
            cost_usd: i as f64 * 1e-6,
            ..Record::default()
        }
    }

    fn write(dir: &Path, range: std::ops::Range<u64>, max_file_bytes: u64) {
        let log = open(dir, max_file_bytes, None);
        for i in range {
            log.append(record(i));
        }
        log.close();
    }

    fn lines(dir: &Path) -> Vec<(PathBuf, Vec<String>)> {
        log_files(dir)
            .unwrap()
            .into_iter()
            .map(|f| {
                let text = std::fs::read_to_string(&f).unwrap();
                (f, text.lines().map(str::to_owned).collect())
            })
            .collect()
    }

    fn verify_dir(dir: &Path) -> Result<verify::Verified, verify::Broken> {
        verify::verify(&[dir.to_path_buf()], None)
    }

    #[test]
    fn times_are_written_in_rfc_3339_with_milliseconds() {
        for nanos in [
            0i128,
            1,
            999_999,
            1_000_000,
            1_764_474_891_123_456_789,
            4_102_444_799_999_000_000,
        ] {
            let ts = jiff::Timestamp::from_nanosecond(nanos).unwrap();
            let system = std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_nanos(u64::try_from(nanos).unwrap());
            let expected = humantime::format_rfc3339_millis(system).to_string();
            assert_eq!(Millis::of(ts).as_str(), expected, "{nanos} ns");
        }
        assert_eq!(
            Millis::of("2026-11-30T04:14:51.1239Z".parse().unwrap()).as_str(),
            "2026-11-30T04:14:51.123Z"
        );
    }

    #[test]
    fn records_chain_and_verify_across_restarts_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0..10, 2000);
        write(dir.path(), 10..25, 2000);
        let v = verify_dir(dir.path()).unwrap();
        assert_eq!(
            (v.records, v.first_seq, v.last_seq),
            (25, Some(1), Some(25))
        );
        assert!(v.files > 2, "rotation by size: {} files", v.files);
        let all = lines(dir.path());
        let first: serde_json::Value = serde_json::from_str(&all[0].1[0]).unwrap();
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev_hash"], GENESIS_HASH);
        assert_eq!(first["agent"], "agent-a");
        assert_eq!(first["request_id"], "req_0");
    }

    #[test]
    fn an_edited_line_is_found() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0..5, DEFAULT_MAX_FILE_BYTES);
        let (file, mut ls) = lines(dir.path()).remove(0);
        ls[2] = ls[2].replace("\"input_tokens\":2", "\"input_tokens\":9");
        std::fs::write(&file, ls.join("\n") + "\n").unwrap();
        let err = verify_dir(dir.path()).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.reason.contains("altered"), "{err}");
    }

    #[test]
    fn deleted_and_reordered_lines_are_found() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0..5, DEFAULT_MAX_FILE_BYTES);
        let (file, ls) = lines(dir.path()).remove(0);
        let mut deleted = ls.clone();
        deleted.remove(1);
        std::fs::write(&file, deleted.join("\n") + "\n").unwrap();
        let err = verify_dir(dir.path()).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.reason.contains("missing or out of order"), "{err}");

        let mut swapped = ls.clone();
        swapped.swap(2, 3);
        std::fs::write(&file, swapped.join("\n") + "\n").unwrap();
        let err = verify_dir(dir.path()).unwrap_err();
        assert_eq!(err.line, 3);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_at_start_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0..3, DEFAULT_MAX_FILE_BYTES);
        let (file, _) = lines(dir.path()).remove(0);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"seq\":4,\"ts\":\"20").unwrap();
        drop(f);
        assert!(verify_dir(dir.path()).unwrap_err().reason.contains("torn"));
        write(dir.path(), 3..5, DEFAULT_MAX_FILE_BYTES);
        let v = verify_dir(dir.path()).unwrap();
        assert_eq!((v.records, v.last_seq), (5, Some(5)));
    }

    #[test]
    fn with_an_hmac_key_the_key_is_needed_to_verify() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), DEFAULT_MAX_FILE_BYTES, Some(b"secret"));
        log.append(record(1));
        log.close();
        let paths = [dir.path().to_path_buf()];
        assert!(verify::verify(&paths, Some(b"secret")).is_ok());
        assert!(verify::verify(&paths, None).is_err());
        assert!(verify::verify(&paths, Some(b"wrong")).is_err());
    }

    #[test]
    fn lines_reach_the_file_at_once_and_one_fsync_at_the_interval_covers_them() {
        let dir = tempfile::tempdir().unwrap();
        let interval = std::time::Duration::from_secs(1);
        let (log, records) = open_with(dir.path(), DEFAULT_MAX_FILE_BYTES, None, interval);
        let started = std::time::Instant::now();
        log.append(record(1));
        // In the file (what a `kill -9` would leave) long before the fsync is due.
        let in_file = |n: usize| lines(dir.path()).first().is_some_and(|(_, l)| l.len() == n);
        while !in_file(1) {
            assert!(
                started.elapsed() < interval / 2,
                "the line waited for the fsync"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        log.append(record(2));
        while !in_file(2) {
            assert!(
                started.elapsed() < interval / 2,
                "the line waited for the fsync"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(records.get(), 0, "counted before its fsync");
        // Both are counted once the one fsync has run, at the interval after the first.
        assert!(log.flush(std::time::Duration::from_secs(10)));
        assert!(started.elapsed() >= interval, "fsynced before the interval");
        assert_eq!(records.get(), 2);
        log.close();
        assert_eq!(verify_dir(dir.path()).unwrap().records, 2);
    }

    #[test]
    fn flush_waits_for_what_was_queued_and_gives_up_at_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), DEFAULT_MAX_FILE_BYTES, None);
        assert!(log.flush(std::time::Duration::ZERO), "nothing queued");
        for i in 0..50 {
            log.append(record(i));
        }
        assert!(log.flush(std::time::Duration::from_secs(10)));
        // On disk and readable while the log stays open.
        assert_eq!(verify_dir(dir.path()).unwrap().records, 50);
        log.close();

        // A writer that cannot write: the wait ends at the timeout, saying so.
        let blocker = dir.path().join("audit-000000000051.jsonl");
        let log = open(dir.path(), 1, None);
        std::fs::create_dir(&blocker).unwrap();
        log.append(record(50));
        assert!(!log.flush(std::time::Duration::from_millis(100)));
        std::fs::remove_dir(&blocker).unwrap();
        assert!(log.flush(std::time::Duration::from_secs(10)));
        log.close();
        assert_eq!(verify_dir(dir.path()).unwrap().records, 51);
    }

    #[test]
    fn an_unwritable_dir_fails_closed_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 200, None);
        log.append(record(1));
        // Wait for the first write, then make rotation impossible.
        for _ in 0..200 {
            if !lines(dir.path()).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let blocker = dir.path().join("audit-000000000002.jsonl");
        std::fs::create_dir(&blocker).unwrap();
        log.append(record(2));
        let mut refused = false;
        for _ in 0..400 {
            if log.accepting().is_err() {
                refused = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(refused, "the log never reported the failed write");
        std::fs::remove_dir(&blocker).unwrap();
        for _ in 0..400 {
            if log.accepting().is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(log.accepting().is_ok(), "the log did not recover");
        log.close();
        assert_eq!(verify_dir(dir.path()).unwrap().records, 2);
    }
}
