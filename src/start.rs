//! Starting a proxy from a config file: everything `tokenwarden serve` does between
//! reading the file and serving. `tokenwarden demo` starts its proxy through the same
//! function, so the demo runs the real path.
//!
//! In order: load and validate the config, open the audit log (cutting a torn last line
//! off), rebuild the budgets from the ledger snapshot plus the lines after it, bind both
//! listeners, connect Redis when configured, and restore stopped runs, outcome kinds and
//! pauses (kept in the same snapshot, see [`crate::audit::standing`]). What is returned is ready for [`crate::server::run`].

use std::path::Path;
use std::sync::Arc;

use crate::admin::overview::Overview;
use crate::admin::reload::load_live_with;
use crate::audit::{AuditLog, AuditSettings, SnapshotSettings};
use crate::config::Config;
use crate::ledger::redis::{RedisLedger, RedisSettings};
use crate::ledger::{snapshot, Calendar, Ledger, SystemClock};
use crate::metrics::Metrics;
use crate::proxy::AppState;
use crate::secret::Secret;
use crate::server::Listeners;

/// A proxy ready to serve: its state and its bound listeners.
pub struct Started {
    /// Without a config path: the caller names the file reloads read, if any
    /// ([`AppState::with_config_path`]).
    pub state: AppState,
    pub listeners: Listeners,
}

/// Loads the config at `path` and builds a proxy from it, reading the environment
/// variables it names through `lookup_env`.
pub async fn start(
    path: &Path,
    lookup_env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Started> {
    let live = load_live_with(path, &lookup_env)?;
    let metrics = Arc::new(Metrics::new()?);
    let timezone = live.config.budgets.timezone.clone();
    let tz = jiff::tz::TimeZone::get(&timezone)?;
    let (audit, restored) = AuditLog::open_restoring(
        AuditSettings {
            dir: live.config.storage.dir.join("audit"),
            max_file_bytes: live.config.audit.max_file_bytes,
            commit_interval: live.config.audit.commit_interval,
            hmac_key: audit_key(&live.config, &lookup_env)?,
            snapshot: Some(SnapshotSettings {
                path: live.config.storage.dir.join(snapshot::FILE_NAME),
                interval: live.config.storage.snapshot_interval,
                timezone,
                tz: tz.clone(),
            }),
        },
        metrics.audit_records.clone(),
        metrics.audit_write_errors.clone(),
    )?;
    let audit = Arc::new(audit);
    let ledger = Ledger::new(tz.clone(), Arc::new(SystemClock));
    if let Some(restored) = &restored {
        live.policies.restore(&ledger, &restored.aggregate);
        match restored.snapshot_seq {
            Some(seq) => tracing::info!(
                "budgets rebuilt from snapshot at seq {seq} plus {} audit lines",
                restored.lines
            ),
            None => tracing::info!(
                "budgets rebuilt from the audit log ({} lines)",
                restored.lines
            ),
        }
    }
    let listeners = Listeners::bind(&live.config.server.listen, &live.config.admin.listen).await?;
    let redis = redis_ledger(&live.config, &tz, &lookup_env)?;
    let overview = Overview::new(
        live.config.storage.dir.join("audit"),
        audit_key(&live.config, &lookup_env)?
            .as_ref()
            .map(|k| k.expose().as_slice()),
        live.config.insights.redundancy_window,
    );
    let state = AppState::new(live, metrics, audit, ledger, redis)?.with_overview(overview);
    if let Some(restored) = &restored {
        let standing = restored.aggregate.standing();
        let stopped = state.runs.restore(standing);
        let kinds = state.outcome_kinds.restore(standing);
        let (pause_all, paused) = state.switches.restore(standing);
        tracing::info!(
            stopped,
            kinds,
            pause_all,
            paused,
            "stopped runs, outcome kinds and pauses restored"
        );
    }
    Ok(Started { state, listeners })
}

/// The HMAC key of the audit log, if the config names one.
pub fn audit_key(
    config: &Config,
    lookup_env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<Secret<Vec<u8>>>> {
    match &config.audit.hmac_key_env {
        None => Ok(None),
        Some(env) => match lookup_env(env) {
            Some(key) if !key.is_empty() => Ok(Some(Secret::new(key.into_bytes()))),
            _ => anyhow::bail!("audit.hmac_key_env: environment variable {env} is not set"),
        },
    }
}

/// The Redis store, when `storage.redis_url` is set.
fn redis_ledger(
    config: &Config,
    tz: &jiff::tz::TimeZone,
    lookup_env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<Arc<RedisLedger>>> {
    let Some(url) = &config.storage.redis_url else {
        return Ok(None);
    };
    let password = match &config.storage.redis_password_env {
        None => None,
        Some(env) => Some(crate::secret::Secret::new(lookup_env(env).ok_or_else(
            || anyhow::anyhow!("storage.redis_password_env: {env} is not set"),
        )?)),
    };
    let settings = RedisSettings {
        url: url.clone(),
        password,
        timeout: config.storage.redis_timeout,
        // A hold lasts as long as its request may, plus time to settle it.
        hold: config.upstream.total_timeout + std::time::Duration::from_secs(30),
    };
    let calendar = Calendar::new(tz.clone(), Arc::new(SystemClock));
    Ok(Some(RedisLedger::connect(&settings, calendar)?))
}
