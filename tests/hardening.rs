//! What a hostile or careless client sends, and what a signal does: each answered with a
//! clear error, and the sidecar still serving the next valid request.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

/// The first digit of scikit-learn's set (a 0): 64 pixels.
const DIGIT: &str = "[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]";

fn v2(datatype: &str, shape: &str, data: &str) -> String {
    format!(
        r#"{{"inputs":[{{"name":"pixels","datatype":"{datatype}","shape":{shape},"data":{data}}}]}}"#
    )
}

fn error_of(r: &Reply) -> String {
    r.json()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {:?}", r.body))
        .to_string()
}

/// Two batch threads, so that two wedged threads would wedge the model.
async fn local_app() -> switchyard::Running {
    start(
        "models:\n  digits:\n    variants: [{name: cpu, weight: 1, local: {model: \"builtin:digits_mlp\", batching: {num_batch_threads: 2}}}]\n",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sizes_and_values_are_checked_before_anything_is_allocated() {
    let app = local_app().await;
    let c = client();
    let url = format!("http://{}/v2/models/digits/infer", app.data_addr);
    let tf_url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let post = |url: String, body: String| {
        let c = c.clone();
        async move { send(&c, "POST", &url, &[], &body).await }
    };
    let sixty_four = format!("[{}]", vec!["1"; 64].join(","));
    let cases: Vec<(String, String, &str)> = vec![
        // 256 TB once aborted the process.
        (
            url.clone(),
            v2("FP32", "[1000000000000,64]", "[1]"),
            "needs 64000000000000",
        ),
        // rows * 64 wrapped to 64 and a batch thread panicked.
        (
            url.clone(),
            v2("FP32", "[288230376151711745,64]", &sixty_four),
            "needs",
        ),
        (
            url.clone(),
            v2("FP32", "[18446744073709551615,64]", &sixty_four),
            "shape",
        ),
        (url.clone(), v2("FP32", "[-1,64]", &sixty_four), "shape"),
        (url.clone(), v2("FP32", "[2,64]", &sixty_four), "needs 128"),
        // Values the model cannot take.
        (
            url.clone(),
            v2("FP32", "[1,64]", &sixty_four.replacen('1', "1e39", 1)),
            "finite",
        ),
        (
            url.clone(),
            v2("FP16", "[1,64]", &sixty_four.replacen('1', "70000", 1)),
            "finite",
        ),
        (
            url.clone(),
            v2("INT8", "[1,64]", &sixty_four.replacen('1', "1000", 1)),
            "range",
        ),
        (
            url.clone(),
            v2("UINT8", "[1,64]", &sixty_four.replacen('1', "-1", 1)),
            "range",
        ),
        (
            url.clone(),
            v2(
                "UINT64",
                "[1,64]",
                &sixty_four.replacen('1', "18446744073709551616", 1),
            ),
            "outside the datatype's range",
        ),
        (
            url.clone(),
            v2("INT32", "[1,64]", &sixty_four.replacen('1', "1.5", 1)),
            "not an integer",
        ),
        (
            url.clone(),
            v2(
                "FP32",
                "[1,64]",
                &format!("{}{}{}", "[".repeat(40), sixty_four, "]".repeat(40)),
            ),
            "nested deeper",
        ),
        (url.clone(), v2("BYTES", "[1,64]", &sixty_four), "datatype"),
        (
            tf_url.clone(),
            format!(
                r#"{{"instances": [{}]}}"#,
                sixty_four.replacen('1', "-3.5e38", 1)
            ),
            "finite",
        ),
        (
            tf_url.clone(),
            format!(r#"{{"instances": [{}]}}"#, vec!["[]"; 5000].join(",")),
            "0 values",
        ),
    ];
    for (url, body, needle) in &cases {
        let r = post(url.clone(), body.clone()).await;
        let head = &body[..body.len().min(80)];
        assert_eq!(r.status, 400, "{head}: {:?}", r.body);
        let e = error_of(&r);
        assert!(e.contains(needle), "{head}: {e}");
    }
    // Every batch thread is still there: more requests than threads, all answered.
    for _ in 0..8 {
        let r = post(url.clone(), v2("FP32", "[1,64]", DIGIT)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let r = post(tf_url.clone(), format!(r#"{{"instances": [{DIGIT}]}}"#)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    // And integers in range are taken: UINT8 pixels give the same class as FP32 ones.
    let r = post(url.clone(), v2("UINT8", "[1,64]", DIGIT)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let panics = sample(
        &metrics(app.admin_addr).await,
        "switchyard_local_panics_total{model=\"digits\"}",
    );
    assert_eq!(panics, Some(0.0), "nothing panicked, and the series exists");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_never_reaches_the_upstream() {
    let up = Upstream::echo("a").await;
    let app = start(&format!(
        "models:\n  mnist:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    let c = client();
    for path in [
        "/v2/models/mnist/versions/..%2F..%2Fsecret/infer",
        "/v2/models/mnist/versions/../infer",
        "/v2/models/mnist/versions/%2E%2E/infer",
        "/v2/models/mnist/versions/a%5Cb/infer",
        "/v2/models/mnist/versions/1%0d%0aX-Injected:%201/infer",
        "/v1/models/mnist/labels/..%2Fadmin:predict",
    ] {
        let r = send(
            &c,
            "POST",
            &format!("http://{}{path}", app.data_addr),
            &[],
            "{}",
        )
        .await;
        assert_eq!(r.status, 400, "{path}");
        assert!(error_of(&r).contains("malformed path"), "{path}");
    }
    assert_eq!(up.hits(), 0, "nothing was forwarded");
    let r = predict(
        &c,
        &format!("http://{}/v2/models/mnist/versions/3/infer", app.data_addr),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.hits(), 1);
}

/// Bodies beyond 64 KiB are decoded and answered off the async workers: the answers
/// are the same, row for row, as for small ones, and bad large bodies are still 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_local_bodies_are_answered_like_small_ones() {
    let app = local_app().await;
    let c = client();
    let url = format!("http://{}/v2/models/digits/infer", app.data_addr);
    let one = send(&c, "POST", &url, &[], &v2("FP32", "[1,64]", DIGIT)).await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    let rows = 600;
    let data = format!("[{}]", vec![&DIGIT[1..DIGIT.len() - 1]; rows].join(","));
    let body = v2("FP32", &format!("[{rows},64]"), &data);
    assert!(body.len() > 64 * 1024, "{} bytes", body.len());
    let many = send(&c, "POST", &url, &[], &body).await;
    assert_eq!(many.status, 200, "{:?}", many.body);
    let first = one.json()["outputs"][0]["data"].as_array().unwrap().clone();
    let all = many.json()["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(all.len(), rows * first.len());
    for row in all.chunks(first.len()) {
        assert_eq!(row, &first[..]);
    }
    // Large and malformed: still a clear 400, and the next request is served.
    let bad = format!("{}x", &body[..body.len() - 3]);
    let r = send(&c, "POST", &url, &[], &bad).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(error_of(&r).contains("not valid JSON"), "{}", error_of(&r));
    assert_eq!(send(&c, "POST", &url, &[], &body).await.status, 200);
}

/// A local model whose batch waits far longer than the request may: the client gets 504
/// at `request_timeout`, the batch thread skips the abandoned request, and readiness is
/// false while the queue does not move, true again once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_variants_answer_504_at_request_timeout() {
    let app = start(
        "models:\n  digits:\n    request_timeout: 300ms\n    variants: [{name: cpu, weight: 1, local: {model: \"builtin:digits_mlp\", batching: {max_batch_size: 1000, batch_timeout_micros: 3000000, num_batch_threads: 1}}}]\n",
    )
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let body = format!(r#"{{"instances": [{DIGIT}]}}"#);
    let ready = |path: &str| {
        let url = format!("http://{}{path}", app.data_addr);
        let c = c.clone();
        async move { send(&c, "GET", &url, &[], "").await }
    };
    assert_eq!(ready("/v2/models/digits/ready").await.status, 200);
    let r = send(&c, "POST", &url, &[], &body).await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert!(error_of(&r).contains("request_timeout"), "{:?}", r.body);

    // The abandoned request still sits in the queue (its batch waits 3 s to fill): the
    // model cannot serve in time, and every readiness endpoint says so, with the reason.
    let model = ready("/v2/models/digits/ready").await;
    let server = ready("/v2/health/ready").await;
    let readyz = send(
        &c,
        "GET",
        &format!("http://{}/readyz", app.admin_addr),
        &[],
        "",
    )
    .await;
    for r in [&model, &server] {
        assert_eq!(r.status, 503, "{:?}", r.body);
        assert_eq!(r.json()["ready"], false);
        assert!(error_of(r).contains("not moving"), "{:?}", r.body);
    }
    assert_eq!(readyz.status, 503);
    let why = String::from_utf8_lossy(&readyz.body);
    assert!(why.contains("model `digits` variant `cpu`"), "{why}");

    // Once the batch thread takes the queue (and skips the abandoned request), ready
    // again, by itself. Bounded: the batch waits 3 s.
    let mut last = model;
    for _ in 0..200 {
        if last.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = ready("/v2/models/digits/ready").await;
    }
    assert_eq!(last.status, 200, "{:?}", last.body);
    assert_eq!(ready("/v2/health/ready").await.status, 200);
    let readyz = send(
        &c,
        "GET",
        &format!("http://{}/readyz", app.admin_addr),
        &[],
        "",
    )
    .await;
    assert_eq!(readyz.status, 200);
}

fn write_config(name: &str, yaml: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn signal(child: &std::process::Child, sig: &str) {
    // The shell's builtin `kill`: /bin/kill (procps) may be absent on a minimal machine.
    let ok = Command::new("sh")
        .args(["-c", &format!("kill -{sig} {}", child.id())])
        .status()
        .unwrap();
    assert!(ok.success());
}

async fn exit_code(mut child: std::process::Child) -> Option<i32> {
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap()
        .code()
}

/// A request still in flight when `drain_timeout` passes is cut, and the exit status
/// says so (75); a second signal during the drain exits at once (130).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_status_tells_a_cut_drain_and_a_second_signal_ends_it() {
    let (hang, accepted) = hanging_upstream().await;
    for (drain, second, want) in [("300ms", false, 75), ("1h", true, 130)] {
        let config = write_config(
            &format!("drain-{want}"),
            &format!(
                "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\ndrain_timeout: {drain}\nrequest_timeout: 1h\nmodels:\n  m:\n    variants: [{{name: a, upstream: \"http://{hang}\", weight: 1}}]\n"
            ),
        );
        let (child, data) = spawn_switchyard([
            std::ffi::OsStr::new("serve"),
            "--config".as_ref(),
            config.as_os_str(),
        ]);
        let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
        let url = format!("http://{data}/v1/models/m:predict");
        let request = tokio::spawn(async move {
            let c = client();
            let req = http::Request::post(url)
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap();
            c.request(req).await.map(|r| r.status().as_u16())
        });
        while accepted.load(std::sync::atomic::Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        signal(&child, "TERM");
        if second {
            // Let the first signal start the drain, then send the second.
            tokio::time::sleep(Duration::from_millis(200)).await;
            signal(&child, "INT");
        }
        assert_eq!(exit_code(child).await, Some(want), "drain {drain}");
        assert!(
            request.await.unwrap().is_err(),
            "the hanging request was cut"
        );
    }
}

/// At `max_connections` a new connection is answered 503 at once and closed (it once
/// waited unaccepted, 35 s for the 10,001st); once a slot frees, requests are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_503_at_once() {
    let up = Upstream::echo("a").await;
    let app = start(&format!(
        "max_connections: 2\nmodels:\n  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    let held: Vec<_> = futures_connect(app.data_addr, 2).await;
    // Both slots are taken once the server has accepted them.
    while sample(
        &metrics(app.admin_addr).await,
        "switchyard_connections_open",
    ) != Some(2.0)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answer = raw(
        app.data_addr,
        b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("max_connections"), "{answer}");
    assert_eq!(
        sample(
            &metrics(app.admin_addr).await,
            "switchyard_connections_refused_total"
        ),
        Some(1.0)
    );
    drop(held);
    while sample(
        &metrics(app.admin_addr).await,
        "switchyard_connections_open",
    ) != Some(0.0)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = predict(
        &client(),
        &format!("http://{}/v1/models/m:predict", app.data_addr),
    )
    .await;
    assert_eq!(r.status, 200);
}

async fn futures_connect(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    out
}

/// A local variant answers only the version it has (`local.version`): another version
/// or a label is 404, as TF Serving and Triton answer; an unknown `signature_name` is a
/// 400. It once answered version 1 to a client pinned to version 99.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_variants_answer_only_their_version_and_signature() {
    let app = start(
        "models:\n  digits:\n    variants: [{name: cpu, weight: 1, local: {model: \"builtin:digits_mlp\", version: 3}}]\n",
    )
    .await;
    let c = client();
    let base = format!("http://{}", app.data_addr);
    let tf = format!(r#"{{"instances": [{DIGIT}]}}"#);
    let v2body = v2("FP32", "[1,64]", DIGIT);
    for (path, body, status) in [
        ("/v2/models/digits/versions/3/infer", v2body.as_str(), 200),
        ("/v2/models/digits/versions/003/infer", v2body.as_str(), 200),
        ("/v2/models/digits/infer", v2body.as_str(), 200),
        ("/v2/models/digits/versions/99/infer", v2body.as_str(), 404),
        ("/v2/models/digits/versions/1/infer", v2body.as_str(), 404),
        ("/v1/models/digits/versions/3:predict", tf.as_str(), 200),
        ("/v1/models/digits/versions/99:predict", tf.as_str(), 404),
        ("/v1/models/digits/labels/stable:predict", tf.as_str(), 404),
    ] {
        let r = send(&c, "POST", &format!("{base}{path}"), &[], body).await;
        assert_eq!(r.status, status, "{path}: {:?}", r.body);
        if status == 404 {
            assert!(
                error_of(&r).contains("serves version 3") || error_of(&r).contains("no label"),
                "{path}"
            );
        }
    }
    let r = send(
        &c,
        "POST",
        &format!("{base}/v2/models/digits/versions/3/infer"),
        &[],
        &v2body,
    )
    .await;
    assert_eq!(r.json()["model_version"], "3");
    let r = send(
        &c,
        "GET",
        &format!("{base}/v2/models/digits/versions/99/ready"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    let r = send(&c, "GET", &format!("{base}/v1/models/digits"), &[], "").await;
    assert_eq!(r.json()["model_version_status"][0]["version"], "3");
    for (sig, status) in [
        ("\"serving_default\"", 200),
        ("\"\"", 200),
        ("\"other\"", 400),
        ("7", 400),
    ] {
        let body = format!(r#"{{"signature_name": {sig}, "instances": [{DIGIT}]}}"#);
        let r = send(
            &c,
            "POST",
            &format!("{base}/v1/models/digits:predict"),
            &[],
            &body,
        )
        .await;
        assert_eq!(r.status, status, "signature_name {sig}: {:?}", r.body);
    }
}

/// An h2c client that asks for a large answer and then takes none of it (its stream's
/// flow-control window spent, never opened again) has its connection closed after
/// `client_send_timeout`, as an HTTP/1.1 one does, and the upstream answer behind it is
/// let go: otherwise each such stream holds an upstream connection, and a slot of the
/// variant's `max_in_flight`, for as long as the client likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_client_that_takes_none_of_its_answer_is_closed_after_client_send_timeout() {
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncWriteExt;
    // More than the client's window (hyper's 2 MiB) and both loopback sockets' buffers
    // together: the upstream's writing ends only when the sidecar lets its answer go.
    const TOTAL: usize = 64 << 20;
    let released = std::sync::Arc::new(AtomicBool::new(false));
    let flag = released.clone();
    let upstream = raw_upstream(move |mut stream| {
        let flag = flag.clone();
        async move {
            if !read_request(&mut stream).await {
                return;
            }
            let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {TOTAL}\r\n\r\n");
            let chunk = vec![b' '; 64 << 10];
            let mut sent = stream.write_all(head.as_bytes()).await.is_ok();
            let mut n = 0;
            while sent && n < TOTAL {
                sent = stream.write_all(&chunk).await.is_ok();
                n += chunk.len();
            }
            // Written whole (not expected) or cut off: either way, no longer held.
            flag.store(true, Ordering::SeqCst);
        }
    })
    .await;
    let app = start(&format!(
        "client_send_timeout: 300ms\nrequest_timeout: 60s\nmodels:\n  big:\n    variants: [{{name: a, upstream: \"http://{upstream}\", weight: 1}}]\n"
    ))
    .await;
    let h2 = h2_client();
    let url = format!("http://{}/v1/models/big:predict", app.data_addr);
    let req = http::Request::post(&url)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"instances": [[1.0]]}"#,
        )))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The answer's body is held and never read.
    let (_parts, body) = resp.into_parts();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !released.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream's answer was still held 20 s after the client stopped reading (client_send_timeout 300ms)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the client finally reads breaks off: its connection was closed.
    let read = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("the stalled stream neither ended nor broke off");
    assert!(read.is_err(), "the whole answer came after the stall");
    // And the sidecar serves the next client.
    let r = predict(
        &client(),
        &format!("http://{}/v1/models/none:predict", app.data_addr),
    )
    .await;
    assert_eq!(r.status, 404);
}

/// What `client_send_timeout` does not cut over h2c: a client that reads slowly, pausing
/// for less than the timeout each time its small window is spent, and an upstream that
/// pauses for longer than it between pieces of its answer (the upstream's pauses are
/// `request_timeout`'s business). The whole answer arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_client_that_reads_slowly_gets_its_whole_answer() {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    const PIECE: usize = 1 << 20;
    const PIECES: usize = 3;
    let upstream = raw_upstream(|mut stream| async move {
        if !read_request(&mut stream).await {
            return;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            PIECE * PIECES
        );
        let _ = stream.write_all(head.as_bytes()).await;
        for _ in 0..PIECES {
            // Longer than twice client_send_timeout.
            tokio::time::sleep(Duration::from_millis(1000)).await;
            if stream.write_all(&vec![b' '; PIECE]).await.is_err() {
                return;
            }
        }
    })
    .await;
    let app = start(&format!(
        "client_send_timeout: 400ms\nrequest_timeout: 10s\nmodels:\n  big:\n    variants: [{{name: a, upstream: \"http://{upstream}\", weight: 1}}]\n"
    ))
    .await;
    // A 64 KiB window, so the sidecar waits on this client at each pause.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(65_535)
        .http2_adaptive_window(false)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(format!("http://{}/v1/models/big:predict", app.data_addr))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"instances": [[1.0]]}"#,
        )))
        .unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut got, mut since_pause) = (0, 0);
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap_or_else(|e| panic!("cut off after {got} bytes: {e:?}"));
        let n = frame.data_ref().map_or(0, bytes::Bytes::len);
        got += n;
        since_pause += n;
        if since_pause >= 256 << 10 {
            since_pause = 0;
            // Shorter than client_send_timeout.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(got, PIECE * PIECES);
}
