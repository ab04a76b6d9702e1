//! Tokens for what changes state: the admin listener's POSTs need `admin_token_file`'s
//! (or `SWITCHYARD_ADMIN_TOKEN`'s) bearer token, `POST /v1/feedback` needs
//! `feedback_token_file`'s; reads stay open; the tokens show nowhere.

mod support;

use serde_json::json;
use support::*;

fn token_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const MODELS: &str = "models:\n  m:\n    bandit: {objective: conversion}\n    variants:\n      - {name: a, weight: 1, local: {model: \"builtin:digits_mlp\"}}\n      - {name: b, weight: 1, local: {model: \"builtin:digits_mlp\"}}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_requests_need_their_token_and_reads_do_not() {
    let admin_file = token_file("admin", "admin-s3cret\n");
    let feedback_file = token_file("feedback", "fb-s3cret");
    let app = start(&format!(
        "admin_token_file: {}\nfeedback_token_file: {}\n{MODELS}",
        admin_file.display(),
        feedback_file.display()
    ))
    .await;
    let c = client();
    let admin = format!("http://{}", app.admin_addr);
    let freeze = format!("{admin}/admin/bandit/m/freeze");
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer fb-s3cret"),
        Some("admin-s3cret"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = send(&c, "POST", &freeze, &headers, "").await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert!(r.json()["error"].as_str().unwrap().contains("Bearer"));
    }
    let r = send(
        &c,
        "POST",
        &freeze,
        &[("authorization", "Bearer admin-s3cret")],
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The reload is a POST too: refused without the token (here, with it, 409: this
    // config came from no file).
    let reload = format!("{admin}/admin/reload");
    assert_eq!(send(&c, "POST", &reload, &[], "").await.status, 401);
    let r = send(
        &c,
        "POST",
        &reload,
        &[("authorization", "Bearer admin-s3cret")],
        "",
    )
    .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    // Reads stay open, and say nothing of the tokens.
    for path in [
        "/metrics",
        "/healthz",
        "/readyz",
        "/admin/config",
        "/admin/state",
    ] {
        let r = send(&c, "GET", &format!("{admin}{path}"), &[], "").await;
        assert_eq!(r.status, 200, "{path}");
        let text = String::from_utf8_lossy(&r.body);
        assert!(!text.contains("s3cret"), "{path} shows a token");
    }
    // Feedback: 401 without its token, taken with it.
    let data = format!("http://{}", app.data_addr);
    let body = json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": vec![0.0; 64] }] }).to_string();
    let id = send(&c, "POST", &format!("{data}/v2/models/m/infer"), &[], &body)
        .await
        .header("x-request-id")
        .unwrap()
        .to_string();
    let feedback = json!({ "request_id": id, "converted": true }).to_string();
    let url = format!("{data}/v1/feedback");
    let r = send(
        &c,
        "POST",
        &url,
        &[("authorization", "Bearer admin-s3cret")],
        &feedback,
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("feedback_token_file"));
    let r = send(
        &c,
        "POST",
        &url,
        &[("authorization", "Bearer fb-s3cret")],
        &feedback,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.shutdown();
    app.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_that_cannot_be_used_stops_the_start_with_its_key() {
    let empty = token_file("empty", " \n");
    for (yaml, key) in [
        (
            format!("admin_token_file: {}\n{MODELS}", empty.display()),
            "admin_token_file",
        ),
        (
            format!("feedback_token_file: /nonexistent/token\n{MODELS}"),
            "feedback_token_file",
        ),
    ] {
        let config = switchyard::config::from_yaml_str(&yaml).unwrap();
        let data = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        match switchyard::start(config, data, admin) {
            Err(switchyard::StartError::Config(e)) => assert_eq!(e.path, key, "{e}"),
            Err(e) => panic!("{key}: {e}"),
            Ok(_) => panic!("{key}: started"),
        }
    }
}

/// `SWITCHYARD_ADMIN_TOKEN` when no file is configured (a child process, so the
/// variable is its own).
#[test]
fn the_admin_token_may_come_from_the_environment() {
    let dir = std::env::temp_dir().join(format!("switchyard-auth-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{MODELS}"),
    )
    .unwrap();
    let (mut child, (_, admin)) = spawn_switchyard_env(
        [
            std::ffi::OsStr::new("serve"),
            "--config".as_ref(),
            config.as_os_str(),
        ],
        &[("SWITCHYARD_ADMIN_TOKEN", "env-s3cret")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let statuses = rt.block_on(async {
        let c = client();
        let url = format!("http://{admin}/admin/bandit/m/freeze");
        let without = send(&c, "POST", &url, &[], "").await.status;
        let with = send(
            &c,
            "POST",
            &url,
            &[("authorization", "Bearer env-s3cret")],
            "",
        )
        .await
        .status;
        (without, with)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(statuses, (401, 200));
}
