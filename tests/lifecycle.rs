//! Drain on shutdown (in-process and through a real SIGTERM), and the admin listener.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;
use switchyard::router::server::Drained;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_requests_then_stops_accepting() {
    let slow = Upstream::start("slow", Duration::from_millis(400)).await;
    let app = start(&format!(
        "drain_timeout: 10s\nmodels:\n  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        slow.url()
    ))
    .await;
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    let (data, admin) = (app.data_addr, app.admin_addr);
    let in_flight: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { predict(&client(), &url).await })
        })
        .collect();
    slow.wait_for_hits(5).await;
    app.shutdown();

    // While draining, readiness says so on both surfaces.
    let r = send(&client(), "GET", &format!("http://{admin}/readyz"), &[], "").await;
    assert_eq!(r.status, 503);

    let drained = app.wait().await;
    for t in in_flight {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "an accepted request must be answered");
        assert_eq!(r.json()["upstream"], "slow");
    }
    assert_eq!(drained, Drained::Clean);
    assert!(
        tokio::net::TcpStream::connect(data).await.is_err(),
        "no new connections after drain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let slow = Upstream::start("slow", Duration::from_millis(500)).await;
    let dir = std::env::temp_dir().join(format!("switchyard-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            // worker_threads: 1 runs the current-thread runtime, the benchmarked setup.
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nworker_threads: 1\nmodels:\n  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
            slow.url()
        ),
    )
    .unwrap();
    // spawn_switchyard closes our end of stdout after the first line: the server must
    // keep serving without a log reader.
    let (mut child, data) = spawn_switchyard([
        std::ffi::OsStr::new("serve"),
        "--config".as_ref(),
        config.as_os_str(),
    ]);

    let url = format!("http://{data}/v1/models/m:predict");
    let request = tokio::spawn(async move { predict(&client(), &url).await });
    slow.wait_for_hits(1).await;
    // The shell's builtin `kill`: /bin/kill (procps) may be absent on a minimal machine.
    let killed = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(killed.success());

    let r = request.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the in-flight request completes after SIGTERM"
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_metrics_health_and_config() {
    let up = Upstream::echo("a").await;
    let app = start(&format!(
        r#"
models:
  m:
    variants:
      - {{name: a, upstream: "{}", weight: 3, cost_per_1k: 0.4}}
      - {{name: b, upstream: "{}", upstream_model: m2, weight: 0}}
"#,
        up.url(),
        up.url()
    ))
    .await;
    let c = client();
    let n = 37;
    for _ in 0..n {
        assert_eq!(
            predict(&c, &format!("http://{}/v1/models/m:predict", app.data_addr))
                .await
                .status,
            200
        );
    }
    predict(
        &c,
        &format!("http://{}/v1/models/unknown:predict", app.data_addr),
    )
    .await;

    let m = metrics(app.admin_addr).await;
    let get = |s: &str| sample(&m, s).unwrap_or_else(|| panic!("no sample {s} in\n{m}"));
    assert_eq!(
        get(r#"switchyard_requests_total{class="2xx",model="m",variant="a"}"#),
        n as f64
    );
    assert_eq!(
        get(r#"switchyard_requests_total{class="2xx",model="m",variant="b"}"#),
        0.0
    );
    assert_eq!(
        get(r#"switchyard_request_duration_seconds_count{model="m",variant="a"}"#),
        n as f64
    );
    assert_eq!(
        get(r#"switchyard_request_duration_seconds_bucket{model="m",variant="a",le="+Inf"}"#),
        n as f64
    );
    assert_eq!(
        get(r#"switchyard_variant_weight{model="m",variant="a"}"#),
        1.0
    );
    assert_eq!(
        get(r#"switchyard_variant_weight{model="m",variant="b"}"#),
        0.0
    );
    assert_eq!(
        get(r#"switchyard_rejected_requests_total{reason="unknown_model"}"#),
        1.0
    );
    assert!(
        !m.contains("unknown\""),
        "request-supplied names never become labels"
    );

    let base = format!("http://{}", app.admin_addr);
    assert_eq!(
        send(&c, "GET", &format!("{base}/healthz"), &[], "")
            .await
            .status,
        200
    );
    assert_eq!(
        send(&c, "GET", &format!("{base}/readyz"), &[], "")
            .await
            .status,
        200
    );
    assert_eq!(
        send(&c, "GET", &format!("{base}/nope"), &[], "")
            .await
            .status,
        404
    );
    let cfg = send(&c, "GET", &format!("{base}/admin/config"), &[], "")
        .await
        .json();
    assert_eq!(
        cfg["listen"],
        app.data_addr.to_string(),
        "the effective (bound) address"
    );
    assert_eq!(cfg["models"]["m"]["variants"][0]["upstream"], up.url());
    assert_eq!(cfg["models"]["m"]["variants"][0]["cost_per_1k"], 0.4);
    assert_eq!(cfg["models"]["m"]["variants"][1]["upstream_model"], "m2");
    assert_eq!(cfg["request_timeout"], "30s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_gives_up_after_drain_timeout() {
    let hanging = Upstream::start("hanging", Duration::from_secs(30)).await;
    let app = start(&format!(
        "drain_timeout: 300ms\nrequest_timeout: 60s\nmodels:\n  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        hanging.url()
    ))
    .await;
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    let stuck = tokio::spawn(async move { predict(&client(), &url).await });
    hanging.wait_for_hits(1).await;
    app.shutdown();
    // The upstream would answer in 30 s; the drain stops waiting after 300 ms.
    let drained = tokio::time::timeout(Duration::from_secs(10), app.wait())
        .await
        .expect("wait() is bounded by drain_timeout");
    assert_eq!(drained, Drained::TimedOut);
    stuck.abort();
}

/// An upstream connection left idle is closed by the sidecar after
/// `upstream_idle_timeout`, with no other request to notice it: a burst's connections are
/// given back rather than held, and none outlives the model server's own keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_close_after_upstream_idle_timeout() {
    use std::sync::atomic::Ordering::SeqCst;
    let up = Upstream::echo("a").await;
    let app = start(&format!(
        "upstream_idle_timeout: 300ms\nmodels:\n  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    for _ in 0..3 {
        assert_eq!(predict(&c, &url).await.status, 200);
    }
    assert_eq!(up.hits(), 3);
    // Nothing more is sent, and the sidecar closes the pooled connection (one, unless a
    // busy machine left more than the timeout between two requests) on its own. 20 s
    // is a bound far beyond the timeout, not a measurement.
    assert!(
        up.all_closed_within(Duration::from_secs(20)).await,
        "the idle upstream connection is closed by the sidecar: {} still open",
        up.open.load(SeqCst)
    );
    assert!(up.connections.load(SeqCst) >= 1);
    // The next request opens a new connection and succeeds.
    assert_eq!(predict(&c, &url).await.status, 200);
    assert!(
        up.connections.load(SeqCst) >= 2,
        "a new connection after the close"
    );
}

/// HTTP/1.1 upstream connections are kept alive: sequential requests go over one
/// connection whatever the answer's body (empty, one piece, a megabyte that takes many
/// reads), since each goes back to the pool when its body has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_reused() {
    use std::sync::atomic::Ordering::SeqCst;
    for size in [0usize, 100, 1 << 20] {
        let up = serve(Duration::ZERO, move |_, _| {
            hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(vec![
                b'x';
                size
            ])))
        })
        .await;
        let app = start(&format!(
            "models:\n  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
            up.url()
        ))
        .await;
        let c = client();
        let url = format!("http://{}/v1/models/m:predict", app.data_addr);
        for _ in 0..20 {
            let r = predict(&c, &url).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len(), size);
        }
        assert_eq!(up.hits(), 20);
        assert_eq!(
            up.connections.load(SeqCst),
            1,
            "20 sequential requests with {size}-byte answers over one upstream connection"
        );
    }
}

/// An upstream that closes kept-alive connections on its own (its keep-alive timeout is
/// shorter than ours) does not fail the next request: the closed connection is noticed
/// when it is taken from the pool, and a new one is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_upstream_closed_while_idle_are_not_used() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::io::AsyncWriteExt;
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    // Answers one request, advertising nothing about keep-alive (HTTP/1.1: kept), then
    // closes the connection 50 ms later.
    let addr = raw_upstream(move |mut s| {
        counted.fetch_add(1, SeqCst);
        async move {
            if !read_request(&mut s).await {
                return;
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let app = start(&format!(
        "models:\n  m:\n    variants: [{{name: a, upstream: \"http://{addr}\", weight: 1}}]\n"
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/m:predict", app.data_addr);
    for i in 0..5 {
        let r = predict(&c, &url).await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
        // Past the upstream's close (50 ms), well within ours (4 s).
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(accepted.load(SeqCst), 5, "one connection per request");
}

/// Reads until the server closes the connection (EOF or reset) and returns what came;
/// panics if it is still open after `bound`, far beyond the timeout under test.
async fn read_until_closed(s: &mut tokio::net::TcpStream, bound: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(bound, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection is still open after {bound:?}"
    );
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_closed_after_client_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::echo("a").await;
    let app = start(&format!(
        "client_header_timeout: 300ms\nmodels:\n  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n",
        up.url()
    ))
    .await;
    let bound = Duration::from_secs(20);

    // Half a request head, then silence (slowloris): closed, and nothing was forwarded.
    let mut s = tokio::net::TcpStream::connect(app.data_addr).await.unwrap();
    s.write_all(b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-")
        .await
        .unwrap();
    read_until_closed(&mut s, bound).await;
    assert_eq!(up.hits(), 0);

    // A whole request is answered; the kept-alive connection, idle after it, is closed.
    let mut s = tokio::net::TcpStream::connect(app.data_addr).await.unwrap();
    s.write_all(
        b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    let got = String::from_utf8_lossy(&read_until_closed(&mut s, bound).await).into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(up.hits(), 1);

    // A connection that never sends a byte is closed too.
    let mut s = tokio::net::TcpStream::connect(app.data_addr).await.unwrap();
    assert!(read_until_closed(&mut s, bound).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2c_connections_are_closed_after_client_header_timeout() {
    use http_body_util::{BodyExt, Full};
    let up = Upstream::echo("a").await;
    // Answers after 1.5 s, five times the idle timeout: a stream open that long keeps
    // its connection.
    let slow = Upstream::start("s", Duration::from_millis(1500)).await;
    // Sends its head at once and its body 1.5 s later: the stream stays open while the
    // body comes, well after the response head.
    let trickle = trickling_upstream(Duration::from_millis(1500)).await;
    let app = start(&format!(
        "client_header_timeout: 300ms\nmodels:\n  m:\n    variants: [{{name: a, upstream: \"{}\", weight: 1}}]\n  slow:\n    variants: [{{name: s, upstream: \"{}\", weight: 1}}]\n  trickle:\n    variants: [{{name: t, upstream: \"http://{}\", weight: 1}}]\n",
        up.url(),
        slow.url(),
        trickle
    ))
    .await;
    let bound = Duration::from_secs(20);

    // One h2c connection (prior knowledge), its driver watched for the end.
    let h2 = |addr| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        (send, tokio::spawn(conn))
    };
    let predict = |model: &str| {
        http::Request::post(format!(
            "http://{}/v1/models/{model}:predict",
            app.data_addr
        ))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from_static(
            b"{\"instances\": [[1]]}",
        )))
        .unwrap()
    };

    // A connection that opens and never starts a stream is closed.
    let (_send, conn) = h2(app.data_addr).await;
    tokio::time::timeout(bound, conn)
        .await
        .expect("the idle h2c connection is still open")
        .unwrap()
        .unwrap();

    // A client that opens h2c and then never reads or answers (so never acknowledges
    // the GOAWAY's PING): its connection is dropped all the same.
    let mut s = tokio::net::TcpStream::connect(app.data_addr).await.unwrap();
    {
        use tokio::io::AsyncWriteExt;
        // The preface, then an empty SETTINGS frame.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    read_until_closed(&mut s, bound).await;

    // A stream that outlives the timeout is answered whole; the connection, idle
    // after it, is then closed.
    let (mut send, conn) = h2(app.data_addr).await;
    let resp = send.send_request(predict("slow")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["upstream"], "s", "{answer}");
    // Then one whose body outlives the timeout.
    let resp = send.send_request(predict("trickle")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"{\"trickled\": true}");
    // Two more on the same connection, each within the timeout of the one before.
    for _ in 0..2 {
        let resp = send.send_request(predict("m")).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    tokio::time::timeout(bound, conn)
        .await
        .expect("the h2c connection, idle after its streams, is still open")
        .unwrap()
        .unwrap();
    assert_eq!(slow.hits(), 1);
    assert_eq!(up.hits(), 2);
}

/// A data plane served in-process with `park_after` short, its parking measured; the
/// shutdown sender drains it, and the handle says how the drain ended.
struct Parking {
    addr: std::net::SocketAddr,
    parked: prometheus::IntGauge,
    parkings: prometheus::IntCounter,
    accepted: prometheus::IntCounter,
    shutdown: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Drained>,
}

async fn serve_parking(upstream: &str, client_header_timeout: Duration) -> Parking {
    use switchyard::router::server::{serve, ServeOptions};
    let config = switchyard::config::from_yaml_str(&format!(
        "models:\n  m:\n    variants: [{{name: a, upstream: \"{upstream}\", weight: 1}}]\n"
    ))
    .unwrap();
    let router = switchyard::router::Router::new(
        &config,
        switchyard::router::Metrics::new(&prometheus::Registry::new()).unwrap(),
    )
    .unwrap();
    let parked = prometheus::IntGauge::new("parked", "parked").unwrap();
    let parkings = prometheus::IntCounter::new("parkings", "parkings").unwrap();
    let open = prometheus::IntGauge::new("open", "open").unwrap();
    let accepted = prometheus::IntCounter::new("accepted", "accepted").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = ServeOptions {
        max_connections: 64,
        drain_timeout: Duration::from_secs(10),
        client_header_timeout,
        client_send_timeout: Duration::from_secs(60),
        connection_metrics: Some((open, accepted.clone())),
        refused: None,
        park_after: Duration::from_millis(50),
        parked_metrics: Some((parked.clone(), parkings.clone())),
    };
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(
        listener,
        move |p| router.service(Some(p.ip())),
        async move {
            let _ = stop.await;
        },
        opts,
    ));
    Parking {
        addr,
        parked,
        parkings,
        accepted,
        shutdown,
        served,
    }
}

/// Waits (bounded) until `what` holds.
async fn eventually(what: &str, mut holds: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !holds() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what}: still not so after 20 s");
}

/// Reads one HTTP/1.1 response with a `content-length` body: its head and its body.
async fn read_response(s: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("a content-length")
                .trim()
                .parse()
                .unwrap();
            if got.len() >= end + 4 + len {
                assert_eq!(got.len(), end + 4 + len, "bytes beyond one response");
                let body = String::from_utf8_lossy(&got[end + 4..]).into_owned();
                return (head, body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("no answer within 20 s")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

const PREDICT: &[u8] = b"POST /v1/models/m:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n{\"instances\": [[1]]}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_park_and_wake_on_their_next_request() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::echo("a").await;
    let p = serve_parking(&up.url(), Duration::from_secs(30)).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let answered = |head: &str, body: &str| {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let answer: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(answer["upstream"], "a", "{answer}");
    };

    // Answered, then parked while idle.
    s.write_all(PREDICT).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    answered(&head, &body);
    eventually("the idle connection parked", || p.parked.get() == 1).await;

    // Woken by its next request, and answered on the same connection; sent with the
    // first part of a third request, which the connection holds while it parks again.
    let (first, rest) = PREDICT.split_at(40);
    s.write_all(&[PREDICT, first].concat()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    answered(&head, &body);
    eventually("parked again, holding part of a request", || {
        p.parkings.get() >= 2
    })
    .await;
    s.write_all(rest).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    answered(&head, &body);
    assert_eq!(up.hits(), 3);
    assert_eq!(p.accepted.get(), 1, "one connection throughout");

    // A drain closes a parked connection at once and is clean.
    eventually("parked once more", || p.parked.get() == 1).await;
    p.shutdown.send(()).unwrap();
    assert!(read_until_closed(&mut s, Duration::from_secs(20))
        .await
        .is_empty());
    assert_eq!(p.served.await.unwrap(), Drained::Clean);
    assert_eq!(p.parked.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_after_client_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::echo("a").await;
    let p = serve_parking(&up.url(), Duration::from_secs(2)).await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(PREDICT).await.unwrap();
    let (head, _) = read_response(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // Closed while parked: nothing more was said, and nothing forwarded.
    assert!(read_until_closed(&mut s, Duration::from_secs(20))
        .await
        .is_empty());
    assert_eq!(p.parkings.get(), 1, "it was parked when it was closed");
    assert_eq!(p.parked.get(), 0);
    assert_eq!(up.hits(), 1);
}
