//! Routing through real sockets: weighted split, sticky assignment, path rewrite,
//! headers, both protocols, h2c on both sides.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_97_2_1_split_holds_over_20000_requests() {
    let (a, b, c) = (
        Upstream::echo("a").await,
        Upstream::echo("b").await,
        Upstream::echo("c").await,
    );
    let app = start(&format!(
        r#"
seed: 20261127
models:
  mnist:
    variants:
      - {{name: a, upstream: "{}", weight: 97}}
      - {{name: b, upstream: "{}", weight: 2}}
      - {{name: c, upstream: "{}", weight: 1}}
"#,
        a.url(),
        b.url(),
        c.url()
    ))
    .await;
    let url = Arc::new(format!("http://{}/v1/models/mnist:predict", app.data_addr));
    let client = client();
    let n = 20_000;
    let workers = 32;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            for _ in 0..n / workers {
                let r = predict(&client, &url).await;
                assert_eq!(r.status, 200);
                let variant = r.header("x-switchyard-variant").unwrap().to_string();
                // The answer really came from the variant the header names.
                assert_eq!(r.json()["upstream"], variant.as_str());
                *counts.entry(variant).or_default() += 1;
            }
            counts
        }));
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *counts.entry(k).or_default() += v;
        }
    }
    let got = |k: &str| counts.get(k).copied().unwrap_or(0);
    assert_eq!(got("a") + got("b") + got("c"), n);
    assert_eq!(
        (a.hits(), b.hits(), c.hits()),
        (got("a"), got("b"), got("c"))
    );
    for (name, p) in [("a", 0.97), ("b", 0.02), ("c", 0.01)] {
        assert!(within_5_sigma(got(name), n, p), "{name}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_keys_stay_and_move_in_proportion_when_weights_change() {
    let (a, b) = (Upstream::echo("a").await, Upstream::echo("b").await);
    let app = start(&format!(
        r#"
models:
  rec:
    sticky_header: X-User-Id
    variants:
      - {{name: a, upstream: "{}", weight: 50}}
      - {{name: b, upstream: "{}", weight: 50}}
"#,
        a.url(),
        b.url()
    ))
    .await;
    let url = format!("http://{}/v1/models/rec:predict", app.data_addr);
    let client = client();
    let keys = 3000;
    let assign = |client: hyper_util::client::legacy::Client<_, _>, url: String| async move {
        let mut out = Vec::with_capacity(keys);
        for k in 0..keys {
            let user = format!("user-{k}");
            let r = send(&client, "POST", &url, &[("x-user-id", &user)], "{}").await;
            out.push(r.header("x-switchyard-variant").unwrap() == "a");
        }
        out
    };
    let first = assign(client.clone(), url.clone()).await;
    let again = assign(client.clone(), url.clone()).await;
    assert_eq!(first, again, "the same key must get the same variant");
    let on_a = first.iter().filter(|x| **x).count();
    assert!(within_5_sigma(on_a, keys, 0.5), "{on_a} of {keys} on a");

    // Requests without the key are still split at random.
    let mut seen = HashSet::new();
    for _ in 0..200 {
        seen.insert(
            predict(&client, &url)
                .await
                .header("x-switchyard-variant")
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(seen.len(), 2);

    app.router()
        .table()
        .model("rec")
        .unwrap()
        .set_weights(&[70.0, 30.0])
        .unwrap();
    let after = assign(client.clone(), url.clone()).await;
    let mut moved = 0;
    for (before, now) in first.iter().zip(&after) {
        if before != now {
            // Only b lost weight, so keys may only move from b to a.
            assert!(
                !before && *now,
                "a key moved away from the variant that gained weight"
            );
            moved += 1;
        }
    }
    // The least any scheme can move is 20% of keys; rendezvous hashing moves just that.
    assert!(within_5_sigma(moved, keys, 0.20), "{moved} of {keys} moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_names_are_rewritten_and_the_rest_of_the_path_kept() {
    let up = Upstream::echo("b").await;
    let app = start(&format!(
        r#"
models:
  mnist:
    variants:
      - {{name: b, upstream: "{}/serving/", upstream_model: mnist_v2, weight: 1}}
"#,
        up.url()
    ))
    .await;
    let client = client();
    let base = format!("http://{}", app.data_addr);
    let cases = [
        (
            "POST",
            "/v1/models/mnist:predict",
            "/serving/v1/models/mnist_v2:predict",
        ),
        (
            "POST",
            "/v1/models/mnist/versions/3:classify?trace=1",
            "/serving/v1/models/mnist_v2/versions/3:classify?trace=1",
        ),
        (
            "POST",
            "/v1/models/mnist/labels/canary:regress",
            "/serving/v1/models/mnist_v2/labels/canary:regress",
        ),
        ("GET", "/v1/models/mnist", "/serving/v1/models/mnist_v2"),
        (
            "GET",
            "/v1/models/mnist/versions/3/metadata",
            "/serving/v1/models/mnist_v2/versions/3/metadata",
        ),
        (
            "POST",
            "/v2/models/mnist/infer",
            "/serving/v2/models/mnist_v2/infer",
        ),
        (
            "POST",
            "/v2/models/mnist/versions/7/infer",
            "/serving/v2/models/mnist_v2/versions/7/infer",
        ),
        ("GET", "/v2/models/mnist", "/serving/v2/models/mnist_v2"),
        (
            "GET",
            "/v2/models/mnist/ready",
            "/serving/v2/models/mnist_v2/ready",
        ),
    ];
    for (method, path, expect) in cases {
        let r = send(
            &client,
            method,
            &format!("{base}{path}"),
            &[],
            if method == "POST" { "{}" } else { "" },
        )
        .await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json()["path"], expect, "{path}");
        assert_eq!(r.json()["method"], method);
        assert_eq!(
            r.json()["host"],
            up.addr.to_string(),
            "Host is the upstream's"
        );
    }
}

/// With nothing to rewrite (no prefix, the same model name) the client's path and query
/// go upstream byte for byte (the sidecar reuses them rather than rebuilding them);
/// a second variant of the same model with `upstream_model` still gets its rewrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_with_nothing_to_rewrite_pass_byte_for_byte() {
    let plain = Upstream::echo("plain").await;
    let renamed = Upstream::echo("renamed").await;
    let app = start(&format!(
        "models:\n  mnist:\n    variants:\n      - {{name: plain, upstream: \"{}\", weight: 1}}\n      - {{name: renamed, upstream: \"{}\", upstream_model: other, weight: 1}}\n",
        plain.url(),
        renamed.url()
    ))
    .await;
    let client = client();
    let base = format!("http://{}", app.data_addr);
    let path = "/v1/models/mnist/versions/3:classify?trace=1&x=%2Fa%20b";
    let mut seen = HashSet::new();
    for _ in 0..40 {
        let r = send(&client, "POST", &format!("{base}{path}"), &[], "{}").await;
        assert_eq!(r.status, 200);
        let upstream = r.json()["upstream"].as_str().unwrap().to_string();
        let expect = match upstream.as_str() {
            "plain" => path.to_string(),
            _ => path.replace("/mnist/", "/other/"),
        };
        assert_eq!(r.json()["path"], expect.as_str(), "{upstream}");
        seen.insert(upstream);
    }
    assert_eq!(seen.len(), 2, "both variants answered: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_added_kept_and_forwarded_and_bodies_pass_untouched() {
    let up = Upstream::echo("a").await;
    let app = start(&format!(
        "models:\n  m:\n    variants:\n      - {{name: a, upstream: \"{}\", weight: 1}}\n",
        up.url()
    ))
    .await;
    let client = client();
    let url = format!("http://{}/v2/models/m/infer", app.data_addr);

    // Generated ids: 128 bits as 32 hex digits, unique, and the same one upstream.
    let mut ids = HashSet::new();
    for _ in 0..500 {
        let r = predict(&client, &url).await;
        let id = r.header("x-request-id").unwrap().to_string();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(r.json()["x_request_id"], id.as_str());
        assert!(ids.insert(id));
    }

    // A client's id is kept; hop-by-hop headers do not travel; the body is untouched,
    // including bytes that are not valid JSON (the proxy does not parse bodies).
    let body = "{\"inputs\": [{\"name\": \"x\", \"datatype\": \"FP32\", \"shape\": [1], \"data\": [0.5]}]} trailing";
    let r = send(
        &client,
        "POST",
        &url,
        &[
            ("x-request-id", "client-chosen-42"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic eA=="),
        ],
        body,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("client-chosen-42"));
    assert_eq!(r.header("x-switchyard-variant"), Some("a"));
    assert_eq!(
        r.header("x-upstream-header"),
        Some("kept"),
        "upstream headers pass through"
    );
    let timing = r.header("server-timing").unwrap();
    for phase in ["routing;dur=", "upstream;dur=", "total;dur="] {
        assert!(timing.contains(phase), "{timing}");
    }
    let seen = up.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.headers["x-request-id"], "client-chosen-42");
    assert!(seen.headers.get("x-secret").is_none());
    assert!(seen.headers.get("proxy-authorization").is_none());
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_health_and_server_metadata_are_answered_locally() {
    let app = start(
        "models:\n  m:\n    variants:\n      - {name: a, upstream: \"http://127.0.0.1:9\", weight: 1}\n",
    )
    .await;
    let client = client();
    let base = format!("http://{}", app.data_addr);
    let r = send(&client, "GET", &format!("{base}/v2/health/live"), &[], "").await;
    assert_eq!((r.status, r.json()["live"].as_bool()), (200, Some(true)));
    let r = send(&client, "GET", &format!("{base}/v2/health/ready"), &[], "").await;
    assert_eq!((r.status, r.json()["ready"].as_bool()), (200, Some(true)));
    let r = send(&client, "GET", &format!("{base}/v2"), &[], "").await;
    assert_eq!(r.json()["name"], "switchyard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_and_h2c_upstreams() {
    let (h1, h2) = (Upstream::echo("h1").await, Upstream::echo("h2").await);
    let app = start(&format!(
        r#"
models:
  one:
    variants: [{{name: a, upstream: "{}", weight: 1}}]
  two:
    variants: [{{name: a, upstream: "{}", protocol: h2c, weight: 1}}]
"#,
        h1.url(),
        h2.url()
    ))
    .await;
    let client = h2_client();
    // An HTTP/2 client through to an HTTP/1.1 upstream, and to an h2c upstream.
    let r = predict(
        &client,
        &format!("http://{}/v1/models/one:predict", app.data_addr),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/1.1");
    let r = predict(
        &client,
        &format!("http://{}/v1/models/two:predict", app.data_addr),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/2.0");
    assert_eq!(r.json()["path"], "/v1/models/two:predict");
    // And an HTTP/1.1 client to the h2c upstream.
    let r = predict(
        &support::client(),
        &format!("http://{}/v1/models/two:predict", app.data_addr),
    )
    .await;
    assert_eq!(r.json()["version"], "HTTP/2.0");
}
