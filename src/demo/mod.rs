//! `tokenwarden demo`: the product at work in a few seconds, with no API key and no
//! network. Everything runs in this process, on loopback ports the OS picks:
//!
//! 1. the mock provider ([`crate::mock`]) stands in for OpenAI;
//! 2. a demo config is written to a fresh directory (new virtual keys, an admin token,
//!    run limits for the runaway agent) and started through [`crate::start`], the path
//!    `tokenwarden serve` takes: the real config loader, audit log and listeners;
//! 3. two simulated agents ([`agents`]) send real HTTP requests through the proxy:
//!    support-bot resolves tickets and reports each as an outcome (`POST /v1/outcomes`);
//!    runaway-loop resends its whole, growing conversation in one run, retrying each
//!    step with the identical request, until its run limits stop it (403 `run_stopped`);
//! 4. the audit log is read back into the report `tokenwarden report` prints.
//!
//! The directory stays, so that `tokenwarden report` and `tokenwarden audit verify` can
//! be run on it afterwards.

mod agents;

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::Method;
use serde_json::{json, Value};

use crate::proxy::AppState;
use crate::report::{self, Report};
use agents::{Http, RUN_HEADER};

/// The environment variable the demo config names for its admin token. The demo hands
/// the token it generates to the config loader itself (see [`crate::start::start`]).
pub const ADMIN_TOKEN_ENV: &str = "TOKENWARDEN_DEMO_ADMIN_TOKEN";
/// The run the runaway loop works in.
pub const RUNAWAY_RUN: &str = "fix-nightly-build";
/// The runaway's stop conditions; `max_tokens` is the one its growing context crosses.
const RUNAWAY_MAX_TOKENS: u64 = 10_000;
const RUNAWAY_MAX_REPEATS: u64 = 3;
const RUNAWAY_MAX_REQUESTS: u64 = 40;
/// Steps the runaway loop takes at most before the demo calls it a failure: more than
/// `max_requests`, so a proxy that enforced nothing is found out.
const RUNAWAY_MAX_STEPS: usize = 50;
/// The outcome support-bot reports per ticket.
pub const OUTCOME_KIND: &str = "ticket_resolved";
/// Longest wait for the audit log to reach the disk before the report reads it.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where to keep the config and the audit log (a new or empty directory); default: a
    /// fresh directory under the system's temporary directory.
    pub dir: Option<PathBuf>,
    /// After the report, keep the proxy and the mock serving until `until` resolves.
    pub keep_running: bool,
    /// How to name this program in the commands suggested at the end.
    pub program: String,
}

/// Runs the demo, writing what a person should see through `out`, one line or block at a
/// time. Returns the proxy's state once its server has drained, for the caller to close
/// the settler and the audit log after the runtime is gone, as `serve` does.
pub async fn run(
    options: &Options,
    out: &(dyn Fn(&str) + Sync),
    until: impl Future<Output = ()>,
) -> anyhow::Result<Arc<AppState>> {
    let dir = prepare_dir(options.dir.as_deref())?;
    let (mock_addr, mock) = crate::mock::spawn("127.0.0.1:0", true)
        .await
        .context("cannot start the mock provider")?;
    let keys = Keys::generate();
    let config_path = dir.join("tokenwarden.toml");
    std::fs::write(&config_path, demo_config(mock_addr, &keys))
        .with_context(|| format!("cannot write {}", config_path.display()))?;

    let admin_token = keys.admin.clone();
    let lookup_env = move |name: &str| {
        if name == ADMIN_TOKEN_ENV {
            Some(admin_token.clone())
        } else {
            std::env::var(name).ok()
        }
    };
    let started = crate::start::start(&config_path, lookup_env).await?;
    let addrs = Addrs {
        proxy: started.listeners.proxy.local_addr()?,
        admin: started.listeners.admin.local_addr()?,
        mock: mock_addr,
    };
    let state = Arc::new(started.state);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::run(
        state.clone(),
        started.listeners,
        async move {
            let _ = stop_rx.await;
        },
    ));

    let paths = Paths::new(&config_path, &state);
    let shown = show(&state, &addrs, &keys, &paths, options, out).await;
    if shown.is_ok() && options.keep_running {
        until.await;
    }
    let _ = stop_tx.send(());
    let served = server.await;
    mock.abort();
    shown?;
    served.context("the proxy's server task failed")??;
    Ok(state)
}

/// Everything the user sees, with the proxy serving.
async fn show(
    state: &AppState,
    addrs: &Addrs,
    keys: &Keys,
    paths: &Paths,
    options: &Options,
    out: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<()> {
    out(&format!(
        "tokenwarden demo: a mock provider, the proxy and two agents on this machine \
         (no API key, no network)\n\n  \
         proxy     http://{} (admin http://{})\n  \
         provider  mock on http://{}, reached through the proxy at /openai\n  \
         config    {}\n",
        addrs.proxy,
        addrs.admin,
        addrs.mock,
        paths.config.display()
    ));
    let http = Http::new();
    let base = format!("http://{}", addrs.proxy);
    support_bot(&http, &base, &keys.support_bot, out).await?;
    let runaway = runaway_loop(&http, &base, &keys.runaway_loop, out).await?;
    let seen = provider_saw(&http, addrs.mock, RUNAWAY_RUN).await?;
    out(&format!(
        "  The provider received {seen} requests of this run; request {} and any later one \
         never left the proxy.\n",
        runaway.refused_at
    ));
    if seen != runaway.refused_at - 1 {
        anyhow::bail!(
            "the provider received {seen} requests of run {RUNAWAY_RUN}, expected {}",
            runaway.refused_at - 1
        );
    }
    drop(http);

    let report = read_report(state, paths).await?;
    out(&format!(
        "What the audit log says ({} report --config {}):\n",
        options.program,
        paths.config.display()
    ));
    out(&report::table::render(&report));
    check_report(&report)?;
    out(&summary(&report));

    let config = paths.config.display();
    out(&format!(
        "Look further:\n  \
         audit log  {}\n  \
         {program} audit verify {}\n  \
         {program} report --config {config} --format html > report.html\n",
        paths.audit.display(),
        paths.audit.display(),
        program = options.program,
    ));
    if options.keep_running {
        out(&format!(
            "Still serving; Ctrl-C stops the proxy and the mock.\n  \
             dashboard  http://{admin}/dashboard#token={token}\n  \
             metrics    http://{admin}/metrics\n  \
             admin API  curl -H 'authorization: Bearer {token}' http://{admin}/admin/runs\n  \
             a call     curl -s http://{proxy}/openai/v1/chat/completions \
             -H 'authorization: Bearer {key}' -H 'content-type: application/json' \
             -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'\n",
            admin = addrs.admin,
            proxy = addrs.proxy,
            token = keys.admin,
            key = keys.support_bot,
            model = agents::MODEL,
        ));
    }
    Ok(())
}

// === the agents' scripts ===

/// support-bot: per ticket, a run of two calls (one streamed), then the outcome.
async fn support_bot(
    http: &Http,
    base: &str,
    key: &str,
    out: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<()> {
    let chat = format!("{base}/openai/v1/chat/completions");
    let mut text = format!(
        "support-bot (team support) resolves {} tickets, each in a run of its own, and\n\
         reports each one done:\n",
        agents::TICKETS.len()
    );
    let mut budget_left = None;
    for ticket in &agents::TICKETS {
        let run = format!("ticket-{}", ticket.reference);
        let sort = http
            .post(
                &chat,
                key,
                Some(&run),
                &[("x-mock-chunks", "1")],
                &agents::classify_request(ticket),
            )
            .await?;
        expect_status(&sort, 200, "support-bot's first call")?;
        let reply = http
            .post(
                &chat,
                key,
                Some(&run),
                &[("x-mock-chunks", "60")],
                &agents::reply_request(ticket),
            )
            .await?;
        expect_status(&reply, 200, "support-bot's streamed call")?;
        let (pieces, usage) = agents::read_stream(&reply.body);
        budget_left = reply
            .headers
            .get("x-tokenwarden-budget-remaining-usd")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok());
        let tokens = agents::total_tokens(&sort.json()["usage"]) + agents::total_tokens(&usage);
        let outcome = http
            .post(
                &format!("{base}{}", crate::proxy::outcomes::PATH),
                key,
                None,
                &[],
                &json!({"kind": OUTCOME_KIND, "run": run, "ref": ticket.reference}),
            )
            .await?;
        expect_status(&outcome, 201, "support-bot's outcome")?;
        let _ = writeln!(
            text,
            "  {}  2 calls ({pieces} chunks streamed), {} tokens; POST /v1/outcomes \
             {OUTCOME_KIND}: {}",
            ticket.reference,
            thousands(tokens),
            outcome.status
        );
    }
    if let Some(left) = budget_left {
        let _ = writeln!(
            text,
            "  its day budget ($5.00) had ${left:.4} left when its last call went out"
        );
    }
    out(&text);
    Ok(())
}

/// How the runaway loop ended.
struct Runaway {
    /// The request the proxy refused (1-based).
    refused_at: usize,
}

/// runaway-loop: one run, the whole conversation resent each step plus the newest
/// test log, and every step retried once with the identical request, until refused.
async fn runaway_loop(
    http: &Http,
    base: &str,
    key: &str,
    out: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<Runaway> {
    let chat = format!("{base}/openai/v1/chat/completions");
    out(&format!(
        "runaway-loop (team research) works on one task in run {RUNAWAY_RUN}:\n  \
         \"{}\"\n\
         Each step resends the whole conversation plus the newest test log, and retries\n\
         with the identical request when the answer is of no use. Its run limits:\n\
         max_tokens = {RUNAWAY_MAX_TOKENS}, max_repeats = {RUNAWAY_MAX_REPEATS}, \
         max_requests = {RUNAWAY_MAX_REQUESTS}.",
        agents::RUNAWAY_TASK
    ));
    let mut messages = agents::runaway_start();
    let mut run_tokens = 0u64;
    let mut retry = false;
    for n in 1..=RUNAWAY_MAX_STEPS {
        let answer = http
            .post(
                &chat,
                key,
                Some(RUNAWAY_RUN),
                &[("x-mock-chunks", "30")],
                &agents::runaway_request(&messages),
            )
            .await?;
        if answer.status == 403 {
            let (code, message) = agents::error_of(&answer);
            let retry_header = answer
                .headers
                .get("x-should-retry")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            out(&format!(
                "  request {n:>2}  403  refused by the proxy (x-should-retry: {retry_header}); \
                 the agent's SDK raises:\n      \
                 {code}: {message}"
            ));
            if code != "run_stopped" {
                anyhow::bail!("runaway-loop was refused with {code}, not run_stopped: {message}");
            }
            return Ok(Runaway { refused_at: n });
        }
        expect_status(&answer, 200, "runaway-loop's call")?;
        let usage = &answer.json()["usage"];
        let tokens = agents::total_tokens(usage);
        run_tokens += tokens;
        out(&format!(
            "  request {n:>2}  200  prompt {:>6} tokens, run total {:>6} of {}{}",
            thousands(usage["prompt_tokens"].as_u64().unwrap_or(0)),
            thousands(run_tokens),
            thousands(RUNAWAY_MAX_TOKENS),
            if retry {
                "  (retry: the identical request)"
            } else {
                ""
            }
        ));
        if retry {
            messages.push(agents::test_log(n / 2));
        }
        retry = !retry;
    }
    anyhow::bail!(
        "runaway-loop was never stopped: {RUNAWAY_MAX_STEPS} requests of run {RUNAWAY_RUN} \
         went through ({run_tokens} tokens), its run limits did not hold"
    )
}

/// How many requests of `run` reached the mock provider.
async fn provider_saw(http: &Http, mock: SocketAddr, run: &str) -> anyhow::Result<usize> {
    let answer = http
        .send(
            Method::GET,
            &format!("http://{mock}/mock/requests"),
            &[],
            bytes::Bytes::new(),
        )
        .await?;
    let seen: Vec<Value> =
        serde_json::from_slice(&answer.body).context("the mock's request log is not JSON")?;
    Ok(seen
        .iter()
        .filter(|r| {
            r["headers"].as_array().is_some_and(|headers| {
                headers
                    .iter()
                    .any(|h| h[0].as_str() == Some(RUN_HEADER) && h[1].as_str() == Some(run))
            })
        })
        .count())
}

fn expect_status(answer: &agents::Answer, want: u16, what: &str) -> anyhow::Result<()> {
    if answer.status.as_u16() == want {
        return Ok(());
    }
    anyhow::bail!(
        "{what} got {} instead of {want}: {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    )
}

// === the report ===

/// Waits for the audit log to reach the disk, then reads it as `tokenwarden report`
/// does.
async fn read_report(state: &AppState, paths: &Paths) -> anyhow::Result<Report> {
    let audit = state.audit.clone();
    let dir = paths.audit.clone();
    let window = state.live.load().config.insights.redundancy_window;
    tokio::task::spawn_blocking(move || {
        if !audit.flush(FLUSH_TIMEOUT) {
            anyhow::bail!(
                "the audit log in {} was not written within {FLUSH_TIMEOUT:?}",
                dir.display()
            );
        }
        let options = report::Options {
            since: None,
            now: std::time::SystemTime::now(),
            agents: Vec::new(),
            teams: Vec::new(),
            redundancy_window: window,
        };
        Ok(report::build(&dir, None, &options)?)
    })
    .await
    .context("the report task failed")?
}

/// The report's point in two sentences.
fn summary(report: &Report) -> String {
    let (Some(support), Some(runaway)) = (
        report.agents.get("support-bot"),
        report.agents.get("runaway-loop"),
    ) else {
        return String::new();
    };
    let resolved = support.outcomes.get(OUTCOME_KIND).copied().unwrap_or(0);
    let each = support
        .cost_per_outcome_usd
        .get(OUTCOME_KIND)
        .copied()
        .unwrap_or(0.0);
    let conditions: Vec<&str> = runaway.runs_stopped.keys().map(String::as_str).collect();
    format!(
        "In short: support-bot spent ${:.6} on {resolved} resolved tickets, ${each:.6} each.\n\
         runaway-loop spent ${:.6} and reported nothing done; {:.1}% of its requests\n\
         repeated one it had just sent, and the proxy stopped its run at {} instead of\n\
         letting it loop all night.\n",
        support.cost_usd,
        runaway.cost_usd,
        runaway.redundant_share * 100.0,
        conditions.join(" and "),
    )
}

/// The figures the demo exists to show; missing ones mean something is broken.
fn check_report(report: &Report) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if !report.chain.ok {
        missing.push(format!(
            "the audit chain is broken: {}",
            report.chain.error.as_deref().unwrap_or("?")
        ));
    }
    let runaway = report.agents.get("runaway-loop");
    if runaway.is_none_or(|f| f.runs_stopped.values().sum::<u64>() == 0) {
        missing.push("no stopped run for runaway-loop".to_owned());
    }
    if runaway.is_none_or(|f| f.redundant_requests == 0) {
        missing.push("no redundant request for runaway-loop".to_owned());
    }
    let support = report.agents.get("support-bot");
    let outcomes = support.and_then(|f| f.outcomes.get(OUTCOME_KIND).copied());
    if outcomes != Some(agents::TICKETS.len() as u64) {
        missing.push(format!(
            "support-bot has {} {OUTCOME_KIND} outcomes, not {}",
            outcomes.unwrap_or(0),
            agents::TICKETS.len()
        ));
    }
    if support.is_none_or(|f| !f.cost_per_outcome_usd.contains_key(OUTCOME_KIND)) {
        missing.push("no cost per outcome for support-bot".to_owned());
    }
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "the report is not what the demo expects: {}",
            missing.join("; ")
        )
    }
}

// === setup ===

/// The virtual keys and the admin token, fresh for each demo.
struct Keys {
    support_bot: String,
    runaway_loop: String,
    admin: String,
}

impl Keys {
    fn generate() -> Keys {
        let token: [u8; 32] = rand::random();
        Keys {
            support_bot: crate::identity::new_virtual_key(),
            runaway_loop: crate::identity::new_virtual_key(),
            admin: hex::encode(token),
        }
    }
}

struct Addrs {
    proxy: SocketAddr,
    admin: SocketAddr,
    mock: SocketAddr,
}

/// Where the demo keeps its files, absolute (so the suggested commands work from
/// anywhere).
struct Paths {
    config: PathBuf,
    audit: PathBuf,
}

impl Paths {
    fn new(config: &Path, state: &AppState) -> Paths {
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        Paths {
            config: absolute(config),
            audit: absolute(&state.live.load().config.storage.dir.join("audit")),
        }
    }
}

/// The directory for the config and the audit log: `dir` if given (new or empty, so the
/// report shows this demo alone), else a fresh one under the temporary directory.
fn prepare_dir(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    match dir {
        Some(dir) => {
            let empty = match std::fs::read_dir(dir) {
                Ok(mut entries) => entries.next().is_none(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
            };
            if !empty {
                anyhow::bail!(
                    "{} is not empty: give --dir a new or empty directory (the demo writes \
                     its config and audit log there)",
                    dir.display()
                );
            }
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Ok(dir.to_path_buf())
        }
        None => {
            let name = format!(
                "tokenwarden-demo-{}-{:08x}",
                jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S"),
                rand::random::<u32>()
            );
            let dir = std::env::temp_dir().join(name);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Ok(dir)
        }
    }
}

/// The demo's config: the mock as the only provider, the two agents with fresh keys,
/// run limits for the runaway one. Loaded and validated like any other config.
fn demo_config(mock: SocketAddr, keys: &Keys) -> String {
    let support = crate::identity::key_digest_hex(&keys.support_bot);
    let runaway = crate::identity::key_digest_hex(&keys.runaway_loop);
    format!(
        r#"# Written by `tokenwarden demo`. The virtual keys and the admin token were made for
# that run alone; the mock provider it started is gone once the demo ends.

[server]
listen = "127.0.0.1:0"             # port 0: the OS picks a free port
shutdown_grace = "5s"

[admin]
listen = "127.0.0.1:0"
token_env = "{ADMIN_TOKEN_ENV}"

[storage]
dir = "data"                       # the audit log is data/audit/

# The mock provider stands in for OpenAI, at the path an SDK would use:
# OPENAI_BASE_URL=http://PROXY/openai/v1
[[providers]]
name = "mock"
kind = "openai"
base_url = "http://{mock}"
prefix = "/openai"

[[teams]]
id = "support"

[[teams]]
id = "research"

[[agents]]
id = "support-bot"
team = "support"
key_sha256 = "{support}"
models = ["gpt-4o", "gpt-4o-mini"]
[[agents.budgets]]
period = "day"
usd = 5.0

[[agents]]
id = "runaway-loop"
team = "research"
key_sha256 = "{runaway}"
[agents.runs]
max_tokens = {RUNAWAY_MAX_TOKENS}                 # settled tokens of one run
max_repeats = {RUNAWAY_MAX_REPEATS}                    # the identical request, per run
max_requests = {RUNAWAY_MAX_REQUESTS}                  # requests of one run
action = "stop"                    # refuse the run's next request (403)
"#
    )
}

/// `12345` as `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_passes_the_config_loader() {
        let keys = Keys::generate();
        let text = demo_config("127.0.0.1:4000".parse().unwrap(), &keys);
        let config = crate::config::Config::parse(&text).unwrap();
        let ids: Vec<&str> = config.agents.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["support-bot", "runaway-loop"]);
        let runs = config.agents[1].runs.as_ref().unwrap();
        assert_eq!(runs.max_tokens, Some(RUNAWAY_MAX_TOKENS));
        assert_eq!(runs.max_repeats, Some(RUNAWAY_MAX_REPEATS));
        assert_eq!(config.providers[0].base_url, "http://127.0.0.1:4000");
        // Only digests of the keys are written, never the keys.
        assert!(!text.contains(&keys.support_bot) && !text.contains(&keys.admin));
        let live = crate::proxy::Live::new(config, |name| {
            (name == ADMIN_TOKEN_ENV).then(|| keys.admin.clone())
        })
        .unwrap();
        assert_eq!(live.admin_tokens.len(), 1);
        assert!(live.pricing.price(agents::MODEL).is_some(), "priced");
    }

    #[test]
    fn a_given_dir_must_be_new_or_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("new/demo");
        assert_eq!(prepare_dir(Some(&fresh)).unwrap(), fresh);
        assert!(fresh.is_dir());
        assert!(prepare_dir(Some(&fresh)).is_ok(), "empty is fine");
        std::fs::write(fresh.join("tokenwarden.toml"), "").unwrap();
        let err = prepare_dir(Some(&fresh)).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
