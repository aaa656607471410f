//! Per-agent rate limits that live across requests and config reloads: requests per
//! minute (GCRA, from `governor`) and requests in flight. Tokens per minute are not here:
//! they are reserved and settled like a budget (see `ledger`), so a stream's real size
//! counts, not a guess.

pub mod anomaly;
mod fingerprint;
pub mod runs;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use governor::clock::{Clock, DefaultClock};
// Keyed by agent ids from the config: a fast hash, seeded per process.
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use hashbrown::HashMap;

#[derive(Default)]
pub struct Guards {
    /// Per agent: the quota the limiter was built for, and the limiter.
    per_minute: Mutex<HashMap<String, (u32, Arc<DefaultDirectRateLimiter>)>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

/// A place among an agent's requests in flight, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicU32>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Maps of handles: no invariant a panic could break.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Guards {
    /// Counts a request against `per_minute`; `Err` holds the seconds until one more
    /// would be allowed (at least 1).
    pub fn check_rate(&self, agent: &str, per_minute: u32) -> Result<(), u64> {
        let Some(quota) = NonZeroU32::new(per_minute) else {
            return Ok(());
        };
        let limiter = {
            let mut map = lock(&self.per_minute);
            match map.get(agent) {
                Some((q, limiter)) if *q == per_minute => limiter.clone(),
                _ => {
                    let limiter = Arc::new(RateLimiter::direct(Quota::per_minute(quota)));
                    map.insert(agent.to_owned(), (per_minute, limiter.clone()));
                    limiter
                }
            }
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// Takes a place among the agent's requests in flight, or `None` if `max` are.
    pub fn enter(&self, agent: &str, max: u32) -> Option<Slot> {
        let counter = lock(&self.in_flight).entry_ref(agent).or_default().clone();
        let before = counter.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(counter);
        (before < max).then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_allow_a_burst_then_say_when() {
        let g = Guards::default();
        for _ in 0..3 {
            assert!(g.check_rate("a", 3).is_ok());
        }
        let wait = g.check_rate("a", 3).unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        assert!(g.check_rate("b", 3).is_ok(), "per agent");
    }

    #[test]
    fn slots_are_given_back_when_dropped() {
        let g = Guards::default();
        let a = g.enter("a", 2).unwrap();
        let _b = g.enter("a", 2).unwrap();
        assert!(g.enter("a", 2).is_none());
        drop(a);
        assert!(g.enter("a", 2).is_some());
    }
}

/// The kill switches an admin throws: every agent at once, or one by one. They outlive
/// config reloads, and the audit log restores them at start.
#[derive(Debug, Default)]
pub struct Switches {
    all: std::sync::atomic::AtomicBool,
    agents: Mutex<std::collections::BTreeSet<String>>,
}

impl Switches {
    /// Whether `agent` may not send requests: `Some("all")` under pause-all,
    /// `Some("agent")` when it is paused itself.
    pub fn paused(&self, agent: &str) -> Option<&'static str> {
        if self.all.load(Ordering::Acquire) {
            Some("all")
        } else if lock(&self.agents).contains(agent) {
            Some("agent")
        } else {
            None
        }
    }

    /// Pauses or resumes every agent; returns whether this changed anything.
    pub fn set_all(&self, paused: bool) -> bool {
        self.all.swap(paused, Ordering::AcqRel) != paused
    }

    /// Pauses or resumes one agent; returns whether this changed anything.
    pub fn set_agent(&self, agent: &str, paused: bool) -> bool {
        let mut agents = lock(&self.agents);
        if paused {
            agents.insert(agent.to_owned())
        } else {
            agents.remove(agent)
        }
    }

    pub fn all_paused(&self) -> bool {
        self.all.load(Ordering::Acquire)
    }

    /// Agents paused one by one.
    pub fn paused_agents(&self) -> Vec<String> {
        lock(&self.agents).iter().cloned().collect()
    }
}

/// What an admin did to a kill switch, as the `reason` of its audit line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchAction {
    Pause,
    Resume,
    PauseAll,
    ResumeAll,
}

impl SwitchAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchAction::Pause => "pause",
            SwitchAction::Resume => "resume",
            SwitchAction::PauseAll => "pause_all",
            SwitchAction::ResumeAll => "resume_all",
        }
    }

    pub fn parse(s: &str) -> Option<SwitchAction> {
        [
            SwitchAction::Pause,
            SwitchAction::Resume,
            SwitchAction::PauseAll,
            SwitchAction::ResumeAll,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

impl Switches {
    /// Applies one admin action; returns whether it changed anything.
    pub fn apply(&self, action: SwitchAction, agent: Option<&str>) -> bool {
        match (action, agent) {
            (SwitchAction::PauseAll, _) => self.set_all(true),
            (SwitchAction::ResumeAll, _) => self.set_all(false),
            (SwitchAction::Pause, Some(agent)) => self.set_agent(agent, true),
            (SwitchAction::Resume, Some(agent)) => self.set_agent(agent, false),
            (SwitchAction::Pause | SwitchAction::Resume, None) => false,
        }
    }

    /// Restores the pauses the audit log left on (`pause`, `resume`, `pause_all`,
    /// `resume_all` admin lines), so that a pause survives a restart. Returns whether
    /// pause-all is on and how many agents are paused.
    pub fn restore(&self, standing: &crate::audit::standing::Standing) -> (bool, usize) {
        self.set_all(standing.pause_all);
        for agent in &standing.paused {
            self.set_agent(agent, true);
        }
        (self.all_paused(), lock(&self.agents).len())
    }
}

#[cfg(test)]
mod switch_tests {
    use super::*;
    use crate::audit::standing::Standing;

    #[test]
    fn pauses_are_restored_as_the_log_left_them() {
        let switches = Switches::default();
        switches.set_agent("stale", true);
        let standing = Standing {
            pause_all: true,
            paused: ["b".to_owned()].into(),
            ..Standing::default()
        };
        assert_eq!(switches.restore(&standing), (true, 2));
        assert_eq!(switches.paused("b"), Some("all"));
        assert_eq!(
            Switches::default().restore(&Standing::default()),
            (false, 0)
        );
    }
}
