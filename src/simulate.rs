//! `switchyard simulate`: the bandit against seeded worlds and baselines, with no
//! network: a table, JSON for scripts, and an SVG of the bandit's weights over time.

use std::fmt::Write as _;

use serde_json::{json, Value};
use switchyard_bandit::simulate::{baselines, run, standard, Report, Strategy};
use switchyard_bandit::Objective;
use switchyard_config::{BanditMode, BanditSpec};

/// One world's results: its name, objective, and one row per strategy.
pub type Results = Vec<(String, &'static str, Vec<Row>)>;

/// One strategy's results over the seeds.
#[derive(Debug, Clone)]
pub struct Row {
    /// The mean over seeds (the weight history is the first seed's).
    pub mean: Report,
    /// The standard deviation of regret over seeds.
    pub regret_sd: f64,
    /// Runs, of those with a switch, whose traffic never reached 80% on the new best.
    pub never_recovered: usize,
}

/// The `bandit:` section a user who writes only `objective` gets, read through the
/// config crate so the simulator's defaults cannot drift from the product's.
pub fn default_spec(objective: Objective) -> BanditSpec {
    let name = objective_name(objective);
    let yaml = format!(
        "models:\n  m:\n    bandit: {{objective: {name}}}\n    variants:\n      - {{name: a, upstream: \"http://127.0.0.1:1\", weight: 1}}\n      - {{name: b, upstream: \"http://127.0.0.1:2\", weight: 1}}\n"
    );
    switchyard_config::from_yaml_str(&yaml)
        .ok()
        .and_then(|c| c.models.get("m").and_then(|m| m.bandit.clone()))
        .expect("a bandit with only an objective is a valid config")
}

/// Ours, in each world: the defaults first, then each guardrail or mode a user may turn
/// on, one at a time, so the regret each costs is stated beside the defaults.
pub fn ours(objective: Objective) -> Vec<Strategy> {
    let d = default_spec(objective);
    let with = |f: &dyn Fn(&mut BanditSpec)| {
        let mut b = d.clone();
        f(&mut b);
        crate::bandits::simulated(&b)
    };
    vec![
        crate::bandits::simulated(&d),
        with(&|b| b.warmup = 100),
        with(&|b| b.min_weight = 0.01),
        with(&|b| b.detect_changes = false),
        with(&|b| b.mode = BanditMode::Weights),
        with(&|b| {
            b.mode = BanditMode::Weights;
            b.max_step = 0.2;
        }),
        with(&|b| {
            // The defaults before learning kept up with traffic.
            b.mode = BanditMode::Weights;
            b.detect_changes = false;
            b.warmup = 100;
            b.min_weight = 0.01;
            b.max_step = 0.2;
        }),
    ]
}

fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::Conversion => "conversion",
        Objective::Revenue => "revenue",
        Objective::Profit => "profit",
    }
}

/// Runs every standard scenario for `requests` decisions at `rate` decisions per
/// second, once per seed in `seed..seed + seeds`, and averages regret and shares over
/// the runs (one run can mislead: single runs in these close worlds vary severalfold).
pub fn simulate(requests: u64, rate: f64, seed: u64, seeds: u64) -> Results {
    let seeds = seeds.max(1);
    standard(requests, rate)
        .into_iter()
        .map(|s| {
            let n = s.world.arms.len();
            let mut strategies = ours(s.objective);
            strategies.extend(baselines(s.objective));
            let rows = strategies
                .iter()
                .map(|st| {
                    let runs: Vec<Report> = (seed..seed + seeds)
                        .map(|sd| run(&s.world, st, s.objective, &vec![1.0; n], requests, sd))
                        .collect();
                    summarise(&runs)
                })
                .collect();
            (s.world.name, objective_name(s.objective), rows)
        })
        .collect()
}

/// The mean of `runs` (the first run's history) and the spread of their regret.
pub fn summarise(runs: &[Report]) -> Row {
    let k = runs.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Report) -> f64| runs.iter().map(f).sum::<f64>() / k;
    let regret = mean(&|r| r.regret);
    let after: Vec<f64> = runs.iter().filter_map(|r| r.share_after_switch).collect();
    let recovered: Vec<u64> = runs.iter().filter_map(|r| r.recovered_after).collect();
    Row {
        mean: Report {
            strategy: runs.first().map(|r| r.strategy.clone()).unwrap_or_default(),
            regret,
            share_on_best: mean(&|r| r.share_on_best),
            share_on_best_at_end: mean(&|r| r.share_on_best_at_end),
            share_after_switch: (!after.is_empty())
                .then(|| after.iter().sum::<f64>() / after.len() as f64),
            recovered_after: (!recovered.is_empty())
                .then(|| recovered.iter().sum::<u64>() / recovered.len() as u64),
            changes: runs.iter().map(|r| r.changes).sum(),
            history: runs.first().map(|r| r.history.clone()).unwrap_or_default(),
        },
        regret_sd: (mean(&|r| (r.regret - regret).powi(2))).sqrt(),
        never_recovered: runs
            .iter()
            .filter(|r| r.share_after_switch.is_some() && r.recovered_after.is_none())
            .count(),
    }
}

/// The results as a text table.
pub fn table(results: &Results, requests: u64, rate: f64, seeds: u64) -> String {
    let mut out = format!(
        "{requests} decisions per run at {rate} decisions/s, mean of {seeds} seeded run(s); regret = Σ(best expected payoff − chosen arm's), ± its standard deviation over seeds; best-arm share over the run, over its last tenth, and 4,000–5,000 decisions after a switch; decisions after a switch until a hundredth of the run has ≥ 80% on the new best (mean of the runs that got there; how many never did); changes the detector declared (all seeds)\n"
    );
    for (world, objective, rows) in results {
        let _ = writeln!(out, "\n{world} (objective: {objective})");
        let _ = writeln!(
            out,
            "  {:<66} {:>9} {:>8} {:>8} {:>7} {:>9} {:>16} {:>7}",
            "strategy",
            "regret",
            "±",
            "on best",
            "at end",
            "4-5k after",
            "recovered after",
            "changes"
        );
        for row in rows {
            let r = &row.mean;
            let recovery = r
                .share_after_switch
                .map_or("-".to_string(), |s| format!("{:.1}%", 100.0 * s));
            let recovered = match (r.recovered_after, row.never_recovered) {
                (_, _) if r.share_after_switch.is_none() => "-".to_string(),
                (Some(d), 0) => d.to_string(),
                (Some(d), never) => format!("{d} ({never} never)"),
                (None, never) => format!("never ({never})"),
            };
            let _ = writeln!(
                out,
                "  {:<66} {:>9.1} {:>8.1} {:>7.1}% {:>6.1}% {:>9} {:>16} {:>7}",
                r.strategy,
                r.regret,
                row.regret_sd,
                100.0 * r.share_on_best,
                100.0 * r.share_on_best_at_end,
                recovery,
                recovered,
                r.changes
            );
        }
    }
    out
}

/// The results as JSON, with the bandit's weight history.
pub fn to_json(results: &Results, requests: u64, rate: f64, seed: u64, seeds: u64) -> Value {
    json!({
        "requests": requests,
        "rate": rate,
        "seed": seed,
        "seeds": seeds,
        "worlds": results.iter().map(|(world, objective, reports)| json!({
            "name": world,
            "objective": objective,
            "results": reports.iter().map(|row| json!({
                "strategy": row.mean.strategy,
                "regret": row.mean.regret,
                "regret_sd": row.regret_sd,
                "share_on_best": row.mean.share_on_best,
                "share_on_best_at_end": row.mean.share_on_best_at_end,
                "share_after_switch": row.mean.share_after_switch,
                "recovered_after": row.mean.recovered_after,
                "never_recovered": row.never_recovered,
                "changes": row.mean.changes,
            })).collect::<Vec<_>>(),
            "bandit_shares": reports.first().map(|r| r.mean.history.iter().map(|(t, w)| json!({ "request": t, "shares": w })).collect::<Vec<_>>()),
        })).collect::<Vec<_>>(),
    })
}

/// One panel per world: the defaults' share of traffic per arm over time, one line
/// per arm.
pub fn svg(results: &Results) -> String {
    const W: f64 = 460.0;
    const H: f64 = 170.0;
    const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let rows = results.len().div_ceil(2);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
        2.0 * (W + 20.0),
        rows as f64 * (H + 50.0) + 10.0
    );
    s.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, (world, _, reports)) in results.iter().enumerate() {
        let (x0, y0) = (
            (i % 2) as f64 * (W + 20.0) + 40.0,
            (i / 2) as f64 * (H + 50.0) + 30.0,
        );
        let _ = write!(
            s,
            r#"<text x="{x0}" y="{}">{}</text>"#,
            y0 - 8.0,
            xml(world)
        );
        let _ = write!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{}" height="{H}" fill="none" stroke="#999"/>"##,
            W - 40.0
        );
        for (frac, label) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
            let y = y0 + H - frac * H;
            let _ = write!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#,
                x0 - 4.0,
                y + 4.0
            );
        }
        let Some(r) = reports.first().map(|row| &row.mean) else {
            continue;
        };
        let last = r.history.last().map_or(1, |(t, _)| *t).max(1) as f64;
        let arms = r.history.first().map_or(0, |(_, w)| w.len());
        for arm in 0..arms {
            let pts: Vec<String> = r
                .history
                .iter()
                .map(|(t, w)| {
                    format!(
                        "{:.1},{:.1}",
                        x0 + (*t as f64 / last) * (W - 40.0),
                        y0 + H - w[arm] * H
                    )
                })
                .collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                COLORS[arm % COLORS.len()],
                pts.join(" ")
            );
            let _ = write!(
                s,
                r#"<text x="{}" y="{}" fill="{}">arm {arm}</text>"#,
                x0 + W - 90.0,
                y0 + H / 2.0 + 12.0 * arm as f64,
                COLORS[arm % COLORS.len()]
            );
        }
        let _ = write!(
            s,
            r#"<text x="{x0}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">{} requests</text>"#,
            y0 + H + 14.0,
            x0 + W - 40.0,
            y0 + H + 14.0,
            last as u64
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_bandit::simulate::RECOVERY_WINDOW;

    /// The issue's bar for the defaults, through the config itself (`{objective}` and
    /// nothing else), at 10 and at 5,000 decisions per second, 20,000 decisions, seeds
    /// 1–10, common random numbers: in every world that stands still, regret within 2%
    /// of per-request Thompson sampling fed at once (the reference); in the world whose
    /// best arm changes, ≥ 80% of the traffic on the new best 4,000–5,000 decisions
    /// after the change (the new best was starved before it) and ≤ 0.7× the reference's
    /// regret. Why 2% and not 0: the defaults are that reference plus change
    /// detection, and a false alarm would cost a little re-exploration; none was seen
    /// here, so the two are equal, and a detector that fires on noise fails this.
    #[test]
    fn the_defaults_match_per_request_thompson_and_follow_a_change_at_any_rate() {
        const DECISIONS: u64 = 20_000;
        for rate in [10.0, 5000.0] {
            let scenarios = standard(DECISIONS, rate);
            std::thread::scope(|scope| {
                let runs: Vec<_> = scenarios
                    .iter()
                    .map(|sc| {
                        scope.spawn(move || {
                            let n = sc.world.arms.len();
                            let row = |st: &Strategy| {
                                let runs: Vec<Report> = (1..=10)
                                    .map(|seed| {
                                        run(&sc.world, st, sc.objective, &vec![1.0; n], DECISIONS, seed)
                                    })
                                    .collect();
                                summarise(&runs).mean
                            };
                            let defaults =
                                row(&crate::bandits::simulated(&default_spec(sc.objective)));
                            let reference = row(&Strategy::Thompson(sc.objective));
                            let name = &sc.world.name;
                            if sc.world.switch.is_some() {
                                let after = defaults.share_after_switch.unwrap_or(0.0);
                                assert!(
                                    after >= 0.8,
                                    "{name} at {rate}/s: {:.1}% on the new best {RECOVERY_WINDOW:?} after the change",
                                    100.0 * after
                                );
                                assert!(
                                    defaults.regret <= 0.7 * reference.regret,
                                    "{name} at {rate}/s: regret {:.1} vs the reference's {:.1}",
                                    defaults.regret,
                                    reference.regret
                                );
                            } else {
                                assert!(
                                    defaults.regret <= 1.02 * reference.regret,
                                    "{name} at {rate}/s: regret {:.1} vs the reference's {:.1}",
                                    defaults.regret,
                                    reference.regret
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
    }
}
