//! What users see when their file is wrong: every error, with its path and line.

use switchyard_config::{from_yaml_str, UpstreamProtocol};

const GOOD: &str = r#"
listen: 127.0.0.1:8080          # data plane (prediction endpoints)
admin_listen: 127.0.0.1:9901    # admin: metrics, health, state
models:
  mnist:                        # model name clients use
    variants:
      - name: a
        upstream: http://127.0.0.1:9001   # base URL of a model server
        weight: 97
        cost_per_1k: 0.40                 # currency units per 1000 predictions (optional)
      - name: b
        upstream: http://127.0.0.1:9002
        upstream_model: mnist_v2          # model name on that server (default: the client's)
        weight: 2
      - name: c
        upstream: http://127.0.0.1:9003
        weight: 1
"#;

#[test]
fn the_issue_example_is_accepted_with_defaults() {
    let c = from_yaml_str(GOOD).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    let m = &c.models["mnist"];
    assert_eq!(m.variants.len(), 3);
    assert_eq!(m.variants[1].upstream_model.as_deref(), Some("mnist_v2"));
    assert_eq!(m.variants[0].cost_per_1k, 0.40);
    assert_eq!(m.variants[2].cost_per_1k, 0.0);
    assert_eq!(m.variants[0].protocol, UpstreamProtocol::Http1);
    assert_eq!(c.max_body_bytes, 16 * 1024 * 1024);
    assert_eq!(c.client_header_timeout, std::time::Duration::from_secs(60));
    assert_eq!(c.client_body_timeout, std::time::Duration::from_secs(60));
    assert_eq!(c.client_send_timeout, std::time::Duration::from_secs(60));
    assert_eq!(c.upstream_idle_timeout, std::time::Duration::from_secs(4));
    assert_eq!(m.variants[0].upstream_idle_timeout, None);
}

#[test]
fn upstream_idle_timeout_is_set_at_the_top_and_per_upstream_variant() {
    let c = from_yaml_str(
        r#"
upstream_idle_timeout: 1500ms
models:
  m:
    variants:
      - {name: a, upstream: "http://127.0.0.1:1", weight: 1, upstream_idle_timeout: 30s}
      - {name: b, upstream: "http://127.0.0.1:2", weight: 1}
"#,
    )
    .unwrap();
    assert_eq!(
        c.upstream_idle_timeout,
        std::time::Duration::from_millis(1500)
    );
    let v = &c.models["m"].variants;
    assert_eq!(
        v[0].upstream_idle_timeout,
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(v[1].upstream_idle_timeout, None);

    let errors = from_yaml_str(
        r#"
upstream_idle_timeout: 0s
models:
  m:
    variants:
      - {name: a, upstream: "http://127.0.0.1:1", weight: 1, upstream_idle_timeout: soon}
      - {name: l, local: {model: "builtin:digits_mlp"}, weight: 1, upstream_idle_timeout: 1s}
"#,
    )
    .unwrap_err()
    .0;
    let found = |path: &str, words: &str| {
        errors
            .iter()
            .any(|e| e.path == path && e.message.contains(words))
    };
    assert!(
        found("upstream_idle_timeout", "greater than zero"),
        "{errors:#?}"
    );
    assert!(
        found("models.m.variants[0].upstream_idle_timeout", ""),
        "{errors:#?}"
    );
    assert!(
        found(
            "models.m.variants[1].upstream_idle_timeout",
            "applies to `upstream` variants only"
        ),
        "{errors:#?}"
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn every_error_is_reported_with_path_and_line() {
    let bad = r#"
listen: nowhere
request_timeout: 5
client_header_timeout: 0s
models:
  mnist:
    sticky_header: "bad header"
    variants:
      - name: a
        upstream: https://127.0.0.1:9001
        weight: -1
        wieght: 3
      - name: a
        upstream: http://127.0.0.1:9002
        weight: "2"
      - upstream: http://127.0.0.1:9003
        weight: 1
  "bad/name":
    variants: []
"#;
    let errors = from_yaml_str(bad).unwrap_err().0;
    let found: Vec<(String, usize)> = errors.iter().map(|e| (e.path.clone(), e.line)).collect();
    let expect = [
        ("listen", 2),
        ("request_timeout", 3),
        ("client_header_timeout", 4),
        ("models.mnist.sticky_header", 7),
        ("models.mnist.variants[0].upstream", 10),
        ("models.mnist.variants[0].weight", 11),
        ("models.mnist.variants[0].wieght", 12),
        ("models.mnist.variants[1].weight", 15),
        ("models.mnist.variants[2]", 16),
        ("models.bad/name", 18),
        ("models.bad/name.variants", 19),
    ];
    for (path, line) in expect {
        assert!(
            found.iter().any(|(p, l)| p == path && *l == line),
            "missing error at {path} line {line}; got:\n{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The duplicate name is only detectable once both variants decode; variant [1]
    // has a bad weight, so it is not reported this round. Nothing else is invented.
    assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    let missing = errors
        .iter()
        .find(|e| e.path == "models.mnist.variants[2]")
        .unwrap();
    assert!(missing.message.contains("missing required key `name`"));
}

#[test]
fn weights_need_a_positive_sum_and_names_must_be_unique() {
    let text = r#"
models:
  m:
    variants:
      - {name: a, upstream: "http://127.0.0.1:1", weight: 0}
      - {name: a, upstream: "http://127.0.0.1:2", weight: 0}
"#;
    let errors = from_yaml_str(text).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].message.contains("used twice"), "{}", errors[0]);
    let text = text.replace(
        "name: a, upstream: \"http://127.0.0.1:2\"",
        "name: b, upstream: \"http://127.0.0.1:2\"",
    );
    let errors = from_yaml_str(&text).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].message.contains("positive sum"), "{}", errors[0]);
    assert_eq!(errors[0].path, "models.m.variants");
}

#[test]
fn weights_are_floats_and_ratios_only() {
    let text = r#"
models:
  m:
    variants:
      - {name: a, upstream: "http://127.0.0.1:1", weight: 0.5}
      - {name: b, upstream: "http://127.0.0.1:2", weight: 1e-3}
"#;
    let c = from_yaml_str(text).unwrap();
    assert_eq!(c.models["m"].variants[1].weight, 0.001);
}

#[test]
fn empty_and_non_mapping_documents_are_refused() {
    let e = from_yaml_str("").unwrap_err().0;
    assert!(e[0].message.contains("mapping"), "{e:?}");
    let e = from_yaml_str("models: {}\n").unwrap_err().0;
    assert!(e[0].message.contains("at least one model"), "{e:?}");
    let e = from_yaml_str("models: [\n").unwrap_err().0;
    assert!(e[0].message.contains("YAML syntax error"), "{e:?}");
}

#[test]
fn same_listen_and_admin_address_is_an_error() {
    let text = GOOD.replace("9901", "8080");
    let e = from_yaml_str(&text).unwrap_err().0;
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "admin_listen");
    assert_eq!(e[0].line, 3);
}

#[test]
fn rendered_errors_are_one_line_each_with_the_file_name() {
    let e = from_yaml_str("listen: x\nmodels: {}\n").unwrap_err();
    let text = e.render("conf.yaml");
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("conf.yaml:1:"), "{text}");
    assert!(lines[1].starts_with("conf.yaml:2:"), "{text}");
}

#[test]
fn local_variants_are_checked_like_everything_else() {
    let text = r#"
models:
  m:
    variants:
      - name: both
        upstream: http://127.0.0.1:1
        local: {model: "builtin:digits_mlp"}
        weight: 1
      - name: neither
        weight: 1
      - name: misplaced
        local: {model: "builtin:digits_mlp"}
        protocol: h2c
        weight: 1
      - name: bad
        local:
          model: "builtin:nope"
          runtime: onnxruntime
          failure_rate: 1.5
          batching: {max_batch_size: 0, max_batch: 3}
        weight: 1
      - name: knobs
        local:
          model: "builtin:digits_mlp"
          cpu_kernels: tract
          gpu_adapter: any
        weight: 1
      - name: gpu
        local:
          model: "builtin:digits_mlp"
          runtime: wgpu
          cpu_kernels: tract
          gpu_adapter: software
        weight: 1
"#;
    let errors = from_yaml_str(text).unwrap_err().0;
    let has = |path: &str, words: &str| {
        assert!(
            errors
                .iter()
                .any(|e| e.path == path && e.message.contains(words)),
            "no `{words}` at {path} in:\n{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    has("models.m.variants[0].local", "not both");
    has("models.m.variants[1]", "either `upstream`");
    has(
        "models.m.variants[2].protocol",
        "applies to `upstream` variants only",
    );
    has(
        "models.m.variants[3].local.model",
        "no built-in model `nope`",
    );
    has("models.m.variants[3].local.runtime", "not one of `tract`");
    has("models.m.variants[3].local.failure_rate", "between 0 and 1");
    has(
        "models.m.variants[3].local.batching.max_batch_size",
        "greater than zero",
    );
    has(
        "models.m.variants[3].local.batching.max_batch",
        "did you mean `max_batch_size`",
    );
    has(
        "models.m.variants[4].local.gpu_adapter",
        "applies to `runtime: wgpu` only",
    );
    has(
        "models.m.variants[5].local.cpu_kernels",
        "applies to `runtime: tract` only",
    );
    has(
        "models.m.variants[5].local.gpu_adapter",
        "not one of `hardware`",
    );
    assert_eq!(errors.len(), 11, "{errors:#?}");
}

#[test]
fn local_defaults_follow_tf_serving_where_it_has_them() {
    let c = from_yaml_str(
        "models:\n  m:\n    variants:\n      - {name: a, local: {model: x.onnx}, weight: 1}\n",
    )
    .unwrap();
    let local = c.models["m"].variants[0].local.as_ref().unwrap();
    assert_eq!(local.batching.max_batch_size, 64);
    assert_eq!(local.batching.batch_timeout_micros, 0);
    assert_eq!(local.batching.num_batch_threads, None);
    assert_eq!(local.failure_rate, 0.0);
    assert_eq!(local.cpu_kernels, switchyard_config::CpuKernels::Fused);
    assert_eq!(local.gpu_adapter, switchyard_config::GpuAdapter::Hardware);
    assert_eq!(
        local.model_at,
        (4, 34),
        "where `model` was written, for later errors"
    );
}

#[test]
fn bandit_priors_and_half_lives() {
    let base = |bandit: &str| {
        format!("models:\n  m:\n    bandit: {bandit}\n    variants:\n      - {{name: a, upstream: \"http://127.0.0.1:1\", weight: 1}}\n")
    };
    use switchyard_config::{HalfLife, Prior};
    let c = from_yaml_str(&base(
        "{objective: conversion, prior: {alpha: 3, beta: 97}, half_life: 500}",
    ))
    .unwrap();
    let b = c.models["m"].bandit.as_ref().unwrap();
    assert_eq!(
        b.prior,
        Some(Prior::Beta {
            alpha: 3.0,
            beta: 97.0
        })
    );
    assert_eq!(b.half_life, Some(HalfLife::Rewards(500.0)));
    let c = from_yaml_str(&base(
        "{objective: revenue, prior: {mean: 1.5}, half_life: 30m}",
    ))
    .unwrap();
    let b = c.models["m"].bandit.as_ref().unwrap();
    assert_eq!(
        b.prior,
        Some(Prior::Gaussian {
            mean: 1.5,
            strength: 1.0,
            shape: 1.0,
            scale: 1.0
        })
    );
    assert_eq!(
        b.half_life,
        Some(HalfLife::Time(std::time::Duration::from_secs(1800)))
    );
    let e = from_yaml_str(&base("{objective: revenue, prior: {alpha: 1, beta: 1}}"))
        .unwrap_err()
        .0;
    assert!(e[0].message.contains("revenue and profit take"), "{e:?}");
    let e = from_yaml_str(&base(
        "{objective: conversion, prior: {alpha: 0, beta: 1}, half_life: 0.5}",
    ))
    .unwrap_err()
    .0;
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e.iter().any(|x| x.path.ends_with("prior.alpha")));
    assert!(e
        .iter()
        .any(|x| x.path.ends_with("half_life") && x.message.contains("at least 1")));
}

#[test]
fn shadows_take_the_issue_keys_and_report_their_mistakes() {
    let good = r#"
models:
  mnist:
    variants: [{name: a, upstream: "http://127.0.0.1:9001", weight: 1}]
    shadows:
      - name: candidate
        upstream: http://127.0.0.1:9004
        upstream_model: mnist_next
        fraction: 0.2
        sampling: hash
      - name: other
        upstream: http://127.0.0.1:9005
        fraction: 1
"#;
    let c = from_yaml_str(good).unwrap();
    let s = &c.models["mnist"].shadows;
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].upstream_model.as_deref(), Some("mnist_next"));
    assert_eq!(s[0].sampling, switchyard_config::ShadowSampling::Hash);
    assert_eq!(s[1].sampling, switchyard_config::ShadowSampling::Random);
    assert_eq!(s[1].fraction, 1.0);

    let bad = r#"
models:
  mnist:
    variants: [{name: a, upstream: "http://127.0.0.1:9001", weight: 1}]
    shadows:
      - name: a
        upstream: http://127.0.0.1:9004
        fraction: 0.2
      - name: b
        upstream: https://x:1
        fraction: 1.5
        sampling: sometimes
        max_queue: 0
      - name: c
        upstream: http://127.0.0.1:9006
        fraction: 0.1
      - name: c
        upstream: http://127.0.0.1:9007
        fraction: 0.1
      - name: d
        upstream: http://127.0.0.1:9008
        fraction: 0.1
        protocol: grpc3
"#;
    let errors = from_yaml_str(bad).unwrap_err().0;
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "models.mnist.shadows[4].protocol",
        "models.mnist.shadows[1].upstream",
        "models.mnist.shadows[1].fraction",
        "models.mnist.shadows[1].sampling",
        "models.mnist.shadows[1].max_queue",
        "models.mnist.shadows[3].name",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    // A shadow may not take a variant's name: checked once the list is otherwise valid.
    let clash = bad.split("      - name: b").next().unwrap();
    let errors = from_yaml_str(clash).unwrap_err().0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path, "models.mnist.shadows[0].name");
    assert!(errors[0].message.contains("already a variant"));
}

#[test]
fn variants_may_speak_grpc() {
    let c = from_yaml_str(
        "models:\n  m:\n    variants:\n      - {name: g, upstream: \"http://127.0.0.1:8001\", protocol: grpc, weight: 1}\n",
    )
    .unwrap();
    assert_eq!(
        c.models["m"].variants[0].protocol,
        switchyard_config::UpstreamProtocol::Grpc
    );
    assert!(c.models["m"].variants[0].protocol.is_http2());
}
