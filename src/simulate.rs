//! `switchyard simulate`: the bandit against seeded worlds and baselines, with no
//! network: a table, JSON for scripts, and an SVG of the bandit's weights over time.

use std::fmt::Write as _;

use serde_json::{json, Value};
use switchyard_bandit::simulate::{run, standard, strategies, Report};

/// Runs every standard scenario for `requests` decisions, once per seed in
/// `seed..seed + seeds`, and averages regret and shares over the runs (one run can
/// mislead: per-request Thompson sometimes locks onto an early leader when feedback is
/// delayed). The weight history is the first seed's.
pub fn simulate(requests: u64, seed: u64, seeds: u64) -> Vec<(String, &'static str, Vec<Report>)> {
    let seeds = seeds.max(1);
    standard(requests)
        .into_iter()
        .map(|s| {
            let n = s.world.arms.len();
            let reports = strategies(s.objective, s.half_life)
                .iter()
                .map(|st| {
                    let runs: Vec<Report> = (seed..seed + seeds)
                        .map(|sd| run(&s.world, st, s.objective, &vec![1.0; n], requests, sd))
                        .collect();
                    let k = runs.len() as f64;
                    let mean = |f: fn(&Report) -> f64| runs.iter().map(f).sum::<f64>() / k;
                    Report {
                        strategy: runs[0].strategy.clone(),
                        regret: mean(|r| r.regret),
                        share_on_best: mean(|r| r.share_on_best),
                        share_on_best_at_end: mean(|r| r.share_on_best_at_end),
                        history: runs[0].history.clone(),
                    }
                })
                .collect();
            let objective = match s.objective {
                switchyard_bandit::Objective::Conversion => "conversion",
                switchyard_bandit::Objective::Revenue => "revenue",
                switchyard_bandit::Objective::Profit => "profit",
            };
            (s.world.name, objective, reports)
        })
        .collect()
}

/// The results as a text table.
pub fn table(results: &[(String, &'static str, Vec<Report>)], requests: u64, seeds: u64) -> String {
    let mut out = format!(
        "{requests} decisions per run, mean of {seeds} seeded run(s); regret = Σ(best expected payoff − chosen arm's); best-arm share over the run and over its last tenth\n"
    );
    for (world, objective, reports) in results {
        let _ = writeln!(out, "\n{world} (objective: {objective})");
        let _ = writeln!(
            out,
            "  {:<52} {:>12} {:>10} {:>10}",
            "strategy", "regret", "on best", "at end"
        );
        for r in reports {
            let _ = writeln!(
                out,
                "  {:<52} {:>12.1} {:>9.1}% {:>9.1}%",
                r.strategy,
                r.regret,
                100.0 * r.share_on_best,
                100.0 * r.share_on_best_at_end
            );
        }
    }
    out
}

/// The results as JSON, with the bandit's weight history.
pub fn to_json(
    results: &[(String, &'static str, Vec<Report>)],
    requests: u64,
    seed: u64,
    seeds: u64,
) -> Value {
    json!({
        "requests": requests,
        "seed": seed,
        "seeds": seeds,
        "worlds": results.iter().map(|(world, objective, reports)| json!({
            "name": world,
            "objective": objective,
            "results": reports.iter().map(|r| json!({
                "strategy": r.strategy,
                "regret": r.regret,
                "share_on_best": r.share_on_best,
                "share_on_best_at_end": r.share_on_best_at_end,
            })).collect::<Vec<_>>(),
            "bandit_weights": reports.first().map(|r| r.history.iter().map(|(t, w)| json!({ "request": t, "weights": w })).collect::<Vec<_>>()),
        })).collect::<Vec<_>>(),
    })
}

/// One panel per world: the bandit's published weights over time, one line per arm.
pub fn svg(results: &[(String, &'static str, Vec<Report>)]) -> String {
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
        let Some(r) = reports.first() else { continue };
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
