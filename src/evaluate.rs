//! `switchyard evaluate`: what another policy would have earned on the traffic the
//! bandit already served, estimated from the decisions file (`bandit.decisions_file`),
//! without running it.
//!
//! Every decision records the probability its variant was chosen with, so each logged
//! reward can be reweighted by how much more (or less) often a target policy π would
//! have chosen that variant: w = π(variant) / probability.
//! - **IPS** (inverse propensity scoring): the mean of w × reward. Unbiased when the
//!   probabilities are right and every variant π may choose was sometimes chosen;
//!   its variance grows with w.
//! - **SNIPS**: Σ w × reward / Σ w, the self-normalised form: a little biased, far
//!   steadier when some w are large.
//! - **DR** (doubly robust): a per-variant reward model r̂ (here each variant's mean
//!   reward in the log) gives Σ π(v) r̂(v), and w × (reward − r̂(variant)) corrects it:
//!   right if either the probabilities or the model are.
//!
//! Intervals are 95%, from the normal approximation (mean ± 1.96 standard errors of
//! the per-decision terms); with them, the effective sample size (Σw)² / Σw², which
//! says how much of the log a policy far from the logged one really uses. The file is
//! read twice, streaming (the reward model, then the estimates), so memory does not
//! grow with the log.
//!
//! Policies: `logged` (the bandit itself: its estimate is the logged mean, a check),
//! `uniform`, `pin:VARIANT`, `fixed:a=1,b=3` (a split, normalised). A policy that puts
//! weight on a variant the log never chose cannot be estimated and says so.
//!
//! Other bandit settings (`bandit:{objective: conversion, warmup: 100}`, any keys of a
//! model's `bandit:`) learn as they go, so no fixed weight applies: they are replayed
//! (Li et al., "Unbiased offline evaluation of contextual-bandit-based news article
//! recommendation algorithms", generalised to logged probabilities that are not
//! uniform). In log order the candidate bandit has its own probability π(v) of each
//! variant; a logged decision is accepted with probability c × π(variant) / probability,
//! c being the smallest logged probability, and only accepted decisions are rewards the
//! candidate sees and learns from. The accepted rewards are then a sample of what the
//! candidate would have earned; their mean and interval are the estimate, and how many
//! were accepted says how far the log lets it see (few, when the logging bandit had
//! converged and rarely chose some variant).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;

use serde_json::{json, Value};

/// A policy to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// The one that made the decisions.
    Logged,
    /// Every variant of the model (as seen in the log) equally.
    Uniform,
    /// Always this variant.
    Pin(String),
    /// A fixed split: variant → weight (normalised).
    Fixed(Vec<(String, f64)>),
    /// Other bandit settings, as a `bandit:` flow map; replayed.
    Bandit(String),
}

impl Policy {
    /// Parses `logged`, `uniform`, `pin:VARIANT` or `fixed:a=1,b=3`.
    pub fn parse(text: &str) -> Result<Policy, String> {
        let text = text.trim();
        match text.split_once(':') {
            None if text == "logged" => Ok(Policy::Logged),
            None if text == "uniform" => Ok(Policy::Uniform),
            Some(("pin", v)) if !v.trim().is_empty() => Ok(Policy::Pin(v.trim().to_string())),
            Some(("bandit", spec)) if spec.trim().starts_with('{') => {
                // Checked here against any two variants, so a typo is a usage error.
                bandit_spec(spec, &["a", "b"])?;
                Ok(Policy::Bandit(spec.trim().to_string()))
            }
            Some(("fixed", split)) => {
                let mut weights = Vec::new();
                for part in split.split(',') {
                    let (v, w) = part.split_once('=').ok_or_else(|| {
                        format!("`{part}`: write fixed:VARIANT=WEIGHT,VARIANT=WEIGHT")
                    })?;
                    let w: f64 = w
                        .trim()
                        .parse()
                        .ok()
                        .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                        .ok_or_else(|| format!("`{part}`: the weight must be a number ≥ 0"))?;
                    weights.push((v.trim().to_string(), w));
                }
                if weights.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
                    return Err(format!("`{text}`: the weights must have a positive sum"));
                }
                Ok(Policy::Fixed(weights))
            }
            _ => Err(format!(
                "`{text}`: a policy is logged, uniform, pin:VARIANT, fixed:VARIANT=WEIGHT,… or bandit:{{KEY: VALUE, …}}"
            )),
        }
    }

    fn name(&self) -> String {
        match self {
            Policy::Logged => "logged".into(),
            Policy::Uniform => "uniform".into(),
            Policy::Pin(v) => format!("pin:{v}"),
            Policy::Bandit(spec) => format!("bandit:{spec}"),
            Policy::Fixed(w) => format!(
                "fixed:{}",
                w.iter()
                    .map(|(v, x)| format!("{v}={x}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    /// π(variant) among `variants` (the model's, as logged); `None` for `Logged`.
    fn probability(&self, variant: &str, variants: &[&str]) -> Option<f64> {
        match self {
            Policy::Logged | Policy::Bandit(_) => None,
            Policy::Uniform => Some(1.0 / variants.len().max(1) as f64),
            Policy::Pin(v) => Some(f64::from(u8::from(v == variant))),
            Policy::Fixed(w) => {
                let total: f64 = w.iter().map(|(_, x)| x).sum();
                Some(
                    w.iter()
                        .filter(|(v, _)| v == variant)
                        .map(|(_, x)| x / total)
                        .sum(),
                )
            }
        }
    }

    /// The variants π may choose that the log never chose.
    fn unsupported(&self, variants: &[&str]) -> Vec<String> {
        let named: Vec<&str> = match self {
            Policy::Logged | Policy::Uniform | Policy::Bandit(_) => Vec::new(),
            Policy::Pin(v) => vec![v.as_str()],
            Policy::Fixed(w) => w
                .iter()
                .filter(|(_, x)| *x > 0.0)
                .map(|(v, _)| v.as_str())
                .collect(),
        };
        named
            .into_iter()
            .filter(|v| !variants.contains(v))
            .map(str::to_string)
            .collect()
    }
}

/// One line of the decisions file.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    model: String,
    variant: String,
    probability: f64,
    reward: f64,
    feedback: bool,
}

fn parse_line(text: &str) -> Option<Line> {
    let v: Value = serde_json::from_str(text).ok()?;
    let line = Line {
        model: v.get("model")?.as_str()?.to_string(),
        variant: v.get("variant")?.as_str()?.to_string(),
        probability: v.get("probability")?.as_f64()?,
        reward: v.get("reward")?.as_f64()?,
        feedback: v.get("feedback")?.as_bool()?,
    };
    (line.probability.is_finite() && line.reward.is_finite()).then_some(line)
}

/// Running sums of one per-decision term.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    n: f64,
    sum: f64,
    sum_sq: f64,
}

impl Sums {
    fn add(&mut self, x: f64) {
        self.n += 1.0;
        self.sum += x;
        self.sum_sq += x * x;
    }

    /// The mean and the half-width of its 95% interval.
    fn interval(&self) -> (f64, f64) {
        if self.n < 1.0 {
            return (f64::NAN, f64::NAN);
        }
        let mean = self.sum / self.n;
        let var = ((self.sum_sq - self.n * mean * mean) / (self.n - 1.0).max(1.0)).max(0.0);
        (mean, 1.96 * (var / self.n).sqrt())
    }
}

/// One policy's estimates on one model.
#[derive(Debug, Clone)]
pub struct Estimate {
    /// The policy, as given.
    pub policy: String,
    /// IPS mean and 95% half-width.
    pub ips: (f64, f64),
    /// SNIPS.
    pub snips: f64,
    /// DR mean and 95% half-width.
    pub dr: (f64, f64),
    /// Effective sample size.
    pub ess: f64,
    /// Variants π chooses that the log never did: when not empty, no estimate holds.
    pub unsupported: Vec<String>,
    /// For a replayed bandit: the decisions accepted (its estimate is in `ips`).
    pub replayed: Option<u64>,
}

/// One model's part of the log, and its estimates.
#[derive(Debug, Clone)]
pub struct ModelReport {
    /// The model.
    pub model: String,
    /// Decisions used.
    pub decisions: u64,
    /// Of which with feedback.
    pub with_feedback: u64,
    /// Each variant's decisions and mean reward in the log.
    pub variants: BTreeMap<String, (u64, f64)>,
    /// The estimates, one per policy.
    pub estimates: Vec<Estimate>,
}

/// What `evaluate` found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Lines that were not a decision (malformed, or a probability ≤ 0 or > 1).
    pub skipped: u64,
    /// Per model.
    pub models: Vec<ModelReport>,
}

/// Reads the decisions file at `path` (twice) and estimates each policy on each model
/// (or only `model`). `logged` is always estimated first.
pub fn evaluate(path: &Path, model: Option<&str>, policies: &[Policy]) -> Result<Report, String> {
    let lines = |f: &mut dyn FnMut(Line)| -> Result<u64, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut skipped = 0;
        for text in std::io::BufReader::new(file).lines() {
            let text = text.map_err(|e| format!("{}: {e}", path.display()))?;
            if text.trim().is_empty() {
                continue;
            }
            match parse_line(&text) {
                Some(l) if l.probability > 0.0 && l.probability <= 1.0 => {
                    if model.is_none_or(|m| m == l.model) {
                        f(l);
                    }
                }
                _ => skipped += 1,
            }
        }
        Ok(skipped)
    };
    // Pass 1: the reward model (each variant's mean reward) and the counts.
    let mut by_model: BTreeMap<String, (u64, u64, BTreeMap<String, Sums>)> = BTreeMap::new();
    let mut min_p: BTreeMap<String, f64> = BTreeMap::new();
    let skipped = lines(&mut |l| {
        let m = min_p.entry(l.model.clone()).or_insert(1.0);
        *m = m.min(l.probability);
        let e = by_model.entry(l.model).or_default();
        e.0 += 1;
        e.1 += u64::from(l.feedback);
        e.2.entry(l.variant).or_default().add(l.reward);
    })?;
    let mut all = vec![Policy::Logged];
    all.extend(policies.iter().filter(|p| **p != Policy::Logged).cloned());
    // Pass 2: per model and policy, the sums of the IPS and DR terms and of w.
    struct Acc {
        ips: Sums,
        dr: Sums,
        w: Sums,
        wr: f64,
    }
    let mut accs: BTreeMap<String, Vec<Acc>> = by_model
        .keys()
        .map(|m| {
            let v = all
                .iter()
                .map(|_| Acc {
                    ips: Sums::default(),
                    dr: Sums::default(),
                    w: Sums::default(),
                    wr: 0.0,
                })
                .collect();
            (m.clone(), v)
        })
        .collect();
    let direct: BTreeMap<String, Vec<f64>> = by_model
        .iter()
        .map(|(m, (_, _, vs))| {
            let names: Vec<&str> = vs.keys().map(String::as_str).collect();
            let values = all
                .iter()
                .map(|p| {
                    vs.iter()
                        .map(|(v, s)| {
                            p.probability(v, &names)
                                .unwrap_or(s.n / vs.values().map(|x| x.n).sum::<f64>())
                                * s.sum
                                / s.n.max(1.0)
                        })
                        .sum()
                })
                .collect();
            (m.clone(), values)
        })
        .collect();
    lines(&mut |l| {
        let (Some(acc), Some((_, _, vs)), Some(dm)) = (
            accs.get_mut(&l.model),
            by_model.get(&l.model),
            direct.get(&l.model),
        ) else {
            return;
        };
        let names: Vec<&str> = vs.keys().map(String::as_str).collect();
        let r_hat = vs.get(&l.variant).map_or(0.0, |s| s.sum / s.n.max(1.0));
        for (i, p) in all.iter().enumerate() {
            let w = p
                .probability(&l.variant, &names)
                .map_or(1.0, |pi| pi / l.probability);
            let a = &mut acc[i];
            a.ips.add(w * l.reward);
            a.w.add(w);
            a.wr += w * l.reward;
            // Under `logged`, the direct model is the log's mean and w is 1: DR is the
            // logged mean too.
            a.dr.add(dm[i] + w * (l.reward - r_hat));
        }
    })?;
    // Pass 3, once per bandit policy: the replay.
    let mut replays: BTreeMap<(usize, String), (Sums, u64)> = BTreeMap::new();
    for (i, p) in all.iter().enumerate() {
        let Policy::Bandit(spec) = p else { continue };
        let mut states: BTreeMap<String, Replay> = BTreeMap::new();
        for (m, (_, _, vs)) in &by_model {
            let names: Vec<&str> = vs.keys().map(String::as_str).collect();
            let c = min_p.get(m).copied().unwrap_or(1.0);
            states.insert(m.clone(), Replay::new(spec, &names, c)?);
        }
        lines(&mut |l| {
            if let Some(r) = states.get_mut(&l.model) {
                r.step(&l);
            }
        })?;
        for (m, r) in states {
            replays.insert((i, m), (r.rewards, r.accepted));
        }
    }
    let models = by_model
        .into_iter()
        .map(|(m, (decisions, with_feedback, vs))| {
            let names: Vec<&str> = vs.keys().map(String::as_str).collect();
            let estimates = all
                .iter()
                .zip(accs.remove(&m).unwrap_or_default())
                .enumerate()
                .map(|(i, (p, a))| match replays.get(&(i, m.clone())) {
                    Some((rewards, accepted)) => Estimate {
                        policy: p.name(),
                        ips: rewards.interval(),
                        snips: f64::NAN,
                        dr: (f64::NAN, f64::NAN),
                        ess: *accepted as f64,
                        unsupported: Vec::new(),
                        replayed: Some(*accepted),
                    },
                    None => Estimate {
                        policy: p.name(),
                        ips: a.ips.interval(),
                        snips: if a.w.sum > 0.0 {
                            a.wr / a.w.sum
                        } else {
                            f64::NAN
                        },
                        dr: a.dr.interval(),
                        ess: if a.w.sum_sq > 0.0 {
                            a.w.sum * a.w.sum / a.w.sum_sq
                        } else {
                            0.0
                        },
                        unsupported: p.unsupported(&names),
                        replayed: None,
                    },
                })
                .collect();
            ModelReport {
                model: m,
                decisions,
                with_feedback,
                variants: vs
                    .iter()
                    .map(|(v, s)| (v.clone(), (s.n as u64, s.sum / s.n.max(1.0))))
                    .collect(),
                estimates,
            }
        })
        .collect();
    Ok(Report { skipped, models })
}

/// A model's `bandit:` section from a flow map (`{objective: conversion, …}`), for a
/// model whose variants are `variants`: checked by the config crate, as in a file.
fn bandit_spec(spec: &str, variants: &[&str]) -> Result<switchyard_config::BanditSpec, String> {
    let mut yaml = format!("models:\n  m:\n    bandit: {spec}\n    variants:\n");
    for v in variants {
        let _ = writeln!(
            yaml,
            "      - {{name: {}, upstream: \"http://127.0.0.1:1\", weight: 1}}",
            serde_json::to_string(v).unwrap_or_default()
        );
    }
    let config = switchyard_config::from_yaml_str(&yaml)
        .map_err(|e| format!("bandit:{spec}: {}", e.render("bandit").trim_end()))?;
    config
        .models
        .get("m")
        .and_then(|m| m.bandit.clone())
        .ok_or_else(|| format!("bandit:{spec}: not a bandit"))
}

/// One candidate bandit replayed over one model's log.
struct Replay {
    bandit: switchyard_bandit::Bandit,
    per_request: bool,
    update_every: u64,
    since_update: u64,
    arm: BTreeMap<String, usize>,
    /// The acceptance scale: the smallest logged probability.
    c: f64,
    rng: rand::rngs::StdRng,
    /// The candidate's probability of each variant now, when known.
    pi: Option<Vec<f64>>,
    rewards: Sums,
    accepted: u64,
}

impl Replay {
    fn new(spec: &str, variants: &[&str], c: f64) -> Result<Replay, String> {
        use rand::SeedableRng;
        let b = bandit_spec(spec, variants)?;
        let config = switchyard_bandit_runtime::bandit_config(&b);
        Ok(Replay {
            bandit: switchyard_bandit::Bandit::new(config, &vec![1.0; variants.len()]),
            per_request: b.mode == switchyard_config::BanditMode::PerRequest,
            update_every: b.update_every,
            since_update: 0,
            arm: variants
                .iter()
                .enumerate()
                .map(|(i, v)| (v.to_string(), i))
                .collect(),
            c,
            rng: rand::rngs::StdRng::seed_from_u64(1),
            pi: None,
            rewards: Sums::default(),
            accepted: 0,
        })
    }

    fn step(&mut self, l: &Line) {
        use rand::RngExt;
        let Some(&a) = self.arm.get(&l.variant) else {
            return;
        };
        let pi = match &self.pi {
            Some(pi) => pi.clone(),
            None => {
                let pi = if self.per_request && self.bandit.steering() {
                    // Thompson sampling chooses each variant with its P(best).
                    let (arms, eligible) = (self.bandit.arms(), self.bandit.eligible());
                    switchyard_bandit::p_best_among(arms, eligible, 512, &mut self.rng)
                } else {
                    self.bandit.weights().to_vec()
                };
                self.pi = Some(pi.clone());
                pi
            }
        };
        let accept = self.c * pi[a] / l.probability;
        if self.rng.random::<f64>() >= accept {
            return;
        }
        self.bandit.observe(a, l.reward);
        self.rewards.add(l.reward);
        self.accepted += 1;
        self.since_update += 1;
        if self.per_request {
            self.pi = None;
        } else if self.since_update >= self.update_every.max(1) {
            self.bandit.update(&mut self.rng);
            self.since_update = 0;
            self.pi = None;
        }
    }
}

/// The report as a text table.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    if r.models.is_empty() {
        out.push_str("no decisions in the log\n");
    }
    for m in &r.models {
        let _ = writeln!(
            out,
            "model {}: {} decisions, {} with feedback; per variant (decisions, mean reward): {}",
            m.model,
            m.decisions,
            m.with_feedback,
            m.variants
                .iter()
                .map(|(v, (n, mean))| format!("{v} {n} {mean:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            out,
            "  {:<28} {:>22} {:>10} {:>22} {:>10}",
            "policy", "IPS (95%)", "SNIPS", "DR (95%)", "ESS"
        );
        for e in &m.estimates {
            if let Some(n) = e.replayed {
                let _ = writeln!(
                    out,
                    "  {:<28} replayed: {:.4} ± {:.4} per decision, over {n} accepted decisions",
                    e.policy, e.ips.0, e.ips.1
                );
                continue;
            }
            if !e.unsupported.is_empty() {
                let _ = writeln!(
                    out,
                    "  {:<28} cannot be estimated: the log never chose {}",
                    e.policy,
                    e.unsupported.join(", ")
                );
                continue;
            }
            let _ = writeln!(
                out,
                "  {:<28} {:>22} {:>10.4} {:>22} {:>10.0}",
                e.policy,
                format!("{:.4} ± {:.4}", e.ips.0, e.ips.1),
                e.snips,
                format!("{:.4} ± {:.4}", e.dr.0, e.dr.1),
                e.ess
            );
        }
    }
    if r.skipped > 0 {
        let _ = writeln!(out, "{} line(s) skipped: not a decision", r.skipped);
    }
    out
}

/// The report as JSON.
pub fn to_json(r: &Report) -> Value {
    let num = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
    json!({
        "skipped": r.skipped,
        "models": r.models.iter().map(|m| json!({
            "model": m.model,
            "decisions": m.decisions,
            "with_feedback": m.with_feedback,
            "variants": m.variants.iter().map(|(v, (n, mean))| (v.clone(), json!({"decisions": n, "mean_reward": mean}))).collect::<serde_json::Map<_, _>>(),
            "estimates": m.estimates.iter().map(|e| json!({
                "policy": e.policy,
                "ips": num(e.ips.0),
                "ips_half_width": num(e.ips.1),
                "snips": num(e.snips),
                "dr": num(e.dr.0),
                "dr_half_width": num(e.dr.1),
                "ess": num(e.ess),
                "unsupported": e.unsupported,
                "replayed": e.replayed,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    /// A log made by a known policy in a known world: 40,000 decisions split 60/30/10
    /// over variants converting at 5, 6 and 9%. Each policy's true value is computable
    /// (pin:c is 0.09; uniform is 0.0667; fixed a=1,b=1 is 0.055); the IPS and DR
    /// intervals cover it, and DR's is no wider than IPS's. Seeded: fails never or
    /// always.
    #[test]
    fn estimates_cover_what_each_policy_would_have_earned() {
        let dir = std::env::temp_dir().join(format!("sy-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        let mut rng = StdRng::seed_from_u64(42);
        let arms = [("a", 0.6, 0.05), ("b", 0.3, 0.06), ("c", 0.1, 0.09)];
        let mut text = String::new();
        for _ in 0..40_000 {
            let u = rng.random::<f64>();
            let (name, p, rate) = if u < 0.6 {
                arms[0]
            } else if u < 0.9 {
                arms[1]
            } else {
                arms[2]
            };
            let converted = rng.random::<f64>() < rate;
            let _ = writeln!(
                text,
                "{}",
                json!({"time_ms": 0, "model": "rec", "variant": name, "probability": p, "reward": f64::from(u8::from(converted)), "feedback": converted})
            );
        }
        text.push_str("not json\n");
        std::fs::write(&path, text).unwrap();
        let policies = [
            Policy::parse("pin:c").unwrap(),
            Policy::parse("uniform").unwrap(),
            Policy::parse("fixed:a=1,b=1").unwrap(),
            Policy::parse("pin:z").unwrap(),
        ];
        let r = evaluate(&path, None, &policies).unwrap();
        assert_eq!(r.skipped, 1);
        let m = &r.models[0];
        assert_eq!(m.decisions, 40_000);
        let truth = [0.0, 0.09, (0.05 + 0.06 + 0.09) / 3.0, 0.055];
        for (e, t) in m.estimates.iter().zip(truth).skip(1).take(3) {
            assert!(e.unsupported.is_empty(), "{}", e.policy);
            assert!(
                (e.ips.0 - t).abs() <= e.ips.1,
                "{}: IPS {:?} vs {t}",
                e.policy,
                e.ips
            );
            assert!(
                (e.dr.0 - t).abs() <= e.dr.1,
                "{}: DR {:?} vs {t}",
                e.policy,
                e.dr
            );
            assert!(
                e.dr.1 <= e.ips.1 * 1.0001,
                "{}: DR ± {} vs IPS ± {}",
                e.policy,
                e.dr.1,
                e.ips.1
            );
        }
        // The logged policy's estimate is the log's own mean reward.
        let logged = &m.estimates[0];
        let mean = m.variants.values().map(|(n, r)| *n as f64 * r).sum::<f64>() / 40_000.0;
        assert!((logged.ips.0 - mean).abs() < 1e-12 && (logged.dr.0 - mean).abs() < 1e-12);
        assert_eq!(m.estimates[4].unsupported, ["z"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Replay: a log made by a uniform split (40,000 decisions, conversion 5/5/9%)
    /// replays per-request Thompson sampling (the defaults) over about a third of its
    /// decisions, and its estimate matches what the same bandit earns when the
    /// simulator runs it for that many decisions in that world (mean of 20 seeds),
    /// within the estimate's 95% interval plus 0.005 (the simulator's own spread).
    #[test]
    fn a_bandit_is_replayed_to_what_it_would_have_earned() {
        use switchyard_bandit::simulate::{run, ArmSpec, World};
        let dir = std::env::temp_dir().join(format!("sy-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        let mut rng = StdRng::seed_from_u64(7);
        let rates = [("a", 0.05), ("b", 0.05), ("c", 0.09)];
        let mut text = String::new();
        for _ in 0..40_000 {
            let (name, rate) = rates[(rng.random::<u64>() % 3) as usize];
            let converted = rng.random::<f64>() < rate;
            let _ = writeln!(
                text,
                "{}",
                json!({"time_ms": 0, "model": "rec", "variant": name, "probability": 1.0 / 3.0, "reward": f64::from(u8::from(converted)), "feedback": true})
            );
        }
        std::fs::write(&path, text).unwrap();
        let r = evaluate(
            &path,
            None,
            &[Policy::parse("bandit:{objective: conversion}").unwrap()],
        )
        .unwrap();
        let e = &r.models[0].estimates[1];
        let accepted = e.replayed.unwrap();
        assert!((10_000..20_000).contains(&accepted), "{accepted} accepted");
        // The truth: the same bandit in the same world for `accepted` decisions.
        let spec = bandit_spec("{objective: conversion}", &["a", "b", "c"]).unwrap();
        let strategy = switchyard_bandit_runtime::simulated(&spec);
        let arm = |p| ArmSpec::Bernoulli {
            p,
            value: 1.0,
            cost: 0.0,
        };
        let world = World {
            name: "5/5/9%".into(),
            arms: vec![arm(0.05), arm(0.05), arm(0.09)],
            switch: None,
            max_delay: 0,
            missing: 0.0,
            rate: 2000.0,
            max_delay_seconds: 0.0,
        };
        let truth = (1..=20)
            .map(|seed| {
                let rep = run(
                    &world,
                    &strategy,
                    switchyard_bandit::Objective::Conversion,
                    &[1.0; 3],
                    accepted,
                    seed,
                );
                0.09 - rep.regret / accepted as f64
            })
            .sum::<f64>()
            / 20.0;
        assert!(
            (e.ips.0 - truth).abs() <= e.ips.1 + 0.005,
            "replayed {:?} vs simulated {truth}",
            e.ips
        );
        // And it is worth more than the uniform split that made the log.
        assert!(e.ips.0 > 0.0633 + e.ips.1, "{:?}", e.ips);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn policies_parse_or_say_how_to_write_them() {
        assert_eq!(Policy::parse("pin:b").unwrap(), Policy::Pin("b".into()));
        assert_eq!(
            Policy::parse("fixed:a=1, b=3").unwrap(),
            Policy::Fixed(vec![("a".into(), 1.0), ("b".into(), 3.0)])
        );
        for bad in [
            "pin:",
            "fixed:a",
            "fixed:a=-1",
            "fixed:a=0",
            "best",
            "fixed:a=x",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }
}
