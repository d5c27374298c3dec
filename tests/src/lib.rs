//! Building blocks for end-to-end tests: network namespaces joined by veth links, the agent
//! and services started inside them, HTTP calls made from inside them.
//!
//! Everything is owned by a guard that removes it on drop — namespaces by name, processes by
//! PID — so a failing test leaves nothing behind. Names carry the PID and a counter, so tests
//! running in parallel (and leftovers of a killed run) never collide. Only 198.18.0.0/15,
//! 192.0.2.0/24 and `2001:db8::/32` are used, and the root namespace is never changed.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

pub mod fake_consul;
pub mod routers;

/// `require_privileged!();` opens every privileged test: it returns `Ok(())` after printing
/// `skipping test - <why>` without root, and panics instead under `GOCAST_REQUIRE_PRIVILEGED=1`.
pub use gocast_test_guard::require_privileged;

/// Runs a command and fails with its output if it fails.
pub fn sh(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique small number per topology in this process, used in names and link subnets.
fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::SeqCst)
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        let name = format!("gct-{}-{}-{role}", std::process::id(), next_id());
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NAME program args...`, as a builder.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` in the namespace; fails if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        let out = sh("ip", &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        let out = sh("ip", &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// HTTP GET from inside the namespace: (status, body parsed as JSON or as a string).
    pub fn http_get(&self, url: &str) -> Result<(u16, Value)> {
        self.http("GET", url)
    }

    /// HTTP POST (no body) from inside the namespace, as [`Netns::http_get`].
    pub fn http_post(&self, url: &str) -> Result<(u16, Value)> {
        self.http("POST", url)
    }

    fn http(&self, method: &str, url: &str) -> Result<(u16, Value)> {
        let out = self
            .command("curl")
            .args(["-sS", "-m", "10", "-X", method, "-w", "\n%{http_code}", url])
            .output()
            .context("running curl")?;
        ensure!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').context("curl printed no status")?;
        let status: u16 = code.trim().parse().context("curl status")?;
        let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
        Ok((status, value))
    }

    /// The output of `iptables -t nat -S` for one family, or empty if the chain does not exist.
    pub fn nat_rules(&self, binary: &str) -> Result<String> {
        self.run(binary, &["-w", "-t", "nat", "-S"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill anything still running inside before deleting, so nothing outlives the test.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An agent host and a client host joined by a veth link; the client routes the VIP ranges
/// (192.0.2.0/24, `2001:db8:ff00::/40`) through the agent.
#[derive(Debug)]
pub struct Topology {
    pub client: Netns,
    pub agent: Netns,
    /// The agent's address on the link (the NAT destination), and the client's.
    pub agent_ip: String,
    pub client_ip: String,
    pub agent_ip6: String,
    pub client_ip6: String,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let agent = Netns::new("agent")?;
        let client = Netns::new("client")?;
        let id = next_id() % 16_000;
        // A /30 per topology inside 198.18.0.0/16.
        let base = id * 4;
        let (a, c) = (
            format!("198.18.{}.{}", base / 256, base % 256 + 1),
            format!("198.18.{}.{}", base / 256, base % 256 + 2),
        );
        let (a6, c6) = (
            format!("2001:db8:1:{id:x}::1"),
            format!("2001:db8:1:{id:x}::2"),
        );
        let (va, vc) = (format!("gca{id}"), format!("gcc{id}"));
        sh(
            "ip",
            &[
                "link",
                "add",
                &va,
                "netns",
                &agent.name,
                "type",
                "veth",
                "peer",
                "name",
                &vc,
                "netns",
                &client.name,
            ],
        )?;
        agent.ip(&["addr", "add", &format!("{a}/30"), "dev", &va])?;
        client.ip(&["addr", "add", &format!("{c}/30"), "dev", &vc])?;
        agent.ip(&["addr", "add", &format!("{a6}/64"), "dev", &va, "nodad"])?;
        client.ip(&["addr", "add", &format!("{c6}/64"), "dev", &vc, "nodad"])?;
        agent.ip(&["link", "set", &va, "up"])?;
        client.ip(&["link", "set", &vc, "up"])?;
        client.ip(&["route", "add", "192.0.2.0/24", "via", &a])?;
        client.ip(&["-6", "route", "add", "2001:db8:ff00::/40", "via", &a6])?;
        agent.ip(&["route", "add", "default", "via", &c])?;
        agent.ip(&["-6", "route", "add", "default", "via", &c6])?;
        Ok(Self {
            client,
            agent,
            agent_ip: a,
            client_ip: c,
            agent_ip6: a6,
            client_ip6: c6,
        })
    }
}

/// Another router namespace, joined to the agent's by a veth link of its own: a second (third,
/// ...) BGP peer of the agent. Deleted (namespace and link) on drop.
#[derive(Debug)]
pub struct RouterLink {
    pub ns: Netns,
    /// The agent's address on this link, and the router's.
    pub agent_ip: String,
    pub router_ip: String,
}

impl Topology {
    /// A new router namespace (`role` names it) linked to the agent by its own /30.
    pub fn add_router(&self, role: &str) -> Result<RouterLink> {
        let ns = Netns::new(role)?;
        let id = next_id() % 16_000;
        let base = id * 4;
        let (a, r) = (
            format!("198.18.{}.{}", base / 256, base % 256 + 1),
            format!("198.18.{}.{}", base / 256, base % 256 + 2),
        );
        let (va, vr) = (format!("gca{id}"), format!("gcr{id}"));
        sh(
            "ip",
            &[
                "link",
                "add",
                &va,
                "netns",
                &self.agent.name,
                "type",
                "veth",
                "peer",
                "name",
                &vr,
                "netns",
                &ns.name,
            ],
        )?;
        self.agent
            .ip(&["addr", "add", &format!("{a}/30"), "dev", &va])?;
        ns.ip(&["addr", "add", &format!("{r}/30"), "dev", &vr])?;
        self.agent.ip(&["link", "set", &va, "up"])?;
        ns.ip(&["link", "set", &vr, "up"])?;
        Ok(RouterLink {
            ns,
            agent_ip: a,
            router_ip: r,
        })
    }
}

/// The agent binary under test: `$GOCAST_AGENT_BIN`, which `cargo xtask test` sets to the
/// binary it has just built as it ships (glibc linked statically), else `target/debug/gocast`.
/// A binary older than the agent's sources is refused, so a plain `cargo test` after an edit
/// cannot silently test old code.
pub fn agent_binary() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = match std::env::var_os("GOCAST_AGENT_BIN").filter(|b| !b.is_empty()) {
        Some(bin) => PathBuf::from(bin),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root.join("target"), PathBuf::from)
            .join("debug/gocast"),
    };
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .with_context(|| {
            format!(
                "{} missing: run `cargo build -p gocast-agent` (cargo xtask test does)",
                bin.display()
            )
        })?;
    let newest_source = newest_mtime(&root.join("gocast-agent/src"))?;
    ensure!(
        built >= newest_source,
        "{} is older than the agent's sources: run `cargo build -p gocast-agent` (cargo xtask test does)",
        bin.display()
    );
    Ok(bin)
}

fn newest_mtime(dir: &Path) -> Result<std::time::SystemTime> {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let t = if meta.is_dir() {
            newest_mtime(&entry.path())?
        } else {
            meta.modified()?
        };
        newest = newest.max(t);
    }
    Ok(newest)
}

/// A running agent, killed on drop if still running.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    pub api: String,
}

impl Agent {
    /// Starts the agent in `ns` with `args` (e.g. `["-config", path]`), logging to `log`, and
    /// waits until its API answers on `api` (host:port inside `ns`).
    pub fn start(ns: &Netns, args: &[&str], log: &Path, api: &str) -> Result<Self> {
        Self::start_with(&agent_binary()?, ns, args, log, api)
    }

    /// [`Agent::start`] with another agent binary, e.g. `target/release/gocast` for benchmarks.
    pub fn start_with(
        binary: &Path,
        ns: &Netns,
        args: &[&str],
        log: &Path,
        api: &str,
    ) -> Result<Self> {
        Self::start_with_env(binary, ns, args, &[], log, api)
    }

    /// [`Agent::start_with`] with extra environment variables (e.g. systemd's `NOTIFY_SOCKET`).
    pub fn start_with_env(
        binary: &Path,
        ns: &Netns,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
        api: &str,
    ) -> Result<Self> {
        let file = std::fs::File::create(log)?;
        let child = ns
            .command(binary.to_str().context("binary path")?)
            .args(args)
            .env("RUST_LOG", "gocast=debug,info")
            // Only a test that plays the service manager gives the agent one: one running the
            // tests (a CI job under systemd) must never hear from the agents under test.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting the agent")?;
        let mut agent = Self {
            child: Some(child),
            log: log.to_owned(),
            api: api.to_owned(),
        };
        let url = format!("http://{api}/healthz");
        // Generous: a debug agent on two cores shared with builds (load 15) took over 10 s.
        agent.wait_for("the API", Duration::from_secs(30), |_| {
            Ok(ns.http_get(&url).is_ok_and(|(s, _)| s == 200))
        })?;
        Ok(agent)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// Polls `check` every 20 ms until it holds; fails after `limit` with the agent's log.
    pub fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&mut Self) -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut last_err = String::new();
        while start.elapsed() < limit {
            match check(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = format!("{e:#}"),
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "agent exited ({status}) while waiting for {what}\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "timed out after {limit:?} waiting for {what} (last error: {last_err})\n{}",
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        let mut s = String::from("---- agent log ----\n");
        let _ = write!(
            s,
            "{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        s
    }

    /// Sends a signal by PID (`TERM`, `KILL`) and waits for the exit, at most `limit`.
    pub fn signal_and_wait(
        &mut self,
        signal: &str,
        limit: Duration,
    ) -> Result<(ExitStatus, Duration)> {
        let pid = self.pid().context("agent not running")?;
        sh("kill", &[&format!("-{signal}"), &pid.to_string()])?;
        self.wait_exit(limit)
    }

    /// Waits for the agent to exit, at most `limit`; kills it after that.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<(ExitStatus, Duration)> {
        let start = Instant::now();
        let mut child = self.child.take().context("agent not running")?;
        while start.elapsed() < limit {
            if let Some(status) = child.try_wait()? {
                return Ok((status, start.elapsed()));
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("agent did not exit within {limit:?}\n{}", self.log_text())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP service (Python's http.server) in a namespace, stopped on drop.
#[derive(Debug)]
pub struct Service {
    child: Option<Child>,
}

impl Service {
    /// Serves HTTP on `port` (all addresses, IPv4 and IPv6) and waits until it listens.
    pub fn http(ns: &Netns, port: u16, dir: &Path) -> Result<Self> {
        let child = ns
            .command("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "::",
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting python3 http.server")?;
        let service = Self { child: Some(child) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if ns.http_get(&format!("http://127.0.0.1:{port}/")).is_ok() {
                return Ok(service);
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("service on port {port} did not come up")
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}
