//! Seeded simulated worlds for judging a bandit without a network: how much it regrets
//! and how much traffic it gives the best variant, against simple baselines.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Normal};

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
            ArmSpec::Bernoulli { cost, .. } | ArmSpec::Normal { cost, .. } => *cost,
        }
    }

    /// Expected payoff under `objective`.
    fn payoff(&self, objective: Objective) -> f64 {
        let revenue = match self {
            ArmSpec::Bernoulli { p, value, .. } => p * value,
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
}

/// How traffic is split.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// Our bandit: weights from P(best) and guardrails, published every `update_every`
    /// requests.
    Bandit {
        /// The bandit's configuration.
        config: BanditConfig,
        /// Requests between weight updates.
        update_every: u64,
    },
    /// Per-request Thompson sampling with our posteriors.
    Thompson(BanditConfig),
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
                update_every,
            } => {
                let g = &config.guardrails;
                format!(
                    "bandit(warmup {}, floor {}, step {}, every {update_every})",
                    g.warmup, g.min_weight, g.max_step
                )
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
    /// (request, weights) snapshots: the published weights for `Bandit`, the recent
    /// traffic share per arm for the others.
    pub history: Vec<(u64, Vec<f64>)>,
}

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
    let mut rng = StdRng::seed_from_u64(seed);
    let n = world.arms.len();
    let mut arms = world.arms.clone();
    let mut bandit = match strategy {
        Strategy::Bandit { config, .. } | Strategy::Thompson(config) => {
            Some(Bandit::new(config.clone(), initial))
        }
        _ => None,
    };
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
                }
                sums[p.arm] += reward;
                counts[p.arm] += 1;
                seldon[p.arm].observe(if p.revenue >= 1.0 { 1.0 } else { 0.0 });
            } else {
                i += 1;
            }
        }
        let arm = match strategy {
            Strategy::Bandit { .. } => sample(
                bandit.as_ref().map_or(&fixed[..], |b| b.weights()),
                &mut rng,
            ),
            Strategy::Thompson(_) => bandit.as_ref().map_or(0, |b| b.pick(&mut rng)),
            Strategy::Fixed => sample(&fixed, &mut rng),
            Strategy::EpsilonGreedy(eps) => {
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
            Strategy::SeldonThompson => crate::policy::thompson_pick(&seldon, &mut rng),
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
        }
        window[arm] += 1;
        let (revenue, converted) = arms[arm].draw(&mut rng);
        if rng.random::<f64>() >= world.missing {
            let delay = if world.max_delay == 0 {
                0
            } else {
                rng.random::<u64>() % (world.max_delay + 1)
            };
            queue.push_back(Pending {
                due: t + 1 + delay,
                arm,
                revenue,
                converted,
            });
        }
        if let Strategy::Bandit { update_every, .. } = strategy {
            if (t + 1) % update_every.max(&1) == 0 {
                if let Some(b) = bandit.as_mut() {
                    b.update(&mut rng);
                }
            }
        }
        if (t + 1) % snapshot_every == 0 {
            let shares = match (strategy, bandit.as_ref()) {
                (Strategy::Bandit { .. }, Some(b)) => b.weights().to_vec(),
                _ => window
                    .iter()
                    .map(|c| *c as f64 / snapshot_every as f64)
                    .collect(),
            };
            history.push((t + 1, shares));
            window.iter_mut().for_each(|c| *c = 0);
        }
    }
    Report {
        strategy: strategy.name(),
        regret,
        share_on_best: on_best as f64 / horizon as f64,
        share_on_best_at_end: on_best_end as f64 / (horizon - end_from).max(1) as f64,
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

/// A named scenario: a world, the objective it is judged by, and the bandit's decay.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The world.
    pub world: World,
    /// What is maximised.
    pub objective: Objective,
    /// The bandit's half-life (for drifting worlds).
    pub half_life: Option<f64>,
}

/// The standard scenarios of `switchyard simulate` and `bench/bandit.sh`, scaled to a
/// run of `requests` (switches happen half-way, delays are 2% of the run).
pub fn standard(requests: u64) -> Vec<Scenario> {
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
    };
    vec![
        Scenario {
            world: conversion.clone(),
            objective: Objective::Conversion,
            half_life: None,
        },
        Scenario {
            world: World {
                name: "revenue: gaussian means 1.0/1.1/1.2, sd 2".into(),
                arms: vec![normal(1.0), normal(1.1), normal(1.2)],
                ..conversion.clone()
            },
            objective: Objective::Revenue,
            half_life: None,
        },
        Scenario {
            world: World {
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
            objective: Objective::Profit,
            half_life: None,
        },
        Scenario {
            world: World {
                name: "conversion, feedback delayed up to 2% of the run".into(),
                max_delay: (requests / 50).max(1),
                ..conversion.clone()
            },
            objective: Objective::Conversion,
            half_life: None,
        },
        Scenario {
            world: World {
                name: "conversion, 30% of feedback missing".into(),
                missing: 0.3,
                ..conversion.clone()
            },
            objective: Objective::Conversion,
            half_life: None,
        },
        Scenario {
            world: World {
                name: "conversion, best arm changes half-way".into(),
                arms: vec![conv(0.060), conv(0.050), conv(0.050)],
                switch: Some((requests / 2, vec![conv(0.050), conv(0.050), conv(0.060)])),
                ..conversion
            },
            objective: Objective::Conversion,
            half_life: Some(2000.0),
        },
    ]
}

/// The strategies compared in each scenario, ours first: the bandit with the config's
/// defaults (`warmup` 100, `min_weight` 0.01, `max_step` 0.2, `update_every` 100), then
/// with one guardrail off at a time and with all off, so each one's regret is stated.
pub fn strategies(objective: Objective, half_life: Option<f64>) -> Vec<Strategy> {
    let defaults = crate::policy::Guardrails {
        min_weight: 0.01,
        max_step: 0.2,
        warmup: 100,
    };
    let config = |guardrails| BanditConfig {
        objective,
        guardrails,
        draws: 1000,
        half_life,
        prior: None,
    };
    let bandit = |guardrails| Strategy::Bandit {
        config: config(guardrails),
        update_every: 100,
    };
    vec![
        bandit(defaults.clone()),
        bandit(crate::policy::Guardrails {
            warmup: 0,
            ..defaults.clone()
        }),
        bandit(crate::policy::Guardrails {
            max_step: 1.0,
            ..defaults.clone()
        }),
        bandit(crate::policy::Guardrails {
            min_weight: 0.0,
            ..defaults.clone()
        }),
        bandit(crate::policy::Guardrails {
            min_weight: 0.0,
            max_step: 1.0,
            warmup: 0,
        }),
        Strategy::Thompson(config(defaults)),
        Strategy::Fixed,
        Strategy::EpsilonGreedy(0.1),
        Strategy::SeldonThompson,
    ]
}
