//! What the audit log says stands after its last line, besides spend: the runs stopped
//! and not resumed since, the outcome kinds each agent has reported, and the pauses.
//!
//! A start restores these from the ledger snapshot plus the lines after it, in the same
//! single pass that restores spend: the writer folds each durable line into the
//! snapshot's [`Standing`] as it folds its spend, and a replay folds each line read the
//! same way, through [`Standing::fold`]. So a start reads only the lines written since
//! the last snapshot, however long the log.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The fields of an audit line that change what stands; borrowed from a record being
/// written or from a line being read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fact<'a> {
    pub kind: &'a str,
    pub agent: Option<&'a str>,
    pub run: Option<&'a str>,
    pub outcome: &'a str,
    pub reason: &'a str,
    pub detail: Option<&'a str>,
    pub ts: &'a str,
    pub outcome_kind: Option<&'a str>,
}

/// A run's stop, as its `run` line wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stop {
    /// The condition crossed (`max_repeats`, …, or `admin`).
    pub condition: String,
    pub message: String,
    /// When it was stopped, RFC 3339.
    pub at: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Standing {
    /// Agent → run → its stop.
    #[serde(default)]
    pub stopped_runs: BTreeMap<String, BTreeMap<String, Stop>>,
    /// Agent → the outcome kinds it has reported.
    #[serde(default)]
    pub outcome_kinds: BTreeMap<String, BTreeSet<String>>,
    #[serde(default)]
    pub pause_all: bool,
    /// Agents paused one by one.
    #[serde(default)]
    pub paused: BTreeSet<String>,
}

impl Standing {
    /// Takes one line into account. Lines that change nothing here (requests, most admin
    /// lines) cost two string comparisons.
    pub fn fold(&mut self, fact: &Fact<'_>) {
        match fact.kind {
            "run" => {
                let (Some(agent), Some(run)) = (fact.agent, fact.run) else {
                    return;
                };
                match fact.outcome {
                    "stopped" => {
                        let stop = Stop {
                            condition: fact.reason.to_owned(),
                            message: fact.detail.unwrap_or_default().to_owned(),
                            at: fact.ts.to_owned(),
                        };
                        self.stopped_runs
                            .entry(agent.to_owned())
                            .or_default()
                            .insert(run.to_owned(), stop);
                    }
                    "resumed" => {
                        if let Some(runs) = self.stopped_runs.get_mut(agent) {
                            runs.remove(run);
                            if runs.is_empty() {
                                self.stopped_runs.remove(agent);
                            }
                        }
                    }
                    _ => {}
                }
            }
            "outcome" => {
                if let (Some(agent), Some(kind)) = (fact.agent, fact.outcome_kind) {
                    let kinds = self.outcome_kinds.entry(agent.to_owned()).or_default();
                    if !kinds.contains(kind) {
                        kinds.insert(kind.to_owned());
                    }
                }
            }
            "admin" if fact.outcome == "ok" => match (fact.reason, fact.agent) {
                ("pause_all", _) => self.pause_all = true,
                ("resume_all", _) => self.pause_all = false,
                ("pause", Some(agent)) => {
                    self.paused.insert(agent.to_owned());
                }
                ("resume", Some(agent)) => {
                    self.paused.remove(agent);
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// Stopped runs, all agents.
    pub fn stopped_count(&self) -> usize {
        self.stopped_runs.values().map(BTreeMap::len).sum()
    }

    /// Forgets the stops made before `cutoff` (or whose time does not parse), which no
    /// start restores any more: the snapshot stays the size of what matters.
    pub fn forget_stops_before(&mut self, cutoff: jiff::Timestamp) {
        for runs in self.stopped_runs.values_mut() {
            runs.retain(|_, stop| {
                stop.at
                    .parse::<jiff::Timestamp>()
                    .is_ok_and(|at| at >= cutoff)
            });
        }
        self.stopped_runs.retain(|_, runs| !runs.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(outcome: &'static str, run: &'static str) -> Fact<'static> {
        Fact {
            kind: "run",
            agent: Some("a"),
            run: Some(run),
            outcome,
            reason: "max_repeats",
            detail: Some("the same request 3 times"),
            ts: "2026-11-29T10:00:00.000Z",
            ..Fact::default()
        }
    }

    fn admin(
        reason: &'static str,
        agent: Option<&'static str>,
        outcome: &'static str,
    ) -> Fact<'static> {
        Fact {
            kind: "admin",
            agent,
            outcome,
            reason,
            ..Fact::default()
        }
    }

    #[test]
    fn stops_kinds_and_pauses_follow_the_lines_in_order() {
        let mut s = Standing::default();
        s.fold(&run("stopped", "r1"));
        s.fold(&run("stopped", "r2"));
        s.fold(&run("warning", "r3"));
        s.fold(&run("resumed", "r1"));
        assert_eq!(s.stopped_count(), 1);
        let stop = &s.stopped_runs["a"]["r2"];
        assert_eq!(stop.condition, "max_repeats");
        assert_eq!(stop.message, "the same request 3 times");

        for kind in ["fixed", "fixed", "merged"] {
            s.fold(&Fact {
                kind: "outcome",
                agent: Some("a"),
                outcome_kind: Some(kind),
                ..Fact::default()
            });
        }
        assert_eq!(s.outcome_kinds["a"].len(), 2);

        s.fold(&admin("pause", Some("a"), "ok"));
        s.fold(&admin("pause", Some("b"), "ok"));
        s.fold(&admin("resume", Some("a"), "ok"));
        // A failed action changes nothing.
        s.fold(&admin("pause", Some("c"), "failed"));
        s.fold(&admin("pause_all", None, "ok"));
        assert!(s.pause_all);
        s.fold(&admin("resume_all", None, "ok"));
        assert!(!s.pause_all);
        assert_eq!(s.paused, BTreeSet::from(["b".to_owned()]));

        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Standing>(&json).unwrap(), s);

        s.fold(&Fact {
            ts: "2026-11-29T12:00:00.000Z",
            ..run("stopped", "r4")
        });
        s.forget_stops_before("2026-11-29T11:00:00Z".parse().unwrap());
        assert_eq!(s.stopped_count(), 1);
        assert!(s.stopped_runs["a"].contains_key("r4"));
    }
}
