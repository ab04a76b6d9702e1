//! Fleet mode end to end: three `switchyard serve` processes on one real `redis-server`
//! (started here on a free port; `scripts/test` installs it), feedback through any of
//! them, weights that agree, and Redis killed and brought back mid-run.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// A `redis-server` on a free loopback port, writing its append-only file (every write
/// synced) to its own directory, so a restart on the same port finds what it held.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    async fn start(test: &str) -> Redis {
        let dir =
            std::env::temp_dir().join(format!("switchyard-fleet-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut r = Redis {
            port,
            dir,
            child: None,
        };
        r.restart().await;
        r
    }

    async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                &self.dir.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (scripts/test installs it with apt-get)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").await.is_ok() {
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await
                    {
                        if buf[..n].starts_with(b"+PONG") {
                            return;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, no last save.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Replicas, killed when the test ends.
struct Replicas(Vec<(Child, SocketAddr, SocketAddr)>);

impl Replicas {
    fn spawn(config: &Path, n: usize) -> Replicas {
        Replicas(
            (0..n)
                .map(|_| {
                    let (child, (data, admin)) =
                        spawn_switchyard_both(["serve", "--config", &config.display().to_string()]);
                    (child, data.parse().unwrap(), admin.parse().unwrap())
                })
                .collect(),
        )
    }

    fn data(&self, i: usize) -> SocketAddr {
        self.0[i % self.0.len()].1
    }

    fn admin(&self, i: usize) -> SocketAddr {
        self.0[i % self.0.len()].2
    }

    async fn states(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for i in 0..self.0.len() {
            out.push(admin_json(self.admin(i), "/admin/state").await);
        }
        out
    }

    /// Polls every replica's `/admin/state` until `ok` holds for all (at most 20 s).
    async fn until(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let states = self.states().await;
            if states.iter().all(&ok) {
                return states;
            }
            assert!(Instant::now() < deadline, "{what}: {states:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for (c, ..) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The fleet's key, written to `fleet.key` in `d`.
fn key_file(d: &Path, key: &str) -> PathBuf {
    let file = d.join("fleet.key");
    std::fs::write(&file, key).unwrap();
    file
}

fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "switchyard-fleet-cfg-{test}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A config of model `m` with variants a, b, c on `upstreams`, a conversion bandit, in
/// the fleet on `redis`.
fn config(redis: &str, upstreams: &[String], key_file: Option<&Path>) -> String {
    let key = key_file.map_or(String::new(), |k| format!("  key_file: {}\n", k.display()));
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nseed: 11\n\
         fleet:\n  redis: \"{redis}\"\n  sync_interval: 200ms\n{key}\
         models:\n  m:\n    bandit: {{objective: conversion, update_interval: 200ms, min_weight: 0.02}}\n    variants:\n\
         \x20     - {{name: a, upstream: \"{}\", weight: 1}}\n\
         \x20     - {{name: b, upstream: \"{}\", weight: 1}}\n\
         \x20     - {{name: c, upstream: \"{}\", weight: 1}}\n",
        upstreams[0], upstreams[1], upstreams[2]
    )
}

async fn upstreams() -> (Vec<Upstream>, Vec<String>) {
    let ups = vec![
        Upstream::echo("a").await,
        Upstream::echo("b").await,
        Upstream::echo("c").await,
    ];
    let urls = ups.iter().map(Upstream::url).collect();
    (ups, urls)
}

fn rewards(state: &Value) -> u64 {
    state["models"]["m"]["variants"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v["rewards"].as_u64().unwrap())
        .sum()
}

async fn feedback(c: &Client, data: SocketAddr, id: &str, converted: bool) -> Reply {
    send(
        c,
        "POST",
        &format!("http://{data}/v1/feedback"),
        &[],
        &json!({ "request_id": id, "converted": converted }).to_string(),
    )
    .await
}

/// As [`feedback`], sending again (at most 50 times, 100 ms apart) while the answer is
/// 503, as a client is told to: for runs that are not about outages, where a claim may
/// still be slow once on a busy machine.
async fn feedback_until_taken(c: &Client, data: SocketAddr, id: &str, converted: bool) -> Reply {
    for _ in 0..50 {
        let reply = feedback(c, data, id, converted).await;
        if reply.status != 503 {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    feedback(c, data, id, converted).await
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// SplitMix64: the test's seeded generator (no dependency for a few lines).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A prediction through replica 1, its feedback through replica 2 (200, counted once
/// everywhere), the same again through replica 3 (409); altered, forged and unknown
/// ids refused; a client's own id kept, its decision in `x-switchyard-decision`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_through_any_replica_counts_once() {
    let redis = Redis::start("once").await;
    let (_ups, urls) = upstreams().await;
    let d = dir("once");
    let key = key_file(&d, "a shared secret of the fleet, 41 bytes.\n");
    let file = d.join("fleet.yaml");
    std::fs::write(&file, config(&redis.url(), &urls, Some(&key))).unwrap();
    let r = Replicas::spawn(&file, 3);
    let c = client();

    let answer = predict(&c, &format!("http://{}/v1/models/m:predict", r.data(0))).await;
    assert_eq!(answer.status, 200);
    let token = answer.header("x-request-id").unwrap().to_string();
    assert_eq!(answer.header("x-switchyard-decision"), Some(token.as_str()));
    let (id, tail) = token
        .rsplit_once('.')
        .expect("a token: <id>.<decision><signature>");
    assert_eq!((id.len(), tail.len()), (32, 84), "{token}");

    // Altered (the decision, the signature) or forged (another id, same tail): 400.
    let flip = |s: &str, at: usize| {
        let mut b = s.as_bytes().to_vec();
        b[at] = if b[at] == b'0' { b'1' } else { b'0' };
        String::from_utf8(b).unwrap()
    };
    for bad in [
        flip(&token, id.len() + 1 + 9),
        flip(&token, token.len() - 1),
        format!("{}.{tail}", "f".repeat(32)),
    ] {
        let reply = feedback(&c, r.data(1), &bad, true).await;
        assert_eq!(reply.status, 400, "{bad}: {:?}", reply.body);
        assert!(reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("does not verify"));
    }
    assert_eq!(
        feedback(&c, r.data(1), &"e".repeat(32), true).await.status,
        404
    );

    let first = feedback_until_taken(&c, r.data(1), &token, true).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let again = feedback_until_taken(&c, r.data(2), &token, true).await;
    assert_eq!(again.status, 409, "{:?}", again.body);
    // Nor at the replica that decided, by the id it saw.
    assert_eq!(
        feedback_until_taken(&c, r.data(0), id, true).await.status,
        409
    );

    // A client's own id stays as sent; the decision rides in its own header.
    let own = send(
        &c,
        "POST",
        &format!("http://{}/v1/models/m:predict", r.data(0)),
        &[("x-request-id", "client-7")],
        r#"{"instances": [[1.0]]}"#,
    )
    .await;
    assert_eq!(own.header("x-request-id"), Some("client-7"));
    let sealed = own.header("x-switchyard-decision").unwrap().to_string();
    assert!(sealed.starts_with("client-7."), "{sealed}");
    assert_eq!(
        feedback_until_taken(&c, r.data(2), &sealed, false)
            .await
            .status,
        200
    );
    assert_eq!(
        feedback_until_taken(&c, r.data(0), "client-7", false)
            .await
            .status,
        409
    );

    // Two rewards in the fleet, on every replica, and still two a few exchanges later.
    r.until("two rewards everywhere", |s| rewards(s) == 2).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for s in r.states().await {
        assert_eq!(rewards(&s), 2, "{s:#}");
        assert_eq!(s["fleet"]["key"], "key_file");
        assert_eq!(s["fleet"]["up"], true);
    }

    // An operator's pin on one replica is the fleet's; a release on another, too.
    let admin = |i: usize, action: &str| format!("http://{}/admin/bandit/m/{action}", r.admin(i));
    assert_eq!(
        send(&c, "POST", &admin(0, "pin/b"), &[], "").await.status,
        200
    );
    r.until("the pin on every replica", |s| {
        s["models"]["m"]["override"] == json!({ "pin": "b" })
            && s["models"]["m"]["variants"]["b"]["weight"].as_f64() == Some(1.0)
    })
    .await;
    assert_eq!(
        send(&c, "POST", &admin(2, "release"), &[], "").await.status,
        200
    );
    r.until("the release on every replica", |s| {
        s["models"]["m"]["override"] == "none"
    })
    .await;
}

/// A world where c converts 5× more than a and b; predictions spread over the three
/// replicas and each feedback sent to another one: every replica's weight for c ends
/// above 0.8, all within 0.01 of each other, and every feedback is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_on_one_posterior() {
    let redis = Redis::start("converge").await;
    let (_ups, urls) = upstreams().await;
    let d = dir("converge");
    let file = d.join("fleet.yaml");
    // No key_file: the first replica makes the key and keeps it in Redis.
    std::fs::write(&file, config(&redis.url(), &urls, None)).unwrap();
    let r = Replicas::spawn(&file, 3);
    r.until("the fleet's key read from Redis", |s| {
        s["fleet"]["key"] == "redis"
    })
    .await;
    let c = client();
    let rate = |v: &str| if v == "c" { 0.20 } else { 0.04 };
    let mut rng = Rng(2026);
    let n = 3000;
    for i in 0..n {
        let answer = predict(&c, &format!("http://{}/v1/models/m:predict", r.data(i))).await;
        assert_eq!(answer.status, 200);
        let variant = answer.header("x-switchyard-variant").unwrap().to_string();
        let token = answer.header("x-request-id").unwrap().to_string();
        let converted = rng.next() < rate(&variant);
        let reply = feedback_until_taken(&c, r.data(i + 1 + i % 2), &token, converted).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    let weight = |s: &Value, v: &str| s["models"]["m"]["variants"][v]["weight"].as_f64().unwrap();
    let states = r
        .until(
            "every feedback counted once, and c's weight above 0.8 everywhere",
            |s| rewards(s) == n as u64 && weight(s, "c") > 0.8,
        )
        .await;
    // The same statistics read, the same weights drawn.
    let states = if states.iter().any(|s| {
        s["models"]["m"]["fleet"]["version"] != states[0]["models"]["m"]["fleet"]["version"]
    }) {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        r.states().await
    } else {
        states
    };
    let cs: Vec<f64> = states.iter().map(|s| weight(s, "c")).collect();
    let (lo, hi) = cs
        .iter()
        .fold((1.0f64, 0.0f64), |(l, h), w| (l.min(*w), h.max(*w)));
    assert!(lo > 0.8, "{cs:?}");
    assert!(
        hi - lo <= 0.01,
        "the replicas' weights for c disagree: {cs:?}"
    );
}

/// Redis killed (SIGKILL) mid-run and started again: no prediction fails; feedback for
/// a replica's own decisions is taken meanwhile, for another's answered 503 and taken
/// when sent again; the fleet's totals then equal the feedback taken, on every replica,
/// with no claim overflowing and none counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_loses_and_doubles_nothing() {
    let mut redis = Redis::start("outage").await;
    let (_ups, urls) = upstreams().await;
    let d = dir("outage");
    let key = key_file(&d, "0123456789abcdef0123456789abcdef");
    let file = d.join("fleet.yaml");
    std::fs::write(&file, config(&redis.url(), &urls, Some(&key))).unwrap();
    let r = Replicas::spawn(&file, 3);
    let c = client();
    let predict_on = |i: usize| {
        let c = c.clone();
        let url = format!("http://{}/v1/models/m:predict", r.data(i));
        async move {
            let a = predict(&c, &url).await;
            assert_eq!(a.status, 200, "a prediction failed: {:?}", a.body);
            a.header("x-request-id").unwrap().to_string()
        }
    };
    let mut taken = 0u64;
    // Before: feedback to another replica.
    for i in 0..150 {
        let token = predict_on(i).await;
        assert_eq!(
            feedback_until_taken(&c, r.data(i + 1), &token, i % 3 == 0)
                .await
                .status,
            200
        );
        taken += 1;
    }
    redis.kill();
    // During: predictions all answered; own decisions' feedback taken, others' 503.
    let mut refused = Vec::new();
    let mut local_tokens = Vec::new();
    for i in 0..150 {
        let token = predict_on(i).await;
        let own = i % 2 == 0;
        let to = if own { i } else { i + 1 };
        let reply = feedback(&c, r.data(to), &token, i % 4 == 0).await;
        if own {
            assert_eq!(reply.status, 200, "{:?}", reply.body);
            taken += 1;
            local_tokens.push((i, token));
        } else {
            assert_eq!(reply.status, 503, "{:?}", reply.body);
            refused.push((to, token));
        }
    }
    let down = r.states().await;
    assert!(down.iter().all(|s| s["fleet"]["up"] == false), "{down:#?}");
    // Readiness says nothing of Redis: a Service keeps every replica.
    for i in 0..3 {
        let ready = send(&c, "GET", &format!("http://{}/readyz", r.admin(i)), &[], "").await;
        assert_eq!(ready.status, 200, "{:?}", ready.body);
    }
    redis.restart().await;
    r.until("Redis seen again", |s| {
        s["fleet"]["up"] == true && s["fleet"]["deferred_claims"] == 0
    })
    .await;
    // The refused feedback, sent again, is taken.
    for (to, token) in &refused {
        let reply = feedback_until_taken(&c, r.data(*to), token, true).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        taken += 1;
    }
    // Feedback taken during the outage was claimed when Redis came back: a copy sent
    // to another replica now is a duplicate.
    for (i, token) in local_tokens.iter().take(10) {
        assert_eq!(
            feedback_until_taken(&c, r.data(i + 1), token, true)
                .await
                .status,
            409
        );
    }
    // After.
    for i in 0..150 {
        let token = predict_on(i).await;
        assert_eq!(
            feedback_until_taken(&c, r.data(i + 2), &token, false)
                .await
                .status,
            200
        );
        taken += 1;
    }
    let states = r
        .until("the fleet's totals equal the feedback taken", |s| {
            rewards(s) == taken
        })
        .await;
    for (i, s) in states.iter().enumerate() {
        assert_eq!(s["fleet"]["deferred_overflow"], 0, "{s:#}");
        let m = metrics(r.admin(i)).await;
        let conflicts = sample(
            &m,
            "switchyard_fleet_claims_total{result=\"late_conflict\"}",
        );
        assert_eq!(
            conflicts.unwrap_or(0.0),
            0.0,
            "a deferred claim found its feedback taken twice"
        );
    }
}

/// A replica stopped (SIGTERM) while Redis is down keeps what it took meanwhile in its
/// state file, and pushes it when it starts again: a replica that never saw any of it
/// then reads every feedback once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_during_an_outage_loses_nothing() {
    let mut redis = Redis::start("restart").await;
    let (_ups, urls) = upstreams().await;
    let d = dir("restart");
    let key = key_file(&d, "0123456789abcdef0123456789abcdef");
    let plain = config(&redis.url(), &urls, Some(&key));
    let kept = d.join("kept.yaml");
    let state = d.join("state.json");
    std::fs::write(
        &kept,
        plain.replacen(
            "seed: 11\n",
            &format!("seed: 11\nstate_file: {}\n", state.display()),
            1,
        ),
    )
    .unwrap();
    let alone = d.join("alone.yaml");
    std::fs::write(&alone, &plain).unwrap();
    let c = client();
    let round = |r: &Replicas, n: usize| {
        let c = c.clone();
        let data = r.data(0);
        async move {
            for i in 0..n {
                let a = predict(&c, &format!("http://{data}/v1/models/m:predict")).await;
                let token = a.header("x-request-id").unwrap().to_string();
                let reply = feedback_until_taken(&c, data, &token, i % 2 == 0).await;
                assert_eq!(reply.status, 200, "{:?}", reply.body);
            }
        }
    };
    let mut first = Replicas::spawn(&kept, 1);
    round(&first, 20).await;
    first
        .until("20 rewards pushed", |s| {
            s["models"]["m"]["fleet"]["unacked"].is_null()
                && s["models"]["m"]["fleet"]["version"].as_u64() > Some(0)
                && rewards(s) == 20
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    round(&first, 10).await;
    // A graceful stop: the last exchange fails, the state file keeps the share.
    let (child, ..) = &mut first.0[0];
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the replica did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(rewards(&saved), 30, "{saved:#}");
    redis.restart().await;
    let again = Replicas::spawn(&kept, 1);
    let other = Replicas::spawn(&alone, 1);
    let states = other
        .until("the fleet holds all 30, once", |s| rewards(s) == 30)
        .await;
    again
        .until("the restarted replica too", |s| rewards(s) == 30)
        .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(rewards(&other.states().await[0]), 30, "{states:#?}");
}
