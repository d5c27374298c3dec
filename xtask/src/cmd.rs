//! Small helpers for running child processes with readable errors.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A `cargo` command running in `dir`.
///
/// Uses the `cargo` that launched us (`$CARGO`, set by `cargo run`) so every step runs on the same
/// toolchain as `cargo xtask` itself; falls back to `cargo` on `PATH` when started directly.
pub fn cargo(dir: &Path) -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(program);
    command.current_dir(dir);
    command
}

/// Renders a command as a shell-like line for logs and error messages.
pub fn display(command: &Command) -> String {
    let program = Path::new(command.get_program());
    // Print `cargo`, not the long toolchain path from `$CARGO`, to keep logs readable.
    let mut line = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned();
    for arg in command.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Echoes `command`, runs it with inherited stdio, and fails unless it exits successfully.
pub fn run(command: &mut Command) -> Result<()> {
    let line = display(command);
    println!("$ {line}");
    let status = command
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `command` with all output discarded and reports whether it exited successfully;
/// a command that cannot be started counts as a failure.
pub fn succeeds_quietly(command: &mut Command) -> bool {
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Echoes `command`, runs it with stderr inherited, and returns its standard output; fails
/// unless it exits successfully.
pub fn output(command: &mut Command) -> Result<String> {
    let line = display(command);
    println!("$ {line}");
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!("`{line}` failed ({}): {}", output.status, stdout.trim());
    }
    Ok(stdout)
}
