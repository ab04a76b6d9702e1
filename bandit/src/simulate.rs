//! Seeded simulated worlds for judging a bandit without a network: how much it regrets
//! and how much traffic it gives the best variant, against simple baselines.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, LogNormal, Normal};

use crate::engine::{Bandit, BanditConfig};
use crate::objective::{Feedback, Objective};
use crate::posterior::Posterior;

/// One variant's true behaviour.
#[derive(Debug, Clone, PartialEq)]
pub enum ArmSpec {
    /// Converts with probability `p`, earning `value` per conversion.
    Bernoulli {
        /// Conversion probability.
        p: f64,
        /// Revenue per conversion.
        value: f64,
        /// Cost per prediction.
        cost: f64,
    },
    /// Converts with probability `p`, each conversion worth a log-normal order value
    /// (σ 1: one order in a hundred is worth ten times the median), less `cost` per
    /// prediction.
    HeavyTailed {
        /// Conversion probability.
        p: f64,
        /// Median order value (the mean is e^0.5 ≈ 1.65 times it).
        median: f64,
        /// Cost per prediction.
        cost: f64,
    },
    /// Earns a normally distributed revenue per prediction.
    Normal {
        /// Mean revenue.
        mean: f64,
        /// Its standard deviation.
        sd: f64,
        /// Cost per prediction.
        cost: f64,
    },
}

impl ArmSpec {
    fn cost(&self) -> f64 {
        match self {
            ArmSpec::Bernoulli { cost, .. }
            | ArmSpec::HeavyTailed { cost, .. }
            | ArmSpec::Normal { cost, .. } => *cost,
        }
    }

    /// Expected payoff under `objective`.
    fn payoff(&self, objective: Objective) -> f64 {
        let revenue = match self {
            ArmSpec::Bernoulli { p, value, .. } => p * value,
            ArmSpec::HeavyTailed { p, median, .. } => p * median * 0.5f64.exp(),
            ArmSpec::Normal { mean, .. } => *mean,
        };
        match objective {
            Objective::Profit => revenue - self.cost(),
            _ => revenue,
        }
    }

    fn draw(&self, rng: &mut StdRng) -> (f64, bool) {
        match self {
            ArmSpec::Bernoulli { p, value, .. } => {
                let c = rng.random::<f64>() < *p;
                (if c { *value } else { 0.0 }, c)
            }
            ArmSpec::HeavyTailed { p, median, .. } => {
                if rng.random::<f64>() < *p {
                    let value = LogNormal::new(median.ln(), 1.0).map_or(*median, |d| d.sample(rng));
                    (value, true)
                } else {
                    (0.0, false)
                }
            }
            ArmSpec::Normal { mean, sd, .. } => {
                let r = Normal::new(*mean, *sd).map_or(*mean, |n| n.sample(rng));
                (r, r > 0.0)
            }
        }
    }
}

/// A simulated world.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    /// For reports.
    pub name: String,
    /// The variants.
    pub arms: Vec<ArmSpec>,
    /// At request `t` the variants change to these (the best arm moves).
    pub switch: Option<(u64, Vec<ArmSpec>)>,
    /// Feedback arrives after a uniform 0..=`max_delay` further requests.
    pub max_delay: u64,
    /// Share of feedback that never arrives.
    pub missing: f64,
    /// Decisions per second: with the update cadence's `update_interval` and
    /// `max_delay_seconds`, what turns time into decisions.
    pub rate: f64,
    /// Feedback arrives a further uniform 0..`max_delay_seconds` later.
    pub max_delay_seconds: f64,
}

impl World {
    /// The same world at `rate` decisions per second.
    pub fn at_rate(&self, rate: f64) -> World {
        World {
            rate,
            ..self.clone()
        }
    }
}

/// How traffic is split.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// Our bandit as the sidecar runs it: each reward learned at once; weights
    /// recomputed every `update_every` rewards or `update_interval` seconds, whichever
    /// comes first; traffic split by those weights, or (`per_request`) by a posterior
    /// draw per decision, exploring uniformly with probability arms × `min_weight`.
    Bandit {
        /// The bandit's configuration.
        config: BanditConfig,
        /// Draw per decision instead of splitting by the published weights.
        per_request: bool,
        /// Rewards between weight updates, at most.
        update_every: u64,
        /// Seconds between weight updates, at most.
        update_interval: f64,
    },
    /// The reference: per-request Thompson sampling on our posteriors with every reward
    /// learned at once, no guardrails, no forgetting.
    Thompson(Objective),
    /// The configured weights, forever.
    Fixed,
    /// With probability ε a random arm, else the best empirical mean.
    EpsilonGreedy(f64),
    /// Beta–Bernoulli Thompson on rewards truncated to 0/1 (any reward below 1 is a
    /// failure), as Seldon's router does.
    SeldonThompson,
}

impl Strategy {
    /// A short name for tables.
    pub fn name(&self) -> String {
        match self {
            Strategy::Bandit {
                config,
                per_request,
                update_every,
                update_interval,
            } => {
                let g = &config.guardrails;
                let forget = match (config.detect, config.half_life) {
                    (Some(_), Some(h)) => format!(", detect, half-life {h}"),
                    (Some(_), None) => ", detect".into(),
                    (None, Some(h)) => format!(", half-life {h}"),
                    (None, None) => String::new(),
                };
                if *per_request {
                    format!(
                        "per-request(warmup {}, floor {}{forget})",
                        g.warmup, g.min_weight
                    )
                } else {
                    format!(
                        "weights(warmup {}, floor {}, step {}, every {update_every}/{update_interval}s{forget})",
                        g.warmup, g.min_weight, g.max_step
                    )
                }
            }
            Strategy::Thompson(_) => "thompson-per-request".into(),
            Strategy::Fixed => "fixed-split".into(),
            Strategy::EpsilonGreedy(e) => format!("epsilon-greedy({e})"),
            Strategy::SeldonThompson => "seldon-truncated-thompson".into(),
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Strategy name.
    pub strategy: String,
    /// Σ (best expected payoff − chosen arm's expected payoff).
    pub regret: f64,
    /// Share of all requests sent to the arm that was best at the time.
    pub share_on_best: f64,
    /// The same over the last tenth of the run.
    pub share_on_best_at_end: f64,
    /// Share of the decisions 4,000–5,000 after the world's switch that went to the new
    /// best arm (the recovery criterion); `None` without a switch in the run.
    pub share_after_switch: Option<f64>,
    /// Decisions from the world's switch to the end of the first snapshot window (a
    /// hundredth of the run) with at least 80% of its traffic on the new best arm;
    /// `None` without a switch, or if that never happened.
    pub recovered_after: Option<u64>,
    /// Changes the bandit's detector declared.
    pub changes: u64,
    /// (decision, shares) snapshots: each arm's share of the traffic since the last.
    pub history: Vec<(u64, Vec<f64>)>,
}

/// The decisions after a switch over which [`Report::share_after_switch`] is measured.
pub const RECOVERY_WINDOW: std::ops::Range<u64> = 4_000..5_000;

struct Pending {
    due: u64,
    arm: usize,
    revenue: f64,
    converted: bool,
}

/// Runs `strategy` for `horizon` requests in `world`, starting from `initial` weights,
/// judged by `objective`. Deterministic for a given `seed`.
pub fn run(
    world: &World,
    strategy: &Strategy,
    objective: Objective,
    initial: &[f64],
    horizon: u64,
    seed: u64,
) -> Report {
    // Common random numbers: the k-th decision draws from `rng`, the k-th pull of arm
    // i earns the same reward (and the same delay, the same fate of its feedback)
    // whichever strategy runs, and the weight updates' Monte Carlo has its own stream.
    // Strategies are then compared on the same luck, which is what makes ten seeds
    // enough to order them; and per-request Thompson sampling with nothing else on
    // makes the same decisions as the reference.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut update_rng = StdRng::seed_from_u64(seed ^ 0x005e_ed0f_u64);
    let mut arm_rngs: Vec<StdRng> = (0..world.arms.len() as u64)
        .map(|i| StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i + 1)))
        .collect();
    let n = world.arms.len();
    let mut arms = world.arms.clone();
    let mut bandit = match strategy {
        Strategy::Bandit { config, .. } => Some(Bandit::new(config.clone(), initial)),
        Strategy::Thompson(objective) => Some(Bandit::new(
            BanditConfig {
                objective: *objective,
                guardrails: crate::policy::Guardrails::OFF,
                draws: 1000,
                half_life: None,
                prior: None,
                detect: None,
            },
            initial,
        )),
        _ => None,
    };
    let rate = if world.rate > 0.0 { world.rate } else { 1.0 };
    let (mut since_update, mut updated_at) = (0u64, 0u64);
    let recovery = world
        .switch
        .as_ref()
        .map(|(at, _)| at + RECOVERY_WINDOW.start..at + RECOVERY_WINDOW.end);
    let mut on_best_recovery = 0u64;
    let total: f64 = initial.iter().sum();
    let fixed: Vec<f64> = initial.iter().map(|w| w / total).collect();
    let mut sums = vec![0.0; n];
    let mut counts = vec![0u64; n];
    let mut seldon: Vec<Posterior> = (0..n).map(|_| Posterior::beta(1.0, 1.0)).collect();
    let mut queue: VecDeque<Pending> = VecDeque::new();
    let mut regret = 0.0;
    let (mut on_best, mut on_best_end) = (0u64, 0u64);
    let end_from = horizon - horizon / 10;
    let snapshot_every = (horizon / 100).max(1);
    let mut window = vec![0u64; n];
    let mut history = Vec::new();

    for t in 0..horizon {
        if let Some((at, next)) = &world.switch {
            if t == *at {
                arms = next.clone();
            }
        }
        // Deliver the feedback that is due. The queue is not sorted by due time, so
        // scan it; it stays short (max_delay entries at most).
        let mut i = 0;
        while i < queue.len() {
            if queue[i].due <= t {
                let Some(p) = queue.remove(i) else { break };
                let cost = arms[p.arm].cost();
                let fb = match objective {
                    Objective::Conversion => Feedback {
                        converted: Some(p.converted),
                        ..Default::default()
                    },
                    _ => Feedback {
                        revenue: Some(p.revenue),
                        ..Default::default()
                    },
                };
                let reward = objective.reward(&fb, cost).unwrap_or(0.0);
                if let Some(b) = bandit.as_mut() {
                    b.observe(p.arm, reward);
                    since_update += 1;
                }
                sums[p.arm] += reward;
                counts[p.arm] += 1;
                seldon[p.arm].observe(if p.revenue >= 1.0 { 1.0 } else { 0.0 });
            } else {
                i += 1;
            }
        }
        // The update task: woken by `update_every` rewards or by `update_interval`.
        // Per-request decisions read the posteriors, never the published weights, so
        // their updates (P(best) for reports) are skipped here: same decisions, less
        // Monte Carlo.
        if let (
            Strategy::Bandit {
                update_every,
                update_interval,
                per_request: false,
                ..
            },
            Some(b),
        ) = (strategy, bandit.as_mut())
        {
            let seconds = (t - updated_at) as f64 / rate;
            if since_update >= (*update_every).max(1) || seconds >= *update_interval {
                b.update(&mut update_rng);
                since_update = 0;
                updated_at = t;
            }
        }
        let arm = match (strategy, bandit.as_ref()) {
            (
                Strategy::Bandit {
                    config,
                    per_request: true,
                    ..
                },
                Some(b),
            ) if b.steering() => {
                let explore = (config.guardrails.min_weight * n as f64).min(1.0);
                if explore > 0.0 && rng.random::<f64>() < explore {
                    (rng.random::<u64>() % n as u64) as usize
                } else {
                    b.pick(&mut rng)
                }
            }
            (Strategy::Bandit { .. }, Some(b)) => sample(b.weights(), &mut rng),
            (Strategy::Thompson(_), Some(b)) => b.pick(&mut rng),
            (Strategy::Bandit { .. } | Strategy::Thompson(_), None) => sample(&fixed, &mut rng),
            (Strategy::Fixed, _) => sample(&fixed, &mut rng),
            (Strategy::EpsilonGreedy(eps), _) => {
                if rng.random::<f64>() < *eps || counts.contains(&0) {
                    (rng.random::<u64>() % n as u64) as usize
                } else {
                    (0..n)
                        .max_by(|a, b| {
                            (sums[*a] / counts[*a] as f64)
                                .total_cmp(&(sums[*b] / counts[*b] as f64))
                        })
                        .unwrap_or(0)
                }
            }
            (Strategy::SeldonThompson, _) => crate::policy::thompson_pick(&seldon, &mut rng),
        };
        let payoffs: Vec<f64> = arms.iter().map(|a| a.payoff(objective)).collect();
        let best = (0..n)
            .max_by(|a, b| payoffs[*a].total_cmp(&payoffs[*b]))
            .unwrap_or(0);
        regret += payoffs[best] - payoffs[arm];
        if arm == best {
            on_best += 1;
            if t >= end_from {
                on_best_end += 1;
            }
            if recovery.as_ref().is_some_and(|r| r.contains(&t)) {
                on_best_recovery += 1;
            }
        }
        window[arm] += 1;
        let arm_rng = &mut arm_rngs[arm];
        let (revenue, converted) = arms[arm].draw(arm_rng);
        let (kept, delay_draw, delay_seconds_draw) = (
            arm_rng.random::<f64>(),
            arm_rng.random::<u64>(),
            arm_rng.random::<f64>(),
        );
        if kept >= world.missing {
            let mut delay = if world.max_delay == 0 {
                0
            } else {
                delay_draw % (world.max_delay + 1)
            };
            if world.max_delay_seconds > 0.0 {
                delay += (delay_seconds_draw * world.max_delay_seconds * rate) as u64;
            }
            queue.push_back(Pending {
                due: t + 1 + delay,
                arm,
                revenue,
                converted,
            });
        }
        if (t + 1) % snapshot_every == 0 {
            let shares: Vec<f64> = window
                .iter()
                .map(|c| *c as f64 / snapshot_every as f64)
                .collect();
            history.push((t + 1, shares));
            window.iter_mut().for_each(|c| *c = 0);
        }
    }
    Report {
        strategy: strategy.name(),
        regret,
        share_on_best: on_best as f64 / horizon as f64,
        share_on_best_at_end: on_best_end as f64 / (horizon - end_from).max(1) as f64,
        share_after_switch: recovery
            .filter(|r| r.end <= horizon)
            .map(|r| on_best_recovery as f64 / (r.end - r.start) as f64),
        recovered_after: world.switch.as_ref().and_then(|(at, next)| {
            let payoffs: Vec<f64> = next.iter().map(|a| a.payoff(objective)).collect();
            let best = (0..payoffs.len()).max_by(|a, b| payoffs[*a].total_cmp(&payoffs[*b]))?;
            history
                .iter()
                .find(|(t, shares)| *t > *at + snapshot_every && shares[best] >= 0.8)
                .map(|(t, _)| t - at)
        }),
        changes: bandit.as_ref().map_or(0, Bandit::changes),
        history,
    }
}

fn sample(weights: &[f64], rng: &mut StdRng) -> usize {
    let u = rng.random::<f64>();
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w;
        if u < acc {
            return i;
        }
    }
    weights.len().saturating_sub(1)
}

/// A named scenario: a world and the objective it is judged by.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The world.
    pub world: World,
    /// What is maximised.
    pub objective: Objective,
}

/// The request rate of the standard worlds unless one is asked for: what the issue's
/// HTTP measurements ran at.
pub const DEFAULT_RATE: f64 = 2000.0;

/// The standard scenarios of `switchyard simulate`, `bench/bandit.sh` and the world
/// tests, scaled to a run of `requests` at `rate` decisions per second (switches
/// happen half-way, delays are up to 2% of the run).
pub fn standard(requests: u64, rate: f64) -> Vec<Scenario> {
    let conv = |p| ArmSpec::Bernoulli {
        p,
        value: 20.0,
        cost: 0.0,
    };
    let normal = |mean| ArmSpec::Normal {
        mean,
        sd: 2.0,
        cost: 0.0,
    };
    let conversion = World {
        name: "conversion 5.0/5.5/6.0%, 20 per conversion".into(),
        arms: vec![conv(0.050), conv(0.055), conv(0.060)],
        switch: None,
        max_delay: 0,
        missing: 0.0,
        rate,
        max_delay_seconds: 0.0,
    };
    let scenario = |world, objective| Scenario { world, objective };
    vec![
        scenario(conversion.clone(), Objective::Conversion),
        scenario(
            World {
                name: "revenue: gaussian means 1.0/1.1/1.2, sd 2".into(),
                arms: vec![normal(1.0), normal(1.1), normal(1.2)],
                ..conversion.clone()
            },
            Objective::Revenue,
        ),
        scenario(
            World {
                name: "profit: revenue 1.30/1.10/1.00, cost 0.40/0.05/0.10".into(),
                arms: vec![
                    ArmSpec::Normal {
                        mean: 1.30,
                        sd: 1.0,
                        cost: 0.40,
                    },
                    ArmSpec::Normal {
                        mean: 1.10,
                        sd: 1.0,
                        cost: 0.05,
                    },
                    ArmSpec::Normal {
                        mean: 1.00,
                        sd: 1.0,
                        cost: 0.10,
                    },
                ],
                ..conversion.clone()
            },
            Objective::Profit,
        ),
        scenario(
            World {
                name: "profit, heavy-tailed order values: conversion 10/7/6%, cost 0.30/0.05/0.05"
                    .into(),
                // The most-converting arm is not the most profitable: 10% × 8.2 − 0.30 =
                // 0.52, 7% × 9.9 − 0.05 = 0.64, 6% × 9.9 − 0.05 = 0.54 per prediction.
                arms: vec![
                    ArmSpec::HeavyTailed {
                        p: 0.10,
                        median: 5.0,
                        cost: 0.30,
                    },
                    ArmSpec::HeavyTailed {
                        p: 0.07,
                        median: 6.0,
                        cost: 0.05,
                    },
                    ArmSpec::HeavyTailed {
                        p: 0.06,
                        median: 6.0,
                        cost: 0.05,
                    },
                ],
                ..conversion.clone()
            },
            Objective::Profit,
        ),
        scenario(
            World {
                name: "conversion, feedback delayed up to 2% of the run".into(),
                max_delay: (requests / 50).max(1),
                ..conversion.clone()
            },
            Objective::Conversion,
        ),
        scenario(
            World {
                name: "conversion, 30% of feedback missing".into(),
                missing: 0.3,
                ..conversion.clone()
            },
            Objective::Conversion,
        ),
        scenario(
            World {
                name: "conversion 10/5/5%, the starved 5% arm becomes the 10% one half-way".into(),
                arms: vec![conv(0.10), conv(0.05), conv(0.05)],
                switch: Some((requests / 2, vec![conv(0.05), conv(0.05), conv(0.10)])),
                ..conversion
            },
            Objective::Conversion,
        ),
    ]
}

/// The baselines every strategy of ours is compared with, the reference first.
pub fn baselines(objective: Objective) -> Vec<Strategy> {
    vec![
        Strategy::Thompson(objective),
        Strategy::Fixed,
        Strategy::EpsilonGreedy(0.1),
        Strategy::SeldonThompson,
    ]
}
