//! The core's vocabulary: the [`Event`]s it takes, the [`Effect`]s it asks for, and the host
//! operations and results that pass between it and the driver's host worker.

use std::{net::IpAddr, time::SystemTime};

use tokio::time::Instant;

use crate::{
    app::{AppName, AppSpec, NatRule, Source, Vip},
    messages::{
        AppView, DrainReport, LifecycleError, Protected, RouteSet, Settings, SyncReport, Verdict,
        VipOwner,
    },
    monitor::{self, Report},
    store::{Change, StoreError},
};

/// Names a request so its reply finds the caller.
pub type RequestId = u64;
/// Names a host operation so its result is applied only if nothing superseded it.
pub type OpId = u64;
/// Names a verification of the host, so a result nobody waits for is ignored.
pub type VerifyId = u64;

/// When an event happens: the monotonic clock for timers, the wall clock for `/apps`.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

/// What the core reacts to.
#[derive(Debug)]
pub enum Event {
    Register {
        id: RequestId,
        spec: AppSpec,
        source: Source,
    },
    Unregister {
        id: RequestId,
        name: AppName,
    },
    Apps {
        id: RequestId,
    },
    /// See [`crate::messages::Request::SyncConsul`].
    SyncConsul {
        id: RequestId,
        apps: Vec<AppSpec>,
        keep: Vec<AppName>,
    },
    /// See [`crate::messages::Request::Reload`].
    Reload {
        id: RequestId,
        settings: Box<Settings>,
        apps: Vec<AppSpec>,
    },
    /// See [`crate::messages::Request::Drain`].
    Drain {
        id: RequestId,
        app: Option<AppName>,
        drain: bool,
    },
    PassiveHealth(Vec<(AppName, Verdict)>),
    Report(Report),
    /// The state file write asked for by the last [`Effect::Persist`] finished.
    Persisted(Result<(), StoreError>),
    HostDone(HostDone),
    /// The deadline of [`Core::next_deadline`](super::core::Core::next_deadline) passed (a
    /// cleanup or the end of a drain).
    Deadline,
    /// Time to compare the host with what the core believes is installed: the periodic check.
    VerifyDue {
        /// Check the VIPs on `lo` too (the periodic sweep, or an address that left `lo`); NAT
        /// rules and programs are checked every time.
        vips: bool,
    },
    /// The kernel said these addresses left `lo`: verified at once if one was a VIP the core
    /// believes is there.
    LeftLo(Vec<IpAddr>),
    /// The host worker ran the verification asked for by [`Effect::Verify`] `id`.
    Verified {
        id: VerifyId,
        drift: Vec<Drift>,
    },
    /// The addresses of the host's interfaces now (every interface; loopback addresses and
    /// the VIPs the agent put on `lo` left out), and the default gateway: no VIP may equal or
    /// cover one (docs/security.md, "Safe VIPs"). Sent at start, before any app is restored,
    /// and after each verification of the host, so a new address counts within
    /// `VERIFY_INTERVAL`.
    LocalAddresses(Vec<Protected>),
    /// Withdraw everything, then clean the host; nothing else is accepted after it.
    Shutdown,
}

/// The answer to a request.
#[derive(Debug)]
pub enum Reply {
    /// Boxed: an app view is large, and most replies pass through quickly.
    App(Box<Result<AppView, LifecycleError>>),
    Apps(Vec<AppView>),
    Consul(Vec<(AppName, LifecycleError)>),
    Reload(SyncReport),
    Drain(Result<DrainReport, LifecycleError>),
}

/// What the driver must do, in the order given.
#[derive(Debug)]
pub enum Effect {
    Reply {
        id: RequestId,
        reply: Reply,
    },
    /// Save these changes (HTTP apps, drain state) in one state-file write, then send
    /// [`Event::Persisted`]. At most one is outstanding.
    Persist(Vec<Change>),
    Monitor(monitor::Command),
    /// The new desired-announcement set.
    PublishRoutes(RouteSet),
    /// The VIPs whose owner (for the stats sampler) came, changed (`Some`) or went (`None`),
    /// in order.
    PublishOwners(Vec<(IpAddr, Option<VipOwner>)>),
    /// Change the host, then send [`Event::HostDone`].
    Host(HostOp),
    /// Shutdown: once the peers were sent the empty route set (bounded wait), close the
    /// sessions with a Cease.
    StopSpeaker,
    /// Shutdown, last: remove what the dataplane holds (e.g. the whole NAT chain).
    ShutdownHost,
    /// Check, after the host operations asked for before it, that what `expected` lists is
    /// still on the host; then send [`Event::Verified`]. At most one is outstanding.
    Verify {
        id: VerifyId,
        expected: Vec<Expected>,
    },
}

/// An app's NAT rules and where they send traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSpec {
    pub rules: Vec<NatRule>,
    pub dest: Option<IpAddr>,
}

/// What the core believes one app has on the host: only resources that are present (none in
/// flight), so an address our own operation is adding or removing never counts as drift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub app: AppName,
    pub vip: Vip,
    /// The VIP should be on `lo` (and, with eBPF, in the VIP table).
    pub on_lo: bool,
    /// The NAT rules that should be installed.
    pub nat: Option<NatSpec>,
}

/// What a verification found missing from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A part of one app (listed in [`Expected`]) is gone; the core puts it back.
    App {
        app: AppName,
        /// The VIP and NAT rules as verified: a drift of an app whose spec changed since is
        /// stale.
        vip: Vip,
        part: Part,
        /// What is missing, in words, for `/apps` and the logs (e.g. "vip missing from lo").
        what: String,
    },
    /// Something all apps share went missing (an eBPF program detached from an interface, the
    /// jumps to the iptables chain); the host put it back itself, or failed to.
    Shared {
        kind: RepairKind,
        what: String,
        result: Result<(), String>,
    },
}

/// Which part of an app drifted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Vip,
    Nat(NatSpec),
}

/// What a repair put back: the `kind` label of `gocast_repairs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairKind {
    Vip,
    Nat,
    Program,
}

impl RepairKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vip => "vip",
            Self::Nat => "nat",
            Self::Program => "program",
        }
    }
}

/// A change of the host for one app; the driver applies them in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOp {
    /// Put the VIP on `lo` (if `add_vip`), then, if that worked, install the NAT rules.
    Install {
        id: OpId,
        app: AppName,
        vip: Vip,
        label: String,
        add_vip: bool,
        nat: Option<NatSpec>,
    },
    /// Remove the NAT rules, then the VIP if `remove_vip`. With `after_withdrawal`, first wait
    /// (bounded) until the peers were sent every route set published before this operation.
    Remove {
        id: OpId,
        app: AppName,
        vip: Vip,
        remove_vip: bool,
        nat: Option<NatSpec>,
        after_withdrawal: bool,
    },
}

impl HostOp {
    /// The app the operation is for.
    pub fn app(&self) -> &AppName {
        match self {
            Self::Install { app, .. } | Self::Remove { app, .. } => app,
        }
    }

    /// That app's VIP.
    pub fn vip(&self) -> Vip {
        match self {
            Self::Install { vip, .. } | Self::Remove { vip, .. } => *vip,
        }
    }
}

/// The result of a [`HostOp`]: per part attempted, `Ok` or the failure in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDone {
    pub id: OpId,
    pub app: AppName,
    pub vip: Option<Result<(), String>>,
    pub nat: Option<Result<(), String>>,
}
