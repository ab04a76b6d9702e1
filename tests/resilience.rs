//! Breakers, retries, hedging and the local fallback, over real sockets: upstreams that
//! die (a real process, killed), hang, reset, answer 500 and close, or refuse.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

/// The first digit of scikit-learn's set: 64 pixels.
const DIGIT: &str = "[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]";

fn tf_body() -> String {
    format!(r#"{{"instances": [{DIGIT}]}}"#)
}

fn counter(metrics: &str, series: &str) -> f64 {
    sample(metrics, series).unwrap_or(0.0)
}

/// Starts `switchyard model-server` for the digits MLP on `listen`.
fn model_server_at(listen: &str) -> (std::process::Child, String) {
    spawn_switchyard([
        "model-server",
        "--model",
        "builtin:digits_mlp",
        "--listen",
        listen,
        "--admin-listen",
        "127.0.0.1:0",
    ])
}

/// The headline: two remote variants (real processes) and a local fallback; one
/// upstream is killed (SIGKILL) half-way through 20,000 requests at 32 connections.
/// No client sees a failure; the dead variant's breaker opens; when it comes back on
/// the same port, its traffic returns after the ejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_upstream_costs_no_request_with_a_fallback() {
    let (mut a, a_addr) = model_server_at("127.0.0.1:0");
    let (mut b, b_addr) = model_server_at("127.0.0.1:0");
    let app = start(&format!(
        "models:\n  digits:\n    request_timeout: 2s\n    fallback: cpu\n    breaker: {{base_ejection: 1s, max_ejection: 2s}}\n    variants:\n      - {{name: a, upstream: \"http://{a_addr}\", weight: 1}}\n      - {{name: b, upstream: \"http://{b_addr}\", weight: 1}}\n      - {{name: cpu, weight: 0, local: {{model: \"builtin:digits_mlp\"}}}}\n"
    ))
    .await;
    let url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let total = 20_000usize;
    let sent = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let body = tf_body();
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (sent, failed, url, body) = (sent.clone(), failed.clone(), url.clone(), body.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            while sent.fetch_add(1, Ordering::SeqCst) < total {
                let r = send(&c, "POST", &url, &[], &body).await;
                if r.status != 200 && failed.fetch_add(1, Ordering::SeqCst) < 5 {
                    eprintln!("failed: {} {:?} {:?}", r.status, r.headers, r.body);
                }
            }
        }));
    }
    // Half-way: kill a.
    while sent.load(Ordering::SeqCst) < total / 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill().unwrap();
    let _ = a.wait();
    // Its breaker opens (bounded wait).
    let mut opened = false;
    for _ in 0..200 {
        let m = metrics(app.admin_addr).await;
        if counter(
            &m,
            r#"switchyard_variant_state{model="digits",variant="a"}"#,
        ) >= 1.0
        {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "requests failed");
    assert!(opened, "a's breaker never opened");
    let m = metrics(app.admin_addr).await;
    assert!(
        counter(
            &m,
            r#"switchyard_variant_ejections_total{model="digits",variant="a"}"#
        ) >= 1.0
    );
    // a comes back on its port: after the ejection a probe finds it, and it gets
    // traffic again (bounded: a few seconds of requests).
    let (mut a2, _) = model_server_at(&a_addr);
    let c = client();
    let before = counter(
        &m,
        r#"switchyard_requests_total{class="2xx",model="digits",variant="a"}"#,
    );
    let mut back = false;
    for _ in 0..400 {
        let r = send(&c, "POST", &url, &[], &body).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        if r.header("x-switchyard-variant") == Some("a") {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "a never got traffic back");
    let m = metrics(app.admin_addr).await;
    assert!(
        counter(
            &m,
            r#"switchyard_requests_total{class="2xx",model="digits",variant="a"}"#
        ) > before
    );
    let state = admin_json(app.admin_addr, "/admin/state").await;
    assert_eq!(
        state["breakers"]["digits"]["a"]["breaker"], "closed",
        "{state}"
    );
    for child in [&mut a2, &mut b] {
        child.kill().unwrap();
        let _ = child.wait();
    }
}

/// Each failure kind counts: 500, reset, a hang past the timeout, a refused connect.
/// After `consecutive_failures` the variant is ejected and the other takes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_kind_opens_the_breaker() {
    let failing_500 =
        model_server(Duration::ZERO, |_, _| (500, r#"{"error":"boom"}"#.into())).await;
    let (hanging, _) = hanging_upstream().await;
    let kinds = [
        ("500", failing_500.url()),
        ("reset", format!("http://{}", resetting_upstream().await)),
        ("hang", format!("http://{hanging}")),
        ("refused", format!("http://{}", refused_addr().await)),
    ];
    for (kind, url) in kinds {
        let good = Upstream::echo("good").await;
        // Retries off, so each failure reaches the client and the breaker alike.
        let app = start(&format!(
            "seed: 3\nmodels:\n  m:\n    request_timeout: 300ms\n    retry: {{on: []}}\n    breaker: {{consecutive_failures: 3, min_requests: 1000}}\n    variants:\n      - {{name: bad, upstream: \"{url}\", weight: 1}}\n      - {{name: good, upstream: \"{}\", weight: 1}}\n",
            good.url()
        ))
        .await;
        let c = client();
        let predict_url = format!("http://{}/v1/models/m:predict", app.data_addr);
        let mut failures = 0;
        for _ in 0..60 {
            let r = predict(&c, &predict_url).await;
            if r.status >= 500 {
                failures += 1;
                assert_eq!(r.header("x-switchyard-variant"), Some("bad"), "{kind}");
            }
        }
        assert_eq!(
            failures, 3,
            "{kind}: exactly consecutive_failures reach clients"
        );
        let m = metrics(app.admin_addr).await;
        assert_eq!(
            counter(&m, r#"switchyard_variant_state{model="m",variant="bad"}"#),
            1.0,
            "{kind}"
        );
        assert_eq!(
            counter(&m, r#"switchyard_variant_state{model="m",variant="good"}"#),
            0.0
        );
        let state = admin_json(app.admin_addr, "/admin/state").await;
        assert_eq!(
            state["breakers"]["m"]["bad"]["breaker"], "open",
            "{kind}: {state}"
        );
        assert!(
            state["breakers"]["m"]["bad"]["ejected_for_seconds"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
}

/// An upstream that closes its keep-alive connection after answering its own 500 (as
/// MLServer does): the next request on that pooled connection is not a 502; it is
/// retried on another variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_after_a_500_is_retried_not_a_502() {
    let closer = raw_upstream(|mut stream| async move {
        let mut buf = [0u8; 8192];
        if let Ok(n) = stream.read(&mut buf).await {
            if n > 0 {
                let body = r#"{"error":"model failed"}"#;
                let head = format!(
                    "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
            }
        }
        // Keep-alive was implied; close anyway, as MLServer does after its 500s, but
        // only once the next request on this connection has arrived: the race a
        // pooled connection loses in production, made certain.
        let _ = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
    })
    .await;
    let good = Upstream::echo("good").await;
    // Every request to the closer after its first meets a closed connection: half of
    // all requests need a retry, beyond the default budget's 20%. A budget of 1 lets
    // each request retry once, so the test is about the reset, not the budget.
    let app = start(&format!(
        "seed: 11\nmodels:\n  m:\n    retry: {{budget: 1.0}}\n    breaker: {{consecutive_failures: 1000, min_requests: 1000}}\n    variants:\n      - {{name: closer, upstream: \"http://{closer}\", weight: 1}}\n      - {{name: good, upstream: \"{}\", weight: 1}}\n",
        good.url()
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    let mut statuses = std::collections::BTreeMap::new();
    let mut retried = 0;
    for _ in 0..200 {
        let r = predict(&c, &url).await;
        *statuses.entry(r.status).or_insert(0) += 1;
        assert_ne!(r.status, 502, "{:?}", r.body);
        if r.header("x-switchyard-retries").is_some() {
            // The retry carried the client's request id to the other variant.
            retried += 1;
            assert_eq!(r.header("x-switchyard-variant"), Some("good"));
            assert_eq!(
                r.json()["x_request_id"].as_str(),
                r.header("x-request-id"),
                "{:?}",
                r.body
            );
        }
    }
    assert!(retried > 0, "no request met a closed pooled connection");
    // The closer's own 500s reach the client (5xx is not retried by default); no 502.
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 50,
        "{statuses:?}"
    );
}

/// Retries stay within the budget: every variant refuses, breakers never open (so each
/// request would try all four), and retries are at most budget × requests +
/// min_per_second × the run's seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget() {
    let mut variants = String::new();
    for i in 0..4 {
        variants.push_str(&format!(
            "      - {{name: v{i}, upstream: \"http://{}\", weight: 1}}\n",
            refused_addr().await
        ));
    }
    // From before the sidecar (and its budget) starts.
    let began = std::time::Instant::now();
    let app = start(&format!(
        "models:\n  m:\n    retry: {{budget: 0.2, min_per_second: 3}}\n    breaker: {{consecutive_failures: 1000000, min_requests: 1000000}}\n    variants:\n{variants}"
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    let n = 1000;
    for _ in 0..n {
        let r = predict(&c, &url).await;
        assert_eq!(r.status, 502);
    }
    let m = metrics(app.admin_addr).await;
    let retried = counter(
        &m,
        r#"switchyard_retries_total{model="m",reason="connect"}"#,
    );
    let refused = counter(
        &m,
        r#"switchyard_retries_refused_total{model="m",reason="connect"}"#,
    );
    let seconds = began.elapsed().as_secs_f64();
    // Unbudgeted, each request would retry 3 times: 3,000.
    let bound = 0.2 * n as f64 + 3.0 * seconds;
    assert!(
        retried > 0.0 && retried <= bound,
        "{retried} retries, bound {bound}"
    );
    assert!(refused > 0.0, "the budget refused none");
}

/// With `hedge_after`, a request a slow variant has not answered in time is also asked
/// of the fallback, whose answer wins; the slow request is cancelled (its connection
/// closed before it answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_to_the_fallback_wins_and_the_slow_request_is_cancelled() {
    let cancelled = Arc::new(AtomicUsize::new(0));
    let seen = cancelled.clone();
    // Reads a request, then waits up to 5 s for the client to go away.
    let slow = raw_upstream(move |mut stream| {
        let seen = seen.clone();
        async move {
            let mut buf = [0u8; 8192];
            if !matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                return;
            }
            let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
            if matches!(closed, Ok(Ok(0)) | Ok(Err(_))) {
                seen.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .await;
    let app = start(&format!(
        "models:\n  digits:\n    request_timeout: 10s\n    hedge_after: 50ms\n    fallback: cpu\n    variants:\n      - {{name: slow, upstream: \"http://{slow}\", weight: 1}}\n      - {{name: cpu, weight: 0, local: {{model: \"builtin:digits_mlp\"}}}}\n"
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    for _ in 0..5 {
        let r = send(&c, "POST", &url, &[], &tf_body()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-switchyard-variant"), Some("cpu"));
        assert_eq!(r.header("x-switchyard-hedge"), Some("won"));
        assert_eq!(r.json()["predictions"][0].as_array().unwrap().len(), 10);
    }
    for _ in 0..200 {
        if cancelled.load(Ordering::SeqCst) == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        cancelled.load(Ordering::SeqCst),
        5,
        "slow requests not cancelled"
    );
    let m = metrics(app.admin_addr).await;
    assert_eq!(
        counter(
            &m,
            r#"switchyard_hedges_total{model="digits",outcome="won"}"#
        ),
        5.0
    );
}

/// A remote variant that refuses and a weight-0 local fallback: every request is
/// answered by the fallback, first because the variant failed, then because it is
/// ejected; the headers say so, and the decision goes to the variant that answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_answers_when_the_variants_cannot_and_says_why() {
    let app = start(&format!(
        "models:\n  digits:\n    bandit: {{objective: conversion}}\n    fallback: cpu\n    retry: {{on: []}}\n    breaker: {{consecutive_failures: 2}}\n    variants:\n      - {{name: remote, upstream: \"http://{}\", weight: 1}}\n      - {{name: cpu, weight: 0, local: {{model: \"builtin:digits_mlp\"}}}}\n",
        refused_addr().await
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let mut reasons = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..6 {
        let r = send(&c, "POST", &url, &[], &tf_body()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-switchyard-variant"), Some("cpu"));
        reasons.push(r.header("x-switchyard-fallback").unwrap().to_string());
        ids.push(r.header("x-request-id").unwrap().to_string());
    }
    assert_eq!(reasons[..2], ["failed", "failed"], "{reasons:?}");
    assert!(
        reasons[2..].iter().all(|r| r == "no_ready_variant"),
        "{reasons:?}"
    );
    let m = metrics(app.admin_addr).await;
    assert_eq!(
        counter(
            &m,
            r#"switchyard_fallbacks_total{model="digits",reason="failed"}"#
        ),
        2.0
    );
    // Feedback for a fallback answer credits the fallback's arm.
    let fb = send(
        &c,
        "POST",
        &format!("http://{}/v1/feedback", app.data_addr),
        &[],
        &serde_json::json!({ "request_id": ids[0], "converted": true }).to_string(),
    )
    .await;
    assert_eq!(fb.status, 200, "{:?}", fb.body);
    let mut credited = Value::Null;
    for _ in 0..100 {
        let m = metrics(app.admin_addr).await;
        let v = counter(
            &m,
            r#"switchyard_bandit_rewards_total{model="digits",variant="cpu"}"#,
        );
        if v >= 1.0 {
            credited = Value::from(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(credited, Value::from(1.0));
}

/// A variant that hangs, at half the weight, with timeouts retried: every request is
/// answered by the healthy variant, and the hanging one is ejected after
/// `consecutive_failures` instead of keeping its share. The budget is 1 (each request may
/// retry once): at a cold start all 16 clients' first requests can be on the hanging
/// variant before it is ejected, and the default 20% of requests (the bucket starts
/// empty) would rightly refuse most of those retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_variant_is_ejected_and_its_share_served_elsewhere() {
    let (hanging, accepted) = hanging_upstream().await;
    let good = Upstream::echo("good").await;
    let app = start(&format!(
        "models:\n  m:\n    request_timeout: 200ms\n    retry: {{on: [connect, reset, timeout], budget: 1.0}}\n    breaker: {{consecutive_failures: 3, base_ejection: 60s, max_ejection: 60s}}\n    variants:\n      - {{name: hang, upstream: \"http://{hanging}\", weight: 1}}\n      - {{name: good, upstream: \"{}\", weight: 1}}\n",
        good.url()
    ))
    .await;
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut ok = 0;
            for _ in 0..25 {
                let r = predict(&c, &url).await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                assert_eq!(r.header("x-switchyard-variant"), Some("good"));
                ok += 1;
            }
            ok
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    assert_eq!(answered, 400);
    // Requests that reached the hanging variant: those in flight when it was ejected
    // (at most 16, one per client) plus the failures that ejected it, not half of 400.
    let reached = accepted.load(Ordering::SeqCst);
    assert!(
        reached <= 16 + 3,
        "{reached} connections reached the hanging variant"
    );
}

/// A local model shedding load (its queue full, 503) is not a broken variant: its
/// breaker stays closed, and the next request is answered. The queue is filled without
/// depending on how fast requests arrive: a 3-row request waits (up to 10 s) for its
/// 4-row batch to fill, so 2-row requests meanwhile do not fit (the queue holds 4 rows)
/// and are refused at once; a 1-row request then fills the batch and both are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shedding_does_not_eject_a_local_model() {
    let app = start(
        "models:\n  digits:\n    breaker: {consecutive_failures: 2}\n    variants:\n      - {name: cpu, weight: 1, local: {model: \"builtin:digits_mlp\", batching: {max_batch_size: 4, batch_timeout_micros: 10000000, num_batch_threads: 1, max_enqueued_batches: 1}}}\n",
    )
    .await;
    let url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let rows = |n: usize| format!(r#"{{"instances": [{}]}}"#, vec![DIGIT; n].join(","));
    let waiting = {
        let (url, body) = (url.clone(), rows(3));
        tokio::spawn(async move { send(&client(), "POST", &url, &[], &body).await })
    };
    // Queued: bounded by the batch's own 10 s, far beyond what queueing takes.
    let mut queued = false;
    for _ in 0..400 {
        let m = metrics(app.admin_addr).await;
        if m.lines()
            .any(|l| l.starts_with("switchyard_local_queued_rows{") && l.ends_with(" 3"))
        {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(queued, "the 3-row request never showed in the queue");
    for i in 0..3 {
        let r = send(&client(), "POST", &url, &[], &rows(2)).await;
        assert_eq!(
            r.status, 503,
            "2-row request {i} was not shed: {:?}",
            r.body
        );
    }
    let m = metrics(app.admin_addr).await;
    assert_eq!(
        counter(
            &m,
            r#"switchyard_variant_state{model="digits",variant="cpu"}"#
        ),
        0.0,
        "shedding opened the breaker"
    );
    let r = send(&client(), "POST", &url, &[], &rows(1)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let first = waiting.await.unwrap();
    assert_eq!(first.status, 200, "{:?}", first.body);
    let answer: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(answer["predictions"].as_array().map(Vec::len), Some(3));
}

/// Every variant ejected and no fallback: requests still go to the variants (Envoy's
/// panic routing) rather than all being refused; a variant that recovered answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_variant_ejected_and_no_fallback_requests_still_go_out() {
    let flaky = Arc::new(AtomicUsize::new(0));
    let count = flaky.clone();
    // Fails its first three requests, then answers.
    let up = model_server(Duration::ZERO, move |_, _| {
        if count.fetch_add(1, Ordering::SeqCst) < 3 {
            (500, r#"{"error":"warming up"}"#.into())
        } else {
            (200, r#"{"predictions":[[1]]}"#.into())
        }
    })
    .await;
    let app = start(&format!(
        "models:\n  m:\n    breaker: {{consecutive_failures: 3, base_ejection: 60s, max_ejection: 60s}}\n    variants:\n      - {{name: only, upstream: \"{}\", weight: 1}}\n",
        up.url()
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    for _ in 0..3 {
        assert_eq!(predict(&c, &url).await.status, 500);
    }
    let m = metrics(app.admin_addr).await;
    assert_eq!(
        counter(&m, r#"switchyard_variant_state{model="m",variant="only"}"#),
        1.0
    );
    // Ejected for a minute, but the only variant: it still gets the requests.
    let r = predict(&c, &url).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-switchyard-variant"), Some("only"));
}
