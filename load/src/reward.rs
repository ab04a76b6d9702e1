//! Simulated revenue: `--reward a=bernoulli(0.05)*20 --reward b=normal(1.2,0.5)` draws a
//! value per answered request from its variant's distribution and posts it to
//! `/v1/feedback`, in batches, optionally after a delay, so a bandit can be watched
//! learning end to end.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::http1::Conn;
use crate::stats::FeedbackTotals;

/// A distribution of revenue, times a factor.
#[derive(Debug, Clone, PartialEq)]
pub struct Reward {
    dist: Dist,
    factor: f64,
}

#[derive(Debug, Clone, PartialEq)]
enum Dist {
    Bernoulli(f64),
    Normal(f64, f64),
    Uniform(f64, f64),
    Const(f64),
}

impl Reward {
    /// Parses `bernoulli(p)`, `normal(mean,sd)`, `uniform(lo,hi)`, `const(x)` or a number,
    /// optionally followed by `*factor`.
    pub fn parse(text: &str) -> Result<Reward, String> {
        let text = text.trim();
        let (dist_text, factor) = match text.rsplit_once('*') {
            Some((d, f)) => (
                d.trim(),
                f.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("`{f}` after `*` is not a number"))?,
            ),
            None => (text, 1.0),
        };
        let dist = if let Ok(x) = dist_text.parse::<f64>() {
            Dist::Const(x)
        } else {
            let (name, args) = dist_text
                .strip_suffix(')')
                .and_then(|t| t.split_once('('))
                .ok_or_else(|| {
                    format!("`{dist_text}`: write bernoulli(p), normal(mean,sd), uniform(lo,hi), const(x) or a number")
                })?;
            let args: Vec<f64> = args
                .split(',')
                .map(|a| a.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| format!("`{dist_text}`: the arguments must be numbers"))?;
            match (name.trim(), args.as_slice()) {
                ("bernoulli", [p]) if (0.0..=1.0).contains(p) => Dist::Bernoulli(*p),
                ("bernoulli", _) => {
                    return Err(format!(
                        "`{dist_text}`: bernoulli takes one probability in [0, 1]"
                    ))
                }
                ("normal", [m, s]) if *s >= 0.0 => Dist::Normal(*m, *s),
                ("normal", _) => {
                    return Err(format!(
                        "`{dist_text}`: normal takes a mean and a standard deviation ≥ 0"
                    ))
                }
                ("uniform", [a, b]) if a <= b => Dist::Uniform(*a, *b),
                ("uniform", _) => return Err(format!("`{dist_text}`: uniform takes lo ≤ hi")),
                ("const", [x]) => Dist::Const(*x),
                (other, _) => return Err(format!("unknown distribution `{other}`")),
            }
        };
        if !factor.is_finite() {
            return Err(format!("`{text}`: the factor must be finite"));
        }
        Ok(Reward { dist, factor })
    }

    /// True for a plain `bernoulli(p)`: posted as `converted`, for conversion bandits.
    pub fn is_conversion(&self) -> bool {
        matches!(self.dist, Dist::Bernoulli(_)) && self.factor == 1.0
    }

    /// One draw.
    pub fn sample(&self, rng: &mut StdRng) -> f64 {
        let x = match self.dist {
            Dist::Bernoulli(p) => f64::from(u8::from(rng.random::<f64>() < p)),
            Dist::Normal(m, s) => {
                // Box–Muller.
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random();
                m + s * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            }
            Dist::Uniform(a, b) => a + (b - a) * rng.random::<f64>(),
            Dist::Const(x) => x,
        };
        x * self.factor
    }
}

/// Parses the `--reward VARIANT=EXPR` list.
pub fn parse_rewards(items: &[String]) -> Result<BTreeMap<String, Reward>, String> {
    let mut out = BTreeMap::new();
    for item in items {
        let (name, expr) = item.split_once('=').ok_or_else(|| {
            format!("--reward `{item}`: write VARIANT=DISTRIBUTION, e.g. a=bernoulli(0.05)*20")
        })?;
        let r = Reward::parse(expr).map_err(|e| format!("--reward {name}: {e}"))?;
        if out.insert(name.trim().to_string(), r).is_some() {
            return Err(format!("--reward: variant `{name}` is given twice"));
        }
    }
    Ok(out)
}

/// One answered request to give feedback for.
#[derive(Debug)]
pub struct Answered {
    /// The `x-request-id` the generator sent.
    pub request_id: String,
    /// The variant that answered.
    pub variant: String,
    /// When it was answered.
    pub at: Instant,
}

/// Posts feedback for answered requests, `delay` after each, in batches of up to 256.
/// Ends when the sender is dropped and everything due has been posted.
pub async fn post_feedback(
    addr: String,
    host: String,
    rewards: BTreeMap<String, Reward>,
    delay: Duration,
    seed: u64,
    mut rx: mpsc::Receiver<Answered>,
) -> FeedbackTotals {
    let mut totals = FeedbackTotals::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pending: VecDeque<Answered> = VecDeque::new();
    let mut conn: Option<Conn> = None;
    let mut open = true;
    while open || !pending.is_empty() {
        // Take what has arrived; wait a little when there is nothing due.
        let next_due = pending.front().map(|a| a.at + delay);
        let wait = match next_due {
            Some(due) => due.saturating_duration_since(Instant::now()),
            None => Duration::from_millis(50),
        };
        if open {
            tokio::select! {
                got = rx.recv() => match got {
                    Some(a) => { pending.push_back(a); while let Ok(a) = rx.try_recv() { pending.push_back(a); } }
                    None => open = false,
                },
                _ = tokio::time::sleep(wait.max(Duration::from_millis(1))), if next_due.is_some() => {}
            }
        } else if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut items = Vec::new();
        while let Some(a) = pending.front() {
            if a.at + delay > now || batch.len() == 256 {
                break;
            }
            let a = pending
                .pop_front()
                .unwrap_or_else(|| unreachable!("front was Some"));
            let Some(reward) = rewards.get(&a.variant) else {
                continue;
            };
            let value = reward.sample(&mut rng);
            let e = totals.revenue.entry(a.variant.clone()).or_default();
            e.0 += value;
            e.1 += 1;
            items.push(if reward.is_conversion() {
                json!({ "request_id": a.request_id, "converted": value > 0.5 })
            } else {
                json!({ "request_id": a.request_id, "revenue": value })
            });
            batch.push(a);
        }
        if items.is_empty() {
            continue;
        }
        totals.sent += items.len() as u64;
        let body = json!({ "feedback": items }).to_string();
        let request = format!(
            "POST /v1/feedback HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut answered = None;
        for _attempt in 0..2 {
            if conn.as_ref().is_none_or(|c| !c.reusable()) {
                conn = Conn::connect(&addr, Duration::from_secs(5)).await.ok();
            }
            let Some(c) = conn.as_mut() else { break };
            match c.exchange(request.as_bytes(), true).await {
                Ok(r) => {
                    answered = Some(r);
                    break;
                }
                Err(_) => conn = None,
            }
        }
        let Some(resp) = answered else {
            totals.failed += items.len() as u64;
            continue;
        };
        let results = serde_json::from_slice::<Value>(&resp.body)
            .ok()
            .and_then(|v| v.get("results").and_then(Value::as_array).cloned());
        match results {
            Some(results) => {
                for r in results {
                    let status = r.get("status").and_then(Value::as_u64).unwrap_or(0) as u16;
                    if status == 200 {
                        totals.accepted += 1;
                    } else {
                        *totals.refused.entry(status).or_default() += 1;
                    }
                }
            }
            None => *totals.refused.entry(resp.status).or_default() += items.len() as u64,
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_parse_and_bad_ones_say_why() {
        let r = Reward::parse("bernoulli(0.05)*20").unwrap();
        assert_eq!(r.dist, Dist::Bernoulli(0.05));
        assert_eq!(r.factor, 20.0);
        assert!(!r.is_conversion());
        assert!(Reward::parse("bernoulli(0.3)").unwrap().is_conversion());
        assert_eq!(
            Reward::parse("normal(1.2, 0.5)").unwrap().dist,
            Dist::Normal(1.2, 0.5)
        );
        assert_eq!(Reward::parse("2.5").unwrap().dist, Dist::Const(2.5));
        for bad in [
            "bernoulli(2)",
            "normal(1)",
            "gamma(1,2)",
            "x*y",
            "uniform(3,1)",
        ] {
            assert!(Reward::parse(bad).is_err(), "{bad}");
        }
        assert!(parse_rewards(&["a".into()]).is_err());
        assert!(parse_rewards(&["a=1".into(), "a=2".into()]).is_err());
    }

    #[test]
    fn draws_have_the_stated_means_within_five_sigma() {
        let mut rng = StdRng::seed_from_u64(3);
        let n = 100_000;
        for (expr, mean, sd) in [
            ("bernoulli(0.05)*20", 1.0, (0.05f64 * 0.95).sqrt() * 20.0),
            ("normal(1.2,0.5)", 1.2, 0.5),
            ("uniform(0,2)", 1.0, 2.0 / 12f64.sqrt()),
        ] {
            let r = Reward::parse(expr).unwrap();
            let got = (0..n).map(|_| r.sample(&mut rng)).sum::<f64>() / n as f64;
            assert!(
                (got - mean).abs() < 5.0 * sd / (n as f64).sqrt(),
                "{expr}: {got}"
            );
        }
    }
}
