//! The bandits' state file and its JSON: what `/admin/state` shows is what is saved, and
//! what is read back is checked before it is believed.

use std::path::{Path, PathBuf};

use prometheus::IntCounter;
use serde_json::{json, Value};
use switchyard_bandit::policy::Override;
use switchyard_bandit::Posterior;

pub(super) fn posterior_json(p: &Posterior) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// A saved posterior, if it is one (non-finite numbers were saved as `null` and fail).
pub(super) fn posterior_from(v: &Value) -> Option<Posterior> {
    serde_json::from_value(v.clone()).ok()
}

pub(super) fn override_json(o: Override, variants: &[String]) -> Value {
    match o {
        Override::None => json!("none"),
        Override::Freeze => json!("freeze"),
        Override::Pin(i) => json!({ "pin": variants.get(i) }),
    }
}

pub(super) fn override_from(v: &Value, variants: &[String]) -> Override {
    match v {
        Value::String(s) if s == "freeze" => Override::Freeze,
        Value::Object(o) => o
            .get("pin")
            .and_then(Value::as_str)
            .and_then(|name| variants.iter().position(|v| v == name))
            .map_or(Override::None, Override::Pin),
        _ => Override::None,
    }
}

/// The saved state at `file`, checked: a missing file is a fresh start; a file that is
/// empty, not JSON, or holds values no run could have written (negative or non-finite
/// counts, wrong types) is never silently replaced: it is renamed
/// `<file>.corrupt-<unix time>`, an error is logged and counted, and the bandits start
/// fresh (the next save writes a new file beside the kept one).
pub(super) fn read_state(file: &Path, corrupt: &IntCounter) -> Value {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Value::Null,
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "Cannot read the bandit state file; starting the bandits fresh (the file is left as it is).");
            return Value::Null;
        }
    };
    let problem = match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) => match implausible(&v) {
            None => return v,
            Some(p) => p,
        },
        Err(e) => format!("not JSON: {e}"),
    };
    corrupt.inc();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = file.as_os_str().to_owned();
    aside.push(format!(".corrupt-{secs}"));
    let aside = PathBuf::from(aside);
    match std::fs::rename(file, &aside) {
        Ok(()) => {
            tracing::error!(file = %file.display(), kept = %aside.display(), %problem, "Bandit state file is corrupt; kept aside, starting the bandits fresh.")
        }
        Err(e) => {
            tracing::error!(file = %file.display(), %problem, error = %e, "Bandit state file is corrupt and cannot be moved aside; starting the bandits fresh.")
        }
    }
    Value::Null
}

/// Why `state` cannot be a file [`write_state`] wrote, if it cannot.
fn implausible(state: &Value) -> Option<String> {
    let models = match state.get("models") {
        Some(Value::Object(m)) => m,
        _ => return Some("no `models` object".into()),
    };
    for (model, m) in models {
        let Some(variants) = m.get("variants").and_then(Value::as_object) else {
            return Some(format!("model `{model}` has no `variants` object"));
        };
        for (variant, v) in variants {
            let at = |what: &str| format!("models.{model}.variants.{variant}.{what}");
            for key in ["rewards", "expired_without_feedback"] {
                if v.get(key).is_some_and(|n| n.as_u64().is_none()) {
                    return Some(format!("{} is not a count", at(key)));
                }
            }
            for key in ["revenue_total", "cost_total", "weight"] {
                if v.get(key)
                    .is_some_and(|n| !n.as_f64().is_some_and(f64::is_finite))
                {
                    return Some(format!("{} is not a finite number", at(key)));
                }
            }
            if v.get("weight")
                .and_then(Value::as_f64)
                .is_some_and(|w| w < 0.0)
            {
                return Some(format!("{} is negative", at("weight")));
            }
            if let Some(p) = v.get("posterior") {
                if posterior_from(p).is_none() {
                    return Some(format!("{} is not a posterior", at("posterior")));
                }
                if !all_finite_and_counts_non_negative(p) {
                    return Some(format!(
                        "{} holds a non-finite number or a negative count",
                        at("posterior")
                    ));
                }
            }
        }
    }
    None
}

/// Every number in `v` finite; counts and pseudo-counts not negative.
fn all_finite_and_counts_non_negative(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64().is_some_and(f64::is_finite),
        Value::Array(a) => a.iter().all(all_finite_and_counts_non_negative),
        Value::Object(o) => o.iter().all(|(k, x)| {
            all_finite_and_counts_non_negative(x)
                && !([
                    "alpha0",
                    "beta0",
                    "successes",
                    "failures",
                    "kappa0",
                    "n",
                    "sum_sq",
                ]
                .contains(&k.as_str())
                    && x.as_f64().is_some_and(|f| f < 0.0))
        }),
        Value::Null => false,
        _ => true,
    }
}

/// Writes `body` atomically: to `FILE.tmp`, then renamed over `FILE`, so a crash
/// mid-write never leaves a torn file.
pub(super) fn write_state(file: &Path, body: &str) {
    let tmp = file.with_extension("tmp");
    let result = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = result {
        tracing::error!(file = %file.display(), error = %e, "Cannot write the bandit state file; statistics will not survive a restart.");
    }
}
