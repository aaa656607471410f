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
    chain_hash, lock, log_files, AuditError, AuditSettings, Record, Shared, SnapshotSettings,
    GENESIS_HASH,
};
use crate::ledger::snapshot::{spend_of, write_atomic, Aggregate};

/// Where the chain stands.
pub(super) struct ChainState {
    seq: u64,
    prev: String,
    file: Option<(File, PathBuf)>,
    size: u64,
}

/// How long a failing write waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(500);
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
            .ok_or_else(|| recover_err("no hash".into()))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| recover_err(e.to_string()))?;
        return Ok(ChainState {
            seq,
            prev: hash.to_owned(),
            file: Some((file, path.clone())),
            size: good_len as u64,
        });
    }
    Ok(ChainState {
        seq: 0,
        prev: GENESIS_HASH.to_owned(),
        file: None,
        size: 0,
    })
}

/// Encodes one record as a chained line: `{"seq":N,<record fields>,"prev_hash":"…","hash":"…"}`.
/// The hash covers every byte before `,"hash"` with the object closed.
pub(super) fn encode_line(
    record: &Record,
    seq: u64,
    prev: &str,
    key: Option<&[u8]>,
) -> (Vec<u8>, String) {
    let body = serde_json::to_vec(record).unwrap_or_else(|_| b"{}".to_vec());
    let fields = body
        .get(1..body.len().saturating_sub(1))
        .unwrap_or_default();
    let mut line = Vec::with_capacity(body.len() + 180);
    line.extend_from_slice(b"{\"seq\":");
    line.extend_from_slice(seq.to_string().as_bytes());
    if !fields.is_empty() {
        line.push(b',');
        line.extend_from_slice(fields);
    }
    line.extend_from_slice(b",\"prev_hash\":\"");
    line.extend_from_slice(prev.as_bytes());
    line.extend_from_slice(b"\"}");
    let hash = chain_hash(key, &line);
    line.pop();
    line.extend_from_slice(b",\"hash\":\"");
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, hash)
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
    fn fold(&mut self, batch: &[Record], seq: u64, hash: &str) {
        for record in batch {
            self.aggregate.note(&Fact {
                kind: record.kind,
                agent: record.agent.as_deref(),
                run: record.run.as_deref(),
                outcome: record.outcome,
                reason: &record.reason,
                detail: record.detail.as_deref(),
                ts: &record.ts,
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
            // `ts` comes from `now_rfc3339`: it parses unless a record was built by hand,
            // and a replay of such a line would skip it just the same.
            if let Ok(at) = record.ts.parse::<jiff::Timestamp>() {
                self.aggregate.fold(agent, at, spend);
            }
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

pub(super) fn run(
    shared: Arc<Shared>,
    settings: AuditSettings,
    mut state: ChainState,
    mut snapshots: Option<Snapshots>,
) {
    let key = settings.hmac_key.as_ref().map(|k| k.expose().as_slice());
    loop {
        let (batch, closing) = {
            let mut queue = lock(&shared.queue);
            let mut snapshot_due = false;
            while queue.pending.is_empty() && !queue.closing {
                // Idle with lines not yet in a snapshot: wake when one is due.
                match snapshots.as_ref().and_then(Snapshots::due_in) {
                    Some(wait) if wait.is_zero() => {
                        snapshot_due = true;
                        break;
                    }
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
            if snapshot_due {
                drop(queue);
                if let Some(snapshots) = snapshots.as_mut() {
                    snapshots.write();
                }
                continue;
            }
            if !queue.closing && !settings.commit_interval.is_zero() {
                // Let the group grow: under load one fsync covers many requests.
                drop(queue);
                std::thread::sleep(settings.commit_interval);
                queue = lock(&shared.queue);
            }
            if queue.pending.is_empty() && queue.closing {
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
            (std::mem::take(&mut queue.pending), queue.closing)
        };

        let mut lines = Vec::with_capacity(batch.len());
        let mut prev = state.prev.clone();
        for (i, record) in batch.iter().enumerate() {
            let (line, hash) = encode_line(record, state.seq + 1 + i as u64, &prev, key);
            lines.push(line);
            prev = hash;
        }

        // Lines written so far, kept across retries so that none is written twice.
        let mut written = 0;
        let mut tries = 0;
        while written < lines.len() {
            match write_lines(&mut state, &settings, &lines, &mut written) {
                Ok(()) => {}
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
                            lost = lines.len() - written,
                            "giving up on the audit log at shutdown"
                        );
                        lock(&shared.queue).closed = true;
                        shared.flushed.notify_all();
                        // Still exact: it holds no line of the batch that failed.
                        if let Some(snapshots) = snapshots.as_mut() {
                            snapshots.write_if_dirty();
                        }
                        return;
                    }
                    std::thread::sleep(RETRY_AFTER);
                }
            }
        }
        state.seq += lines.len() as u64;
        state.prev = prev;
        shared.records_total.inc_by(batch.len() as u64);
        lock(&shared.queue).written += batch.len() as u64;
        shared.flushed.notify_all();
        if !shared.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!("the audit log is writable again");
            *lock(&shared.last_error) = None;
        }
        if let Some(snapshots) = snapshots.as_mut() {
            // Folded only now that the batch is durable: a snapshot never counts a line
            // the log could lose.
            snapshots.fold(&batch, state.seq, &state.prev);
            if snapshots.due_in() == Some(Duration::ZERO) {
                snapshots.write();
            }
        }
    }
}

/// Appends `lines[*written..]` and fsyncs, a file at a time: a file is rotated once it
/// holds `max_file_bytes` (a single larger line still gets a file of its own). On failure
/// the file is cut back to its last synced size, so a retry cannot leave half a write.
fn write_lines(
    state: &mut ChainState,
    settings: &AuditSettings,
    lines: &[Vec<u8>],
    written: &mut usize,
) -> std::io::Result<()> {
    while *written < lines.len() {
        let next_len = lines[*written].len() as u64;
        let full = state.size > 0 && state.size + next_len > settings.max_file_bytes;
        if state.file.is_none() || full {
            let first_seq = state.seq + 1 + *written as u64;
            let path = settings.dir.join(format!("audit-{first_seq:012}.jsonl"));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            let size = file.metadata()?.len();
            if let Ok(dir) = File::open(&settings.dir) {
                // Make the new file's name durable too.
                let _ = dir.sync_all();
            }
            state.file = Some((file, path));
            state.size = size;
        }
        let mut buf = Vec::new();
        let mut take = 0;
        for line in &lines[*written..] {
            let fits = state.size + (buf.len() + line.len()) as u64 <= settings.max_file_bytes;
            if take > 0 && !fits {
                break;
            }
            buf.extend_from_slice(line);
            take += 1;
        }
        let Some((file, _)) = state.file.as_mut() else {
            return Err(std::io::Error::other("no audit file"));
        };
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            let _ = file.set_len(state.size);
            if state.size == 0 {
                // Leave no empty file whose name claims a sequence number.
                if let Some((_, path)) = state.file.take() {
                    let _ = std::fs::remove_file(path);
                }
            }
            return Err(e);
        }
        state.size += buf.len() as u64;
        *written += take;
    }
    Ok(())
}
