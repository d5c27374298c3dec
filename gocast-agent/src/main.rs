//! The `gocast` binary: parses the command line, sets up logging and the runtime, and wires
//! the library's tasks together. Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage.

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use gocast::{
    cli::{self, Cli, Command, LogFormat},
    config::Config,
};
use tracing::error;
use tracing_subscriber::EnvFilter;

/// How long leftover tasks and blocking threads get once the agent has returned.
const RUNTIME_GRACE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(cli::normalize(std::env::args_os().collect())) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing(cli.log_format, cli.log_level.as_deref());
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                print!("{}", c.to_yaml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::from(2);
                }
            };
            exit(runtime().and_then(|rt| {
                let result = rt.block_on(gocast::agent::run(config));
                // A stuck task (a lifecycle that stopped turning) must not hold up the exit that
                // lets systemd restart the agent; after a clean shutdown nothing is left to wait for.
                rt.shutdown_timeout(RUNTIME_GRACE);
                result
            }))
        }
        Command::Status { addr, config } => {
            exit(runtime().and_then(|rt| rt.block_on(status(addr, config))))
        }
    }
}

fn exit(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two workers: the agent's work is small and bursty; more threads only cost memory.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn init_tracing(format: LogFormat, level: Option<&str>) {
    let filter = level
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in journald or log files.
    // `init()` also installs `LogTracer` (tracing-subscriber's `tracing-log` feature): records of
    // the `log` crate, among them the eBPF programs' (aya-log, target `gocast_ebpf::logs`), become
    // events under the same filter and format. The eBPF dataplane asks this filter which levels
    // its programs should log at when it loads them.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn status(addr: String, config: Option<std::path::PathBuf>) -> Result<()> {
    let addr = match config {
        Some(path) => {
            let c = Config::load(&path)?;
            let a = c.agent.listen_addr.addr;
            // An agent listening on all interfaces is reachable on loopback.
            let ip = if a.ip().is_unspecified() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                a.ip()
            };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        None => addr,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let get = |path: &str| {
        let url = format!("http://{addr}{path}");
        let client = client.clone();
        async move {
            client
                .get(&url)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .with_context(|| format!("asking the agent at {url}"))?
                .json::<serde_json::Value>()
                .await
                .with_context(|| format!("reading {url}"))
        }
    };
    let info = get("/info").await?;
    let apps = get("/apps").await?;
    // 503 without the eBPF dataplane: the table says so.
    let stats = get("/stats").await.ok();
    print!("{}", cli::render_status(&info, &apps, stats.as_ref()));
    Ok(())
}
