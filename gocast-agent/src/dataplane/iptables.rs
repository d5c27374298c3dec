//! NAT for VIPs through the `iptables` and `ip6tables` binaries.
//!
//! All rules live in one chain, `GOCAST` in table `nat`, which `PREROUTING` (traffic from
//! outside) and `OUTPUT` (traffic from this host) jump to. The agent owns that chain and
//! nothing else: it flushes it at start (rules left by a crashed run are its own), adds and
//! deletes single rules in it, and at shutdown removes the chain and the two jumps. Every rule
//! carries the comment `gocast:APP`, so `iptables -t nat -S GOCAST` shows whose it is.
//!
//! Each call passes `-w` (wait for the xtables lock rather than fail when another tool holds
//! it) and is killed after [`TIMEOUT`], so a wedged iptables cannot stall the agent.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    process::Stdio,
    sync::Arc,
    time::Duration,
};

use tokio::{io::AsyncWriteExt as _, process::Command, sync::Mutex};
use tracing::{debug, warn};

use crate::app::{AppName, NatRule};

/// The chain holding every rule of the agent, in table [`TABLE`].
pub const CHAIN: &str = "GOCAST";
const TABLE: &str = "nat";
/// The built-in chains that jump to [`CHAIN`].
const HOOKS: [&str; 2] = ["PREROUTING", "OUTPUT"];
/// How long one iptables call may take, lock wait included.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Exit status of `iptables -C` / `-D` when the rule (or the chain) is not there.
const NOT_FOUND: i32 = 1;

/// A failed iptables operation; the message names the command and what it printed.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot NAT {vip} to {dest}: not the same address family")]
    FamilyMismatch { vip: IpAddr, dest: IpAddr },
    #[error("cannot NAT {vip}: ip6tables is not usable on this host")]
    Ipv6Unavailable { vip: IpAddr },
}

/// The address family of a rule, which decides the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// Its slot in [`Known`].
    fn index(self) -> usize {
        match self {
            Self::V4 => 0,
            Self::V6 => 1,
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    fn restore_binary(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }
}

/// What to do with a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Check,
    Append,
    Delete,
}

impl Op {
    fn flag(self) -> &'static str {
        match self {
            Self::Check => "-C",
            Self::Append => "-A",
            Self::Delete => "-D",
        }
    }
}

/// A DNAT rule as [`CHAIN`] holds it: protocol, VIP, listen port, destination.
type RuleKey = (String, IpAddr, u16, SocketAddr);

/// The rules known to be in [`CHAIN`], per family (IPv4, IPv6); `None`: list the chain first.
/// Kept from the agent's own commits and refreshed by every self-repair listing, so a batch
/// costs one `iptables-restore` instead of an `iptables -S` of thousands of rules first
/// (issue 14 §2). A rule removed behind the agent's back fails a batched delete, which then
/// goes rule by rule and forgets what it knew; one missing at the next listing is put back.
/// Shared with the last [`Listing`], which is gone by the next commit, so neither copies it.
type Known = [Option<Arc<HashSet<RuleKey>>>; 2];

/// The agent's NAT chain, set up in both families (IPv6 only where ip6tables works).
pub struct Iptables {
    /// Whether `ip6tables` worked at [`Iptables::init`]; IPv4 is required.
    ipv6: bool,
    /// Serialises check-then-act sequences, so two concurrent installs of the same rule
    /// cannot both find it missing and both append it; holds what the chain is known to hold.
    lock: Mutex<Known>,
}

impl Iptables {
    /// Creates chain `GOCAST` in table `nat` for IPv4 and IPv6, flushes it (stale rules from a
    /// crashed run are ours to remove), and makes `PREROUTING` and `OUTPUT` jump to it exactly
    /// once. Touches nothing else.
    ///
    /// IPv4 must work. If ip6tables is missing or fails, IPv6 NAT is disabled with a warning
    /// and installing an IPv6 rule fails with [`IptablesError::Ipv6Unavailable`].
    pub async fn init() -> Result<Self, IptablesError> {
        init_family(Family::V4).await?;
        let ipv6 = match init_family(Family::V6).await {
            Ok(()) => true,
            Err(error) => {
                warn!(error = %crate::error_chain(&error), "IPv6 NAT disabled: ip6tables is not usable");
                false
            }
        };
        Ok(Self {
            ipv6,
            lock: Mutex::new([None, None]),
        })
    }

    /// Makes sure each rule is in `GOCAST` once (`-C` before `-A`): traffic to `vip:listen`
    /// goes to `dest:dest_port`. `vip` and `dest` must be of the same family.
    pub async fn install(
        &self,
        app: &AppName,
        vip: IpAddr,
        rules: &[NatRule],
        dest: IpAddr,
    ) -> Result<(), IptablesError> {
        let family = self.family(vip, dest)?;
        let mut known = self.lock.lock().await;
        known[family.index()] = None;
        for rule in rules {
            let found = run_found(family, &rule_args(Op::Check, app, vip, *rule, dest)).await?;
            if !found {
                run_ok(family, &rule_args(Op::Append, app, vip, *rule, dest)).await?;
            }
        }
        Ok(())
    }

    /// [`Iptables::install`] for several apps with one `iptables -S` and one
    /// `iptables-restore --noflush` per address family: the rules missing from the chain are
    /// appended in one commit. If that commit fails (one bad rule fails the whole table), each
    /// app is installed again on its own, so only the apps whose rules fail get an error.
    /// One result per job, in order.
    pub async fn install_many(&self, jobs: &[NatItem<'_>]) -> Vec<Result<(), IptablesError>> {
        self.batch(jobs, Op::Append).await
    }

    /// [`Iptables::remove`] for several apps, batched as [`Iptables::install_many`]: only the
    /// rules present in the chain are deleted, so a missing one does not fail the commit.
    pub async fn remove_many(&self, jobs: &[NatItem<'_>]) -> Vec<Result<(), IptablesError>> {
        self.batch(jobs, Op::Delete).await
    }

    async fn batch(&self, jobs: &[NatItem<'_>], op: Op) -> Vec<Result<(), IptablesError>> {
        let mut results: Vec<Option<Result<(), IptablesError>>> =
            jobs.iter().map(|_| None).collect();
        let mut retry = Vec::new();
        {
            let mut known = self.lock.lock().await;
            for family in [Family::V4, Family::V6] {
                let mut members = Vec::new();
                for (i, job) in jobs.iter().enumerate() {
                    if Family::of(job.vip) != family {
                        continue;
                    }
                    match self.family(job.vip, job.dest) {
                        Ok(_) => members.push(i),
                        // Nothing IPv6 was ever installed, so nothing is left to remove.
                        Err(IptablesError::Ipv6Unavailable { .. }) if op == Op::Delete => {
                            results[i] = Some(Ok(()));
                        }
                        Err(e) => results[i] = Some(Err(e)),
                    }
                }
                if members.is_empty() {
                    continue;
                }
                let jobs = members.iter().map(|&i| jobs[i]);
                match restore(family, op, jobs, &mut known[family.index()]).await {
                    Ok(()) => {
                        for i in members {
                            results[i] = Some(Ok(()));
                        }
                    }
                    Err(e) => {
                        warn!(
                            error = %crate::error_chain(&e),
                            apps = members.len(),
                            "batched iptables change failed; applying app by app"
                        );
                        retry.extend(members);
                    }
                }
            }
        }
        for i in retry {
            let job = jobs[i];
            results[i] = Some(match op {
                Op::Append => self.install(job.app, job.vip, job.rules, job.dest).await,
                _ => self.remove(job.app, job.vip, job.rules, job.dest).await,
            });
        }
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }

    /// Deletes each rule from `GOCAST`; a rule that is not there counts as deleted.
    pub async fn remove(
        &self,
        app: &AppName,
        vip: IpAddr,
        rules: &[NatRule],
        dest: IpAddr,
    ) -> Result<(), IptablesError> {
        let family = match self.family(vip, dest) {
            // Nothing IPv6 was ever installed, so nothing is left to remove.
            Err(IptablesError::Ipv6Unavailable { .. }) => return Ok(()),
            other => other?,
        };
        let mut known = self.lock.lock().await;
        known[family.index()] = None;
        for rule in rules {
            run_found(family, &rule_args(Op::Delete, app, vip, *rule, dest)).await?;
        }
        Ok(())
    }

    /// Whether a `GOCAST` chain exists in either family, asked without creating anything: with
    /// no chain, the eBPF dataplane never touches iptables (instantiating the `nat` table turns
    /// on connection tracking for all traffic, a cost eBPF NAT is there to avoid).
    pub async fn chain_exists() -> bool {
        for family in [Family::V4, Family::V6] {
            let list = args(["-t", TABLE, "-S", CHAIN]);
            if run(family, &list)
                .await
                .is_ok_and(|done| done.code == Some(0))
            {
                return true;
            }
        }
        false
    }

    /// Flushes `GOCAST`, removes the jumps to it and deletes it, in both families. Used at
    /// shutdown; running it again, or on a host without the chain, does nothing.
    pub async fn teardown(&self) -> Result<(), IptablesError> {
        let mut known = self.lock.lock().await;
        *known = [None, None];
        for family in self.families() {
            // Without the chain there can be no jump to it either: nothing to do.
            if !chain_exists(family).await? {
                continue;
            }
            run_ok(family, &args(["-t", TABLE, "-F", CHAIN])).await?;
            for hook in HOOKS {
                // Bounded: each round deletes one jump, and init leaves one.
                for _ in 0..16 {
                    if !run_found(family, &args(["-t", TABLE, "-D", hook, "-j", CHAIN])).await? {
                        break;
                    }
                }
            }
            run_ok(family, &args(["-t", TABLE, "-X", CHAIN])).await?;
        }
        Ok(())
    }

    /// The rules in `GOCAST` as `iptables -t nat -S GOCAST` prints them (IPv4 first, then
    /// IPv6; the `-N GOCAST` line left out). Fails if the chain does not exist.
    pub async fn list(&self) -> Result<Vec<String>, IptablesError> {
        let mut rules = Vec::new();
        for family in self.families() {
            let out = run_ok(family, &args(["-t", TABLE, "-S", CHAIN])).await?;
            rules.extend(
                out.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with("-N "))
                    .map(str::to_owned),
            );
        }
        Ok(rules)
    }

    /// The `nat` table of IPv4 (with `v6`, IPv6) as `iptables -t nat -S` lists it, in one call:
    /// self-repair's check of the chain, its jumps and its rules. `None` for IPv6 when
    /// ip6tables is not usable (no IPv6 rule was ever installed).
    pub async fn listing(&self, v6: bool) -> Result<Option<Listing>, IptablesError> {
        let family = if v6 { Family::V6 } else { Family::V4 };
        if family == Family::V6 && !self.ipv6 {
            return Ok(None);
        }
        let mut known = self.lock.lock().await;
        let text = run_ok(family, &args(["-t", TABLE, "-S"])).await?;
        let listing = Listing::parse(&text);
        known[family.index()] = Some(Arc::clone(&listing.rules));
        Ok(Some(listing))
    }

    /// Puts back chain `GOCAST` and the jumps to it where they are missing, flushing nothing:
    /// after someone flushed `PREROUTING` or deleted the chain (docs/design.md,
    /// "Self-repair"). The rules are put back app by app.
    pub async fn restore_chain(&self, v6: bool) -> Result<(), IptablesError> {
        let family = if v6 { Family::V6 } else { Family::V4 };
        let mut known = self.lock.lock().await;
        known[family.index()] = None;
        create_chain(family).await?;
        ensure_jumps(family).await
    }

    fn families(&self) -> impl Iterator<Item = Family> {
        [Family::V4]
            .into_iter()
            .chain(self.ipv6.then_some(Family::V6))
    }

    fn family(&self, vip: IpAddr, dest: IpAddr) -> Result<Family, IptablesError> {
        let family = Family::of(vip);
        if family != Family::of(dest) {
            return Err(IptablesError::FamilyMismatch { vip, dest });
        }
        if family == Family::V6 && !self.ipv6 {
            return Err(IptablesError::Ipv6Unavailable { vip });
        }
        Ok(family)
    }
}

async fn init_family(family: Family) -> Result<(), IptablesError> {
    create_chain(family).await?;
    run_ok(family, &args(["-t", TABLE, "-F", CHAIN])).await?;
    ensure_jumps(family).await
}

/// Creates [`CHAIN`]; one that exists is fine.
async fn create_chain(family: Family) -> Result<(), IptablesError> {
    // `-N` fails if the chain exists; only then is that failure fine.
    if let Err(error) = run_ok(family, &args(["-t", TABLE, "-N", CHAIN])).await
        && !chain_exists(family).await?
    {
        return Err(error);
    }
    Ok(())
}

/// Makes each of [`HOOKS`] jump to [`CHAIN`] exactly once, first.
async fn ensure_jumps(family: Family) -> Result<(), IptablesError> {
    for hook in HOOKS {
        let jump = args(["-t", TABLE, "-C", hook, "-j", CHAIN]);
        if !run_found(family, &jump).await? {
            // First, so NAT for VIPs happens before rules of other tools (e.g. Docker's).
            run_ok(family, &args(["-t", TABLE, "-I", hook, "-j", CHAIN])).await?;
            continue;
        }
        // A crash between two inits, or a hand-made jump, can leave duplicates: drop extras.
        for _ in 1..jumps(family, hook).await? {
            run_ok(family, &args(["-t", TABLE, "-D", hook, "-j", CHAIN])).await?;
        }
    }
    Ok(())
}

/// The agent's part of one family's `nat` table, parsed from `iptables -t nat -S`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// [`CHAIN`] exists.
    chain: bool,
    /// The built-in chains that jump to it.
    hooks: Vec<String>,
    /// Its DNAT rules.
    rules: Arc<HashSet<RuleKey>>,
}

impl Listing {
    /// Reads the lines of [`CHAIN`] and the jumps to it; ignores everything else. A rule it
    /// cannot read is left out, which only makes a rule look missing (and be added again).
    fn parse(text: &str) -> Self {
        let mut listing = Self::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["-N", chain] if *chain == CHAIN => listing.chain = true,
                ["-A", hook, "-j", chain] if *chain == CHAIN && HOOKS.contains(hook) => {
                    listing.hooks.push((*hook).to_owned());
                }
                ["-A", chain, rest @ ..] if *chain == CHAIN => {
                    Arc::make_mut(&mut listing.rules).extend(parse_rule(rest));
                }
                _ => {}
            }
        }
        listing
    }

    /// The chain exists and every hook jumps to it.
    pub fn chain_complete(&self) -> bool {
        self.chain && HOOKS.iter().all(|h| self.hooks.iter().any(|l| l == h))
    }

    /// Whether the rule that sends `vip`'s `rule` to `dest` is in the chain.
    pub fn has(&self, vip: IpAddr, rule: NatRule, dest: IpAddr) -> bool {
        let key = (
            rule.proto.as_str().to_owned(),
            vip,
            rule.listen,
            SocketAddr::new(dest, rule.dest),
        );
        self.rules.contains(&key)
    }
}

/// A DNAT rule's protocol, VIP, listen port and destination, from the words after
/// `-A GOCAST` as `-S` prints them: `-d VIP/LEN -p P -m P --dport L ... -j DNAT
/// --to-destination DEST:PORT`.
fn parse_rule(words: &[&str]) -> Option<RuleKey> {
    let value = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1).copied())
    };
    let vip = value("-d")?.split('/').next()?.parse().ok()?;
    let proto = value("-p")?.to_ascii_lowercase();
    let listen = value("--dport")?.parse().ok()?;
    let dest = value("--to-destination")?.parse().ok()?;
    Some((proto, vip, listen, dest))
}

/// One app's rules for [`Iptables::install_many`] and [`Iptables::remove_many`].
#[derive(Debug, Clone, Copy)]
pub struct NatItem<'a> {
    pub app: &'a AppName,
    pub vip: IpAddr,
    pub rules: &'a [NatRule],
    pub dest: IpAddr,
}

/// Appends the rules of `jobs` missing from [`CHAIN`] (`op` [`Op::Append`]), or deletes those
/// present ([`Op::Delete`]), in one `iptables-restore --noflush` commit.
async fn restore(
    family: Family,
    op: Op,
    jobs: impl Iterator<Item = NatItem<'_>>,
    known: &mut Option<Arc<HashSet<RuleKey>>>,
) -> Result<(), IptablesError> {
    // Taken: a failure below leaves it unknown.
    let mut present = if let Some(present) = known.take() {
        present
    } else {
        let listed = run_ok(family, &args(["-t", TABLE, "-S", CHAIN])).await?;
        Listing::parse(&listed).rules
    };
    let set = Arc::make_mut(&mut present);
    let mut input = format!("*{TABLE}\n");
    let mut changes = 0;
    for job in jobs {
        for rule in job.rules {
            let key = (
                rule.proto.as_str().to_owned(),
                job.vip,
                rule.listen,
                SocketAddr::new(job.dest, rule.dest),
            );
            // What the chain holds once this commits (a rule twice in a batch goes in once).
            let needed = if op == Op::Append {
                set.insert(key)
            } else {
                set.remove(&key)
            };
            if !needed {
                continue;
            }
            input.push_str(&rule_spec(op, job.app, job.vip, *rule, job.dest).join(" "));
            input.push('\n');
            changes += 1;
        }
    }
    if changes > 0 {
        input.push_str("COMMIT\n");
        let done = run_restore(family, &input).await?;
        if done.code != Some(0) {
            return Err(done.failed());
        }
    }
    *known = Some(present);
    Ok(())
}

/// How many times `hook` jumps to [`CHAIN`], from `-S HOOK`.
async fn jumps(family: Family, hook: &str) -> Result<usize, IptablesError> {
    let listed = run_ok(family, &args(["-t", TABLE, "-S", hook])).await?;
    let spelled = format!("-A {hook} -j {CHAIN}");
    Ok(listed.lines().filter(|l| l.trim() == spelled).count())
}

async fn chain_exists(family: Family) -> Result<bool, IptablesError> {
    run_found(family, &args(["-t", TABLE, "-S", CHAIN])).await
}

/// The arguments (after the binary and `-w`) that check, append or delete `rule`:
/// `-t nat OP GOCAST -p P -d VIP/32|128 --dport LISTEN -m comment --comment gocast:APP
/// -j DNAT --to-destination DEST:PORT` (`[DEST]:PORT` for IPv6).
fn rule_args(op: Op, app: &AppName, vip: IpAddr, rule: NatRule, dest: IpAddr) -> Vec<String> {
    let mut out = args(["-t", TABLE]);
    out.extend(rule_spec(op, app, vip, rule, dest));
    out
}

/// [`rule_args`] without the table: a line of `iptables-restore` input.
fn rule_spec(op: Op, app: &AppName, vip: IpAddr, rule: NatRule, dest: IpAddr) -> Vec<String> {
    let host_len = match vip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let to = SocketAddr::new(dest, rule.dest);
    let mut out = args([op.flag(), CHAIN, "-p", rule.proto.as_str()]);
    out.extend([
        "-d".to_owned(),
        format!("{vip}/{host_len}"),
        "--dport".to_owned(),
        rule.listen.to_string(),
        "-m".to_owned(),
        "comment".to_owned(),
        "--comment".to_owned(),
        format!("gocast:{app}"),
        "-j".to_owned(),
        "DNAT".to_owned(),
        "--to-destination".to_owned(),
        to.to_string(),
    ]);
    out
}

fn args<const N: usize>(a: [&str; N]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// A finished command: its exit code (`None` if killed by a signal) and output.
struct Finished {
    command: String,
    code: Option<i32>,
    status: String,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn failed(self) -> IptablesError {
        IptablesError::Failed {
            command: self.command,
            status: self.status,
            stderr: self.stderr.trim().to_owned(),
        }
    }
}

async fn run(family: Family, args: &[String]) -> Result<Finished, IptablesError> {
    let binary = family.binary();
    let command = format!("{binary} -w {}", args.join(" "));
    debug!(%command, "iptables");
    let mut child = Command::new(binary);
    child.arg("-w").args(args).stdin(Stdio::null());
    finish(command, child, None).await
}

/// `iptables-restore -w --noflush` (or ip6tables-) with `input` on its standard input:
/// changes only what the input names, all in one commit.
async fn run_restore(family: Family, input: &str) -> Result<Finished, IptablesError> {
    let binary = family.restore_binary();
    let command = format!("{binary} -w --noflush ({} lines)", input.lines().count());
    debug!(%command, "iptables");
    let mut child = Command::new(binary);
    child.args(["-w", "--noflush"]).stdin(Stdio::piped());
    finish(command, child, Some(input.as_bytes())).await
}

/// Runs `child` (with `input` on its standard input), killed after [`TIMEOUT`].
async fn finish(
    command: String,
    mut child: Command,
    input: Option<&[u8]>,
) -> Result<Finished, IptablesError> {
    let run = async {
        // Dropping the future at the timeout kills the process instead of leaving it behind.
        let mut process = child
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        if let (Some(input), Some(mut stdin)) = (input, process.stdin.take()) {
            stdin.write_all(input).await?;
            // Closed here: the end of the input.
        }
        process.wait_with_output().await
    };
    let output = match tokio::time::timeout(TIMEOUT, run).await {
        Err(_) => {
            return Err(IptablesError::Timeout {
                command,
                timeout: TIMEOUT,
            });
        }
        Ok(Err(source)) => return Err(IptablesError::Spawn { command, source }),
        Ok(Ok(output)) => output,
    };
    Ok(Finished {
        code: output.status.code(),
        status: output.status.to_string(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        command,
    })
}

/// Runs a command that must succeed; returns its standard output.
async fn run_ok(family: Family, args: &[String]) -> Result<String, IptablesError> {
    let done = run(family, args).await?;
    if done.code == Some(0) {
        Ok(done.stdout)
    } else {
        Err(done.failed())
    }
}

/// Runs `-C`, `-D` or `-S CHAIN`: `true` if it succeeded, `false` if what it names is not
/// there (exit status 1), an error otherwise (e.g. 2, a bad argument).
async fn run_found(family: Family, args: &[String]) -> Result<bool, IptablesError> {
    let done = run(family, args).await?;
    match done.code {
        Some(0) => Ok(true),
        Some(NOT_FOUND) => Ok(false),
        _ => Err(done.failed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::in_new_netns;

    fn app(name: &str) -> AppName {
        name.parse().unwrap()
    }

    fn rules(specs: &[&str]) -> Vec<NatRule> {
        specs.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An `Iptables` built without [`Iptables::init`], so without running a command.
    fn unprobed(ipv6: bool) -> Iptables {
        Iptables {
            ipv6,
            lock: Mutex::new([None, None]),
        }
    }

    /// `rule_args` for one rule, joined as iptables would be called.
    fn rule_line(op: Op, app_name: &str, vip: &str, rule: &str, dest: &str) -> String {
        rule_args(op, &app(app_name), ip(vip), rule.parse().unwrap(), ip(dest)).join(" ")
    }

    #[test]
    fn an_ipv4_rule_matches_the_vip_as_a_host_and_dnats_to_dest_and_port() {
        assert_eq!(
            rule_line(Op::Append, "web", "192.0.2.10", "tcp:80:8080", "198.18.0.5"),
            "-t nat -A GOCAST -p tcp -d 192.0.2.10/32 --dport 80 -m comment --comment gocast:web \
             -j DNAT --to-destination 198.18.0.5:8080"
        );
    }

    #[test]
    fn an_ipv6_rule_brackets_the_destination_address() {
        assert_eq!(
            rule_line(Op::Delete, "dns", "2001:db8::10", "udp:53", "2001:db8::5"),
            "-t nat -D GOCAST -p udp -d 2001:db8::10/128 --dport 53 -m comment --comment gocast:dns \
             -j DNAT --to-destination [2001:db8::5]:53"
        );
    }

    #[test]
    fn check_append_and_delete_differ_only_in_the_operation() {
        let rule = "tcp:443:8443".parse().unwrap();
        let build = |op| rule_args(op, &app("a"), ip("192.0.2.1"), rule, ip("198.18.0.1"));
        let (check, append, delete) = (build(Op::Check), build(Op::Append), build(Op::Delete));
        assert_eq!(
            (check[2].as_str(), append[2].as_str(), delete[2].as_str()),
            ("-C", "-A", "-D")
        );
        assert_eq!(check[3..], append[3..]);
        assert_eq!(check[3..], delete[3..]);
    }

    #[test]
    fn a_listing_reads_the_chain_its_jumps_and_its_rules_and_nothing_else() {
        let text = "-P PREROUTING ACCEPT\n-N DOCKER\n-N GOCAST\n-A PREROUTING -j GOCAST\n\
             -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n\
             -A GOCAST -d 192.0.2.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"gocast:web\" -j DNAT --to-destination 198.18.0.5:8080\n\
             -A GOCAST -d 2001:db8::10/128 -p udp -m udp --dport 53 -m comment --comment gocast:dns -j DNAT --to-destination [2001:db8::5]:53\n\
             -A DOCKER -d 192.0.2.11/32 -p tcp -m tcp --dport 81 -j DNAT --to-destination 198.18.0.5:81\n";
        let listing = Listing::parse(text);
        assert!(listing.chain);
        assert!(
            !listing.chain_complete(),
            "OUTPUT does not jump: {listing:?}"
        );
        let web = "tcp:80:8080".parse().unwrap();
        assert!(listing.has(ip("192.0.2.10"), web, ip("198.18.0.5")));
        assert!(!listing.has(ip("192.0.2.10"), web, ip("198.18.0.6")));
        assert!(listing.has(
            ip("2001:db8::10"),
            "udp:53".parse().unwrap(),
            ip("2001:db8::5")
        ));
        assert!(
            !listing.has(
                ip("192.0.2.11"),
                "tcp:81".parse().unwrap(),
                ip("198.18.0.5")
            ),
            "another chain's rule is not ours"
        );
        let complete = Listing::parse(&format!("{text}-A OUTPUT -j GOCAST\n"));
        assert!(complete.chain_complete());
        assert_eq!(Listing::parse(""), Listing::default());
    }

    #[tokio::test]
    async fn a_vip_and_a_destination_of_different_families_are_refused() {
        // No command runs before the check, so this needs no privileges.
        let nat = unprobed(true);
        let (web, nats) = (app("web"), rules(&["tcp:80"]));
        let mismatched = [
            nat.install(&web, ip("192.0.2.10"), &nats, ip("2001:db8::5"))
                .await,
            nat.remove(&web, ip("2001:db8::10"), &nats, ip("198.18.0.5"))
                .await,
        ];
        for err in mismatched {
            assert!(
                matches!(err, Err(IptablesError::FamilyMismatch { .. })),
                "{err:?}"
            );
        }
    }

    #[tokio::test]
    async fn ipv6_rules_without_ip6tables_fail_to_install_and_count_as_removed() {
        let nat = unprobed(false);
        let (vip, dest) = (ip("2001:db8::10"), ip("2001:db8::5"));
        let err = nat
            .install(&app("web"), vip, &rules(&["tcp:80"]), dest)
            .await;
        assert!(
            matches!(err, Err(IptablesError::Ipv6Unavailable { .. })),
            "{err:?}"
        );
        nat.remove(&app("web"), vip, &rules(&["tcp:80"]), dest)
            .await
            .unwrap();
    }

    #[test]
    fn iptables_and_its_futures_can_move_between_threads() {
        fn send<T: Send>(_: &T) {}
        fn sync<T: Send + Sync>() {}
        sync::<Iptables>();
        // Built, never polled: no command runs.
        let nat = unprobed(true);
        let (web, nats) = (app("web"), rules(&["tcp:80"]));
        let (vip, dest) = (ip("192.0.2.10"), ip("198.18.0.5"));
        send(&Iptables::init());
        send(&nat.install(&web, vip, &nats, dest));
        send(&nat.remove(&web, vip, &nats, dest));
        send(&nat.teardown());
        send(&nat.list());
    }

    /// Installs `tcp:80` for app `name`, from `vip` to `dest`.
    async fn install_port_80(nat: &Iptables, name: &str, vip: &str, dest: &str) {
        nat.install(&app(name), ip(vip), &rules(&["tcp:80"]), ip(dest))
            .await
            .unwrap();
    }

    #[test]
    fn init_twice_leaves_one_jump_per_hook_in_each_family() {
        in_new_netns(|| async {
            Iptables::init().await.unwrap();
            let nat = Iptables::init().await.unwrap();
            assert!(nat.ipv6, "ip6tables should work in the test namespace");
            for family in [Family::V4, Family::V6] {
                for hook in HOOKS {
                    assert_eq!(jumps(family, hook).await.unwrap(), 1, "{family:?} {hook}");
                }
            }
        });
    }

    #[test]
    fn init_removes_duplicate_jumps_and_stale_rules() {
        in_new_netns(|| async {
            let nat = Iptables::init().await.unwrap();
            install_port_80(&nat, "stale", "192.0.2.10", "198.18.0.5").await;
            run_ok(
                Family::V4,
                &args(["-t", TABLE, "-A", "PREROUTING", "-j", CHAIN]),
            )
            .await
            .unwrap();
            let nat = Iptables::init().await.unwrap();
            assert_eq!(jumps(Family::V4, "PREROUTING").await.unwrap(), 1);
            assert_eq!(nat.list().await.unwrap(), Vec::<String>::new());
        });
    }

    fn item<'a>(app: &'a AppName, vip: &str, rules: &'a [NatRule], dest: &str) -> NatItem<'a> {
        NatItem {
            app,
            vip: ip(vip),
            rules,
            dest: ip(dest),
        }
    }

    #[test]
    fn a_batch_adds_only_missing_rules_and_removes_only_present_ones() {
        in_new_netns(|| async {
            let nat = Iptables::init().await.unwrap();
            let (a, b, c) = (app("a"), app("b"), app("c"));
            let nats = rules(&["tcp:80:8080", "udp:53"]);
            nat.install(&a, ip("192.0.2.1"), &nats, ip("198.18.0.5"))
                .await
                .unwrap();
            let jobs = [
                item(&a, "192.0.2.1", &nats, "198.18.0.5"),
                item(&b, "192.0.2.2", &nats, "198.18.0.5"),
                item(&c, "2001:db8::3", &nats, "2001:db8::5"),
            ];
            let results = nat.install_many(&jobs).await;
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            assert_eq!(nat.list().await.unwrap().len(), 6, "each rule once");
            // `b` again plus one never installed: a missing rule does not fail the commit.
            let d = app("d");
            let gone = [
                item(&b, "192.0.2.2", &nats, "198.18.0.5"),
                item(&d, "192.0.2.4", &nats, "198.18.0.5"),
                item(&c, "2001:db8::3", &nats, "2001:db8::5"),
            ];
            let results = nat.remove_many(&gone).await;
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            let listed = nat.list().await.unwrap();
            assert_eq!(listed.len(), 2, "{listed:#?}");
            assert!(listed.iter().all(|l| l.contains("gocast:a")), "{listed:#?}");
        });
    }

    #[test]
    fn a_failed_batch_is_applied_app_by_app_and_reports_each() {
        in_new_netns(|| async {
            let nat = Iptables::init().await.unwrap();
            // Someone deleted the IPv6 chain: the IPv6 commit fails, the IPv4 one does not.
            run_ok(
                Family::V6,
                &args(["-t", TABLE, "-D", "PREROUTING", "-j", CHAIN]),
            )
            .await
            .unwrap();
            run_ok(
                Family::V6,
                &args(["-t", TABLE, "-D", "OUTPUT", "-j", CHAIN]),
            )
            .await
            .unwrap();
            run_ok(Family::V6, &args(["-t", TABLE, "-X", CHAIN]))
                .await
                .unwrap();
            let (a, b) = (app("a"), app("b"));
            let nats = rules(&["tcp:80:8080"]);
            let jobs = [
                item(&a, "2001:db8::1", &nats, "2001:db8::5"),
                item(&b, "192.0.2.2", &nats, "198.18.0.5"),
            ];
            let results = nat.install_many(&jobs).await;
            assert!(results[0].is_err(), "{results:?}");
            assert!(results[1].is_ok(), "{results:?}");
            assert_eq!(nat.listing(false).await.unwrap().unwrap().rules.len(), 1);
        });
    }

    #[test]
    fn installing_twice_adds_each_rule_once_and_removing_takes_them_away() {
        in_new_netns(|| async {
            let nat = Iptables::init().await.unwrap();
            let (web, vip, dest) = (app("web"), ip("192.0.2.10"), ip("198.18.0.5"));
            let nats = rules(&["tcp:80:8080", "udp:53"]);
            nat.install(&web, vip, &nats, dest).await.unwrap();
            nat.install(&web, vip, &nats, dest).await.unwrap();
            let listed = nat.list().await.unwrap();
            assert_eq!(listed.len(), 2, "{listed:#?}");
            let tcp = listed.iter().find(|l| l.contains("-p tcp")).unwrap();
            assert!(
                tcp.contains("-d 192.0.2.10/32") && tcp.contains("--dport 80"),
                "{tcp}"
            );
            assert!(
                tcp.contains("--comment \"gocast:web\"") || tcp.contains("--comment gocast:web"),
                "{tcp}"
            );
            assert!(tcp.contains("--to-destination 198.18.0.5:8080"), "{tcp}");
            let udp = listed.iter().find(|l| l.contains("-p udp")).unwrap();
            assert!(
                udp.contains("--dport 53") && udp.contains("--to-destination 198.18.0.5:53"),
                "{udp}"
            );

            nat.remove(&web, vip, &nats, dest).await.unwrap();
            assert_eq!(nat.list().await.unwrap(), Vec::<String>::new());
            nat.remove(&web, vip, &nats, dest).await.unwrap();
        });
    }

    #[test]
    fn ipv6_rules_go_through_ip6tables() {
        in_new_netns(|| async {
            let nat = Iptables::init().await.unwrap();
            let (web, vip, dest) = (app("web6"), ip("2001:db8::10"), ip("2001:db8::5"));
            let nats = rules(&["tcp:443:8443"]);
            nat.install(&web, vip, &nats, dest).await.unwrap();
            nat.install(&web, vip, &nats, dest).await.unwrap();
            let listed = nat.list().await.unwrap();
            assert_eq!(listed.len(), 1, "{listed:#?}");
            assert!(listed[0].contains("-d 2001:db8::10/128"), "{}", listed[0]);
            assert!(
                listed[0].contains("--to-destination [2001:db8::5]:8443"),
                "{}",
                listed[0]
            );
            let v6 = run_ok(Family::V6, &args(["-t", TABLE, "-S", CHAIN]))
                .await
                .unwrap();
            assert!(v6.contains("2001:db8::10/128"), "{v6}");

            nat.remove(&web, vip, &nats, dest).await.unwrap();
            assert_eq!(nat.list().await.unwrap(), Vec::<String>::new());
        });
    }

    #[test]
    fn teardown_removes_the_jumps_and_the_chain_and_can_run_again() {
        in_new_netns(|| async {
            let nat = Iptables::init().await.unwrap();
            install_port_80(&nat, "web", "192.0.2.10", "198.18.0.5").await;
            install_port_80(&nat, "web", "2001:db8::10", "2001:db8::5").await;
            nat.teardown().await.unwrap();
            for family in [Family::V4, Family::V6] {
                assert!(!chain_exists(family).await.unwrap(), "{family:?}");
                for hook in HOOKS {
                    assert_eq!(jumps(family, hook).await.unwrap(), 0, "{family:?} {hook}");
                }
            }
            assert!(nat.list().await.is_err());
            nat.teardown().await.unwrap();
        });
    }

    #[test]
    fn a_flushed_table_gets_its_chain_and_jumps_back_and_the_rules_are_seen_missing() {
        in_new_netns(|| async {
            let nat = Iptables::init().await.unwrap();
            install_port_80(&nat, "web", "192.0.2.10", "198.18.0.5").await;
            let rule = "tcp:80".parse().unwrap();
            let listing = nat.listing(false).await.unwrap().unwrap();
            assert!(listing.chain_complete());
            assert!(listing.has(ip("192.0.2.10"), rule, ip("198.18.0.5")));
            // As `iptables -t nat -F` does: every chain flushed, jumps included.
            run_ok(Family::V4, &args(["-t", TABLE, "-F"]))
                .await
                .unwrap();
            let listing = nat.listing(false).await.unwrap().unwrap();
            assert!(listing.chain && !listing.chain_complete(), "{listing:?}");
            assert!(!listing.has(ip("192.0.2.10"), rule, ip("198.18.0.5")));
            nat.restore_chain(false).await.unwrap();
            nat.restore_chain(false).await.unwrap();
            assert!(nat.listing(false).await.unwrap().unwrap().chain_complete());
            for hook in HOOKS {
                assert_eq!(jumps(Family::V4, hook).await.unwrap(), 1, "{hook}");
            }
        });
    }
}
