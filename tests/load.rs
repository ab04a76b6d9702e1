//! `switchyard load` end to end: the real binary against real servers on loopback.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::*;

/// The outcome of one `switchyard load` run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The JSON object printed last.
    fn json(&self) -> Value {
        let last = self
            .stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no output; stderr: {}", self.stderr));
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}\n{}", self.stderr))
    }
}

/// Runs the binary off the async workers (the servers keep serving meanwhile), killing
/// it if it has not finished in 60 s: a hang is a failure, not a stuck suite.
async fn load(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("load")
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        for _ in 0..600 {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            panic!("switchyard load {args:?} did not finish within 60 s");
        }
        let out = child.wait_with_output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

const ANSWER: &str = r#"{"predictions": [[0.1, 0.9]]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_counts_are_exact_and_the_warmup_is_left_out() {
    let server = model_server(Duration::ZERO, |_, _| (200, ANSWER.into())).await;
    let url = format!("{}/v1/models/digits:predict", server.url());
    let run = load(&["--requests", "500", "--concurrency", "7", "--json", &url]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r = run.json();
    assert_eq!(r["requests"], 500);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["status"]["200"], 500);
    assert_eq!(server.hits(), 500);
    // The default body is a valid TF Serving request with one of the bundled digits.
    let seen = server.seen.lock().unwrap()[0].clone();
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body["instances"][0].as_array().unwrap().len(), 64);
    assert!(seen.headers["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("load-"));

    let before = server.hits();
    let run = load(&["-n", "300", "-c", "4", "--warmup", "300ms", "--json", &url]).await;
    let r = run.json();
    assert_eq!(r["requests"], 300, "{}", run.stderr);
    let sent = server.hits() - before;
    assert!(sent > 300, "the warm-up sent nothing more ({sent})");
    assert_eq!(r["status"]["200"], 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentiles_are_no_lower_than_a_known_injected_delay() {
    let delay = Duration::from_millis(40);
    let server = model_server(delay, |_, _| (200, ANSWER.into())).await;
    let url = format!("{}/v2/models/m/infer", server.url());
    let r = load(&["-n", "40", "-c", "4", "--json", &url]).await.json();
    assert_eq!(r["requests"], 40);
    // No answer can come before the delay; the upper bound is loose on purpose.
    for p in ["p50", "p90", "p99", "p999", "max"] {
        let ms = r["latency_ms"][p].as_f64().unwrap();
        assert!((40.0..10_000.0).contains(&ms), "{p} = {ms}");
    }
    let body: Value = serde_json::from_slice(&server.seen.lock().unwrap()[0].body).unwrap();
    assert_eq!(body["inputs"][0]["name"], "pixels");
    assert_eq!(body["inputs"][0]["datatype"], "FP32");
}

/// A server that answers at once except for its `stall_at`-th request, which it holds
/// for `stall`.
async fn stalling_server(stall_at: usize, stall: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let count = count.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        if count.fetch_add(1, Ordering::SeqCst) + 1 == stall_at {
                            tokio::time::sleep(stall).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(ANSWER))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_latency_counts_from_the_intended_send_time() {
    // One connection at 200 req/s; request 50 is held 600 ms. Only one request is slow
    // at the server, but the ~120 scheduled during the stall wait behind it: measured
    // from their intended send times, over a quarter of 400 requests take > 100 ms.
    // A generator without the correction would report a p90 of about a millisecond.
    let addr = stalling_server(50, Duration::from_millis(600)).await;
    let url = format!("http://{addr}/v1/models/m:predict");
    let run = load(&["--rate", "200", "-c", "1", "-n", "400", "--json", &url]).await;
    let r = run.json();
    assert_eq!(r["requests"], 400, "{}", run.stderr);
    let p90 = r["latency_ms"]["p90"].as_f64().unwrap();
    assert!(p90 >= 100.0, "p90 {p90} ms: the stall was hidden");
    assert!(r["latency_ms"]["max"].as_f64().unwrap() >= 600.0);
    assert!(r["generator"]["late_sends"].as_u64().unwrap() >= 50, "{r}");
    assert!(
        r["warnings"][0].as_str().unwrap().contains("intended time"),
        "{r}"
    );
}

fn two_variant_config(a: &Upstream, b: &Upstream, bandit: bool) -> String {
    format!(
        r#"
seed: 5
models:
  digits:
{}    variants:
      - {{name: a, upstream: "{}", weight: 1}}
      - {{name: b, upstream: "{}", weight: 1}}
"#,
        if bandit {
            "    bandit: {objective: conversion, update_interval: 100ms, warmup: 1000000}\n"
        } else {
            ""
        },
        a.url(),
        b.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_breaks_down_by_variant_with_server_timing_over_http1_and_h2c() {
    let a = model_server(Duration::ZERO, |_, _| (200, ANSWER.into())).await;
    let b = model_server(Duration::from_millis(5), |_, _| (200, ANSWER.into())).await;
    let sy = start(&two_variant_config(&a, &b, false)).await;
    let url = format!("http://{}/v1/models/digits:predict", sy.data_addr);
    for proto in [None, Some("--h2c")] {
        let mut args = vec!["-n", "400", "-c", "8", "--json"];
        args.extend(proto);
        args.push(&url);
        let run = load(&args).await;
        let r = run.json();
        assert_eq!(r["requests"], 400, "{proto:?}: {}", run.stderr);
        let v = &r["variants"];
        let (na, nb) = (
            v["a"]["requests"].as_u64().unwrap(),
            v["b"]["requests"].as_u64().unwrap(),
        );
        assert_eq!(na + nb, 400);
        assert!(within_5_sigma(na as usize, 400, 0.5), "{na} on a");
        for name in ["a", "b"] {
            let st = &v[name]["server_timing_ms"];
            assert!(
                st["total"].as_f64().unwrap() > 0.0,
                "{proto:?} {name}: {st}"
            );
            assert!(st["upstream"].as_f64().is_some());
        }
        // b's server adds 5 ms: its upstream phase shows it.
        assert!(v["b"]["server_timing_ms"]["upstream"].as_f64().unwrap() >= 5.0);
        assert!(v["b"]["latency_ms"]["p50"].as_f64().unwrap() >= 5.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_revenue_is_posted_as_feedback_and_the_bandit_takes_it() {
    let a = model_server(Duration::ZERO, |_, _| (200, ANSWER.into())).await;
    let b = model_server(Duration::ZERO, |_, _| (200, ANSWER.into())).await;
    let sy = start(&two_variant_config(&a, &b, true)).await;
    let url = format!("http://{}/v1/models/digits:predict", sy.data_addr);
    let run = load(&[
        "-n",
        "300",
        "-c",
        "4",
        "--reward",
        "a=bernoulli(0.9)",
        "--reward",
        "b=bernoulli(0.1)",
        "--feedback-delay",
        "20ms",
        "--json",
        &url,
    ])
    .await;
    let r = run.json();
    let fb = &r["feedback"];
    assert_eq!(fb["sent"], 300, "{r}\n{}", run.stderr);
    assert_eq!(fb["accepted"], 300, "{r}");
    // The conversions reported per variant add up to what was posted.
    let conv = |v: &str| r["variants"][v]["revenue"]["total"].as_f64().unwrap_or(0.0);
    let (na, nb) = (
        r["variants"]["a"]["requests"].as_f64().unwrap(),
        r["variants"]["b"]["requests"].as_f64().unwrap(),
    );
    assert!(conv("a") / na > conv("b") / nb, "{r}");
    // The bandit counted every one of them.
    let mut rewards = 0;
    for _ in 0..300 {
        let state = admin_json(sy.admin_addr, "/admin/state").await;
        let v = &state["models"]["digits"]["variants"];
        rewards = v["a"]["rewards"].as_u64().unwrap() + v["b"]["rewards"].as_u64().unwrap();
        if rewards == 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rewards, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_refused_connections_fail_clearly_and_quickly() {
    let run = load(&["-n", "5", "not-a-url"]).await;
    assert_eq!(run.code, 64);
    assert!(run.stderr.contains("not a usable URL"), "{}", run.stderr);
    let refused = refused_addr().await;
    let run = load(&["-n", "5", &format!("http://{refused}/v1/models/m:predict")]).await;
    assert_eq!(run.code, 69, "{}", run.stderr);
    assert!(run.stderr.contains("cannot connect"), "{}", run.stderr);
    let run = load(&["-n", "5", "--rate", "-3", "http://127.0.0.1:9/x"]).await;
    assert_ne!(run.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_sweep_is_one_table() {
    let server = model_server(Duration::ZERO, |_, _| (200, ANSWER.into())).await;
    let url = format!("{}/v1/models/m:predict", server.url());
    let run = load(&["-n", "200", "-c", "1,4,16", &url]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("concurrency"), "{}", run.stdout);
    let levels: Vec<&str> = lines[1..4]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(levels, ["1", "4", "16"]);
    assert_eq!(server.hits(), 600);
    let r = load(&["-n", "100", "-c", "2,3", "--json", &url])
        .await
        .json();
    assert_eq!(r["sweep"].as_array().unwrap().len(), 2);
    assert_eq!(r["concurrency"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_the_fd_limit_allows_is_refused_with_what_to_do() {
    let server = model_server(Duration::ZERO, |_, _| (200, ANSWER.into())).await;
    let url = format!("{}/v1/models/m:predict", server.url());
    let out = tokio::task::spawn_blocking(move || {
        // `ulimit -n` lowers the hard limit too, so the generator cannot raise it back.
        std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -n 256 && exec {} load -c 2000 -n 10 {url}",
                env!("CARGO_BIN_EXE_switchyard")
            ))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(71), "{stderr}");
    assert!(stderr.contains("file descriptors"), "{stderr}");
    assert!(stderr.contains("--concurrency"), "{stderr}");
    assert_eq!(
        server.hits(),
        0,
        "nothing is sent when the run cannot be done"
    );
}

/// `--grpc`, `--binary` and `--batch` against a local variant: every call answered (200
/// for gRPC's OK), by the variant; a model that does not exist is counted as 404 (gRPC's
/// NOT_FOUND); `--grpc` wants a V2 URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_binary_and_batched_bodies_reach_a_local_variant() {
    let app = start("models:\n  digits:\n    variants:\n      - {name: cpu, weight: 1, local: {model: \"builtin:digits_mlp\"}}\n").await;
    let url = format!("http://{}/v2/models/digits/infer", app.data_addr);
    for extra in [
        &["--grpc"][..],
        &["--grpc", "--batch", "32"],
        &["--binary"],
        &["--binary", "--batch", "32", "--h2c"],
        &["--batch", "32"],
    ] {
        let mut args = vec!["-n", "200", "-c", "4", "--json"];
        args.extend_from_slice(extra);
        args.push(&url);
        let run = load(&args).await;
        assert_eq!(run.code, 0, "{extra:?}: {}", run.stderr);
        let r = run.json();
        assert_eq!(r["status"]["200"], 200, "{extra:?}: {r}");
        assert_eq!(r["variants"]["cpu"]["requests"], 200, "{extra:?}: {r}");
    }
    let missing = format!("http://{}/v2/models/nope/infer", app.data_addr);
    let run = load(&["-n", "20", "-c", "2", "--json", "--grpc", &missing]).await;
    assert_eq!(run.json()["status"]["404"], 20, "{}", run.stdout);
    let tf = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let run = load(&["-n", "20", "--grpc", &tf]).await;
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(run.stderr.contains("V2 URL"), "{}", run.stderr);
    app.shutdown();
    app.wait().await;
}
