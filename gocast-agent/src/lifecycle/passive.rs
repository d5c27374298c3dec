//! One app's passive health as the core keeps it: what fails it, and the hold-down that keeps a
//! withdrawn app from flapping (docs/design.md, "Passive health").
//!
//! A VIP withdrawn by passive health gets no traffic, so its bad SYNs age out of the window and
//! the counters soon say nothing against it: coming back then would announce a service that may
//! still not answer, fail again a window later, and flap about once per window (routers that
//! damp flapping prefixes, RFC 2439, may then suppress the route long after the service
//! recovers). So after a passive failure the app comes back only when
//! - nothing fails it any more (the counters' verdict cleared, the listener has room);
//! - its hold-down is over: one window after the first failure, doubling with each failure in a
//!   row, at most [`HOLD_MAX_FACTOR`] windows; failures stop counting as "in a row" once the
//!   app has been back for [`STABLE_FACTOR`] windows;
//! - a check proved that the service accepts a connection (`monitor::Command::Watch`'s `prove`).
//!
//! Pure: the time comes in as a value.

use std::time::Duration;

use tokio::time::Instant;

/// The longest hold-down, in windows.
pub const HOLD_MAX_FACTOR: u32 = 8;
/// After this many windows back without a passive failure, the next one counts as the first.
pub const STABLE_FACTOR: u32 = 8;

/// The hold-down after the `strikes`-th passive failure in a row: `window` doubling with each,
/// at most [`HOLD_MAX_FACTOR`] windows.
pub fn hold_down(strikes: u32, window: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(strikes.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(HOLD_MAX_FACTOR);
    window.saturating_mul(factor)
}

/// What the core knows of one app's passive health.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Passive {
    /// Why the VIP's traffic fails the app (the stats sampler's verdict).
    pub traffic: Option<String>,
    /// Why its listener fails it: a `port:tcp` monitor's port refuses connections.
    pub listener: Option<String>,
    /// Passive failures in a row.
    pub strikes: u32,
    /// Not announced again before this.
    pub held_until: Option<Instant>,
    /// Withdrawn by passive health: back only on a check that proved the service accepts.
    pub needs_proof: bool,
    /// When the app came back after its last passive failure.
    pub back_since: Option<Instant>,
}

impl Passive {
    /// The reason passive health fails the app now, if it does.
    pub fn failure(&self) -> Option<&str> {
        self.traffic.as_deref().or(self.listener.as_deref())
    }

    /// Records a new reason from the counters (`traffic`) or the listener; true when this
    /// starts a failure, which then counts a strike and sets the hold-down.
    pub fn set(
        &mut self,
        traffic: bool,
        reason: Option<String>,
        now: Instant,
        window: Duration,
    ) -> bool {
        let was_failing = self.failure().is_some();
        if traffic {
            self.traffic = reason;
        } else {
            self.listener = reason;
        }
        let began = !was_failing && self.failure().is_some();
        if began {
            let stable = window.saturating_mul(STABLE_FACTOR);
            if self
                .back_since
                .is_some_and(|t| now.saturating_duration_since(t) >= stable)
            {
                self.strikes = 0;
            }
            self.back_since = None;
            self.strikes = self.strikes.saturating_add(1);
            self.held_until = Some(now + hold_down(self.strikes, window));
            self.needs_proof = true;
        }
        began
    }

    /// Whether a check may bring the app back: nothing fails it, the hold-down is over, and
    /// the check `proved` that the service accepts if that is needed.
    pub fn allows(&self, now: Instant, proved: bool) -> bool {
        self.failure().is_none()
            && self.held_until.is_none_or(|t| now >= t)
            && (proved || !self.needs_proof)
    }

    /// The app came back: no more proof needed; the stable period starts.
    pub fn back(&mut self, now: Instant) {
        if self.needs_proof {
            self.needs_proof = false;
            self.held_until = None;
            self.back_since = Some(now);
        }
    }

    /// Seconds left of the hold-down, while one runs.
    pub fn hold_left(&self, now: Instant) -> Option<f64> {
        self.held_until
            .filter(|t| *t > now)
            .map(|t| t.saturating_duration_since(now).as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(5);

    #[test]
    fn the_hold_down_doubles_from_one_window_to_eight() {
        let holds: Vec<u64> = (1..=6).map(|n| hold_down(n, WINDOW).as_secs()).collect();
        assert_eq!(holds, [5, 10, 20, 40, 40, 40]);
        assert_eq!(hold_down(u32::MAX, WINDOW), WINDOW * HOLD_MAX_FACTOR);
    }

    #[test]
    fn a_failure_needs_the_hold_down_to_pass_and_a_proof() {
        let t = Instant::now();
        let mut p = Passive::default();
        assert!(p.set(true, Some("no SYN-ACK".into()), t, WINDOW));
        assert!(
            !p.set(false, Some("queue full".into()), t, WINDOW),
            "one failure, two reasons"
        );
        assert_eq!(p.strikes, 1);
        p.set(true, None, t + WINDOW, WINDOW);
        assert!(!p.allows(t + WINDOW, true), "the listener still fails it");
        p.set(false, None, t + WINDOW, WINDOW);
        assert!(!p.allows(t + WINDOW / 2, true), "held down");
        assert!(!p.allows(t + WINDOW, false), "no proof");
        assert!(p.allows(t + WINDOW, true));
        p.back(t + WINDOW);
        assert!(p.allows(t + WINDOW, false), "back: monitors alone again");
    }

    #[test]
    fn failures_in_a_row_hold_longer_until_a_stable_period_resets_them() {
        let t = Instant::now();
        let mut p = Passive::default();
        let mut now = t;
        for expected in [1, 2, 4, 8, 8] {
            p.set(true, Some("bad".into()), now, WINDOW);
            assert_eq!(p.hold_left(now), Some((WINDOW * expected).as_secs_f64()));
            p.set(true, None, now, WINDOW);
            now += WINDOW * expected;
            p.back(now);
            // Fails again soon after coming back.
            now += WINDOW;
        }
        assert_eq!(p.strikes, 5);
        now += WINDOW * STABLE_FACTOR;
        p.set(true, Some("bad".into()), now, WINDOW);
        assert_eq!(p.strikes, 1, "reset after a stable period");
        assert_eq!(p.hold_left(now), Some(WINDOW.as_secs_f64()));
    }
}
