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
    let feedback_url = format!("http://{}/v1/feedback", app.data_addr);
    assert_eq!(weight(&metrics(app.admin_addr).await, "b"), 0.5);
    // b always converts, a never. Bounded: at most 40 rounds of 50 predictions.
    let mut reached = false;
    for _ in 0..40 {
        for _ in 0..50 {
            let r = predict(&c, &predict_url).await;
            let id = r.header("x-request-id").unwrap().to_string();
            let converted = r.header("x-switchyard-variant") == Some("b");
            let fb = send(
                &c,
                "POST",
                &feedback_url,
                &[],
                &json!({ "request_id": id, "converted": converted }).to_string(),
            )
            .await;
            assert_eq!(fb.status, 200, "{:?}", fb.body);
        }
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
