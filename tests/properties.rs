//! Seeded property tests of the two parsers not covered next to their code: the config
//! loader (what an operator writes) and the feedback parser (what an application posts).
//! Whatever the input: no panic, and every refusal is a located config error (exit 64
//! from the binary) or a 4xx.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use switchyard::router::feedback::{
    handle, Decision, DecisionLog, FeedbackError, FeedbackSink, FeedbackValues,
};

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.random_range(0..from.len())]
}

/// Scalars an operator (or a broken template) might write.
const SCALARS: &[&str] = &[
    "",
    "0",
    "1",
    "-1",
    "0.5",
    "1e308",
    "1e400",
    "-1e400",
    ".nan",
    ".inf",
    "~",
    "null",
    "yes",
    "[]",
    "{}",
    "\"x\"",
    "'unterminated",
    "127.0.0.1:0",
    "127.0.0.1:99999",
    "[::1]:0",
    "http://127.0.0.1:1",
    "ftp://x",
    "http://",
    "builtin:digits_mlp",
    "builtin:nope",
    "/etc/passwd",
    "5ms",
    "1s",
    "-5s",
    "10 parsecs",
    "99999999999999999999",
    "é",
    "💥",
    "&a 3",
    "*a",
    "*nowhere",
    "!!binary aGk=",
    "conversion",
    "profit",
    "per_request",
    "tract",
    "wgpu",
    "fused",
    "hash",
    "zero",
    "\"\\u0000\"",
];

/// Keys at each level, the real ones and near misses.
const TOP: &[&str] = &[
    "listen",
    "admin_listen",
    "max_body_bytes",
    "connect_timeout",
    "upstream_idle_timeout",
    "request_timeout",
    "drain_timeout",
    "client_header_timeout",
    "client_body_timeout",
    "client_send_timeout",
    "max_connections",
    "listen_backlog",
    "worker_threads",
    "seed",
    "state_file",
    "bandit",
    "models",
    "modles",
];
const MODEL: &[&str] = &[
    "variants",
    "sticky_header",
    "max_body_bytes",
    "request_timeout",
    "bandit",
    "shadows",
    "varients",
];
const VARIANT: &[&str] = &[
    "name",
    "upstream",
    "local",
    "upstream_model",
    "protocol",
    "weight",
    "cost_per_1k",
    "connect_timeout",
    "upstream_idle_timeout",
    "request_timeout",
    "wieght",
];
const LOCAL: &[&str] = &[
    "model",
    "runtime",
    "cpu_kernels",
    "gpu_adapter",
    "batching",
    "delay",
    "failure_rate",
    "version",
];
const BANDIT: &[&str] = &[
    "objective",
    "update_interval",
    "update_every",
    "min_weight",
    "max_step",
    "warmup",
    "feedback_ttl",
    "missing_feedback",
    "half_life",
    "prior",
    "mode",
    "decision_log_capacity",
];

fn scalar(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => rng.random::<i64>().to_string(),
        1 => format!(
            "{}",
            rng.random::<f64>() * 10f64.powi(rng.random_range(-10..40))
        ),
        _ => pick(rng, SCALARS).to_string(),
    }
}

fn mapping(rng: &mut StdRng, keys: &[&str], indent: usize, depth: u32, out: &mut String) {
    let pad = " ".repeat(indent);
    for _ in 0..rng.random_range(0..6) {
        let key = pick(rng, keys);
        out.push_str(&format!("{pad}{key}:"));
        match (key, depth) {
            ("models", d) if d > 0 => {
                out.push('\n');
                for m in 0..rng.random_range(0..3) {
                    out.push_str(&format!("{pad}  m{m}:\n"));
                    mapping(rng, MODEL, indent + 4, d - 1, out);
                }
            }
            ("variants", d) if d > 0 => {
                out.push('\n');
                for _ in 0..rng.random_range(0..4) {
                    out.push_str(&format!("{pad}  -\n"));
                    mapping(rng, VARIANT, indent + 4, d - 1, out);
                }
            }
            ("local", d) if d > 0 => {
                out.push('\n');
                mapping(rng, LOCAL, indent + 2, d - 1, out);
            }
            ("bandit", d) if d > 0 => {
                out.push('\n');
                mapping(rng, BANDIT, indent + 2, d - 1, out);
            }
            _ => out.push_str(&format!(" {}\n", scalar(rng))),
        }
    }
}

/// A valid file whose values are now and then replaced by a random scalar.
fn near_valid(rng: &mut StdRng) -> String {
    let mut v = |good: &str| {
        if rng.random_bool(0.1) {
            scalar(rng)
        } else {
            good.to_string()
        }
    };
    format!(
        "listen: {}\nrequest_timeout: {}\nbandit: {{decision_log_capacity: {}}}\nmodels:\n  m:\n    bandit: {{objective: {}, feedback_ttl: {}}}\n    variants:\n      - {{name: {}, upstream: \"{}\", weight: {}, cost_per_1k: {}}}\n      - {{name: b, local: {{model: \"{}\", batching: {{max_batch_size: {}}}}}, weight: {}}}\n",
        v("127.0.0.1:0"),
        v("2s"),
        v("1000"),
        v("profit"),
        v("10m"),
        v("a"),
        v("http://127.0.0.1:1"),
        v("1"),
        v("0.5"),
        v("builtin:digits_mlp"),
        v("8"),
        v("2"),
    )
}

/// A config document: mostly the right shape, with wrong values, near-miss keys, and
/// now and then bytes cut, duplicated or inserted.
fn document(rng: &mut StdRng) -> String {
    let mut text = String::new();
    if rng.random_bool(0.25) {
        text = near_valid(rng);
    } else {
        mapping(rng, TOP, 0, 4, &mut text);
    }
    if rng.random_bool(0.3) && !text.is_empty() {
        let mut bytes = text.into_bytes();
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..3) {
            0 => bytes.truncate(at),
            1 => {
                let end = (at + rng.random_range(0..40)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            _ => {
                let junk = [
                    b'\t', b':', b'-', b'[', b'{', b'&', b'*', b'"', b'\'', b'\n', b'%', 0xff,
                ];
                bytes.insert(at, junk[rng.random_range(0..junk.len())]);
            }
        }
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

#[test]
fn the_config_loader_never_panics_and_every_error_is_located() {
    let mut rng = StdRng::seed_from_u64(0x5EED_C0F1);
    let (mut valid, mut refused) = (0, 0);
    let mut kept_for_cli = Vec::new();
    for i in 0..20_000 {
        let text = document(&mut rng);
        let outcome = std::panic::catch_unwind(|| switchyard::config::from_yaml_str(&text));
        let Ok(outcome) = outcome else {
            panic!("document {i} panicked the loader:\n{text}");
        };
        match outcome {
            Ok(config) => {
                valid += 1;
                assert!(!config.models.is_empty(), "document {i}:\n{text}");
            }
            Err(errors) => {
                refused += 1;
                assert!(!errors.0.is_empty(), "document {i}");
                for e in &errors.0 {
                    assert!(
                        e.line >= 1 && e.column >= 1 && !e.message.is_empty(),
                        "document {i}: unlocated error {e:?}\n{text}"
                    );
                }
                if kept_for_cli.len() < 10 && i % 7 == 0 {
                    kept_for_cli.push(text);
                }
            }
        }
    }
    println!(
        "config loader: 20000 documents, {valid} valid, {refused} refused with located errors"
    );
    assert!(
        refused > 10_000,
        "the generator makes mostly wrong files: {refused}"
    );
    assert!(valid > 0, "and some right ones");
    // The binary turns every refusal into exit 64 with one line per error.
    let dir = std::env::temp_dir().join(format!("switchyard-props-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, text) in kept_for_cli.iter().enumerate() {
        let file = dir.join(format!("bad-{i}.yaml"));
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("validate")
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{text}");
        assert!(!out.stderr.is_empty());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Takes everything, and counts what it took per decision.
#[derive(Debug, Default)]
struct Counting(Mutex<HashMap<u64, u32>>);

impl FeedbackSink for Counting {
    fn accept(&self, d: &Decision, _: Duration, v: &FeedbackValues) -> Result<(), FeedbackError> {
        if v.revenue.is_some_and(|r| r < 0.0) {
            return Err(FeedbackError::Invalid("negative revenue".into()));
        }
        *self.0.lock().unwrap().entry(d.at_ms).or_default() += 1;
        Ok(())
    }
}

fn feedback_value(rng: &mut StdRng, ids: &[String]) -> serde_json::Value {
    use serde_json::{json, Value};
    let id = match rng.random_range(0..6) {
        0 => Value::from(rng.random::<i32>()),
        1 => Value::Null,
        2 => Value::from("not-recorded"),
        _ => Value::from(ids[rng.random_range(0..ids.len())].clone()),
    };
    let mut item = serde_json::Map::new();
    if rng.random_bool(0.9) {
        item.insert("request_id".into(), id);
    }
    for _ in 0..rng.random_range(0..3) {
        let key = ["revenue", "converted", "reward", "extra", "request_id"][rng.random_range(0..5)];
        let value = match rng.random_range(0..6) {
            0 => json!(true),
            1 => json!(-1.5),
            2 => json!("7"),
            3 => json!([1]),
            4 => Value::Null,
            _ => json!(rng.random::<f64>() * 100.0),
        };
        item.insert(key.into(), value);
    }
    Value::Object(item)
}

#[test]
fn the_feedback_parser_never_panics_and_nothing_counts_twice() {
    let mut rng = StdRng::seed_from_u64(0xFEED_BAC4);
    let log = DecisionLog::new(100_000);
    let start = Instant::now();
    // 500 decisions; `at_ms` tells them apart for the sink's count.
    let ids: Vec<String> = (0..500).map(|i| format!("decision-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let at = start + Duration::from_millis(i as u64);
        log.record(at, id.as_bytes(), 0, 0, 0.5, Duration::from_secs(3600));
    }
    let sink = Counting::default();
    let mut taken = 0;
    for i in 0..20_000 {
        let body: Vec<u8> = match rng.random_range(0..5) {
            0 => (0..rng.random_range(0..64))
                .map(|_| rng.random::<u8>())
                .collect(),
            1 => {
                let items: Vec<_> = (0..rng.random_range(0..20))
                    .map(|_| feedback_value(&mut rng, &ids))
                    .collect();
                serde_json::json!({ "feedback": items })
                    .to_string()
                    .into_bytes()
            }
            2 => {
                // A valid body cut short.
                let mut b = feedback_value(&mut rng, &ids).to_string().into_bytes();
                let keep = rng.random_range(0..=b.len());
                b.truncate(keep);
                b
            }
            _ => feedback_value(&mut rng, &ids).to_string().into_bytes(),
        };
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(&log, &sink, &body)));
        let Ok(outcome) = outcome else {
            panic!(
                "body {i} panicked the parser: {:?}",
                String::from_utf8_lossy(&body)
            );
        };
        match outcome {
            Ok((status, answer)) => {
                assert!(
                    [200, 400, 404, 409, 410, 503].contains(&status),
                    "body {i}: status {status}"
                );
                let v: serde_json::Value = serde_json::from_slice(&answer)
                    .unwrap_or_else(|e| panic!("body {i}: answer is not JSON: {e}"));
                let statuses: Vec<u64> = match v.get("results") {
                    Some(r) => r
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x["status"].as_u64().unwrap())
                        .collect(),
                    None => vec![v["status"].as_u64().unwrap_or(u64::from(status))],
                };
                taken += statuses.iter().filter(|s| **s == 200).count();
            }
            Err(e) => assert!(e.status().is_client_error(), "body {i}: {e}"),
        }
    }
    println!("feedback parser: 20000 bodies, {taken} feedbacks taken, no panic");
    let counts = sink.0.lock().unwrap();
    assert!(counts.values().all(|n| *n == 1), "a decision counted twice");
    assert_eq!(counts.len(), taken, "every 200 is one decision taken once");
    assert!(taken > 100, "the generator reaches valid feedback: {taken}");
}
