//! Embeds the eBPF object `cargo xtask build-ebpf` builds (one build path: `docs/design.md`,
//! "Dataplane").
//!
//! If `<target>/bpfel-unknown-none/release/gocast-ebpf` exists it is copied to
//! `$OUT_DIR/gocast-ebpf.o`; otherwise an empty file is written there, so a plain `cargo build`
//! works without nightly or `bpf-linker` and the agent reports "eBPF object not built" only when
//! the eBPF dataplane is asked for.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

fn main() {
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
