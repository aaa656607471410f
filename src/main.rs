//! The command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokenwarden::admin::reload::load_live;
use tokenwarden::admin::Caller;
use tokenwarden::audit;
use tokenwarden::config::Config;
use tokenwarden::proxy::AppState;
use tokenwarden::server;
use tokenwarden::start;

#[derive(Parser)]
#[command(
    name = "tokenwarden",
    version,
    about = "The meter, the budget and the brake between agents and LLM providers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[arg(long, default_value = "config/tokenwarden.toml")]
        config: PathBuf,
    },
    /// Validate a config file and report every problem.
    Check {
        #[arg(long, default_value = "config/tokenwarden.toml")]
        config: PathBuf,
    },
    /// Manage virtual keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Work with the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Insights from the audit log: spend, cost per outcome, redundant requests, stopped
    /// runs, context growth, per agent and per team. The chain is verified as it is read;
    /// a broken chain is reported (stderr and report, exit status 2) beside the figures.
    Report {
        #[arg(long, default_value = "config/tokenwarden.toml")]
        config: PathBuf,
        /// Only the last DURATION (humantime: 7d, 24h, 90m); default: the whole log.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Only these agents (repeat, or a comma-separated list).
        #[arg(long, value_delimiter = ',')]
        agent: Vec<String>,
        /// Only these teams (repeat, or a comma-separated list).
        #[arg(long, value_delimiter = ',')]
        team: Vec<String>,
        #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
        format: ReportFormat,
    },
    /// See it work in a few seconds, with no API key and no network: a mock provider,
    /// the proxy and two simulated agents, one of them a runaway loop the proxy stops;
    /// then the report on what happened.
    Demo {
        /// Keep the demo's config and audit log in this new or empty directory (default:
        /// a fresh directory under the system's temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// After the report, keep the proxy and the mock serving until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
    /// Run the scriptable mock provider (for tests, benchmarks and trying things out).
    Mock {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
        /// Keep no log of requests (for load tests).
        #[arg(long)]
        no_record: bool,
        /// Serve TLS (HTTP/2 and HTTP/1.1 by ALPN) with this PEM certificate chain...
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// ...and this PEM private key.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReportFormat {
    Table,
    Json,
    Csv,
    Html,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit files; exit 1 at the first broken line.
    Verify {
        /// Audit files or directories; default: the audit directory of the config.
        paths: Vec<PathBuf>,
        /// The config naming the audit directory and the HMAC key variable.
        #[arg(long, default_value = "config/tokenwarden.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a fresh virtual key once, with the config line that admits it.
    New {
        #[arg(long)]
        agent: String,
    },
}

/// Exit status of a report printed from an audit log whose chain is broken.
const EXIT_CHAIN_BROKEN: u8 = 2;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(Done::Ok) => std::process::ExitCode::SUCCESS,
        Ok(Done::ChainBroken) => std::process::ExitCode::from(EXIT_CHAIN_BROKEN),
        Err(e) => {
            // Plain words for the operator; no backtrace noise.
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// How a command that did its work ended.
enum Done {
    Ok,
    /// The report was printed, but the audit chain it read is broken.
    ChainBroken,
}

fn run(cli: Cli) -> anyhow::Result<Done> {
    if let Command::Report {
        config,
        since,
        agent,
        team,
        format,
    } = cli.command
    {
        // No log subscriber: the report is all a person (or script) asked for.
        return report(config, since, agent, team, format);
    }
    run_other(cli).map(|()| Done::Ok)
}

fn run_other(cli: Cli) -> anyhow::Result<()> {
    // The demo tells its story on stdout; the access log and the proxy's warnings about
    // the stop it provokes would drown it.
    let level = match cli.command {
        Command::Demo { .. } => "error",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match cli.command {
        Command::Serve { config } => {
            let runtime = runtime()?;
            let state = runtime.block_on(serve(config))?;
            // Dropping the runtime ends what the grace period left open; those requests
            // settle now, and closing the audit log afterwards writes their records.
            drop(runtime);
            state.settler.close();
            state.audit.close();
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { paths, config },
        } => audit_verify(paths, config),
        Command::Check { config } => check(&config),
        Command::Keys {
            command: KeysCommand::New { agent },
        } => {
            if agent.is_empty() {
                anyhow::bail!("--agent: an agent id must not be empty");
            }
            let key = tokenwarden::identity::new_virtual_key();
            let digest = tokenwarden::identity::key_digest_hex(&key);
            // Quoted as TOML quotes it, so the line pastes into the config as it is.
            let id = toml::Value::String(agent).to_string();
            say(&format!(
                "virtual key for agent {id} (shown once, store it now):\n  {key}\n\n\
                 add to the config:\n  [[agents]]\n  id = {id}\n  key_sha256 = \"{digest}\""
            ));
            Ok(())
        }
        // Taken by `run` before the log subscriber is set up.
        Command::Report { .. } => Ok(()),
        Command::Demo { dir, keep_running } => {
            let options = tokenwarden::demo::Options {
                dir,
                keep_running,
                program: program_name(),
            };
            let runtime = runtime()?;
            let state =
                runtime.block_on(tokenwarden::demo::run(&options, &say, shutdown_signal()))?;
            // As after `serve`: settle what is left, then write the last audit lines.
            drop(runtime);
            state.settler.close();
            state.audit.close();
            Ok(())
        }
        Command::Mock {
            listen,
            no_record,
            tls_cert,
            tls_key,
        } => runtime()?.block_on(async move {
            let tls = match (tls_cert, tls_key) {
                (Some(cert_file), Some(key_file)) => {
                    Some(server::tls_acceptor(&tokenwarden::config::TlsConfig {
                        cert_file,
                        key_file,
                    })?)
                }
                _ => None,
            };
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            say(&format!(
                "mock provider listening on {}://{}",
                if tls.is_some() { "https" } else { "http" },
                listener.local_addr()?
            ));
            tokio::select! {
                _ = tokenwarden::mock::Mock::new(!no_record).serve(listener, tls) => {}
                _ = shutdown_signal() => {}
            }
            Ok(())
        }),
    }
}

/// This program as the user started it, for commands a message suggests: the path when
/// it was started by one (`target/release/tokenwarden`), else its name.
fn program_name() -> String {
    std::env::args()
        .next()
        .filter(|p| p.contains('/'))
        .unwrap_or_else(|| "tokenwarden".to_owned())
}

/// Writes a line for the person (or test) that started the command.
#[allow(clippy::print_stdout)]
fn say(line: &str) {
    println!("{line}");
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let live = load_live(path)?;
    if let Some(tls) = &live.config.server.tls {
        server::tls_acceptor(tls)?;
    }
    tokenwarden::proxy::upstream_tls(&live.config.upstream)?;
    say(&format!(
        "{}: ok ({} providers, {} agents)",
        path.display(),
        live.router.providers().len(),
        live.identities.len()
    ));
    Ok(())
}

fn audit_verify(paths: Vec<PathBuf>, config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path);
    let key = match &config {
        Ok(config) => start::audit_key(config, env_var)?,
        Err(_) => None,
    };
    let paths = if paths.is_empty() {
        vec![config?.storage.dir.join("audit")]
    } else {
        paths
    };
    match audit::verify::verify(&paths, key.as_ref().map(|k| k.expose().as_slice())) {
        Ok(v) => {
            say(&format!(
                "ok: {} records in {} files (seq {} to {})",
                v.records,
                v.files,
                v.first_seq.unwrap_or(0),
                v.last_seq.unwrap_or(0)
            ));
            Ok(())
        }
        Err(broken) => anyhow::bail!("audit chain broken at {broken}"),
    }
}

fn report(
    config_path: PathBuf,
    since: Option<std::time::Duration>,
    agents: Vec<String>,
    teams: Vec<String>,
    format: ReportFormat,
) -> anyhow::Result<Done> {
    use tokenwarden::report;
    let config = Config::load(&config_path)?;
    let key = start::audit_key(&config, env_var)?;
    let dir = config.storage.dir.join("audit");
    let options = report::Options {
        since,
        now: std::time::SystemTime::now(),
        agents: agents.into_iter().filter(|a| !a.is_empty()).collect(),
        teams: teams.into_iter().filter(|t| !t.is_empty()).collect(),
        redundancy_window: config.insights.redundancy_window,
    };
    let report = report::build(&dir, key.as_ref().map(|k| k.expose().as_slice()), &options)?;
    let text = match format {
        ReportFormat::Table => report::table::render(&report),
        ReportFormat::Json => report::json::render(&report),
        ReportFormat::Csv => report::csv::render(&report),
        ReportFormat::Html => report::html::render(&report),
    };
    write_stdout(&text)?;
    #[allow(clippy::print_stderr)]
    {
        if report.lines.malformed > 0 {
            eprintln!(
                "warning: {} malformed audit lines skipped (first: {})",
                report.lines.malformed,
                report.lines.malformed_at.join("; ")
            );
        }
        if !report.chain.ok {
            eprintln!(
                "AUDIT CHAIN BROKEN at {} ({} breaks): the figures come from a log that was altered",
                report.chain.error.as_deref().unwrap_or("?"),
                report.chain.errors
            );
            return Ok(Done::ChainBroken);
        }
    }
    Ok(Done::Ok)
}

/// Writes a whole document to stdout (a closed pipe is not an error worth a panic).
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

async fn serve(path: PathBuf) -> anyhow::Result<Arc<AppState>> {
    // Reloads read the same file even if something changes the working directory.
    let path = std::path::absolute(&path).unwrap_or(path);
    // Before the listening line: from then on a SIGHUP must reload, never kill.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    let started = start::start(&path, env_var).await?;
    let scheme = if started.state.live.load().config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    say(&format!(
        "tokenwarden listening on {scheme}://{} (admin http://{})",
        started.listeners.proxy.local_addr()?,
        started.listeners.admin.local_addr()?
    ));
    let state = Arc::new(started.state.with_config_path(path));
    tokio::select! {
        served = server::run(state.clone(), started.listeners, shutdown_signal()) => served?,
        never = reload_on_hangup(&state, hangup) => match never {},
    }
    if let Some(redis) = &state.redis {
        redis.close(std::time::Duration::from_secs(5)).await;
    }
    Ok(state)
}

/// Reads an environment variable a config names.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Reloads the config on every SIGHUP, for as long as the server runs. A config that
/// does not load is logged at error level (and audited); the running one stays.
async fn reload_on_hangup(
    state: &AppState,
    mut hangup: tokio::signal::unix::Signal,
) -> std::convert::Infallible {
    loop {
        if hangup.recv().await.is_none() {
            // The signal stream is gone: nothing more to reload on, the server goes on.
            return std::future::pending().await;
        }
        // The outcome is logged and audited by `reload`.
        let _ = tokenwarden::admin::reload::reload(state, &Caller::sighup()).await;
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
