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
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// How long leftover tasks and blocking threads get once the agent has returned.
const RUNTIME_GRACE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    gocast_common::heap::keep_large_blocks_mapped();
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
        Command::Status { agent, output } => {
            exit(runtime().and_then(|rt| rt.block_on(client::status(&agent, output))))
        }
        Command::Routes {
            peer,
            output,
            agent,
        } => exit(
            runtime().and_then(|rt| rt.block_on(client::routes(&agent, peer.as_deref(), output))),
        ),
        Command::Reload { agent, output } => {
            exit(runtime().and_then(|rt| rt.block_on(client::reload(&agent, output))))
        }
        Command::Drain { app, agent, output } => exit(
            runtime()
                .and_then(|rt| rt.block_on(client::drain(&agent, app.as_deref(), true, output))),
        ),
        Command::Undrain { app, agent, output } => exit(
            runtime()
                .and_then(|rt| rt.block_on(client::drain(&agent, app.as_deref(), false, output))),
        ),
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
            let builder = builder
                .event_format(Prioritized {
                    inner: tracing_subscriber::fmt::format(),
                    journal: std::env::var_os("JOURNAL_STREAM").is_some(),
                })
                .with_env_filter(filter)
                .with_filter_reloading();
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

/// The text format, each line prefixed with its syslog priority (`<3>` error, `<4>` warning,
/// `<6>` info, `<7>` debug and trace) when systemd connects stderr to the journal: journald
/// takes the prefix as the line's priority (`SyslogLevelPrefix=`, on by default), so
/// `journalctl -p warning` finds the agent's warnings; without it every line is info.
/// `JOURNAL_STREAM` is only set by systemd for a service whose output goes to the journal.
/// JSON lines keep their `level` field instead.
struct Prioritized<F> {
    inner: F,
    journal: bool,
}

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if self.journal {
            write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// The syslog priority (RFC 5424 severity) of a tracing level.
fn syslog_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

fn reload_filter<S>(
    handle: &tracing_subscriber::reload::Handle<EnvFilter, S>,
    filter: &str,
) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the formatter writes.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_all_levels(journal: bool) -> String {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || out.clone())
            .event_format(Prioritized {
                inner: tracing_subscriber::fmt::format(),
                journal,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("e");
            tracing::warn!(peer = "198.18.0.2", "w");
            tracing::info!("i");
            tracing::debug!("d");
            tracing::trace!("t");
        });
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn lines_for_the_journal_start_with_their_syslog_priority() {
        let text = log_all_levels(true);
        let prefixes: Vec<_> = text.lines().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>", "<7>"], "{text}");
        assert!(text.lines().nth(1).unwrap().contains("WARN"), "{text}");
        assert!(text.contains("peer=\"198.18.0.2\""), "{text}");
    }

    #[test]
    fn lines_for_a_terminal_or_file_have_no_prefix() {
        let text = log_all_levels(false);
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.lines().all(|l| !l.starts_with('<')), "{text}");
    }
}
