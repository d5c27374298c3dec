//! The one timer every task uses: a deadline that may be off, awaited in `select!`.
//!
//! Off, it never fires (no `sleep(u64::MAX)` sentinels); setting it again replaces the deadline,
//! so no stale expiry can arrive after a reset. It runs on the tokio clock, so tests drive it
//! with `tokio::time::pause`/`advance`.

use std::{pin::Pin, time::Duration};

use tokio::time::{Instant, Sleep};

/// A one-shot timer that may be off.
#[derive(Debug, Default)]
pub struct Timer(Option<Pin<Box<Sleep>>>);

impl Timer {
    /// Fires `after` from now; `None` turns it off.
    pub fn set(&mut self, after: Option<Duration>) {
        self.set_at(after.map(|d| Instant::now() + d));
    }

    /// Fires at `deadline`; `None` turns it off. Reuses the armed sleep when there is one.
    pub fn set_at(&mut self, deadline: Option<Instant>) {
        match (deadline, self.0.as_mut()) {
            (Some(at), Some(sleep)) => sleep.as_mut().reset(at),
            (Some(at), None) => self.0 = Some(Box::pin(tokio::time::sleep_until(at))),
            (None, _) => self.0 = None,
        }
    }

    /// When it fires, if it is on.
    pub fn deadline(&self) -> Option<Instant> {
        self.0.as_ref().map(|s| s.deadline())
    }

    /// Completes when the deadline passes, and turns the timer off; pending forever while off.
    /// Cancel-safe: dropped before the deadline, it leaves the timer as it was.
    pub async fn fired(&mut self) {
        match self.0.as_mut() {
            Some(sleep) => {
                sleep.await;
                self.0 = None;
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_at_its_deadline_then_is_off() {
        let mut timer = Timer::default();
        timer.set(Some(Duration::from_secs(2)));
        let start = Instant::now();
        timer.fired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(timer.deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_off_timer_never_fires() {
        let mut timer = Timer::default();
        let fired = tokio::time::timeout(Duration::from_secs(3600), timer.fired()).await;
        assert!(fired.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_replaces_the_deadline() {
        let mut timer = Timer::default();
        timer.set(Some(Duration::from_secs(1)));
        timer.set(Some(Duration::from_secs(5)));
        let start = Instant::now();
        timer.fired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        timer.set(Some(Duration::from_secs(1)));
        timer.set(None);
        assert!(
            tokio::time::timeout(Duration::from_secs(10), timer.fired())
                .await
                .is_err()
        );
    }
}
