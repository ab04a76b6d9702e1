//! What fleet mode adds to a prediction and to a feedback, without Redis: sealing a
//! decision into its request id (HMAC-SHA256 and hex) and opening one. `bench/fleet.sh`
//! runs it (release build).
//!
//! `cargo run --release -p switchyard-fleet --example seal`

use std::time::{Duration, Instant};

use switchyard_router::feedback::{FleetDecisions, Portable};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let key = std::env::temp_dir().join(format!("switchyard-seal-{}", std::process::id()));
    std::fs::write(&key, "a fleet key of more than sixteen bytes").unwrap();
    let config = switchyard_config::Fleet {
        redis: switchyard_config::RedisUrl::parse("redis://127.0.0.1:1").unwrap(),
        key_prefix: "bench".into(),
        sync_interval: Duration::from_secs(1),
        key_file: Some(key.display().to_string()),
    };
    let fleet = switchyard_fleet::Fleet::new(&config, &prometheus::Registry::new()).unwrap();
    let _ = std::fs::remove_file(&key);
    let n = 1_000_000;
    let ids: Vec<String> = (0..1000)
        .map(|_| {
            switchyard_router::ids::new_request_id()
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let d = Portable {
        model: 7,
        variant: 1,
        probability: 0.5,
        at_unix_ms: 1_790_000_000_000,
        ttl_ms: 600_000,
        latency_us: 900,
    };
    let t = Instant::now();
    let mut tokens = Vec::with_capacity(1000);
    for i in 0..n {
        let token = fleet.seal(ids[i % 1000].as_bytes(), &d).unwrap();
        if tokens.len() < 1000 {
            tokens.push(token);
        }
    }
    let seal = t.elapsed();
    let t = Instant::now();
    let mut ok = 0;
    for i in 0..n {
        ok += usize::from(matches!(fleet.open(&tokens[i % 1000]), Some(Ok(_))));
    }
    let open = t.elapsed();
    println!(
        "seal: {:.0} ns per prediction ({} bytes of id)",
        seal.as_nanos() as f64 / n as f64,
        tokens[0].len()
    );
    println!(
        "open: {:.0} ns per feedback ({ok} of {n} verified)",
        open.as_nanos() as f64 / n as f64
    );
}
