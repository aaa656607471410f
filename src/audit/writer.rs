//! The writer thread: chain, append, fsync per batch, rotate, and recover the tail of the
//! chain at start (a torn last line from a crash is cut off, not fatal). It also keeps the
//! ledger snapshot, from the records it has made durable.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::standing::Fact;
use super::{
    lock, log_files, AuditError, AuditSettings, LineHasher, Record, Shared, SnapshotSettings,
    GENESIS_HASH,
};
use crate::ledger::snapshot::{spend_of, write_atomic, Aggregate};

/// Where the chain stands.
pub(super) struct ChainState {
    seq: u64,
    /// The hash of line `seq` (lower-case hex).
    prev: [u8; 64],
    file: Option<(File, PathBuf)>,
    /// Bytes in the current file, and how many of them are known to be on disk.
    size: u64,
    synced: u64,
    /// A failed write left bytes past `synced` that could not be cut off yet: nothing is
    /// written until they are, or a retry would write lines twice.
    cut_pending: bool,
}

/// How long a failing write waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// While lines wait for their fsync, records are taken from the queue at most this often.
const GATHER: Duration = Duration::from_millis(1);
/// Tries at shutdown before the writer gives up on a failing disk.
const RETRIES_AT_CLOSE: u32 = 10;

pub(super) fn recover(settings: &AuditSettings) -> Result<ChainState, AuditError> {
    let dir_err = |source| AuditError::Dir {
        dir: settings.dir.clone(),
        source,
    };
    std::fs::create_dir_all(&settings.dir).map_err(dir_err)?;
    let files = log_files(&settings.dir).map_err(dir_err)?;
    for path in files.iter().rev() {
        let recover_err = |reason: String| AuditError::Recover {
            file: path.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| recover_err(e.to_string()))?;
        let good_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if good_len < bytes.len() {
            tracing::warn!(
                file = %path.display(),
                torn_bytes = bytes.len() - good_len,
                "audit log ends in a torn line (a crash mid-write); cutting it off"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| recover_err(e.to_string()))?;
            file.set_len(good_len as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| recover_err(e.to_string()))?;
        }
        let Some(last) = bytes[..good_len]
            .strip_suffix(b"\n")
            .map(|b| b.rsplit(|&c| c == b'\n').next().unwrap_or(b))
        else {
            // An empty file (perhaps made so by the cut above): the tail of the chain is
            // in the one before, and a stale name must not claim a sequence number.
            std::fs::remove_file(path).map_err(|e| recover_err(e.to_string()))?;
            continue;
        };
        let value: serde_json::Value = serde_json::from_slice(last)
            .map_err(|e| recover_err(format!("last line is not JSON: {e}")))?;
        let seq = value["seq"]
            .as_u64()
            .ok_or_else(|| recover_err("no seq".into()))?;
        let hash = value["hash"]
            .as_str()
            .and_then(|h| <[u8; 64]>::try_from(h.as_bytes()).ok())
            .ok_or_else(|| recover_err("no hash of 64 hex digits".into()))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| recover_err(e.to_string()))?;
        // The last run may have stopped before its last fsync: what it left is made
        // durable before any line follows it (or a snapshot counts it).
        file.sync_all().map_err(|e| recover_err(e.to_string()))?;
        return Ok(ChainState {
            seq,
            prev: hash,
            file: Some((file, path.clone())),
            size: good_len as u64,
            synced: good_len as u64,
            cut_pending: false,
        });
    }
    Ok(ChainState {
        seq: 0,
        prev: genesis(),
        file: None,
        size: 0,
        synced: 0,
        cut_pending: false,
    })
}

fn genesis() -> [u8; 64] {
    let mut hash = [b'0'; 64];
    hash.copy_from_slice(GENESIS_HASH.as_bytes());
    hash
}

/// Appends one record to `out` as a chained line,
/// `{"seq":N,<record fields>,"prev_hash":"…","hash":"…"}` and a newline, and returns its
/// hash, which covers every byte before `,"hash"` with the object closed.
pub(super) fn encode_line(
    record: &Record,
    seq: u64,
    prev: &[u8; 64],
    hasher: &LineHasher,
    out: &mut Vec<u8>,
) -> [u8; 64] {
    let begin = out.len();
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    // The record's own object goes on in place: its `{` becomes the comma after `seq`.
    let start = out.len();
    let fields = serde_json::to_writer(&mut *out, record).is_ok() && out.len() > start + 2;
    if fields {
        out[start] = b',';
        out.pop();
    } else {
        // `{}`, or a record that could not be written: the line holds no fields.
        out.truncate(start);
    }
    out.extend_from_slice(b",\"prev_hash\":\"");
    out.extend_from_slice(prev);
    out.push(b'"');
    let hash = hasher.hash(&out[begin..]);
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(&hash);
    out.extend_from_slice(b"\"}\n");
    hash
}

/// The ledger snapshot the writer keeps: the spend of every line it has made durable.
pub(super) struct Snapshots {
    aggregate: Aggregate,
    path: PathBuf,
    interval: Duration,
    /// When a snapshot was last written or tried.
    last: Instant,
    /// Lines were folded since.
    dirty: bool,
}

impl Snapshots {
    /// Goes on from `aggregate`, the log as it is at start; `stale` when the snapshot on
    /// disk does not cover all of it (the start read lines past it, or had none), so the
    /// next start need not read them again.
    pub(super) fn new(settings: &SnapshotSettings, aggregate: Aggregate, stale: bool) -> Snapshots {
        Snapshots {
            aggregate,
            path: settings.path.clone(),
            interval: settings.interval,
            last: Instant::now(),
            dirty: stale,
        }
    }

    /// How long until a snapshot is due; `None` while there is nothing new to write.
    fn due_in(&self) -> Option<Duration> {
        self.dirty
            .then(|| self.interval.saturating_sub(self.last.elapsed()))
    }

    /// Adds a batch that is on disk and ends with line `seq`, of hash `hash`.
    fn fold<'a>(&mut self, batch: impl Iterator<Item = &'a Record>, seq: u64, hash: &str) {
        for record in batch {
            // Only run lines are read for their time (a stop's).
            let ts = (record.kind == "run").then(|| super::Millis::of(record.ts));
            self.aggregate.note(&Fact {
                kind: record.kind,
                agent: record.agent.as_deref(),
                run: record.run.as_deref(),
                outcome: record.outcome,
                reason: &record.reason,
                detail: record.detail.as_deref(),
                ts: ts.as_ref().map_or("", super::Millis::as_str),
                outcome_kind: record.outcome_kind.as_deref(),
            });
            let Some(agent) = record.agent.as_deref() else {
                continue;
            };
            let spend = spend_of(
                record.input_tokens,
                record.cached_input_tokens,
                record.cache_write_tokens,
                record.output_tokens,
                record.cost_usd,
            );
            self.aggregate.fold(agent, record.ts, spend);
        }
        self.aggregate.advance(seq, hash);
        self.dirty = true;
    }

    /// Writes the snapshot. A failure costs only a longer replay at the next start (the
    /// log is the truth): it is logged and tried again an interval later.
    fn write(&mut self) {
        self.last = Instant::now();
        // Stops no start would restore any more need not be carried on.
        if let Ok(cutoff) =
            jiff::Timestamp::now().checked_sub(crate::guard::runs::STOPPED_RETENTION)
        {
            self.aggregate.forget_stops_before(cutoff);
        }
        match write_atomic(&self.path, &self.aggregate.to_json()) {
            Ok(()) => self.dirty = false,
            Err(e) => tracing::warn!(
                file = %self.path.display(),
                seq = self.aggregate.seq(),
                "cannot write the ledger snapshot ({e}); trying again in {}",
                humantime::format_duration(self.interval)
            ),
        }
    }

    fn write_if_dirty(&mut self) {
        if self.dirty {
            self.write();
        }
    }
}

/// Lines handed to the file since it was last fsynced, with their records. A failed write
/// or fsync rewrites them all; once synced they are counted, and only then folded into
/// the snapshot. Their bytes are in one buffer, kept from batch to batch.
#[derive(Default)]
struct Unsynced {
    /// The lines' bytes, one after the other.
    bytes: Vec<u8>,
    lines: Vec<Line>,
    /// How many of `lines` the file holds, and their bytes.
    in_file: usize,
    in_file_bytes: usize,
    /// When the oldest of them was written.
    since: Option<Instant>,
}

/// A chained line (its length in [`Unsynced::bytes`] and its hash) and the record it
/// was made from.
struct Line {
    len: usize,
    hash: [u8; 64],
    record: Record,
}

/// Lines now on disk for good, in order, and the seq of the last of them.
#[derive(Default)]
struct Durable {
    lines: Vec<Line>,
    last_seq: u64,
}

impl Unsynced {
    /// How long until their fsync is due; `None` when there are none.
    fn due_in(&self, interval: Duration) -> Option<Duration> {
        self.since.map(|t| interval.saturating_sub(t.elapsed()))
    }
}

/// Group commit: each batch is written as soon as the writer takes it, so a crash of the
/// process (`kill -9`) loses only what is still queued (at most [`GATHER`] of records);
/// the fsync that makes the lines survive a power cut comes at most `commit_interval`
/// after the oldest unsynced one, and covers every line written meanwhile.
pub(super) fn run(
    shared: Arc<Shared>,
    settings: AuditSettings,
    mut state: ChainState,
    mut snapshots: Option<Snapshots>,
) {
    let hasher = LineHasher::new(settings.hmac_key.as_ref().map(|k| k.expose().as_slice()));
    let mut unsynced = Unsynced::default();
    // The batch taken from the queue, emptied and given back to it next time: neither
    // side allocates a queue per batch.
    let mut batch: Vec<Record> = Vec::new();
    let mut durable = Durable::default();
    let mut last_take = Instant::now();
    shared.class.enter();
    loop {
        let closing = {
            let mut queue = lock(&shared.queue);
            while !queue.closing {
                // Wake when records are to be taken, an fsync or a snapshot is due. While
                // lines wait for their fsync, records are taken at most every `GATHER`,
                // not as each comes: each take is a wake and a write on the proxy's core,
                // which cost more than the record. With nothing unsynced, the first
                // record is taken at once.
                let sync = unsynced.due_in(settings.commit_interval);
                let take = if queue.pending.is_empty() {
                    // A writer with lines unsynced is not signalled: it looks again.
                    sync.map(|_| GATHER)
                } else if sync.is_some() {
                    Some(GATHER.saturating_sub(last_take.elapsed()))
                } else {
                    Some(Duration::ZERO)
                };
                let snapshot = snapshots.as_ref().and_then(Snapshots::due_in);
                let wait = sync.into_iter().chain(snapshot).chain(take).min();
                queue.idle = sync.is_none();
                match wait {
                    Some(wait) if wait.is_zero() => break,
                    Some(wait) => {
                        queue = shared
                            .wake
                            .wait_timeout(queue, wait)
                            .map_or_else(|poisoned| poisoned.into_inner().0, |(q, _)| q);
                    }
                    None => {
                        queue = shared
                            .wake
                            .wait(queue)
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                    }
                }
            }
            queue.idle = false;
            std::mem::swap(&mut queue.pending, &mut batch);
            last_take = Instant::now();
            queue.closing
        };

        shared.class.taken(batch.len());
        for record in batch.drain(..) {
            let seq = state.seq + 1;
            let before = unsynced.bytes.len();
            let hash = encode_line(&record, seq, &state.prev, &hasher, &mut unsynced.bytes);
            state.seq = seq;
            state.prev = hash;
            unsynced.lines.push(Line {
                len: unsynced.bytes.len() - before,
                hash,
                record,
            });
        }
        let sync_due = closing
            || settings.commit_interval.is_zero()
            || unsynced.due_in(settings.commit_interval) == Some(Duration::ZERO);
        if !unsynced.lines.is_empty() {
            let gave_up = write_until_done(
                &shared,
                &settings,
                &mut state,
                &mut unsynced,
                &mut durable,
                sync_due,
                closing,
            );
            // Lines a rotation made durable count even when the writer then gives up.
            done(&shared, &mut snapshots, &mut durable);
            if gave_up {
                // Shut down with lines that would not go to disk.
                lock(&shared.queue).closed = true;
                shared.flushed.notify_all();
                // Still exact: it holds no line that failed.
                if let Some(snapshots) = snapshots.as_mut() {
                    snapshots.write_if_dirty();
                }
                return;
            }
        }
        if let Some(snapshots) = snapshots.as_mut() {
            if snapshots.due_in() == Some(Duration::ZERO) {
                snapshots.write();
            }
        }
        if closing && unsynced.lines.is_empty() {
            let mut queue = lock(&shared.queue);
            if queue.pending.is_empty() {
                // Marked under the lock: nothing can be appended after the last batch.
                queue.closed = true;
                drop(queue);
                shared.flushed.notify_all();
                // The last snapshot covers the whole log: the next start replays nothing.
                if let Some(snapshots) = snapshots.as_mut() {
                    snapshots.write_if_dirty();
                }
                return;
            }
        }
    }
}

/// Writes the unsynced lines, and fsyncs them when `sync`, trying again until it works.
/// The records now on disk for good (a rotation syncs the file it leaves) move to
/// `durable`. Returns whether the writer gave up, at shutdown, on the rest.
fn write_until_done(
    shared: &Shared,
    settings: &AuditSettings,
    state: &mut ChainState,
    unsynced: &mut Unsynced,
    durable: &mut Durable,
    sync: bool,
    closing: bool,
) -> bool {
    let mut tries = 0;
    loop {
        match write_lines(state, settings, unsynced, sync, durable) {
            Ok(()) => break,
            Err(e) => {
                tries += 1;
                shared.write_errors_total.inc();
                let message = format!("cannot write the audit log: {e}");
                if shared.healthy.swap(false, Ordering::AcqRel) {
                    tracing::error!("{message}; refusing new requests until it recovers");
                }
                *lock(&shared.last_error) = Some(message);
                // Shutdown may begin while this batch is failing: look again each time.
                let closing = closing || lock(&shared.queue).closing;
                if closing && tries >= RETRIES_AT_CLOSE {
                    tracing::error!(
                        lost = unsynced.lines.len(),
                        "giving up on the audit log at shutdown"
                    );
                    return true;
                }
                std::thread::sleep(RETRY_AFTER);
            }
        }
    }
    if !shared.healthy.swap(true, Ordering::AcqRel) {
        tracing::info!("the audit log is writable again");
        *lock(&shared.last_error) = None;
    }
    false
}

/// Counts records that are on disk for good, wakes whoever waits for them, and folds
/// them into the snapshot: a snapshot never counts a line the log could lose. Leaves
/// `durable` empty.
fn done(shared: &Shared, snapshots: &mut Option<Snapshots>, durable: &mut Durable) {
    let Some(last) = durable.lines.last() else {
        return;
    };
    let count = durable.lines.len() as u64;
    shared.records_total.inc_by(count);
    lock(&shared.queue).written += count;
    shared.flushed.notify_all();
    if let Some(snapshots) = snapshots.as_mut() {
        snapshots.fold(
            durable.lines.iter().map(|l| &l.record),
            durable.last_seq,
            std::str::from_utf8(&last.hash).unwrap_or_default(),
        );
    }
    durable.lines.clear();
}

/// Appends the lines the file does not hold yet, a file at a time: a file is rotated once
/// it holds `max_file_bytes` (a single larger line still gets a file of its own), after an
/// fsync of the one it leaves. With `sync`, the current file is fsynced at the end. Lines
/// that reach disk for good move, with their records, to `durable`. On failure the file
/// is cut back to its last synced size and every unsynced line will be written again, so
/// a retry can neither leave half a write nor write a line twice.
fn write_lines(
    state: &mut ChainState,
    settings: &AuditSettings,
    unsynced: &mut Unsynced,
    sync: bool,
    durable: &mut Durable,
) -> std::io::Result<()> {
    if state.cut_pending {
        cut_back(state)?;
    }
    let result = append_and_sync(state, settings, unsynced, sync, durable);
    if result.is_err() {
        state.size = state.synced;
        unsynced.in_file = 0;
        unsynced.in_file_bytes = 0;
        state.cut_pending = true;
        // If this fails too, the next try begins with it.
        let _ = cut_back(state);
    }
    result
}

/// Cuts the current file back to its last synced size: the unsynced lines will be
/// written again. A file that holds nothing synced goes, so that no empty file's name
/// claims a sequence number.
fn cut_back(state: &mut ChainState) -> std::io::Result<()> {
    if let Some((file, path)) = state.file.as_ref() {
        if state.synced == 0 {
            std::fs::remove_file(path)?;
            state.file = None;
        } else {
            file.set_len(state.synced)?;
        }
    }
    state.cut_pending = false;
    Ok(())
}

fn append_and_sync(
    state: &mut ChainState,
    settings: &AuditSettings,
    unsynced: &mut Unsynced,
    sync: bool,
    durable: &mut Durable,
) -> std::io::Result<()> {
    while unsynced.in_file < unsynced.lines.len() {
        let next_len = unsynced.lines[unsynced.in_file].len as u64;
        let full = state.size > 0 && state.size + next_len > settings.max_file_bytes;
        if full {
            // The lines in the file it leaves are on disk before the next file begins.
            sync_file(state, unsynced, durable)?;
        }
        if state.file.is_none() || full {
            let first_seq = state.seq + 1 - (unsynced.lines.len() - unsynced.in_file) as u64;
            let path = settings.dir.join(format!("audit-{first_seq:012}.jsonl"));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let size = file.metadata()?.len();
            if let Ok(dir) = File::open(&settings.dir) {
                // Make the new file's name durable too.
                let _ = dir.sync_all();
            }
            state.file = Some((file, path));
            state.size = size;
            state.synced = size;
        }
        let mut len = 0;
        let mut take = 0;
        for line in &unsynced.lines[unsynced.in_file..] {
            let fits = state.size + (len + line.len) as u64 <= settings.max_file_bytes;
            if take > 0 && !fits {
                break;
            }
            len += line.len;
            take += 1;
        }
        let Some((file, _)) = state.file.as_mut() else {
            return Err(std::io::Error::other("no audit file"));
        };
        let from = unsynced.in_file_bytes;
        file.write_all(&unsynced.bytes[from..from + len])?;
        unsynced.since.get_or_insert_with(Instant::now);
        state.size += len as u64;
        unsynced.in_file += take;
        unsynced.in_file_bytes += len;
    }
    if sync {
        sync_file(state, unsynced, durable)?;
    }
    Ok(())
}

/// Fsyncs the current file: the lines it holds are on disk for good.
fn sync_file(
    state: &mut ChainState,
    unsynced: &mut Unsynced,
    durable: &mut Durable,
) -> std::io::Result<()> {
    let Some((file, _)) = state.file.as_ref() else {
        return Ok(());
    };
    if unsynced.in_file == 0 {
        return Ok(());
    }
    file.sync_data()?;
    state.synced = state.size;
    durable
        .lines
        .extend(unsynced.lines.drain(..unsynced.in_file));
    unsynced.bytes.drain(..unsynced.in_file_bytes);
    durable.last_seq = state.seq - unsynced.lines.len() as u64;
    unsynced.in_file = 0;
    unsynced.in_file_bytes = 0;
    unsynced.since = (!unsynced.lines.is_empty()).then(Instant::now);
    Ok(())
}
