//! The agent as it ships: glibc linked statically (`static-pie`), for the host's target.
//!
//! A dynamically linked agent keeps libc, libm, libgcc and the dynamic loader mapped; the pages
//! of them it touches stay resident, ~2 MiB of its 7.5 MiB when idle (docs/benchmarks.md,
//! "### Memory"). Linked statically, only the C library functions the agent calls are in the
//! binary, and its start-up page-out covers them like the agent's own code. glibc's NSS
//! lookups the agent makes (a Consul host name, the API socket's group) read `files` and `dns`
//! without loading a module; other NSS sources load the modules of the glibc the package was
//! built against (docs/operations.md, "A statically linked binary").
//!
//! `+crt-static` is passed for the target only (`--target`): applied without it, cargo would
//! also link proc-macros statically, which cannot be done. So the binary lands in
//! `target/<triple>/<profile>/gocast`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{build_ebpf, cmd, workspace_root};

/// Names the agent binary the end-to-end tests run (`gocast-tests`' `agent_binary`); without
/// it they run `target/debug/gocast`.
pub const AGENT_BIN_VAR: &str = "GOCAST_AGENT_BIN";

/// `cargo build` of the agent's binary for the host's target, glibc linked statically where the
/// target's C library is glibc; `profile` is `dev` or `release`.
pub fn build_agent(profile: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let triple = host_triple()?;
    let mut build = cmd::cargo(&root);
    build
        .args(["build", "--package", "gocast-agent", "--bin", "gocast"])
        .args(["--profile", profile, "--target", &triple]);
    if triple.ends_with("-gnu") {
        build.arg("--config").arg(format!(
            "target.{triple}.rustflags=[\"-C\", \"target-feature=+crt-static\"]"
        ));
    }
    cmd::run(&mut build).context("building the agent")?;
    let dir = if profile == "dev" { "debug" } else { profile };
    Ok(build_ebpf::target_dir(&root)
        .join(&triple)
        .join(dir)
        .join("gocast"))
}

/// Builds the eBPF object the agent embeds (without it, the agent runs on the iptables
/// fallback), then the agent with `profile` ([`build_agent`]); returns its path.
pub fn agent(profile: &str) -> Result<PathBuf> {
    build_ebpf::run().context("building the eBPF object")?;
    build_agent(profile)
}

/// The target triple `rustc` builds for by default (`host:` of `rustc -vV`).
pub fn host_triple() -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = cmd::output(Command::new(rustc).arg("-vV"))?;
    match out.lines().find_map(|l| l.strip_prefix("host: ")) {
        Some(triple) => Ok(triple.trim().to_owned()),
        None => bail!("`rustc -vV` printed no `host:` line"),
    }
}
