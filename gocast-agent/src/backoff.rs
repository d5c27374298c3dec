//! The one retry backoff: a delay that doubles after each failure up to a cap, spread by ±20 %
//! so hosts that failed together (a router or Consul restart) do not retry in lockstep.
//!
//! Pure: no clock, no tokio. A task asks for the next delay and arms its own timer or sleep; the
//! BGP FSM returns it as an output. The jitter comes from a small xorshift generator seeded by
//! the caller ([`Backoff::seeded`], reproducible: the FSM seeds it from its config) or by the OS
//! ([`Backoff::new`]).

use std::{
    hash::{BuildHasher, RandomState},
    time::Duration,
};

/// Each delay is its base times `(1000 - JITTER_PERMILLE + r) / 1000`, `r` uniform in
/// `0..=2 * JITTER_PERMILLE`: ±20 %.
pub const JITTER_PERMILLE: u32 = 200;

/// Delays between retries: `first` doubling up to `cap`, each with jitter; [`Backoff::reset`]
/// after a success starts again at `first`.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    /// The base of the next delay, before jitter.
    next: Duration,
    rng: XorShift,
}

impl Backoff {
    /// Jitter seeded from the OS, so agents started together still spread out.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self::seeded(first, cap, RandomState::new().hash_one(0u8))
    }

    /// Jitter from `seed`: the same seed gives the same delays. `first` above `cap` is `cap`.
    pub fn seeded(first: Duration, cap: Duration, seed: u64) -> Self {
        let first = first.min(cap);
        Self {
            first,
            cap,
            next: first,
            rng: XorShift::new(seed),
        }
    }

    /// Starts again at `first`.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The base (before jitter) of the next delay.
    pub fn base(&self) -> Duration {
        self.next
    }

    /// The delay before the next try, jittered; doubles the base of the one after, up to `cap`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.cap);
        let permille = 1000 - JITTER_PERMILLE + self.rng.below(2 * JITTER_PERMILLE + 1);
        base * permille / 1000
    }
}

/// xorshift64 (Marsaglia, 2003): enough to spread retries and BFD transmissions, nothing more.
#[derive(Debug, Clone)]
pub(crate) struct XorShift(u64);

impl XorShift {
    /// Scrambles `seed` with the `SplitMix64` finalizer so close seeds give unrelated sequences;
    /// the state is never zero (xorshift would stay at zero).
    pub(crate) fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Seeded from the OS.
    pub(crate) fn from_os() -> Self {
        Self::new(RandomState::new().hash_one(0u8))
    }

    /// A number in `0..bound`.
    pub(crate) fn below(&mut self, bound: u32) -> u32 {
        // The remainder is below `bound`, so it fits in a u32.
        u32::try_from(self.next() % u64::from(bound)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within_jitter(delay: Duration, base: Duration) -> bool {
        delay >= base * 4 / 5 && delay <= base * 6 / 5
    }

    #[test]
    fn doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, base) in delays.iter().zip([500, 1000, 2000, 4000, 4000, 4000]) {
            assert!(within_jitter(*d, Duration::from_millis(base)), "{delays:?}");
        }
        assert_eq!(b.base(), Duration::from_secs(4));
        b.reset();
        assert_eq!(b.base(), Duration::from_millis(500));
        assert!(b.next_delay() <= Duration::from_millis(600));
    }

    #[test]
    fn a_first_delay_above_the_cap_is_the_cap() {
        let b = Backoff::new(Duration::from_secs(60), Duration::from_secs(15));
        assert_eq!(b.base(), Duration::from_secs(15));
    }

    #[test]
    fn a_seed_gives_the_same_delays_and_they_spread() {
        let delays = |seed| {
            let mut b = Backoff::seeded(Duration::from_secs(1), Duration::from_secs(1), seed);
            (0..20).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        let here = delays(7);
        assert_eq!(here, delays(7));
        assert_ne!(here, delays(8));
        assert!(
            here.iter()
                .all(|d| within_jitter(*d, Duration::from_secs(1)))
        );
        assert!(here.iter().any(|d| *d != here[0]), "{here:?}");
    }
}
