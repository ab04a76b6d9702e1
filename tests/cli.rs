//! The command line: `validate` and `serve` on good and bad files; every example parses.

mod support;

use std::path::PathBuf;
use std::process::Command;

fn switchyard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const BAD: &str = "listen: nowhere\nmodels:\n  m:\n    variants:\n      - name: a\n        upstrem: http://127.0.0.1:1\n        weight: -2\n";

#[test]
fn validate_accepts_good_files_with_exit_0() {
    let out = switchyard()
        .args(["validate", "examples/canary.yaml"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("ok (1 model, 3 variants, 0 shadows, 0 bandits)"));
}

#[test]
fn validate_lists_every_error_with_line_and_path_and_exits_64() {
    let file = temp_file("bad.yaml", BAD);
    let out = switchyard().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    for expected in [
        format!("{f}:1:9: listen:"),
        format!("{f}:5:9: models.m.variants[0]: give the variant either `upstream` (a model server's URL) or `local` (a model run in-process)"),
        format!("{f}:6:9: models.m.variants[0].upstrem: unknown key `upstrem`; did you mean `upstream`?"),
        format!("{f}:7:17: models.m.variants[0].weight: must be ≥ 0"),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    assert_eq!(err.lines().count(), 4, "{err}");
}

#[test]
fn validate_and_serve_refuse_missing_files_and_bad_files_with_64() {
    let out = switchyard()
        .args(["validate", "/nonexistent/switchyard.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));

    let file = temp_file("bad-serve.yaml", BAD);
    let out = switchyard()
        .arg("serve")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key `upstrem`"));
}

/// `validate` refuses what `serve` would refuse: a readable file that is not a model,
/// and weights whose sum overflows (both passed `validate` once); `serve` refuses the
/// same files with the same exit code.
#[test]
fn validate_runs_the_checks_serve_runs() {
    let cases = [
        (
            "not-a-model.yaml",
            "models:\n  m:\n    variants: [{name: a, weight: 1, local: {model: /etc/passwd}}]\n",
            "models.m.variants[0].local.model",
        ),
        (
            "huge-weights.yaml",
            "models:\n  m:\n    variants:\n      - {name: a, upstream: \"http://127.0.0.1:1\", weight: 1e308}\n      - {name: b, upstream: \"http://127.0.0.1:1\", weight: 1e308}\n",
            "models.m.variants: the weights of a model add up to more than a number can hold",
        ),
    ];
    for (name, yaml, expected) in cases {
        let file = temp_file(name, yaml);
        for args in [vec!["validate"], vec!["serve", "--config"]] {
            let out = switchyard().args(&args).arg(&file).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{args:?} {name}: {err}");
            assert!(err.contains(expected), "{args:?} {name}: {err}");
        }
    }
}

/// The bundled MLP with its first `Relu` made a `Softplus`: a valid ONNX graph with one
/// operator outside the fused kernels.
fn mlp_with_a_softplus() -> Vec<u8> {
    use prost::Message;
    let mut model =
        switchyard_inference::onnx::decode(include_bytes!("../models/digits_mlp.onnx")).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let relu = graph.node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
    relu.op_type = "Softplus".into();
    model.encode_to_vec()
}

/// A build without the `tract` feature (the default) runs local models on the fused
/// kernels only: a graph outside them is refused by `validate` and `serve` alike, naming
/// the operator and the feature; with the feature it loads.
#[test]
fn a_graph_outside_the_fused_kernels_needs_the_tract_feature() {
    let model =
        std::env::temp_dir().join(format!("switchyard-softplus-{}.onnx", std::process::id()));
    std::fs::write(&model, mlp_with_a_softplus()).unwrap();
    let file = temp_file(
        "softplus.yaml",
        &format!(
            "models:\n  m:\n    variants: [{{name: a, weight: 1, local: {{model: {}}}}}]\n",
            model.display()
        ),
    );
    let out = switchyard().arg("validate").arg(&file).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "tract") {
        assert_eq!(out.status.code(), Some(0), "{err}");
    } else {
        assert_eq!(out.status.code(), Some(64), "{err}");
        for want in [
            "models.m.variants[0].local.model",
            "`Softplus`",
            "--features tract",
        ] {
            assert!(err.contains(want), "lacks {want:?}: {err}");
        }
    }
    // With tract, `serve` would serve the model: validate's exit 0 says enough.
    if !cfg!(feature = "tract") {
        let out = switchyard()
            .args(["serve", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features tract"));
    }
    std::fs::remove_file(&model).ok();
}

/// Every problem in one run, from either command: the config's own rules and the model
/// files, even when both are wrong in one variant.
#[test]
fn every_problem_is_reported_together_even_two_in_one_variant() {
    let file = temp_file(
        "two-problems.yaml",
        "models:\n  m:\n    variants:\n      - {name: a, local: {model: /etc/passwd}, weight: -1}\n      - {name: b, upstream: \"ftp://x\", weight: 1, cost_per_1k: -2}\n      - {name: c, local: {model: /nonexistent/model.onnx}, weight: 1}\n",
    );
    for args in [vec!["validate"], vec!["serve", "--config"]] {
        let out = switchyard().args(&args).arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains("models.m")).collect();
        let expected = [
            "4:34: models.m.variants[0].local.model: cannot load model `/etc/passwd`",
            "4:56: models.m.variants[0].weight: must be ≥ 0, found -1",
            "5:29: models.m.variants[1].upstream:",
            "5:64: models.m.variants[1].cost_per_1k: must be ≥ 0, found -2",
            "6:34: models.m.variants[2].local.model: cannot read model file",
        ];
        assert_eq!(lines.len(), expected.len(), "{args:?}: {err}");
        for (line, want) in lines.iter().zip(expected) {
            assert!(
                line.contains(want),
                "{args:?}: {line:?} lacks {want:?}\n{err}"
            );
        }
    }
}

#[test]
fn every_example_config_parses() {
    let mut checked = 0;
    for entry in std::fs::read_dir("examples").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = switchyard::config::from_yaml_str(&text) {
                panic!(
                    "{} is invalid:\n{}",
                    path.display(),
                    e.render(&path.display().to_string())
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} examples found");
    // The built-in config is one of them, and it is what `serve` uses by default.
    assert_eq!(
        switchyard::DEFAULT_CONFIG,
        std::fs::read_to_string("examples/default.yaml").unwrap()
    );
}

#[test]
fn simulate_reports_every_world_and_strategy_as_json_and_svg() {
    let svg = temp_file("weights.svg", "");
    let out = switchyard()
        .args([
            "simulate",
            "--requests",
            "3000",
            "--seeds",
            "2",
            "--json",
            "--svg",
        ])
        .arg(&svg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 3000);
    let worlds = v["worlds"].as_array().unwrap();
    assert_eq!(worlds.len(), 7);
    for w in worlds {
        let names: Vec<&str> = w["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["strategy"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                // The defaults, then each guardrail or mode a user may choose.
                "per-request(warmup 0, floor 0, detect)",
                "per-request(warmup 100, floor 0, detect)",
                "per-request(warmup 0, floor 0.01, detect)",
                "per-request(warmup 0, floor 0)",
                "weights(warmup 0, floor 0, step 1, every 100/1s, detect)",
                "weights(warmup 0, floor 0, step 0.2, every 100/1s, detect)",
                "weights(warmup 100, floor 0.01, step 0.2, every 100/1s)",
                "thompson-per-request",
                "fixed-split",
                "epsilon-greedy(0.1)",
                "seldon-truncated-thompson"
            ]
        );
        // A fixed 1/3 split is on the best of three arms about a third of the time.
        let fixed = w["results"][8]["share_on_best"].as_f64().unwrap();
        assert!((fixed - 1.0 / 3.0).abs() < 0.05, "{fixed}");
    }
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<polyline").count(),
        7 * 3,
        "one line per arm per world"
    );
}

/// `evaluate` reads a decisions file and prints each policy's estimates; a bad policy
/// is a usage error (64) that says how to write one, a missing file 66.
#[test]
fn evaluate_estimates_policies_from_a_decisions_file() {
    let mut text = String::new();
    // Logged 50/50; a converts 1 time in 4, b 3 times in 4.
    for i in 0..400 {
        let (variant, converted) = if i % 2 == 0 {
            ("a", i % 8 == 0)
        } else {
            ("b", i % 8 != 1)
        };
        text.push_str(&format!(
            "{{\"time_ms\":0,\"model\":\"rec\",\"variant\":\"{variant}\",\"probability\":0.5,\"reward\":{},\"feedback\":true}}\n",
            u8::from(converted)
        ));
    }
    let log = temp_file("decisions.jsonl", &text);
    let out = switchyard()
        .args([
            "evaluate",
            "--json",
            "--policy",
            "pin:b",
            "--policy",
            "fixed:a=1,b=3",
            "--log",
        ])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let est = &v["models"][0]["estimates"];
    let names: Vec<&str> = est
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["policy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["logged", "pin:b", "fixed:a=1,b=3"]);
    // With these exact shares every estimator is exact: 0.5, 0.75, 0.25/4 + 0.75·3/4.
    for (e, want) in est.as_array().unwrap().iter().zip([0.5, 0.75, 0.625]) {
        for k in ["ips", "snips", "dr"] {
            assert!(
                (e[k].as_f64().unwrap() - want).abs() < 1e-9,
                "{} {k}: {e}",
                e["policy"]
            );
        }
    }
    let bad = switchyard()
        .args(["evaluate", "--policy", "best", "--log"])
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("pin:VARIANT"));
    let missing = switchyard()
        .args(["evaluate", "--log", "/nonexistent/decisions.jsonl"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(66));
}

/// `serve --listen` and `--admin-listen` override the file (the file's ports are taken
/// here, so only the overrides can work); the two may not be the same port.
#[test]
fn serve_listen_flags_override_the_file() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let also = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let file = temp_file(
        "taken.yaml",
        &format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: {}\nmodels:\n  m:\n    variants: [{{name: a, local: {{model: \"builtin:digits_mlp\"}}, weight: 1}}]\n",
            also.local_addr().unwrap()
        ),
    );
    let out = switchyard()
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "the file's ports are taken");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
    let mut child = switchyard()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(first.contains("data=127.0.0.1:"), "{first}");
    assert!(!first.contains(&format!(":{port} ")), "{first}");
    let out = switchyard()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:7001",
            "--admin-listen",
            "127.0.0.1:7001",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("its own port"));
}

/// No short flag means two things: `serve -c` is gone (`load -c` is the concurrency);
/// `--help` says how to set the log level; a missing model file names the built-ins.
#[test]
fn flags_help_and_hints() {
    let out = switchyard()
        .args(["serve", "-c", "x.yaml"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap refuses the unknown short flag"
    );
    let help = switchyard().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("SWITCHYARD_LOG"));
    let out = switchyard()
        .args([
            "model-server",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "models/nowhere.onnx",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("builtin:digits_mlp"), "{err}");
}

/// `serve --config file`, logging at `info`, once it listens, and its log lines.
fn serve_with_log(
    file: &std::path::Path,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let (child, _, log) = support::spawn_switchyard_logged(
        [
            std::ffi::OsStr::new("serve"),
            "--config".as_ref(),
            file.as_os_str(),
        ],
        &[("SWITCHYARD_LOG", "info")],
    );
    (child, log)
}

/// The times the log says a model was loaded (each load logs which kernels run it).
fn loads(log: &[String], model: &str) -> usize {
    log.iter()
        .filter(|l| l.contains("Model runs on the fused CPU kernels") && l.contains(model))
        .count()
}

/// `serve` checks every local model by loading it, then serves it: loaded once, not
/// once for the check and again for the table.
#[test]
fn serve_loads_each_local_model_once() {
    let file = temp_file(
        "once.yaml",
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nmodels:\n  m:\n    variants:\n      - {name: a, weight: 1, local: {model: \"builtin:digits_mlp\"}}\n      - {name: b, weight: 1, local: {model: \"builtin:digits_cnn\"}}\n",
    );
    // Listening: every model is loaded. Its log so far is all there is to read.
    let (mut child, log) = serve_with_log(&file);
    child.kill().unwrap();
    child.wait().unwrap();
    let log: Vec<String> = log.iter().collect();
    for model in ["builtin:digits_mlp", "builtin:digits_cnn"] {
        let n = loads(&log, model);
        assert_eq!(n, 1, "{model} loaded {n} times:\n{}", log.join("\n"));
    }
}

/// A reload that leaves a local model as it was does not load it again, not even to
/// check it (a second copy of a large model would sit in memory beside the one serving).
#[test]
fn a_reload_does_not_load_an_unchanged_model_again() {
    let yaml = |weight: u32| {
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nmodels:\n  m:\n    variants:\n      - {{name: a, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n      - {{name: b, weight: {weight}, upstream: \"http://127.0.0.1:1\"}}\n"
        )
    };
    let file = temp_file("reload-once.yaml", &yaml(1));
    let (mut child, log) = serve_with_log(&file);
    std::fs::write(&file, yaml(3)).unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signalling a child process this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("Config reloaded")) {
        match log.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no reload within 20 s:\n{}", seen.join("\n")),
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let n = loads(&seen, "builtin:digits_mlp");
    assert_eq!(n, 1, "loaded {n} times:\n{}", seen.join("\n"));
}
