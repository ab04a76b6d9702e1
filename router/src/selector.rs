//! Phase 4, *choose*: which variant answers a request.
//!
//! A [`Selector`] holds a model's current [`WeightTable`] behind an `ArcSwap`: every
//! request reads it without a lock, and the bandit (or an operator) replaces it whole with
//! [`Selector::set_weights`]. Each pick reports the probability with which the variant was
//! chosen, which feedback needs for inverse-propensity estimates.
//!
//! Random picks come from a counter-based SplitMix64 stream: one atomic increment per
//! request, no lock, and with a fixed seed the *multiset* of choices over N requests is
//! the same on every run however the requests interleave across threads.
//!
//! Sticky picks use weighted rendezvous hashing: each variant scores a key as
//! `-ln(u) / w` with `u` a hash of (key, variant name), and the lowest score wins. A key
//! lands on a variant with probability `w / Σw`; when weights change, a key only moves
//! *to* a variant whose weight grew or *from* one whose weight shrank, so the share of
//! keys that move is the share of weight that moved. The hash is fixed (FNV-1a then the
//! SplitMix64 finaliser), so assignments survive restarts and are the same on every
//! sidecar of a fleet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use switchyard_config::hash::mix;
/// Re-exported: the router's callers hash with it too (request-id keys, seeds).
pub use switchyard_config::hash::stable_hash;

/// An immutable table of normalised weights (fractions summing to 1).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightTable {
    weights: Box<[f64]>,
    /// Running sums of `weights`, for inverse-CDF sampling.
    cumulative: Box<[f64]>,
}

/// Why a weight table was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightError {
    /// Wrong number of weights.
    #[error("expected {expected} weights, got {got}")]
    Length {
        /// Variants in the model.
        expected: usize,
        /// Weights given.
        got: usize,
    },
    /// A negative, NaN or infinite weight.
    #[error("weight {0} is not a finite number ≥ 0")]
    Invalid(f64),
    /// All weights zero.
    #[error("weights must have a positive sum")]
    ZeroSum,
}

impl WeightTable {
    /// Normalises `weights` (any non-negative numbers with a positive sum).
    pub fn new(weights: &[f64]) -> Result<Self, WeightError> {
        if let Some(&w) = weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
            return Err(WeightError::Invalid(w));
        }
        let sum: f64 = weights.iter().sum();
        if sum <= 0.0 || !sum.is_finite() {
            return Err(WeightError::ZeroSum);
        }
        let weights: Box<[f64]> = weights.iter().map(|w| w / sum).collect();
        let mut acc = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        Ok(WeightTable {
            weights,
            cumulative,
        })
    }

    /// The normalised weights, in variant order.
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The variant for a uniform draw `u` in [0, 1).
    fn index_for(&self, u: f64) -> usize {
        for (i, &c) in self.cumulative.iter().enumerate() {
            if u < c && self.weights[i] > 0.0 {
                return i;
            }
        }
        // Rounding can leave the last sum a hair under 1: take the last live variant.
        self.weights
            .iter()
            .rposition(|w| *w > 0.0)
            .unwrap_or_default()
    }
}

/// One choice: which variant, and with what probability it was chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// Index of the variant in the model's variant list.
    pub index: usize,
    /// Probability that this variant would be chosen for this request.
    pub probability: f64,
}

/// Chooses variants for one model.
#[derive(Debug)]
pub struct Selector {
    table: ArcSwap<WeightTable>,
    /// Stable hashes of the variant names, for sticky picks.
    name_hashes: Box<[u64]>,
    seed: u64,
    counter: AtomicU64,
}

impl Selector {
    /// A selector over variants named `names` with initial `table`. `seed` fixes the
    /// sequence of random draws.
    pub fn new(names: &[&str], table: WeightTable, seed: u64) -> Self {
        assert_eq!(names.len(), table.weights.len(), "one weight per variant");
        Selector {
            table: ArcSwap::from_pointee(table),
            name_hashes: names.iter().map(|n| stable_hash(n.as_bytes())).collect(),
            seed,
            counter: AtomicU64::new(0),
        }
    }

    /// The current table.
    pub fn table(&self) -> Arc<WeightTable> {
        self.table.load_full()
    }

    /// Replaces the weights atomically; requests already past *choose* are unaffected.
    pub fn set_weights(&self, weights: &[f64]) -> Result<(), WeightError> {
        if weights.len() != self.name_hashes.len() {
            return Err(WeightError::Length {
                expected: self.name_hashes.len(),
                got: weights.len(),
            });
        }
        self.table.store(Arc::new(WeightTable::new(weights)?));
        Ok(())
    }

    /// A random pick by the current weights.
    pub fn pick(&self) -> Pick {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let u = unit(mix(self.seed.wrapping_add(n.wrapping_mul(GOLDEN))));
        let table = self.table.load();
        let index = table.index_for(u);
        Pick {
            index,
            probability: table.weights[index],
        }
    }

    /// A random pick among the variants `usable` accepts, by their weights renormalised
    /// over those (an ejected variant's share goes to the others in proportion); `None`
    /// when none with weight is usable. The probability is the renormalised weight.
    pub fn pick_among(&self, usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let table = self.table.load();
        let total: f64 = (0..table.weights.len())
            .filter(|i| usable(*i))
            .map(|i| table.weights[i])
            .sum();
        if total <= 0.0 {
            return None;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut u = unit(mix(self.seed.wrapping_add(n.wrapping_mul(GOLDEN)))) * total;
        let mut last = None;
        for (i, &w) in table.weights.iter().enumerate() {
            if w <= 0.0 || !usable(i) {
                continue;
            }
            last = Some(i);
            if u < w {
                break;
            }
            u -= w;
        }
        last.map(|index| Pick {
            index,
            probability: table.weights[index] / total,
        })
    }

    /// As [`Selector::pick_sticky`] among the variants `usable` accepts: a key whose
    /// variant is ejected moves to the one that scores next (and comes back once its
    /// variant is ready again); `None` when none with weight is usable.
    pub fn pick_sticky_among(&self, key: &[u8], usable: &dyn Fn(usize) -> bool) -> Option<Pick> {
        let key_hash = stable_hash(key);
        let table = self.table.load();
        let mut best: Option<(f64, usize)> = None;
        let mut total = 0.0;
        for (i, (&w, &h)) in table
            .weights
            .iter()
            .zip(self.name_hashes.iter())
            .enumerate()
        {
            if w <= 0.0 || !usable(i) {
                continue;
            }
            total += w;
            let score = -unit(mix(key_hash ^ h)).ln() / w;
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, i));
            }
        }
        best.map(|(_, index)| Pick {
            index,
            probability: table.weights[index] / total,
        })
    }

    /// The variant for `key` by weighted rendezvous hashing.
    pub fn pick_sticky(&self, key: &[u8]) -> Pick {
        let key_hash = stable_hash(key);
        let table = self.table.load();
        let mut best = (f64::INFINITY, 0usize);
        for (i, (&w, &h)) in table
            .weights
            .iter()
            .zip(self.name_hashes.iter())
            .enumerate()
        {
            if w <= 0.0 {
                continue;
            }
            let score = -unit(mix(key_hash ^ h)).ln() / w;
            if score < best.0 {
                best = (score, i);
            }
        }
        Pick {
            index: best.1,
            probability: table.weights[best.1],
        }
    }
}

/// The golden-ratio step of SplitMix64: consecutive picks use well-spread inputs.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A uniform double in the open interval (0, 1).
fn unit(x: u64) -> f64 {
    ((x >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_among_ready_variants_renormalise_their_weights() {
        let s = selector(&[0.5, 0.25, 0.25], 7);
        let mut counts = [0usize; 3];
        let n = 40_000;
        for _ in 0..n {
            let p = s.pick_among(&|i| i != 0).unwrap();
            assert!((p.probability - 0.5).abs() < 1e-12, "{p:?}");
            counts[p.index] += 1;
        }
        assert_eq!(counts[0], 0, "the unready variant gets nothing");
        // 1 and 2 split evenly: 20,000 each, within 5 sigma (sigma = 100).
        assert!(counts[1].abs_diff(n / 2) < 500, "{counts:?}");
        assert!(s.pick_among(&|_| false).is_none());
        // Sticky keys of the unready variant move; the others stay.
        let mut moved = 0;
        for k in 0..2000u32 {
            let key = k.to_be_bytes();
            let home = s.pick_sticky(&key).index;
            let now = s.pick_sticky_among(&key, &|i| i != 0).unwrap().index;
            if home == 0 {
                moved += 1;
                assert_ne!(now, 0);
            } else {
                assert_eq!(now, home, "key {k} moved without cause");
            }
        }
        assert!(
            moved > 800,
            "about half the keys lived on variant 0: {moved}"
        );
    }

    fn selector(weights: &[f64], seed: u64) -> Selector {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("v{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Selector::new(&names, WeightTable::new(weights).unwrap(), seed)
    }

    /// Binomial tolerance: 5 standard deviations, so a correct sampler fails with
    /// probability below 1e-6 for any seed; the seed makes it fail never or always.
    fn within(count: usize, n: usize, p: f64) -> bool {
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        (count as f64 - mean).abs() <= 5.0 * sd.max(1.0)
    }

    #[test]
    fn random_picks_follow_the_weights() {
        let s = selector(&[97.0, 2.0, 1.0], 7);
        let n = 100_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            let p = s.pick();
            counts[p.index] += 1;
            assert!((p.probability - [0.97, 0.02, 0.01][p.index]).abs() < 1e-12);
        }
        for (i, p) in [0.97, 0.02, 0.01].into_iter().enumerate() {
            assert!(within(counts[i], n, p), "variant {i}: {counts:?}");
        }
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let s = selector(&[0.0, 1.0, 0.0], 1);
        assert!((0..10_000).all(|_| s.pick().index == 1));
        assert!((0..10_000u32).all(|k| s.pick_sticky(&k.to_le_bytes()).index == 1));
    }

    #[test]
    fn sticky_keys_follow_the_weights_and_stay_put() {
        let s = selector(&[60.0, 30.0, 10.0], 0);
        let n = 50_000;
        let mut counts = [0usize; 3];
        for k in 0..n {
            let key = format!("user-{k}");
            let a = s.pick_sticky(key.as_bytes()).index;
            assert_eq!(a, s.pick_sticky(key.as_bytes()).index);
            counts[a] += 1;
        }
        for (i, p) in [0.6, 0.3, 0.1].into_iter().enumerate() {
            assert!(within(counts[i], n, p), "variant {i}: {counts:?}");
        }
    }

    #[test]
    fn sticky_keys_move_in_proportion_to_the_weight_change() {
        let s = selector(&[50.0, 50.0], 0);
        let n = 50_000;
        let before: Vec<usize> = (0..n)
            .map(|k| s.pick_sticky(format!("k{k}").as_bytes()).index)
            .collect();
        s.set_weights(&[60.0, 40.0]).unwrap();
        let mut moved = 0;
        for (k, &old) in before.iter().enumerate() {
            let new = s.pick_sticky(format!("k{k}").as_bytes()).index;
            if new != old {
                // Only the variant that gained weight may gain keys.
                assert_eq!((old, new), (1, 0));
                moved += 1;
            }
        }
        // The minimum possible movement is 10% of keys.
        assert!(within(moved, n, 0.10), "moved {moved} of {n}");
    }

    #[test]
    fn bad_weight_tables_are_refused_and_the_old_one_kept() {
        let s = selector(&[1.0, 1.0], 0);
        assert_eq!(s.set_weights(&[0.0, 0.0]), Err(WeightError::ZeroSum));
        assert!(matches!(
            s.set_weights(&[f64::NAN, 1.0]),
            Err(WeightError::Invalid(_))
        ));
        assert!(matches!(
            s.set_weights(&[1.0]),
            Err(WeightError::Length { .. })
        ));
        assert_eq!(s.table().weights(), &[0.5, 0.5]);
    }

    #[test]
    fn the_same_seed_gives_the_same_choices() {
        let a = selector(&[1.0, 1.0, 1.0], 42);
        let b = selector(&[1.0, 1.0, 1.0], 42);
        let c = selector(&[1.0, 1.0, 1.0], 43);
        let run = |s: &Selector| (0..1000).map(|_| s.pick().index).collect::<Vec<_>>();
        let ra = run(&a);
        assert_eq!(ra, run(&b));
        assert_ne!(ra, run(&c));
    }
}
