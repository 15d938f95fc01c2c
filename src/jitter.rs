//! Cheap randomness for spreading events out in time (clients' retries, a
//! fleet's baseline probes). Nothing here needs cryptographic quality, and the
//! hot path must not pay for it: xorshift64* is a handful of instructions.

use std::hash::{BuildHasher, RandomState};

/// A xorshift64* generator.
#[derive(Debug, Clone, Copy)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeded from the process's hash keys, which the standard library draws
    /// from the operating system: two replicas never start in step.
    pub fn from_entropy() -> Self {
        Self::seeded(RandomState::new().hash_one(0u8))
    }

    /// The same sequence for the same seed (simulations, tests).
    pub fn seeded(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Uniform in `0.0..1.0`.
    pub fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `low..high`.
    pub fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }
}

/// A jitter factor in 0.8..=1.2, from a fast per-thread generator: spreading
/// retries needs no cryptographic randomness.
pub fn retry_factor() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<Jitter> = Cell::new(Jitter::from_entropy());
    }
    STATE.with(|s| {
        let mut j = s.get();
        let factor = j.between(0.8, 1.2);
        s.set(j);
        factor
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_over_the_whole_range_and_no_further() {
        let mut j = Jitter::seeded(7);
        let v: Vec<f64> = (0..10_000).map(|_| j.between(0.75, 1.25)).collect();
        assert!(v.iter().all(|x| (0.75..1.25).contains(x)));
        let low = v.iter().filter(|&&x| x < 0.8).count();
        let high = v.iter().filter(|&&x| x >= 1.2).count();
        // A tenth of the range at each end: about 1 000 each.
        assert!(
            (800..1200).contains(&low) && (800..1200).contains(&high),
            "{low} {high}"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let (mut a, mut b) = (Jitter::seeded(42), Jitter::seeded(42));
        assert!((0..100).all(|_| a.unit() == b.unit()));
    }
}
