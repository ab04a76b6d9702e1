//! The bandit end to end: predictions are recorded, `POST /v1/feedback` joins the
//! application's verdicts to them, and the weights move to the variant that earns.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::*;

async fn app(a: &Upstream, b: &Upstream, bandit: &str) -> switchyard::Running {
    start(&format!(
        r#"
seed: 99
models:
  rec:
    bandit: {bandit}
    variants:
      - {{name: a, upstream: "{}", weight: 1}}
      - {{name: b, upstream: "{}", weight: 1}}
  plain:
    variants:
      - {{name: only, upstream: "{}", weight: 1}}
"#,
        a.url(),
        b.url(),
        a.url()
    ))
    .await
}

fn weight(metrics: &str, variant: &str) -> f64 {
    sample(
        metrics,
        &format!(r#"switchyard_variant_weight{{model="rec",variant="{variant}"}}"#),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_moves_traffic_to_the_variant_that_converts() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = app(
        &a,
        &b,
        "{objective: conversion, update_interval: 50ms, warmup: 20, min_weight: 0.05, max_step: 0.5}",
    )
    .await;
    let c = client();
    let predict_url = format!("http://{}/v1/models/rec:predict", app.data_addr);
    assert_eq!(weight(&metrics(app.admin_addr).await, "b"), 0.5);
    // b always converts, a never (see `teach`). Bounded: at most 40 rounds.
    let mut reached = false;
    for _ in 0..40 {
        teach(&app, 2).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        let m = metrics(app.admin_addr).await;
        let (wa, wb) = (weight(&m, "a"), weight(&m, "b"));
        assert!((wa + wb - 1.0).abs() < 1e-9);
        assert!(wa >= 0.05 - 1e-9, "the floor holds: {wa}");
        if wb >= 0.9 {
            reached = true;
            break;
        }
    }
    assert!(reached, "weights never moved to b");
    // And the split follows the published weights.
    let mut on_b = 0;
    for _ in 0..400 {
        on_b += usize::from(
            predict(&c, &predict_url)
                .await
                .header("x-switchyard-variant")
                == Some("b"),
        );
    }
    assert!(on_b > 300, "{on_b} of 400 on b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_errors_are_clear_and_nothing_counts_twice() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = app(&a, &b, "{objective: conversion}").await;
    let c = client();
    let url = format!("http://{}/v1/feedback", app.data_addr);
    let post = |body: Value| {
        let (c, url) = (c.clone(), url.clone());
        async move { send(&c, "POST", &url, &[], &body.to_string()).await }
    };
    let id = predict(
        &c,
        &format!("http://{}/v1/models/rec:predict", app.data_addr),
    )
    .await
    .header("x-request-id")
    .unwrap()
    .to_string();

    let r = post(json!({ "request_id": "no-such-id", "converted": true })).await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("unknown or expired"));
    // A value the objective cannot take is refused and does not use up the decision.
    let r = post(json!({ "request_id": id, "revenue": 3.5 })).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("conversion objective"));
    let r = post(json!({ "request_id": id, "reward": 0.5 })).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        post(json!({ "request_id": id, "converted": true }))
            .await
            .status,
        200
    );
    let r = post(json!({ "request_id": id, "converted": false })).await;
    assert_eq!(r.status, 409, "the first feedback wins");
    let r = send(&c, "POST", &url, &[], "{not json").await;
    assert_eq!(r.status, 400);

    // Batch form: a status per item.
    let id2 = predict(
        &c,
        &format!("http://{}/v1/models/rec:predict", app.data_addr),
    )
    .await
    .header("x-request-id")
    .unwrap()
    .to_string();
    let r = post(json!({ "feedback": [
        { "request_id": id2, "converted": true },
        { "request_id": id2, "converted": true },
        { "request_id": "nope", "converted": true },
        { "request_id": id2 },
    ] }))
    .await;
    assert_eq!(r.status, 200);
    let statuses: Vec<u64> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 409, 404, 400]);

    // Predictions of a model without a bandit are not recorded.
    let plain = predict(
        &c,
        &format!("http://{}/v1/models/plain:predict", app.data_addr),
    )
    .await;
    let r = post(json!({ "request_id": plain.header("x-request-id").unwrap(), "converted": true }))
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_after_the_ttl_is_refused() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = app(
        &a,
        &b,
        "{objective: revenue, feedback_ttl: 100ms, missing_feedback: zero}",
    )
    .await;
    let c = client();
    let id = predict(
        &c,
        &format!("http://{}/v1/models/rec:predict", app.data_addr),
    )
    .await
    .header("x-request-id")
    .unwrap()
    .to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = send(
        &c,
        "POST",
        &format!("http://{}/v1/feedback", app.data_addr),
        &[],
        &json!({ "request_id": id, "revenue": 1.0 }).to_string(),
    )
    .await;
    assert_eq!(r.status, 404);
}

/// A decision log too small for the traffic evicts its oldest decisions: they are
/// counted, and their feedback is told why it is refused (410), not "unknown"; the
/// newest decisions still take feedback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_for_an_evicted_decision_says_so() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = start(&format!(
        "bandit: {{decision_log_capacity: 320}}\nmodels:\n  rec:\n    bandit: {{objective: conversion}}\n    variants:\n      - {{name: a, upstream: \"{}\", weight: 1}}\n      - {{name: b, upstream: \"{}\", weight: 1}}\n",
        a.url(),
        b.url()
    ))
    .await;
    let c = client();
    let predict_url = format!("http://{}/v1/models/rec:predict", app.data_addr);
    let mut ids = Vec::new();
    for _ in 0..640 {
        let r = predict(&c, &predict_url).await;
        ids.push(r.header("x-request-id").unwrap().to_string());
    }
    let url = format!("http://{}/v1/feedback", app.data_addr);
    let post = |id: &str| {
        let (c, url) = (c.clone(), url.clone());
        let body = json!({ "request_id": id, "converted": true }).to_string();
        async move { send(&c, "POST", &url, &[], &body).await }
    };
    let newest = post(ids.last().unwrap()).await;
    assert_eq!(newest.status, 200, "{:?}", newest.body);
    let mut told = 0;
    for id in &ids[..64] {
        let r = post(id).await;
        if r.status == 410 {
            let e = r.json()["error"].as_str().unwrap().to_string();
            assert!(
                e.contains("evicted") && e.contains("decision_log_capacity: 320"),
                "{e}"
            );
            told += 1;
        } else {
            // Request ids are random, so shards fill unevenly: a quiet shard may still
            // hold its oldest (200), and a busy one remembers evicted ids only up to twice
            // its bound (404 beyond). Each is about a 1% chance per shard.
            assert!(r.status == 200 || r.status == 404, "{:?}", r.body);
        }
    }
    assert!(
        told >= 56,
        "only {told} of the 64 oldest were told they were evicted"
    );
    let evicted = sample(
        &metrics(app.admin_addr).await,
        "switchyard_decisions_evicted_total",
    );
    // 640 decisions, room for at most 320.
    assert!(evicted.is_some_and(|n| n >= 320.0), "{evicted:?}");
}

/// A feedback batch beyond 64 KiB is parsed off the async workers: every item is
/// still joined and answered, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_feedback_batch_is_answered_item_by_item() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = app(&a, &b, "{objective: conversion}").await;
    let c = client();
    let predict_url = format!("http://{}/v1/models/rec:predict", app.data_addr);
    let mut items = Vec::new();
    for i in 0..1200 {
        let id = predict(&c, &predict_url)
            .await
            .header("x-request-id")
            .unwrap()
            .to_string();
        items.push(json!({ "request_id": id, "converted": i % 2 == 0 }));
    }
    items.push(json!({ "request_id": "no-such-id", "converted": true }));
    let body = json!({ "feedback": items }).to_string();
    assert!(body.len() > 64 * 1024, "{} bytes", body.len());
    let url = format!("http://{}/v1/feedback", app.data_addr);
    let r = send(&c, "POST", &url, &[], &body).await;
    assert_eq!(r.status, 200);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 1201);
    assert!(results[..1200].iter().all(|x| x["status"] == 200));
    assert_eq!(results[1200]["status"], 404);
    assert_eq!(results[7]["request_id"], items[7]["request_id"]);
    // And again: every one is now a duplicate.
    let r = send(&c, "POST", &url, &[], &body).await;
    let results = r.json()["results"].as_array().unwrap().clone();
    assert!(results[..1200].iter().all(|x| x["status"] == 409));
}

/// Sends `rounds` × 20 predictions with feedback (b converts, a does not); returns how
/// many feedbacks went to each variant.
async fn teach(app: &switchyard::Running, rounds: usize) -> (u64, u64) {
    let c = client();
    let (mut na, mut nb) = (0, 0);
    for _ in 0..rounds {
        for _ in 0..20 {
            let r = predict(
                &c,
                &format!("http://{}/v1/models/rec:predict", app.data_addr),
            )
            .await;
            let on_b = r.header("x-switchyard-variant") == Some("b");
            let body =
                json!({ "request_id": r.header("x-request-id").unwrap(), "converted": on_b });
            let fb = send(
                &c,
                "POST",
                &format!("http://{}/v1/feedback", app.data_addr),
                &[],
                &body.to_string(),
            )
            .await;
            assert_eq!(fb.status, 200);
            if on_b {
                nb += 1
            } else {
                na += 1
            }
        }
    }
    (na, nb)
}

/// Waits (bounded) until /admin/state counts `total` rewards for model `rec`.
async fn wait_for_rewards(app: &switchyard::Running, total: u64) -> Value {
    for _ in 0..200 {
        let s = send(
            &client(),
            "GET",
            &format!("http://{}/admin/state", app.admin_addr),
            &[],
            "",
        )
        .await
        .json();
        let v = &s["models"]["rec"]["variants"];
        if v["a"]["rewards"].as_u64().unwrap_or(0) + v["b"]["rewards"].as_u64().unwrap_or(0)
            >= total
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("rewards never reached {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_state_and_metrics_show_what_the_bandit_learned() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = app(
        &a,
        &b,
        "{objective: conversion, update_interval: 20ms, warmup: 1000}",
    )
    .await;
    let (na, nb) = teach(&app, 5).await;
    let s = wait_for_rewards(&app, na + nb).await;
    let v = &s["models"]["rec"]["variants"];
    assert_eq!(s["models"]["rec"]["objective"], "conversion");
    assert_eq!(
        (v["a"]["rewards"].as_u64(), v["b"]["rewards"].as_u64()),
        (Some(na), Some(nb))
    );
    assert_eq!(
        v["b"]["revenue_total"].as_f64(),
        Some(nb as f64),
        "one conversion per b prediction"
    );
    // Beta(1 + nb, 1) and Beta(1, 1 + na): means known in closed form.
    let mean = |x: &Value| x["posterior_mean"].as_f64().unwrap();
    assert!((mean(&v["b"]) - (1.0 + nb as f64) / (2.0 + nb as f64)).abs() < 1e-9);
    assert!((mean(&v["a"]) - 1.0 / (2.0 + na as f64)).abs() < 1e-9);
    let ci = v["b"]["credible_interval"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() < mean(&v["b"]) && mean(&v["b"]) <= ci[1].as_f64().unwrap());
    // Warm-up of 1000 rewards is not reached: the configured 50/50 holds.
    assert_eq!(v["a"]["weight"].as_f64(), Some(0.5));

    let m = metrics(app.admin_addr).await;
    assert_eq!(
        sample(
            &m,
            r#"switchyard_bandit_rewards_total{model="rec",variant="b"}"#
        ),
        Some(nb as f64)
    );
    assert_eq!(
        sample(
            &m,
            r#"switchyard_feedback_delay_seconds_count{model="rec"}"#
        ),
        Some((na + nb) as f64)
    );
    assert!(
        sample(
            &m,
            r#"switchyard_bandit_posterior_mean{model="rec",variant="b"}"#
        )
        .unwrap()
            > 0.9
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandit_state_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("switchyard-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.json");
    let _ = std::fs::remove_file(&file);
    let (a, b, c) = (
        Upstream::echo("a").await,
        Upstream::echo("b").await,
        Upstream::echo("c").await,
    );
    let bandit = "{objective: conversion, update_interval: 20ms, warmup: 5, min_weight: 0.05, max_step: 0.5}";
    let config = |extra: &str| {
        format!(
            "seed: 5\nstate_file: \"{}\"\nmodels:\n  rec:\n    bandit: {bandit}\n    variants:\n      - {{name: a, upstream: \"{}\", weight: 1}}\n      - {{name: b, upstream: \"{}\", weight: 1}}\n{extra}",
            file.display(),
            a.url(),
            b.url()
        )
    };

    let first = start(&config("")).await;
    let (na, nb) = teach(&first, 5).await;
    let before = wait_for_rewards(&first, na + nb).await;
    // Let one more update publish weights that include every reward, then stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = first
        .bandit_state()
        .get("models")
        .cloned()
        .unwrap_or(before);
    first.shutdown();
    first.wait().await;
    assert!(file.exists(), "the state file is written at shutdown");

    let second = start(&config("")).await;
    let after = second.bandit_state();
    let (b0, b1) = (
        &before["rec"]["variants"]["b"],
        &after["models"]["rec"]["variants"]["b"],
    );
    assert_eq!(b1["rewards"], b0["rewards"]);
    assert_eq!(b1["posterior"], b0["posterior"]);
    // Weights are re-normalised when restored: equal to the last float bit or so.
    assert!((b1["weight"].as_f64().unwrap() - b0["weight"].as_f64().unwrap()).abs() < 1e-12);
    let m = metrics(second.admin_addr).await;
    let wb = sample(&m, r#"switchyard_variant_weight{model="rec",variant="b"}"#).unwrap();
    assert!(
        (wb - b0["weight"].as_f64().unwrap()).abs() < 1e-12,
        "restored weights are published at start"
    );
    second.shutdown();
    second.wait().await;

    // A variant added: known variants keep their statistics; weights start from config.
    let third = start(&config(&format!(
        "      - {{name: c, upstream: \"{}\", weight: 1}}\n",
        c.url()
    )))
    .await;
    let s = third.bandit_state();
    let v = &s["models"]["rec"]["variants"];
    assert_eq!(v["b"]["rewards"], b0["rewards"]);
    assert_eq!(v["c"]["rewards"], 0);
    assert!((v["c"]["weight"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12);
    third.shutdown();
    third.wait().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A state file that no run could have written is never silently replaced: it is kept
/// as `<file>.corrupt-<unix time>` with its bytes intact, counted, and the bandits start
/// fresh; a good file is then written beside it at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_files_are_kept_aside_and_the_bandits_start_fresh() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let good_posterior = r#"{"kind":"beta","alpha0":1,"beta0":1,"successes":3,"failures":1}"#;
    let variant = |fields: &str| {
        format!(
            r#"{{"models":{{"rec":{{"objective":"conversion","variants":{{"b":{{{fields}}}}}}}}}}}"#
        )
    };
    let cases = [
        ("empty", String::new()),
        (
            "truncated",
            variant(&format!(r#""rewards":4,"posterior":{good_posterior}"#))[..40].to_string(),
        ),
        ("garbage", "\u{0}\u{1}not json at all".to_string()),
        ("wrong types", r#"{"models":[1,2,3]}"#.to_string()),
        (
            "negative count",
            variant(&format!(r#""rewards":-4,"posterior":{good_posterior}"#)),
        ),
        (
            "negative pseudo-count",
            variant(
                r#""rewards":4,"posterior":{"kind":"beta","alpha0":1,"beta0":1,"successes":-3,"failures":1}"#,
            ),
        ),
        (
            "non-finite weight",
            variant(&format!(r#""weight":1e999,"posterior":{good_posterior}"#)),
        ),
    ];
    for (i, (what, content)) in cases.iter().enumerate() {
        let dir =
            std::env::temp_dir().join(format!("switchyard-corrupt-{}-{i}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("state.json");
        std::fs::write(&file, content).unwrap();
        let app = start(&format!(
            "state_file: \"{}\"\nmodels:\n  rec:\n    bandit: {{objective: conversion}}\n    variants:\n      - {{name: a, upstream: \"{}\", weight: 1}}\n      - {{name: b, upstream: \"{}\", weight: 1}}\n",
            file.display(),
            a.url(),
            b.url()
        ))
        .await;
        let state = app.bandit_state();
        assert_eq!(
            state["models"]["rec"]["variants"]["b"]["rewards"], 0,
            "{what}: fresh start"
        );
        let kept: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("state.json.corrupt-"))
            .collect();
        assert_eq!(kept.len(), 1, "{what}: kept aside once");
        assert_eq!(
            &std::fs::read_to_string(&kept[0]).unwrap(),
            content,
            "{what}: bytes intact"
        );
        assert_eq!(
            sample(
                &metrics(app.admin_addr).await,
                "switchyard_state_file_corrupt_total"
            ),
            Some(1.0),
            "{what}"
        );
        app.shutdown();
        app.wait().await;
        let fresh: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert!(
            fresh["models"]["rec"].is_object(),
            "{what}: a new file is written"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_can_pin_freeze_and_release() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = app(&a, &b, "{objective: conversion, update_interval: 20ms, warmup: 5, min_weight: 0.05, max_step: 0.5}").await;
    let c = client();
    let admin = |path: &str| format!("http://{}/admin/bandit/{path}", app.admin_addr);
    let weights = || async {
        let m = metrics(app.admin_addr).await;
        (weight(&m, "a"), weight(&m, "b"))
    };
    let settle = |want_a: f64| async move {
        for _ in 0..200 {
            let m = metrics(app.admin_addr).await;
            if (weight(&m, "a") - want_a).abs() < 1e-9 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("weight of a never became {want_a}");
    };

    // Pinned to a, even while the feedback says b is better.
    let r = send(&c, "POST", &admin("rec/pin/a"), &[], "").await;
    assert_eq!(
        (r.status, r.json()["override"]["pin"].clone()),
        (200, json!("a"))
    );
    teach(&app, 3).await;
    settle(1.0).await;
    let s = app.bandit_state();
    assert_eq!(s["models"]["rec"]["override"]["pin"], "a");

    // Released: the bandit moves weight to b again.
    assert_eq!(
        send(&c, "POST", &admin("rec/release"), &[], "")
            .await
            .status,
        200
    );
    teach(&app, 3).await;
    for _ in 0..200 {
        if weights().await.1 > 0.5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, wb) = weights().await;
    assert!(wb > 0.5, "{wb}");

    // Frozen: more feedback, same weights.
    assert_eq!(
        send(&c, "POST", &admin("rec/freeze"), &[], "").await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    let frozen = weights().await;
    teach(&app, 3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(weights().await, frozen);

    // Mistakes.
    assert_eq!(
        send(&c, "POST", &admin("rec/pin/zzz"), &[], "")
            .await
            .status,
        404
    );
    assert_eq!(
        send(&c, "POST", &admin("plain/freeze"), &[], "")
            .await
            .status,
        404
    );
    assert_eq!(
        send(&c, "POST", &admin("rec/explode"), &[], "")
            .await
            .status,
        404
    );
    assert_eq!(
        send(&c, "GET", &admin("rec/freeze"), &[], "").await.status,
        405
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priors_are_configurable_and_time_half_lives_forget() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    // A strong prior: a 30% conversion rate worth 100 observations.
    let app = app(&a, &b, "{objective: conversion, update_interval: 20ms, warmup: 1000, prior: {alpha: 30, beta: 70}, half_life: 100ms}").await;
    let s = app.bandit_state();
    let mean = s["models"]["rec"]["variants"]["a"]["posterior_mean"]
        .as_f64()
        .unwrap();
    assert!((mean - 0.3).abs() < 1e-12, "{mean}");
    // Evidence fades with a 100 ms half-life: a second later, b's successes are a
    // small fraction of the conversions it was told about.
    let (_, nb) = teach(&app, 2).await;
    let told = wait_for_rewards(&app, 40).await["models"]["rec"]["variants"]["b"]["rewards"]
        .as_u64()
        .unwrap();
    assert_eq!(told, nb);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = app.bandit_state();
    let successes = s["models"]["rec"]["variants"]["b"]["posterior"]["successes"]
        .as_f64()
        .unwrap();
    assert!(successes < 0.1 * nb as f64, "{successes} of {nb} remain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_thompson_sampling_follows_the_feedback() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = app(&a, &b, "{objective: conversion, mode: per_request, update_interval: 20ms, warmup: 20, min_weight: 0.02}").await;
    let c = client();
    let url = format!("http://{}/v1/models/rec:predict", app.data_addr);
    // Teach until the posteriors are published with warm-up done (bounded).
    for _ in 0..20 {
        teach(&app, 2).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let s = app.bandit_state();
        let v = &s["models"]["rec"]["variants"];
        if v["a"]["rewards"].as_u64().unwrap_or(0) >= 20
            && v["b"]["rewards"].as_u64().unwrap_or(0) >= 20
        {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    // Posteriors: b ~ Beta(1 + nb, 1), a ~ Beta(1, 1 + na): b wins almost every draw,
    // and 2% exploration sends about 1% to a.
    let mut on_b = 0;
    for _ in 0..300 {
        on_b += usize::from(predict(&c, &url).await.header("x-switchyard-variant") == Some("b"));
    }
    assert!(on_b > 270, "{on_b} of 300 on b");
    // A pin overrides the per-request draws.
    let pin = send(
        &c,
        "POST",
        &format!("http://{}/admin/bandit/rec/pin/a", app.admin_addr),
        &[],
        "",
    )
    .await;
    assert_eq!(pin.status, 200);
    tokio::time::sleep(Duration::from_millis(80)).await;
    for _ in 0..50 {
        assert_eq!(
            predict(&c, &url).await.header("x-switchyard-variant"),
            Some("a")
        );
    }
}

/// Predictions left without feedback count at `feedback_ttl` as the config says: under
/// `zero` as failures the bandit learns from, under `ignore` only as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_feedback_counts_as_configured_at_the_ttl() {
    for (mode, learned) in [("zero", 3), ("ignore", 0)] {
        let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
        let app = app(
            &a,
            &b,
            &format!("{{objective: conversion, feedback_ttl: 100ms, missing_feedback: {mode}, update_interval: 20ms, warmup: 1000}}"),
        )
        .await;
        let c = client();
        for _ in 0..3 {
            predict(
                &c,
                &format!("http://{}/v1/models/rec:predict", app.data_addr),
            )
            .await;
        }
        // Decisions are swept once a second: wait (bounded) until all three expired.
        let mut state = Value::Null;
        for _ in 0..80 {
            state = app.bandit_state();
            let v = &state["models"]["rec"]["variants"];
            let expired = v["a"]["expired_without_feedback"].as_u64().unwrap_or(0)
                + v["b"]["expired_without_feedback"].as_u64().unwrap_or(0);
            if expired == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let v = &state["models"]["rec"]["variants"];
        let sum = |k: &str| v["a"][k].as_u64().unwrap() + v["b"][k].as_u64().unwrap();
        assert_eq!(sum("expired_without_feedback"), 3, "{mode}: {state}");
        assert_eq!(sum("rewards"), learned, "{mode}: {state}");
        let failures = v["a"]["posterior"]["failures"].as_f64().unwrap()
            + v["b"]["posterior"]["failures"].as_f64().unwrap();
        assert_eq!(
            failures, learned as f64,
            "{mode}: zero counts as no conversion"
        );
    }
}

/// Each decision keeps the probability its variant was chosen with (for inverse-propensity
/// estimates later): seen through a sink that captures what feedback joins to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_keep_the_probability_of_their_choice() {
    use std::sync::{Arc, Mutex};
    use switchyard::router::feedback::{Decision, FeedbackSink, FeedbackValues};
    use switchyard::router::server::{serve, ServeOptions};

    #[derive(Debug, Default)]
    struct Capture(Mutex<Vec<(u16, f32)>>);
    impl FeedbackSink for Capture {
        fn accept(
            &self,
            d: &Decision,
            _: Duration,
            _: &FeedbackValues,
        ) -> Result<(), switchyard::router::feedback::FeedbackError> {
            self.0.lock().unwrap().push((d.variant, d.probability));
            Ok(())
        }
    }

    let up = Upstream::echo("x").await;
    let config = switchyard::config::from_yaml_str(&format!(
        "models:\n  rec:\n    bandit: {{objective: conversion}}\n    variants:\n      - {{name: a, upstream: \"{0}\", weight: 1}}\n      - {{name: b, upstream: \"{0}\", weight: 3}}\n",
        up.url()
    ))
    .unwrap();
    let capture = Arc::new(Capture::default());
    let metrics = switchyard::router::Metrics::new(&prometheus::Registry::new()).unwrap();
    let router =
        switchyard::router::Router::with_feedback(&config, metrics, Some(capture.clone())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = ServeOptions {
        max_connections: 64,
        drain_timeout: Duration::from_secs(1),
        client_header_timeout: Duration::from_secs(60),
        client_send_timeout: Duration::from_secs(60),
        connection_metrics: None,
        refused: None,
        park_after: switchyard::router::server::PARK_AFTER,
        parked_metrics: None,
    };
    tokio::spawn(serve(
        listener,
        move |p| router.service(Some(p.ip())),
        std::future::pending(),
        opts,
    ));

    let c = client();
    for _ in 0..40 {
        let r = predict(&c, &format!("http://{addr}/v1/models/rec:predict")).await;
        let body = json!({ "request_id": r.header("x-request-id").unwrap(), "converted": true });
        assert_eq!(
            send(
                &c,
                "POST",
                &format!("http://{addr}/v1/feedback"),
                &[],
                &body.to_string()
            )
            .await
            .status,
            200
        );
    }
    let seen = capture.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 40);
    for (variant, p) in seen {
        let want = if variant == 0 { 0.25 } else { 0.75 };
        assert_eq!(p, want, "variant {variant}");
    }
}

/// Feedback is in the bandit the moment it is answered (`/admin/state` counts it, with
/// no update in between: `update_interval` is an hour), and the weights follow within
/// `update_every` rewards rather than within `update_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_is_learned_at_once_and_weights_follow_within_update_every() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = app(
        &a,
        &b,
        "{objective: conversion, update_interval: 1h, update_every: 40, warmup: 0, min_weight: 0, max_step: 1}",
    )
    .await;
    let (na, nb) = teach(&app, 1).await;
    let state = admin_json(app.admin_addr, "/admin/state").await;
    let v = &state["models"]["rec"]["variants"];
    assert_eq!(v["a"]["rewards"], na, "{state}");
    assert_eq!(v["b"]["rewards"], nb, "{state}");
    assert_eq!(v["b"]["revenue_total"], nb as f64, "{state}");
    // The 40th reward brings the update forward (bounded wait).
    teach(&app, 1).await;
    let mut moved = false;
    for _ in 0..250 {
        if weight(&metrics(app.admin_addr).await, "b") > 0.9 {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "the weights did not follow 40 rewards");
}

/// With `bandit.decisions_file`, every settled decision becomes a line (feedback taken,
/// or expired without any), and `switchyard evaluate` reads them: variant `b` always
/// converts and `a` never does, so pinning `b` is estimated near 1 and pinning `a` at 0,
/// and the logged policy at the log's own conversion rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_decisions_are_written_for_off_policy_evaluation() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let dir = std::env::temp_dir().join(format!("switchyard-decisions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("decisions.jsonl");
    let _ = std::fs::remove_file(&file);
    let app = start(&format!(
        r#"
seed: 5
bandit: {{decisions_file: "{}"}}
models:
  rec:
    bandit: {{objective: conversion, feedback_ttl: 1s}}
    variants:
      - {{name: a, upstream: "{}", weight: 1}}
      - {{name: b, upstream: "{}", weight: 1}}
"#,
        file.display(),
        a.url(),
        b.url()
    ))
    .await;
    let (na, nb) = teach(&app, 10).await;
    // 20 more predictions that never get feedback: they settle at their 1 s TTL.
    let c = client();
    for _ in 0..20 {
        predict(
            &c,
            &format!("http://{}/v1/models/rec:predict", app.data_addr),
        )
        .await;
    }
    let mut lines = Vec::new();
    for _ in 0..100 {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        lines = text.lines().map(str::to_string).collect();
        if lines.len() >= 220 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lines.len(), 220, "every settled decision, once");
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed.iter().filter(|v| v["feedback"] == true).count(), 200);
    for v in &parsed {
        let p = v["probability"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0, "{v}");
        assert_eq!(v["model"], "rec");
    }
    let report = switchyard::evaluate::evaluate(
        &file,
        Some("rec"),
        &[
            switchyard::evaluate::Policy::parse("pin:a").unwrap(),
            switchyard::evaluate::Policy::parse("pin:b").unwrap(),
        ],
    )
    .unwrap();
    let m = &report.models[0];
    assert_eq!((m.decisions, m.with_feedback), (220, 200));
    let logged = &m.estimates[0];
    assert!(
        (logged.ips.0 - nb as f64 / 220.0).abs() < 1e-9,
        "{logged:?} ({na} on a)"
    );
    assert_eq!(m.estimates[1].ips.0, 0.0, "a never converts");
    let pin_b = &m.estimates[2];
    assert!(pin_b.dr.0 > 0.5 && pin_b.snips > 0.5, "{pin_b:?}");
    app.shutdown();
    app.wait().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `cost_per_second` charges each prediction the time its variant took: `a` and `b`
/// earn the same revenue, `a` answers in 60 ms and `b` at once; at 10 per second `a`
/// costs at least 0.6 a prediction and `b` next to nothing, so a profit bandit learns
/// that `b` earns more and sends it the traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_time_is_charged_as_cost_under_profit() {
    let a = Upstream::start("a", Duration::from_millis(60)).await;
    let b = Upstream::echo("b").await;
    let app = start(&format!(
        r#"
seed: 3
models:
  rec:
    bandit: {{objective: profit}}
    variants:
      - {{name: a, upstream: "{}", weight: 1, cost_per_second: 10}}
      - {{name: b, upstream: "{}", weight: 1, cost_per_second: 10}}
"#,
        a.url(),
        b.url()
    ))
    .await;
    let c = client();
    let mut late_on_b = 0;
    for i in 0..80 {
        let r = predict(
            &c,
            &format!("http://{}/v1/models/rec:predict", app.data_addr),
        )
        .await;
        if i >= 60 && r.header("x-switchyard-variant") == Some("b") {
            late_on_b += 1;
        }
        let body = json!({ "request_id": r.header("x-request-id").unwrap(), "revenue": 1.0 });
        let fb = send(
            &c,
            "POST",
            &format!("http://{}/v1/feedback", app.data_addr),
            &[],
            &body.to_string(),
        )
        .await;
        assert_eq!(fb.status, 200, "{:?}", fb.body);
    }
    let s = app.bandit_state();
    let v = &s["models"]["rec"]["variants"];
    let (na, nb) = (
        v["a"]["rewards"].as_u64().unwrap(),
        v["b"]["rewards"].as_u64().unwrap(),
    );
    assert!(na >= 1 && nb >= 1, "{v}");
    let (ca, cb) = (
        v["a"]["cost_total"].as_f64().unwrap(),
        v["b"]["cost_total"].as_f64().unwrap(),
    );
    assert!(
        ca >= 0.6 * na as f64,
        "a: {ca} for {na} predictions of ≥ 60 ms"
    );
    assert!(cb < 0.05 * nb as f64, "b: {cb} for {nb} fast predictions");
    assert!(late_on_b >= 18, "{late_on_b} of the last 20 on b");
    app.shutdown();
    app.wait().await;
}
