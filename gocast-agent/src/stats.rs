//! Per-VIP traffic statistics from the eBPF counters, and the passive health signal they feed.
//!
//! One task samples the kernel's counters: every VIP every [`FULL_SAMPLE_EVERY`] seconds, VIPs
//! of apps with passive health every second ([`SAMPLE_INTERVAL`]). It keeps a short history per
//! VIP, publishes the latest [`Snapshot`] (totals and per-second rates) after each full read on
//! a watch channel for `/stats`, `/metrics` and `gocast status`, and, for apps with
//! `passive_health: true`, judges the last `dataplane.passive_health.window`: SYNs that came in
//! but got no SYN-ACK (or got a RST) fail the app, as a failing monitor would. Only changes of
//! verdict are sent to the lifecycle.
//!
//! A failure holds while the window still shows it: until answers outweigh the unanswered SYNs,
//! or the bad SYNs have aged out of the window (a withdrawn VIP gets no new traffic). The app
//! may then come back, and fails again if the service still does not answer.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    future::Future,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use gocast_common::maps::VipCounters;
use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    app::AppName,
    config::PassiveHealthConfig,
    dataplane::ebpf::{CounterReader, EbpfError},
    messages::{LifecycleHandle, Owners, Verdict, VipOwner},
};

/// How often the counters of VIPs with passive health are read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Every VIP is read, and `/stats` republished, every this many intervals: one lookup per VIP
/// each time, which with thousands of VIPs is most of the agent's idle CPU.
pub const FULL_SAMPLE_EVERY: u32 = 5;

/// Per-second rates over the last sample interval, with the same keys as [`VipCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    pub packets_in: f64,
    pub bytes_in: f64,
    pub packets_out: f64,
    pub bytes_out: f64,
    pub syn_in: f64,
    pub synack_out: f64,
    pub rst_out: f64,
}

impl Rates {
    #[expect(
        clippy::cast_precision_loss,
        reason = "a rate needs no precision beyond 2^53 per interval"
    )]
    fn of(delta: VipCounters, over: Duration) -> Self {
        let secs = over.as_secs_f64();
        if secs <= 0.0 {
            return Self::default();
        }
        let r = |v: u64| v as f64 / secs;
        Self {
            packets_in: r(delta.packets_in),
            bytes_in: r(delta.bytes_in),
            packets_out: r(delta.packets_out),
            bytes_out: r(delta.bytes_out),
            syn_in: r(delta.syn_in),
            synack_out: r(delta.synack_out),
            rst_out: r(delta.rst_out),
        }
    }
}

/// One VIP in `/stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VipStats {
    /// The VIP with its prefix length, as the app registered it.
    pub vip: String,
    /// The app owning the VIP (none for a moment while an app is being removed).
    pub app: Option<AppName>,
    #[serde(flatten)]
    pub counters: VipCounters,
    pub rates: Rates,
    /// The VIP's address, to look it up.
    #[serde(skip)]
    pub addr: IpAddr,
}

/// What `/metrics` exports from the snapshots: each VIP with its counters, read at scrape time.
pub fn counter_source(
    snapshots: watch::Receiver<Arc<Snapshot>>,
) -> crate::metrics::VipCounterSource {
    Arc::new(move || {
        snapshots
            .borrow()
            .vips
            .iter()
            .map(|v| (v.vip.clone(), v.counters))
            .collect()
    })
}

/// The latest sample of every VIP, as `/stats` serves it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// When the counters were read (RFC 3339); `None` before the first read.
    pub sampled_at: Option<String>,
    pub vips: Vec<VipStats>,
    /// Why there are no counters at all (the iptables dataplane runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl Snapshot {
    /// The VIP written as an address or a prefix (`192.0.2.10` or `192.0.2.10/32`).
    pub fn find(&self, vip: &str) -> Option<&VipStats> {
        let addr = vip
            .parse::<IpAddr>()
            .ok()
            .or_else(|| vip.parse::<IpNet>().ok().map(|n| n.addr()))?;
        self.vips.iter().find(|v| v.addr == addr)
    }
}

/// Where counters come from: the eBPF maps, or a script in tests.
pub trait CounterSource: Send + 'static {
    /// The counters of the VIPs `wanted` accepts.
    fn read(
        &mut self,
        wanted: &dyn Fn(IpAddr) -> bool,
    ) -> Result<Vec<(IpAddr, VipCounters)>, EbpfError>;
}

impl CounterSource for CounterReader {
    fn read(
        &mut self,
        wanted: &dyn Fn(IpAddr) -> bool,
    ) -> Result<Vec<(IpAddr, VipCounters)>, EbpfError> {
        CounterReader::read(self, wanted)
    }
}

/// What one window of counters says about a service.
#[derive(Debug, Clone, PartialEq)]
enum Evidence {
    Failing(String),
    Healthy,
    TooLittleTraffic,
}

fn judge(window: VipCounters, config: &PassiveHealthConfig) -> Evidence {
    let syn = window.syn_in;
    if syn < config.min_syn {
        return Evidence::TooLittleTraffic;
    }
    let unanswered = syn.saturating_sub(window.synack_out);
    let reset = window.rst_out.min(syn);
    #[expect(
        clippy::cast_precision_loss,
        reason = "a share of SYN counts needs no precision beyond 2^53"
    )]
    let share = unanswered.max(reset) as f64 / syn as f64;
    if share >= config.max_unanswered {
        Evidence::Failing(format!(
            "passive health: {unanswered} of {syn} SYNs in the last {}s got no SYN-ACK, {} RSTs sent",
            config.window.as_secs(),
            window.rst_out
        ))
    } else {
        Evidence::Healthy
    }
}

/// One VIP's recent samples and passive verdict.
#[derive(Debug, Default)]
struct History {
    /// Oldest first; the first one is at least a window old once there is that much history.
    samples: VecDeque<(Instant, VipCounters)>,
    failing: bool,
}

impl History {
    /// Adds a sample; the rates since the previous one.
    fn push(&mut self, now: Instant, counters: VipCounters, window: Duration) -> Rates {
        let mut rates = Rates::default();
        if let Some(&(then, before)) = self.samples.back() {
            if let Some(delta) = counters.checked_since(&before) {
                rates = Rates::of(delta, now.saturating_duration_since(then));
            } else {
                self.samples.clear();
            }
        }
        self.samples.push_back((now, counters));
        while self
            .samples
            .get(1)
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= window)
        {
            self.samples.pop_front();
        }
        rates
    }

    /// The counters' growth over the window (or over the history there is).
    fn window(&self) -> VipCounters {
        match (self.samples.front(), self.samples.back()) {
            (Some(&(_, first)), Some(&(_, last))) => last.checked_since(&first).unwrap_or_default(),
            _ => VipCounters::default(),
        }
    }

    /// Applies this window's evidence; the new verdict when it changed.
    fn update(&mut self, config: &PassiveHealthConfig) -> Option<Verdict> {
        match judge(self.window(), config) {
            Evidence::Failing(reason) => {
                (!std::mem::replace(&mut self.failing, true)).then_some(Verdict::Failing(reason))
            }
            // The bad SYNs stay in the window for a window's length: that is the hold-down.
            Evidence::Healthy | Evidence::TooLittleTraffic => {
                std::mem::replace(&mut self.failing, false).then_some(Verdict::Cleared)
            }
        }
    }
}

/// The sampler's state: history per VIP. Pure apart from the clock it is given.
struct Sampler {
    config: PassiveHealthConfig,
    histories: HashMap<IpAddr, History>,
}

impl Sampler {
    /// Takes a read of the counters; `full` when it covered every VIP, so histories of VIPs it
    /// did not see can go.
    fn sample(
        &mut self,
        now: Instant,
        read: Vec<(IpAddr, VipCounters)>,
        owners: &BTreeMap<IpAddr, VipOwner>,
        full: bool,
    ) -> (Vec<VipStats>, Vec<(AppName, Verdict)>) {
        let mut vips = Vec::with_capacity(read.len());
        let mut verdicts = Vec::new();
        let mut seen = HashSet::with_capacity(read.len());
        for (addr, raw) in read {
            let counters = raw;
            let history = self.histories.entry(addr).or_default();
            let rates = history.push(now, counters, self.config.window);
            let owner = owners.get(&addr);
            match owner {
                Some(o) if o.passive_health => {
                    if let Some(v) = history.update(&self.config) {
                        verdicts.push((o.app.clone(), v));
                    }
                }
                _ => history.failing = false,
            }
            seen.insert(addr);
            vips.push(VipStats {
                vip: owner.map_or_else(|| IpNet::from(addr).to_string(), |o| o.vip.to_string()),
                app: owner.map(|o| o.app.clone()),
                counters,
                rates,
                addr,
            });
        }
        if full {
            self.histories.retain(|addr, _| seen.contains(addr));
        }
        vips.sort_by_key(|v| v.addr);
        (vips, verdicts)
    }
}

/// The sampler, ready to run: the returned receiver always holds the latest snapshot, and
/// [`SamplerTask::run`] runs one instance. The agent supervises it (task `stats`, see
/// [`crate::supervise`]; this module sits below the metrics, so it does not start the
/// supervisor itself).
pub fn sampler<S: CounterSource>(
    source: S,
    owners: watch::Receiver<Owners>,
    lifecycle: LifecycleHandle,
    config: PassiveHealthConfig,
) -> (watch::Receiver<Arc<Snapshot>>, SamplerTask<S>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let shared = Arc::new(Mutex::new(Shared {
        source,
        sampler: Sampler {
            config,
            histories: HashMap::new(),
        },
        failing_reads: 0,
    }));
    let task = SamplerTask {
        shared,
        owners,
        lifecycle,
        snapshots: tx,
    };
    (rx, task)
}

/// Everything an instance of the sampler needs, kept across restarts.
///
/// A restarted sampler goes on where the failed one stopped: the counter source and the per-VIP
/// histories (with each app's passive verdict, which the lifecycle hears of only when it changes)
/// live here, outside the instance, behind a lock held for one synchronous read and sample.
pub struct SamplerTask<S> {
    shared: Arc<Mutex<Shared<S>>>,
    owners: watch::Receiver<Owners>,
    lifecycle: LifecycleHandle,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

impl<S: CounterSource> SamplerTask<S> {
    /// One instance: reads every [`SAMPLE_INTERVAL`] until `cancel` or the lifecycle is gone.
    pub fn run(&self, cancel: CancellationToken) -> impl Future<Output = ()> + Send + use<S> {
        run(
            self.shared.clone(),
            self.owners.clone(),
            self.lifecycle.clone(),
            self.snapshots.clone(),
            cancel,
        )
    }
}

/// One sample: every VIP read, and the changes of passive verdict.
type Sample = (Vec<VipStats>, Vec<(AppName, Verdict)>);

/// What the sampler keeps across restarts.
struct Shared<S> {
    source: S,
    sampler: Sampler,
    /// Reads failed in a row (logged once per outage).
    failing_reads: u32,
}

impl<S: CounterSource> Shared<S> {
    /// Reads the counters (every VIP when `full`, else those with passive health) and samples
    /// them; `None` when nothing was read.
    fn read_and_sample(
        &mut self,
        owners: &BTreeMap<IpAddr, VipOwner>,
        full: bool,
    ) -> Option<Sample> {
        let passive = |vip: IpAddr| owners.get(&vip).is_some_and(|o| o.passive_health);
        if !full && !owners.values().any(|o| o.passive_health) {
            return None;
        }
        let wanted: &dyn Fn(IpAddr) -> bool = if full { &|_| true } else { &passive };
        let read = match self.source.read(wanted) {
            Ok(read) => {
                if self.failing_reads > 0 {
                    info!(failed = self.failing_reads, "eBPF counters readable again");
                    self.failing_reads = 0;
                }
                read
            }
            Err(e) => {
                // Logged once per outage; the last snapshot stays.
                if self.failing_reads == 0 {
                    warn!(error = %crate::error_chain(&e), "cannot read the eBPF counters");
                }
                self.failing_reads += 1;
                return None;
            }
        };
        Some(self.sampler.sample(Instant::now(), read, owners, full))
    }
}

async fn run<S: CounterSource>(
    shared: Arc<Mutex<Shared<S>>>,
    owners: watch::Receiver<Owners>,
    lifecycle: LifecycleHandle,
    tx: watch::Sender<Arc<Snapshot>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let full = ticks.is_multiple_of(FULL_SAMPLE_EVERY);
        ticks = ticks.wrapping_add(1);
        let owners = owners.borrow().clone();
        // A panic inside a previous instance's sample poisoned the lock; its state is counters
        // history, still good enough to go on with.
        let sampled = shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read_and_sample(&owners, full);
        let Some((vips, verdicts)) = sampled else {
            continue;
        };
        if full {
            tx.send_replace(Arc::new(Snapshot {
                sampled_at: Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
                vips,
                unavailable: None,
            }));
        }
        if !verdicts.is_empty() && lifecycle.passive_health(verdicts).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::Vip;

    fn config() -> PassiveHealthConfig {
        PassiveHealthConfig {
            window: Duration::from_secs(5),
            min_syn: 10,
            max_unanswered: 0.5,
        }
    }

    fn owners(passive: bool) -> BTreeMap<IpAddr, VipOwner> {
        let vip: Vip = "192.0.2.10/32".parse().unwrap();
        BTreeMap::from([(
            vip.addr(),
            VipOwner {
                vip,
                app: "web".parse().unwrap(),
                passive_health: passive,
            },
        )])
    }

    fn raw(syn_in: u64, synack_out: u64, rst_out: u64) -> Vec<(IpAddr, VipCounters)> {
        vec![(
            "192.0.2.10".parse().unwrap(),
            VipCounters {
                packets_in: syn_in * 2,
                bytes_in: syn_in * 120,
                packets_out: synack_out,
                bytes_out: synack_out * 60,
                syn_in,
                synack_out,
                rst_out,
            },
        )]
    }

    /// A verdict change and the second it came at.
    type Change = (usize, (AppName, Verdict));

    /// Feeds one sample a second: `(syn_in, synack_out, rst_out)` totals.
    fn run(passive: bool, totals: &[(u64, u64, u64)]) -> (Sampler, Vec<Change>) {
        let mut s = Sampler {
            config: config(),
            histories: HashMap::new(),
        };
        let start = Instant::now();
        let owners = owners(passive);
        let mut changes = Vec::new();
        for (i, &(syn, synack, rst)) in totals.iter().enumerate() {
            let now = start + Duration::from_secs(i as u64);
            let (_, verdicts) = s.sample(now, raw(syn, synack, rst), &owners, true);
            changes.extend(verdicts.into_iter().map(|v| (i, v)));
        }
        (s, changes)
    }

    #[test]
    fn rates_are_per_second_since_the_previous_sample() {
        let mut s = Sampler {
            config: config(),
            histories: HashMap::new(),
        };
        let t = Instant::now();
        let owners = owners(false);
        let (first, _) = s.sample(t, raw(10, 10, 0), &owners, true);
        assert_eq!(first[0].rates, Rates::default());
        assert_eq!(first[0].vip, "192.0.2.10/32");
        assert_eq!(first[0].app.as_ref().unwrap().as_str(), "web");
        let (second, _) = s.sample(t + Duration::from_secs(2), raw(30, 20, 0), &owners, true);
        assert!((second[0].rates.syn_in - 10.0).abs() < 1e-9);
        assert!((second[0].rates.packets_in - 20.0).abs() < 1e-9);
        assert_eq!(second[0].counters.syn_in, 30);
    }

    #[test]
    fn a_counter_reset_restarts_the_history_instead_of_underflowing() {
        let (s, _) = run(true, &[(100, 100, 0), (5, 5, 0)]);
        let h = &s.histories[&"192.0.2.10".parse::<IpAddr>().unwrap()];
        assert_eq!(h.samples.len(), 1);
        assert_eq!(h.window(), VipCounters::default());
    }

    #[test]
    fn syns_without_syn_acks_fail_the_app_once_enough_arrived() {
        // 4 SYNs a second, none answered: min_syn (10) is reached at t=3 (12 SYNs).
        let totals: Vec<_> = (0..6).map(|i| (4 * i, 0, 0)).collect();
        let (_, changes) = run(true, &totals);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (at, (app, verdict)) = &changes[0];
        assert_eq!(*at, 3);
        assert_eq!(app.as_str(), "web");
        let Verdict::Failing(reason) = verdict else {
            panic!("{verdict:?}")
        };
        assert!(reason.contains("12 of 12 SYNs"), "{reason}");
    }

    #[test]
    fn answered_syns_and_little_traffic_never_fail() {
        let answered: Vec<_> = (0..8).map(|i| (20 * i, 20 * i, 0)).collect();
        assert!(run(true, &answered).1.is_empty());
        let quiet: Vec<_> = (0..8).map(|i| (i, 0, 0)).collect();
        assert!(run(true, &quiet).1.is_empty(), "below min_syn");
    }

    #[test]
    fn syns_answered_by_resets_fail_too() {
        let totals: Vec<_> = (0..4).map(|i| (10 * i, 10 * i, 8 * i)).collect();
        let (_, changes) = run(true, &totals);
        assert_eq!(changes.len(), 1);
        assert!(matches!(&changes[0].1.1, Verdict::Failing(r) if r.contains("RSTs sent")));
    }

    #[test]
    fn apps_without_passive_health_are_never_judged() {
        let totals: Vec<_> = (0..6).map(|i| (10 * i, 0, 0)).collect();
        assert!(run(false, &totals).1.is_empty());
    }

    #[test]
    fn a_failure_clears_when_answers_come_back_or_a_quiet_window_passes() {
        // Failing at t=1; then answered SYNs: cleared once the window holds more answers.
        let mut totals: Vec<(u64, u64, u64)> = vec![(0, 0, 0), (20, 0, 0)];
        totals.extend((1..8).map(|i| (20 + 30 * i, 30 * i, 0)));
        let (_, changes) = run(true, &totals);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!((changes[0].0, &changes[1].1.1), (1, &Verdict::Cleared));

        // Failing at t=1, then no traffic (withdrawn): cleared a window after the last bad one.
        let mut totals: Vec<(u64, u64, u64)> = vec![(0, 0, 0), (20, 0, 0)];
        totals.extend(std::iter::repeat_n((20, 0, 0), 10));
        let (_, changes) = run(true, &totals);
        assert_eq!(changes.len(), 2, "{changes:?}");
        let cleared_at = changes[1].0;
        assert_eq!(
            cleared_at, 6,
            "held until the bad SYNs left the window: {changes:?}"
        );
        assert_eq!(changes[1].1.1, Verdict::Cleared);
    }

    #[test]
    fn vips_are_found_with_or_without_their_length() {
        let mut s = Sampler {
            config: config(),
            histories: HashMap::new(),
        };
        let (vips, _) = s.sample(Instant::now(), raw(1, 1, 0), &owners(false), true);
        let snap = Snapshot {
            vips,
            ..Snapshot::default()
        };
        assert!(snap.find("192.0.2.10").is_some());
        assert!(snap.find("192.0.2.10/32").is_some());
        assert!(snap.find("192.0.2.11").is_none());
        assert!(snap.find("bogus").is_none());
        let json = serde_json::to_value(&snap).unwrap();
        let v = &json["vips"][0];
        for key in [
            "vip",
            "packets_in",
            "bytes_in",
            "packets_out",
            "bytes_out",
            "syn_in",
            "synack_out",
            "rst_out",
            "rates",
        ] {
            assert!(!v[key].is_null(), "{key} in {v}");
        }
        assert!(!v["rates"]["syn_in"].is_null());
    }
}
