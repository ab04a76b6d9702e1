//! Shared helpers for the end-to-end tests: fake model servers on `127.0.0.1:0`, a
//! client, and Switchyard itself started in-process.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a fake upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

/// A fake model server: answers every request with a JSON echo of what it received.
pub struct Upstream {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// TCP connections open now (closed by either side: no longer counted).
    pub open: Arc<AtomicUsize>,
}

impl Upstream {
    /// Echoes at once.
    pub async fn echo(name: &str) -> Upstream {
        Upstream::start(name, Duration::ZERO).await
    }

    /// Echoes after `delay`.
    pub async fn start(name: &str, delay: Duration) -> Upstream {
        let n = name.to_string();
        let mut u = serve(delay, move |parts, body| {
            let hdr = |k: &str| {
                parts
                    .headers
                    .get(k)
                    .map(|v| v.to_str().unwrap_or("?").to_string())
            };
            let reply = json!({
                "upstream": n,
                "method": parts.method.as_str(),
                "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or(""),
                "host": hdr("host"),
                "x_request_id": hdr("x-request-id"),
                "x_forwarded_for": hdr("x-forwarded-for"),
                "version": format!("{:?}", parts.version),
                "content_encoding": hdr("content-encoding"),
                "accept_encoding": hdr("accept-encoding"),
                "body_len": body.len(),
                "body": String::from_utf8_lossy(body),
            });
            let mut resp = Response::new(Full::new(Bytes::from(reply.to_string())));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            resp.headers_mut()
                .insert("x-upstream-header", "kept".parse().unwrap());
            resp
        })
        .await;
        u.name = name.to_string();
        u
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until this upstream has received `n` requests.
    pub async fn wait_for_hits(&self, n: usize) {
        for _ in 0..500 {
            if self.hits() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("upstream {} never saw {n} requests", self.name);
    }

    /// Waits until no connection to this upstream is open, at most `bound` (a bound far
    /// beyond what is under test, not a measurement); whether they all closed.
    pub async fn all_closed_within(&self, bound: Duration) -> bool {
        tokio::time::timeout(bound, async {
            while self.open.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .is_ok()
    }
}

/// An address where nothing listens (connections are refused).
pub async fn refused_addr() -> SocketAddr {
    // Bound and never listening, and kept so for the test process's life: a port only
    // freed could be taken at once by another test's listener running alongside, and
    // then connections to it would be accepted.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = socket.local_addr().unwrap();
    std::mem::forget(socket);
    a
}

/// Accepts connections on `127.0.0.1:0` and hands each to `handle` in its own task: the
/// raw TCP upstreams below, which misbehave in ways a real HTTP server will not.
pub async fn raw_upstream<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream));
        }
    });
    addr
}

/// A server that reads the request and closes the connection without answering.
pub async fn resetting_upstream() -> SocketAddr {
    raw_upstream(|mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        drop(stream);
    })
    .await
}

/// Starts Switchyard in-process on free ports with the given YAML config (its `listen`
/// and `admin_listen` are ignored).
pub async fn start(yaml: &str) -> switchyard::Running {
    let config = switchyard::config::from_yaml_str(yaml)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    switchyard::start(config, data, admin).unwrap()
}

/// An HTTP/1.1 client with a keep-alive pool.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 (h2c, prior knowledge) client.
pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends one request and reads the whole answer.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    send_bytes(client, method, url, headers, Bytes::from(body.to_string())).await
}

/// As [`send`], with a body of any bytes (compressed, binary).
pub async fn send_bytes(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers: parts.headers,
        body,
    }
}

/// POSTs a small prediction request.
pub async fn predict(client: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Reply {
    send(client, "POST", url, &[], r#"{"instances": [[1.0, 2.0]]}"#).await
}

/// Writes raw bytes on a fresh connection and reads until the server closes or answers.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") && out.ends_with(b"}") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads `/metrics` from the admin listener.
pub async fn metrics(admin: SocketAddr) -> String {
    let r = send(
        &client(),
        "GET",
        &format!("http://{admin}/metrics"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec()).unwrap()
}

/// The value of one sample line in Prometheus text, e.g.
/// `switchyard_requests_total{class="2xx",model="m",variant="a"}`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// Binomial tolerance used by the split tests: 5 standard deviations. A correct sampler
/// fails this with probability below 1e-6 for a random seed; with the fixed seed the
/// test is deterministic.
pub fn within_5_sigma(count: usize, n: usize, p: f64) -> bool {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - mean).abs() <= 5.0 * sd.max(1.0)
}

/// Starts the `switchyard` binary with `args` and reads its first stdout line
/// (`switchyard listening data=ADDR admin=ADDR`); returns the child and the data address.
/// Our end of stdout is then closed on purpose: a sidecar whose log reader goes away must
/// keep serving (it once panicked on its next write).
pub fn spawn_switchyard<I, S>(args: I) -> (std::process::Child, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let (child, (data, _)) = spawn_switchyard_both(args);
    (child, data)
}

/// As [`spawn_switchyard`], with both addresses of its first line: data and admin.
pub fn spawn_switchyard_both<I, S>(args: I) -> (std::process::Child, (String, String))
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    spawn_switchyard_env(args, &[])
}

/// As [`spawn_switchyard_both`], with environment variables set for the child.
pub fn spawn_switchyard_env<I, S>(
    args: I,
    env: &[(&str, &str)],
) -> (std::process::Child, (String, String))
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    spawn(args, env, false)
}

/// As [`spawn_switchyard_env`], also returning its log lines (stderr) as they come,
/// read on a thread so the pipe never fills.
pub fn spawn_switchyard_logged<I, S>(
    args: I,
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    (String, String),
    std::sync::mpsc::Receiver<String>,
)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    use std::io::BufRead;
    let (mut child, addrs) = spawn(args, env, true);
    let (tx, log) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    (child, addrs, log)
}

/// Starts the binary and reads its first stdout line; its stderr piped when `log`.
fn spawn<I, S>(args: I, env: &[(&str, &str)], log: bool) -> (std::process::Child, (String, String))
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    use std::io::BufRead;
    let stderr = if log {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = |key: &str| -> String {
        first
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {first:?}"))
            .to_string()
    };
    let addrs = (addr("data="), addr("admin="));
    (child, addrs)
}

/// A fake model server whose answer is `answer(path, request body)` → (status, body),
/// after `delay`; it records the requests it saw.
pub async fn model_server<F>(delay: Duration, answer: F) -> Upstream
where
    F: Fn(&str, &[u8]) -> (u16, String) + Send + Sync + 'static,
{
    serve(delay, move |parts, body| {
        let (status, reply) = answer(parts.uri.path(), body);
        let mut resp = Response::new(Full::new(Bytes::from(reply)));
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
        resp
    })
    .await
}

/// A server on `127.0.0.1:0` answering `answer(request head, body)` after `delay`,
/// counting connections and requests and keeping what it saw.
pub async fn serve<F>(delay: Duration, answer: F) -> Upstream
where
    F: Fn(&http::request::Parts, &Bytes) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hits = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    let (s, h, conns, now) = (
        seen.clone(),
        hits.clone(),
        connections.clone(),
        open.clone(),
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            now.fetch_add(1, Ordering::SeqCst);
            let (s, h, answer, now) = (s.clone(), h.clone(), answer.clone(), now.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (s, h, answer) = (s.clone(), h.clone(), answer.clone());
                    async move {
                        h.fetch_add(1, Ordering::SeqCst);
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let resp = answer(&parts, &body);
                        s.lock().unwrap().push(Seen {
                            path: parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            headers: parts.headers,
                            body,
                            version: parts.version,
                        });
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                now.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Upstream {
        addr,
        name: "model".into(),
        seen,
        hits,
        connections,
        open,
    }
}

/// A server that accepts connections and reads from them but never answers.
pub async fn hanging_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = raw_upstream(move |mut stream| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        }
    })
    .await;
    (addr, accepted)
}

/// Reads one whole HTTP/1.1 request from `stream`: its head, then as many bytes as its
/// `content-length` says. `false` if the peer closed or failed first.
pub async fn read_request(stream: &mut TcpStream) -> bool {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return false;
        };
        if n == 0 {
            return false;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return true;
            }
        }
    }
}

/// A server that answers each request's head at once and its body (`{"trickled": true}`)
/// only after `delay`, then closes the connection.
pub async fn trickling_upstream(delay: Duration) -> SocketAddr {
    raw_upstream(move |mut stream| async move {
        if !read_request(&mut stream).await {
            return;
        }
        let body = b"{\"trickled\": true}";
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        tokio::time::sleep(delay).await;
        let _ = stream.write_all(body).await;
    })
    .await
}

/// GETs an admin path and parses the JSON answer.
pub async fn admin_json(admin: SocketAddr, path: &str) -> Value {
    let r = send(&client(), "GET", &format!("http://{admin}{path}"), &[], "").await;
    assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    r.json()
}
