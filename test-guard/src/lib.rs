//! The one guard for privileged tests (network namespaces, iptables, eBPF), used by the agent's
//! unit tests (a dev-dependency of `gocast-agent`) and by the end-to-end suites of
//! `gocast-tests`. A crate of its own because neither of those may depend on the other for it.
//!
//! Without root a privileged test prints `skipping test - <why>` and passes, unless
//! `GOCAST_REQUIRE_PRIVILEGED=1` (as `.ci/run` sets): there a skip would hide a failure, so it
//! panics instead.
//!
//! An end-to-end test starts with [`require_privileged!`]; the agent's `in_new_netns` calls
//! [`privileged`] and, when it cannot enter a namespace, [`skip`]. [`exposition`] runs the
//! reference parser of `/metrics`, a prerequisite that skips the same way.

pub mod exposition;

/// The environment variable under which a privileged test that cannot run fails (value `1`).
pub const REQUIRE_PRIVILEGED: &str = "GOCAST_REQUIRE_PRIVILEGED";

/// Returns `Ok(())` from the calling test when it cannot run privileged here; see
/// [`privileged`].
#[macro_export]
macro_rules! require_privileged {
    () => {
        if !$crate::privileged() {
            return Ok(());
        }
    };
}

/// Whether a privileged test may run here: the effective uid is 0. If not, [`skip`]s with
/// "not running as root" (which panics under `GOCAST_REQUIRE_PRIVILEGED=1`).
pub fn privileged() -> bool {
    let root = is_root();
    if !root {
        skip("not running as root");
    }
    root
}

/// Reports that a privileged test cannot run, for `why`: prints `skipping test - <why>`, or
/// panics under `GOCAST_REQUIRE_PRIVILEGED=1`.
pub fn skip(why: &str) {
    assert!(
        std::env::var(REQUIRE_PRIVILEGED).as_deref() != Ok("1"),
        "privileged test cannot run: {why} ({REQUIRE_PRIVILEGED}=1 forbids skipping)"
    );
    eprintln!("skipping test - {why}");
}

/// Whether the effective uid is 0, read from `/proc` because std has no safe `geteuid` and
/// this crate needs no dependency for it.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            // Real, effective, saved and filesystem uid; privileges follow the effective one.
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}
