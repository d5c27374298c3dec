//! The `gocast` binary: parses the command line, sets up logging and the runtime, and wires
//! the library's tasks together. Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage.

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use gocast::{
    agent::LogFilter,
    cli::{self, Cli, Command, LogFormat},
    client,
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
    let log = init_tracing(cli.log_format, cli.log_level.as_deref());
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
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    error!("{e}");
                    return ExitCode::from(2);
                }
            };
            exit(runtime().and_then(|rt| {
                let result = rt.block_on(gocast::agent::run(config, path, log));
                // A stuck task (a lifecycle that stopped turning) must not hold up the exit that
                // lets systemd restart the agent; after a clean shutdown nothing is left to wait for.
                rt.shutdown_timeout(RUNTIME_GRACE);
                result
            }))
        }
        Command::Status { agent } => {
            exit(runtime().and_then(|rt| rt.block_on(client::status(&agent))))
        }
        Command::Reload { agent } => {
            exit(runtime().and_then(|rt| rt.block_on(client::reload(&agent))))
        }
        Command::Drain { app, agent } => {
            exit(runtime().and_then(|rt| rt.block_on(client::drain(&agent, app.as_deref(), true))))
        }
        Command::Undrain { app, agent } => {
            exit(runtime().and_then(|rt| rt.block_on(client::drain(&agent, app.as_deref(), false))))
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

/// Logs to stderr with the filter from `--log-level`, else `RUST_LOG`, else `info`. Returns how
/// to change the filter later (`agent.log_level`, applied at start and on reload), unless the
/// command line or the environment fixed it.
fn init_tracing(format: LogFormat, level: Option<&str>) -> Option<LogFilter> {
    let fixed = level
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok());
    let reloadable = fixed.is_none();
    let filter = fixed.unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in journald or log files.
    // `init()` also installs `LogTracer` (tracing-subscriber's `tracing-log` feature): records of
    // the `log` crate, among them the eBPF programs' (aya-log, target `gocast_ebpf::logs`), become
    // events under the same filter and format. The eBPF dataplane asks this filter which levels
    // its programs should log at when it loads them.
    // The filter goes on last: the reload handle's type names everything before it.
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let set: LogFilter = match format {
        LogFormat::Text => {
            let builder = builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |f| reload_filter(&handle, f))
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |f| reload_filter(&handle, f))
        }
    };
    reloadable.then_some(set)
}

fn reload_filter<S>(
    handle: &tracing_subscriber::reload::Handle<EnvFilter, S>,
    filter: &str,
) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())
}
