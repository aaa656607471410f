//! The ledger's snapshot: the settled spend of every audit line up to one sequence
//! number, and what else those lines leave standing (stopped runs, outcome kinds,
//! pauses: [`crate::audit::standing`]), so that a start replays only the lines written
//! after it.
//!
//! The ledger's own state cannot be snapshotted: it moves with settlements, which reach
//! it before (or without) their audit line being durable, so it matches no point of the
//! log. Instead the audit writer folds each record into an [`Aggregate`] once its batch
//! is on disk; the aggregate then holds exactly the spend of lines `1..=seq`, and lines
//! past `seq` added on top give exactly what a full replay gives.
//!
//! Spend is kept per agent (the record's `agent`), per period, for the newest window of
//! that period only: at a start an older window is never the current one. Team budgets
//! are not kept: they are the sum of their agents under the config of the start that
//! restores, as a full replay computes them.
//!
//! The file is JSON, written beside the audit directory:
//!
//! ```json
//! {"version":1,"seq":42,"hash":"<hash of line 42>","timezone":"UTC",
//!  "agents":{"support-bot":{"day":{"window":1764374400,"tokens":1234,"nanos":5600000},
//!                           "total":{"window":0,"tokens":98765,"nanos":123400000}}},
//!  "standing":{"stopped_runs":{"support-bot":{"loop-7":{"condition":"max_repeats",
//!              "message":"…","at":"2026-11-29T10:00:00.000Z"}}},
//!              "outcome_kinds":{"support-bot":["ticket_resolved"]},
//!              "pause_all":false,"paused":["batch-bot"]}}
//! ```
//!
//! `window` is the start of the period's window in Unix seconds, `nanos` nano-dollars.
//! Nothing here knows of tokio or hyper; the one I/O is the atomic file write.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{cached_window, usd_to_nanos, Amount, Period, Window, PERIODS};
use crate::audit::standing::{Fact, Standing};

/// The format written; a file of another version is ignored (the log is replayed whole).
pub const VERSION: u32 = 2;
/// The snapshot's name in `storage.dir`.
pub const FILE_NAME: &str = "ledger-snapshot.json";

/// Settled spend in one window of one period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpend {
    /// Start of the window, Unix seconds (0 for `total`).
    pub window: i64,
    pub tokens: u64,
    pub nanos: u64,
}

impl WindowSpend {
    pub fn amount(&self) -> Amount {
        Amount {
            tokens: self.tokens,
            nanos: self.nanos,
        }
    }
}

/// What an audit line charges: every token kind billed (reasoning tokens are part of
/// output) and the cost. The same rule for the writer's records and for replayed lines.
pub fn spend_of(
    input_tokens: u64,
    cached_input_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
) -> Amount {
    Amount {
        tokens: input_tokens
            .saturating_add(cached_input_tokens)
            .saturating_add(cache_write_tokens)
            .saturating_add(output_tokens),
        nanos: usd_to_nanos(cost_usd),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a ledger snapshot: {0}")]
    Unreadable(String),
    #[error("format version {found}, this build reads {VERSION}")]
    Version { found: u32 },
    #[error("written for time zone {found:?}, budgets.timezone is {want:?}")]
    Timezone { found: String, want: String },
}

/// The spend of the audit log up to `seq`, per agent and period, newest window only.
#[derive(Debug, Clone)]
pub struct Aggregate {
    timezone: String,
    tz: TimeZone,
    seq: u64,
    hash: String,
    agents: BTreeMap<String, [Option<WindowSpend>; PERIODS]>,
    /// The window of each period last seen: records come in time order (nearly), so the
    /// calendar arithmetic runs once per window, not once per record.
    windows: [Option<Window>; PERIODS],
    standing: Standing,
}

/// The file's layout.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    seq: u64,
    hash: String,
    timezone: String,
    agents: BTreeMap<String, BTreeMap<Period, WindowSpend>>,
    standing: Standing,
}

/// Only the version, read first so that a later format is named as such rather than
/// as garbage.
#[derive(Deserialize)]
struct Version {
    version: u32,
}

impl Aggregate {
    /// Nothing folded yet: the state before the first audit line. `timezone` is the
    /// config's name for `tz`, kept in the file.
    pub fn new(timezone: &str, tz: TimeZone) -> Aggregate {
        Aggregate {
            timezone: timezone.to_owned(),
            tz,
            seq: 0,
            hash: String::new(),
            agents: BTreeMap::new(),
            windows: [None; PERIODS],
            standing: Standing::default(),
        }
    }

    /// The last audit line folded (0: none).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The hash of line `seq` (empty when `seq` is 0).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Adds the spend of one audit line of `agent`, settled at `at`. A line of an older
    /// window than the one kept is dropped: time has moved past it, so it cannot be
    /// current at a start; a line of a newer window starts that window afresh.
    pub fn fold(&mut self, agent: &str, at: Timestamp, spend: Amount) {
        if spend == Amount::default() {
            return;
        }
        let slots = match self.agents.get_mut(agent) {
            Some(slots) => slots,
            None => self.agents.entry(agent.to_owned()).or_default(),
        };
        for period in Period::ALL {
            let (window, _) = cached_window(&mut self.windows, period, at, &self.tz);
            let slot = &mut slots[period.index()];
            match slot {
                Some(kept) if kept.window == window => {
                    kept.tokens = kept.tokens.saturating_add(spend.tokens);
                    kept.nanos = kept.nanos.saturating_add(spend.nanos);
                }
                Some(kept) if kept.window > window => {}
                _ => {
                    *slot = Some(WindowSpend {
                        window,
                        tokens: spend.tokens,
                        nanos: spend.nanos,
                    })
                }
            }
        }
    }

    /// Takes what a line leaves standing (a stop, an outcome kind, a pause).
    pub fn note(&mut self, fact: &Fact<'_>) {
        self.standing.fold(fact);
    }

    /// What the lines folded leave standing besides spend.
    pub fn standing(&self) -> &Standing {
        &self.standing
    }

    /// See [`Standing::forget_stops_before`].
    pub fn forget_stops_before(&mut self, cutoff: Timestamp) {
        self.standing.forget_stops_before(cutoff);
    }

    /// Marks every line up to `seq` (whose hash is `hash`) as folded.
    pub fn advance(&mut self, seq: u64, hash: &str) {
        self.seq = seq;
        hash.clone_into(&mut self.hash);
    }

    /// The newest window of `period` with spend of `agent`.
    pub fn spend(&self, agent: &str, period: Period) -> Option<WindowSpend> {
        self.agents.get(agent).and_then(|s| s[period.index()])
    }

    /// Every agent with spend.
    pub fn agents(&self) -> impl Iterator<Item = &str> {
        self.agents.keys().map(String::as_str)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let file = File {
            version: VERSION,
            seq: self.seq,
            hash: self.hash.clone(),
            timezone: self.timezone.clone(),
            agents: self
                .agents
                .iter()
                .map(|(agent, slots)| {
                    let periods = Period::ALL
                        .into_iter()
                        .filter_map(|p| slots[p.index()].map(|s| (p, s)))
                        .collect();
                    (agent.clone(), periods)
                })
                .collect(),
            standing: self.standing.clone(),
        };
        // Plain data with string keys: serialising it cannot fail.
        serde_json::to_vec(&file).unwrap_or_default()
    }

    /// Reads a snapshot written for `timezone` (the windows it holds are calendar windows
    /// of that zone; under another they would be wrong).
    pub fn from_json(
        bytes: &[u8],
        timezone: &str,
        tz: TimeZone,
    ) -> Result<Aggregate, SnapshotError> {
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| SnapshotError::Unreadable(e.to_string()))?;
        if version.version != VERSION {
            return Err(SnapshotError::Version {
                found: version.version,
            });
        }
        let file: File =
            serde_json::from_slice(bytes).map_err(|e| SnapshotError::Unreadable(e.to_string()))?;
        if file.timezone != timezone {
            return Err(SnapshotError::Timezone {
                found: file.timezone,
                want: timezone.to_owned(),
            });
        }
        let mut aggregate = Aggregate::new(timezone, tz);
        aggregate.advance(file.seq, &file.hash);
        for (agent, periods) in file.agents {
            let mut slots = [None; PERIODS];
            for (period, spend) in periods {
                slots[period.index()] = Some(spend);
            }
            aggregate.agents.insert(agent, slots);
        }
        aggregate.standing = file.standing;
        Ok(aggregate)
    }
}

/// Replaces `path` with `bytes` so that a crash at any point leaves either the old file
/// or the new one, whole: write a temporary file beside it, fsync it, rename it over
/// `path`, fsync the directory so the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// The fields of one audit line that a start restores from: its spend, and what it
/// leaves standing.
#[derive(Debug, Deserialize)]
pub struct AuditLine<'a> {
    pub seq: u64,
    #[serde(borrow, default)]
    pub hash: Cow<'a, str>,
    #[serde(borrow, default)]
    pub ts: Cow<'a, str>,
    #[serde(borrow, default)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub agent: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub run: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub outcome: Cow<'a, str>,
    #[serde(borrow, default)]
    pub reason: Cow<'a, str>,
    #[serde(borrow, default)]
    pub detail: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub outcome_kind: Option<Cow<'a, str>>,
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
}

impl<'a> AuditLine<'a> {
    /// Parses a line of the audit log; `None` for one that is not an audit line.
    pub fn parse(line: &'a [u8]) -> Option<AuditLine<'a>> {
        serde_json::from_slice(line).ok()
    }

    pub fn spend(&self) -> Amount {
        spend_of(
            self.input_tokens,
            self.cached_input_tokens,
            self.cache_write_tokens,
            self.output_tokens,
            self.cost_usd,
        )
    }

    /// Folds this line into `aggregate` and advances it past the line.
    pub fn fold_into(&self, aggregate: &mut Aggregate) {
        if let (Some(agent), Ok(at)) = (self.agent.as_deref(), self.ts.parse::<Timestamp>()) {
            aggregate.fold(agent, at, self.spend());
        }
        aggregate.note(&Fact {
            kind: &self.kind,
            agent: self.agent.as_deref(),
            run: self.run.as_deref(),
            outcome: &self.outcome,
            reason: &self.reason,
            detail: self.detail.as_deref(),
            ts: &self.ts,
            outcome_kind: self.outcome_kind.as_deref(),
        });
        aggregate.advance(self.seq, &self.hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{BudgetKey, Ledger, Scope};
    use std::sync::Arc;

    struct Fixed(Timestamp);

    impl crate::ledger::Clock for Fixed {
        fn now(&self) -> Timestamp {
            self.0
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn tokens(n: u64) -> Amount {
        Amount {
            tokens: n,
            nanos: n * 10,
        }
    }

    fn second(s: &str) -> i64 {
        at(s).as_second()
    }

    #[test]
    fn a_newer_window_replaces_the_old_one_and_older_lines_are_dropped() {
        let mut a = Aggregate::new("UTC", TimeZone::UTC);
        a.fold("a", at("2026-11-29T23:59:30Z"), tokens(5));
        a.fold("a", at("2026-11-29T23:59:50Z"), tokens(2));
        a.fold("a", at("2026-11-30T00:00:10Z"), tokens(7)); // a new day, week, minute
        a.fold("a", at("2026-11-29T23:59:59Z"), tokens(100)); // settled late: dropped
        let day = a.spend("a", Period::Day).unwrap();
        assert_eq!(
            (day.window, day.tokens),
            (second("2026-11-30T00:00:00Z"), 7)
        );
        let week = a.spend("a", Period::Week).unwrap();
        assert_eq!(week.window, second("2026-11-30T00:00:00Z"), "a Monday");
        assert_eq!(week.tokens, 7);
        let month = a.spend("a", Period::Month).unwrap();
        assert_eq!(
            (month.window, month.tokens),
            (second("2026-11-01T00:00:00Z"), 114),
            "the month goes on: the late line is of an older minute, hour, day and week only"
        );
        let total = a.spend("a", Period::Total).unwrap();
        assert_eq!((total.window, total.tokens, total.nanos), (0, 114, 1140));
        assert!(a.spend("b", Period::Total).is_none());
    }

    #[test]
    fn nothing_spent_is_not_kept() {
        let mut a = Aggregate::new("UTC", TimeZone::UTC);
        a.fold("a", at("2026-11-29T10:00:00Z"), Amount::default());
        assert_eq!(a.agents().count(), 0);
    }

    #[test]
    fn the_file_round_trips_and_refuses_what_does_not_fit() {
        let mut a = Aggregate::new("Europe/Berlin", TimeZone::get("Europe/Berlin").unwrap());
        a.fold("a", at("2026-11-29T10:00:00Z"), tokens(5));
        a.fold("b", at("2026-11-29T10:00:00Z"), tokens(3));
        a.note(&Fact {
            kind: "admin",
            agent: Some("b"),
            outcome: "ok",
            reason: "pause",
            ..Fact::default()
        });
        a.advance(42, "abc");
        let json = a.to_json();
        let b = Aggregate::from_json(&json, "Europe/Berlin", TimeZone::UTC).unwrap();
        assert_eq!((b.seq(), b.hash()), (42, "abc"));
        assert_eq!(b.standing(), a.standing());
        assert!(b.standing().paused.contains("b"));
        for agent in ["a", "b"] {
            for p in Period::ALL {
                assert_eq!(a.spend(agent, p), b.spend(agent, p), "{agent} {p:?}");
            }
        }
        assert!(matches!(
            Aggregate::from_json(&json, "UTC", TimeZone::UTC),
            Err(SnapshotError::Timezone { .. })
        ));
        assert!(matches!(
            Aggregate::from_json(b"\x00garbage", "UTC", TimeZone::UTC),
            Err(SnapshotError::Unreadable(_))
        ));
        // A later format, and the first (spend only, nothing standing): both replayed.
        for other in [VERSION + 1, 1] {
            let text = String::from_utf8(json.clone()).unwrap().replace(
                &format!("\"version\":{VERSION}"),
                &format!("\"version\":{other}"),
            );
            assert!(matches!(
                Aggregate::from_json(text.as_bytes(), "Europe/Berlin", TimeZone::UTC),
                Err(SnapshotError::Version { found }) if found == other
            ));
        }
    }

    #[test]
    fn the_atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    /// Budgets of two agents of one team, every period.
    fn keys() -> Vec<(&'static str, Vec<BudgetKey>)> {
        ["a", "b"]
            .into_iter()
            .map(|agent| {
                let mut keys: Vec<BudgetKey> = Period::ALL
                    .into_iter()
                    .map(|period| BudgetKey {
                        scope: Scope::Agent,
                        id: agent.into(),
                        period,
                    })
                    .collect();
                keys.push(BudgetKey {
                    scope: Scope::Team,
                    id: "t".into(),
                    period: Period::Month,
                });
                keys.push(BudgetKey {
                    scope: Scope::Team,
                    id: "t".into(),
                    period: Period::Hour,
                });
                (agent, keys)
            })
            .collect()
    }

    /// The accounts with spend (a replayed line of no spend opens an empty account).
    fn spent(ledger: &Ledger) -> Vec<(BudgetKey, Amount)> {
        ledger
            .accounts()
            .into_iter()
            .filter(|(_, a)| a.spent != Amount::default())
            .map(|(k, a)| (k, a.spent))
            .collect()
    }

    /// The ledger a start at `now` builds from `aggregate`.
    fn ledger_from(aggregate: &Aggregate, now: Timestamp) -> Vec<(BudgetKey, Amount)> {
        let ledger = Ledger::new(TimeZone::UTC, Arc::new(Fixed(now)));
        for (agent, keys) in keys() {
            for key in keys {
                if let Some(s) = aggregate.spend(agent, key.period) {
                    ledger.restore(&key, s.amount(), s.window);
                }
            }
        }
        spent(&ledger)
    }

    /// What the replay of every line gives: each line counts toward the windows that
    /// contain it and are current at `now`.
    fn full_replay(
        lines: &[(u64, &str, Timestamp, Amount)],
        now: Timestamp,
    ) -> Vec<(BudgetKey, Amount)> {
        let ledger = Ledger::new(TimeZone::UTC, Arc::new(Fixed(now)));
        for (_, agent, at, spend) in lines {
            for (a, keys) in keys() {
                if a != *agent {
                    continue;
                }
                for key in keys {
                    let (window, _) = key.period.window(*at, &TimeZone::UTC);
                    ledger.restore(&key, *spend, window);
                }
            }
        }
        spent(&ledger)
    }

    #[test]
    fn a_snapshot_plus_the_lines_after_it_equals_a_full_replay() {
        // Lines every 7 minutes and a bit for two days, across an hour, day and month
        // boundary, some out of order by a few seconds as settlements are.
        let start = at("2026-11-29T22:00:00Z").as_second();
        let lines: Vec<(u64, &str, Timestamp, Amount)> = (0..400u64)
            .map(|i| {
                let jitter = if i % 5 == 0 { -20 } else { 0 };
                let t = Timestamp::from_second(start + i as i64 * 431 + jitter).unwrap();
                let agent = if i % 3 == 0 { "b" } else { "a" };
                (i + 1, agent, t, tokens(i % 17))
            })
            .collect();
        let last = lines.last().unwrap().2;
        for now in [
            last,
            Timestamp::from_second(last.as_second() + 5000).unwrap(),
        ] {
            let want = full_replay(&lines, now);
            for cut in [0usize, 1, 37, 200, 399, 400] {
                let mut before = Aggregate::new("UTC", TimeZone::UTC);
                for (seq, agent, at, spend) in &lines[..cut] {
                    before.fold(agent, *at, *spend);
                    before.advance(*seq, "h");
                }
                let mut restored =
                    Aggregate::from_json(&before.to_json(), "UTC", TimeZone::UTC).unwrap();
                assert_eq!(restored.seq(), cut as u64);
                for (seq, agent, at, spend) in &lines[cut..] {
                    restored.fold(agent, *at, *spend);
                    restored.advance(*seq, "h");
                }
                assert_eq!(ledger_from(&restored, now), want, "cut at {cut}, now {now}");
            }
        }
    }

    #[test]
    fn audit_lines_parse_with_the_replay_rule() {
        let line = br#"{"seq":7,"ts":"2026-11-29T10:00:00.123Z","agent":"a","input_tokens":3,"cached_input_tokens":1,"cache_write_tokens":2,"output_tokens":4,"reasoning_tokens":9,"cost_usd":0.5,"hash":"ff"}"#;
        let parsed = AuditLine::parse(line).unwrap();
        assert_eq!(
            parsed.spend(),
            Amount {
                tokens: 10,
                nanos: 500_000_000
            }
        );
        let mut a = Aggregate::new("UTC", TimeZone::UTC);
        parsed.fold_into(&mut a);
        assert_eq!((a.seq(), a.hash()), (7, "ff"));
        assert_eq!(a.spend("a", Period::Day).unwrap().tokens, 10);
        assert!(AuditLine::parse(b"{\"seq\":8,\"ts\":\"20").is_none());
    }
}
