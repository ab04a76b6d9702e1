//! Every error the request path can give, as the client sees it, and proof that the
//! server keeps serving afterwards.

mod support;

use std::time::Duration;

use support::*;

async fn app_with(yaml_models: &str) -> switchyard::Running {
    start(&format!(
        "max_body_bytes: 1024\nrequest_timeout: 300ms\nmodels:\n{yaml_models}"
    ))
    .await
}

fn error_of(r: &Reply) -> String {
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(
        r.header("x-request-id").is_some(),
        "errors carry the request id too"
    );
    r.json()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {:?}", r.body))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_get_clear_json_errors() {
    let up = Upstream::echo("a").await;
    let app = app_with(&format!(
        "  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    let c = client();
    let base = format!("http://{}", app.data_addr);

    let r = predict(&c, &format!("{base}/v1/models/nope:predict")).await;
    assert_eq!(r.status, 404);
    assert!(error_of(&r).contains("`nope`"));

    let r = predict(&c, &format!("{base}/v2/models/nope/infer")).await;
    assert_eq!(r.status, 404);

    let r = send(&c, "GET", &format!("{base}/somewhere"), &[], "").await;
    assert_eq!(r.status, 404);
    assert!(error_of(&r).contains("no route"));

    for path in [
        "/v1/models/m:explode",
        "/v1/models/m/versions/x:predict",
        "/v2/models/m/trace/..",
        "/v1/models/:predict",
    ] {
        let r = predict(&c, &format!("{base}{path}")).await;
        assert_eq!(r.status, 400, "{path}");
        assert!(error_of(&r).contains("malformed path"), "{path}");
    }

    let r = send(&c, "GET", &format!("{base}/v1/models/m:predict"), &[], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    error_of(&r);
    let r = send(&c, "DELETE", &format!("{base}/v2/models/m"), &[], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    // Over the limit by content-length: refused before any upstream sees it.
    let big = "x".repeat(1025);
    let r = send(
        &c,
        "POST",
        &format!("{base}/v1/models/m:predict"),
        &[],
        &big,
    )
    .await;
    assert_eq!(r.status, 413);
    assert!(error_of(&r).contains("1024"));
    // At the limit: fine.
    let r = send(
        &c,
        "POST",
        &format!("{base}/v1/models/m:predict"),
        &[],
        &"y".repeat(1024),
    )
    .await;
    assert_eq!(r.status, 200);

    assert_eq!(up.hits(), 1, "only the good request reached the upstream");
    assert_eq!(
        predict(&c, &format!("{base}/v1/models/m:predict"))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_over_the_limit_are_cut_off_with_413() {
    let up = Upstream::echo("a").await;
    let app = app_with(&format!(
        "  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    let chunk = "z".repeat(700);
    let request = format!(
        "POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{len:x}\r\n{chunk}\r\n{len:x}\r\n{chunk}\r\n0\r\n\r\n",
        len = chunk.len()
    );
    let answer = raw(app.data_addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("larger than the limit of 1024 bytes"),
        "{answer}"
    );

    // A chunked body within the limit streams through.
    let request = "POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let answer = raw(app.data_addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""body":"hello""#), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_map_to_502_and_504_and_are_counted() {
    let slow = Upstream::start("slow", Duration::from_secs(3)).await;
    let refused = refused_addr().await;
    let reset = resetting_upstream().await;
    let app = app_with(&format!(
        "  refused:\n    variants: [{{name: r, upstream: \"http://{refused}\", weight: 1}}]\n\
         \x20 reset:\n    variants: [{{name: x, upstream: \"http://{reset}\", weight: 1}}]\n\
         \x20 slow:\n    variants: [{{name: s, upstream: \"{}\", weight: 1}}]\n",
        slow.url()
    ))
    .await;
    let c = client();
    let base = format!("http://{}", app.data_addr);

    let r = predict(&c, &format!("{base}/v1/models/refused:predict")).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        r.header("x-switchyard-variant"),
        Some("r"),
        "the failing variant is named"
    );
    assert!(error_of(&r).contains("(connect)"));

    let r = predict(&c, &format!("{base}/v1/models/reset:predict")).await;
    assert_eq!(r.status, 502);
    assert!(error_of(&r).contains("(reset)"), "{:?}", r.body);

    let r = predict(&c, &format!("{base}/v1/models/slow:predict")).await;
    assert_eq!(r.status, 504);
    assert!(error_of(&r).contains("(timeout)"));

    let m = metrics(app.admin_addr).await;
    for (model, variant, kind) in [
        ("refused", "r", "connect"),
        ("reset", "x", "reset"),
        ("slow", "s", "timeout"),
    ] {
        let series = format!(
            r#"switchyard_upstream_errors_total{{kind="{kind}",model="{model}",variant="{variant}"}}"#
        );
        assert_eq!(sample(&m, &series), Some(1.0), "{series}");
        let series = format!(
            r#"switchyard_requests_total{{class="5xx",model="{model}",variant="{variant}"}}"#
        );
        assert_eq!(sample(&m, &series), Some(1.0), "{series}");
    }
}

/// A raw upstream that reads each request and writes `answer` back, then closes.
async fn answering(answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    raw_upstream(move |mut stream| async move {
        if read_request(&mut stream).await {
            let _ = stream.write_all(answer).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answers_that_break_http_are_502_and_their_framing_never_passed_on() {
    // Two lengths: which one is the body's? Refused, not guessed.
    let broken =
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!").await;
    // Chunked and a length: the chunks frame the body (RFC 9112 6.3), and the stale
    // length must not reach the client, who would wait for 100 bytes.
    let both = answering(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    )
    .await;
    let up = Upstream::echo("a").await;
    let app = app_with(&format!(
        "  broken:\n    variants: [{{name: b, upstream: \"http://{broken}\", weight: 1}}]\n\
         \x20 both:\n    variants: [{{name: t, upstream: \"http://{both}\", weight: 1}}]\n\
         \x20 m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    let c = client();
    let base = format!("http://{}", app.data_addr);

    let r = predict(&c, &format!("{base}/v1/models/broken:predict")).await;
    assert_eq!(r.status, 502);
    assert!(error_of(&r).contains("(protocol)"), "{:?}", r.body);

    let r = predict(&c, &format!("{base}/v1/models/both:predict")).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"ok");
    assert_ne!(r.header("content-length"), Some("100"));
    assert!(r
        .header("transfer-encoding")
        .is_none_or(|te| te == "chunked"));

    let m = metrics(app.admin_addr).await;
    let series = r#"switchyard_upstream_errors_total{kind="protocol",model="broken",variant="b"}"#;
    assert_eq!(sample(&m, series), Some(1.0), "{series}");
    // And the next request is served as ever.
    let r = predict(&c, &format!("{base}/v1/models/m:predict")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_does_not_stop_the_server() {
    let up = Upstream::echo("a").await;
    let app = app_with(&format!(
        "  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"POST /v1/models/m:predict HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
        b"\x00\x01\x02\x03\xff\xfe",
        b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nshort",
    ] {
        let _ = tokio::time::timeout(Duration::from_secs(2), raw(app.data_addr, junk)).await;
    }
    let r = predict(
        &client(),
        &format!("http://{}/v1/models/m:predict", app.data_addr),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stalls_gets_408_and_the_server_keeps_serving() {
    let up = Upstream::echo("a").await;
    let app = start(&format!(
        "client_body_timeout: 300ms\nrequest_timeout: 60s\nmodels:\n  remote:\n    bandit: {{objective: conversion}}\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n  local:\n    variants: [{{name: cpu, local: {{model: \"builtin:digits_mlp\"}}, weight: 1}}]\n",
        up.url()
    ))
    .await;
    // Ten bytes of a hundred, then silence, on a connection the client keeps open: the
    // body streamed upstream, the one a local model reads, and feedback's.
    for path in [
        "/v1/models/remote:predict",
        "/v1/models/local:predict",
        "/v1/feedback",
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"instance"
        );
        let answer = raw(app.data_addr, head.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("client_body_timeout"), "{path}: {answer}");
    }
    // A body that comes whole is answered as ever.
    let r = predict(
        &client(),
        &format!("http://{}/v1/models/remote:predict", app.data_addr),
    )
    .await;
    assert_eq!(r.status, 200);
}

/// An upstream that sends its answer's head and a tenth of its body, then nothing, and
/// holds the connection: the client gets what came and then the close, within
/// `request_timeout` (300 ms here) of the pause, not whenever the upstream gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_inside_its_answer_is_cut_off_at_request_timeout() {
    use tokio::io::AsyncWriteExt;
    let stalling = raw_upstream(|mut stream| async move {
        if read_request(&mut stream).await {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                .await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    })
    .await;
    // Sends part of its answer's body and closes the connection.
    let breaking = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789").await;
    let up = Upstream::echo("a").await;
    let app = app_with(&format!(
        "  stalls:\n    variants: [{{name: s, upstream: \"http://{stalling}\", weight: 1}}]\n\
         \x20 breaks:\n    variants: [{{name: b, upstream: \"http://{breaking}\", weight: 1}}]\n\
         \x20 m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    let got = predict_until_closed(app.data_addr, "stalls").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(
        got.ends_with("\r\n\r\n0123456789"),
        "what came, and no more: {got}"
    );
    // An answer broken off by the upstream's close: the client gets what came too.
    let got = predict_until_closed(app.data_addr, "breaks").await;
    assert!(got.ends_with("\r\n\r\n0123456789"), "{got}");
    // Both count as the variant's upstream failures, by kind, though their heads came.
    let m = metrics(app.admin_addr).await;
    for (model, variant, kind) in [("stalls", "s", "timeout"), ("breaks", "b", "reset")] {
        let series = format!(
            r#"switchyard_upstream_errors_total{{kind="{kind}",model="{model}",variant="{variant}"}}"#
        );
        assert_eq!(sample(&m, &series), Some(1.0), "{series}");
    }
    // The next request is served as ever.
    let r = predict(
        &client(),
        &format!("http://{}/v1/models/m:predict", app.data_addr),
    )
    .await;
    assert_eq!(r.status, 200);
}

/// A prediction for `model` over a raw HTTP/1.1 connection, and all that came back until
/// the server closed it (within 20 s: far beyond the 300 ms request timeout under test,
/// long before the upstreams' or a client's patience).
async fn predict_until_closed(addr: std::net::SocketAddr, model: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("POST /v1/models/{model}:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .expect("the connection closed")
        .unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

/// An answer body that sends one piece and then nothing, ever.
struct Trickle(bool);

impl hyper::body::Body for Trickle {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if std::mem::replace(&mut self.0, true) {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(
            bytes::Bytes::from_static(b"0123456789"),
        ))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upstream_that_stalls_inside_its_answer_is_cut_off_and_counted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalling = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Trickle(false)))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    let app = app_with(&format!(
        "  stalls:\n    variants: [{{name: s, upstream: \"http://{stalling}\", protocol: h2c, weight: 1}}]\n"
    ))
    .await;
    let got = predict_until_closed(app.data_addr, "stalls").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    // Chunked (its length unknown): the piece that came, and no last chunk.
    assert!(got.contains("\r\n\r\na\r\n0123456789\r\n"), "{got}");
    assert!(!got.ends_with("0\r\n\r\n"), "not ended as if whole: {got}");
    let m = metrics(app.admin_addr).await;
    let series = r#"switchyard_upstream_errors_total{kind="timeout",model="stalls",variant="s"}"#;
    assert_eq!(sample(&m, series), Some(1.0), "{series}");
}
