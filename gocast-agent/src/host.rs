//! The real [`Host`]: VIPs on `lo` through netlink, NAT through the dataplane: the eBPF
//! programs (which also count traffic per VIP), or iptables where eBPF cannot run.
//!
//! Also decides the NAT destination of an app without its own: `agent.nat_dest_ip`, else the
//! local BGP address (the peer's `local_ip`, or the address the kernel uses toward the peer),
//! else the address of the default route's interface — the address GoCast would use. It is
//! looked up when a rule is installed, so an address that changes later is picked up.
//!
//! Self-repair's check of the host ([`Host::verify`], docs/design.md "Self-repair"): one dump
//! of `lo`'s addresses; with eBPF, map lookups and a check that each program is still attached
//! to each interface (a detached one is attached again here); with iptables, one `iptables -S`
//! per address family in use (a missing chain or jump is put back here). Kernel address events
//! on `lo` come in as drift hints.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr},
};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{
    app::{AppName, NatRule, Vip},
    config::{Config, DataplaneMode, IngressMode},
    dataplane::{
        DataplaneInfo,
        ebpf::{CounterReader, Ebpf, EbpfError, Hook, IngressHook},
        iptables::{CHAIN, Iptables, NatItem},
    },
    lifecycle::{
        Host, HostError, NatJob, Protected,
        events::{Drift, Expected, NatSpec, Part, RepairKind},
    },
    netlink::Netlink,
};

/// An address in global unicast space, used only as a route-lookup key to find the IPv6
/// source the kernel would pick by default (no packet is sent).
const V6_LOOKUP: Ipv6Addr = Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 1);

/// Where NAT sends traffic when an app does not say.
#[derive(Debug, Clone, Default)]
struct NatDest {
    configured: Option<IpAddr>,
    /// Per peer: its address (if configured) and the local addresses configured for it.
    peers: Vec<(Option<IpAddr>, Option<IpAddr>, Option<Ipv6Addr>)>,
}

/// The dataplane that does NAT.
enum Nat {
    Iptables(Iptables),
    Ebpf(Ebpf),
}

/// Netlink and the dataplane, as the lifecycle uses them.
pub struct SystemHost {
    netlink: Netlink,
    nat: Nat,
    info: DataplaneInfo,
    nat_dest: NatDest,
    /// The destination each app's rules were installed with: removal must name the same one
    /// even if the default has changed since.
    installed_dest: HashMap<AppName, IpAddr>,
    /// The eBPF VIP table filled up once: warned about.
    warned_full: bool,
    /// The addresses that left `lo`, until the lifecycle takes them ([`Host::drift_hints`]).
    hints: Option<mpsc::UnboundedReceiver<IpAddr>>,
    /// The last failure to check the host, logged once until a verification works again; and
    /// whether it happened in the current verification.
    verify_error: Option<(String, bool)>,
    /// What the host cannot put back (by [`Drift::Shared`] `what`): logged once.
    failing: HashSet<String>,
    /// The last failure to list the host's addresses, logged once until a listing works.
    addresses_error: Option<String>,
    /// No iptables listing before this: listing thousands of rules takes long enough that
    /// every 500 ms would cost a good part of a core (see [`LISTING_SHARE`]).
    next_listing: tokio::time::Instant,
}

/// At most this share of the time goes to listing iptables for self-repair: after a listing
/// that took `t`, the next waits `t / LISTING_SHARE` (with 1,000 rules a few tens of
/// milliseconds, so every verification still lists; with 10,000, ~200 ms every ~4 s).
const LISTING_SHARE: f64 = 0.05;

impl SystemHost {
    /// Connects to the kernel and reconciles the host with an empty desired state: VIPs a
    /// previous run left on `lo` (marked by their address protocol) and the rules in the NAT
    /// chain are removed. Nothing else is touched.
    ///
    /// The dataplane: eBPF on `dataplane.interfaces` (default: the interfaces toward the BGP
    /// peers). In `auto` mode a failure to load or attach falls back to iptables with one WARN;
    /// in `ebpf` mode it is an error.
    pub async fn start(config: &Config) -> Result<Self, HostError> {
        let netlink = Netlink::new().await?;
        let stale = netlink.owned_vips().await?;
        for (net, label) in stale {
            warn!(vip = %net, label = label.as_deref().unwrap_or(""), "removing a vip left by a previous run");
            netlink.remove_address(net).await?;
        }
        // Without the events, drift is still found by the periodic check, only later.
        let hints = netlink
            .watch_lo_removals()
            .inspect_err(
                |e| warn!(error = %crate::error_chain(e), "not following address events on lo"),
            )
            .ok();
        let (nat, info) = start_dataplane(&netlink, config).await?;
        info!(mode = info.mode, reason = %info.reason, "dataplane ready; no stale vip or nat rule left");
        let nat_dest = NatDest {
            configured: config.agent.nat_dest_ip,
            peers: config
                .bgp
                .peers
                .iter()
                .map(|p| (p.peer_ip, p.local_ip, p.local_ipv6))
                .collect(),
        };
        Ok(Self {
            netlink,
            nat,
            info,
            nat_dest,
            installed_dest: HashMap::new(),
            warned_full: false,
            hints,
            verify_error: None,
            failing: HashSet::new(),
            addresses_error: None,
            next_listing: tokio::time::Instant::now(),
        })
    }

    /// A reader of the per-VIP counters when the eBPF dataplane runs; `None` with iptables or
    /// when the maps cannot be opened again (logged: the agent runs on without counters).
    pub fn counter_reader(&self) -> Option<CounterReader> {
        let Nat::Ebpf(ebpf) = &self.nat else {
            return None;
        };
        ebpf.counter_reader()
            .inspect_err(|e| warn!(error = %crate::error_chain(e), "per-VIP counters unavailable"))
            .ok()
    }

    /// Which dataplane runs and why, for `/info`.
    pub fn dataplane_info(&self) -> DataplaneInfo {
        self.info.clone()
    }

    async fn default_nat_dest(&self, v4: bool) -> Result<IpAddr, HostError> {
        let family = |ip: &IpAddr| ip.is_ipv4() == v4;
        if let Some(ip) = self.nat_dest.configured.filter(family) {
            return Ok(ip);
        }
        for (peer, local, local6) in &self.nat_dest.peers {
            let configured = if v4 { *local } else { local6.map(IpAddr::V6) };
            if let Some(ip) = configured.filter(family) {
                return Ok(ip);
            }
            if let Some(peer) = peer.filter(family)
                && let Some(ip) = self.netlink.source_toward(peer).await?
            {
                return Ok(ip);
            }
        }
        let fallback = if v4 {
            self.netlink
                .default_gateway()
                .await
                .map(|g| g.map(|(_, local)| local))
        } else {
            self.netlink.source_toward(IpAddr::V6(V6_LOOKUP)).await
        };
        fallback?.ok_or(HostError::NoNatDest {
            family: if v4 { 4 } else { 6 },
        })
    }
}

impl SystemHost {
    /// With eBPF, puts a VIP now on `lo` into the VIP table (for its counters and NAT).
    fn add_to_table(&mut self, vip: &Vip) -> Result<(), HostError> {
        if let Nat::Ebpf(ebpf) = &mut self.nat {
            match ebpf.add_vip(vip.addr()) {
                // The VIP works without counters; only its NAT needs the table (refused then).
                Err(e @ EbpfError::Full { .. }) => {
                    if !std::mem::replace(&mut self.warned_full, true) {
                        warn!(error = %e, "eBPF VIP table full: further vips get no counters and no eBPF NAT");
                    }
                }
                other => other?,
            }
        }
        Ok(())
    }
}

/// Self-repair's checks, one per part of the host.
impl SystemHost {
    /// Logs a failed check once (until a whole verification works again); what it could not
    /// check counts as present.
    fn check_failed(&mut self, what: &str, e: &dyn std::error::Error) {
        let message = format!("{what}: {}", crate::error_chain(e));
        if self
            .verify_error
            .as_ref()
            .is_none_or(|(m, _)| *m != message)
        {
            warn!(error = %message, "cannot check the host for drift; trying again later");
        }
        self.verify_error = Some((message, true));
    }

    /// Attaches again each eBPF program someone detached from its interface (one netlink
    /// query per interface for XDP, one tcx query per TC program).
    async fn verify_programs(&mut self, drift: &mut Vec<Drift>) {
        let Nat::Ebpf(ebpf) = &self.nat else {
            return;
        };
        let mut failure: Option<HostError> = None;
        let hooks = ebpf.hooks();
        let mut xdp_id = None;
        if hooks.iter().any(|(_, h)| *h == Hook::Xdp) {
            match ebpf.program_id(Hook::Xdp) {
                Ok(id) => xdp_id = Some(id),
                Err(e) => failure = Some(e.into()),
            }
        }
        let mut checks = Vec::with_capacity(hooks.len());
        for (interface, hook) in hooks {
            // XDP is asked from netlink below: no borrow of the dataplane across an await.
            let attached = match hook {
                Hook::Xdp => Ok(None),
                Hook::TcIngress | Hook::TcEgress => ebpf.tc_attached(&interface, hook),
            };
            match attached {
                Ok(attached) => checks.push((interface, hook, attached)),
                Err(e) => failure = Some(e.into()),
            }
        }
        for (interface, hook, attached) in &mut checks {
            if let (Hook::Xdp, Some(id)) = (*hook, xdp_id) {
                match self.netlink.xdp_program_ids(interface).await {
                    Ok(ids) => *attached = Some(ids.contains(&id)),
                    Err(e) => failure = Some(e.into()),
                }
            }
        }
        if let Some(e) = failure {
            self.check_failed("eBPF programs", &e);
        }
        let Nat::Ebpf(ebpf) = &mut self.nat else {
            return;
        };
        for (interface, hook, _) in checks.into_iter().filter(|c| c.2 == Some(false)) {
            let what = format!("eBPF program {} detached from {interface}", hook.program());
            let result = ebpf
                .reattach(&interface, hook)
                .map_err(|e| crate::error_chain(&e));
            drift.push(shared_repair(
                &mut self.failing,
                RepairKind::Program,
                what,
                result,
            ));
        }
    }

    /// Each expected VIP is on `lo` (one dump) and, with eBPF, in the VIP table.
    async fn verify_vips(&mut self, expected: &[Expected], drift: &mut Vec<Drift>) {
        if !expected.iter().any(|e| e.on_lo) {
            return;
        }
        let on_lo = match self.netlink.lo_addresses().await {
            Ok(addresses) => addresses,
            Err(e) => return self.check_failed("addresses on lo", &e),
        };
        for e in expected.iter().filter(|e| e.on_lo) {
            let what = if on_lo.contains(&e.vip.addr()) {
                let Nat::Ebpf(ebpf) = &self.nat else {
                    continue;
                };
                match ebpf.vip_missing(e.vip.addr()) {
                    Ok(false) => continue,
                    Ok(true) => "vip missing from the eBPF vip table",
                    Err(err) => {
                        self.check_failed("eBPF vip table", &err);
                        continue;
                    }
                }
            } else {
                "vip missing from lo"
            };
            drift.push(Drift::App {
                app: e.app.clone(),
                vip: e.vip,
                part: Part::Vip,
                what: what.to_owned(),
            });
        }
    }

    /// Each expected NAT rule is in the NAT map or the `GOCAST` chain, toward the destination
    /// it was installed with. With iptables, a missing chain or jump is put back first.
    async fn verify_nat(&mut self, expected: &[Expected], drift: &mut Vec<Drift>) {
        let wanted: Vec<(&Expected, &NatSpec, IpAddr)> = expected
            .iter()
            .filter_map(|e| {
                let nat = e.nat.as_ref()?;
                let dest = self.installed_dest.get(&e.app).copied().or(nat.dest)?;
                Some((e, nat, dest))
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let missing = |e: &Expected, nat: &NatSpec, what: &str| Drift::App {
            app: e.app.clone(),
            vip: e.vip,
            part: Part::Nat(nat.clone()),
            what: what.to_owned(),
        };
        let iptables = match &self.nat {
            Nat::Ebpf(ebpf) => {
                let mut failure = None;
                for (e, nat, dest) in &wanted {
                    match ebpf.nat_missing(e.vip.addr(), &nat.rules, *dest) {
                        Ok(false) => {}
                        Ok(true) => {
                            drift.push(missing(
                                e,
                                nat,
                                "nat entries missing from the eBPF nat table",
                            ));
                        }
                        Err(err) => failure = Some(err),
                    }
                }
                if let Some(err) = failure {
                    self.check_failed("eBPF nat table", &err);
                }
                return;
            }
            Nat::Iptables(iptables) => iptables,
        };
        let started = tokio::time::Instant::now();
        if started < self.next_listing {
            // Not checked this time: not drift (see `LISTING_SHARE`).
            return;
        }
        for v6 in [false, true] {
            let family: Vec<&(&Expected, &NatSpec, IpAddr)> = wanted
                .iter()
                .filter(|(e, _, _)| e.vip.addr().is_ipv6() == v6)
                .collect();
            if family.is_empty() {
                continue;
            }
            let listing = match iptables.listing(v6).await {
                Ok(Some(listing)) => listing,
                Ok(None) => continue,
                Err(err) => {
                    let err = HostError::from(err);
                    return self.check_failed("iptables nat table", &err);
                }
            };
            if !listing.chain_complete() {
                let what = format!(
                    "{} chain {CHAIN} or its jumps from PREROUTING and OUTPUT",
                    if v6 { "ip6tables" } else { "iptables" }
                );
                let result = iptables
                    .restore_chain(v6)
                    .await
                    .map_err(|e| crate::error_chain(&e));
                drift.push(shared_repair(
                    &mut self.failing,
                    RepairKind::Nat,
                    what,
                    result,
                ));
            }
            for (e, nat, dest) in family {
                if !nat
                    .rules
                    .iter()
                    .all(|r| listing.has(e.vip.addr(), *r, *dest))
                {
                    drift.push(missing(e, nat, "nat rules missing from the GOCAST chain"));
                }
            }
        }
        self.next_listing = started + started.elapsed().div_f64(LISTING_SHARE);
    }
}

/// Logs what the host put back itself (a failure once, until it works again) and reports it.
fn shared_repair(
    failing: &mut HashSet<String>,
    kind: RepairKind,
    what: String,
    result: Result<(), String>,
) -> Drift {
    match &result {
        Ok(()) => {
            failing.remove(&what);
            warn!(%what, "missing from the host: put back");
        }
        Err(e) if failing.insert(what.clone()) => {
            error!(%what, error = %e, "missing from the host and cannot be put back; trying at every check");
        }
        Err(_) => {}
    }
    Drift::Shared { kind, what, result }
}

/// Loads the dataplane `config.dataplane.mode` asks for, falling back from eBPF to iptables in
/// `auto` mode.
async fn start_dataplane(
    netlink: &Netlink,
    config: &Config,
) -> Result<(Nat, DataplaneInfo), HostError> {
    let mode = match config.dataplane.mode {
        DataplaneMode::Iptables => {
            let nat = Nat::Iptables(Iptables::init().await?);
            return Ok((nat, DataplaneInfo::iptables_forced()));
        }
        DataplaneMode::Auto => "auto",
        DataplaneMode::Ebpf => "ebpf",
    };
    let loaded = ebpf_interfaces(netlink, config)
        .await
        .and_then(|interfaces| Ok(Ebpf::load(&interfaces)?));
    match loaded {
        Ok(ebpf) => {
            // What aya allocated to load the object (the kernel's BTF) is free now.
            gocast_common::heap::trim();
            // In the background: it runs iptables (a check, and a teardown when a chain is
            // left), and nothing of ours waits for it.
            tokio::spawn(remove_stale_iptables_chain());
            let info = DataplaneInfo::ebpf(mode, ebpf.interfaces());
            Ok((Nat::Ebpf(ebpf), info))
        }
        Err(e) if config.dataplane.mode == DataplaneMode::Auto => {
            let why = crate::error_chain(&e);
            warn!(reason = %why, "eBPF dataplane unavailable: using iptables");
            let nat = Nat::Iptables(Iptables::init().await?);
            Ok((nat, DataplaneInfo::iptables_fallback(&why)))
        }
        Err(e) => Err(e),
    }
}

/// `dataplane.interfaces`, else the interfaces the kernel uses toward the configured peers,
/// else (no peer address: autodiscovery) the default route's; each with its ingress hook.
async fn ebpf_interfaces(
    netlink: &Netlink,
    config: &Config,
) -> Result<Vec<(String, IngressHook)>, HostError> {
    let names = interface_names(netlink, config).await?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let hook = match config.dataplane.ingress {
            IngressMode::Xdp => IngressHook::Xdp,
            IngressMode::Tc => IngressHook::Tc,
            IngressMode::Auto if netlink.is_virtual(&name).await? => IngressHook::Tc,
            IngressMode::Auto => IngressHook::XdpNativeOrTc,
        };
        out.push((name, hook));
    }
    Ok(out)
}

async fn interface_names(netlink: &Netlink, config: &Config) -> Result<Vec<String>, HostError> {
    if !config.dataplane.interfaces.is_empty() {
        return Ok(config.dataplane.interfaces.clone());
    }
    let mut targets: Vec<IpAddr> = config.bgp.peers.iter().filter_map(|p| p.peer_ip).collect();
    if targets.is_empty()
        && let Some((gateway, _)) = netlink.default_gateway().await?
    {
        targets.push(gateway);
    }
    let mut interfaces = Vec::new();
    for target in targets {
        if let Some(name) = netlink.interface_toward(target).await?
            && !interfaces.contains(&name)
        {
            interfaces.push(name);
        }
    }
    if interfaces.is_empty() {
        return Err(HostError::NoInterface);
    }
    Ok(interfaces)
}

/// The eBPF dataplane replaces iptables: a `GOCAST` chain a previous iptables run left behind
/// would NAT the same traffic twice. Best effort: no iptables binary means no chain.
async fn remove_stale_iptables_chain() {
    if !Iptables::chain_exists().await {
        return;
    }
    match Iptables::init().await {
        Ok(iptables) => {
            if let Err(e) = iptables.teardown().await {
                warn!(error = %crate::error_chain(&e), "cannot remove the iptables chain of a previous run");
            }
        }
        Err(e) => debug!(error = %crate::error_chain(&e), "no iptables chain to clean up"),
    }
}

impl Host for SystemHost {
    async fn add_vip(&mut self, vip: &Vip, label: &str) -> Result<(), HostError> {
        self.netlink.add_vip(vip, label).await?;
        self.add_to_table(vip)
    }

    async fn remove_vip(&mut self, vip: &Vip) -> Result<(), HostError> {
        if let Nat::Ebpf(ebpf) = &mut self.nat {
            ebpf.remove_vip(vip.addr())?;
        }
        Ok(self.netlink.remove_vip(vip).await?)
    }

    async fn install_nat(
        &mut self,
        app: &AppName,
        vip: &Vip,
        rules: &[NatRule],
        dest: Option<IpAddr>,
    ) -> Result<(), HostError> {
        let dest = match dest {
            Some(d) => d,
            None => self.default_nat_dest(vip.addr().is_ipv4()).await?,
        };
        match &mut self.nat {
            Nat::Iptables(iptables) => iptables.install(app, vip.addr(), rules, dest).await?,
            Nat::Ebpf(ebpf) => ebpf.install_nat(vip.addr(), rules, dest)?,
        }
        self.installed_dest.insert(app.clone(), dest);
        Ok(())
    }

    async fn remove_nat(
        &mut self,
        app: &AppName,
        vip: &Vip,
        rules: &[NatRule],
        dest: Option<IpAddr>,
    ) -> Result<(), HostError> {
        let Some(dest) = self.installed_dest.get(app).copied().or(dest) else {
            return Ok(());
        };
        match &mut self.nat {
            Nat::Iptables(iptables) => iptables.remove(app, vip.addr(), rules, dest).await?,
            Nat::Ebpf(ebpf) => ebpf.remove_nat(vip.addr(), rules)?,
        }
        self.installed_dest.remove(app);
        Ok(())
    }

    async fn add_vips(&mut self, vips: &[(&Vip, &str)]) -> Vec<Result<(), HostError>> {
        // Every request in flight together on the one netlink socket: one round trip for the
        // batch instead of one per VIP. The eBPF table is then filled in the same order.
        let netlink = &self.netlink;
        let added =
            futures::future::join_all(vips.iter().map(|(vip, label)| netlink.add_vip(vip, label)))
                .await;
        let mut results = Vec::with_capacity(vips.len());
        for ((vip, _), result) in vips.iter().zip(added) {
            results.push(match result {
                Ok(()) => self.add_to_table(vip),
                Err(e) => Err(e.into()),
            });
        }
        results
    }

    async fn remove_vips(&mut self, vips: &[&Vip]) -> Vec<Result<(), HostError>> {
        let mut results = Vec::with_capacity(vips.len());
        let mut leave = Vec::new();
        for vip in vips {
            let out_of_table = match &mut self.nat {
                Nat::Ebpf(ebpf) => ebpf.remove_vip(vip.addr()).map_err(HostError::from),
                Nat::Iptables(_) => Ok(()),
            };
            if out_of_table.is_ok() {
                leave.push(*vip);
            }
            results.push(out_of_table);
        }
        let netlink = &self.netlink;
        let removed =
            futures::future::join_all(leave.iter().map(|vip| netlink.remove_vip(vip))).await;
        let mut removed = removed.into_iter();
        for result in &mut results {
            if result.is_ok() {
                *result = removed.next().unwrap_or(Ok(())).map_err(HostError::from);
            }
        }
        results
    }

    async fn install_nats(&mut self, jobs: &[NatJob<'_>]) -> Vec<Result<(), HostError>> {
        if matches!(self.nat, Nat::Ebpf(_)) {
            // Map updates: nothing to gain from batching.
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                results.push(
                    self.install_nat(job.app, job.vip, job.rules, job.dest)
                        .await,
                );
            }
            return results;
        }
        // The default destination is looked up once per family for the batch.
        let mut defaults: [Option<Option<IpAddr>>; 2] = [None, None];
        let mut dests = Vec::with_capacity(jobs.len());
        for job in jobs {
            let v4 = job.vip.addr().is_ipv4();
            let dest = match (job.dest, defaults[usize::from(!v4)]) {
                (Some(d), _) => Some(d),
                (None, Some(known)) => known,
                (None, None) => {
                    let found = self.default_nat_dest(v4).await.ok();
                    defaults[usize::from(!v4)] = Some(found);
                    found
                }
            };
            dests.push(dest.ok_or(v4));
        }
        let items: Vec<NatItem<'_>> = jobs
            .iter()
            .zip(&dests)
            .filter_map(|(job, dest)| {
                Some(NatItem {
                    app: job.app,
                    vip: job.vip.addr(),
                    rules: job.rules,
                    dest: *dest.as_ref().ok()?,
                })
            })
            .collect();
        let Nat::Iptables(iptables) = &self.nat else {
            unreachable!("eBPF returned above");
        };
        let mut installed = iptables.install_many(&items).await.into_iter();
        let mut results = Vec::with_capacity(jobs.len());
        for (job, dest) in jobs.iter().zip(dests) {
            results.push(match dest {
                // Looked up again for its error (rare: no destination at all).
                Err(v4) => self.default_nat_dest(v4).await.map(drop),
                Ok(dest) => match installed.next() {
                    Some(Ok(())) => {
                        self.installed_dest.insert(job.app.clone(), dest);
                        Ok(())
                    }
                    Some(Err(e)) => Err(e.into()),
                    None => Ok(()),
                },
            });
        }
        results
    }

    async fn remove_nats(&mut self, jobs: &[NatJob<'_>]) -> Vec<Result<(), HostError>> {
        let Nat::Iptables(iptables) = &self.nat else {
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                results.push(self.remove_nat(job.app, job.vip, job.rules, job.dest).await);
            }
            return results;
        };
        // The destination each app's rules were installed with; none: nothing to remove.
        let dests: Vec<Option<IpAddr>> = jobs
            .iter()
            .map(|job| self.installed_dest.get(job.app).copied().or(job.dest))
            .collect();
        let items: Vec<NatItem<'_>> = jobs
            .iter()
            .zip(&dests)
            .filter_map(|(job, dest)| {
                Some(NatItem {
                    app: job.app,
                    vip: job.vip.addr(),
                    rules: job.rules,
                    dest: (*dest)?,
                })
            })
            .collect();
        let mut removed = iptables.remove_many(&items).await.into_iter();
        let mut results = Vec::with_capacity(jobs.len());
        for (job, dest) in jobs.iter().zip(dests) {
            results.push(match dest.map(|_| removed.next().unwrap_or(Ok(()))) {
                None => Ok(()),
                Some(Ok(())) => {
                    self.installed_dest.remove(job.app);
                    Ok(())
                }
                Some(Err(e)) => Err(e.into()),
            });
        }
        results
    }

    async fn shutdown(&mut self) -> Result<(), HostError> {
        match &mut self.nat {
            Nat::Iptables(iptables) => Ok(iptables.teardown().await?),
            Nat::Ebpf(ebpf) => {
                ebpf.shutdown();
                Ok(())
            }
        }
    }

    async fn verify(&mut self, expected: &[Expected]) -> Vec<Drift> {
        if let Some((_, this_time)) = self.verify_error.as_mut() {
            *this_time = false;
        }
        let mut drift = Vec::new();
        // Programs first: a NAT entry is of no use while its program is detached.
        self.verify_programs(&mut drift).await;
        self.verify_vips(expected, &mut drift).await;
        self.verify_nat(expected, &mut drift).await;
        if self
            .verify_error
            .as_ref()
            .is_some_and(|(_, this_time)| !this_time)
        {
            info!("checking the host for drift works again");
            self.verify_error = None;
        }
        drift
    }

    fn drift_hints(&mut self) -> Option<mpsc::UnboundedReceiver<IpAddr>> {
        self.hints.take()
    }

    async fn local_addresses(&mut self) -> Option<Vec<Protected>> {
        let listed = self.netlink.interface_addresses().await;
        let mut protected: Vec<Protected> = match listed {
            Ok(addresses) => addresses
                .into_iter()
                .map(|(addr, name)| Protected::interface(addr, &name))
                .collect(),
            Err(e) => {
                let message = crate::error_chain(&e);
                if self.addresses_error.as_ref() != Some(&message) {
                    warn!(error = %message, "cannot list the host's addresses; vips are checked against the last known ones");
                }
                self.addresses_error = Some(message);
                return None;
            }
        };
        if self.addresses_error.take().is_some() {
            info!("listing the host's addresses works again");
        }
        // An autodiscovered peer is the default gateway, which is no address of ours; the
        // route dump runs only then.
        if self
            .nat_dest
            .peers
            .iter()
            .any(|(peer, _, _)| peer.is_none())
        {
            match self.netlink.default_gateway().await {
                Ok(Some((gateway, _))) => protected.push(Protected::new(
                    gateway,
                    "the BGP peer (the default gateway, autodiscovered)",
                )),
                Ok(None) => {}
                Err(e) => {
                    debug!(error = %crate::error_chain(&e), "cannot look up the default gateway");
                }
            }
        }
        Some(protected)
    }
}
