//! Per-VIP traffic statistics from the eBPF counters, and the passive health signal they feed.
//!
//! Two readers share one counter source and one history per VIP:
//! - `/stats` and `/stats/{vip}` read the kernel's counters when asked ([`Stats::now`]): a read
//!   at most [`COALESCE`] old serves a request, so concurrent requests cost one read, and a VIP
//!   is there as soon as the dataplane has its counter slot (installed before it is announced).
//!   `rates` cover the span since the VIP's newest sample at least [`RATE_SPAN`] older;
//!   [`Stats::over`] measures over the caller's interval instead (two reads that far apart).
//! - One task keeps passive health's own cadence: VIPs of apps with passive health every second
//!   ([`SAMPLE_INTERVAL`]), every VIP every [`FULL_SAMPLE_EVERY`] seconds (for `/metrics` and
//!   to forget VIPs that went). For apps with `passive_health: true` it judges the last
//!   `dataplane.passive_health.window`: SYNs that came in but got no SYN-ACK (or got a RST) fail
//!   the app, as a failing monitor would. Only changes of verdict are sent to the lifecycle;
//!   reads for `/stats` never judge.
//!
//! A failure holds while the window still shows it: until answers outweigh the unanswered SYNs,
//! or the bad SYNs have aged out of the window (a withdrawn VIP gets no new traffic). The
//! lifecycle then holds the app down and wants active proof that the service accepts before it
//! announces again (docs/design.md, "Passive health").

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
/// Every VIP is read by the background task every this many intervals: one lookup per VIP each
/// time, which with thousands of VIPs is most of the agent's idle CPU. `/stats` reads on demand.
pub const FULL_SAMPLE_EVERY: u32 = 5;
/// A read this recent serves a `/stats` request: concurrent requests share one read.
pub const COALESCE: Duration = Duration::from_millis(100);
/// `rates` cover at least this span when the VIP has a sample that old.
pub const RATE_SPAN: Duration = Duration::from_secs(1);
/// Bounds of `/stats?interval=`: the request waits that long, so it stays well within a
/// client's patience and the API's timeouts.
pub const INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const INTERVAL_MAX: Duration = Duration::from_secs(10);

/// Per-second rates over an interval, with the same keys as [`VipCounters`].
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
    /// The VIP with its prefix length, as the app registered it (written as a string).
    pub vip: IpNet,
    /// The app owning the VIP (none for a moment while an app is being removed).
    pub app: Option<AppName>,
    #[serde(flatten)]
    pub counters: VipCounters,
    pub rates: Rates,
    /// The span `rates` cover, in seconds; `None` (zero rates) on the VIP's first read.
    pub rates_interval_s: Option<f64>,
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
            .map(|v| (v.vip.to_string(), v.counters))
            .collect()
    })
}

/// Every VIP's counters as of one read, as `/stats` serves it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// When the counters were read (RFC 3339); `None` before the first read.
    pub sampled_at: Option<String>,
    /// One per address, sorted by address (as the sampler returns them).
    pub vips: Vec<VipStats>,
    /// Why there are no counters at all (the iptables dataplane runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// When the counters were read, on the monotonic clock.
    #[serde(skip)]
    pub read_at: Option<Instant>,
}

impl Snapshot {
    /// The VIP written as an address or a prefix (`192.0.2.10` or `192.0.2.10/32`).
    pub fn find(&self, vip: &str) -> Option<&VipStats> {
        let addr = vip
            .parse::<IpAddr>()
            .ok()
            .or_else(|| vip.parse::<IpNet>().ok().map(|n| n.addr()))?;
        self.by_addr(addr)
    }

    /// The VIP at `addr`: `vips` is sorted by address ([`Sampler::sample`]), so a binary search,
    /// which keeps [`Self::rates_since`] O(n log n) with thousands of VIPs.
    fn by_addr(&self, addr: IpAddr) -> Option<&VipStats> {
        self.vips
            .binary_search_by_key(&addr, |v| v.addr)
            .ok()
            .map(|i| &self.vips[i])
    }

    /// This read with its rates taken over the span since `earlier`, for the VIPs both have
    /// (a VIP new since then keeps the rates of its own history).
    #[must_use]
    pub fn rates_since(&self, earlier: &Self) -> Self {
        let mut out = self.clone();
        let (Some(now), Some(then)) = (self.read_at, earlier.read_at) else {
            return out;
        };
        let span = now.saturating_duration_since(then);
        if span.is_zero() {
            return out;
        }
        for v in &mut out.vips {
            let before = earlier.by_addr(v.addr);
            if let Some(delta) = before.and_then(|b| v.counters.checked_since(&b.counters)) {
                v.rates = Rates::of(delta, span);
                v.rates_interval_s = Some(span.as_secs_f64());
            }
        }
        out
    }
}

/// Where counters come from: the eBPF maps, or a script in tests.
pub trait CounterSource: Send + 'static {
    /// The counters of the VIPs `wanted` accepts.
    fn read(
        &mut self,
        wanted: &dyn Fn(IpAddr) -> bool,
    ) -> Result<Vec<(IpAddr, VipCounters)>, EbpfError>;

    /// Whether VIPs came or went since the last [`CounterSource::mark_read`]: a snapshot read
    /// before would miss a VIP installed a moment ago, so a request reads again.
    fn vips_changed(&self) -> bool {
        false
    }

    /// Called right before a read of every VIP.
    fn mark_read(&mut self) {}
}

impl CounterSource for CounterReader {
    fn read(
        &mut self,
        wanted: &dyn Fn(IpAddr) -> bool,
    ) -> Result<Vec<(IpAddr, VipCounters)>, EbpfError> {
        CounterReader::read(self, wanted)
    }

    fn vips_changed(&self) -> bool {
        CounterReader::vips_changed(self)
    }

    fn mark_read(&mut self) {
        CounterReader::mark_read(self);
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
    /// Oldest first, at most a sample a [`SAMPLE_INTERVAL`] from reads for `/stats`; the first
    /// one is at least `keep` old once there is that much history.
    samples: VecDeque<(Instant, VipCounters)>,
    failing: bool,
}

impl History {
    /// The rates of `counters` read at `now`, since the newest sample at least [`RATE_SPAN`]
    /// older (or the oldest there is), with the span they cover.
    fn rates(&self, now: Instant, counters: VipCounters) -> Option<(Rates, Duration)> {
        let &(then, before) = self
            .samples
            .iter()
            .rev()
            .find(|(t, _)| now.saturating_duration_since(*t) >= RATE_SPAN)
            .or_else(|| self.samples.front())?;
        let span = now.saturating_duration_since(then);
        let delta = counters.checked_since(&before)?;
        (!span.is_zero()).then(|| (Rates::of(delta, span), span))
    }

    /// Adds a sample, keeping what covers `keep` (the passive window, or [`RATE_SPAN`]).
    fn push(&mut self, now: Instant, counters: VipCounters, keep: Duration) {
        if let Some((_, before)) = self.samples.back()
            && counters.checked_since(before).is_none()
        {
            // The slot was reused or reset: older samples describe another VIP's traffic.
            self.samples.clear();
        }
        // Aged out before the push (the new sample is the newest, so the same ones go), so a
        // VIP without passive health never holds more than its two samples: the newest and
        // one at least `keep` older. Room for exactly those, not the four a first push makes.
        while self
            .samples
            .get(1)
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= keep)
        {
            self.samples.pop_front();
        }
        if self.samples.capacity() == 0 {
            self.samples.reserve_exact(2);
        }
        self.samples.push_back((now, counters));
    }

    /// How long ago the newest sample was taken; `None` without one.
    fn newest_age(&self, now: Instant) -> Option<Duration> {
        self.samples
            .back()
            .map(|&(t, _)| now.saturating_duration_since(t))
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
            Evidence::Healthy | Evidence::TooLittleTraffic => {
                std::mem::replace(&mut self.failing, false).then_some(Verdict::Cleared)
            }
        }
    }
}

/// Who is reading: the passive-health cadence judges, a `/stats` request does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    Cadence,
    Request,
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
        reader: Reader,
    ) -> (Vec<VipStats>, Vec<(AppName, Verdict)>) {
        let mut vips = Vec::with_capacity(read.len());
        let mut verdicts = Vec::new();
        let mut seen = HashSet::with_capacity(read.len());
        for (addr, counters) in read {
            let history = self.histories.entry(addr).or_default();
            let rates = history.rates(now, counters);
            let owner = owners.get(&addr);
            let passive = owner.filter(|o| o.passive_health);
            // Requests add at most a sample per interval, so the history stays small whatever
            // the request rate; the cadence's samples are the ones passive health judges.
            if reader == Reader::Cadence
                || history
                    .newest_age(now)
                    .is_none_or(|age| age >= SAMPLE_INTERVAL)
            {
                let keep = if passive.is_some() {
                    self.config.window.max(RATE_SPAN)
                } else {
                    RATE_SPAN
                };
                history.push(now, counters, keep);
            }
            if reader == Reader::Cadence {
                match passive {
                    Some(o) => {
                        if let Some(v) = history.update(&self.config) {
                            verdicts.push((o.app.clone(), v));
                        }
                    }
                    None => history.failing = false,
                }
            }
            seen.insert(addr);
            vips.push(VipStats {
                vip: owner.map_or_else(|| IpNet::from(addr), |o| o.vip.net()),
                app: owner.map(|o| o.app.clone()),
                counters,
                rates: rates.map(|(r, _)| r).unwrap_or_default(),
                rates_interval_s: rates.map(|(_, span)| span.as_secs_f64()),
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

/// The sampler, ready to run: [`Stats`] reads for `/stats`, [`SamplerTask::run`] runs one
/// instance of the passive-health cadence. The agent supervises it (task `stats`, see
/// [`crate::supervise`]; this module sits below the metrics, so it does not start the
/// supervisor itself).
pub fn sampler(
    source: impl CounterSource,
    owners: watch::Receiver<Owners>,
    lifecycle: LifecycleHandle,
    config: PassiveHealthConfig,
) -> (Stats, SamplerTask) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let shared = Arc::new(Mutex::new(Shared {
        source: Box::new(source),
        sampler: Sampler {
            config,
            histories: HashMap::new(),
        },
        failing_reads: 0,
        snapshots: tx,
    }));
    let stats = Stats {
        shared: shared.clone(),
        owners: owners.clone(),
        snapshots: rx,
    };
    let task = SamplerTask {
        shared,
        owners,
        lifecycle,
    };
    (stats, task)
}

/// Reads for `/stats`: cheap to clone, one per API state.
#[derive(Clone)]
pub struct Stats {
    shared: Arc<Mutex<Shared>>,
    owners: watch::Receiver<Owners>,
    /// The last read, as published; what a request gets if its own read panicked.
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl Stats {
    /// The counters as of a read at most [`COALESCE`] old; rates over the last [`RATE_SPAN`]
    /// or so (each VIP says the span).
    pub async fn now(&self) -> Arc<Snapshot> {
        let asked = Instant::now();
        self.read_since(asked.checked_sub(COALESCE).unwrap_or(asked))
            .await
    }

    /// The counters now, with rates over `interval`: a read now and one `interval` later.
    pub async fn over(&self, interval: Duration) -> Snapshot {
        let first = self.now().await;
        let Some(start) = first.read_at else {
            // Nothing could be read: no rates to measure.
            return (*first).clone();
        };
        tokio::time::sleep_until((start + interval).into()).await;
        self.read_since(start + interval).await.rates_since(&first)
    }

    /// What `/metrics` reads: the last snapshot published, by a request or the cadence.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// A snapshot read at or after `since`: the last one if it is that recent, else a new read
    /// on a blocking thread (the lookups are system calls). Requests queue on the lock while
    /// one reads, then take its result.
    async fn read_since(&self, since: Instant) -> Arc<Snapshot> {
        let shared = self.shared.clone();
        let owners = self.owners.borrow().clone();
        tokio::task::spawn_blocking(move || {
            shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .fresh(since, &owners)
        })
        .await
        .unwrap_or_else(|_| self.snapshots.borrow().clone())
    }
}

/// Everything an instance of the cadence needs, kept across restarts.
///
/// A restarted sampler goes on where the failed one stopped: the counter source and the per-VIP
/// histories (with each app's passive verdict, which the lifecycle hears of only when it changes)
/// live here, outside the instance, behind a lock held for one synchronous read and sample.
pub struct SamplerTask {
    shared: Arc<Mutex<Shared>>,
    owners: watch::Receiver<Owners>,
    lifecycle: LifecycleHandle,
}

impl SamplerTask {
    /// One instance: reads every [`SAMPLE_INTERVAL`] until `cancel` or the lifecycle is gone.
    pub fn run(&self, cancel: CancellationToken) -> impl Future<Output = ()> + Send + use<> {
        run(
            self.shared.clone(),
            self.owners.clone(),
            self.lifecycle.clone(),
            cancel,
        )
    }
}

/// What the sampler keeps across restarts, shared by the cadence and the requests.
struct Shared {
    source: Box<dyn CounterSource>,
    sampler: Sampler,
    /// Reads failed in a row (logged once per outage).
    failing_reads: u32,
    /// The last full read; also what `/metrics` exports.
    snapshots: watch::Sender<Arc<Snapshot>>,
}

impl Shared {
    /// Reads the counters (every VIP when `full`, else those with passive health) and samples
    /// them; the changes of passive verdict. A full read is published.
    fn read_and_sample(
        &mut self,
        owners: &BTreeMap<IpAddr, VipOwner>,
        full: bool,
        reader: Reader,
    ) -> Option<Vec<(AppName, Verdict)>> {
        let passive = |vip: IpAddr| owners.get(&vip).is_some_and(|o| o.passive_health);
        if !full && !owners.values().any(|o| o.passive_health) {
            return None;
        }
        let wanted: &dyn Fn(IpAddr) -> bool = if full { &|_| true } else { &passive };
        if full {
            self.source.mark_read();
        }
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
        let now = Instant::now();
        let (vips, verdicts) = self.sampler.sample(now, read, owners, full, reader);
        if full {
            self.snapshots.send_replace(Arc::new(Snapshot {
                sampled_at: Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
                vips,
                unavailable: None,
                read_at: Some(now),
            }));
        }
        Some(verdicts)
    }

    /// The last full read if it was taken at or after `since` and no VIP came or went since,
    /// else a new one (the last one if the counters cannot be read).
    fn fresh(&mut self, since: Instant, owners: &BTreeMap<IpAddr, VipOwner>) -> Arc<Snapshot> {
        let recent = self.snapshots.borrow().read_at.is_some_and(|t| t >= since);
        if !recent || self.source.vips_changed() {
            self.read_and_sample(owners, true, Reader::Request);
        }
        self.snapshots.borrow().clone()
    }
}

async fn run(
    shared: Arc<Mutex<Shared>>,
    owners: watch::Receiver<Owners>,
    lifecycle: LifecycleHandle,
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
        let verdicts = shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read_and_sample(&owners, full, Reader::Cadence);
        let Some(verdicts) = verdicts else {
            continue;
        };
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
            let (_, verdicts) =
                s.sample(now, raw(syn, synack, rst), &owners, true, Reader::Cadence);
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
        let (first, _) = s.sample(t, raw(10, 10, 0), &owners, true, Reader::Cadence);
        assert_eq!(first[0].rates, Rates::default());
        assert_eq!(first[0].vip.to_string(), "192.0.2.10/32");
        assert_eq!(first[0].app.as_ref().unwrap().as_str(), "web");
        let (second, _) = s.sample(
            t + Duration::from_secs(2),
            raw(30, 20, 0),
            &owners,
            true,
            Reader::Cadence,
        );
        assert!((second[0].rates.syn_in - 10.0).abs() < 1e-9);
        assert!((second[0].rates.packets_in - 20.0).abs() < 1e-9);
        assert_eq!(second[0].counters.syn_in, 30);
        assert_eq!(second[0].rates_interval_s, Some(2.0));
    }

    #[test]
    fn reads_for_requests_never_judge_and_add_at_most_a_sample_a_second() {
        let mut s = Sampler {
            config: config(),
            histories: HashMap::new(),
        };
        let t = Instant::now();
        let owners = owners(true);
        // Every unanswered: the cadence would fail the app, a request must not.
        for i in 0..20u64 {
            let now = t + Duration::from_millis(100 * i);
            let (vips, verdicts) = s.sample(now, raw(10 * i, 0, 0), &owners, true, Reader::Request);
            assert!(verdicts.is_empty(), "{verdicts:?}");
            if i >= 10 {
                // The newest sample at least a second old is the base of the rates.
                let span = vips[0].rates_interval_s.unwrap();
                assert!((1.0..2.0).contains(&span), "{span}");
                assert!(
                    (vips[0].rates.syn_in - 100.0).abs() < 1e-6,
                    "{:?}",
                    vips[0].rates
                );
            }
        }
        let h = &s.histories[&"192.0.2.10".parse::<IpAddr>().unwrap()];
        assert_eq!(h.samples.len(), 2, "{:?}", h.samples);
        let (_, verdicts) = s.sample(
            t + Duration::from_secs(2),
            raw(200, 0, 0),
            &owners,
            true,
            Reader::Cadence,
        );
        assert_eq!(verdicts.len(), 1, "the cadence judges the same history");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_one_read() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        /// Counts its reads, each taking a while as thousands of lookups would.
        struct Counting(Arc<AtomicUsize>);
        impl CounterSource for Counting {
            fn read(
                &mut self,
                _: &dyn Fn(IpAddr) -> bool,
            ) -> Result<Vec<(IpAddr, VipCounters)>, EbpfError> {
                self.0.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                Ok(raw(1, 1, 0))
            }
        }

        let reads = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let stats = Stats {
            shared: Arc::new(Mutex::new(Shared {
                source: Box::new(Counting(reads.clone())),
                sampler: Sampler {
                    config: config(),
                    histories: HashMap::new(),
                },
                failing_reads: 0,
                snapshots: tx,
            })),
            owners: watch::channel(Arc::new(owners(false))).1,
            snapshots: rx,
        };
        let answers = futures::future::join_all((0..20).map(|_| stats.now())).await;
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert!(
            answers
                .iter()
                .all(|a| a.vips.len() == 1 && a.sampled_at.is_some())
        );
        assert_eq!(
            stats.snapshots().borrow().vips.len(),
            1,
            "published for /metrics"
        );
    }

    #[test]
    fn rates_since_an_earlier_read_cover_exactly_the_span_between() {
        let t = Instant::now();
        let mut s = Sampler {
            config: config(),
            histories: HashMap::new(),
        };
        let read = |s: &mut Sampler, at: Instant, syn| Snapshot {
            vips: s
                .sample(at, raw(syn, syn, 0), &owners(false), true, Reader::Request)
                .0,
            read_at: Some(at),
            ..Snapshot::default()
        };
        let first = read(&mut s, t, 10);
        let second = read(&mut s, t + Duration::from_millis(500), 60);
        let rated = second.rates_since(&first);
        assert_eq!(rated.vips[0].rates_interval_s, Some(0.5));
        assert!((rated.vips[0].rates.syn_in - 100.0).abs() < 1e-9);
        assert_eq!(rated.vips[0].counters.syn_in, 60);
    }

    #[test]
    fn rates_since_pair_each_vip_with_its_own_earlier_counters() {
        let t = Instant::now();
        let vip = |last: u8, syn_in| VipStats {
            vip: format!("192.0.2.{last}/32").parse().unwrap(),
            app: None,
            counters: VipCounters {
                syn_in,
                ..VipCounters::default()
            },
            rates: Rates::default(),
            rates_interval_s: None,
            addr: IpAddr::from([192, 0, 2, last]),
        };
        let earlier = Snapshot {
            vips: vec![vip(10, 100), vip(30, 1_000)],
            read_at: Some(t),
            ..Snapshot::default()
        };
        let later = Snapshot {
            vips: vec![vip(10, 110), vip(20, 5), vip(30, 1_300)],
            read_at: Some(t + Duration::from_secs(1)),
            ..Snapshot::default()
        };
        let rated = later.rates_since(&earlier);
        let syn = |i: usize| rated.vips[i].rates.syn_in;
        assert!((syn(0) - 10.0).abs() < 1e-9 && (syn(2) - 300.0).abs() < 1e-9);
        assert_eq!(
            rated.vips[1].rates_interval_s, None,
            "new since: its own history"
        );
        assert_eq!(
            rated.find("192.0.2.30/32").map(|v| v.counters.syn_in),
            Some(1_300)
        );
        assert!(rated.find("192.0.2.40").is_none());
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
        let (vips, _) = s.sample(
            Instant::now(),
            raw(1, 1, 0),
            &owners(false),
            true,
            Reader::Cadence,
        );
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
