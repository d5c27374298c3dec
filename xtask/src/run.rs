//! `cargo xtask run`: build the agent and replace this process with it.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

use crate::release;

/// First arguments the agent accepts as-is; anything else gets `run` put in front so
/// `cargo xtask run -- --config FILE` starts the agent without spelling out its subcommand.
const AGENT_SUBCOMMANDS: &[&str] = &["run", "check-config", "status", "help", "--version", "-V"];

/// Arguments of `cargo xtask run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Build and run the release profile instead of debug.
    #[arg(long)]
    release: bool,

    /// Arguments passed to the agent; `run` is prepended unless the first one is a subcommand.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "AGENT_ARGS"
    )]
    args: Vec<String>,
}

/// Builds the eBPF object and `gocast-agent` ([`release::agent`]) and execs it with the pass-through arguments.
///
/// Exec (rather than spawn and wait) hands signals such as Ctrl-C straight to the agent and makes
/// its exit code ours without any forwarding logic. Returns only if building or exec fails.
pub fn run(args: &RunArgs) -> Result<()> {
    let binary = release::agent(if args.release { "release" } else { "dev" })?;

    // The agent keeps the caller's working directory so relative paths like `--config
    // config/minimal.yaml` resolve where the user typed them.
    let mut agent = Command::new(&binary);
    agent.args(agent_args(&args.args));
    let error = agent.exec();
    Err(error).with_context(|| format!("failed to exec `{}`", binary.display()))
}

/// The agent's command line: `args`, with `run` in front unless they already start with one of
/// the agent's subcommands.
fn agent_args(args: &[String]) -> Vec<String> {
    let starts_with_subcommand = args
        .first()
        .is_some_and(|first| AGENT_SUBCOMMANDS.contains(&first.as_str()));
    let mut full = Vec::with_capacity(args.len() + 1);
    if !starts_with_subcommand {
        full.push("run".to_owned());
    }
    full.extend_from_slice(args);
    full
}

#[cfg(test)]
mod tests {
    use super::agent_args;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|&arg| arg.to_owned()).collect()
    }

    #[test]
    fn inserts_run_before_options() {
        assert_eq!(
            agent_args(&strings(&["--config", "config/minimal.yaml"])),
            strings(&["run", "--config", "config/minimal.yaml"])
        );
    }

    #[test]
    fn inserts_run_when_empty() {
        assert_eq!(agent_args(&[]), strings(&["run"]));
    }

    #[test]
    fn keeps_explicit_subcommands() {
        for sub in ["run", "check-config", "status", "help", "--version"] {
            let args = strings(&[sub, "--config", "x.yaml"]);
            assert_eq!(agent_args(&args), args);
        }
    }
}
