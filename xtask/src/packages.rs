//! Host prerequisites for `cargo xtask test`: Debian packages the end-to-end tests shell out to,
//! and the rustup components the lint steps use.

use std::process::Command;

use anyhow::{Context, Result};
/// Whether the effective uid is 0: the privileged-test guard's check, one implementation.
pub use gocast_test_guard::is_root;

use crate::cmd;

/// Debian packages the end-to-end tests need: iptables/iproute2 build the topologies, bird2, frr
/// and gobgpd are the BGP peers, systemd brings `systemd-analyze` for the package check
/// (`package.rs`), python3-prometheus-client is the reference parser `/metrics` is checked with
/// (`test-guard/src/exposition.rs`), and the rest are probes and load generators.
const DEBIAN_PACKAGES: &[&str] = &[
    "iptables",
    "iproute2",
    "curl",
    "python3",
    "python3-prometheus-client",
    "bird2",
    "frr",
    "gobgpd",
    "tcpdump",
    "bpftool",
    "wrk",
    "systemd",
];

/// Seconds any single apt-get or rustup call may take, so a stuck mirror fails CI instead of
/// hanging it until the job's own (much longer) timeout.
const INSTALL_TIMEOUT_SECS: &str = "600";

/// Installs missing Debian packages when running as root; otherwise only reports them, since the
/// privileged tests skip or fail on their own without them.
pub fn ensure_debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        println!("all Debian packages present: {}", DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    if !is_root() {
        println!(
            "warning: not root, not installing missing Debian packages: {}",
            missing.join(" ")
        );
        return Ok(());
    }

    println!("installing missing Debian packages: {}", missing.join(" "));
    cmd::run(Command::new("timeout").args([INSTALL_TIMEOUT_SECS, "apt-get", "update"]))
        .context("apt-get update (exit status 124 means it timed out)")?;
    cmd::run(
        Command::new("timeout")
            .args([
                INSTALL_TIMEOUT_SECS,
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
            ])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install (exit status 124 means it timed out)")?;
    Ok(())
}

/// Adds the rustfmt and clippy components if `cargo fmt` / `cargo clippy` are unavailable, as on
/// a minimal rustup profile.
pub fn ensure_rust_components() -> Result<()> {
    let root = crate::workspace_root();
    let missing: Vec<&str> = [("fmt", "rustfmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(subcommand, _)| {
            !cmd::succeeds_quietly(cmd::cargo(&root).args([subcommand, "--version"]))
        })
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        println!("rustfmt and clippy present");
        return Ok(());
    }
    cmd::run(
        Command::new("timeout")
            .args([INSTALL_TIMEOUT_SECS, "rustup", "component", "add"])
            .args(&missing)
            .current_dir(&root),
    )
    .context("rustup component add (exit status 124 means it timed out)")
}

/// Whether dpkg reports `package` as fully installed. Unknown packages, and hosts without
/// dpkg, count as not installed.
fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(std::process::Stdio::null())
        .output()
        .is_ok_and(|output| output.status.success() && output.stdout == b"install ok installed")
}
