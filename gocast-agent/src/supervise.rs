//! Supervision: long-lived tasks come back when they panic or end unexpectedly, and the
//! lifecycle's heartbeat tells `/healthz`, systemd's watchdog and the agent that the task that
//! owns every app still turns.
//!
//! ```text
//!  spawn(name, factory) ─▶ instance ─ panics / returns ─▶ ERROR log, gocast_task_restarts_total{task}
//!        ▲                                                 │ TaskState::Restarting (/healthz 503)
//!        └─── backoff: 0.5 s doubling to 30 s, ±20 % ◀─────┘
//!  cancel ─▶ the instance stops on its own token, the supervisor waits for it: TaskState::Stopped
//!
//!  lifecycle loop ─ Heartbeat::beat (every turn, and every `tick` when idle)
//!        ├─▶ Pulse (watch<Instant>) ─▶ /healthz (older than `unhealthy_after`: 503)
//!        │                          └▶ agent: older than `fatal_after`, or the task ended: Cease, exit 1
//!        └─▶ WATCHDOG=1 every WATCHDOG_USEC / 2 (systemd restarts a process that stops pinging)
//! ```
//!
//! A task keeps across restarts only what its factory gives each instance: inputs that must
//! survive (a channel's receiving end, state) live outside the instance, in the factory's
//! captures; see `monitor::spawn` and `stats::spawn`.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    sync::{oneshot, watch},
    task::{JoinError, JoinHandle},
    time::{Instant, Interval, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::{backoff::Backoff, metrics::Metrics, systemd};

/// The first delay before a restart; it doubles with each failure in a row.
const FIRST_DELAY: Duration = Duration::from_millis(500);
/// The longest delay: a task in a crash loop still starts twice a minute.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// An instance that ran this long was healthy: the next failure starts at [`FIRST_DELAY`] again.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// What a supervised task is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    Running,
    /// The last instance ended (`reason`); the next one starts after the backoff.
    Restarting {
        reason: String,
    },
    /// Stopped on request (shutdown).
    Stopped,
}

/// A supervised task's name and state, for `/healthz`.
#[derive(Debug, Clone)]
pub struct TaskStatus {
    name: &'static str,
    state: watch::Receiver<TaskState>,
}

impl TaskStatus {
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn state(&self) -> TaskState {
        self.state.borrow().clone()
    }

    /// Why the task counts as down, or `None` while it runs.
    pub fn down(&self) -> Option<String> {
        match &*self.state.borrow() {
            TaskState::Running => None,
            TaskState::Restarting { reason } => {
                Some(format!("task {} is down (restarting): {reason}", self.name))
            }
            TaskState::Stopped => Some(format!("task {} has stopped", self.name)),
        }
    }
}

/// A task under supervision.
#[derive(Debug)]
pub struct Supervised {
    pub status: TaskStatus,
    /// Ends after `cancel` once the last instance has stopped.
    pub done: JoinHandle<()>,
}

/// Runs `factory(cancel)` as a task of its own, and again after a backoff each time it panics or
/// returns while `cancel` has not fired. Each restart is logged at ERROR and counted in
/// `gocast_task_restarts_total{task = name}`. After `cancel`, the running instance is waited for
/// (it must watch the token it was given) and nothing is started again.
pub fn spawn<F, Fut>(
    name: &'static str,
    metrics: Metrics,
    cancel: CancellationToken,
    factory: F,
) -> Supervised
where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (state_tx, state) = watch::channel(TaskState::Running);
    let done = tokio::spawn(supervise(name, factory, cancel, metrics, state_tx));
    Supervised {
        status: TaskStatus { name, state },
        done,
    }
}

async fn supervise<F, Fut>(
    name: &'static str,
    mut factory: F,
    cancel: CancellationToken,
    metrics: Metrics,
    state: watch::Sender<TaskState>,
) where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::new(FIRST_DELAY, MAX_DELAY);
    let mut restarts: u64 = 0;
    loop {
        let started = Instant::now();
        // A task of its own: a panic ends the instance, not the supervisor.
        let mut instance = tokio::spawn(factory(cancel.clone()));
        state.send_replace(TaskState::Running);
        let ended = tokio::select! {
            ended = &mut instance => ended,
            () = cancel.cancelled() => {
                // The instance stops on the same token; a panic while stopping changes nothing.
                let _ = instance.await;
                break;
            }
        };
        if cancel.is_cancelled() {
            break;
        }
        let reason = match ended {
            Ok(()) => "ended unexpectedly".to_owned(),
            Err(e) => failure(e),
        };
        if started.elapsed() >= STABLE_AFTER {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        restarts += 1;
        metrics.task_restarted(name, "");
        error!(task = name, %reason, restarts, ?delay, "supervised task failed; restarting it");
        state.send_replace(TaskState::Restarting { reason });
        if cancel
            .run_until_cancelled(tokio::time::sleep(delay))
            .await
            .is_none()
        {
            break;
        }
    }
    state.send_replace(TaskState::Stopped);
}

/// A failed instance in words: its panic message when it has one.
fn failure(e: JoinError) -> String {
    if !e.is_panic() {
        return format!("ended: {e}");
    }
    let payload = e.into_panic();
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not a text)".to_owned());
    format!("panicked: {text}")
}

/// The longest the lifecycle may go without turning before the agent gives up on it.
pub const MAX_STALL: Duration = Duration::from_secs(10);
/// The shortest such bound, whatever the watchdog: a short `WatchdogSec=` must not turn a slow
/// moment of a loaded host into a restart.
const MIN_STALL: Duration = Duration::from_secs(2);
/// The lifecycle turns at least this often when idle.
const MAX_TICK: Duration = Duration::from_secs(1);

/// How often the lifecycle turns when idle and how old its heartbeat may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// The lifecycle turns at least this often, even with nothing to do.
    pub tick: Duration,
    /// Older than this, `/healthz` says the lifecycle has not turned.
    pub unhealthy_after: Duration,
    /// Older than this, the agent closes the BGP sessions and exits non-zero.
    pub fatal_after: Duration,
    /// systemd's watchdog timeout (`WATCHDOG_USEC`): pinged every half of it.
    pub watchdog: Option<Duration>,
}

impl Liveness {
    /// The bounds for a service manager's watchdog timeout, if any. The agent's own bound is
    /// half the watchdog (10 s at most): it acts before systemd's SIGABRT, so the sessions still
    /// close with Cease; the watchdog stays the backstop for a process too stuck to do that.
    pub fn new(watchdog: Option<Duration>) -> Self {
        let fatal_after = watchdog.map_or(MAX_STALL, |w| (w / 2).clamp(MIN_STALL, MAX_STALL));
        let tick = watchdog.map_or(MAX_TICK, |w| (w / 4).min(MAX_TICK));
        Self {
            tick,
            unhealthy_after: (tick * 3).min(fatal_after / 2),
            fatal_after,
            watchdog,
        }
    }

    /// The bounds for this process (systemd's `WATCHDOG_USEC`, when it watches us).
    pub fn current() -> Self {
        Self::new(systemd::watchdog_timeout())
    }
}

/// The lifecycle's side: readiness once, then a beat per loop turn.
#[derive(Debug)]
pub struct Heartbeat {
    last: watch::Sender<Instant>,
    liveness: Liveness,
    /// When `WATCHDOG=1` was last sent.
    pinged: Option<Instant>,
    ready: Option<oneshot::Sender<()>>,
    /// `GOCAST_TEST_STALL_LIFECYCLE_AFTER=<seconds>` (debug builds only): when the loop stops
    /// turning, so end-to-end tests can see what a stuck lifecycle does.
    #[cfg(debug_assertions)]
    stall_at: Option<Instant>,
}

/// The readers' side: how long ago the lifecycle last turned.
#[derive(Debug, Clone)]
pub struct Pulse {
    last: watch::Receiver<Instant>,
    liveness: Liveness,
}

/// A heartbeat, its pulse, and the receiver that fires once the lifecycle is ready. The pulse
/// starts now, so a lifecycle stuck before its first beat is seen too.
pub fn heartbeat(liveness: Liveness) -> (Heartbeat, Pulse, oneshot::Receiver<()>) {
    let (tx, rx) = watch::channel(Instant::now());
    let (ready_tx, ready_rx) = oneshot::channel();
    let heartbeat = Heartbeat {
        last: tx,
        liveness,
        pinged: None,
        ready: Some(ready_tx),
        #[cfg(debug_assertions)]
        stall_at: test_stall_at(),
    };
    (heartbeat, Pulse { last: rx, liveness }, ready_rx)
}

impl Heartbeat {
    /// The idle tick for the loop's `select!`.
    pub fn ticker(&self) -> Interval {
        let mut tick = tokio::time::interval(self.liveness.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick
    }

    /// The first reconcile is done: beats, and tells whoever waits for readiness (once).
    pub fn ready(&mut self) {
        self.beat();
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(());
        }
    }

    /// The loop turned: publishes the time, pings systemd's watchdog when half its timeout
    /// passed since the last ping.
    pub fn beat(&mut self) {
        let now = Instant::now();
        self.last.send_replace(now);
        if let Some(timeout) = self.liveness.watchdog
            && self.pinged.is_none_or(|at| now - at >= timeout / 2)
        {
            systemd::notify_watchdog();
            self.pinged = Some(now);
        }
    }

    /// Debug builds with `GOCAST_TEST_STALL_LIFECYCLE_AFTER` set: once that time has passed,
    /// never completes, so the lifecycle loop stops turning. Otherwise completes at once.
    pub fn test_stall(&self) -> impl Future<Output = ()> + use<> {
        let stall = self.stalls_now();
        async move {
            if stall {
                tracing::warn!(
                    "GOCAST_TEST_STALL_LIFECYCLE_AFTER: the lifecycle loop stops turning"
                );
                std::future::pending::<()>().await;
            }
        }
    }

    #[cfg(debug_assertions)]
    fn stalls_now(&self) -> bool {
        self.stall_at.is_some_and(|at| Instant::now() >= at)
    }

    /// Release builds have no fault hook.
    #[cfg(not(debug_assertions))]
    #[expect(
        clippy::unused_self,
        reason = "the debug build's twin reads the stall time"
    )]
    fn stalls_now(&self) -> bool {
        false
    }
}

#[cfg(debug_assertions)]
fn test_stall_at() -> Option<Instant> {
    let secs: f64 = std::env::var("GOCAST_TEST_STALL_LIFECYCLE_AFTER")
        .ok()?
        .parse()
        .ok()?;
    Some(Instant::now() + Duration::try_from_secs_f64(secs).ok()?)
}

impl Pulse {
    /// A pulse read from `last`, for tests that drive the heartbeat themselves.
    pub fn new(last: watch::Receiver<Instant>, liveness: Liveness) -> Self {
        Self { last, liveness }
    }

    /// Time since the lifecycle last turned.
    pub fn age(&self) -> Duration {
        self.last.borrow().elapsed()
    }

    pub fn liveness(&self) -> Liveness {
        self.liveness
    }

    /// Why the lifecycle counts as stuck for `/healthz`, or `None`.
    pub fn unhealthy(&self) -> Option<String> {
        let age = self.age();
        (age > self.liveness.unhealthy_after)
            .then(|| format!("lifecycle has not turned for {:.1} s", age.as_secs_f64()))
    }
}

/// Completes when the lifecycle can no longer be trusted: its task ended (it only ends after
/// shutdown was asked for, so any end is a failure: a panic, most likely) or it has not turned
/// for [`Liveness::fatal_after`]. Says why.
pub async fn lifecycle_failure(task: &mut JoinHandle<()>, pulse: &Pulse) -> String {
    let mut check = tokio::time::interval(pulse.liveness.tick);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ended = &mut *task => return match ended {
                Ok(()) => "the lifecycle task ended unexpectedly".to_owned(),
                Err(e) => format!("the lifecycle task {}", failure(e)),
            },
            _ = check.tick() => {
                let age = pulse.age();
                if age > pulse.liveness.fatal_after {
                    return format!("lifecycle has not turned for {:.1} s", age.as_secs_f64());
                }
            }
        }
    }
}

/// A further health check: its reasons for being unhealthy, none when healthy. It must be cheap
/// (read a `watch`), as `/healthz` runs it on every request.
pub type Check = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// What `/healthz` looks at: the lifecycle's pulse, the supervised tasks, further checks.
#[derive(Clone)]
pub struct Health {
    lifecycle: Pulse,
    tasks: Arc<[TaskStatus]>,
    /// E.g. the BGP speaker's supervised sessions, once it tells which are down.
    checks: Arc<[Check]>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("lifecycle", &self.lifecycle)
            .field("tasks", &self.tasks)
            .field("checks", &self.checks.len())
            .finish()
    }
}

impl Health {
    pub fn new(lifecycle: Pulse, tasks: Vec<TaskStatus>, checks: Vec<Check>) -> Self {
        Self {
            lifecycle,
            tasks: tasks.into(),
            checks: checks.into(),
        }
    }

    /// Why the agent is unhealthy; empty when it is healthy.
    pub fn reasons(&self) -> Vec<String> {
        let mut reasons: Vec<String> = self.lifecycle.unhealthy().into_iter().collect();
        reasons.extend(self.tasks.iter().filter_map(TaskStatus::down));
        for check in self.checks.iter() {
            reasons.extend(check());
        }
        reasons
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn restarts(metrics: &Metrics, task: &str) -> u64 {
        let needle = format!("gocast_task_restarts_total{{task=\"{task}\",peer=\"\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&needle)?.parse().ok())
            .unwrap_or(0)
    }

    /// Lets the spawned tasks run until they all wait (on the paused clock or a channel).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_with_a_growing_backoff_and_counted() {
        let metrics = Metrics::default();
        let cancel = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        let sup = spawn("flaky", metrics.clone(), cancel.clone(), move |cancel| {
            let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                assert!(n > 3, "instance {n} fails");
                cancel.cancelled().await;
            }
        });
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        let down = sup.status.down().expect("down after the panic");
        assert!(
            down.starts_with("task flaky is down (restarting): panicked: instance 1 fails"),
            "{down}"
        );
        assert_eq!(restarts(&metrics, "flaky"), 1);
        // Delays of 0.5, 1 and 2 s, each ±20 %: restarts at [0.4, 0.6], [1.2, 1.8], [2.8, 4.2] s.
        let t0 = Instant::now();
        let starts_at = |ms| {
            let starts = starts.clone();
            async move {
                tokio::time::sleep_until(t0 + Duration::from_millis(ms)).await;
                starts.load(Ordering::SeqCst)
            }
        };
        assert_eq!(starts_at(390).await, 1);
        assert_eq!(starts_at(610).await, 2);
        assert_eq!(starts_at(1190).await, 2);
        assert_eq!(starts_at(1810).await, 3);
        assert_eq!(starts_at(2790).await, 3);
        assert_eq!(starts_at(4210).await, 4);
        assert_eq!(sup.status.state(), TaskState::Running);
        assert_eq!(sup.status.down(), None);
        assert_eq!(restarts(&metrics, "flaky"), 3);

        cancel.cancel();
        sup.done.await.unwrap();
        assert_eq!(sup.status.state(), TaskState::Stopped);
        assert_eq!(starts.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_returns_is_restarted_and_one_that_is_cancelled_is_not() {
        let metrics = Metrics::default();
        let cancel = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        let sup = spawn("quitter", metrics.clone(), cancel.clone(), move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async {}
        });
        settle().await;
        let down = sup.status.down().unwrap();
        assert!(down.ends_with("ended unexpectedly"), "{down}");
        tokio::time::advance(Duration::from_millis(600)).await;
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert_eq!(restarts(&metrics, "quitter"), 2);
        // Cancelled during the backoff: nothing starts again.
        cancel.cancel();
        sup.done.await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert_eq!(sup.status.state(), TaskState::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_a_running_task_without_a_restart() {
        let metrics = Metrics::default();
        let cancel = CancellationToken::new();
        let sup = spawn(
            "steady",
            metrics.clone(),
            cancel.clone(),
            |cancel| async move {
                cancel.cancelled().await;
            },
        );
        settle().await;
        assert_eq!(sup.status.state(), TaskState::Running);
        cancel.cancel();
        sup.done.await.unwrap();
        assert_eq!(sup.status.state(), TaskState::Stopped);
        assert_eq!(restarts(&metrics, "steady"), 0);
    }

    #[test]
    fn liveness_bounds_follow_the_watchdog() {
        let none = Liveness::new(None);
        assert_eq!(
            (none.tick, none.unhealthy_after, none.fatal_after),
            (
                Duration::from_secs(1),
                Duration::from_secs(3),
                Duration::from_secs(10)
            )
        );
        // The shipped unit: WatchdogSec=30s.
        let unit = Liveness::new(Some(Duration::from_secs(30)));
        assert_eq!(unit.fatal_after, Duration::from_secs(10));
        assert_eq!(unit.tick, Duration::from_secs(1));
        // A short watchdog: ticks fast enough to ping twice per timeout, bounded below.
        let short = Liveness::new(Some(Duration::from_secs(2)));
        assert_eq!(short.tick, Duration::from_millis(500));
        assert_eq!(short.fatal_after, Duration::from_secs(2));
        assert_eq!(short.unhealthy_after, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_heartbeat_is_unhealthy_then_fatal() {
        let (mut heartbeat, pulse, mut ready) = heartbeat(Liveness::new(None));
        assert!(ready.try_recv().is_err());
        heartbeat.ready();
        ready.try_recv().unwrap();
        assert_eq!(pulse.unhealthy(), None);
        let mut task = tokio::spawn(std::future::pending::<()>());
        let failure = tokio::spawn({
            let pulse = pulse.clone();
            async move { lifecycle_failure(&mut task, &pulse).await }
        });
        tokio::time::advance(Duration::from_millis(3100)).await;
        let why = pulse.unhealthy().unwrap();
        assert_eq!(why, "lifecycle has not turned for 3.1 s");
        heartbeat.beat();
        assert_eq!(pulse.unhealthy(), None);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!failure.is_finished());
        // Checked every tick: seen within one tick after the bound.
        let why = tokio::time::timeout(Duration::from_secs(3), failure)
            .await
            .expect("a failure within a tick of the bound")
            .unwrap();
        let age: f64 = why
            .strip_prefix("lifecycle has not turned for ")
            .and_then(|s| s.strip_suffix(" s"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{why}"));
        assert!((10.0..=11.0).contains(&age), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lifecycle_that_panics_is_a_failure() {
        let (_heartbeat, pulse, _ready) = heartbeat(Liveness::new(None));
        let mut task = tokio::spawn(async { panic!("core invariant") });
        let why = lifecycle_failure(&mut task, &pulse).await;
        assert_eq!(why, "the lifecycle task panicked: core invariant");
    }

    #[tokio::test(start_paused = true)]
    async fn health_lists_every_reason() {
        let (_heartbeat, pulse, _ready) = heartbeat(Liveness::new(None));
        let cancel = CancellationToken::new();
        let down = spawn("stats", Metrics::default(), cancel.clone(), |_| async {
            panic!("boom")
        });
        settle().await;
        let bgp: Check = Arc::new(|| vec!["bgp session 192.0.2.1 is down".to_owned()]);
        let health = Health::new(pulse, vec![down.status.clone()], vec![bgp]);
        assert_eq!(
            health.reasons(),
            [
                "task stats is down (restarting): panicked: boom",
                "bgp session 192.0.2.1 is down"
            ]
        );
        cancel.cancel();
    }
}
