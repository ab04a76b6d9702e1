//! Hot reload end to end: `POST /admin/reload`, `SIGHUP` and `serve --watch` over real
//! sockets, with traffic in flight; what survives a reload and what a refused one leaves.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use tokio::net::TcpListener;

/// A fresh directory for one test's config file.
fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("switchyard-reload-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts Switchyard in-process from the config file at `path`, as `serve --config` does.
async fn start_file(path: &Path) -> switchyard::Running {
    let text = std::fs::read_to_string(path).unwrap();
    let config = switchyard::parse_config(&text).unwrap_or_else(|e| panic!("{e}"));
    let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = switchyard::StartOptions {
        file: Some((path.to_path_buf(), switchyard::reload::config_hash(&text))),
        overrides: switchyard::Overrides::default(),
    };
    switchyard::start_with(config, data, admin, options).unwrap()
}

/// `POST /admin/reload`: its status and JSON.
async fn reload(app: &switchyard::Running) -> (u16, Value) {
    let r = send(
        &client(),
        "POST",
        &format!("http://{}/admin/reload", app.admin_addr),
        &[],
        "",
    )
    .await;
    (r.status, r.json())
}

/// A model `m` over the upstreams, `name=url:weight` each.
fn split(variants: &[(&str, &str, f64)]) -> String {
    let mut y = String::from("models:\n  m:\n    variants:\n");
    for (name, url, w) in variants {
        y += &format!("      - {{name: {name}, upstream: \"{url}\", weight: {w}}}\n");
    }
    y
}

/// Twenty reloads while eight clients keep sending: every request is answered 2xx, each
/// reload's weights take effect, and `/admin/config` counts the reloads and shows the
/// live file's hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_fail_no_request() {
    let (a, b, c) = (
        Upstream::echo("a").await,
        Upstream::echo("b").await,
        Upstream::echo("c").await,
    );
    let d = dir("load");
    let file = d.join("switchyard.yaml");
    std::fs::write(&file, split(&[("a", &a.url(), 1.0), ("b", &b.url(), 1.0)])).unwrap();
    let app = start_file(&file).await;
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, ok, bad, url) = (stop.clone(), ok.clone(), bad.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            // Bounded: the reloads below take well under this many requests.
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = predict(&c, &url).await;
                if (200..300).contains(&r.status) {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                    eprintln!("{}: {:?}", r.status, r.body);
                }
            }
        }));
    }
    let mut last_text = String::new();
    for i in 0..20 {
        // Variants come and go, weights move, a second model appears and leaves.
        let mut text = match i % 4 {
            0 => split(&[("a", &a.url(), 1.0), ("b", &b.url(), 0.0)]),
            1 => split(&[
                ("a", &a.url(), 0.0),
                ("b", &b.url(), 1.0),
                ("c", &c.url(), 1.0),
            ]),
            2 => split(&[("b", &b.url(), 1.0), ("c", &c.url(), 3.0)]),
            _ => split(&[("c", &c.url(), 1.0), ("a", &a.url(), 1.0)]),
        };
        if i % 2 == 0 {
            text += &format!(
                "  n:\n    variants:\n      - {{name: x, upstream: \"{}\", weight: 1}}\n",
                a.url()
            );
        }
        std::fs::write(&file, &text).unwrap();
        let before = ok.load(Ordering::Relaxed);
        let (status, body) = reload(&app).await;
        assert_eq!(status, 200, "reload {i}: {body}");
        assert_eq!(body["reloads"], i + 1);
        // Some traffic on each table before the next reload (bounded wait).
        for _ in 0..500 {
            if ok.load(Ordering::Relaxed) >= before + 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        last_text = text;
    }
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.unwrap();
    }
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "non-2xx answers during reloads"
    );
    assert!(ok.load(Ordering::Relaxed) >= 400);

    // The last file (i = 19: c and a, 1:1) is live: both answer, b no longer does.
    let c2 = client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let r = predict(&c2, &url).await;
        seen.insert(r.header("x-switchyard-variant").unwrap().to_string());
    }
    assert_eq!(seen, ["a", "c"].map(String::from).into());
    let config = admin_json(app.admin_addr, "/admin/config").await;
    assert_eq!(config["live"]["reloads"], 20);
    assert_eq!(config["live"]["failed_reloads"], 0);
    assert_eq!(
        config["live"]["hash"],
        switchyard::reload::config_hash(&last_text)
    );
    assert!(config["models"].get("n").is_none());
    let m = metrics(app.admin_addr).await;
    assert_eq!(
        sample(&m, r#"switchyard_config_reloads_total{result="ok"}"#),
        Some(20.0)
    );
    let _ = std::fs::remove_dir_all(d);
}

/// A file with errors changes nothing: 400 with every error, the old routes still
/// serve, the hash stays, the failure is counted. A changed `listen` is refused with a
/// message that a restart is needed.
#[tokio::test]
async fn a_bad_file_changes_nothing_and_says_why() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let d = dir("bad");
    let file = d.join("switchyard.yaml");
    let good = split(&[("a", &a.url(), 1.0), ("b", &b.url(), 0.0)]);
    std::fs::write(&file, &good).unwrap();
    let app = start_file(&file).await;
    let hash = admin_json(app.admin_addr, "/admin/config").await["live"]["hash"].clone();
    assert_eq!(hash, switchyard::reload::config_hash(&good));

    // Two mistakes: both reported, with their lines.
    std::fs::write(
        &file,
        format!(
            "models:\n  m:\n    variants:\n      - {{name: a, upstream: \"{}\", weight: -1}}\n      - {{name: b, upstrem: \"{}\"}}\n",
            a.url(),
            b.url()
        ),
    )
    .unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(status, 400, "{body}");
    let errors: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains(":4:") && e.contains("weight")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains(":5:") && e.contains("upstrem")),
        "{errors:?}"
    );

    // A restart-only key.
    std::fs::write(&file, format!("listen: 127.0.0.1:1\n{good}")).unwrap();
    let (status, body) = reload(&app).await;
    assert_eq!(status, 400, "{body}");
    let error = body["errors"][0].as_str().unwrap();
    assert!(
        error.contains("`listen`") && error.contains("restart"),
        "{error}"
    );

    // A file that cannot be read.
    std::fs::remove_file(&file).unwrap();
    let (status, _) = reload(&app).await;
    assert_eq!(status, 400);

    let c = client();
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    for _ in 0..20 {
        let r = predict(&c, &url).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-switchyard-variant"), Some("a"));
    }
    let config = admin_json(app.admin_addr, "/admin/config").await;
    assert_eq!(config["live"]["hash"], hash);
    assert_eq!(config["live"]["reloads"], 0);
    assert_eq!(config["live"]["failed_reloads"], 3);
    let m = metrics(app.admin_addr).await;
    assert_eq!(
        sample(&m, r#"switchyard_config_reloads_total{result="error"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(&m, &format!("switchyard_config_info{{hash={hash}}}")),
        Some(1.0)
    );
    let _ = std::fs::remove_dir_all(d);
}

/// What a reload keeps for every name that survives: the bandit's posteriors and
/// totals (and feedback for a decision made before the reload still counts, on the
/// same variant), an open breaker, shadow counters, a loaded local model; and what it
/// changes: a new upstream address gets the next requests, a local model whose
/// settings changed is loaded again, removed models and variants leave `/metrics`.
#[tokio::test]
async fn state_survives_and_changes_take_effect() {
    let (a, b, a2, shadow) = (
        Upstream::echo("a").await,
        Upstream::echo("b").await,
        Upstream::echo("a2").await,
        Upstream::echo("shadow").await,
    );
    let dead = refused_addr().await;
    let d = dir("state");
    let file = d.join("switchyard.yaml");
    let write = |a_url: &str, cost: f64, with_c: bool, batch: usize, with_gone: bool| {
        let mut y = format!(
            r#"models:
  rec:
    bandit: {{objective: conversion, warmup: 1000000}}
    shadows:
      - {{name: cand, upstream: "{shadow}", fraction: 1.0}}
    variants:
      - {{name: a, upstream: "{a_url}", weight: 1, cost_per_1k: {cost}}}
      - {{name: b, upstream: "{b}", weight: 1}}
"#,
            shadow = shadow.url(),
            b = b.url(),
        );
        if with_c {
            y += &format!(
                "      - {{name: c, upstream: \"{}\", weight: 1}}\n",
                b.url()
            );
        }
        y += &format!(
            r#"  flaky:
    breaker: {{consecutive_failures: 1, base_ejection: 1h, max_ejection: 1h}}
    variants:
      - {{name: down, upstream: "http://{dead}", weight: 1}}
      - {{name: up, upstream: "{b}", weight: 0}}
  digits:
    variants:
      - name: cpu
        weight: 1
        local: {{model: "builtin:digits_mlp", batching: {{max_batch_size: {batch}}}}}
"#,
            b = b.url(),
        );
        if with_gone {
            y += &format!(
                "  gone:\n    variants:\n      - {{name: only, upstream: \"{}\", weight: 1}}\n",
                b.url()
            );
        }
        std::fs::write(&file, y).unwrap();
    };
    write(&a.url(), 0.0, false, 8, true);
    let app = start_file(&file).await;
    let c = client();
    let base = format!("http://{}", app.data_addr);

    // Bandit: 10 conversions on each variant; one decision kept for after the reload.
    let mut pending = None;
    let mut taught = 0;
    for i in 0..60 {
        let r = predict(&c, &format!("{base}/v1/models/rec:predict")).await;
        assert_eq!(r.status, 200);
        let id = r.header("x-request-id").unwrap().to_string();
        let v = r.header("x-switchyard-variant").unwrap().to_string();
        if i == 0 {
            pending = Some((id, v));
            continue;
        }
        let fb = json!({ "request_id": id, "converted": true }).to_string();
        let r = send(&c, "POST", &format!("{base}/v1/feedback"), &[], &fb).await;
        assert_eq!(r.status, 200);
        taught += 1;
    }
    // The breaker: one failure opens it for an hour.
    let _ = predict(&c, &format!("{base}/v1/models/flaky:predict")).await;
    let state = admin_json(app.admin_addr, "/admin/state").await;
    assert_eq!(
        state["breakers"]["flaky"]["down"]["breaker"], "open",
        "{state}"
    );
    // The local model: three predictions.
    let digit = json!({ "instances": [vec![0.0; 64]] }).to_string();
    let predict_digit = || {
        let (c, url, digit) = (
            c.clone(),
            format!("{base}/v1/models/digits:predict"),
            digit.clone(),
        );
        async move {
            let r = send(&c, "POST", &url, &[], &digit).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    };
    for _ in 0..3 {
        predict_digit().await;
    }
    let gone = predict(&c, &format!("{base}/v1/models/gone:predict")).await;
    assert_eq!(gone.status, 200);
    shadow.wait_for_hits(60).await;

    let before = app.bandit_state();
    let rewards = |s: &Value, v: &str| s["models"]["rec"]["variants"][v]["rewards"].as_u64();
    assert_eq!(
        rewards(&before, "a").unwrap() + rewards(&before, "b").unwrap(),
        taught
    );
    let shadow_report = admin_json(app.admin_addr, "/admin/shadow/rec").await;
    let mirrored = |r: &Value| r["shadows"][0]["mirrored"].as_u64().unwrap();
    let mirrored_before = mirrored(&shadow_report);
    assert!(mirrored_before >= 60, "{shadow_report}");

    // Reload: variant a moves to another server and costs more, c is new, `gone` goes.
    write(&a2.url(), 2.0, true, 8, false);
    let (status, body) = reload(&app).await;
    assert_eq!(status, 200, "{body}");

    let after = app.bandit_state();
    for v in ["a", "b"] {
        assert_eq!(rewards(&after, v), rewards(&before, v), "{v}: {after}");
        assert_eq!(
            after["models"]["rec"]["variants"][v]["posterior"],
            before["models"]["rec"]["variants"][v]["posterior"]
        );
    }
    assert_eq!(rewards(&after, "c"), Some(0));
    // Feedback for the decision made before the reload lands on its variant.
    let (id, v) = pending.unwrap();
    let fb = json!({ "request_id": id, "converted": true }).to_string();
    let r = send(&c, "POST", &format!("{base}/v1/feedback"), &[], &fb).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        rewards(&app.bandit_state(), &v),
        Some(rewards(&before, &v).unwrap() + 1)
    );
    // The breaker is still open.
    let state = admin_json(app.admin_addr, "/admin/state").await;
    assert_eq!(
        state["breakers"]["flaky"]["down"]["breaker"], "open",
        "{state}"
    );
    // Shadow counters go on from where they were.
    let report_after = admin_json(app.admin_addr, "/admin/shadow/rec").await;
    assert!(mirrored(&report_after) >= mirrored_before);
    // Its means live in the shadow's own state (not a metric series): kept too.
    let primary_mean = |r: &Value| r["shadows"][0]["latency_ms"]["primary_mean"].as_f64();
    assert!(primary_mean(&shadow_report).is_some(), "{shadow_report}");
    assert!(primary_mean(&report_after).is_some(), "{report_after}");
    // The local model was kept: its statistics go on.
    let stats = |c: hyper_util::client::legacy::Client<_, _>| {
        let url = format!("{base}/v2/models/digits/stats");
        async move {
            send(&c, "GET", &url, &[], "").await.json()["model_stats"][0]["inference_count"].clone()
        }
    };
    assert_eq!(stats(c.clone()).await, 3);
    // Variant a answers from its new address.
    let hits_a = a.hits();
    for _ in 0..40 {
        let r = predict(&c, &format!("{base}/v1/models/rec:predict")).await;
        assert_eq!(r.status, 200);
        if r.header("x-switchyard-variant") == Some("a") {
            assert_eq!(r.json()["upstream"], "a2");
        }
    }
    assert_eq!(a.hits(), hits_a, "nothing more went to a's old address");
    assert!(a2.hits() > 0);
    // `gone` is gone, and so are its series.
    assert_eq!(
        predict(&c, &format!("{base}/v1/models/gone:predict"))
            .await
            .status,
        404
    );
    let m = metrics(app.admin_addr).await;
    assert!(
        !m.contains(r#"model="gone""#),
        "series of a removed model remain"
    );
    assert!(m.contains(r#"model="rec",variant="c""#));

    // Changed batching settings: the local model is loaded again (fresh statistics).
    write(&a2.url(), 2.0, true, 4, false);
    let (status, body) = reload(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stats(c.clone()).await, 0);
    predict_digit().await;
    // Variant c removed again: its series leave, its decisions' feedback is refused.
    write(&a2.url(), 2.0, false, 4, false);
    assert_eq!(reload(&app).await.0, 200);
    let m = metrics(app.admin_addr).await;
    assert!(
        !m.contains(r#"variant="c""#),
        "series of a removed variant remain"
    );
    let _ = std::fs::remove_dir_all(d);
}

/// `SIGHUP` reloads the file of a running `switchyard serve`; `--watch` reloads it when
/// it changes, by itself.
#[tokio::test]
async fn sighup_and_watch_reload_the_binary() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let d = dir("signal");
    for watch in [false, true] {
        let file = d.join(format!("watch-{watch}.yaml"));
        let head = "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n";
        std::fs::write(&file, format!("{head}{}", split(&[("a", &a.url(), 1.0)]))).unwrap();
        let mut args = vec![
            "serve".to_string(),
            "--config".into(),
            file.display().to_string(),
        ];
        if watch {
            args.push("--watch".into());
        }
        let (mut child, (data, admin)) = spawn_switchyard_both(&args);
        let c = client();
        let url = format!("http://{data}/v1/models/m:predict");
        assert_eq!(
            predict(&c, &url).await.header("x-switchyard-variant"),
            Some("a")
        );

        let next = format!("{head}{}", split(&[("b", &b.url(), 1.0)]));
        std::fs::write(&file, &next).unwrap();
        if !watch {
            let pid = i32::try_from(child.id()).unwrap();
            // SAFETY: kill(2) with a child's pid and a signal number.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
        }
        // Bounded: up to 10 s for the signal or the next check of the file.
        let want = switchyard::reload::config_hash(&next);
        let mut live = false;
        for _ in 0..200 {
            let r = send(&c, "GET", &format!("http://{admin}/admin/config"), &[], "").await;
            if r.json()["live"]["hash"] == want {
                live = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(live, "watch={watch}: the new file never went live");
        assert_eq!(
            predict(&c, &url).await.header("x-switchyard-variant"),
            Some("b")
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let _ = std::fs::remove_dir_all(d);
}

/// A rotated Secret: the token files' new contents take effect at a reload, and under
/// `--watch` without one; a token file that cannot be used refuses the reload and keeps
/// the live token; the old token is refused once the new one is in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_token_files_take_effect_without_a_restart() {
    let d = dir("tokens");
    // As the kubelet updates a Secret volume: the new file is swapped in whole.
    let put = |name: &str, text: &str| {
        let tmp = d.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, d.join(name)).unwrap();
    };
    put("admin", "admin-old\n");
    put("feedback", "fb-old");
    let file = d.join("switchyard.yaml");
    std::fs::write(
        &file,
        format!(
            "admin_token_file: {}\nfeedback_token_file: {}\nmodels:\n  m:\n    bandit: {{objective: conversion}}\n    variants:\n      - {{name: a, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n",
            d.join("admin").display(),
            d.join("feedback").display()
        ),
    )
    .unwrap();
    let app = start_file(&file).await;
    let c = client();
    let admin = format!("http://{}", app.admin_addr);
    let post_admin = |path: &'static str, token: &'static str| {
        let (c, url) = (c.clone(), format!("{admin}{path}"));
        async move {
            let auth = format!("Bearer {token}");
            send(&c, "POST", &url, &[("authorization", auth.as_str())], "").await
        }
    };
    let data = format!("http://{}", app.data_addr);
    let body = json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": vec![0.0; 64] }] }).to_string();
    // Feedback's status with `token`: 401 refused; 200 taken (each for a new decision).
    let feedback = |token: &'static str| {
        let (c, data, body) = (c.clone(), data.clone(), body.clone());
        async move {
            let id = send(&c, "POST", &format!("{data}/v2/models/m/infer"), &[], &body)
                .await
                .header("x-request-id")
                .unwrap()
                .to_string();
            let auth = format!("Bearer {token}");
            let fb = json!({ "request_id": id, "converted": true }).to_string();
            let url = format!("{data}/v1/feedback");
            send(&c, "POST", &url, &[("authorization", auth.as_str())], &fb)
                .await
                .status
        }
    };
    assert_eq!(feedback("fb-old").await, 200);

    // A reload (the admin POST itself still with the old token) puts the new one in.
    put("admin", "admin-new\n");
    let r = post_admin("/admin/reload", "admin-old").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["tokens_rotated"], json!(["admin_token_file"]));
    assert_eq!(
        post_admin("/admin/bandit/m/freeze", "admin-old")
            .await
            .status,
        401
    );
    assert_eq!(
        post_admin("/admin/bandit/m/freeze", "admin-new")
            .await
            .status,
        200
    );

    // An emptied token file refuses the reload, naming it; the live token stays.
    put("feedback", "\n");
    let r = post_admin("/admin/reload", "admin-new").await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let error = r.json()["errors"][0].as_str().unwrap().to_string();
    assert!(
        error.contains("`feedback_token_file`") && error.contains("empty"),
        "{error}"
    );
    assert_eq!(feedback("fb-old").await, 200);

    // `--watch`: the new feedback token goes live with no reload and no config change.
    app.watch(Duration::from_millis(20));
    put("feedback", "fb-new\n");
    let mut rotated = false;
    for _ in 0..250 {
        if feedback("fb-old").await == 401 {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated, "the watched token file never took effect");
    assert_eq!(feedback("fb-new").await, 200);

    // Emptied again under `--watch`: counted (and logged) once, not at every check.
    put("feedback", "");
    let count = |m: &str, result: &str| {
        sample(
            m,
            &format!(
                "switchyard_token_rotations_total{{result=\"{result}\",token=\"feedback_token_file\"}}"
            ),
        )
    };
    let mut errors = None;
    for _ in 0..250 {
        errors = count(&metrics(app.admin_addr).await, "error");
        if errors == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        errors,
        Some(2.0),
        "the reload's refusal and the watch's, once"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = metrics(app.admin_addr).await;
    assert_eq!(count(&m, "error"), Some(2.0));
    assert_eq!(count(&m, "ok"), Some(1.0));
    assert_eq!(feedback("fb-new").await, 200);
    // The tokens show nowhere.
    let config = send(&c, "GET", &format!("{admin}/admin/config"), &[], "").await;
    let text = String::from_utf8_lossy(&config.body);
    assert!(!text.contains("fb-new") && !text.contains("admin-new"));
    app.shutdown();
    app.wait().await;
    let _ = std::fs::remove_dir_all(d);
}
