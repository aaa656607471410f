//! Spikes against each agent's own baseline.
//!
//! Per agent, tokens are summed over fixed windows (`insights.anomaly_window`, a minute
//! by default). The baseline is an exponentially weighted mean of past windows (quiet
//! windows count as zero), with an exponentially weighted mean deviation beside it. A
//! window is a spike once its tokens pass `factor` times the baseline (and the deviation
//! band, and a floor, so that a quiet agent's first busy minute is not one): reported once
//! per window, as soon as it is crossed, not when the window ends.

use std::sync::Mutex;
use std::time::Duration;

// Keyed by agent ids from the config: a fast hash, seeded per process.
use hashbrown::HashMap;
use tokio::time::Instant;

/// Weight of the newest window in the baseline.
const ALPHA: f64 = 0.2;
/// Windows seen before an agent's baseline is trusted.
const WARMUP_WINDOWS: u64 = 5;

#[derive(Debug, Clone, Copy)]
pub struct AnomalySettings {
    pub window: Duration,
    /// A window past this many times the baseline is a spike.
    pub factor: f64,
    /// Nor is any window under this many tokens.
    pub min_tokens: u64,
}

#[derive(Debug)]
struct Baseline {
    /// Start of the current window.
    start: Instant,
    tokens: u64,
    mean: f64,
    deviation: f64,
    windows: u64,
    reported: bool,
}

/// A window that crossed its agent's baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Spike {
    pub tokens: u64,
    pub baseline: f64,
    pub deviation: f64,
}

impl std::fmt::Display for Spike {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens in this window against a baseline of {:.0} (deviation {:.0})",
            self.tokens, self.baseline, self.deviation
        )
    }
}

#[derive(Debug, Default)]
pub struct Anomalies {
    agents: Mutex<HashMap<String, Baseline>>,
}

impl Anomalies {
    /// Counts `tokens` settled for `agent` now; a spike the first time its window crosses.
    pub fn observe(&self, settings: &AnomalySettings, agent: &str, tokens: u64) -> Option<Spike> {
        let now = Instant::now();
        let window = settings.window.max(Duration::from_millis(1));
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let b = agents.entry_ref(agent).or_insert(Baseline {
            start: now,
            tokens: 0,
            mean: 0.0,
            deviation: 0.0,
            windows: 0,
            reported: false,
        });
        // Close the windows that have passed, the quiet ones as zeros (a few hundred at
        // most matter: the weight of older ones is gone).
        let passed = (now.duration_since(b.start).as_nanos() / window.as_nanos()) as u64;
        for i in 0..passed.min(256) {
            let value = if i == 0 { b.tokens as f64 } else { 0.0 };
            if b.windows == 0 {
                b.mean = value;
            } else {
                b.deviation = (1.0 - ALPHA) * b.deviation + ALPHA * (value - b.mean).abs();
                b.mean = (1.0 - ALPHA) * b.mean + ALPHA * value;
            }
            b.windows += 1;
        }
        if passed > 0 {
            b.start += window * u32::try_from(passed).unwrap_or(u32::MAX);
            b.tokens = 0;
            b.reported = false;
        }
        b.tokens += tokens;
        let threshold = (settings.factor * b.mean).max(b.mean + 3.0 * b.deviation);
        let spike = b.windows >= WARMUP_WINDOWS
            && !b.reported
            && b.tokens >= settings.min_tokens
            && (b.tokens as f64) > threshold;
        if !spike {
            return None;
        }
        b.reported = true;
        Some(Spike {
            tokens: b.tokens,
            baseline: b.mean,
            deviation: b.deviation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: AnomalySettings = AnomalySettings {
        window: Duration::from_secs(60),
        factor: 5.0,
        min_tokens: 1000,
    };

    #[tokio::test(start_paused = true)]
    async fn a_spike_past_the_baseline_is_reported_once_per_window() {
        let a = Anomalies::default();
        for _ in 0..10 {
            assert_eq!(a.observe(&SETTINGS, "x", 1000), None, "steady");
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        assert_eq!(a.observe(&SETTINGS, "x", 4000), None, "within the factor");
        let spike = a
            .observe(&SETTINGS, "x", 2000)
            .expect("6,000 against ~1,000");
        assert_eq!(spike.tokens, 6000);
        assert!((spike.baseline - 1000.0).abs() < 1.0, "{spike:?}");
        assert_eq!(a.observe(&SETTINGS, "x", 5000), None, "once per window");
        assert_eq!(a.observe(&SETTINGS, "y", 50_000), None, "no baseline yet");
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_windows_lower_the_baseline_and_small_ones_never_alarm() {
        let a = Anomalies::default();
        for _ in 0..6 {
            a.observe(&SETTINGS, "x", 10);
            tokio::time::advance(Duration::from_secs(60)).await;
        }
        assert_eq!(a.observe(&SETTINGS, "x", 900), None, "under the floor");
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(
            a.observe(&SETTINGS, "x", 1000).is_some(),
            "after quiet windows"
        );
    }
}
