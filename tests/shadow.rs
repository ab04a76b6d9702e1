//! Shadow traffic end to end: real model servers on loopback, Switchyard in-process.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Waits (bounded) until every mirror chosen so far has finished (answered, failed or
/// been dropped), then returns the report of shadow `name`.
async fn settled(admin: SocketAddr, model: &str, name: &str, chosen_at_least: u64) -> Value {
    for _ in 0..1000 {
        let report = admin_json(admin, &format!("/admin/shadow/{model}")).await;
        let s = report["shadows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no shadow {name} in {report}"))
            .clone();
        let n = |k: &str| s[k].as_u64().unwrap();
        let finished = n("compared") + n("errors");
        if n("mirrored") + n("dropped") >= chosen_at_least
            && n("in_flight") == 0
            && n("queued") == 0
            && finished >= n("mirrored")
        {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("shadow {name} never settled");
}

fn seen_ids(u: &Upstream) -> BTreeSet<String> {
    u.seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.headers["x-request-id"].to_str().unwrap().to_string())
        .collect()
}

const PREDICTION: &str = r#"{"predictions": [[0.1, 0.9]]}"#;

#[tokio::test]
async fn a_random_fraction_is_mirrored_with_the_primarys_id_and_a_rewritten_model() {
    let primary = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    let shadow = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    let sy = start(&format!(
        r#"
seed: 11
models:
  m:
    variants: [{{name: a, upstream: "{}", weight: 1}}]
    shadows:
      - name: cand
        upstream: "{}"
        upstream_model: m_next
        fraction: 0.2
        max_queue: 4096   # the shadow thread runs at nice 19: a busy CI box may starve it
"#,
        primary.url(),
        shadow.url()
    ))
    .await;
    let client = client();
    let n = 2000;
    for i in 0..n {
        let r = send(
            &client,
            "POST",
            &format!("http://{}/v1/models/m:predict", sy.data_addr),
            &[("x-request-id", &format!("r{i}")), ("x-extra", "kept")],
            r#"{"instances": [[1.0]]}"#,
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            PREDICTION.as_bytes(),
            "the client gets the primary's answer"
        );
    }
    let s = settled(sy.admin_addr, "m", "cand", 0).await;
    let mirrored = s["mirrored"].as_u64().unwrap() as usize;
    assert_eq!(s["dropped"], 0, "{s}");
    assert!(
        within_5_sigma(mirrored, n, 0.2),
        "{mirrored} of {n} mirrored"
    );
    assert_eq!(shadow.hits(), mirrored);
    assert_eq!(s["compared"].as_u64().unwrap() as usize, mirrored);
    assert_eq!(s["agreement"], 1.0);
    for req in shadow.seen.lock().unwrap().iter() {
        assert_eq!(req.path, "/v1/models/m_next:predict");
        assert_eq!(req.headers["x-switchyard-shadow"], "1");
        assert_eq!(req.headers["x-extra"], "kept");
        assert_eq!(req.body, r#"{"instances": [[1.0]]}"#);
    }
    // Every mirrored id is one the primary also answered.
    let primary_ids = seen_ids(&primary);
    assert!(seen_ids(&shadow).is_subset(&primary_ids));
    let m = metrics(sy.admin_addr).await;
    assert_eq!(
        sample(
            &m,
            r#"switchyard_shadow_mirrored_total{model="m",shadow="cand"}"#
        ),
        Some(mirrored as f64)
    );
    assert_eq!(
        sample(
            &m,
            r#"switchyard_shadow_agreement_ratio{model="m",shadow="cand"}"#
        ),
        Some(1.0)
    );
}

/// The ids two shadows in hash mode mirror, for one run of `n` requests.
async fn hash_run(n: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    let primary = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    let one = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    let two = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    // No seed: random sampling would differ between runs; hash sampling must not.
    let sy = start(&format!(
        r#"
models:
  m:
    variants: [{{name: a, upstream: "{}", weight: 1}}]
    shadows:
      - {{name: one, upstream: "{}", fraction: 0.3, sampling: hash}}
      - {{name: two, upstream: "{}", fraction: 0.3, sampling: hash, protocol: h2c}}
"#,
        primary.url(),
        one.url(),
        two.url()
    ))
    .await;
    let client = client();
    for i in 0..n {
        let r = send(
            &client,
            "POST",
            &format!("http://{}/v2/models/m/infer", sy.data_addr),
            &[("x-request-id", &format!("user-{i}"))],
            r#"{"inputs": []}"#,
        )
        .await;
        assert_eq!(r.status, 200);
    }
    settled(sy.admin_addr, "m", "one", 0).await;
    settled(sy.admin_addr, "m", "two", 0).await;
    assert!(two
        .seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.version == http::Version::HTTP_2));
    (seen_ids(&one), seen_ids(&two))
}

#[tokio::test]
async fn hash_sampling_picks_the_same_requests_every_run_and_for_every_shadow() {
    let n = 600;
    let (one, two) = hash_run(n).await;
    assert_eq!(one, two, "both shadows get the same requests");
    assert!(within_5_sigma(one.len(), n, 0.3), "{} of {n}", one.len());
    let (again, _) = hash_run(n).await;
    assert_eq!(one, again, "a second run mirrors the same requests");
}

#[tokio::test]
async fn a_dead_or_hanging_shadow_neither_fails_nor_holds_the_primary_and_stays_bounded() {
    let primary = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    let (hanging, accepted) = hanging_upstream().await;
    let refused = refused_addr().await;
    let sy = start(&format!(
        r#"
models:
  m:
    variants: [{{name: a, upstream: "{}", weight: 1}}]
    shadows:
      - {{name: hangs, upstream: "http://{hanging}", fraction: 1, max_concurrency: 2, max_queue: 3, request_timeout: 1h}}
      - {{name: dead, upstream: "http://{refused}", fraction: 1}}
"#,
        primary.url(),
    ))
    .await;
    let client = client();
    let n = 200;
    let url = format!("http://{}/v1/models/m:predict", sy.data_addr);
    let mut tasks = Vec::new();
    for c in 0..8 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 8 {
                let r = predict(&client, &url).await;
                assert_eq!(r.status, 200, "client {c}");
                assert_eq!(r.body, PREDICTION.as_bytes());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Every primary answered while the hanging shadow still holds its mirrors (its
    // timeout is an hour): the primary never waited for it.
    // The shadow thread (nice 19) may not have picked its jobs up yet on a busy box.
    let mut report = Value::Null;
    for _ in 0..500 {
        report = admin_json(sy.admin_addr, "/admin/shadow/m").await;
        if report["shadows"][0]["in_flight"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hangs = &report["shadows"][0];
    assert_eq!(hangs["name"], "hangs");
    assert_eq!(hangs["in_flight"], 2, "{hangs}");
    assert_eq!(hangs["compared"], 0);
    // Bounded: two in flight (one per worker), three queued; everything else was
    // dropped, not buffered.
    let mirrored = hangs["mirrored"].as_u64().unwrap();
    assert!(mirrored <= 2 + 3, "{hangs}");
    assert_eq!(mirrored + hangs["dropped"].as_u64().unwrap(), n as u64);
    assert_eq!(
        hangs["dropped_by_reason"]["queue_full"],
        n as u64 - mirrored
    );
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    let dead = settled(sy.admin_addr, "m", "dead", n as u64).await;
    assert_eq!(dead["compared"], 0);
    assert_eq!(
        dead["errors_by_kind"]["connect"].as_u64().unwrap(),
        dead["mirrored"].as_u64().unwrap()
    );
    assert_eq!(primary.hits(), n);
}

/// Known answers: the shadow agrees, flips the top class, changes shape, answers
/// non-JSON or fails, depending on the case in the request.
fn primary_answer(_: &str, body: &[u8]) -> (u16, String) {
    let v2 = String::from_utf8_lossy(body).contains("v2");
    if v2 {
        (
            200,
            r#"{"model_name":"m","outputs":[{"name":"p","shape":[2,2],"datatype":"FP32","data":[0.1,0.9,0.7,0.3]}]}"#.into(),
        )
    } else {
        (200, r#"{"predictions": [[0.1, 0.9], [0.7, 0.3]]}"#.into())
    }
}

fn shadow_answer(_: &str, body: &[u8]) -> (u16, String) {
    let case = String::from_utf8_lossy(body);
    let tf = |rows: &str| (200, format!(r#"{{"predictions": {rows}}}"#));
    match case.trim() {
        // Same top-1 on both rows; largest gap |0.9 - 0.6| = 0.3.
        "agree" => tf("[[0.4, 0.6], [0.8, 0.2]]"),
        // Second row flips; largest gap |0.3 - 0.9| = 0.6.
        "flip" => tf("[[0.1, 0.9], [0.1, 0.9]]"),
        "shape" => tf("[[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]"),
        "text" => (200, "<html>oops</html>".into()),
        "fail" => (500, r#"{"error":"boom"}"#.into()),
        // Same rows as the primary's V2 answer, both agreeing; gap 0.05.
        "v2" => (
            200,
            r#"{"model_name":"m_next","outputs":[{"name":"p","shape":[2,2],"datatype":"FP32","data":[0.15,0.85,0.7,0.3]}]}"#.into(),
        ),
        other => panic!("unexpected case {other}"),
    }
}

#[tokio::test]
async fn comparisons_are_right_on_known_outputs_and_disagreements_are_kept_and_logged() {
    let primary = model_server(Duration::ZERO, primary_answer).await;
    let shadow = model_server(Duration::ZERO, shadow_answer).await;
    let dir = std::env::temp_dir().join(format!("sy-shadow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("disagreements.jsonl");
    let _ = std::fs::remove_file(&log);
    let sy = start(&format!(
        r#"
models:
  m:
    variants: [{{name: a, upstream: "{}", weight: 1}}]
    shadows:
      - name: cand
        upstream: "{}"
        fraction: 1.0
        keep_disagreements: 3
        disagreements_file: "{}"
"#,
        primary.url(),
        shadow.url(),
        log.display()
    ))
    .await;
    let client = client();
    let cases = [
        ("agree", 3),
        ("flip", 2),
        ("shape", 1),
        ("text", 1),
        ("fail", 1),
        ("v2", 2),
    ];
    let mut total = 0;
    for (case, times) in cases {
        for i in 0..times {
            // One at a time, each compared before the next is sent, so that "latest"
            // and the log's order are the order of the requests.
            settled(sy.admin_addr, "m", "cand", total).await;
            let path = if case == "v2" {
                "/v2/models/m/infer"
            } else {
                "/v1/models/m:predict"
            };
            let r = send(
                &client,
                "POST",
                &format!("http://{}{path}", sy.data_addr),
                &[("x-request-id", &format!("{case}-{i}"))],
                case,
            )
            .await;
            assert_eq!(r.status, 200);
            total += 1;
        }
    }
    let s = settled(sy.admin_addr, "m", "cand", total).await;
    assert_eq!(s["compared"], total, "{s}");
    let v = &s["verdicts"];
    assert_eq!(v["agree"], 3 + 2, "{v}");
    assert_eq!(v["top1"], 2);
    assert_eq!(v["shape"], 1);
    assert_eq!(v["not_json"], 1);
    assert_eq!(v["status"], 1);
    assert_eq!(s["agreement"], 5.0 / 10.0);
    // Same-shape pairs: agree (0.3, three times), flip (0.6, twice), v2 (0.05, twice).
    let max = s["max_abs_diff"]["max"].as_f64().unwrap();
    assert!((max - 0.6).abs() < 1e-9, "{max}");
    let mean = s["max_abs_diff"]["mean"].as_f64().unwrap();
    let want = (3.0 * 0.3 + 2.0 * 0.6 + 2.0 * 0.05) / 7.0;
    assert!((mean - want).abs() < 1e-9, "{mean} vs {want}");
    // The latest three disagreements, newest first, with both answers.
    let recent = s["disagreements"].as_array().unwrap();
    let ids: Vec<&str> = recent
        .iter()
        .map(|d| d["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["fail-0", "text-0", "shape-0"]);
    assert_eq!(recent[0]["reason"], "status");
    assert_eq!(recent[0]["primary"]["status"], 200);
    assert_eq!(recent[0]["shadow"]["status"], 500);
    assert_eq!(recent[0]["shadow"]["output"]["error"], "boom");
    assert_eq!(recent[1]["shadow"]["output"], "<html>oops</html>");
    assert!(recent[0]["primary"]["latency_ms"].as_f64().unwrap() > 0.0);
    // The file has all five, in order.
    let mut lines = Vec::new();
    for _ in 0..500 {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>();
        if lines.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let logged: Vec<&str> = lines
        .iter()
        .map(|d| d["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(logged, ["flip-0", "flip-1", "shape-0", "text-0", "fail-0"]);
    assert_eq!(lines[0]["rows"], 2);
    assert_eq!(lines[0]["rows_agreeing"], 1);
    let m = metrics(sy.admin_addr).await;
    assert_eq!(
        sample(
            &m,
            r#"switchyard_shadow_compared_total{model="m",shadow="cand",verdict="top1"}"#
        ),
        Some(2.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn oversized_bodies_are_not_mirrored_but_counted() {
    let primary = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    let shadow = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    let sy = start(&format!(
        r#"
models:
  m:
    max_body_bytes: 64
    variants: [{{name: a, upstream: "{}", weight: 1}}]
    shadows: [{{name: cand, upstream: "{}", fraction: 1}}]
"#,
        primary.url(),
        shadow.url()
    ))
    .await;
    let url = format!("http://{}/v1/models/m:predict", sy.data_addr);
    let r = send(&client(), "POST", &url, &[], &"x".repeat(100)).await;
    assert_eq!(r.status, 413);
    let r = predict(&client(), &url).await;
    assert_eq!(r.status, 200);
    let s = settled(sy.admin_addr, "m", "cand", 2).await;
    assert_eq!(s["dropped_by_reason"]["too_large"], 1, "{s}");
    assert_eq!(s["mirrored"], 1);
    assert_eq!(shadow.hits(), 1);
    assert_eq!(primary.hits(), 1);
}

#[tokio::test]
async fn a_local_primary_is_mirrored_and_compared_too() {
    // The shadow answers like the bundled MLP would only by chance: compare shapes.
    let shadow = model_server(Duration::ZERO, |_, _| {
        (200, format!(r#"{{"predictions": [{:?}]}}"#, [0.1f32; 10]))
    })
    .await;
    let sy = start(&format!(
        r#"
models:
  digits:
    variants: [{{name: mlp, local: {{model: "builtin:digits_mlp"}}, weight: 1}}]
    shadows: [{{name: cand, upstream: "{}", fraction: 1}}]
"#,
        shadow.url()
    ))
    .await;
    let pixels = vec!["0.0"; 64].join(",");
    let r = send(
        &client(),
        "POST",
        &format!("http://{}/v1/models/digits:predict", sy.data_addr),
        &[],
        &format!(r#"{{"instances": [[{pixels}]]}}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let s = settled(sy.admin_addr, "digits", "cand", 1).await;
    assert_eq!(s["compared"], 1, "{s}");
    // Ten probabilities per row on both sides: same shape, so a numeric difference.
    assert!(s["max_abs_diff"]["max"].as_f64().is_some(), "{s}");
    let sent = format!(r#"{{"instances": [[{pixels}]]}}"#);
    assert_eq!(shadow.seen.lock().unwrap()[0].body, sent.as_bytes());
}

#[tokio::test]
async fn unknown_model_at_the_shadow_endpoint_is_404() {
    let primary = model_server(Duration::ZERO, |_, _| (200, PREDICTION.into())).await;
    let sy = start(&format!(
        r#"
models:
  m:
    variants: [{{name: a, upstream: "{}", weight: 1}}]
"#,
        primary.url()
    ))
    .await;
    let r = send(
        &client(),
        "GET",
        &format!("http://{}/admin/shadow/nope", sy.admin_addr),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("nope"));
    let none = admin_json(sy.admin_addr, "/admin/shadow/m").await;
    assert_eq!(none["shadows"], serde_json::json!([]));
}

/// `capture:` keeps the predictions under the margin, and only those, with their inputs
/// and outputs, off the request path; the file rotates at `max_bytes` (at most twice it
/// on disk); the counters say how many were looked at and kept.
#[tokio::test]
async fn capture_keeps_borderline_predictions_and_rotates_its_file() {
    // Even request numbers get a sure answer, odd ones a borderline one (0.52 vs 0.48).
    let primary = model_server(Duration::ZERO, |_, body| {
        let n: u64 = serde_json::from_slice::<Value>(body).unwrap()["instances"][0][0]
            .as_u64()
            .unwrap();
        let row = if n.is_multiple_of(2) {
            "[0.9, 0.1]"
        } else {
            "[0.48, 0.52]"
        };
        (200, format!(r#"{{"predictions": [{row}]}}"#))
    })
    .await;
    let dir = std::env::temp_dir().join(format!("switchyard-capture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("borderline.jsonl");
    let app = start(&format!(
        "models:\n  m:\n    capture: {{margin: 0.1, file: \"{}\", max_bytes: 4KiB}}\n    variants:\n      - {{name: a, weight: 1, upstream: \"{}\"}}\n",
        file.display(),
        primary.url()
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    for n in 0..100u64 {
        let r = send(
            &c,
            "POST",
            &url,
            &[],
            &format!(r#"{{"instances": [[{n}, 1]]}}"#),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    // Bounded: the shadow thread and the writer thread finish by themselves.
    let mut kept = 0.0;
    for _ in 0..500 {
        let m = metrics(app.admin_addr).await;
        kept = sample(&m, r#"switchyard_capture_borderline_total{model="m"}"#).unwrap_or(0.0);
        if kept >= 50.0 {
            assert_eq!(
                sample(&m, r#"switchyard_capture_predictions_total{model="m"}"#),
                Some(100.0)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(kept, 50.0, "the 50 borderline answers, and only those");
    let rotated = dir.join("borderline.jsonl.1");
    let mut lines = Vec::new();
    for _ in 0..500 {
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        lines = read(&rotated)
            .lines()
            .chain(read(&file).lines())
            .map(str::to_string)
            .collect::<Vec<_>>();
        if std::fs::metadata(&rotated).is_ok() && !lines.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for f in [&file, &rotated] {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= 4096, "{} is {len} bytes", f.display());
    }
    assert!(!lines.is_empty());
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        let n = v["inputs"]["instances"][0][0].as_u64().unwrap();
        assert!(!n.is_multiple_of(2), "a sure prediction was kept: {v}");
        assert_eq!(v["variant"], "a");
        assert!(
            (v["margins"][0].as_f64().unwrap() - 0.04).abs() < 1e-9,
            "{v}"
        );
        assert_eq!(v["outputs"]["predictions"][0][1], 0.52);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A shadow's idle worker connections are closed after `upstream_idle_timeout`, as the
/// primary's are: a quiet shadow holds no sockets, and none outlives the model server's
/// own keep-alive. The next mirror opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shadow_connections_close_after_upstream_idle_timeout() {
    use std::sync::atomic::Ordering::SeqCst;
    let primary = Upstream::echo("m").await;
    let shadow = Upstream::echo("cand").await;
    let app = start(&format!(
        r#"
upstream_idle_timeout: 300ms
models:
  m:
    variants: [{{name: a, upstream: "{}", weight: 1}}]
    shadows:
      - {{name: cand, upstream: "{}", fraction: 1.0, max_concurrency: 2}}
"#,
        primary.url(),
        shadow.url()
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    for _ in 0..3 {
        assert_eq!(predict(&c, &url).await.status, 200);
    }
    shadow.wait_for_hits(3).await;
    assert!(shadow.connections.load(SeqCst) >= 1);
    // 20 s is a bound far beyond the timeout, not a measurement.
    assert!(
        shadow.all_closed_within(Duration::from_secs(20)).await,
        "the shadow's idle connections are closed by the sidecar: {} still open",
        shadow.open.load(SeqCst)
    );
    let before = shadow.connections.load(SeqCst);
    assert_eq!(predict(&c, &url).await.status, 200);
    shadow.wait_for_hits(4).await;
    assert!(
        shadow.connections.load(SeqCst) > before,
        "a new connection for the next mirror"
    );
}
