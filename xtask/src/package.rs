//! `cargo xtask package`: the Debian package, built by cargo-deb from
//! `[package.metadata.deb]` in `gocast-agent/Cargo.toml`, and the check of its contents.
//!
//! The real package is built from the release profile (fat LTO: minutes). `cargo xtask test`
//! runs `package --check` instead: it packages the debug binary the `build` step has just made
//! (`cargo deb --no-build --profile dev`, fast compression), so CI spends seconds, not a second
//! LTO build, and the same [`verify`] runs on both. What is verified is the packaging — paths,
//! modes, conffiles, maintainer scripts, the unit, the shipped config — not the optimizer.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::{build_ebpf, cmd, release, workspace_root};

/// The cargo-deb release the packaging is written and checked against; installed with
/// `cargo install --locked` when a different one (or none) is present.
const CARGO_DEB_VERSION: &str = "3.8.0";
/// The workspace package that carries `[package.metadata.deb]`.
const AGENT_PACKAGE: &str = "gocast-agent";
/// The Debian package's name.
const DEB_NAME: &str = "gocast";
/// Where the unit lands (`/lib/systemd/system` is the same directory on merged-/usr systems).
const UNIT_PATH: &str = "usr/lib/systemd/system/gocast.service";
/// Where the example config lands; a conffile because it is under `/etc`.
const CONFIG_PATH: &str = "etc/gocast/config.yaml";
/// Seconds `cargo install cargo-deb` may take (it compiles ~200 crates).
const INSTALL_TIMEOUT_SECS: &str = "1200";

/// Arguments of `cargo xtask package`.
#[derive(Debug, Args)]
pub struct PackageArgs {
    /// Package the debug binary of the last `cargo build` instead of building a release (what
    /// `cargo xtask test` runs), and check the package's contents.
    #[arg(long)]
    check: bool,
}

/// `cargo xtask package [--check]`.
pub fn run(args: &PackageArgs) -> Result<()> {
    if args.check {
        check()
    } else {
        let deb = build_release()?;
        verify(&deb)?;
        println!("{}", deb.display());
        Ok(())
    }
}

/// Builds the release package into `target/debian/` and returns its path: the binary is
/// [`release::agent`]'s (glibc linked statically).
fn build_release() -> Result<PathBuf> {
    let root = workspace_root();
    ensure_cargo_deb()?;
    release::agent("release")?;
    let out = build_ebpf::target_dir(&root).join("debian");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let stdout = cmd::output(
        cmd::cargo(&root)
            .args([
                "deb",
                "--locked",
                "--package",
                AGENT_PACKAGE,
                "--no-build",
                "--strip",
            ])
            .args(["--target", &release::host_triple()?, "--output"])
            .arg(&out),
    )?;
    // cargo-deb prints the path of the package it wrote as its last line.
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            Path::new(l)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("deb"))
        })
        .map(PathBuf::from)
        .context("cargo deb did not print the path of the package")?;
    Ok(deb)
}

/// What `cargo xtask test` runs after its `build` step: package the debug binary it built
/// ([`release::build_agent`]), verify.
pub fn check() -> Result<()> {
    let root = workspace_root();
    ensure_cargo_deb()?;
    let target = build_ebpf::target_dir(&root);
    let triple = release::host_triple()?;
    let binary = target.join(&triple).join("debug/gocast");
    ensure!(
        binary.is_file(),
        "{} is missing: `cargo xtask test` builds it first",
        binary.display()
    );
    let dir = target.join("debian-check");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let deb = dir.join(format!("{DEB_NAME}-check.deb"));
    println!(
        "packaging the debug binary (cargo-deb warns that the dev profile is not for releases)"
    );
    cmd::run(
        cmd::cargo(&root)
            .args(["deb", "--package", AGENT_PACKAGE, "--no-build"])
            .args(["--profile", "dev", "--target", &triple])
            .args(["--fast", "--output"])
            .arg(&deb),
    )?;
    verify(&deb)
}

/// Installs the pinned cargo-deb unless it is already there.
fn ensure_cargo_deb() -> Result<()> {
    let root = workspace_root();
    let found = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["deb", "--version"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if found
        .as_deref()
        .is_some_and(|v| v.split_whitespace().last() == Some(CARGO_DEB_VERSION))
    {
        return Ok(());
    }
    println!(
        "installing cargo-deb {CARGO_DEB_VERSION} (found: {})",
        found.as_deref().unwrap_or("none")
    );
    cmd::run(
        Command::new("timeout")
            .args([INSTALL_TIMEOUT_SECS])
            .arg(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "--locked", "cargo-deb", "--version"])
            .arg(format!("={CARGO_DEB_VERSION}"))
            .current_dir(std::env::temp_dir()),
    )
    .context("cargo install cargo-deb (exit status 124 means it timed out)")
}

/// Checks the package against what the project ships; every problem is reported, then the
/// check fails.
pub fn verify(deb: &Path) -> Result<()> {
    let mut problems = Vec::new();
    check_control(deb, &mut problems)?;
    check_listing(deb, &mut problems)?;
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    check_scripts(deb, &scratch.path().join("control"), &mut problems)?;
    check_tree(deb, &scratch.path().join("root"), &mut problems)?;
    if !problems.is_empty() {
        bail!(
            "{} is wrong:\n  - {}",
            deb.display(),
            problems.join("\n  - ")
        );
    }
    println!(
        "{} verified: control, files, conffiles, unit, config",
        deb.display()
    );
    Ok(())
}

/// Control fields: name, version, section, dependencies.
fn check_control(deb: &Path, problems: &mut Vec<String>) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    for (field, want) in [
        ("Package", DEB_NAME.to_owned()),
        ("Version", format!("{version}-1")),
        ("Section", "net".to_owned()),
    ] {
        let got = dpkg_deb(&["--field"], deb, Some(field))?;
        if got.trim() != want {
            problems.push(format!(
                "control field {field} is {:?}, want {want:?}",
                got.trim()
            ));
        }
    }
    let depends = dpkg_deb(&["--field"], deb, Some("Depends"))?;
    if !depends.split(',').any(|d| d.trim().starts_with("iptables")) {
        problems.push(format!("Depends ({}) lacks iptables", depends.trim()));
    }
    Ok(())
}

/// The files the package must hold, with their modes.
fn check_listing(deb: &Path, problems: &mut Vec<String>) -> Result<()> {
    let listing = dpkg_deb(&["--contents"], deb, None)?;
    let entry = |path: &str| {
        listing.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            let mode = fields.next()?;
            (fields.last()? == format!("./{path}")).then(|| mode.to_owned())
        })
    };
    let mut expected = vec![
        ("usr/bin/gocast", "-rwxr-xr-x"),
        (UNIT_PATH, "-rw-r--r--"),
        (CONFIG_PATH, "-rw-r--r--"),
        ("usr/share/doc/gocast/copyright", "-rw-r--r--"),
    ];
    let docs = ["README.md", "operations.md", "migration.md", "security.md"]
        .map(|d| format!("usr/share/doc/gocast/{d}"));
    expected.extend(docs.iter().map(|d| (d.as_str(), "-rw-r--r--")));
    for (path, mode) in expected {
        match entry(path) {
            None => problems.push(format!("/{path} is not in the package")),
            Some(m) if m != mode => problems.push(format!("/{path} has mode {m}, want {mode}")),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Conffiles and maintainer scripts, unpacked into `control`.
fn check_scripts(deb: &Path, control: &Path, problems: &mut Vec<String>) -> Result<()> {
    cmd::run(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(deb)
            .arg(control),
    )?;
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    let conffiles = read(&control.join("conffiles"));
    if !conffiles
        .lines()
        .any(|l| l.trim() == format!("/{CONFIG_PATH}"))
    {
        problems.push(format!(
            "/{CONFIG_PATH} is not a conffile (conffiles: {conffiles:?})"
        ));
    }
    // dh_installsystemd's scripts: registered, enabled only where the operator had enabled it
    // before (`debian-installed` guard), never started on install (the shipped config has no
    // peer), restarted on upgrade only if running (`try-restart`), stopped on remove.
    let postinst = read(&control.join("postinst"));
    let prerm = read(&control.join("prerm"));
    for (script, text, needle) in [
        (
            "postinst",
            &postinst,
            "deb-systemd-helper update-state gocast.service",
        ),
        (
            "postinst",
            &postinst,
            "deb-systemd-helper debian-installed gocast.service",
        ),
        (
            "postinst",
            &postinst,
            "deb-systemd-invoke try-restart gocast.service",
        ),
        ("prerm", &prerm, "deb-systemd-invoke stop gocast.service"),
    ] {
        if !text.contains(needle) {
            problems.push(format!("{script} lacks `{needle}`"));
        }
    }
    for verb in ["start", "restart"] {
        if postinst.contains(&format!("deb-systemd-invoke {verb} ")) {
            problems.push(format!("postinst would {verb} gocast.service on install"));
        }
    }
    Ok(())
}

/// The files themselves, unpacked into `tree`: unit and config as in `packaging/`, the binary
/// runs, the config loads and is safe, `systemd-analyze verify` is quiet.
fn check_tree(deb: &Path, tree: &Path, problems: &mut Vec<String>) -> Result<()> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    cmd::run(Command::new("dpkg-deb").arg("--extract").arg(deb).arg(tree))?;
    for (shipped, source) in [
        (UNIT_PATH, "packaging/gocast.service"),
        (CONFIG_PATH, "packaging/config.yaml"),
    ] {
        if fs::read(tree.join(shipped)).ok() != fs::read(root.join(source)).ok() {
            problems.push(format!("/{shipped} differs from {source}"));
        }
    }
    let unit = read(&tree.join(UNIT_PATH));
    problems.extend(check_unit(&unit));
    let binary = tree.join("usr/bin/gocast");
    match dynamic_loader(&binary) {
        Ok(None) => {}
        Ok(Some(loader)) => problems.push(format!(
            "/usr/bin/gocast is linked dynamically (loader {loader}), not statically"
        )),
        Err(e) => problems.push(format!("{e:#}")),
    }
    match cmd::output(Command::new(&binary).arg("--version")) {
        Ok(out) if out.trim() == format!("gocast {version}") => {}
        Ok(out) => problems.push(format!("gocast --version prints {:?}", out.trim())),
        Err(e) => problems.push(format!("{e:#}")),
    }
    // The shipped config loads, and is safe: loopback API, no exec over HTTP, no peer.
    match cmd::output(
        Command::new(&binary)
            .args(["check-config", "--config"])
            .arg(tree.join(CONFIG_PATH)),
    ) {
        Ok(normalized) => problems.extend(check_shipped_config(&normalized, &unit)),
        Err(e) => problems.push(format!("the shipped config does not load: {e:#}")),
    }
    match verify_unit(tree)? {
        Some(problem) => problems.push(problem),
        None => println!("systemd-analyze verify: {UNIT_PATH} is clean"),
    }
    Ok(())
}

/// The unit's own promises: the packaged binary and config, notify with a watchdog, reload by
/// SIGHUP, a state directory.
fn check_unit(unit: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let values = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .collect()
    };
    let exec = values("ExecStart");
    if exec != [format!("/usr/bin/gocast run --config /{CONFIG_PATH}")] {
        problems.push(format!("ExecStart is {exec:?}"));
    }
    // The agent tells systemd when it is ready and pings its watchdog; SIGHUP asks it to reload.
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ] {
        if values(key) != [want] {
            problems.push(format!("{key} is {:?}, not {want}", values(key)));
        }
    }
    if values("WatchdogSec").len() != 1 {
        problems.push("WatchdogSec is not set (the agent pings its watchdog)".into());
    }
    // systemd's default soft limit (1,024) is what idle API clients once exhausted.
    if values("LimitNOFILE")
        .first()
        .and_then(|v| v.parse::<u64>().ok())
        .is_none_or(|n| n < 4096)
    {
        problems.push("LimitNOFILE is not set to at least 4096".into());
    }
    if values("StateDirectory") != ["gocast"] {
        problems.push("StateDirectory is not gocast (/var/lib/gocast)".into());
    }
    let caps = values("CapabilityBoundingSet").join(" ");
    for cap in ["CAP_NET_ADMIN", "CAP_BPF"] {
        if !caps.split_whitespace().any(|c| c == cap) {
            problems.push(format!("CapabilityBoundingSet lacks {cap}"));
        }
    }
    let filter = values("SystemCallFilter").join(" ");
    if !filter.is_empty() && !filter.split_whitespace().any(|s| s == "bpf") {
        problems.push("SystemCallFilter does not allow bpf (the eBPF dataplane needs it)".into());
    }
    problems
}

/// `gocast check-config` output of the shipped config: what makes it safe to start as is, and
/// a state file inside the unit's `StateDirectory`.
fn check_shipped_config(normalized: &str, unit: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let has = |line: &str| normalized.lines().any(|l| l.trim() == line);
    for line in [
        "listen_addr: 127.0.0.1:8080",
        "allow_http_exec: false",
        "listen_unix: /run/gocast/api.sock",
    ] {
        if !has(line) {
            problems.push(format!("the shipped config does not say `{line}`"));
        }
    }
    if normalized.lines().any(|l| l.trim() == "vip_allowlist: []") {
        problems.push("the shipped config has no vip_allowlist".into());
    }
    let runtime = unit
        .lines()
        .find_map(|l| l.strip_prefix("RuntimeDirectory="))
        .map(str::trim);
    if runtime != Some("gocast") {
        problems.push("the unit's RuntimeDirectory is not gocast (the API socket's)".into());
    }
    if normalized.lines().any(|l| l.starts_with("bgp:")) {
        problems.push("the shipped config has a BGP peer: it would announce on install".into());
    }
    let state_file = normalized
        .lines()
        .find_map(|l| l.trim().strip_prefix("state_file: "))
        .unwrap_or_default();
    let state_dir = unit
        .lines()
        .find_map(|l| l.strip_prefix("StateDirectory="))
        .map(|d| format!("/var/lib/{}/", d.trim()));
    if !state_dir.is_some_and(|d| state_file.starts_with(&d)) {
        problems.push(format!(
            "the default state file {state_file:?} is outside the unit's StateDirectory"
        ));
    }
    problems
}

/// `systemd-analyze verify` of the packaged unit in the extracted tree (so `ExecStart` finds
/// the packaged binary), with the host's own units beside it for the targets it names and the
/// host's copy of each base-system tool it runs (`ExecReload`'s `/bin/kill`).
/// `None` when clean; warnings count as problems (the tool exits 0 on an unknown key).
fn verify_unit(tree: &Path) -> Result<Option<String>> {
    if !cmd::succeeds_quietly(Command::new("systemd-analyze").arg("--version")) {
        return Ok(Some(
            "systemd-analyze is missing: install the systemd package to verify the unit".into(),
        ));
    }
    let unit = fs::read_to_string(tree.join(UNIT_PATH)).unwrap_or_default();
    for tool in base_tools(&unit) {
        let (host, dest) = (Path::new("/").join(&tool), tree.join(&tool));
        if !dest.exists() && host.is_file() {
            if let Some(dir) = dest.parent() {
                fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            fs::copy(&host, &dest).with_context(|| format!("copying {}", host.display()))?;
        }
    }
    let units = tree.join("usr/lib/systemd/system");
    for host_dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        let Ok(entries) = fs::read_dir(host_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let dest = units.join(entry.file_name());
            if entry.path().is_file() && !dest.exists() {
                fs::copy(entry.path(), &dest)
                    .with_context(|| format!("copying {}", entry.path().display()))?;
            }
        }
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", tree.display()))
        .arg("gocast.service")
        .output()
        .context("running systemd-analyze verify")?;
    let said = String::from_utf8_lossy(&output.stderr).trim().to_owned()
        + String::from_utf8_lossy(&output.stdout).trim();
    Ok((!output.status.success() || !said.is_empty())
        .then(|| format!("systemd-analyze verify gocast.service: {said}")))
}

/// The programs the unit's `Exec*=` lines run that the package does not ship, relative to `/`
/// (`bin/kill`): the base system provides them on the target. Lines whose failure is ignored
/// (`-`) are left out: `systemd-analyze verify` does not look for their program.
fn base_tools(unit: &str) -> Vec<PathBuf> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("Exec")?.split_once('=').map(|(_, v)| v))
        .filter_map(|v| {
            let flags = v.len() - v.trim_start_matches(['@', '+', '!', ':', '-']).len();
            let program = v[flags..].split_whitespace().next()?;
            let relative = program.strip_prefix('/')?;
            let skipped = v[..flags].contains('-') || program == "/usr/bin/gocast";
            (!skipped).then(|| PathBuf::from(relative))
        })
        .collect()
}

/// `dpkg-deb ARGS DEB [FIELD]`'s standard output.
fn dpkg_deb(args: &[&str], deb: &Path, field: Option<&str>) -> Result<String> {
    let mut command = Command::new("dpkg-deb");
    command.args(args).arg(deb).args(field);
    cmd::output(&mut command)
}

/// The program interpreter (dynamic loader) an ELF64 binary names in its `PT_INTERP` program
/// header; `None` for a static binary (System V ABI, "Program Header").
fn dynamic_loader(binary: &Path) -> Result<Option<String>> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let field = |at: usize, len: usize| -> Result<u64> {
        let bytes = elf
            .get(at..at + len)
            .with_context(|| format!("{} is not an ELF64 binary", binary.display()))?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0, |value, &b| (value << 8) | u64::from(b)))
    };
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a little-endian ELF64 binary",
        binary.display()
    );
    let (table, entry_size, entries) = (field(32, 8)?, field(54, 2)?, field(56, 2)?);
    for i in 0..entries {
        let header = usize::try_from(table + i * entry_size)?;
        if field(header, 4)? == u64::from(PT_INTERP) {
            let (at, len) = (
                usize::try_from(field(header + 8, 8)?)?,
                usize::try_from(field(header + 32, 8)?)?,
            );
            let path = elf.get(at..at + len).context("PT_INTERP past the end")?;
            return Ok(Some(
                String::from_utf8_lossy(path)
                    .trim_end_matches('\0')
                    .to_owned(),
            ));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = include_str!("../../packaging/gocast.service");

    #[test]
    fn the_shipped_unit_passes_its_own_checks() {
        assert_eq!(check_unit(UNIT), Vec::<String>::new());
    }

    #[test]
    fn a_unit_without_notify_or_with_another_config_is_refused() {
        let bad = UNIT
            .replace("--config /etc/gocast/config.yaml", "--config /etc/x.yaml")
            .replace("Type=notify", "Type=exec")
            .replace("WatchdogSec=30s", "");
        assert_eq!(check_unit(&bad).len(), 3, "{:?}", check_unit(&bad));
    }

    #[test]
    fn a_dynamically_linked_binary_names_its_loader_and_a_text_file_is_refused() {
        // The test binary itself is linked dynamically (cargo test passes no `+crt-static`).
        let exe = std::env::current_exe().unwrap();
        let loader = dynamic_loader(&exe)
            .unwrap()
            .expect("a dynamic test binary");
        assert!(loader.starts_with('/') && loader.contains("ld"), "{loader}");
        let text = tempfile::NamedTempFile::new().unwrap();
        fs::write(text.path(), "#!/bin/sh\n").unwrap();
        assert!(dynamic_loader(text.path()).is_err());
    }

    #[test]
    fn the_base_tools_the_unit_runs_are_kill_only() {
        assert_eq!(base_tools(UNIT), [PathBuf::from("bin/kill")]);
    }

    #[test]
    fn a_shipped_config_with_a_peer_or_an_open_api_is_refused() {
        let safe = "agent:\n  listen_addr: 127.0.0.1:8080\n  allow_http_exec: false\n  listen_unix: /run/gocast/api.sock\n  state_file: /var/lib/gocast/state-1.json\n";
        assert_eq!(check_shipped_config(safe, UNIT), Vec::<String>::new());
        let open = safe.replace("127.0.0.1:8080", "[::]:8080") + "bgp:\n- local_as: 1\n";
        assert_eq!(check_shipped_config(&open, UNIT).len(), 2);
        let elsewhere = safe.replace("/var/lib/gocast/", "/tmp/");
        assert_eq!(check_shipped_config(&elsewhere, UNIT).len(), 1);
    }
}
