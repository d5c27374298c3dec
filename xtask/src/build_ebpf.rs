//! `cargo xtask build-ebpf`: provision the eBPF toolchain and build the kernel-side object.
//!
//! This is the one build path for `gocast-ebpf` (`docs/design.md`, "Dataplane"). On a fresh
//! machine it:
//!
//! 1. makes sure a nightly toolchain with `rust-src` exists (`-Z build-std=core` rebuilds `core`
//!    for `bpfel-unknown-none`, which has no prebuilt standard library);
//! 2. makes sure `bpf-linker` runs; if not, builds it with `cargo install` against the very
//!    `libLLVM` shipped inside that nightly, so the linker and `rustc` agree on the LLVM bitcode
//!    they exchange, and no system LLVM is needed;
//! 3. builds `gocast-ebpf` with `cargo +nightly build --target bpfel-unknown-none -Z
//!    build-std=core --release`, to the fixed path [`object_path`] returns;
//! 4. strips its DWARF sections with the nightly's `rust-objcopy --strip-debug`, keeping `.BTF`
//!    and `.BTF.ext` (what the loader and `bpftool` read): 1.4 MB → 0.24 MB, bytes every agent
//!    embeds and parses at start.
//!
//! Each failure names the missing piece. Nothing here runs as part of `cargo xtask test`: the host
//! checks never need nightly or `bpf-linker`.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::{cmd, workspace_root};

/// The toolchain the eBPF crate builds with: `-Z build-std` and the BPF target need nightly.
const TOOLCHAIN: &str = "nightly";

/// The eBPF target triple (little-endian, as on every host the agent runs on).
const TARGET: &str = "bpfel-unknown-none";

/// The eBPF crate's package name, and the name of the object it produces.
const PACKAGE: &str = "gocast-ebpf";

/// Seconds any single rustup or `cargo install` call may take, so a stuck mirror fails instead
/// of hanging.
const INSTALL_TIMEOUT_SECS: &str = "1800";

/// Provisions the toolchain, builds the eBPF object and returns its path.
pub fn run() -> Result<PathBuf> {
    let root = workspace_root();
    ensure_nightly_with_rust_src()?;
    let cargo_bin = cargo_bin_dir()?;
    ensure_bpf_linker(&cargo_bin)?;

    let target_dir = target_dir(&root);
    // `rustup run` (rather than `cargo +nightly`) works even when the toolchain's own `bin/`
    // directory is first on `PATH`, where `cargo` is not the rustup proxy.
    let mut build = Command::new("rustup");
    build
        .args(["run", TOOLCHAIN, "cargo", "build", "--package", PACKAGE])
        .args(["--target", TARGET, "-Z", "build-std=core", "--release"])
        .current_dir(root.join(PACKAGE))
        // The stable toolchain that runs `cargo xtask` exports these; they would override the
        // nightly one for the child.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env("CARGO_TARGET_DIR", &target_dir)
        // With `--target`, these flags reach only the eBPF crate and its dependencies, not
        // build scripts. `--btf` makes `bpf-linker` emit BTF from the debug info (the loader
        // and `bpftool` read it); as in `aya-build`.
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        // rustc calls the linker by name: make a `bpf-linker` in `~/.cargo/bin` findable even
        // when that directory is not on the caller's `PATH`.
        .env("PATH", path_with(&cargo_bin)?);
    cmd::run(&mut build).with_context(|| format!("building {PACKAGE} for {TARGET}"))?;

    let object = object_path(&target_dir);
    ensure!(
        object.is_file(),
        "the build succeeded but {} is missing",
        object.display()
    );
    // In place: cargo still sees the output as fresh (it is newer than its sources), and
    // stripping a stripped object changes nothing.
    // Through `rustup run`, which puts the toolchain's `libLLVM` on the library path.
    cmd::run(
        Command::new("rustup")
            .args(["run", TOOLCHAIN])
            .arg(nightly_objcopy()?)
            .arg("--strip-debug")
            .arg(&object),
    )
    .context("stripping the eBPF object's debug info")?;
    println!("eBPF object: {}", object.display());
    Ok(object)
}

/// The nightly's `rust-objcopy` (LLVM's objcopy, shipped with every rustc):
/// `<sysroot>/lib/rustlib/<host>/bin/rust-objcopy`.
fn nightly_objcopy() -> Result<PathBuf> {
    let sysroot =
        output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]))?;
    let version = output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "-vV"]))?;
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("no host line in rustc -vV")?;
    let objcopy = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host.trim())
        .join("bin/rust-objcopy");
    ensure!(
        objcopy.is_file(),
        "{} is missing: the nightly toolchain ships it with rustc",
        objcopy.display()
    );
    Ok(objcopy)
}

/// The target directory: `$CARGO_TARGET_DIR` if set (relative to `root`, where the tasks run
/// cargo, as `gocast-agent/build.rs` resolves it), else `<root>/target`, as cargo does.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_relative() => root.join(dir),
        Some(dir) => dir,
        None => root.join("target"),
    }
}

/// Where the eBPF object lands: `<target>/bpfel-unknown-none/release/gocast-ebpf`.
pub fn object_path(target_dir: &Path) -> PathBuf {
    target_dir.join(TARGET).join("release").join(PACKAGE)
}

/// Installs the nightly toolchain (minimal profile) if absent, then its `rust-src` component.
fn ensure_nightly_with_rust_src() -> Result<()> {
    if !cmd::succeeds_quietly(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "-V"])) {
        cmd::run(Command::new("timeout").args([
            INSTALL_TIMEOUT_SECS,
            "rustup",
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
        ]))
        .context("installing the nightly toolchain (needed for -Z build-std and the BPF target)")?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        TOOLCHAIN,
    ]))
    .context("listing the nightly toolchain's components")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("nightly rust-src present");
        return Ok(());
    }
    cmd::run(Command::new("timeout").args([
        INSTALL_TIMEOUT_SECS,
        "rustup",
        "component",
        "add",
        "rust-src",
        "--toolchain",
        TOOLCHAIN,
    ]))
    .context("adding the nightly rust-src component (needed for -Z build-std=core)")
}

/// `$CARGO_HOME/bin`, else `~/.cargo/bin`: where `cargo install` puts `bpf-linker`.
fn cargo_bin_dir() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home).join("bin"));
    }
    Ok(home_dir()?.join(".cargo").join("bin"))
}

fn home_dir() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set: cannot locate ~/.cargo/bin or ~/.local/share")
}

/// `PATH` with `dir` appended (so a `bpf-linker` already on `PATH` wins).
fn path_with(dir: &Path) -> Result<OsString> {
    let mut paths: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    paths.push(dir.to_path_buf());
    std::env::join_paths(paths).context("building PATH with ~/.cargo/bin")
}

/// Makes sure `bpf-linker` runs (on `PATH` or in `cargo_bin`); builds it otherwise.
///
/// "Runs", not "exists": a `bpf-linker` built against an older nightly's `libLLVM` fails to
/// start once rustup has replaced that nightly, and is rebuilt here.
fn ensure_bpf_linker(cargo_bin: &Path) -> Result<()> {
    let path = path_with(cargo_bin)?;
    if cmd::succeeds_quietly(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", &path),
    ) {
        println!("bpf-linker present");
        return Ok(());
    }

    let (llvm_so, major) = nightly_llvm()?;
    let prefix = llvm_prefix(&llvm_so)?;
    println!(
        "building bpf-linker against {} (LLVM {major}); takes about a minute",
        llvm_so.display()
    );
    cmd::run(
        Command::new("timeout")
            .args([
                INSTALL_TIMEOUT_SECS,
                "cargo",
                "install",
                "--force",
                "bpf-linker",
            ])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO_TARGET_DIR"),
    )
    .with_context(|| {
        format!(
            "installing bpf-linker with LLVM_PREFIX={} (exit status 124 means it timed out)",
            prefix.display()
        )
    })?;
    ensure!(
        cmd::succeeds_quietly(
            Command::new("bpf-linker")
                .arg("--version")
                .env("PATH", &path)
        ),
        "bpf-linker was installed but does not run (is {} on PATH?)",
        cargo_bin.display()
    );
    Ok(())
}

/// The nightly's real `libLLVM` shared object and its LLVM major version.
///
/// The sysroot holds two files: `libLLVM.so.<ver>-rust-<rustc>` (the shared object) and
/// `libLLVM-<major>-rust-<rustc>.so`, a linker script pointing at it that `cargo install`
/// cannot use as a library, so the first is the one returned.
fn nightly_llvm() -> Result<(PathBuf, u32)> {
    let version = output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "-vV"]))
        .context("asking the nightly rustc for its LLVM version")?;
    let major = llvm_major(&version)
        .with_context(|| format!("no `LLVM version: N.x` line in `rustc -vV`:\n{version}"))?;

    let sysroot =
        output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]))
            .context("asking the nightly rustc for its sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let entries = std::fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", lib.display()))?;
        let name = entry.file_name();
        if is_llvm_shared_object(&name.to_string_lossy()) {
            return Ok((entry.path(), major));
        }
    }
    bail!(
        "no libLLVM.so.<version>-rust-* in {}: the nightly toolchain ships no shared LLVM",
        lib.display()
    )
}

/// Whether `name` is the nightly's real shared object (`libLLVM.so.22.1-rust-1.97.0-nightly`),
/// not its linker script (`libLLVM-22-rust-1.97.0-nightly.so`).
fn is_llvm_shared_object(name: &str) -> bool {
    name.strip_prefix("libLLVM.so.")
        .is_some_and(|rest| rest.contains("-rust-"))
}

/// The major version in `rustc -vV`'s `LLVM version: 22.1.4` line.
fn llvm_major(rustc_vv: &str) -> Option<u32> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|major| major.parse().ok())
}

/// Prepares `~/.local/share/gocast/llvm` (or under `$XDG_DATA_HOME`) as an `LLVM_PREFIX` whose
/// `lib/` holds `libLLVM.so` (what the linker looks for with `-lLLVM`) and a link under the
/// library's own name (its soname, what the dynamic loader looks for), both to `llvm_so`.
///
/// It lives outside `target/` because the installed `bpf-linker` keeps an rpath to it: a
/// `cargo clean` must not break the linker.
fn llvm_prefix(llvm_so: &Path) -> Result<PathBuf> {
    let data = match std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => home_dir()?.join(".local").join("share"),
    };
    let prefix = data.join("gocast").join("llvm");
    let lib = prefix.join("lib");
    // Links from an older nightly would point at deleted files: start afresh.
    if lib.exists() {
        std::fs::remove_dir_all(&lib).with_context(|| format!("removing {}", lib.display()))?;
    }
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let own_name = llvm_so
        .file_name()
        .with_context(|| format!("{} has no file name", llvm_so.display()))?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), own_name] {
        let link = lib.join(name);
        std::os::unix::fs::symlink(llvm_so, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), llvm_so.display()))?;
    }
    Ok(prefix)
}

/// Runs `command` and returns its standard output; fails on a non-zero exit.
fn output(command: &mut Command) -> Result<String> {
    let line = cmd::display(command);
    let out = command
        .output()
        .with_context(|| format!("failed to start `{line}`"))?;
    ensure!(
        out.status.success(),
        "`{line}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_reads_the_rustc_line() {
        let vv = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some(22));
        assert_eq!(llvm_major("rustc 1.97.0\n"), None);
    }

    #[test]
    fn the_shared_object_is_told_from_the_linker_script() {
        assert!(is_llvm_shared_object("libLLVM.so.22.1-rust-1.97.0-nightly"));
        assert!(!is_llvm_shared_object("libLLVM-22-rust-1.97.0-nightly.so"));
        assert!(!is_llvm_shared_object("libLLVM.so"));
    }

    #[test]
    fn the_object_lands_at_a_fixed_path() {
        assert_eq!(
            object_path(Path::new("/t")),
            Path::new("/t/bpfel-unknown-none/release/gocast-ebpf")
        );
    }
}
