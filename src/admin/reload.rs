//! Reloading the config: read the file the proxy started with again, validate it whole,
//! build a new [`Live`] and swap it in at once, or keep the running one and say why.
//!
//! Budgets, runs, pauses and rate limits live in [`AppState`] outside `Live`, so they
//! carry over. Settings only a restart can change are put back to their running values
//! and reported as ignored (see [`Config::keep_restart_settings`]).

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::{audit_line, Caller, Entry};
use crate::config::{Config, ConfigErrors};
use crate::proxy::{AppState, Live};

/// Reads, validates and builds one version of the config. Used at start and by reloads.
pub fn load_live(path: &Path) -> anyhow::Result<Live> {
    load_live_with(path, |name| std::env::var(name).ok())
}

/// [`load_live`], reading the environment variables the config names through
/// `lookup_env` (the demo hands its generated admin token in this way, not through the
/// process environment).
pub fn load_live_with(
    path: &Path,
    lookup_env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Live> {
    let config = Config::load(path)?;
    let live = Live::new(config, lookup_env)?;
    for provider in live.router.providers() {
        if let Err(env) = provider.credential() {
            tracing::warn!(
                provider = &*provider.name,
                "environment variable {env} is not set: requests to this provider will be refused"
            );
        }
    }
    let unset = live.admin_tokens.unset();
    if !unset.is_empty() {
        tracing::warn!(
            "admin token variables not set: {}; those tokens are refused",
            unset.join(", ")
        );
    } else if live.admin_tokens.is_empty() {
        tracing::warn!("no admin token is configured: /admin/* answers 401 (set admin.token_env)");
    }
    Ok(live)
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the proxy was started without a config file to read again")]
    NoConfigFile,
    #[error("the config is invalid, the running one is kept: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("the config cannot be loaded, the running one is kept: {0}")]
    Load(String),
}

impl ReloadError {
    /// Each problem with its field path, as `tokenwarden check` reports them.
    pub fn problems(&self) -> Vec<String> {
        match self {
            ReloadError::Invalid(problems) => problems.clone(),
            ReloadError::Load(why) => vec![why.clone()],
            ReloadError::NoConfigFile => Vec::new(),
        }
    }
}

/// What a reload changed.
#[derive(Debug, Serialize)]
pub struct Reloaded {
    pub config: String,
    pub providers: usize,
    pub agents: usize,
    pub admin_tokens: usize,
    /// Field paths that changed in the file but need a restart; their running values
    /// stay in effect.
    pub ignored: Vec<&'static str>,
}

/// Reloads the config and writes the admin line that says who asked and how it went.
pub async fn reload(state: &AppState, caller: &Caller) -> Result<Reloaded, ReloadError> {
    let result = swap(state).await;
    let (outcome, status, detail) = match &result {
        Ok(r) => {
            let mut detail = format!(
                "reloaded {}: {} providers, {} agents, {} admin tokens",
                r.config, r.providers, r.agents, r.admin_tokens
            );
            if !r.ignored.is_empty() {
                detail.push_str(&format!(
                    "; ignored until a restart: {}",
                    r.ignored.join(", ")
                ));
            }
            tracing::info!(by = caller.by, "{detail}");
            ("ok", 200, detail)
        }
        Err(e) => {
            tracing::error!(by = caller.by, "config reload failed: {e}");
            ("failed", 400, e.to_string())
        }
    };
    audit_line(
        state,
        caller,
        Entry {
            reason: "reload",
            outcome,
            status,
            agent: None,
            run: None,
            detail,
        },
    );
    result
}

async fn swap(state: &AppState) -> Result<Reloaded, ReloadError> {
    let path = state.config_path.clone().ok_or(ReloadError::NoConfigFile)?;
    // One at a time, so the comparison below is with the config being replaced.
    let _one = state.reloading.lock().await;
    let shown = path.display().to_string();
    // File reads and building the tables: off the async workers.
    let loaded = tokio::task::spawn_blocking(move || load_live(&path))
        .await
        .map_err(|e| ReloadError::Load(format!("the reload task failed: {e}")))?;
    let mut live = loaded.map_err(|e| match e.downcast_ref::<ConfigErrors>() {
        Some(errors) => ReloadError::Invalid(errors.problems.clone()),
        None => ReloadError::Load(format!("{e:#}")),
    })?;
    let running = state.live.load_full();
    let ignored = live.config.keep_restart_settings(&running.config);
    let reloaded = Reloaded {
        config: shown,
        providers: live.router.providers().len(),
        agents: live.identities.len(),
        admin_tokens: live.admin_tokens.len(),
        ignored,
    };
    state.live.store(Arc::new(live));
    Ok(reloaded)
}
