//! Embeds the eBPF object `cargo xtask build-ebpf` builds (one build path: `docs/design.md`,
//! "Dataplane").
//!
//! If `<target>/bpfel-unknown-none/release/gocast-ebpf` exists it is copied to
//! `$OUT_DIR/gocast-ebpf.o`; otherwise an empty file is written there, so a plain `cargo build`
//! works without nightly or `bpf-linker` and the agent reports "eBPF object not built" only when
//! the eBPF dataplane is asked for.
//!
//! Also sets `GOCAST_COMMIT` for `gocast_build_info`: `$GOCAST_COMMIT` when the packager sets it,
//! else `git rev-parse --short=12 HEAD`, else `unknown` (a tarball or a build without git).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    commit();
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest
        .parent()
        .expect("gocast-agent sits in the workspace root")
        .to_path_buf();
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let target_dir = env::var_os("CARGO_TARGET_DIR").map_or_else(
        || root.join("target"),
        |dir| {
            let dir = PathBuf::from(dir);
            // Relative to the workspace root, as cargo resolves it from there.
            if dir.is_relative() {
                root.join(dir)
            } else {
                dir
            }
        },
    );
    let object = target_dir
        .join("bpfel-unknown-none")
        .join("release")
        .join("gocast-ebpf");
    println!("cargo:rerun-if-changed={}", object.display());
    let dest = out.join("gocast-ebpf.o");
    // `gocast_ebpf_object`: the tests that need the real object run only when it is there.
    println!("cargo::rustc-check-cfg=cfg(gocast_ebpf_object)");
    if object.is_file() {
        copy(&object, &dest);
        println!("cargo::rustc-cfg=gocast_ebpf_object");
    } else {
        fs::write(&dest, []).expect("writing an empty eBPF object placeholder to OUT_DIR");
    }
}

fn copy(from: &Path, to: &Path) {
    if let Err(e) = fs::copy(from, to) {
        panic!("copying {} to {}: {e}", from.display(), to.display());
    }
}

/// Sets `GOCAST_COMMIT` for the crate, and reruns when HEAD moves, so the commit is never stale.
fn commit() {
    println!("cargo:rerun-if-env-changed=GOCAST_COMMIT");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let commit = env::var("GOCAST_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            // `logs/HEAD` changes with every commit and checkout, in a worktree too (its own
            // git dir); HEAD itself only when the branch changes.
            if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
                for file in ["HEAD", "logs/HEAD"] {
                    let path = Path::new(&dir).join(file);
                    if path.exists() {
                        println!("cargo:rerun-if-changed={}", path.display());
                    }
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=GOCAST_COMMIT={commit}");
}
