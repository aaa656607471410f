//! Settled spend at start: the ledger snapshot, if it belongs to this log, plus the audit
//! lines written after it; else every line of the log.
//!
//! Runs after the writer's recovery has cut a torn last line, so every line read here is
//! one the chain goes on from.

use std::path::{Path, PathBuf};

use crate::ledger::snapshot::{Aggregate, AuditLine};

use super::{log_files, AuditError, SnapshotSettings};

/// What a start rebuilds budgets from.
#[derive(Debug)]
pub struct Restored {
    /// The spend of every line of the log, up to its last.
    pub aggregate: Aggregate,
    /// The sequence number of the snapshot used, if one was.
    pub snapshot_seq: Option<u64>,
    /// Audit lines read on top of the snapshot (all of them without one).
    pub lines: u64,
}

pub(super) fn restore(dir: &Path, settings: &SnapshotSettings) -> Result<Restored, AuditError> {
    let files = log_files(dir).map_err(|source| AuditError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let fresh = || Aggregate::new(&settings.timezone, settings.tz.clone());
    let snapshot = match std::fs::read(&settings.path) {
        Ok(bytes) => match Aggregate::from_json(&bytes, &settings.timezone, settings.tz.clone()) {
            Ok(aggregate) => Some(aggregate),
            Err(e) => {
                tracing::warn!(
                    file = %settings.path.display(),
                    "ignoring the ledger snapshot ({e}); replaying the whole audit log"
                );
                None
            }
        },
        // A first start has neither; a log without a snapshot is worth a word.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !files.is_empty() {
                tracing::warn!(
                    file = %settings.path.display(),
                    "no ledger snapshot; replaying the whole audit log"
                );
            }
            None
        }
        Err(e) => {
            tracing::warn!(
                file = %settings.path.display(),
                "cannot read the ledger snapshot ({e}); replaying the whole audit log"
            );
            None
        }
    };
    if let Some(snapshot) = snapshot {
        let seq = snapshot.seq();
        match replay(&files, snapshot)? {
            Ok((aggregate, lines)) => {
                return Ok(Restored {
                    aggregate,
                    snapshot_seq: Some(seq),
                    lines,
                })
            }
            Err(why) => tracing::warn!(
                file = %settings.path.display(),
                "ignoring the ledger snapshot at seq {seq}: {why}; replaying the whole audit log"
            ),
        }
    }
    match replay(&files, fresh())? {
        Ok((aggregate, lines)) => Ok(Restored {
            aggregate,
            snapshot_seq: None,
            lines,
        }),
        // A fresh aggregate is at seq 0, which every log holds.
        Err(why) => Err(AuditError::Recover {
            file: dir.to_path_buf(),
            reason: why,
        }),
    }
}

/// The sequence number a file's name says its first line has.
fn first_seq(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("audit-")?
        .strip_suffix(".jsonl")?
        .parse()
        .ok()
}

/// Folds the lines after `aggregate.seq()` into it. The inner `Err` says why the
/// aggregate does not belong to this log: the log does not hold its last line, or holds
/// another line there (a log replaced or rewritten since the snapshot).
fn replay(
    files: &[PathBuf],
    mut aggregate: Aggregate,
) -> Result<Result<(Aggregate, u64), String>, AuditError> {
    let from = aggregate.seq();
    let want_hash = aggregate.hash().to_owned();
    // Start at the file holding line `from`: files before it hold only older lines.
    let start = if from == 0 {
        0
    } else {
        files
            .iter()
            .rposition(|f| first_seq(f).is_some_and(|first| first <= from))
            .unwrap_or(0)
    };
    let mut found = from == 0;
    let mut lines = 0;
    let mut last_seq = 0;
    for file in &files[start..] {
        let bytes = std::fs::read(file).map_err(|e| AuditError::Recover {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        // Only whole lines: the same rule as the writer's recovery, should a crash have
        // torn a line that recovery did not see (it runs first, so none is expected).
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in bytes[..whole]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
        {
            let Some(line) = AuditLine::parse(line) else {
                continue;
            };
            last_seq = line.seq;
            if line.seq <= from {
                if line.seq == from {
                    if line.hash != want_hash {
                        return Ok(Err(format!(
                            "line {from} of the audit log is not the one it was taken at"
                        )));
                    }
                    found = true;
                }
                continue;
            }
            line.fold_into(&mut aggregate);
            lines += 1;
        }
    }
    if !found {
        return Ok(Err(format!(
            "the audit log does not hold line {from} (its last is {last_seq})"
        )));
    }
    Ok(Ok((aggregate, lines)))
}
