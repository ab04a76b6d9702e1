//! The bandit against seeded simulated worlds. Every run is deterministic for its seed;
//! the thresholds are the (≥ 95% on the best arm, lower regret than the
//! baselines, ≥ 90% on a new best arm) at horizons stated here.

use switchyard_bandit::policy::Guardrails;
use switchyard_bandit::simulate::{run, standard, strategies, ArmSpec, Report, Strategy, World};
use switchyard_bandit::{BanditConfig, Objective};

fn bandit(objective: Objective, half_life: Option<f64>) -> Strategy {
    Strategy::Bandit {
        config: BanditConfig {
            objective,
            guardrails: Guardrails {
                min_weight: 0.01,
                max_step: 0.2,
                warmup: 100,
            },
            draws: 1000,
            half_life,
            prior: None,
        },
        update_every: 1000,
    }
}

fn conversion_world(missing: f64, max_delay: u64) -> World {
    let arm = |p| ArmSpec::Bernoulli {
        p,
        value: 20.0,
        cost: 0.0,
    };
    World {
        name: "conversion 5.0/5.5/6.0%".into(),
        arms: vec![arm(0.050), arm(0.055), arm(0.060)],
        switch: None,
        max_delay,
        missing,
    }
}

fn report(world: &World, strategy: &Strategy, objective: Objective, horizon: u64) -> Report {
    run(
        world,
        strategy,
        objective,
        &[1.0, 1.0, 1.0],
        horizon,
        20261127,
    )
}

#[test]
fn most_traffic_reaches_the_best_conversion_arm() {
    // 3 arms 5.0 / 5.5 / 6.0%: by 600,000 requests at least 95% of the traffic in the
    // last tenth goes to the 6% arm (the floor keeps 1% on each of the others).
    let r = report(
        &conversion_world(0.0, 0),
        &bandit(Objective::Conversion, None),
        Objective::Conversion,
        600_000,
    );
    assert!(
        r.share_on_best_at_end >= 0.95,
        "{:.3}",
        r.share_on_best_at_end
    );
}

#[test]
fn the_bandit_regrets_less_than_the_baselines_in_every_world() {
    // The six worlds of `switchyard simulate` (conversion, Gaussian revenue, profit with
    // unequal costs, delayed feedback, missing feedback, best arm changing half-way), at
    // 300,000 decisions, mean regret over seeds 1–10, with the CLI's bandit settings.
    // Why so many: single runs in these close worlds vary by a factor of ten, and at
    // 100,000 decisions ε-greedy's fixed 10% exploration has not yet cost it enough for
    // the order to be stable over a handful of seeds (BENCHMARKS.md: 100 seeds at 100k
    // put the bandit ahead by only 4% with delayed feedback). At 300k over 20 seeds
    // (`switchyard simulate --requests 300000 --seeds 20`) its lead was 38–66%.
    const HORIZON: u64 = 300_000;
    let scenarios = standard(HORIZON);
    std::thread::scope(|scope| {
        let runs: Vec<_> = scenarios
            .iter()
            .map(|sc| {
                scope.spawn(move || {
                    let n = sc.world.arms.len();
                    let initial = vec![1.0; n];
                    let mean = |strategy: &Strategy| {
                        (1..=10)
                            .map(|seed| {
                                run(&sc.world, strategy, sc.objective, &initial, HORIZON, seed)
                                    .regret
                            })
                            .sum::<f64>()
                            / 10.0
                    };
                    let ours = mean(&strategies(sc.objective, sc.half_life)[0]);
                    for baseline in [Strategy::Fixed, Strategy::EpsilonGreedy(0.1)] {
                        let theirs = mean(&baseline);
                        assert!(
                            ours < theirs,
                            "{}: bandit regret {ours:.1} vs {} {theirs:.1}",
                            sc.world.name,
                            baseline.name(),
                        );
                    }
                })
            })
            .collect();
        for r in runs {
            if let Err(panic) = r.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

#[test]
fn profit_prefers_the_cheaper_arm_when_revenues_tie() {
    let world = World {
        name: "equal revenue, unequal cost".into(),
        arms: vec![
            ArmSpec::Normal {
                mean: 1.0,
                sd: 0.5,
                cost: 0.30,
            },
            ArmSpec::Normal {
                mean: 1.0,
                sd: 0.5,
                cost: 0.05,
            },
        ],
        switch: None,
        max_delay: 0,
        missing: 0.0,
    };
    let r = run(
        &world,
        &bandit(Objective::Profit, None),
        Objective::Profit,
        &[1.0, 1.0],
        50_000,
        7,
    );
    let last = &r.history.last().unwrap().1;
    assert!(last[1] > 0.9, "weights at the end: {last:?}");
}

#[test]
fn with_decay_the_bandit_follows_a_new_best_arm() {
    let arm = |p| ArmSpec::Bernoulli {
        p,
        value: 1.0,
        cost: 0.0,
    };
    let world = World {
        name: "best arm changes half-way".into(),
        arms: vec![arm(0.10), arm(0.05), arm(0.05)],
        switch: Some((200_000, vec![arm(0.05), arm(0.05), arm(0.10)])),
        max_delay: 0,
        missing: 0.0,
    };
    // Half-life of 2,000 observations per arm. Within 100,000 requests after the switch
    // (the last fifth of the run) at least 90% of the traffic is on the new best arm.
    let r = report(
        &world,
        &bandit(Objective::Conversion, Some(2000.0)),
        Objective::Conversion,
        300_000,
    );
    let after: Vec<&(u64, Vec<f64>)> = r.history.iter().filter(|(t, _)| *t >= 260_000).collect();
    assert!(!after.is_empty());
    for (t, w) in after {
        assert!(w[2] >= 0.9, "at request {t}: {w:?}");
    }
}

#[test]
fn seldon_truncation_cannot_learn_fractional_rewards() {
    // Rewards in (0, 1) (the best arm's mean is 6 sd below 1): Seldon-style truncation
    // counts every one as a failure, so it cannot tell the arms apart; our revenue
    // objective can.
    let normal = |mean| ArmSpec::Normal {
        mean,
        sd: 0.05,
        cost: 0.0,
    };
    let world = World {
        name: "fractional rewards".into(),
        arms: vec![normal(0.3), normal(0.5), normal(0.7)],
        switch: None,
        max_delay: 0,
        missing: 0.0,
    };
    let ours = report(
        &world,
        &bandit(Objective::Revenue, None),
        Objective::Revenue,
        50_000,
    );
    let seldon = report(
        &world,
        &Strategy::SeldonThompson,
        Objective::Revenue,
        50_000,
    );
    assert!(
        ours.share_on_best_at_end > 0.9,
        "{:.3}",
        ours.share_on_best_at_end
    );
    assert!(
        seldon.share_on_best_at_end < 0.5,
        "{:.3}",
        seldon.share_on_best_at_end
    );
}
