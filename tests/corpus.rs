//! The malformed-request corpus: what a hostile or broken client sends, over raw
//! sockets, to the release-shaped binary (a child process, so an abort would show), with
//! a local variant, a remote one and a bandit model for feedback. Each input must be
//! answered (a 4xx, JSON wherever the answer is ours, or the connection closed), the
//! process must stay up, the next valid request must be served, and at the end every
//! connection must be gone.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// The first digit of scikit-learn's set: 64 pixels.
const DIGIT: &str = "[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]";

/// Longest any one input may take to be answered or closed (the config's header and
/// body timeouts are 1 s).
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// What an input must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    /// Our own answer: this status, with a JSON body that has an `error`.
    Json(u16),
    /// A 4xx from the HTTP stack (hyper writes no body), or the connection closed.
    Refused,
    /// Forwarded to the remote variant (the echo server), which saw exactly this body.
    Echoed(&'static str),
}

/// What came back.
#[derive(Debug)]
struct Outcome {
    status: Option<u16>,
    body: Vec<u8>,
    head: String,
}

/// One input: a name, the bytes (sent at once; for the slow-client kinds nothing more
/// follows, and the server must answer or close by itself), and what it must get.
struct Input {
    name: &'static str,
    bytes: Vec<u8>,
    want: Want,
}

fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").into_bytes()
}

fn head_then(head: &str, body: &[u8]) -> Vec<u8> {
    let mut r = head.as_bytes().to_vec();
    r.extend_from_slice(body);
    r
}

fn v2(datatype: &str, shape: &str, data: &str) -> Vec<u8> {
    format!(
        r#"{{"inputs":[{{"name":"pixels","datatype":"{datatype}","shape":{shape},"data":{data}}}]}}"#
    )
    .into_bytes()
}

const TF_LOCAL: &str = "/v1/models/digits:predict";
const V2_LOCAL: &str = "/v2/models/digits/infer";
const TF_REMOTE: &str = "/v1/models/remote:predict";
const V2_REMOTE: &str = "/v2/models/remote/infer";
const FEEDBACK: &str = "/v1/feedback";

fn corpus() -> Vec<Input> {
    use Want::*;
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes();
    let mut inputs = vec![
        // The HTTP layer.
        Input { name: "unknown method", bytes: b"BREW /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), want: Refused },
        Input { name: "HTTP/0.9 request", bytes: b"GET /\r\n\r\n".to_vec(), want: Refused },
        Input { name: "HTTP/3.0 version", bytes: b"GET / HTTP/3.0\r\nHost: x\r\n\r\n".to_vec(), want: Refused },
        Input { name: "h2c preface then garbage", bytes: head_then("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &[0xde; 64]), want: Refused },
        Input { name: "h2c preface cut short", bytes: b"PRI * HTTP/2.0\r\n\r\nS".to_vec(), want: Refused },
        Input { name: "binary garbage", bytes: (0..=255u8).cycle().take(4096).collect(), want: Refused },
        Input { name: "TLS client hello on the plain port", bytes: vec![0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03], want: Refused },
        Input { name: "header flood (5,000 headers)", bytes: {
            let mut h = String::from("GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n");
            for i in 0..5000 { h.push_str(&format!("X-Flood-{i}: {i}\r\n")); }
            h.push_str("\r\n");
            h.into_bytes()
        }, want: Refused },
        Input { name: "one 1 MiB header", bytes: format!("GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20)).into_bytes(), want: Refused },
        Input { name: "100 KB path", bytes: get(&format!("/v1/models/{}:predict", "m".repeat(100_000))), want: Refused },
        Input { name: "NUL byte in a header", bytes: b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\nConnection: close\r\n\r\n".to_vec(), want: Refused },
        Input { name: "header without a colon", bytes: b"GET /v2/health/ready HTTP/1.1\r\nHost x\r\nConnection: close\r\n\r\n".to_vec(), want: Refused },
        Input { name: "absurd content-length", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n"), b"{}"), want: Refused },
        Input { name: "negative content-length", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"), b"{}"), want: Refused },
        Input { name: "two different content-lengths", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n"), b"{}"), want: Refused },
        Input { name: "content-length beyond max_body_bytes", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000000000\r\n\r\n"), b"{"), want: Json(413) },
        Input { name: "chunked with a bad size", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"), b"zz\r\n{}\r\n0\r\n\r\n"), want: Refused },
        Input { name: "chunked with a 2^64 chunk", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"), b"ffffffffffffffffff\r\n{}\r\n"), want: Refused },
        Input { name: "chunked and content-length (smuggling), local", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"), b"2\r\n{}\r\n0\r\n\r\n"), want: Json(400) },
        // hyper drops Content-Length when Transfer-Encoding is present (RFC 9112 §6.3):
        // the upstream gets the chunked body's two bytes and no stale length of 40.
        Input { name: "chunked and content-length (smuggling), remote", bytes: head_then(&format!("POST {TF_REMOTE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"), b"2\r\n{}\r\n0\r\n\r\n"), want: Echoed("{}") },
        Input { name: "chunked body that never ends (stalled)", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"), b"2\r\n{}\r\n"), want: Json(408) },
        Input { name: "body shorter than its content-length (stalled)", bytes: head_then(&format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100\r\n\r\n"), b"{\"instances\""), want: Json(408) },
        Input { name: "slowloris: a head that never ends", bytes: b"POST /v1/models/digits:predict HTTP/1.1\r\nHost: x\r\nX-Slow: a".to_vec(), want: Refused },
        Input { name: "expect 100-continue beyond the limit", bytes: format!("POST {TF_LOCAL} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Length: 1000000000\r\n\r\n").into_bytes(), want: Json(413) },
        // Paths.
        Input { name: "path traversal in a version", bytes: post("/v2/models/remote/versions/..%2F..%2Fsecret/infer", b"{}"), want: Json(400) },
        Input { name: "encoded dot-dot model name", bytes: post("/v2/models/%2e%2e/infer", b"{}"), want: Json(400) },
        Input { name: "backslash in a model name", bytes: post("/v2/models/a%5Cb/infer", b"{}"), want: Json(400) },
        Input { name: "encoded CR LF in a label", bytes: get("/v1/models/remote/labels/a%0D%0Ab"), want: Json(400) },
        Input { name: "broken percent escape", bytes: post("/v2/models/ab%zz/infer", b"{}"), want: Json(400) },
        Input { name: "unicode model name", bytes: post("/v2/models/%E6%A8%A1%E5%9E%8B/infer", b"{}"), want: Json(404) },
        Input { name: "raw non-UTF-8 bytes in the path", bytes: b"POST /v2/models/\xff\xfe/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}".to_vec(), want: Refused },
        Input { name: "unknown endpoint", bytes: get("/v3/everything"), want: Json(404) },
        Input { name: "wrong method for infer", bytes: get(V2_LOCAL), want: Json(405) },
        Input { name: "version the local model lacks", bytes: post("/v2/models/digits/versions/99/infer", &v2("FP32", "[1,64]", DIGIT)), want: Json(404) },
        // TF Serving bodies, local variant.
        Input { name: "TF: empty body", bytes: post(TF_LOCAL, b""), want: Json(400) },
        Input { name: "TF: truncated JSON", bytes: post(TF_LOCAL, b"{\"instances\": [[1, 2"), want: Json(400) },
        Input { name: "TF: nested 100,000 deep", bytes: post(TF_LOCAL, &head_then("{\"instances\": ", &deep(100_000))), want: Json(400) },
        Input { name: "TF: instances is a string", bytes: post(TF_LOCAL, b"{\"instances\": \"abc\"}"), want: Json(400) },
        Input { name: "TF: NaN literal", bytes: post(TF_LOCAL, format!("{{\"instances\": [[NaN{}]]}}", ",0".repeat(63)).as_bytes()), want: Json(400) },
        Input { name: "TF: 1e999", bytes: post(TF_LOCAL, format!("{{\"instances\": [[1e999{}]]}}", ",0".repeat(63)).as_bytes()), want: Json(400) },
        Input { name: "TF: 1e39 (past f32)", bytes: post(TF_LOCAL, format!("{{\"instances\": [[1e39{}]]}}", ",0".repeat(63)).as_bytes()), want: Json(400) },
        Input { name: "TF: a row of 400,000 values", bytes: post(TF_LOCAL, format!("{{\"instances\": [[{}0]]}}", "0,".repeat(399_999)).as_bytes()), want: Json(400) },
        Input { name: "TF: 5,000 empty rows", bytes: post(TF_LOCAL, format!("{{\"instances\": [{}[]]}}", "[],".repeat(4999)).as_bytes()), want: Json(400) },
        Input { name: "TF: bad UTF-8 in a string", bytes: post(TF_LOCAL, b"{\"instances\": [\"\xff\xfe\"]}"), want: Json(400) },
        Input { name: "TF: both instances and inputs", bytes: post(TF_LOCAL, format!("{{\"instances\": [{DIGIT}], \"inputs\": [{DIGIT}]}}").as_bytes()), want: Json(400) },
        Input { name: "TF: unknown signature", bytes: post(TF_LOCAL, format!("{{\"signature_name\": \"x\", \"instances\": [{DIGIT}]}}").as_bytes()), want: Json(400) },
        // V2 bodies, local variant.
        Input { name: "V2: shape 10^12 × 64 (the 100-byte abort)", bytes: post(V2_LOCAL, &v2("FP32", "[1000000000000,64]", "[1]")), want: Json(400) },
        Input { name: "V2: shape that wraps", bytes: post(V2_LOCAL, &v2("FP32", "[288230376151711745,64]", DIGIT)), want: Json(400) },
        Input { name: "V2: negative shape", bytes: post(V2_LOCAL, &v2("FP32", "[-1,64]", DIGIT)), want: Json(400) },
        Input { name: "V2: unknown datatype", bytes: post(V2_LOCAL, &v2("FP99", "[1,64]", DIGIT)), want: Json(400) },
        Input { name: "V2: INT8 1000", bytes: post(V2_LOCAL, &v2("INT8", "[1,64]", &format!("[1000{}]", ",0".repeat(63)))), want: Json(400) },
        Input { name: "V2: UINT64 2^64", bytes: post(V2_LOCAL, &v2("UINT64", "[1,64]", &format!("[18446744073709551616{}]", ",0".repeat(63)))), want: Json(400) },
        Input { name: "V2: data nested 40 deep", bytes: post(V2_LOCAL, &v2("FP32", "[1,64]", &format!("{}1{}", "[".repeat(40), "]".repeat(40)))), want: Json(400) },
        Input { name: "V2: BYTES datatype", bytes: post(V2_LOCAL, &v2("BYTES", "[1]", "[\"abc\"]")), want: Json(400) },
        Input { name: "V2: inputs is an object", bytes: post(V2_LOCAL, b"{\"inputs\": {\"a\": 1}}"), want: Json(400) },
        Input { name: "V2: shape of strings", bytes: post(V2_LOCAL, &v2("FP32", "[\"1\",\"64\"]", DIGIT)), want: Json(400) },
        // Remote variant: bad paths never reach it; bodies are its business.
        Input { name: "TF: traversal in the model name", bytes: post("/v1/models/..:predict", b"{}"), want: Json(400) },
        Input { name: "TF classify of a local model", bytes: post("/v1/models/digits:classify", b"{}"), want: Json(400) },
        // Feedback.
        Input { name: "feedback: not JSON", bytes: post(FEEDBACK, b"not json"), want: Json(400) },
        Input { name: "feedback: no request_id", bytes: post(FEEDBACK, b"{\"converted\": true}"), want: Json(400) },
        Input { name: "feedback: batch that is not a list", bytes: post(FEEDBACK, b"{\"feedback\": 7}"), want: Json(400) },
        Input { name: "feedback: revenue 1e400", bytes: post(FEEDBACK, b"{\"request_id\": \"a\", \"revenue\": 1e400}"), want: Json(400) },
        Input { name: "feedback: nested 100,000 deep", bytes: post(FEEDBACK, &deep(100_000)), want: Json(400) },
        Input { name: "feedback: unknown id", bytes: post(FEEDBACK, b"{\"request_id\": \"nope\", \"converted\": true}"), want: Json(404) },
        Input { name: "feedback: request_id of 1 MB", bytes: post(FEEDBACK, format!("{{\"request_id\": \"{}\", \"converted\": true}}", "x".repeat(1 << 20)).as_bytes()), want: Json(404) },
        Input { name: "feedback: wrong method", bytes: get(FEEDBACK), want: Json(405) },
    ];
    // A batch of 20,000 bad items: answered item by item.
    let items = vec!["{\"request_id\": 5}"; 20_000].join(",");
    inputs.push(Input {
        name: "feedback: 20,000 malformed items",
        bytes: post(FEEDBACK, format!("{{\"feedback\": [{items}]}}").as_bytes()),
        want: Json(200),
    });
    inputs
}

/// Sends `bytes` on a fresh connection and reads until the server closes, bounded.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Outcome {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything (413, 431): a
    // failed write is part of the test, not an error of it.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(ANSWER_WITHIN, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "neither answered nor closed within {ANSWER_WITHIN:?}"
    );
    let split = out.windows(4).position(|w| w == b"\r\n\r\n");
    let head = String::from_utf8_lossy(&out[..split.unwrap_or(out.len())]).into_owned();
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok());
    let body = split.map_or(Vec::new(), |at| out[at + 4..].to_vec());
    Outcome { status, body, head }
}

fn check(input: &Input, got: &Outcome) -> Result<(), String> {
    match input.want {
        Want::Json(status) => {
            if got.status != Some(status) {
                return Err(format!("status {:?}, wanted {status}", got.status));
            }
            let v: serde_json::Value = serde_json::from_slice(&got.body).map_err(|e| {
                format!(
                    "body is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&got.body)
                )
            })?;
            if status != 200 && !v["error"].is_string() {
                return Err(format!("no `error` in {v}"));
            }
            Ok(())
        }
        Want::Refused => match got.status {
            None => Ok(()),
            Some(s) if (400..500).contains(&s) => {
                // Ours are JSON; hyper's own refusals have no body.
                if !got.body.is_empty() && got.head.contains("application/json") {
                    serde_json::from_slice::<serde_json::Value>(&got.body)
                        .map(drop)
                        .map_err(|e| format!("JSON error body does not parse: {e}"))
                } else {
                    Ok(())
                }
            }
            Some(s) => Err(format!("status {s}, wanted a 4xx or a close")),
        },
        Want::Echoed(body) => {
            let v: serde_json::Value = serde_json::from_slice(&got.body).map_err(|e| {
                format!("status {:?}, body is not the echo's JSON: {e}", got.status)
            })?;
            if got.status == Some(200) && v["body"] == body {
                Ok(())
            } else {
                Err(format!("the upstream saw {v}, wanted body {body:?}"))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_input_is_answered_and_the_sidecar_keeps_serving() {
    let remote = Upstream::echo("remote").await;
    let dir = std::env::temp_dir().join(format!("switchyard-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nmax_body_bytes: 8388608\nclient_header_timeout: 1s\nclient_body_timeout: 1s\nmodels:\n  digits:\n    bandit: {{objective: conversion}}\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n  remote:\n    variants: [{{name: r, upstream: \"{}\", weight: 1}}]\n",
            remote.url()
        ),
    )
    .unwrap();
    let (mut child, (data, admin)) = spawn_switchyard_both([
        std::ffi::OsStr::new("serve"),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    let (data, admin): (SocketAddr, SocketAddr) = (data.parse().unwrap(), admin.parse().unwrap());
    let inputs = corpus();
    assert!(inputs.len() >= 40, "{} inputs", inputs.len());
    let valid = [
        post(TF_LOCAL, format!("{{\"instances\": [{DIGIT}]}}").as_bytes()),
        post(V2_LOCAL, &v2("FP32", "[1,64]", DIGIT)),
        post(TF_REMOTE, b"{\"instances\": [[1.0]]}"),
        post(V2_REMOTE, b"{\"inputs\": []}"),
    ];
    let mut failures = Vec::new();
    let (mut ours, mut refused) = (0, 0);
    for (i, input) in inputs.iter().enumerate() {
        let got = exchange(data, &input.bytes).await;
        match check(input, &got) {
            Ok(()) => {
                if got.status.is_some() && !got.body.is_empty() {
                    ours += 1;
                } else {
                    refused += 1;
                }
            }
            Err(e) => failures.push(format!("{}: {e}", input.name)),
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the process exited after {:?}",
            input.name
        );
        // The next valid request is served (rotating over local/remote, TF/V2).
        let ok = exchange(data, &valid[i % valid.len()]).await;
        if ok.status != Some(200) {
            failures.push(format!(
                "after {}: valid request got {:?} {:?}",
                input.name,
                ok.status,
                String::from_utf8_lossy(&ok.body)
            ));
        }
    }
    // Every connection is gone: the open-connections gauge returns to 0 (bounded wait).
    let mut open = None;
    for _ in 0..100 {
        open = sample(&metrics(admin).await, "switchyard_connections_open");
        if open == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let panics = sample(
        &metrics(admin).await,
        r#"switchyard_local_panics_total{model="digits"}"#,
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(open, Some(0.0), "connections still open");
    assert_eq!(panics, Some(0.0));
    // The figures RELIABILITY.md quotes.
    println!(
        "corpus: {} inputs, {} answered by us (JSON), {} refused by the HTTP stack or closed, {} valid requests served between them, 0 restarts",
        inputs.len(),
        ours,
        refused,
        inputs.len()
    );
}
