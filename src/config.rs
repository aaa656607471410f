//! The TOML configuration: parsed strictly (unknown keys are errors), defaults in one
//! place, and validated as a whole so that `tokenwarden check` reports every problem with
//! its field path at once.
//!
//! Secrets never live in the file: a provider names the environment variable that holds
//! its key (`api_key_env`), and an agent is known only by the SHA-256 of its virtual key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ledger::Period;
use crate::metering::pricing::{self, PriceConfig, PricingFile};

/// Default bound on a request body: images travel as base64, so this is generous.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    #[serde(default)]
    pub teams: Vec<TeamConfig>,
    #[serde(default)]
    pub budgets: BudgetsConfig,
    #[serde(default)]
    pub metering: MeteringConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub runs: RunsConfig,
    #[serde(default)]
    pub anomalies: AnomaliesConfig,
    #[serde(default)]
    pub outcomes: OutcomesConfig,
    #[serde(default)]
    pub insights: InsightsConfig,
    /// Price overrides, `[pricing."MODEL"]`, laid over the base table.
    #[serde(default)]
    pub pricing: BTreeMap<String, PriceConfig>,
    /// The base price table: `metering.pricing_file` if set, else the built-in one.
    #[serde(skip)]
    pub base_pricing: BTreeMap<String, PriceConfig>,
}

/// The audit log, kept in `storage.dir/audit`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A file is rotated once it reaches this size; the chain continues in the next.
    pub max_file_bytes: u64,
    /// Environment variable holding a key: lines are then chained with HMAC-SHA-256,
    /// so only a holder of the key can rewrite the log undetected.
    pub hmac_key_env: Option<String>,
    /// Write request bodies and response text into the log (off: no prompt or
    /// completion text is ever written).
    pub include_bodies: bool,
    /// Refuse new requests (503) while the log cannot be written.
    pub fail_closed: bool,
    /// Group commit: lines are written as they come and fsynced at most this long after
    /// the oldest unsynced one, so that they share one fsync (0: fsync every batch).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_file_bytes: crate::audit::DEFAULT_MAX_FILE_BYTES,
            hmac_key_env: None,
            include_bodies: false,
            fail_closed: true,
            commit_interval: Duration::from_millis(5),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    /// A TOML file of `[pricing."MODEL"]` tables replacing the built-in prices. Relative
    /// paths are taken from the directory of the config file.
    pub pricing_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the main listener, the one SDKs talk to.
    pub listen: String,
    /// Requests with a larger body are answered 413 without reaching the provider.
    pub max_body_bytes: u64,
    /// A client must send its request headers within this time.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Longest wait for the next part of a request body; past it the request gets 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A connection with no request open and none begun for this long is closed
    /// gracefully (HTTP/1.1 keep-alive connections already at `header_read_timeout`).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM or SIGINT, in-flight requests get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Open client connections beyond this wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Serve TLS on the main listener.
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            max_connections: 10_000,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`, `/admin/...`).
    pub listen: String,
    /// Name of the environment variable holding the admin bearer token; the audit log
    /// names this token `admin`.
    pub token_env: Option<String>,
    /// More bearer tokens, each with the name the audit log gives its holder.
    pub tokens: Vec<AdminTokenConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9090".into(),
            token_env: None,
            tokens: Vec::new(),
        }
    }
}

/// The name of the token read from `admin.token_env`.
pub const ADMIN_TOKEN_NAME: &str = "admin";
/// Who a reload by signal is audited as; no token may take this name.
pub const SIGHUP_NAME: &str = "SIGHUP";

/// A named admin token, `[[admin.tokens]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenConfig {
    /// Who holds it, as admin lines of the audit log name them.
    pub name: String,
    /// The environment variable holding the token.
    pub token_env: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Where the audit log and ledger snapshots live. Relative paths are taken from the
    /// directory of the config file.
    pub dir: PathBuf,
    /// `redis://host:port/db`: budgets, rate limits and requests in flight are kept in
    /// Redis and shared by every replica that names it. No password here: see
    /// `redis_password_env`.
    pub redis_url: Option<String>,
    /// Environment variable holding the Redis password, if it needs one.
    pub redis_password_env: Option<String>,
    /// Longest wait for Redis before a request of a limited agent is refused (503).
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// How often the audit writer snapshots the settled spend, so that a start replays
    /// only the audit lines written since (at most this long of them, plus what a crash
    /// cut short of the interval).
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            dir: "data".into(),
            redis_url: None,
            redis_password_env: None,
            redis_timeout: Duration::from_millis(500),
            snapshot_interval: Duration::from_secs(30),
        }
    }
}

/// Time limits and pooling of the connections to providers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// From sending the request to receiving the response headers.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest silence between two chunks of a response body.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest a whole request may take, headers and body.
    #[serde(with = "humantime_serde")]
    pub total_timeout: Duration,
    /// Pooled keep-alive connections are closed after this long unused.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// PEM certificates trusted for `https://` providers besides the public roots (a
    /// provider behind a private CA). Relative to the config file's directory.
    pub ca_file: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            connect_timeout: Duration::from_secs(5),
            // Reasoning models can think for minutes before the first header.
            first_byte_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            total_timeout: Duration::from_secs(30 * 60),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKindConfig {
    /// The OpenAI wire format; also vLLM, Ollama and any compatible server.
    Openai,
    Anthropic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKindConfig,
    /// Scheme, host and optional path prefix of the provider, e.g. `https://api.openai.com`.
    pub base_url: String,
    /// Path prefix on the proxy; `/` takes every path no other prefix matches.
    pub prefix: String,
    /// Environment variable holding the provider's API key; none means no key is sent.
    pub api_key_env: Option<String>,
    /// OpenAI format: add `stream_options.include_usage` to streamed requests that did
    /// not ask for it, so the provider reports the true count, and strip the extra usage
    /// from what the client receives. Turn off for servers that reject the field.
    #[serde(default = "default_true")]
    pub inject_usage: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub id: String,
    pub team: Option<String>,
    /// Lower-case hex SHA-256 of the agent's virtual key (`tokenwarden keys new`).
    pub key_sha256: String,
    /// Models the agent may use (`*` matches any run of characters); others get 403.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Output tokens one request may ask for; more is clamped to this.
    #[serde(default)]
    pub max_tokens_cap: Option<u64>,
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Stop conditions for the agent's runs.
    #[serde(default)]
    pub runs: Option<RunLimitsConfig>,
}

/// Spikes of an agent's tokens against its own baseline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomaliesConfig {
    pub enabled: bool,
    /// Tokens are summed per window of this length.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// A window past this many times the agent's baseline is a spike.
    pub factor: f64,
    /// No window under this many tokens is a spike.
    pub min_tokens: u64,
    /// Pause the agent on a spike (an admin resumes it).
    pub pause: bool,
}

impl Default for AnomaliesConfig {
    fn default() -> Self {
        AnomaliesConfig {
            enabled: true,
            window: Duration::from_secs(60),
            factor: 5.0,
            min_tokens: 10_000,
            pause: false,
        }
    }
}

/// How runs are named, for every agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunsConfig {
    /// Request headers that name a run, the first present wins (session headers that
    /// agent tools already send can be added, e.g. `x-claude-code-session-id`).
    pub headers: Vec<String>,
}

impl Default for RunsConfig {
    fn default() -> Self {
        RunsConfig {
            headers: vec!["x-tokenwarden-run".to_owned()],
        }
    }
}

/// Outcomes agents report (`POST /v1/outcomes`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutcomesConfig {
    /// Distinct outcome kinds one agent may report; a new kind past it is refused (422).
    /// Kinds become metric labels and report columns, so they must stay few.
    pub max_kinds_per_agent: usize,
}

impl Default for OutcomesConfig {
    fn default() -> Self {
        OutcomesConfig {
            max_kinds_per_agent: 20,
        }
    }
}

/// How `tokenwarden report` reads the audit log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InsightsConfig {
    /// A request whose body's fingerprint the same agent already sent within this long
    /// counts as redundant.
    #[serde(with = "humantime_serde")]
    pub redundancy_window: Duration,
}

impl Default for InsightsConfig {
    fn default() -> Self {
        InsightsConfig {
            redundancy_window: Duration::from_secs(3600),
        }
    }
}

/// What a run crossing a limit gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunAction {
    /// Refuse this and every later call of the run (403), cut a stream that crosses.
    #[default]
    Stop,
    /// Let the call go with an `x-tokenwarden-warning` header, a metric and an audit line.
    Warn,
}

/// Stop conditions of one agent's runs; each is off unless set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunLimitsConfig {
    pub max_requests: Option<u64>,
    pub max_tokens: Option<u64>,
    pub max_usd: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub max_duration: Option<Duration>,
    /// Without a run header, a new run begins after this long without a request.
    #[serde(default = "default_idle_gap", with = "humantime_serde")]
    pub idle_gap: Duration,
    /// Most identical requests (same model and messages) in one run.
    pub max_repeats: Option<u64>,
    /// Most upstream errors in a row.
    pub max_error_streak: Option<u64>,
    /// Most tokens over any 60 seconds of the run.
    pub max_tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub action: RunAction,
}

fn default_idle_gap() -> Duration {
    Duration::from_secs(600)
}

/// Rate limits of one agent; each answered with 429 and `retry-after`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub requests_per_minute: Option<u32>,
    /// Reserved and settled like a budget over each calendar minute.
    pub tokens_per_minute: Option<u64>,
    /// Requests of the agent in flight at once.
    pub max_concurrent: Option<u32>,
}

/// A budget over a period, in dollars, tokens, or both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub period: Period,
    pub usd: Option<f64>,
    pub tokens: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    pub id: String,
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
}

/// What to do with a request that sets no output limit when a budget applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingMaxTokens {
    /// Set it to what the budget still affords (and to `max_tokens_cap`).
    Clamp,
    /// Reserve `default_reserve_output_tokens` and leave the request as it is.
    ReserveDefault,
    /// Refuse the request (400).
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetsConfig {
    /// Calendar periods start at midnight in this IANA time zone.
    pub timezone: String,
    pub on_missing_max_tokens: MissingMaxTokens,
    pub default_reserve_output_tokens: u64,
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        BudgetsConfig {
            timezone: "UTC".into(),
            on_missing_max_tokens: MissingMaxTokens::Clamp,
            default_reserve_output_tokens: 4096,
        }
    }
}

// === loading ===

/// Every problem found in a config file, each as `field.path: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .problems.join("\n  "))]
pub struct ConfigErrors {
    pub problems: Vec<String>,
}

impl Config {
    /// Reads, parses and validates a config file. Relative `storage.dir` is resolved
    /// against the file's directory, so the proxy behaves the same from any working dir.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        // Kept as a `ConfigErrors` under the context, so a reload can list the problems.
        let mut config = Config::parse(&text)
            .map_err(|e| anyhow::Error::new(e).context(path.display().to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.storage.dir.is_relative() {
            config.storage.dir = base.join(&config.storage.dir);
        }
        if let Some(file) = config.upstream.ca_file.as_mut().filter(|f| f.is_relative()) {
            *file = base.join(&*file);
        }
        if let Some(file) = &config.metering.pricing_file {
            let file = base.join(file);
            let text = std::fs::read_to_string(&file).map_err(|e| {
                anyhow::anyhow!("metering.pricing_file: cannot read {}: {e}", file.display())
            })?;
            let table: PricingFile = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("metering.pricing_file {}: {e}", file.display()))?;
            let mut problems = Vec::new();
            pricing::validate(&table.pricing, "metering.pricing_file", &mut problems);
            if !problems.is_empty() {
                return Err(ConfigErrors { problems }.into());
            }
            config.base_pricing = table.pricing;
        }
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let mut config: Config = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let path = e.path().to_string();
                let detail = e.into_inner().to_string();
                let detail = detail.trim_end().replace('\n', "\n  ");
                // A syntax error has no field to name; its line and column say where.
                let problem = if path == "." {
                    detail
                } else {
                    format!("{path}: {detail}")
                };
                ConfigErrors {
                    problems: vec![problem],
                }
            })?;
        config.validate()?;
        config.base_pricing = builtin_pricing();
        Ok(config)
    }

    /// Checks the whole config and reports every problem, not just the first.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        let mut bad = |field: String, msg: &str| problems.push(format!("{field}: {msg}"));

        if self.server.listen.parse::<SocketAddr>().is_err() {
            bad(
                "server.listen".into(),
                "expected an address like 127.0.0.1:8080",
            );
        }
        if self.server.max_body_bytes == 0 {
            bad("server.max_body_bytes".into(), "must be greater than 0");
        }
        if self.server.max_connections == 0 {
            bad("server.max_connections".into(), "must be greater than 0");
        }
        if self.admin.listen.parse::<SocketAddr>().is_err() {
            bad(
                "admin.listen".into(),
                "expected an address like 127.0.0.1:9090",
            );
        }
        if self.audit.commit_interval > Duration::from_secs(1) {
            bad(
                "audit.commit_interval".into(),
                "at most 1s (records wait this long for the disk)",
            );
        }
        if self.anomalies.window.is_zero() {
            bad("anomalies.window".into(), "must be greater than 0");
        }
        if !self.anomalies.factor.is_finite() || self.anomalies.factor <= 1.0 {
            bad("anomalies.factor".into(), "must be a number greater than 1");
        }
        for (i, name) in self.runs.headers.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                bad(format!("runs.headers[{i}]"), "not a valid header name");
            }
        }
        if let Some(url) = &self.storage.redis_url {
            match redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                Err(_) => bad(
                    "storage.redis_url".into(),
                    "expected a URL like redis://127.0.0.1:6379/0",
                ),
                Ok(info) if info.redis_settings().password().is_some() => bad(
                    "storage.redis_url".into(),
                    "holds a password: put it in the variable named by storage.redis_password_env",
                ),
                Ok(_) => {}
            }
        }
        if let Some(env) = &self.storage.redis_password_env {
            if !is_env_name(env) {
                bad(
                    "storage.redis_password_env".into(),
                    "not a valid environment variable name",
                );
            }
        }
        if self.storage.redis_timeout.is_zero() {
            bad("storage.redis_timeout".into(), "must be greater than 0");
        }
        if self.outcomes.max_kinds_per_agent == 0 {
            bad(
                "outcomes.max_kinds_per_agent".into(),
                "must be greater than 0",
            );
        }
        if self.insights.redundancy_window.is_zero() {
            bad(
                "insights.redundancy_window".into(),
                "must be greater than 0",
            );
        }
        if self.audit.max_file_bytes < 4096 {
            bad("audit.max_file_bytes".into(), "must be at least 4096");
        }
        if let Some(env) = &self.audit.hmac_key_env {
            if !is_env_name(env) {
                bad(
                    "audit.hmac_key_env".into(),
                    "not a valid environment variable name",
                );
            }
        }
        if let Some(env) = &self.admin.token_env {
            if !is_env_name(env) {
                bad(
                    "admin.token_env".into(),
                    "not a valid environment variable name",
                );
            }
        }
        for (i, t) in self.admin.tokens.iter().enumerate() {
            let at = |field: &str| format!("admin.tokens[{i}].{field}");
            if !is_token_name(&t.name) {
                bad(at("name"), "1 to 64 letters, digits, '.', '_' or '-'");
            } else if t.name == ADMIN_TOKEN_NAME || t.name == SIGHUP_NAME {
                bad(
                    at("name"),
                    &format!(
                        "{:?} is reserved (admin.token_env's token, reloads by signal)",
                        t.name
                    ),
                );
            } else if self.admin.tokens[..i].iter().any(|u| u.name == t.name) {
                bad(at("name"), &format!("duplicate token name {:?}", t.name));
            }
            if !is_env_name(&t.token_env) {
                bad(at("token_env"), "not a valid environment variable name");
            }
        }
        for (name, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            (
                "upstream.first_byte_timeout",
                self.upstream.first_byte_timeout,
            ),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
            ("upstream.total_timeout", self.upstream.total_timeout),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.idle_timeout", self.server.idle_timeout),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("storage.snapshot_interval", self.storage.snapshot_interval),
        ] {
            if d.is_zero() {
                bad(name.into(), "must be greater than 0");
            }
        }

        if self.providers.is_empty() {
            bad("providers".into(), "at least one provider is needed");
        }
        for (i, p) in self.providers.iter().enumerate() {
            let at = |field: &str| format!("providers[{i}].{field}");
            if p.name.is_empty() {
                bad(at("name"), "must not be empty");
            }
            if self.providers[..i].iter().any(|q| q.name == p.name) {
                bad(at("name"), &format!("duplicate provider name {:?}", p.name));
            }
            if let Err(msg) = check_base_url(&p.base_url) {
                bad(at("base_url"), msg);
            }
            if let Err(msg) = check_prefix(&p.prefix) {
                bad(at("prefix"), msg);
            }
            if self.providers[..i].iter().any(|q| q.prefix == p.prefix) {
                bad(
                    at("prefix"),
                    &format!("prefix {:?} is used twice", p.prefix),
                );
            }
            if let Some(env) = &p.api_key_env {
                if !is_env_name(env) {
                    bad(at("api_key_env"), "not a valid environment variable name");
                }
            }
        }

        for (i, a) in self.agents.iter().enumerate() {
            let at = |field: &str| format!("agents[{i}].{field}");
            if a.id.is_empty() {
                bad(at("id"), "must not be empty");
            }
            if self.agents[..i].iter().any(|b| b.id == a.id) {
                bad(at("id"), &format!("duplicate agent id {:?}", a.id));
            }
            if parse_sha256(&a.key_sha256).is_none() {
                bad(
                    at("key_sha256"),
                    "expected 64 hex characters (the SHA-256 of the virtual key)",
                );
            } else if self.agents[..i]
                .iter()
                .any(|b| b.key_sha256.eq_ignore_ascii_case(&a.key_sha256))
            {
                bad(at("key_sha256"), "the same key is given to two agents");
            }
        }

        for (i, a) in self.agents.iter().enumerate() {
            validate_budgets(&a.budgets, &format!("agents[{i}].budgets"), &mut problems);
            let l = &a.limits;
            if l.requests_per_minute == Some(0)
                || l.tokens_per_minute == Some(0)
                || l.max_concurrent == Some(0)
            {
                problems.push(format!(
                    "agents[{i}].limits: every limit must be greater than 0"
                ));
            }
            if l.tokens_per_minute.is_some() && a.budgets.iter().any(|b| b.period == Period::Minute)
            {
                problems.push(format!(
                    "agents[{i}].limits.tokens_per_minute: the agent also has a minute budget; keep one"
                ));
            }
            if a.max_tokens_cap == Some(0) {
                problems.push(format!(
                    "agents[{i}].max_tokens_cap: must be greater than 0"
                ));
            }
            if let Some(r) = &a.runs {
                let zero = [
                    ("max_requests", r.max_requests),
                    ("max_tokens", r.max_tokens),
                    ("max_repeats", r.max_repeats),
                    ("max_error_streak", r.max_error_streak),
                    ("max_tokens_per_minute", r.max_tokens_per_minute),
                ];
                for (field, value) in zero {
                    if value == Some(0) {
                        problems.push(format!("agents[{i}].runs.{field}: must be greater than 0"));
                    }
                }
                if r.max_usd.is_some_and(|u| !u.is_finite() || u <= 0.0) {
                    problems.push(format!("agents[{i}].runs.max_usd: must be an amount > 0"));
                }
                if r.max_duration.is_some_and(|d| d.is_zero()) {
                    problems.push(format!(
                        "agents[{i}].runs.max_duration: must be greater than 0"
                    ));
                }
                if r.idle_gap.is_zero() {
                    problems.push(format!("agents[{i}].runs.idle_gap: must be greater than 0"));
                }
            }
            if let Some(team) = &a.team {
                if !self.teams.is_empty() && !self.teams.iter().any(|t| &t.id == team) {
                    problems.push(format!(
                        "agents[{i}].team: no [[teams]] entry with id {team:?}"
                    ));
                }
            }
        }
        for (i, t) in self.teams.iter().enumerate() {
            if t.id.is_empty() {
                problems.push(format!("teams[{i}].id: must not be empty"));
            }
            if self.teams[..i].iter().any(|u| u.id == t.id) {
                problems.push(format!("teams[{i}].id: duplicate team id {:?}", t.id));
            }
            validate_budgets(&t.budgets, &format!("teams[{i}].budgets"), &mut problems);
        }
        if jiff::tz::TimeZone::get(&self.budgets.timezone).is_err() {
            problems.push(format!(
                "budgets.timezone: unknown time zone {:?} (use an IANA name like \"Europe/Berlin\")",
                self.budgets.timezone
            ));
        }
        pricing::validate(&self.pricing, "pricing", &mut problems);

        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors { problems })
        }
    }
}

fn validate_budgets(budgets: &[BudgetConfig], at: &str, problems: &mut Vec<String>) {
    for (j, b) in budgets.iter().enumerate() {
        if b.usd.is_none() && b.tokens.is_none() {
            problems.push(format!("{at}[{j}]: give usd, tokens or both"));
        }
        if b.usd.is_some_and(|u| !u.is_finite() || u < 0.0) {
            problems.push(format!("{at}[{j}].usd: must be an amount >= 0"));
        }
        if budgets[..j].iter().any(|c| c.period == b.period) {
            problems.push(format!("{at}[{j}].period: two budgets for the same period"));
        }
    }
}

// === reloading ===

impl Config {
    /// Puts back the settings of `running` that only a restart can change (listeners,
    /// TLS, storage, the audit writer, the upstream connection pool, the budget time
    /// zone), so that a reloaded config never claims what is not in effect. Returns the
    /// field paths that differed: the reload ignores them.
    pub fn keep_restart_settings(&mut self, running: &Config) -> Vec<&'static str> {
        let mut ignored = Vec::new();
        macro_rules! keep {
            ($path:literal, $($field:ident).+) => {
                if self.$($field).+ != running.$($field).+ {
                    ignored.push($path);
                    self.$($field).+ = running.$($field).+.clone();
                }
            };
        }
        keep!("server.listen", server.listen);
        keep!("server.tls", server.tls);
        keep!("server.max_connections", server.max_connections);
        keep!("server.header_read_timeout", server.header_read_timeout);
        keep!("server.idle_timeout", server.idle_timeout);
        keep!("server.shutdown_grace", server.shutdown_grace);
        keep!("admin.listen", admin.listen);
        keep!("storage.dir", storage.dir);
        keep!("storage.redis_url", storage.redis_url);
        keep!("storage.redis_password_env", storage.redis_password_env);
        keep!("storage.redis_timeout", storage.redis_timeout);
        keep!("storage.snapshot_interval", storage.snapshot_interval);
        keep!("upstream.connect_timeout", upstream.connect_timeout);
        keep!("upstream.ca_file", upstream.ca_file);
        keep!("upstream.pool_idle_timeout", upstream.pool_idle_timeout);
        keep!(
            "upstream.pool_max_idle_per_host",
            upstream.pool_max_idle_per_host
        );
        keep!("audit.max_file_bytes", audit.max_file_bytes);
        keep!("audit.hmac_key_env", audit.hmac_key_env);
        keep!("audit.commit_interval", audit.commit_interval);
        keep!("budgets.timezone", budgets.timezone);
        ignored
    }
}

/// The built-in price table (`config/pricing.toml`, compiled in).
fn builtin_pricing() -> BTreeMap<String, PriceConfig> {
    // The table is checked by a unit test; a parse failure here would mean a broken
    // build, and leaves every model unpriced (counted, flagged) rather than failing.
    toml::from_str::<PricingFile>(pricing::BUILTIN)
        .map(|f| f.pricing)
        .unwrap_or_default()
}

/// Parses a 64-character hex SHA-256 digest.
pub fn parse_sha256(hex_digest: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut out).ok()?;
    Some(out)
}

/// A token name goes into audit lines as written: keep it short and plain.
fn is_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn check_base_url(url: &str) -> Result<(), &'static str> {
    let uri: http::Uri = url.parse().map_err(|_| "not a valid URL")?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must start with http:// or https://"),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host");
    }
    if uri.query().is_some() {
        return Err("must not carry a query string");
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not carry a user or password (name the key's variable in api_key_env)");
    }
    Ok(())
}

fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if !prefix.starts_with('/') {
        return Err("must start with /");
    }
    if prefix.len() > 1 && prefix.ends_with('/') {
        return Err("must not end with / (except the catch-all \"/\")");
    }
    if prefix.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("must not contain . or .. segments");
    }
    if prefix
        .bytes()
        .any(|b| b == b'?' || b == b'#' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("must be a path: no ?, #, spaces or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn minimal() -> String {
        format!(
            r#"
[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com"
prefix = "/openai"
api_key_env = "OPENAI_API_KEY"

[[agents]]
id = "bot"
key_sha256 = "{KEY_HASH}"
"#
        )
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(&minimal()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.storage.snapshot_interval, Duration::from_secs(30));
        assert_eq!(c.providers[0].kind, ProviderKindConfig::Openai);
        assert_eq!(c.outcomes.max_kinds_per_agent, 20);
        assert_eq!(c.insights.redundancy_window, Duration::from_secs(3600));
    }

    #[test]
    fn outcome_and_insight_settings_are_checked() {
        let text = format!(
            "[outcomes]\nmax_kinds_per_agent = 0\n[insights]\nredundancy_window = \"0s\"\n{}",
            minimal()
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("outcomes.max_kinds_per_agent"), "{err}");
        assert!(err.contains("insights.redundancy_window"), "{err}");
        let text = format!("[insights]\nredundancy_window = \"15m\"\n{}", minimal());
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.insights.redundancy_window, Duration::from_secs(900));
    }

    #[test]
    fn the_snapshot_interval_is_a_positive_duration() {
        let text = format!("[storage]\nsnapshot_interval = \"250ms\"\n{}", minimal());
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.storage.snapshot_interval, Duration::from_millis(250));
        let text = format!("[storage]\nsnapshot_interval = \"0s\"\n{}", minimal());
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("storage.snapshot_interval: must be greater than 0"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let text = minimal().replace("prefix = \"/openai\"", "prefix = \"/openai\"\nprefx = 1");
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(err.contains("prefx"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
[server]
listen = "nowhere"
[[providers]]
name = "a"
kind = "openai"
base_url = "ftp://x"
prefix = "a/"
[[providers]]
name = "a"
kind = "anthropic"
base_url = "https://x"
prefix = "/b/../c"
api_key_env = "1BAD"
[[agents]]
id = "bot"
key_sha256 = "nothex"
[[agents]]
id = "bot"
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"#;
        let err = Config::parse(text).unwrap_err();
        let want = [
            "server.listen:",
            "providers[0].base_url:",
            "providers[0].prefix:",
            "providers[1].name: duplicate",
            "providers[1].prefix:",
            "providers[1].api_key_env:",
            "agents[0].key_sha256:",
            "agents[1].id: duplicate",
        ];
        for w in want {
            assert!(
                err.problems.iter().any(|p| p.starts_with(w)),
                "missing {w} in {err}"
            );
        }
        assert_eq!(err.problems.len(), want.len(), "{err}");
    }

    #[test]
    fn a_base_url_with_credentials_or_a_prefix_that_is_no_path_is_refused() {
        for (from, to, field) in [
            (
                "base_url = \"https://api.openai.com\"",
                "base_url = \"https://user:sk-secret@api.openai.com\"",
                "providers[0].base_url: must not carry a user or password",
            ),
            (
                "prefix = \"/openai\"",
                "prefix = \"/openai?x=1\"",
                "providers[0].prefix: must be a path",
            ),
            (
                "prefix = \"/openai\"",
                "prefix = \"/open ai\"",
                "providers[0].prefix: must be a path",
            ),
        ] {
            let text = minimal().replace(from, to);
            assert_ne!(text, minimal());
            let err = Config::parse(&text).unwrap_err();
            assert!(
                err.problems.iter().any(|p| p.starts_with(field)),
                "{to}: {err}"
            );
            assert!(!err.to_string().contains("sk-secret"), "{err}");
        }
    }

    #[test]
    fn admin_tokens_are_named_once_and_not_as_the_reserved_names() {
        let text = format!(
            "[admin]\ntoken_env = \"ADMIN_TOKEN\"\n\
             [[admin.tokens]]\nname = \"ops\"\ntoken_env = \"OPS_TOKEN\"\n\
             [[admin.tokens]]\nname = \"ops\"\ntoken_env = \"OPS2\"\n\
             [[admin.tokens]]\nname = \"admin\"\ntoken_env = \"X\"\n\
             [[admin.tokens]]\nname = \"SIGHUP\"\ntoken_env = \"Y\"\n\
             [[admin.tokens]]\nname = \"a b\"\ntoken_env = \"1Z\"\n{}",
            minimal()
        );
        let err = Config::parse(&text).unwrap_err();
        for want in [
            "admin.tokens[1].name: duplicate",
            "admin.tokens[2].name: \"admin\" is reserved",
            "admin.tokens[3].name: \"SIGHUP\" is reserved",
            "admin.tokens[4].name:",
            "admin.tokens[4].token_env:",
        ] {
            assert!(
                err.problems.iter().any(|p| p.starts_with(want)),
                "missing {want} in {err}"
            );
        }
        assert_eq!(err.problems.len(), 5, "{err}");
    }

    #[test]
    fn a_reload_keeps_the_settings_only_a_restart_can_change() {
        let running = Config::parse(&minimal()).unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = 10\n\
             [storage]\ndir = \"elsewhere\"\n[budgets]\ntimezone = \"Europe/Berlin\"\n{}",
            minimal()
        );
        let mut next = Config::parse(&text).unwrap();
        let ignored = next.keep_restart_settings(&running);
        assert_eq!(
            ignored,
            ["server.listen", "storage.dir", "budgets.timezone"]
        );
        assert_eq!(next.server.listen, running.server.listen);
        assert_eq!(next.storage.dir, running.storage.dir);
        assert_eq!(next.budgets.timezone, "UTC");
        assert_eq!(next.server.max_body_bytes, 10, "taken: read per request");
        assert!(next.keep_restart_settings(&running).is_empty());
    }

    #[test]
    fn durations_are_humantime() {
        let text = format!("[upstream]\nidle_timeout = \"1m 30s\"\n{}", minimal());
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.upstream.idle_timeout, Duration::from_secs(90));
    }
}
