//! `/metrics` checked with a real parser: `prometheus_client`, the Python client that the
//! `OpenMetrics` authors maintain, whose `OpenMetrics` parser is strict (a missing `# EOF`, a
//! sample outside its family or a bad label fails it). It comes from Debian's
//! `python3-prometheus-client`, which `cargo xtask test` installs (`xtask/src/packages.rs`), so
//! it runs under the system `/usr/bin/python3`, not whatever `python3` a user's PATH finds.
//!
//! Shared by the agent's unit tests and the end-to-end suites, like the guard: without the
//! parser a test [`skip`](crate::skip)s, and fails under `GOCAST_REQUIRE_PRIVILEGED=1`.

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// The interpreter Debian's package installs into.
const PYTHON: &str = "/usr/bin/python3";

/// Reads stdin with the parser of `argv[1]` and prints `name type samples help` per family.
const SCRIPT: &str = r#"
import sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
try:
    families = list(text_string_to_metric_families(sys.stdin.read()))
except Exception as e:
    sys.exit(f"{type(e).__name__}: {e}")
for f in families:
    print(f.name, f.type, len(f.samples), 1 if f.documentation else 0)
"#;

/// The two text formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `OpenMetrics` 1.0 (`application/openmetrics-text; version=1.0.0`).
    OpenMetrics,
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Prometheus,
}

/// A metric family as the parser read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// Without the `_total` of a counter's samples (both parsers strip it).
    pub name: String,
    /// `counter`, `gauge`, `histogram`, `unknown`, ...
    pub kind: String,
    pub samples: usize,
    /// Whether it had a `# HELP` text.
    pub help: bool,
}

/// Parses `text` as `format`: `Some(Ok(families))`, `Some(Err(the parser's complaint))`, or
/// `None` after a skip when the parser is not installed.
pub fn parse(text: &str, format: Format) -> Option<Result<Vec<Family>, String>> {
    let installed = Command::new(PYTHON)
        .args(["-c", "import prometheus_client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        crate::skip("the python3-prometheus-client parser is not installed");
        return None;
    }
    let arg = match format {
        Format::OpenMetrics => "openmetrics",
        Format::Prometheus => "prometheus",
    };
    let run = || -> std::io::Result<std::process::Output> {
        let mut child = Command::new(PYTHON)
            .args(["-c", SCRIPT, arg])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Written from a thread: a large exposition fills the pipe before python reads it all.
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let text = text.to_owned();
        let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
        let output = child.wait_with_output()?;
        writer.join().expect("the writer thread does not panic")?;
        Ok(output)
    };
    let output = match run() {
        Ok(output) => output,
        Err(e) => return Some(Err(format!("running {PYTHON}: {e}"))),
    };
    if !output.status.success() {
        return Some(Err(String::from_utf8_lossy(&output.stderr)
            .trim()
            .to_owned()));
    }
    let families = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            Some(Family {
                name: f.next()?.to_owned(),
                kind: f.next()?.to_owned(),
                samples: f.next()?.parse().ok()?,
                help: f.next()? == "1",
            })
        })
        .collect();
    Some(Ok(families))
}
