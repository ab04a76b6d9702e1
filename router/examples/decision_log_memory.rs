//! The decision log at 10,000 predictions a second with a 10-minute `feedback_ttl`:
//! 6,000,000 decisions held at once. Records them (with our own 32-hex request ids, at
//! times spread over the 10 minutes), reports the resident memory they take and the time
//! per record, a lookup and an expiry sweep. `bench/fleet.sh` runs it (release build).
//!
//! `cargo run --release -p switchyard-router --example decision_log_memory [N]`

use std::time::{Duration, Instant};

use switchyard_router::feedback::DecisionLog;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(6_000_000);
    let ttl = Duration::from_secs(600);
    // 10,000 a second: one every 100 µs.
    let step = ttl.as_secs_f64() / n as f64;
    let ids: Vec<String> = (0..n)
        .map(|_| {
            switchyard_router::ids::new_request_id()
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let before = rss_bytes();
    // Sized with a quarter to spare, as the README advises: shards fill unevenly.
    let log = DecisionLog::new(n + n / 4);
    let mut evicted = 0;
    let start = Instant::now();
    let t0 = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let at = start + Duration::from_secs_f64(i as f64 * step);
        if let switchyard_router::feedback::Recorded::Evicted(k) =
            log.record(at, id.as_bytes(), 0, (i % 3) as u16, 0.33, ttl)
        {
            evicted += k;
        }
        // The housekeeping sweep runs once a second of the log's time: sorts what came.
        if i % 10_000 == 9_999 {
            log.expire(at);
        }
    }
    let record = t0.elapsed();
    let after = rss_bytes();
    let end = start + Duration::from_secs_f64(n as f64 * step);
    let held = log.len();
    let t1 = Instant::now();
    let mut found = 0;
    for id in ids.iter().step_by(97) {
        // Just before the first decision's TTL runs out: all of them still open.
        found += usize::from(
            log.lookup(id.as_bytes(), start + ttl - Duration::from_millis(1))
                .is_ok(),
        );
    }
    let lookups = ids.len().div_ceil(97);
    let lookup = t1.elapsed();
    let t2 = Instant::now();
    let expired = log.expire(end + ttl).len();
    let sweep = t2.elapsed();
    println!(
        "decisions held: {held} (capacity {}, {evicted} evicted)",
        log.capacity()
    );
    println!(
        "resident memory they take: {:.1} MB ({:.1} bytes per decision)",
        (after - before) as f64 / 1e6,
        (after - before) as f64 / n as f64
    );
    println!(
        "record: {:.0} ns per decision (one thread, the sweep every 10,000 included)",
        record.as_nanos() as f64 / n as f64
    );
    println!(
        "lookup: {:.0} ns each ({found} of {lookups} found)",
        lookup.as_nanos() as f64 / lookups as f64
    );
    println!(
        "expiry sweep of all {expired} at once: {:.0} ms",
        sweep.as_secs_f64() * 1e3
    );
}
