//! The agent as it ships: glibc linked statically (`static-pie`), for the host's target, and in
//! release builds its steady state's code first ([`CODE_ORDER`]).
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

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{build_ebpf, cmd, workspace_root};

/// The functions the agent runs in its steady state, in the order the linker puts them first in
/// the release binary's text (docs/benchmarks.md, "### Memory", how it is made): the kernel maps
/// code around each page fault in 64 KiB windows, so the steady state's ~1 MiB of code spread
/// over 6 MB kept nearly all of it resident.
const CODE_ORDER: &str = "gocast-agent/code-order.txt";
/// The target whose default linker (rustc's own `lld`) reads [`CODE_ORDER`].
const ORDERED_TARGET: &str = "x86_64-unknown-linux-gnu";

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
    let flags = rustflags(profile, &triple, &root);
    if !flags.is_empty() {
        let list: Vec<String> = flags.iter().map(|f| format!("\"-C\", \"{f}\"")).collect();
        build
            .arg("--config")
            .arg(format!("target.{triple}.rustflags=[{}]", list.join(", ")));
    }
    cmd::run(&mut build).context("building the agent")?;
    let dir = if profile == "dev" { "debug" } else { profile };
    Ok(build_ebpf::target_dir(&root)
        .join(&triple)
        .join(dir)
        .join("gocast"))
}

/// The `-C` flags of the agent's build: glibc linked statically where the target's C library is
/// glibc, and in release builds for [`ORDERED_TARGET`] the steady state's code first
/// ([`CODE_ORDER`]).
fn rustflags(profile: &str, triple: &str, root: &Path) -> Vec<String> {
    let mut flags = Vec::new();
    if triple.ends_with("-gnu") {
        flags.push("target-feature=+crt-static".to_owned());
    }
    if profile == "release" && triple == ORDERED_TARGET {
        let order = root.join(CODE_ORDER);
        flags.push(format!(
            "link-arg=-Wl,--symbol-ordering-file={}",
            order.display()
        ));
        // Names the order file lists that this build does not have (renamed or inlined since
        // it was made) are left out silently; the rest is still grouped.
        flags.push("link-arg=-Wl,--no-warn-symbol-ordering".to_owned());
    }
    flags
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_release_build_for_x86_64_gnu_puts_the_steady_states_code_first() {
        let root = Path::new("/src");
        let release = rustflags("release", ORDERED_TARGET, root);
        assert_eq!(release[0], "target-feature=+crt-static");
        assert!(
            release.contains(&format!(
                "link-arg=-Wl,--symbol-ordering-file=/src/{CODE_ORDER}"
            )),
            "{release:?}"
        );
        assert_eq!(
            rustflags("dev", ORDERED_TARGET, root),
            ["target-feature=+crt-static"]
        );
        assert_eq!(
            rustflags("release", "aarch64-unknown-linux-gnu", root),
            ["target-feature=+crt-static"],
            "GNU ld (aarch64's default linker) has no --symbol-ordering-file"
        );
        assert!(rustflags("release", "x86_64-unknown-linux-musl", root).is_empty());
    }

    #[test]
    fn the_code_order_file_lists_functions() {
        let order = std::fs::read_to_string(workspace_root().join(CODE_ORDER)).unwrap();
        let names: Vec<&str> = order.lines().collect();
        assert!(names.len() > 500, "{} names", names.len());
        assert!(
            names
                .iter()
                .all(|n| !n.is_empty() && !n.contains(char::is_whitespace))
        );
    }
}
