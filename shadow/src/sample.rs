//! Which requests a shadow mirrors: an independent draw per request, or a hash of the
//! request id (reproducible, and the same requests for every shadow).

use std::sync::atomic::{AtomicU64, Ordering};

use switchyard_config::hash::{mix, stable_hash};
use switchyard_config::ShadowSampling;

/// Decides, per request, whether one shadow gets a copy.
#[derive(Debug)]
pub struct Sampler {
    mode: ShadowSampling,
    /// A request is taken when its 64-bit draw is below this (`u64::MAX` with `all`).
    threshold: u64,
    all: bool,
    seed: u64,
    counter: AtomicU64,
}

impl Sampler {
    /// A sampler taking `fraction` of requests; `seed` drives random mode only.
    pub fn new(mode: ShadowSampling, fraction: f64, seed: u64) -> Self {
        let fraction = fraction.clamp(0.0, 1.0);
        Sampler {
            mode,
            // 2^64 · fraction, saturating; exact for the fractions people write.
            threshold: (fraction * 18_446_744_073_709_551_616.0) as u64,
            all: fraction >= 1.0,
            seed,
            counter: AtomicU64::new(0),
        }
    }

    /// Whether the request with this id is mirrored.
    pub fn take(&self, request_id: &[u8]) -> bool {
        if self.all {
            return true;
        }
        if self.threshold == 0 {
            return false;
        }
        let draw = match self.mode {
            // A counter through SplitMix64: one relaxed atomic add, no shared RNG lock.
            ShadowSampling::Random => mix(self.seed ^ self.counter.fetch_add(1, Ordering::Relaxed)),
            // Not keyed: the same id gives the same draw in every shadow, process and run.
            ShadowSampling::Hash => stable_hash(request_id),
        };
        draw < self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Share taken over `n` ids; the binomial standard deviation is at most 0.5/sqrt(n).
    fn share(s: &Sampler, n: usize) -> f64 {
        let taken = (0..n)
            .filter(|i| s.take(format!("req-{i}").as_bytes()))
            .count();
        taken as f64 / n as f64
    }

    #[test]
    fn both_modes_take_the_fraction_within_five_sigma() {
        let n = 100_000;
        for mode in [ShadowSampling::Random, ShadowSampling::Hash] {
            for f in [0.01, 0.2, 0.5, 0.97] {
                let got = share(&Sampler::new(mode, f, 7), n);
                let sigma = (f * (1.0 - f) / n as f64).sqrt();
                assert!((got - f).abs() < 5.0 * sigma, "{mode:?} {f}: {got}");
            }
        }
    }

    #[test]
    fn zero_and_one_are_exact() {
        for mode in [ShadowSampling::Random, ShadowSampling::Hash] {
            assert_eq!(share(&Sampler::new(mode, 0.0, 1), 1000), 0.0);
            assert_eq!(share(&Sampler::new(mode, 1.0, 1), 1000), 1.0);
        }
    }

    #[test]
    fn hash_mode_is_nested_across_fractions_and_repeatable() {
        let small = Sampler::new(ShadowSampling::Hash, 0.1, 1);
        let large = Sampler::new(ShadowSampling::Hash, 0.3, 2);
        for i in 0..10_000 {
            let id = format!("id-{i}");
            if small.take(id.as_bytes()) {
                assert!(large.take(id.as_bytes()), "{id} in 10% but not in 30%");
            }
            assert_eq!(small.take(id.as_bytes()), small.take(id.as_bytes()));
        }
    }
}
