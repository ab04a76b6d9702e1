//! The seam fleet mode plugs into: a [`Ledger`] keeps the statistics all replicas
//! share, and this runtime exchanges each model's with it every `sync_interval`.
//!
//! What moves are additive deltas ([`ArmStats`]: a posterior's evidence and the
//! running totals), never a replica's whole state, so replicas never overwrite each
//! other. A replica's local state is the fleet's totals as of its last exchange plus
//! what it learned since; each exchange pushes that difference and takes the fleet's
//! new totals in return. A push carries a sequence number the ledger remembers per
//! replica, so a push repeated after a lost answer is applied once; until it is
//! answered the same push (same number, same deltas) is what is sent again, and what
//! is learned meanwhile waits for the next one. Deltas are sums per variant, so an
//! outage of any length costs no more memory than a second.
//!
//! Without a ledger (no `fleet:`) none of this runs: the bandits learn alone.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// One variant's statistics that add across replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArmStats {
    /// The posterior's evidence (`Posterior::evidence`).
    pub evidence: [f64; 3],
    /// Rewards learned.
    pub rewards: f64,
    /// Revenue (or conversions, or rewards) reported.
    pub revenue: f64,
    /// Cost of the predictions whose outcome is known.
    pub cost: f64,
    /// Decisions that expired without feedback.
    pub expired: f64,
}

/// The fields of [`ArmStats`], in the order [`ArmStats::values`] gives them: the
/// ledger's field names.
pub const STAT_NAMES: [&str; 7] = ["e0", "e1", "e2", "rewards", "revenue", "cost", "expired"];

impl ArmStats {
    /// The numbers, in [`STAT_NAMES`]' order.
    pub fn values(&self) -> [f64; 7] {
        let [a, b, c] = self.evidence;
        [a, b, c, self.rewards, self.revenue, self.cost, self.expired]
    }

    /// From numbers in [`STAT_NAMES`]' order.
    pub fn from_values(v: [f64; 7]) -> Self {
        ArmStats {
            evidence: [v[0], v[1], v[2]],
            rewards: v[3],
            revenue: v[4],
            cost: v[5],
            expired: v[6],
        }
    }

    fn zip(&self, o: &ArmStats, f: impl Fn(f64, f64) -> f64) -> ArmStats {
        let (a, b) = (self.values(), o.values());
        ArmStats::from_values(std::array::from_fn(|i| f(a[i], b[i])))
    }

    /// `self + o`.
    pub fn plus(&self, o: &ArmStats) -> ArmStats {
        self.zip(o, |a, b| a + b)
    }

    /// `self − o`.
    pub fn minus(&self, o: &ArmStats) -> ArmStats {
        self.zip(o, |a, b| a - b)
    }

    /// True when every number is 0.
    pub fn is_zero(&self) -> bool {
        self.values().iter().all(|x| *x == 0.0)
    }

    pub(crate) fn to_json(self) -> Value {
        Value::Object(
            STAT_NAMES
                .iter()
                .zip(self.values())
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect(),
        )
    }

    pub(crate) fn from_json(v: &Value) -> Option<ArmStats> {
        let mut out = [0.0; 7];
        for (i, k) in STAT_NAMES.iter().enumerate() {
            out[i] = v.get(*k)?.as_f64().filter(|x| x.is_finite())?;
        }
        Some(ArmStats::from_values(out))
    }
}

/// What one replica sends the ledger for one model at one exchange.
#[derive(Debug, Clone)]
pub struct Push {
    /// This replica's name (random at first start, kept in the state file), under
    /// which the ledger remembers its push numbers.
    pub replica: String,
    pub model: String,
    /// `conversion`, `revenue` or `profit`: statistics under another objective are
    /// another model's.
    pub objective: &'static str,
    pub variants: Vec<String>,
    /// 0: nothing to add, only read. Otherwise one more than this replica's last push
    /// for this model, or the same number again when its answer was lost.
    pub seq: u64,
    /// One per variant.
    pub deltas: Vec<ArmStats>,
    /// The fleet's totals as this replica last read them, one per variant: what the
    /// ledger starts from if it finds it has lost them (a Redis restarted without
    /// persistence), before adding the deltas.
    pub seed: Vec<ArmStats>,
    /// `half_life` in time: the ledger discounts the fleet's evidence by its own clock,
    /// once for all replicas.
    pub half_life: Option<Duration>,
    /// An operator's override set on this replica since the last exchange, as
    /// `/admin/state` shows it: it becomes the fleet's.
    pub set_override: Option<Value>,
}

/// The fleet's statistics for one model, after a push.
#[derive(Debug, Clone)]
pub struct Totals {
    /// One per variant of the push.
    pub arms: Vec<ArmStats>,
    /// The fleet's operator override (`null` when none was ever set).
    pub over: Value,
    /// How many pushes the fleet has taken for this model: replicas that read the same
    /// version hold the same statistics, and draw the same weights from them.
    pub version: u64,
}

/// An exchange in flight.
pub type Exchange<'a> = Pin<Box<dyn Future<Output = Result<Totals, String>> + Send + 'a>>;

/// Where the fleet's statistics are kept (the binary wires Redis here).
pub trait Ledger: Send + Sync + fmt::Debug {
    /// How often to exchange.
    fn interval(&self) -> Duration;
    /// Adds `push`'s deltas (unless its number was seen) and answers the totals. Must
    /// not wait for long: the exchange gives up at [`EXCHANGE_TIMEOUT`].
    fn exchange(&self, push: Push) -> Exchange<'_>;
    /// What `/admin/state` shows under `fleet`.
    fn status(&self) -> Value;
}

/// The longest one exchange may take before it counts as failed.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);

/// One model's side of the exchanges, kept in its learner (and its state file).
#[derive(Debug, Clone, Default)]
pub(crate) struct Synced {
    /// The local statistics right after the last exchange (the fleet's totals then),
    /// plus the deltas in flight: what is learned beyond it is pending.
    pub base: Vec<ArmStats>,
    /// The last push not yet answered: sent again, unchanged, until it is.
    pub unacked: Option<(u64, Vec<ArmStats>)>,
    /// The last push number used.
    pub seq: u64,
    /// The fleet's version at the last exchange, and the totals read then (what the
    /// weights are drawn from, so replicas that read the same version agree).
    pub version: Option<u64>,
    pub totals: Vec<ArmStats>,
    /// An operator's override waits to be pushed.
    pub override_pending: bool,
}

impl Synced {
    pub fn new(n: usize) -> Self {
        Synced {
            base: vec![ArmStats::default(); n],
            totals: vec![ArmStats::default(); n],
            ..Synced::default()
        }
    }

    /// For the state file (and a reload), by variant name.
    pub fn to_json(&self, variants: &[String]) -> Value {
        let by_name = |stats: &[ArmStats]| -> Value {
            Value::Object(
                variants
                    .iter()
                    .zip(stats)
                    .map(|(v, s)| (v.clone(), s.to_json()))
                    .collect::<Map<_, _>>(),
            )
        };
        json!({
            "seq": self.seq,
            "version": self.version,
            "base": by_name(&self.base),
            "totals": by_name(&self.totals),
            "unacked": self.unacked.as_ref().map(|(seq, d)| json!({ "seq": seq, "deltas": by_name(d) })),
        })
    }

    /// Restores what [`Synced::to_json`] wrote, for the variants that still exist (a new
    /// one starts at zero; a removed one's deltas in flight are dropped).
    pub fn from_json(v: &Value, variants: &[String]) -> Synced {
        let stats = |o: &Value| -> Vec<ArmStats> {
            variants
                .iter()
                .map(|name| ArmStats::from_json(&o[name.as_str()]).unwrap_or_default())
                .collect()
        };
        Synced {
            base: stats(&v["base"]),
            totals: stats(&v["totals"]),
            unacked: v["unacked"]["seq"]
                .as_u64()
                .map(|seq| (seq, stats(&v["unacked"]["deltas"]))),
            seq: v["seq"].as_u64().unwrap_or(0),
            version: v["version"].as_u64(),
            override_pending: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_add_subtract_and_round_trip() {
        let a = ArmStats::from_values([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        let b = ArmStats::from_values([0.5; 7]);
        assert_eq!(a.plus(&b).minus(&b), a);
        assert!(a.minus(&a).is_zero());
        assert_eq!(ArmStats::from_json(&a.to_json()), Some(a));
        let names = vec!["x".to_string(), "y".to_string()];
        let s = Synced {
            base: vec![a, b],
            totals: vec![b, a],
            unacked: Some((3, vec![a, a])),
            seq: 3,
            version: Some(9),
            override_pending: true,
        };
        let back = Synced::from_json(&s.to_json(&names), &names);
        assert_eq!((back.base, back.totals), (s.base.clone(), s.totals.clone()));
        assert_eq!(
            (back.unacked, back.seq, back.version),
            (s.unacked.clone(), 3, Some(9))
        );
        // A variant added since starts from nothing; one removed is dropped.
        let renamed = vec!["y".to_string(), "z".to_string()];
        let moved = Synced::from_json(&s.to_json(&names), &renamed);
        assert_eq!(moved.base, vec![b, ArmStats::default()]);
    }
}
