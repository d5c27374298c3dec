//! The eBPF dataplane: `gocast-ebpf`'s XDP ingress NAT and TC egress reverse NAT, with per-VIP
//! counters (`docs/design.md`, "Dataplane").
//!
//! The object is the one `cargo xtask build-ebpf` builds, embedded by `build.rs`; a build
//! without it embeds an empty file and [`Ebpf::load`] fails with [`EbpfError::NotBuilt`]. Maps
//! are found by the names in `gocast_common::maps`. Dropping [`Ebpf`] (or [`Ebpf::shutdown`])
//! detaches both programs; the `clsact` qdisc stays, as other programs may use it.
//!
//! # Logs
//!
//! The programs log through aya-log on rare paths only (a new NAT flow at debug, a refused
//! flow-map insert or a failed rewrite, TC ingress or egress, at warn): the packet programs note
//! the record and tail-call a log program (`gocast_xdp_log` from XDP, `gocast_tc_log` from
//! either TC program) that emits it. At load time the
//! agent sets the object's `AYA_LOG_LEVEL` global to the most verbose level its log filter lets
//! through for [`EBPF_LOG_TARGET`]; the global sits in a frozen read-only map, so the verifier
//! knows it and drops disabled statements. With no level enabled the log programs are not even
//! loaded, and the rare paths' tail calls fail and fall through. Ordinary packets never reach
//! any of this: their only cost is an untaken branch. A task reads the records from the
//! `AYA_LOGS` ring buffer and hands them to the `log` crate, which `main.rs` bridges into
//! `tracing`.

use std::{collections::HashMap as StdHashMap, io, net::IpAddr};

use aya::{
    maps::{
        Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues, ProgramArray,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId, TcError},
        xdp::XdpLinkId,
    },
};
use aya_log::EbpfLogger;
use gocast_common::maps::{
    COUNTERS_MAP, MAX_VIPS, NAT_MAP, NatKey, NatTarget, PORTS_MAP, PROTO_TCP, PROTO_UDP, PortBits,
    SLOTS_MAP, TC_LOG_MAP, TC_LOG_PROGRAM, VIP_ADDRS_MAP, VIPS_MAP, VipCounters, VipKey,
    XDP_LOG_MAP, XDP_LOG_PROGRAM, addr_bit, port_bit,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{Level, debug, info, warn};

use crate::app::{NatRule, Proto};

/// The object `build.rs` embedded: empty when it was not built.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gocast-ebpf.o"));

/// aya-log's ring buffer in the object.
const LOG_RING: &str = "AYA_LOGS";
/// Its size. Records (a few hundred bytes) come on rare paths only and a task drains them
/// at once, so 16 KiB is plenty; the agent maps the buffer's pages twice, so aya-log's
/// default 128 KiB cost 260 KiB of resident memory, this 36 KiB.
const LOG_RING_BYTES: u32 = 16 * 1024;

/// The XDP ingress program in the object.
const XDP_PROGRAM: &str = "gocast_xdp";
/// The TC egress classifier in the object.
const TC_PROGRAM: &str = "gocast_tc_egress";
/// The TC ingress classifier: the XDP program's work where XDP does not pay.
const TC_INGRESS_PROGRAM: &str = "gocast_tc_ingress";

/// Where the ingress program (counters, destination NAT) runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressHook {
    /// XDP in native (driver) mode, else generic (`dataplane.ingress: xdp`).
    Xdp,
    /// XDP in native mode, else TC ingress: generic XDP copies every cloned skb, TC does not.
    XdpNativeOrTc,
    /// TC (clsact) ingress: virtual interfaces such as veth, whose native XDP copies cloned
    /// skbs into XDP buffers.
    Tc,
}

/// Where one of the programs runs on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// The ingress program at XDP.
    Xdp,
    /// The ingress program at TC ingress.
    TcIngress,
    /// The reverse-NAT program at TC egress.
    TcEgress,
}

impl Hook {
    /// The program that runs there.
    pub fn program(self) -> &'static str {
        match self {
            Self::Xdp => XDP_PROGRAM,
            Self::TcIngress => TC_INGRESS_PROGRAM,
            Self::TcEgress => TC_PROGRAM,
        }
    }

    fn tc_type(self) -> TcAttachType {
        match self {
            Self::TcEgress => TcAttachType::Egress,
            Self::Xdp | Self::TcIngress => TcAttachType::Ingress,
        }
    }
}

/// One program attached to one interface, kept so self-repair can check it and attach it
/// again the same way (docs/design.md, "Self-repair").
#[derive(Debug)]
struct Attachment {
    interface: String,
    hook: Hook,
    /// The mode an XDP program was attached in (unused for TC).
    xdp_mode: XdpMode,
    /// The link holding the program there; `None` after attaching it again failed.
    link: Option<AttachedLink>,
}

/// The aya link of an [`Attachment`], owned by its program in the object.
#[derive(Debug)]
enum AttachedLink {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

/// Attaches the program of `hook` to `interface` (an XDP program in `mode`).
fn attach(
    bpf: &mut aya::Ebpf,
    interface: &str,
    hook: Hook,
    mode: XdpMode,
) -> Result<AttachedLink, EbpfError> {
    let attach_error = |source| EbpfError::Attach {
        program: hook.program(),
        interface: interface.to_owned(),
        source,
    };
    match hook {
        Hook::Xdp => {
            let xdp: &mut Xdp = program(bpf, XDP_PROGRAM)?;
            let link = xdp.attach(interface, mode).map_err(attach_error)?;
            Ok(AttachedLink::Xdp(link))
        }
        Hook::TcIngress | Hook::TcEgress => {
            let tc: &mut SchedClassifier = program(bpf, hook.program())?;
            let link = tc.attach(interface, hook.tc_type()).map_err(attach_error)?;
            Ok(AttachedLink::Tc(link))
        }
    }
}

/// Attaches the ingress program at `hook`; returns the attachment and the hook it ended up
/// at, for logs and `/info`.
fn attach_ingress(
    bpf: &mut aya::Ebpf,
    interface: &str,
    hook: IngressHook,
) -> Result<(Attachment, &'static str), EbpfError> {
    let attachment = |hook, xdp_mode, link| Attachment {
        interface: interface.to_owned(),
        hook,
        xdp_mode,
        link: Some(link),
    };
    if hook != IngressHook::Tc {
        match attach(bpf, interface, Hook::Xdp, XdpMode::Driver) {
            Ok(link) => return Ok((attachment(Hook::Xdp, XdpMode::Driver, link), "xdp native")),
            Err(EbpfError::Attach { source: native, .. }) if hook == IngressHook::Xdp => {
                warn!(%interface, error = %native, "native XDP refused; attaching in generic (SKB) mode");
                let link = attach(bpf, interface, Hook::Xdp, XdpMode::Skb)?;
                return Ok((attachment(Hook::Xdp, XdpMode::Skb, link), "xdp generic"));
            }
            Err(EbpfError::Attach { source: native, .. }) => {
                info!(%interface, error = %native, "native XDP refused; using TC ingress");
            }
            Err(other) => return Err(other),
        }
    }
    let link = attach(bpf, interface, Hook::TcIngress, XdpMode::default())?;
    Ok((attachment(Hook::TcIngress, XdpMode::default(), link), "tc"))
}

/// Detaches a link of ours. The kernel may have detached it already (someone did): then this
/// only closes its descriptor.
fn detach(bpf: &mut aya::Ebpf, hook: Hook, link: AttachedLink) -> Result<(), EbpfError> {
    let detach_error = |source| EbpfError::Program {
        program: hook.program(),
        source,
    };
    match link {
        AttachedLink::Xdp(id) => {
            let xdp: &mut Xdp = program(bpf, XDP_PROGRAM)?;
            xdp.detach(id).map_err(detach_error)
        }
        AttachedLink::Tc(id) => {
            let tc: &mut SchedClassifier = program(bpf, hook.program())?;
            tc.detach(id).map_err(detach_error)
        }
    }
}

/// The target (the module path in `gocast-ebpf`) of the programs' log records: filter on it, or
/// on its prefix `gocast_ebpf`, e.g. `RUST_LOG=info,gocast_ebpf=debug`.
pub const EBPF_LOG_TARGET: &str = "gocast_ebpf::logs";

/// An eBPF dataplane operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("eBPF object not built: run cargo xtask build-ebpf")]
    NotBuilt,
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {program} is not in the object")]
    MissingProgram { program: &'static str },
    #[error("loading eBPF program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching eBPF program {program} to interface {interface}")]
    Attach {
        program: &'static str,
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("adding the clsact qdisc to interface {interface}")]
    Clsact {
        interface: String,
        #[source]
        source: TcError,
    },
    #[error("duplicating the file descriptor of eBPF program {program}")]
    ProgramFd {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("eBPF map {map} is not in the object")]
    MissingMap { map: &'static str },
    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("eBPF map {map}: cannot build per-CPU values")]
    PerCpu {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no counter slot left for vip {vip}: {MAX_VIPS} vips already in {VIPS_MAP}")]
    Full { vip: IpAddr },
    #[error(
        "vip {vip} is not in the eBPF VIP table ({MAX_VIPS} vips at most), so eBPF cannot NAT it"
    )]
    NotLoaded { vip: IpAddr },
    #[error("cannot NAT {vip} to {dest}: not the same address family")]
    FamilyMismatch { vip: IpAddr, dest: IpAddr },
    #[error("the eBPF dataplane was shut down")]
    ShutDown,
    #[error("asking which eBPF programs are attached to interface {interface}")]
    Query {
        interface: String,
        #[source]
        source: ProgramError,
    },
}

/// What [`Ebpf::shutdown`] drops: the object (programs and their links), the maps and the log
/// reader. Fields drop in order: the programs are detached before the reader stops.
struct Loaded {
    /// Owns the programs and their links; dropping it detaches them.
    bpf: aya::Ebpf,
    vips: HashMap<MapData, VipKey, u32>,
    nat: HashMap<MapData, NatKey, NatTarget>,
    counters: PerCpuArray<MapData, VipCounters>,
    /// Each slot's generation ([`SLOTS_MAP`]).
    generations: Array<MapData, u32>,
    ports: Array<MapData, PortBits>,
    vip_addrs: Array<MapData, u64>,
    /// `None` when the programs log nothing at the chosen level, or the reader could not start.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "held for its drop; the tests check the task ends")
    )]
    logs: Option<LogReader>,
}

/// The task that forwards the programs' log records to the `log` crate. It holds only the ring
/// buffer, never the programs; dropping this stops it (after a last read).
struct LogReader {
    _stop: DropGuard,
    #[cfg_attr(not(test), expect(dead_code, reason = "the tests check the task ends"))]
    task: tokio::task::JoinHandle<()>,
}

/// The loaded and attached eBPF dataplane.
pub struct Ebpf {
    /// Boxed: the maps are large, and the agent holds this next to the iptables dataplane.
    loaded: Option<Box<Loaded>>,
    /// Counter slot of each VIP in [`VIPS_MAP`].
    slots: watch::Sender<StdHashMap<IpAddr, u32>>,
    /// Slots freed by removed VIPs, reused before new ones.
    free: Vec<u32>,
    /// The next never-used slot.
    next: u32,
    /// The last generation written to [`SLOTS_MAP`]: each bump takes the next, so a slot
    /// never gets back a generation it had.
    generation: u32,
    /// What [`NAT_MAP`] holds, to derive [`PORTS_MAP`] from.
    rules: StdHashMap<NatKey, NatTarget>,
    interfaces: Vec<String>,
    /// Every program on every interface, for self-repair.
    attachments: Vec<Attachment>,
    /// TC programs are attached through tcx links (Linux 6.6, as aya decides), which the
    /// kernel can list: only then is their attachment checked.
    tcx: bool,
}

impl std::fmt::Debug for Ebpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ebpf")
            .field("loaded", &self.loaded.is_some())
            .field("vips", &self.slots.borrow().len())
            .field("interfaces", &self.interfaces)
            .finish_non_exhaustive()
    }
}

impl Ebpf {
    /// Loads the embedded object and attaches, on each interface, the ingress program at its
    /// hook and the TC egress classifier. With no interface, the programs are loaded but
    /// attached nowhere (tests).
    ///
    /// The programs log at the levels the global `tracing` filter enables for
    /// [`EBPF_LOG_TARGET`] (see the module's "Logs").
    pub fn load(interfaces: &[(String, IngressHook)]) -> Result<Self, EbpfError> {
        Self::load_bytes(OBJECT, interfaces, kernel_log_level(), log::logger())
    }

    /// [`Ebpf::load`] of `object`, with `AYA_LOG_LEVEL` set to `log_level` (0: no logs, else an
    /// [`aya_log::Level`]) and records going to `logger`.
    fn load_bytes(
        object: &[u8],
        interfaces: &[(String, IngressHook)],
        log_level: u8,
        logger: &'static dyn log::Log,
    ) -> Result<Self, EbpfError> {
        if object.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let mut bpf = aya::EbpfLoader::new()
            // No CO-RE: the programs read packets and our maps, never kernel structures, so the
            // kernel's BTF (several MiB to read and parse, ~100 ms) is not needed.
            .btf(None)
            // Not `must_exist`: an object without log statements has no such global.
            .override_global(aya_log::LEVEL, &log_level, false)
            .map_max_entries(LOG_RING, LOG_RING_BYTES)
            .load(object)
            .map_err(|e| EbpfError::Load(Box::new(e)))?;
        for name in [TC_INGRESS_PROGRAM, TC_PROGRAM] {
            let tc: &mut SchedClassifier = program(&mut bpf, name)?;
            tc.load().map_err(|source| EbpfError::Program {
                program: name,
                source,
            })?;
        }
        let xdp: &mut Xdp = program(&mut bpf, XDP_PROGRAM)?;
        xdp.load().map_err(|source| EbpfError::Program {
            program: XDP_PROGRAM,
            source,
        })?;

        let mut attached = Vec::with_capacity(interfaces.len());
        let mut attachments = Vec::with_capacity(2 * interfaces.len());
        for (interface, hook) in interfaces {
            add_clsact(interface)?;
            let (ingress, label) = attach_ingress(&mut bpf, interface, *hook)?;
            attachments.push(ingress);
            let egress = attach(&mut bpf, interface, Hook::TcEgress, XdpMode::default())?;
            attachments.push(Attachment {
                interface: interface.clone(),
                hook: Hook::TcEgress,
                xdp_mode: XdpMode::default(),
                link: Some(egress),
            });
            info!(%interface, ingress = label, "eBPF programs attached: ingress NAT and counters, TC egress reverse NAT");
            attached.push(format!("{interface} ({label})"));
        }
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));

        let vips = take_map(&mut bpf, VIPS_MAP)?;
        let nat = take_map(&mut bpf, NAT_MAP)?;
        let counters = take_map(&mut bpf, COUNTERS_MAP)?;
        let generations = take_map(&mut bpf, SLOTS_MAP)?;
        let ports = take_map(&mut bpf, PORTS_MAP)?;
        let vip_addrs = take_map(&mut bpf, VIP_ADDRS_MAP)?;
        let logs = LogReader::start(&mut bpf, log_level, logger);
        Ok(Self {
            loaded: Some(Box::new(Loaded {
                bpf,
                vips,
                nat,
                counters,
                generations,
                ports,
                vip_addrs,
                logs,
            })),
            slots: watch::Sender::new(StdHashMap::new()),
            free: Vec::new(),
            next: 0,
            generation: 0,
            rules: StdHashMap::new(),
            interfaces: attached,
            attachments,
            tcx,
        })
    }

    /// The interfaces the programs are attached to, each with its ingress hook, e.g.
    /// `eth0 (xdp native)`.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    fn loaded(&mut self) -> Result<&mut Loaded, EbpfError> {
        self.loaded.as_deref_mut().ok_or(EbpfError::ShutDown)
    }

    /// Puts `vip` in [`VIPS_MAP`] with a counter slot of its own (zeroed); idempotent. A VIP
    /// that has a slot but whose entry went missing gets it back, counters kept.
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<(), EbpfError> {
        let known = self.slots.borrow().get(&vip).copied();
        if let Some(slot) = known {
            if self.vip_missing(vip)? {
                self.sync_vip_addr(vip, true)?;
                let loaded = self.loaded()?;
                loaded
                    .vips
                    .insert(VipKey::new(vip), slot, 0)
                    .map_err(map_error(VIPS_MAP))?;
            }
            return Ok(());
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.next < MAX_VIPS => {
                self.next += 1;
                self.next - 1
            }
            None => return Err(EbpfError::Full { vip }),
        };
        let result = self.insert_vip(vip, slot);
        match result {
            Ok(()) => {
                self.slots.send_modify(|slots| {
                    slots.insert(vip, slot);
                });
                Ok(())
            }
            Err(e) => {
                self.free.push(slot);
                Err(e)
            }
        }
    }

    fn insert_vip(&mut self, vip: IpAddr, slot: u32) -> Result<(), EbpfError> {
        // Before the entry: a packet that finds the entry must find the bit too.
        self.sync_vip_addr(vip, true)?;
        let loaded = self.loaded()?;
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| EbpfError::PerCpu {
            map: COUNTERS_MAP,
            source,
        })?;
        let zero =
            PerCpuValues::try_from(vec![VipCounters::default(); cpus]).map_err(|source| {
                EbpfError::PerCpu {
                    map: COUNTERS_MAP,
                    source,
                }
            })?;
        loaded
            .counters
            .set(slot, zero, 0)
            .map_err(map_error(COUNTERS_MAP))?;
        loaded
            .vips
            .insert(VipKey::new(vip), slot, 0)
            .map_err(map_error(VIPS_MAP))?;
        // Last, so a failure above leaves no rule counting into a slot that goes back to the
        // free list; rules the VIP kept while out of the table get its slot back.
        self.renew(vip, slot)
    }

    /// Takes `vip` out of [`VIPS_MAP`] and frees its counter slot; idempotent.
    pub fn remove_vip(&mut self, vip: IpAddr) -> Result<(), EbpfError> {
        let Some(slot) = self.slots.borrow().get(&vip).copied() else {
            return Ok(());
        };
        if let Some(loaded) = self.loaded.as_mut() {
            ignore_missing(loaded.vips.remove(&VipKey::new(vip))).map_err(map_error(VIPS_MAP))?;
            self.bump(slot)?;
        }
        self.slots.send_modify(|slots| {
            slots.remove(&vip);
        });
        self.free.push(slot);
        if self.loaded.is_some() {
            self.sync_vip_addr(vip, false)?;
        }
        Ok(())
    }

    /// Sends traffic to `vip` on each rule's port to `dest` on the rule's destination port.
    pub fn install_nat(
        &mut self,
        vip: IpAddr,
        rules: &[NatRule],
        dest: IpAddr,
    ) -> Result<(), EbpfError> {
        if vip.is_ipv4() != dest.is_ipv4() {
            return Err(EbpfError::FamilyMismatch { vip, dest });
        }
        // The programs NAT only traffic to a VIP in the VIP table.
        let Some(slot) = self.slots.borrow().get(&vip).copied() else {
            return Err(EbpfError::NotLoaded { vip });
        };
        // Written under the generation `renew` gives the slot next: stale until then (they
        // still NAT, the long way), current from then on. Each rule is in `rules` only once it
        // is in the kernel's table.
        let next = (slot, self.generation.wrapping_add(1));
        let mut changed = Vec::with_capacity(2 * rules.len());
        for rule in rules {
            let (key, target) = (
                nat_key(vip, *rule),
                NatTarget::new(vip, dest, rule.dest, next),
            );
            self.loaded()?
                .nat
                .insert(key, target, 0)
                .map_err(map_error(NAT_MAP))?;
            changed.extend([key.port, target.port]);
            if let Some(old) = self.rules.insert(key, target) {
                changed.push(old.port);
            }
        }
        // Rules before port bits: a packet that finds a port's bit must find its rule.
        self.sync_ports(&changed)?;
        self.renew(vip, slot)
    }

    /// Removes the rules [`Ebpf::install_nat`] added; missing entries are not an error.
    pub fn remove_nat(&mut self, vip: IpAddr, rules: &[NatRule]) -> Result<(), EbpfError> {
        let Some(loaded) = self.loaded.as_mut() else {
            return Ok(());
        };
        let mut changed = Vec::with_capacity(2 * rules.len());
        for rule in rules {
            let key = nat_key(vip, *rule);
            ignore_missing(loaded.nat.remove(&key)).map_err(map_error(NAT_MAP))?;
            if let Some(old) = self.rules.remove(&key) {
                changed.extend([key.port, old.port]);
            }
        }
        self.sync_ports(&changed)?;
        let slot = self.slots.borrow().get(&vip).copied();
        slot.map_or(Ok(()), |slot| self.renew(vip, slot))
    }

    /// Gives `slot` a new generation in [`SLOTS_MAP`], after its VIP or NAT rules changed: every
    /// rule and flow entry written under an older one is stale (`gocast-ebpf`'s `nat` module).
    /// [`Self::renew`] writes a VIP's rules for the new generation first; the rules of a VIP out
    /// of the table stay stale, so their packets take the long way through [`VIPS_MAP`], find
    /// no VIP, and are left alone.
    fn bump(&mut self, slot: u32) -> Result<(), EbpfError> {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        self.loaded()?
            .generations
            .set(slot, generation, 0)
            .map_err(map_error(SLOTS_MAP))
    }

    /// Writes every rule of `vip` to [`NAT_MAP`] with `slot` and the slot's next generation
    /// (those [`Ebpf::install_nat`] just wrote so are left as they are), then gives the slot that
    /// generation ([`Self::bump`]). In this order a packet never pairs the new generation with
    /// an old rule: until the bump the rules are stale and still NAT, the long way, and a flow
    /// entry or tag written meanwhile carries the old generation.
    fn renew(&mut self, vip: IpAddr, slot: u32) -> Result<(), EbpfError> {
        let owner = VipKey::new(vip);
        let generation = self.generation.wrapping_add(1);
        let stale: Vec<(NatKey, NatTarget)> = self
            .rules
            .iter()
            .filter(|(key, rule)| {
                key.vip == owner.addr
                    && key.family == owner.family
                    && (rule.slot, rule.generation) != (slot, generation)
            })
            .map(|(key, rule)| (*key, *rule))
            .collect();
        for (key, rule) in stale {
            let rule = NatTarget {
                slot,
                generation,
                ..rule
            };
            self.loaded()?
                .nat
                .insert(key, rule, 0)
                .map_err(map_error(NAT_MAP))?;
            self.rules.insert(key, rule);
        }
        self.bump(slot)
    }

    /// Rewrites the [`PORTS_MAP`] entries of `ports` (network order) from [`Self::rules`].
    fn sync_ports(&mut self, ports: &[u16]) -> Result<(), EbpfError> {
        let mut indices: Vec<u32> = ports.iter().map(|p| port_bit(*p).0).collect();
        indices.sort_unstable();
        indices.dedup();
        for index in indices {
            let bits = port_bits(&self.rules, index);
            self.loaded()?
                .ports
                .set(index, bits, 0)
                .map_err(map_error(PORTS_MAP))?;
        }
        Ok(())
    }

    /// Rewrites the [`VIP_ADDRS_MAP`] word holding `vip`'s bit from the VIPs that have a slot,
    /// and `vip` itself if `with`.
    fn sync_vip_addr(&mut self, vip: IpAddr, with: bool) -> Result<(), EbpfError> {
        let (index, _) = addr_bit(&VipKey::new(vip).addr);
        let word = {
            let slots = self.slots.borrow();
            addr_word(slots.keys().copied().chain(with.then_some(vip)), index)
        };
        self.loaded()?
            .vip_addrs
            .set(index, word, 0)
            .map_err(map_error(VIP_ADDRS_MAP))
    }

    /// Whether `vip` has a counter slot but its entry in [`VIPS_MAP`] is gone (or names
    /// another slot), or its bit in [`VIP_ADDRS_MAP`]: someone deleted it. [`Ebpf::add_vip`]
    /// puts it back.
    pub fn vip_missing(&self, vip: IpAddr) -> Result<bool, EbpfError> {
        let known = self.slots.borrow().get(&vip).copied();
        let (Some(slot), Some(loaded)) = (known, self.loaded.as_deref()) else {
            return Ok(false);
        };
        let key = VipKey::new(vip);
        let (index, mask) = addr_bit(&key.addr);
        let word = loaded
            .vip_addrs
            .get(&index, 0)
            .map_err(map_error(VIP_ADDRS_MAP))?;
        match loaded.vips.get(&key, 0) {
            Ok(found) => Ok(found != slot || word & mask == 0),
            Err(MapError::KeyNotFound) => Ok(true),
            Err(e) => Err(map_error(VIPS_MAP)(e)),
        }
    }

    /// Whether any of `rules` is gone from [`NAT_MAP`] or sends elsewhere than `dest`.
    pub fn nat_missing(
        &self,
        vip: IpAddr,
        rules: &[NatRule],
        dest: IpAddr,
    ) -> Result<bool, EbpfError> {
        let Some(loaded) = self.loaded.as_deref() else {
            return Ok(false);
        };
        for rule in rules {
            match loaded.nat.get(&nat_key(vip, *rule), 0) {
                Ok(target) if target.sends_to(dest, rule.dest) => {}
                Ok(_) | Err(MapError::KeyNotFound) => return Ok(true),
                Err(e) => return Err(map_error(NAT_MAP)(e)),
            }
        }
        Ok(false)
    }

    /// Every program's interface and hook; none after shutdown.
    pub fn hooks(&self) -> Vec<(String, Hook)> {
        if self.loaded.is_none() {
            return Vec::new();
        }
        self.attachments
            .iter()
            .map(|a| (a.interface.clone(), a.hook))
            .collect()
    }

    /// The kernel's id of the program that runs at `hook`.
    pub fn program_id(&self, hook: Hook) -> Result<u32, EbpfError> {
        let loaded = self.loaded.as_deref().ok_or(EbpfError::ShutDown)?;
        let name = hook.program();
        let program = loaded
            .bpf
            .program(name)
            .ok_or(EbpfError::MissingProgram { program: name })?;
        let info = program.info().map_err(|source| EbpfError::Program {
            program: name,
            source,
        })?;
        Ok(info.id())
    }

    /// Whether the TC program of `hook` is attached to `interface`, as the kernel lists its
    /// tcx programs. `None` when this cannot tell: for XDP (netlink reports it:
    /// `Netlink::xdp_program_ids`) and for TC attached through netlink (before Linux 6.6).
    pub fn tc_attached(&self, interface: &str, hook: Hook) -> Result<Option<bool>, EbpfError> {
        if hook == Hook::Xdp || !self.tcx {
            return Ok(None);
        }
        let id = self.program_id(hook)?;
        let (_, programs) =
            SchedClassifier::query_tcx(interface, hook.tc_type()).map_err(|source| {
                EbpfError::Query {
                    interface: interface.to_owned(),
                    source,
                }
            })?;
        Ok(Some(programs.iter().any(|p| p.id() == id)))
    }

    /// Attaches the program of `hook` to `interface` again, the way it was, after someone
    /// detached it (docs/design.md, "Self-repair"). The dead link is dropped first.
    pub fn reattach(&mut self, interface: &str, hook: Hook) -> Result<(), EbpfError> {
        let loaded = self.loaded.as_deref_mut().ok_or(EbpfError::ShutDown)?;
        let Some(attachment) = self
            .attachments
            .iter_mut()
            .find(|a| a.interface == interface && a.hook == hook)
        else {
            return Ok(());
        };
        if let Some(old) = attachment.link.take()
            && let Err(e) = detach(&mut loaded.bpf, hook, old)
        {
            debug!(%interface, error = %crate::error_chain(&e), "dropping the detached link");
        }
        if hook != Hook::Xdp {
            // Deleting the clsact qdisc takes TC programs attached through netlink with it.
            add_clsact(interface)?;
        }
        let link = attach(&mut loaded.bpf, interface, hook, attachment.xdp_mode)?;
        attachment.link = Some(link);
        Ok(())
    }

    /// A second, read-only handle on the counters for the stats sampler, with the VIP → slot
    /// table this dataplane keeps, so reading counters never waits on the lifecycle that owns
    /// it and costs one lookup per VIP.
    pub fn counter_reader(&self) -> Result<CounterReader, EbpfError> {
        let loaded = self.loaded.as_deref().ok_or(EbpfError::ShutDown)?;
        Ok(CounterReader {
            slots: self.slots.subscribe(),
            counters: reopen(IterableMap::map(&loaded.counters), COUNTERS_MAP)?,
        })
    }

    /// Detaches the programs and closes the maps; later changes fail with
    /// [`EbpfError::ShutDown`], removals do nothing.
    pub fn shutdown(&mut self) {
        if self.loaded.take().is_some() {
            info!(interfaces = ?self.interfaces, "eBPF programs detached");
        }
        self.slots.send_modify(StdHashMap::clear);
        self.free.clear();
        self.next = 0;
        self.rules.clear();
    }
}

/// The most verbose [`aya_log::Level`] the global `tracing` filter lets through for
/// [`EBPF_LOG_TARGET`], as `AYA_LOG_LEVEL` takes it; 0 when it lets none through (or there is no
/// subscriber, as in unit tests).
fn kernel_log_level() -> u8 {
    use aya_log::Level as Aya;
    // The filter is fixed for the process's life, so asking once at load time is enough.
    let level = if tracing::enabled!(target: EBPF_LOG_TARGET, Level::TRACE) {
        Aya::Trace
    } else if tracing::enabled!(target: EBPF_LOG_TARGET, Level::DEBUG) {
        Aya::Debug
    } else if tracing::enabled!(target: EBPF_LOG_TARGET, Level::INFO) {
        Aya::Info
    } else if tracing::enabled!(target: EBPF_LOG_TARGET, Level::WARN) {
        Aya::Warn
    } else if tracing::enabled!(target: EBPF_LOG_TARGET, Level::ERROR) {
        Aya::Error
    } else {
        return 0;
    };
    level as u8
}

impl LogReader {
    /// Takes the object's log ring buffer and spawns the task that reads it. Every failure only
    /// costs the logs: it is logged and the dataplane runs without them.
    fn start(bpf: &mut aya::Ebpf, level: u8, logger: &'static dyn log::Log) -> Option<Self> {
        if level == 0 {
            debug!(
                target = EBPF_LOG_TARGET,
                "eBPF logs disabled by the log filter"
            );
            return None;
        }
        let logger = match EbpfLogger::init_with_logger(bpf, logger) {
            Ok(logger) => logger,
            Err(aya_log::Error::MapNotFound) => {
                debug!("the eBPF object has no log statements");
                return None;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the eBPF programs' logs; running without them");
                return None;
            }
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!("no tokio runtime to read the eBPF programs' logs; running without them");
            return None;
        };
        if let Err(e) = load_log_programs(bpf) {
            warn!(error = %crate::error_chain(&e), "cannot load the eBPF log programs; running without eBPF logs");
            return None;
        }
        // `AsyncFd` registers with the runtime of the current context.
        let _context = runtime.enter();
        #[expect(
            deprecated,
            reason = "its replacement, `register_with_interest`, is `unsafe` (forbidden here) for \
                      the promise this type keeps: the fd is the ring buffer's own, open and the \
                      same for the logger's whole life"
        )]
        let fd = match AsyncFd::with_interest(logger, Interest::READABLE) {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot poll the eBPF log ring buffer; running without eBPF logs");
                return None;
            }
        };
        let stop = CancellationToken::new();
        let task = runtime.spawn(read_logs(fd, stop.clone()));
        Some(Self {
            _stop: stop.drop_guard(),
            task,
        })
    }
}

/// Loads the log programs and puts each at index 0 of the program array its packet program
/// tail-calls. The arrays stay in `bpf`: the kernel empties a program array once user space
/// closes it.
fn load_log_programs(bpf: &mut aya::Ebpf) -> Result<(), EbpfError> {
    let xdp: &mut Xdp = program(bpf, XDP_LOG_PROGRAM)?;
    xdp.load().map_err(|source| EbpfError::Program {
        program: XDP_LOG_PROGRAM,
        source,
    })?;
    let xdp = xdp.fd().map_err(|source| EbpfError::Program {
        program: XDP_LOG_PROGRAM,
        source,
    })?;
    let xdp = xdp.try_clone().map_err(|source| EbpfError::ProgramFd {
        program: XDP_LOG_PROGRAM,
        source,
    })?;
    let tc: &mut SchedClassifier = program(bpf, TC_LOG_PROGRAM)?;
    tc.load().map_err(|source| EbpfError::Program {
        program: TC_LOG_PROGRAM,
        source,
    })?;
    let tc = tc.fd().map_err(|source| EbpfError::Program {
        program: TC_LOG_PROGRAM,
        source,
    })?;
    let tc = tc.try_clone().map_err(|source| EbpfError::ProgramFd {
        program: TC_LOG_PROGRAM,
        source,
    })?;
    for (map, fd) in [(XDP_LOG_MAP, &xdp), (TC_LOG_MAP, &tc)] {
        let array = bpf.map_mut(map).ok_or(EbpfError::MissingMap { map })?;
        let mut array = ProgramArray::try_from(array).map_err(map_error(map))?;
        array.set(0, fd, 0).map_err(map_error(map))?;
    }
    Ok(())
}

/// Forwards records as they arrive until `stop`, then forwards what is left and ends.
async fn read_logs(mut fd: AsyncFd<EbpfLogger<&'static dyn log::Log>>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            ready = fd.readable_mut() => match ready {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!(error = %e, "polling the eBPF log ring buffer failed; no more eBPF logs");
                    return;
                }
            },
        }
    }
    fd.get_mut().flush();
}

/// Reads every VIP's counters straight from the kernel maps.
pub struct CounterReader {
    slots: watch::Receiver<StdHashMap<IpAddr, u32>>,
    counters: PerCpuArray<MapData, VipCounters>,
}

impl CounterReader {
    /// Whether the VIP table changed since [`CounterReader::mark_read`].
    pub fn vips_changed(&self) -> bool {
        self.slots.has_changed().unwrap_or(false)
    }

    /// Marks the VIP table as seen, before a read of every VIP.
    pub fn mark_read(&mut self) {
        self.slots.mark_unchanged();
    }

    /// Each VIP in the VIP table that `wanted` accepts, with its counters summed over CPUs.
    pub fn read(
        &self,
        wanted: &dyn Fn(IpAddr) -> bool,
    ) -> Result<Vec<(IpAddr, VipCounters)>, EbpfError> {
        // Copied out: no lock is held across the lookups.
        let slots: Vec<(IpAddr, u32)> = self
            .slots
            .borrow()
            .iter()
            .filter(|(v, _)| wanted(**v))
            .map(|(v, s)| (*v, *s))
            .collect();
        let mut out = Vec::with_capacity(slots.len());
        for (vip, slot) in slots {
            if let Some(sum) = read_slot(&self.counters, slot)? {
                out.push((vip, sum));
            }
        }
        Ok(out)
    }
}

/// The counters in `slot` summed over CPUs; `None` if the slot is out of range.
fn read_slot(
    counters: &PerCpuArray<MapData, VipCounters>,
    slot: u32,
) -> Result<Option<VipCounters>, EbpfError> {
    match counters.get(&slot, 0) {
        Ok(per_cpu) => Ok(Some(
            per_cpu
                .iter()
                .fold(VipCounters::default(), VipCounters::sum),
        )),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_error(COUNTERS_MAP)(e)),
    }
}

/// A map of ours opened again through a duplicate of its file descriptor.
fn reopen<M>(map: &MapData, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    use std::os::fd::AsFd as _;
    let fd = map
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| EbpfError::PerCpu { map: name, source })?;
    let data = MapData::from_fd(fd).map_err(map_error(name))?;
    let map = aya::maps::Map::PerCpuArray(data);
    M::try_from(map).map_err(map_error(name))
}

/// [`PORTS_MAP`] entry `index` for `rules`: the VIP ports and target ports in its 64, and the
/// address bits of the VIPs with those VIP ports.
fn port_bits(rules: &StdHashMap<NatKey, NatTarget>, index: u32) -> PortBits {
    let mut bits = PortBits::default();
    for (key, target) in rules {
        let (i, mask) = port_bit(key.port);
        if i == index {
            bits.vip |= mask;
            bits.vip_addr |= addr_bit(&key.vip).1;
        }
        let (i, mask) = port_bit(target.port);
        if i == index {
            bits.target |= mask;
        }
    }
    bits
}

/// [`VIP_ADDRS_MAP`] word `index` for `vips`: the bits of those whose address folds into it.
fn addr_word(vips: impl Iterator<Item = IpAddr>, index: u32) -> u64 {
    vips.map(|vip| addr_bit(&VipKey::new(vip).addr))
        .filter(|&(i, _)| i == index)
        .fold(0, |word, (_, mask)| word | mask)
}

fn nat_key(vip: IpAddr, rule: NatRule) -> NatKey {
    let proto = match rule.proto {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    };
    NatKey::new(vip, rule.listen, proto)
}

/// The program `name` as its concrete type.
fn program<'a, P>(bpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = bpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram { program: name })?;
    program.try_into().map_err(|source| EbpfError::Program {
        program: name,
        source,
    })
}

/// Takes the map `name` out of the object as its concrete type.
fn take_map<M>(bpf: &mut aya::Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = bpf
        .take_map(name)
        .ok_or(EbpfError::MissingMap { map: name })?;
    M::try_from(map).map_err(map_error(name))
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { map, source }
}

/// `Ok` for a delete of a key that is not there.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Adds the `clsact` qdisc the TC classifier hangs from; one already there is fine.
fn add_clsact(interface: &str) -> Result<(), EbpfError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) | Err(TcError::AlreadyAttached) => Ok(()),
        Err(TcError::NetlinkError(e))
            if e.raw_os_error().is_some_and(|code| {
                io::Error::from_raw_os_error(code).kind() == io::ErrorKind::AlreadyExists
            }) =>
        {
            Ok(())
        }
        Err(source) => Err(EbpfError::Clsact {
            interface: interface.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
impl Ebpf {
    /// `vip`'s counters summed over CPUs; zero for a VIP not in the map. (The agent reads them
    /// through a [`CounterReader`].)
    fn counters(&self, vip: IpAddr) -> Result<VipCounters, EbpfError> {
        let slot = self.slots.borrow().get(&vip).copied();
        let (Some(loaded), Some(slot)) = (self.loaded.as_ref(), slot) else {
            return Ok(VipCounters::default());
        };
        Ok(read_slot(&loaded.counters, slot)?.unwrap_or_default())
    }

    /// Runs the program `name` once on `frame` with `BPF_PROG_TEST_RUN`: its verdict and the
    /// frame as it left.
    fn test_run(&mut self, name: &'static str, frame: &[u8]) -> (u32, Vec<u8>) {
        use aya::programs::{TestRun as _, TestRunOptions};

        let loaded = self.loaded.as_mut().expect("loaded");
        let mut out = vec![0; frame.len() + 256];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = if name == XDP_PROGRAM {
            let xdp: &mut Xdp = program(&mut loaded.bpf, name).expect("the XDP program");
            xdp.test_run(options)
        } else {
            // TC programs: the frame's protocol comes from its EtherType.
            let tc: &mut SchedClassifier = program(&mut loaded.bpf, name).expect("the TC program");
            tc.test_run(options)
        }
        .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Bytes of the program `name` as the verifier left it (dead code removed).
    fn translated_len(&self, name: &'static str) -> u32 {
        let loaded = self.loaded.as_ref().expect("loaded");
        let program = loaded.bpf.program(name).expect("the program");
        let info = program.info().expect("the program's info");
        info.size_translated().expect("a translated size")
    }

    /// The names of the object's LRU maps (the flow maps), and how many flows the IPv4 one
    /// holds.
    fn flow_maps(&self) -> (Vec<String>, usize) {
        use gocast_common::maps::{FLOWS4_MAP, FlowKey, NatFlow};

        let loaded = self.loaded.as_ref().expect("loaded");
        let mut names: Vec<String> = loaded
            .bpf
            .maps()
            .filter(|(_, map)| matches!(map, aya::maps::Map::LruHashMap(_)))
            .map(|(name, _)| name.to_owned())
            .collect();
        names.sort();
        let flows4 = loaded.bpf.map(FLOWS4_MAP).expect("the IPv4 flow map");
        let flows4: HashMap<_, FlowKey<[u8; 4]>, NatFlow<[u8; 4]>> =
            HashMap::try_from(flows4).expect("an LRU hash of flows");
        (names, flows4.keys().count())
    }

    /// The log reader's task, swapped for one that has nothing to do.
    fn take_log_task(&mut self) -> tokio::task::JoinHandle<()> {
        let loaded = self.loaded.as_mut().expect("loaded");
        let logs = loaded.logs.as_mut().expect("a log reader");
        std::mem::replace(&mut logs.task, tokio::spawn(async {}))
    }
}

#[cfg(test)]
mod tests {
    //! The programs run on crafted frames with `BPF_PROG_TEST_RUN`; frames are built and the
    //! results checked with `etherparse`, an implementation independent of ours.

    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        time::Duration,
    };

    use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
    use gocast_common::maps::{FLOWS4_MAP, FLOWS6_MAP};

    use super::*;

    const XDP_PASS: u32 = 2;
    const TC_ACT_OK: u32 = 0;
    /// The two ingress programs (one runs per interface) and their "pass" verdicts.
    const INGRESS: [(&str, u32); 2] = [(XDP_PROGRAM, XDP_PASS), (TC_INGRESS_PROGRAM, TC_ACT_OK)];
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const DEST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff00, 0, 0, 0, 0, 0x10);
    const DEST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
    const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\n\r\n";

    fn ether() -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
    }

    fn tcp4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), synack: bool) -> Vec<u8> {
        let b = ether()
            .ipv4(src.0.octets(), dst.0.octets(), 64)
            .tcp(src.1, dst.1, 1, 65535);
        let b = if synack { b.syn().ack(2) } else { b.syn() };
        let mut frame = Vec::new();
        b.write(&mut frame, PAYLOAD).unwrap();
        frame
    }

    /// A TCP SYN whose IPv4 header has 4 bytes of options (NOP, NOP, NOP, end of list), so
    /// its ports do not follow the addresses.
    fn tcp4_with_options(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
        let mut ip = etherparse::Ipv4Header::new(
            0,
            64,
            etherparse::IpNumber::TCP,
            src.0.octets(),
            dst.0.octets(),
        )
        .unwrap();
        ip.options = [1, 1, 1, 0].into();
        let mut frame = Vec::new();
        ether()
            .ip(etherparse::IpHeaders::Ipv4(
                ip,
                etherparse::Ipv4Extensions::default(),
            ))
            .tcp(src.1, dst.1, 1, 65535)
            .syn()
            .write(&mut frame, PAYLOAD)
            .unwrap();
        assert_eq!(frame[14], 0x46, "a 24-byte IPv4 header");
        frame
    }

    /// A TCP ACK with data: a packet of an established connection.
    fn ack4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
        let mut frame = Vec::new();
        ether()
            .ipv4(src.0.octets(), dst.0.octets(), 64)
            .tcp(src.1, dst.1, 2, 65535)
            .ack(2)
            .write(&mut frame, PAYLOAD)
            .unwrap();
        frame
    }

    fn udp6(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Vec<u8> {
        let mut frame = Vec::new();
        ether()
            .ipv6(src.0.octets(), dst.0.octets(), 64)
            .udp(src.1, dst.1)
            .write(&mut frame, PAYLOAD)
            .unwrap();
        frame
    }

    /// The frame's addresses and ports, after checking every checksum with etherparse.
    fn verified(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
        let h = PacketHeaders::from_ethernet_slice(frame).expect("a well-formed frame");
        let payload = h.payload.slice();
        let (src, dst) = match &h.net {
            Some(NetHeaders::Ipv4(ip, _)) => {
                assert_eq!(
                    ip.header_checksum,
                    ip.calc_header_checksum(),
                    "IPv4 checksum"
                );
                (IpAddr::from(ip.source), IpAddr::from(ip.destination))
            }
            Some(NetHeaders::Ipv6(ip, _)) => {
                (IpAddr::from(ip.source), IpAddr::from(ip.destination))
            }
            other => panic!("not IP: {other:?}"),
        };
        let l4 = match (&h.net, &h.transport) {
            (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Tcp(t))) => {
                assert_eq!(
                    t.checksum,
                    t.calc_checksum_ipv4(ip, payload).unwrap(),
                    "TCP"
                );
                (t.source_port, t.destination_port)
            }
            (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Tcp(t))) => {
                assert_eq!(
                    t.checksum,
                    t.calc_checksum_ipv6(ip, payload).unwrap(),
                    "TCP"
                );
                (t.source_port, t.destination_port)
            }
            (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Udp(u))) => {
                assert_eq!(
                    u.checksum,
                    u.calc_checksum_ipv4(ip, payload).unwrap(),
                    "UDP"
                );
                (u.source_port, u.destination_port)
            }
            (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Udp(u))) => {
                assert_eq!(
                    u.checksum,
                    u.calc_checksum_ipv6(ip, payload).unwrap(),
                    "UDP"
                );
                (u.source_port, u.destination_port)
            }
            other => panic!("not TCP/UDP: {other:?}"),
        };
        assert_eq!(payload, PAYLOAD, "payload untouched");
        (src, l4.0, dst, l4.1)
    }

    /// Runs `check` once per ingress program and its "pass" verdict, each in a namespace of its
    /// own.
    fn for_each_ingress(check: fn(&'static str, u32)) {
        for (ingress, pass) in INGRESS {
            crate::testing::in_new_netns(move || async move { check(ingress, pass) });
        }
    }

    /// Loads the object (attached nowhere) with `VIP` and `VIP6` translated to `DEST`, `DEST6`.
    fn loaded() -> Ebpf {
        let mut ebpf = Ebpf::load(&[]).expect("the eBPF object loads");
        for (vip, dest, rule) in [
            (IpAddr::V4(VIP), IpAddr::V4(DEST), "tcp:80:8080"),
            (IpAddr::V6(VIP6), IpAddr::V6(DEST6), "udp:53:5353"),
        ] {
            ebpf.add_vip(vip).unwrap();
            let rule: NatRule = rule.parse().unwrap();
            ebpf.install_nat(vip, &[rule], dest).unwrap();
        }
        ebpf
    }

    /// A `log` logger that keeps what it is given.
    #[derive(Default)]
    struct Capture(std::sync::Mutex<Vec<(log::Level, String, String)>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let entry = (
                record.level(),
                record.target().to_owned(),
                record.args().to_string(),
            );
            self.0.lock().unwrap().push(entry);
        }
        fn flush(&self) {}
    }

    impl Capture {
        fn records(&self) -> Vec<(log::Level, String, String)> {
            self.0.lock().unwrap().clone()
        }
    }

    #[test]
    fn an_address_filter_word_holds_the_bits_of_exactly_the_vips_that_fold_into_it() {
        let vip = IpAddr::from(Ipv4Addr::new(192, 0, 2, 81));
        // Same last two bytes: same bit. Another last byte: another word here.
        let alike = IpAddr::from(Ipv4Addr::new(198, 18, 2, 81));
        let other = IpAddr::from(Ipv4Addr::new(192, 0, 2, 82));
        let (index, mask) = addr_bit(&VipKey::new(vip).addr);
        assert_eq!(addr_word([vip, alike, other].into_iter(), index), mask);
        assert_eq!(addr_word([alike].into_iter(), index), mask);
        assert_eq!(addr_word([other].into_iter(), index), 0);
    }

    #[test]
    fn a_port_filter_entry_carries_the_address_bits_of_its_listen_ports_vips_only() {
        let vip = IpAddr::from(Ipv4Addr::new(192, 0, 2, 81));
        let dest = IpAddr::from(Ipv4Addr::new(198, 18, 0, 2));
        let rules = StdHashMap::from([(
            nat_key(vip, "tcp:80:8080".parse().unwrap()),
            NatTarget::new(vip, dest, 8080, (0, 0)),
        )]);
        let (listen, listen_mask) = port_bit(80_u16.to_be());
        let (target, target_mask) = port_bit(8080_u16.to_be());
        assert_eq!(
            port_bits(&rules, listen),
            PortBits {
                vip: listen_mask,
                target: 0,
                vip_addr: addr_bit(&VipKey::new(vip).addr).1,
            }
        );
        assert_eq!(
            port_bits(&rules, target),
            PortBits {
                vip: 0,
                target: target_mask,
                vip_addr: 0,
            }
        );
    }

    #[test]
    fn an_empty_object_is_reported_as_not_built() {
        let err = Ebpf::load_bytes(&[], &[], 0, log::logger()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "eBPF object not built: run cargo xtask build-ebpf"
        );
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn ingress_rewrites_tcp_to_a_vip_port_and_tc_restores_the_vip_on_the_reply() {
        for_each_ingress(rewrite_and_restore);
    }

    fn rewrite_and_restore(ingress: &'static str, pass: u32) {
        {
            let mut ebpf = loaded();
            let syn = tcp4((CLIENT, 40000), (VIP, 80), false);
            let (verdict, out) = ebpf.test_run(ingress, &syn);
            assert_eq!(verdict, pass, "{ingress}");
            assert_eq!(
                verified(&out),
                (CLIENT.into(), 40000, DEST.into(), 8080),
                "destination rewritten, source untouched"
            );
            let c = ebpf.counters(VIP.into()).unwrap();
            assert_eq!(
                (c.packets_in, c.bytes_in, c.syn_in),
                (1, syn.len() as u64, 1)
            );

            // The service's SYN-ACK leaves from DEST:8080; TC egress gives it VIP:80 back.
            let reply = tcp4((DEST, 8080), (CLIENT, 40000), true);
            let (verdict, out) = ebpf.test_run(TC_PROGRAM, &reply);
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(verified(&out), (VIP.into(), 80, CLIENT.into(), 40000));
            let c = ebpf.counters(VIP.into()).unwrap();
            assert_eq!((c.packets_out, c.synack_out, c.rst_out), (1, 1, 0));

            // The connection's next packets take the established-flow path, with the same
            // result both ways.
            let ack = ack4((CLIENT, 40000), (VIP, 80));
            let (_, out) = ebpf.test_run(ingress, &ack);
            assert_eq!(verified(&out), (CLIENT.into(), 40000, DEST.into(), 8080));
            let reply_ack = ack4((DEST, 8080), (CLIENT, 40000));
            let (_, out) = ebpf.test_run(TC_PROGRAM, &reply_ack);
            assert_eq!(verified(&out), (VIP.into(), 80, CLIENT.into(), 40000));
            let c = ebpf.counters(VIP.into()).unwrap();
            assert_eq!((c.packets_in, c.syn_in, c.packets_out), (2, 1, 2));

            // A changed rule applies to an established flow from its next packet on; a removed
            // one stops rewriting it.
            let moved: NatRule = "tcp:80:8081".parse().unwrap();
            ebpf.install_nat(VIP.into(), &[moved], DEST.into()).unwrap();
            let (_, out) = ebpf.test_run(ingress, &ack);
            assert_eq!(verified(&out), (CLIENT.into(), 40000, DEST.into(), 8081));
            ebpf.remove_nat(VIP.into(), &[moved]).unwrap();
            assert_eq!(ebpf.test_run(ingress, &ack).1, ack);
            assert_eq!(ebpf.counters(VIP.into()).unwrap().packets_in, 4);

            // A reply of a flow the XDP program never saw goes out as it is.
            let stranger = tcp4((DEST, 8080), (CLIENT, 40001), true);
            assert_eq!(ebpf.test_run(TC_PROGRAM, &stranger).1, stranger);

            // The same client port now connects to the service directly: the NAT's flow entry
            // must not rewrite the replies of this new connection.
            let direct = tcp4((CLIENT, 40000), (DEST, 8080), false);
            assert_eq!(ebpf.test_run(ingress, &direct), (pass, direct));
            assert_eq!(ebpf.test_run(TC_PROGRAM, &reply).1, reply);
            ebpf.shutdown();
        }
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn packets_with_ip_options_are_rewritten_both_ways_with_valid_checksums() {
        for_each_ingress(with_options);
    }

    fn with_options(ingress: &'static str, pass: u32) {
        {
            let mut ebpf = loaded();
            let syn = tcp4_with_options((CLIENT, 40004), (VIP, 80));
            let (verdict, out) = ebpf.test_run(ingress, &syn);
            assert_eq!(verdict, pass);
            assert_eq!(verified(&out), (CLIENT.into(), 40004, DEST.into(), 8080));
            let reply = tcp4_with_options((DEST, 8080), (CLIENT, 40004));
            let (_, out) = ebpf.test_run(TC_PROGRAM, &reply);
            assert_eq!(verified(&out), (VIP.into(), 80, CLIENT.into(), 40004));
            ebpf.shutdown();
        }
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn a_connection_older_than_the_programs_is_picked_up_and_each_flow_has_one_entry() {
        for_each_ingress(picked_up);
    }

    fn picked_up(ingress: &'static str, pass: u32) {
        {
            let mut ebpf = loaded();
            // An ACK of a connection whose SYN came before the programs (an agent restart):
            // rewritten, and its flow recorded, so the reply gets the VIP back.
            let ack = ack4((CLIENT, 40002), (VIP, 80));
            let (verdict, out) = ebpf.test_run(ingress, &ack);
            assert_eq!(verdict, pass);
            assert_eq!(verified(&out), (CLIENT.into(), 40002, DEST.into(), 8080));
            let reply = ack4((DEST, 8080), (CLIENT, 40002));
            let (_, out) = ebpf.test_run(TC_PROGRAM, &reply);
            assert_eq!(verified(&out), (VIP.into(), 80, CLIENT.into(), 40002));

            // A new connection and its next packets: one entry for the flow, which both
            // directions find; no per-direction maps.
            let syn = tcp4((CLIENT, 40003), (VIP, 80), false);
            ebpf.test_run(ingress, &syn);
            ebpf.test_run(ingress, &ack4((CLIENT, 40003), (VIP, 80)));
            ebpf.test_run(TC_PROGRAM, &ack4((DEST, 8080), (CLIENT, 40003)));
            assert_eq!(
                ebpf.flow_maps(),
                (vec![FLOWS4_MAP.to_owned(), FLOWS6_MAP.to_owned()], 2)
            );
            ebpf.shutdown();
        }
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn a_vip_out_of_the_table_is_not_natted_and_its_rules_follow_it_to_a_new_slot() {
        for_each_ingress(rules_follow);
    }

    fn rules_follow(ingress: &'static str, pass: u32) {
        {
            let mut ebpf = loaded();
            let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11));
            let syn = tcp4((CLIENT, 40000), (VIP, 80), false);
            // Out of the table, its rules kept: not rewritten, and not counted, not even in the
            // slot another VIP takes over meanwhile.
            ebpf.remove_vip(VIP.into()).unwrap();
            ebpf.add_vip(other).unwrap();
            assert_eq!(ebpf.test_run(ingress, &syn), (pass, syn.clone()));
            assert_eq!(ebpf.counters(other).unwrap(), VipCounters::default());
            // Back, in another slot: NATed again and counted there.
            ebpf.add_vip(VIP.into()).unwrap();
            let (_, out) = ebpf.test_run(ingress, &syn);
            assert_eq!(verified(&out), (CLIENT.into(), 40000, DEST.into(), 8080));
            assert_eq!(ebpf.counters(VIP.into()).unwrap().syn_in, 1);
            assert_eq!(ebpf.counters(other).unwrap(), VipCounters::default());
            ebpf.shutdown();
        }
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn ipv6_udp_is_rewritten_both_ways_with_valid_checksums_also_after_its_rule_moves() {
        for_each_ingress(ipv6_udp);
    }

    fn ipv6_udp(ingress: &'static str, _pass: u32) {
        {
            let mut ebpf = loaded();
            let query = udp6((CLIENT6, 50000), (VIP6, 53));
            let (_, out) = ebpf.test_run(ingress, &query);
            assert_eq!(verified(&out), (CLIENT6.into(), 50000, DEST6.into(), 5353));
            let answer = udp6((DEST6, 5353), (CLIENT6, 50000));
            let (_, out) = ebpf.test_run(TC_PROGRAM, &answer);
            assert_eq!(verified(&out), (VIP6.into(), 53, CLIENT6.into(), 50000));
            let c = ebpf.counters(VIP6.into()).unwrap();
            assert_eq!((c.packets_in, c.packets_out, c.syn_in), (1, 1, 0));

            // The rule moves to another port: the flow's next datagram goes there, and has
            // the flow recorded anew (no SYN to do it), so the new port's answer gets the VIP.
            let moved: NatRule = "udp:53:5354".parse().unwrap();
            ebpf.install_nat(VIP6.into(), &[moved], DEST6.into())
                .unwrap();
            let (_, out) = ebpf.test_run(ingress, &query);
            assert_eq!(verified(&out), (CLIENT6.into(), 50000, DEST6.into(), 5354));
            let answer = udp6((DEST6, 5354), (CLIENT6, 50000));
            let (_, out) = ebpf.test_run(TC_PROGRAM, &answer);
            assert_eq!(verified(&out), (VIP6.into(), 53, CLIENT6.into(), 50000));
            ebpf.shutdown();
        }
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn other_traffic_passes_untouched_and_only_vip_traffic_is_counted() {
        for_each_ingress(untouched);
    }

    fn untouched(ingress: &'static str, pass: u32) {
        {
            let mut ebpf = loaded();
            // Not a VIP: untouched, not counted.
            let other = tcp4((CLIENT, 40000), (Ipv4Addr::new(192, 0, 2, 99), 80), false);
            assert_eq!(ebpf.test_run(ingress, &other), (pass, other));
            // A VIP port without a rule: counted, untouched.
            let unmapped = tcp4((CLIENT, 40000), (VIP, 443), false);
            assert_eq!(ebpf.test_run(ingress, &unmapped), (pass, unmapped));
            // ICMP to the VIP: counted, untouched.
            let mut ping = Vec::new();
            ether()
                .ipv4(CLIENT.octets(), VIP.octets(), 64)
                .icmpv4_echo_request(1, 1)
                .write(&mut ping, PAYLOAD)
                .unwrap();
            assert_eq!(ebpf.test_run(ingress, &ping), (pass, ping));
            // A fragment of a datagram to VIP:80 (MF set): the ports are not where they seem.
            let mut fragment = tcp4((CLIENT, 40000), (VIP, 80), false);
            fragment[14 + 6] |= 0x20;
            fragment[14 + 10..14 + 12].fill(0);
            let ip = etherparse::Ipv4Header::from_slice(&fragment[14..])
                .unwrap()
                .0;
            let sum = ip.calc_header_checksum().to_be_bytes();
            fragment[14 + 10..14 + 12].copy_from_slice(&sum);
            assert_eq!(ebpf.test_run(ingress, &fragment), (pass, fragment));
            // Three packets to the VIP; only the unfragmented SYN is read as one.
            let c = ebpf.counters(VIP.into()).unwrap();
            assert_eq!((c.packets_in, c.syn_in), (3, 1));

            // A removed rule no longer rewrites; a removed VIP is no longer counted.
            let rule: NatRule = "tcp:80:8080".parse().unwrap();
            ebpf.remove_nat(VIP.into(), &[rule]).unwrap();
            let syn = tcp4((CLIENT, 40000), (VIP, 80), false);
            assert_eq!(ebpf.test_run(ingress, &syn).1, syn);
            ebpf.remove_vip(VIP.into()).unwrap();
            ebpf.test_run(ingress, &syn);
            assert_eq!(ebpf.counters(VIP.into()).unwrap(), VipCounters::default());
            ebpf.shutdown();
        }
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn a_full_vip_table_refuses_more_vips_and_their_nat_but_frees_slots_again() {
        crate::testing::in_new_netns(|| async {
            let mut ebpf = Ebpf::load(&[]).expect("the eBPF object loads");
            let vip =
                |i: u32| IpAddr::V6(Ipv6Addr::from(0x2001_0db8_ff00_u128 << 80 | u128::from(i)));
            for i in 0..MAX_VIPS {
                ebpf.add_vip(vip(i)).unwrap();
            }
            let extra = vip(MAX_VIPS);
            assert!(matches!(ebpf.add_vip(extra), Err(EbpfError::Full { .. })));
            let rule: NatRule = "tcp:80:8080".parse().unwrap();
            let err = ebpf
                .install_nat(extra, &[rule], IpAddr::V6(DEST6))
                .unwrap_err();
            assert!(matches!(err, EbpfError::NotLoaded { .. }), "{err}");
            ebpf.remove_vip(vip(7)).unwrap();
            ebpf.add_vip(extra).unwrap();
            ebpf.install_nat(extra, &[rule], IpAddr::V6(DEST6)).unwrap();
            ebpf.shutdown();
        });
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn the_counter_reader_sees_every_vip_summed_over_cpus() {
        crate::testing::in_new_netns(|| async {
            let mut ebpf = loaded();
            let reader = ebpf.counter_reader().unwrap();
            ebpf.test_run(XDP_PROGRAM, &tcp4((CLIENT, 40000), (VIP, 80), false));
            assert_eq!(reader.read(&|v| v == IpAddr::V6(VIP6)).unwrap().len(), 1);
            let mut read = reader.read(&|_| true).unwrap();
            read.sort_by_key(|(ip, _)| *ip);
            assert_eq!(read.len(), 2);
            assert_eq!(read[0].0, IpAddr::V4(VIP));
            assert_eq!(read[0].1.syn_in, 1);
            assert_eq!(read[1].1, VipCounters::default());
            ebpf.shutdown();
        });
    }

    #[test]
    #[cfg_attr(
        not(gocast_ebpf_object),
        ignore = "needs the eBPF object: cargo xtask build-ebpf, then cargo test -- --ignored"
    )]
    fn a_new_flow_is_logged_at_debug_and_costs_no_code_at_info() {
        for (ingress, pass) in INGRESS {
            crate::testing::in_new_netns(move || async move { new_flow_log(ingress, pass).await });
        }
    }

    async fn new_flow_log(ingress: &'static str, pass: u32) {
        let log_program = if ingress == XDP_PROGRAM {
            XDP_LOG_PROGRAM
        } else {
            TC_LOG_PROGRAM
        };
        let rule: NatRule = "tcp:80:8080".parse().unwrap();
        let load = |level: aya_log::Level| {
            let capture: &'static Capture = Box::leak(Box::default());
            // Attached nowhere: `BPF_PROG_TEST_RUN` runs it.
            let mut ebpf = Ebpf::load_bytes(OBJECT, &[], level as u8, capture)
                .expect("the eBPF object loads with its log statements enabled");
            ebpf.add_vip(VIP.into()).unwrap();
            ebpf.install_nat(VIP.into(), &[rule], DEST.into()).unwrap();
            (ebpf, capture)
        };

        let (mut debug, records) = load(aya_log::Level::Debug);
        // The log program returns the verdict the packet program would have, after the rewrite.
        let (verdict, out) = debug.test_run(ingress, &tcp4((CLIENT, 40000), (VIP, 80), false));
        assert_eq!(verdict, pass, "{ingress}");
        assert_eq!(
            verified(&out),
            (CLIENT.into(), 40000, DEST.into(), 8080),
            "{ingress}"
        );
        // Not NATed, or not a SYN: no record.
        debug.test_run(ingress, &tcp4((CLIENT, 40000), (VIP, 443), false));
        debug.test_run(ingress, &tcp4((CLIENT, 40000), (VIP, 80), true));
        // A reply rewritten without trouble: no record.
        debug.test_run(TC_PROGRAM, &tcp4((DEST, 8080), (CLIENT, 40000), true));
        for _ in 0..100 {
            if !records.records().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            records.records(),
            [(
                log::Level::Debug,
                EBPF_LOG_TARGET.to_owned(),
                "new flow to 192.0.2.10:80 NATed to 198.18.0.1:8080".to_owned()
            )],
            "{ingress}"
        );

        let (mut info, quiet) = load(aya_log::Level::Info);
        let (verdict, out) = info.test_run(ingress, &tcp4((CLIENT, 40001), (VIP, 80), false));
        assert_eq!(verdict, pass, "{ingress}");
        assert_eq!(verified(&out).2, IpAddr::from(DEST), "{ingress}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(quiet.records(), [], "{ingress}");
        // The verifier removed the disabled statements from the log program; the packet
        // programs have none.
        let (with, without) = (
            debug.translated_len(log_program),
            info.translated_len(log_program),
        );
        assert!(
            without < with,
            "{log_program}: {without} bytes at info, {with} at debug"
        );
        for name in [ingress, TC_PROGRAM] {
            assert_eq!(
                debug.translated_len(name),
                info.translated_len(name),
                "{name}"
            );
        }

        // Shutting down stops the reader.
        let task = debug.take_log_task();
        debug.shutdown();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the log reader ends once stopped")
            .expect("the log reader ends cleanly");
        info.shutdown();
    }
}
