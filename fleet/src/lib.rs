//! Fleet mode (`fleet:`): the replicas of one model server, each with its Switchyard,
//! learn as one through a Redis they share. One [`Fleet`] per process is both seams'
//! second implementation:
//!
//! - the bandit runtime's [`Ledger`]: every `sync_interval` each model's additive
//!   deltas go to one hash per model and objective (`<prefix>:bandit:<model>:<objective>`)
//!   through one Lua script that adds them (unless the replica's push number was seen:
//!   a push repeated after a lost answer counts once), discounts by time with Redis's
//!   clock when `half_life` is a time, sets an operator's override, and answers the
//!   totals every replica then holds;
//! - the router's [`FleetDecisions`]: request ids carry their decision, signed with the
//!   fleet's key (HMAC-SHA256, `key_file` or a random key the first replica keeps in
//!   Redis at `<prefix>:key`), so any replica can take their feedback; each feedback
//!   claims its decision with `SET <prefix>:claim:<key> 1 NX PX <ttl>`, so the second
//!   copy is refused wherever it lands.
//!
//! Redis is never on the request path: sealing a decision is an HMAC. Feedback waits
//! for its claim at most [`CLAIM_WAIT`], and not at all while Redis is known down; then
//! this replica's own decisions are taken and their claims kept ([`MAX_DEFERRED`] at
//! most, overflow counted) until Redis is back, and other replicas' are answered 503.
//! Exchanges run on a second connection, so a large one never delays a claim.
//!
//! - [`resp`]: the Redis protocol, pipelined, bounded.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod resp;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use resp::{Conn, Reply};
use serde_json::{json, Value};
use sha2::Sha256;
use switchyard_bandit_runtime::fleet::{ArmStats, Exchange, Ledger, Push, Totals, STAT_NAMES};
use switchyard_config::Fleet as FleetConfig;
use switchyard_router::feedback::{Claim, FleetDecisions, FleetFuture, Portable, Unsealed};

/// Longest a feedback request waits for its claim.
pub const CLAIM_WAIT: Duration = Duration::from_millis(250);
/// Longest a background exchange (statistics, expiry checks, deferred claims) waits.
const BACKGROUND_WAIT: Duration = Duration::from_secs(2);
/// Claims kept while Redis is down, at most (16 bytes and a deadline each).
pub const MAX_DEFERRED: usize = 100_000;
/// Bytes of the decision in a token, and of its signature.
const PAYLOAD: usize = 26;
const TAG: usize = 16;
/// Hex digits after the token's last `.`.
const TOKEN_TAIL: usize = 2 * (PAYLOAD + TAG);

/// The script of one exchange: see the crate's note. KEYS[1]: the model's hash.
/// ARGV: replica, push number (0: read only), half-life in seconds (0: none), override
/// JSON (empty: unchanged), the number of seed pairs, the seed's field/value pairs (set
/// only when the hash does not exist: a Redis that lost it starts from the totals this
/// replica last read), then field/delta pairs.
const EXCHANGE: &str = r"
local h = KEYS[1]
local nseed = tonumber(ARGV[5])
if redis.call('EXISTS', h) == 0 then
  for i = 6, 5 + 2 * nseed, 2 do
    redis.call('HSET', h, ARGV[i], ARGV[i + 1])
  end
end
local hl = tonumber(ARGV[3])
if hl > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local at = tonumber(redis.call('HGET', h, 'decayed_at'))
  if at and now > at then
    local f = 0.5 ^ ((now - at) / hl)
    local all = redis.call('HGETALL', h)
    for i = 1, #all, 2 do
      local s = string.sub(all[i], -3)
      if s == '|e0' or s == '|e1' or s == '|e2' then
        redis.call('HSET', h, all[i], string.format('%.17g', tonumber(all[i + 1]) * f))
      end
    end
  end
  redis.call('HSET', h, 'decayed_at', string.format('%.6f', now))
end
local seqf = 'seq|' .. ARGV[1]
local seq = tonumber(ARGV[2])
if seq > 0 and seq > tonumber(redis.call('HGET', h, seqf) or '0') then
  for i = 6 + 2 * nseed, #ARGV, 2 do
    redis.call('HINCRBYFLOAT', h, ARGV[i], ARGV[i + 1])
  end
  redis.call('HSET', h, seqf, ARGV[2])
  redis.call('HINCRBY', h, 'version', 1)
end
if ARGV[4] ~= '' then
  redis.call('HSET', h, 'override', ARGV[4])
end
return redis.call('HGETALL', h)
";

/// One connection, opened when first needed and dropped on any failure.
type Slot = tokio::sync::Mutex<Option<Conn>>;

/// Fleet mode's metrics.
#[derive(Debug, Clone)]
struct Metrics {
    up: IntGauge,
    exchanges: IntCounterVec,
    claims: IntCounterVec,
    deferred: IntGauge,
    overflow: IntCounter,
}

impl Metrics {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            up: IntGauge::new("switchyard_fleet_up", "1 while the fleet's Redis answers, 0 while it does not (routing and learning go on either way).")?,
            exchanges: IntCounterVec::new(Opts::new("switchyard_fleet_exchanges_total", "Exchanges of a model's statistics with the fleet, by result (ok, failed)."), &["result"])?,
            claims: IntCounterVec::new(Opts::new("switchyard_fleet_claims_total", "Fleet-wide claims of feedback, by result: first, taken (a duplicate, answered 409), unreachable (Redis down), slow (Redis up but no answer within 250 ms: answered 503), deferred (taken here while Redis was down, claimed later), late_conflict (a deferred claim found another replica had taken the same feedback)."), &["result"])?,
            deferred: IntGauge::new("switchyard_fleet_deferred_claims", "Claims waiting for Redis to come back.")?,
            overflow: IntCounter::new("switchyard_fleet_deferred_overflow_total", "Claims dropped because too many waited for Redis (their feedback was learned; a duplicate of it elsewhere would not be refused).")?,
        };
        r.register(Box::new(m.up.clone()))?;
        r.register(Box::new(m.exchanges.clone()))?;
        r.register(Box::new(m.claims.clone()))?;
        r.register(Box::new(m.deferred.clone()))?;
        r.register(Box::new(m.overflow.clone()))?;
        m.up.set(1);
        Ok(m)
    }
}

/// Where the fleet's key came from.
#[derive(Debug, Clone, Copy)]
enum KeySource {
    File,
    Redis,
}

/// One process's membership of a fleet.
#[derive(Debug)]
pub struct Fleet {
    config: FleetConfig,
    /// The HMAC keyed once (its inner and outer pads hashed), cloned per token.
    key: OnceLock<(Hmac<Sha256>, KeySource)>,
    /// Claims (feedback waits on these).
    claims: Slot,
    /// Exchanges, expiry checks, deferred claims, the key.
    background: Slot,
    up: AtomicBool,
    /// Milliseconds since `started` of the last good exchange (0: none yet).
    last_ok_ms: AtomicU64,
    started: Instant,
    last_error: Mutex<String>,
    deferred: Mutex<Vec<(u128, Instant)>>,
    metrics: Metrics,
}

impl Fleet {
    /// Joins the fleet `config` describes: reads `key_file` when set (at least 16
    /// bytes), registers the metrics, and starts fetching the key from Redis when there
    /// is no file. Connections are opened when first needed.
    pub fn new(config: &FleetConfig, registry: &Registry) -> Result<Arc<Fleet>, String> {
        let metrics = Metrics::new(registry).map_err(|e| format!("fleet metrics: {e}"))?;
        let fleet = Arc::new(Fleet {
            config: config.clone(),
            key: OnceLock::new(),
            claims: Slot::default(),
            background: Slot::default(),
            up: AtomicBool::new(true),
            last_ok_ms: AtomicU64::new(0),
            started: Instant::now(),
            last_error: Mutex::new(String::new()),
            deferred: Mutex::new(Vec::new()),
            metrics,
        });
        if let Some(file) = &config.key_file {
            let raw = std::fs::read(file).map_err(|e| format!("fleet.key_file `{file}`: {e}"))?;
            let key = raw.trim_ascii().to_vec();
            if key.len() < 16 {
                return Err(format!(
                    "fleet.key_file `{file}` holds {} bytes; the fleet's key needs at least 16",
                    key.len()
                ));
            }
            let mac = <Hmac<Sha256> as Mac>::new_from_slice(&key)
                .map_err(|e| format!("fleet.key_file: {e}"))?;
            let _ = fleet.key.set((mac, KeySource::File));
        } else {
            let me = fleet.clone();
            tokio::spawn(async move {
                // Until the key is known no id is sealed; the exchanges try again too.
                for _ in 0..10 {
                    if me.fetch_key().await {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        Ok(fleet)
    }

    fn name(&self, parts: &[&str]) -> Vec<u8> {
        let mut s = self.config.key_prefix.clone();
        for p in parts {
            s.push(':');
            s.push_str(p);
        }
        s.into_bytes()
    }

    fn claim_name(&self, key: u128) -> Vec<u8> {
        self.name(&["claim", &format!("{key:032x}")])
    }

    /// Runs `commands` on `slot`'s connection within `bound`; a failure or a timeout
    /// drops the connection (taken out of the slot while in use, so a cancelled run
    /// cannot leave a half-read reply behind). A failure marks the fleet down; so does a
    /// timeout, except on the claims' connection, where one slow answer (a busy Redis, a
    /// starved process) must not turn every feedback for other replicas away until the
    /// next exchange: the exchanges, with their longer bound, decide that.
    async fn run(
        &self,
        slot: &Slot,
        commands: Vec<Vec<Vec<u8>>>,
        bound: Duration,
    ) -> Result<Vec<Reply>, String> {
        let work = async {
            let mut guard = slot.lock().await;
            let mut conn = match guard.take() {
                Some(c) => c,
                None => Conn::open(&self.config.redis, bound).await?,
            };
            let replies = conn.pipeline(&commands).await?;
            *guard = Some(conn);
            Ok(replies)
        };
        let result = match tokio::time::timeout(bound, work).await {
            Ok(r) => r,
            Err(_) if std::ptr::eq(slot, &self.claims) => {
                return Err(format!("Redis did not answer a claim within {bound:?}"));
            }
            Err(_) => Err(format!("Redis did not answer within {bound:?}")),
        };
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(redis = %self.config.redis.address(), "The fleet's Redis answers again: deltas and deferred claims are being pushed.");
                }
                self.metrics.up.set(1);
            }
            Err(e) => {
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(redis = %self.config.redis.address(), error = %e, "The fleet's Redis does not answer: routing on the last weights, learning locally, feedback for other replicas' decisions answered 503 until it is back.");
                }
                self.metrics.up.set(0);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.clone();
            }
        }
        result
    }

    /// Reads the fleet's key from Redis, making it first if no replica has (`SET NX`).
    async fn fetch_key(&self) -> bool {
        if self.key.get().is_some() {
            return true;
        }
        let mut fresh = [0u8; 32];
        if getrandom::fill(&mut fresh).is_err() {
            return false;
        }
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        let name = self.name(&["key"]);
        let commands = vec![
            vec![
                b"SET".to_vec(),
                name.clone(),
                hex.into_bytes(),
                b"NX".to_vec(),
            ],
            vec![b"GET".to_vec(), name],
        ];
        match self.run(&self.background, commands, BACKGROUND_WAIT).await {
            Ok(r) => match r.get(1).and_then(Reply::text) {
                Some(k) if k.len() >= 16 => {
                    match <Hmac<Sha256> as Mac>::new_from_slice(k.as_bytes()) {
                        Ok(mac) => {
                            let _ = self.key.set((mac, KeySource::Redis));
                            true
                        }
                        Err(_) => false,
                    }
                }
                _ => false,
            },
            Err(_) => false,
        }
    }

    fn mac(&self, id: &[u8], payload: &[u8]) -> Option<Hmac<Sha256>> {
        let mut mac = self.key.get()?.0.clone();
        mac.update(&(id.len() as u32).to_be_bytes());
        mac.update(id);
        mac.update(payload);
        Some(mac)
    }

    /// Pushes the claims kept while Redis was down (once it answers again).
    async fn push_deferred(&self) {
        let now = Instant::now();
        let batch: Vec<(u128, Duration)> = {
            let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
            let keep: Vec<(u128, Instant)> =
                d.drain(..).filter(|(_, until)| *until > now).collect();
            keep.into_iter()
                .map(|(k, until)| (k, until - now))
                .collect()
        };
        if batch.is_empty() {
            return;
        }
        let commands = batch.iter().map(|(k, ttl)| self.set_nx(*k, *ttl)).collect();
        match self.run(&self.background, commands, BACKGROUND_WAIT).await {
            Ok(replies) => {
                for r in replies {
                    if r == Reply::Nil {
                        self.metrics
                            .claims
                            .with_label_values(&["late_conflict"])
                            .inc();
                    }
                }
                self.metrics.deferred.set(self.deferred_len() as i64);
            }
            Err(_) => self.defer(batch),
        }
    }

    fn deferred_len(&self) -> usize {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn set_nx(&self, key: u128, ttl: Duration) -> Vec<Vec<u8>> {
        let ms = ttl.as_millis().max(1).to_string();
        vec![
            b"SET".to_vec(),
            self.claim_name(key),
            b"1".to_vec(),
            b"NX".to_vec(),
            b"PX".to_vec(),
            ms.into_bytes(),
        ]
    }
}

/// A float as Redis and Lua read it back exactly.
fn num(x: f64) -> Vec<u8> {
    format!("{x:e}").into_bytes()
}

impl Ledger for Fleet {
    fn interval(&self) -> Duration {
        self.config.sync_interval
    }

    fn exchange(&self, push: Push) -> Exchange<'_> {
        Box::pin(async move {
            let mut cmd = vec![
                b"EVAL".to_vec(),
                EXCHANGE.as_bytes().to_vec(),
                b"1".to_vec(),
                self.name(&["bandit", &push.model, push.objective]),
                push.replica.into_bytes(),
                push.seq.to_string().into_bytes(),
                num(push.half_life.map_or(0.0, |h| h.as_secs_f64())),
                push.set_override
                    .map(|o| o.to_string().into_bytes())
                    .unwrap_or_default(),
            ];
            let mut seed = Vec::new();
            for (v, t) in push.variants.iter().zip(&push.seed) {
                for (stat, x) in STAT_NAMES.iter().zip(t.values()) {
                    if x != 0.0 {
                        seed.push(format!("{v}|{stat}").into_bytes());
                        seed.push(num(x));
                    }
                }
            }
            cmd.push((seed.len() / 2).to_string().into_bytes());
            cmd.extend(seed);
            if push.seq > 0 {
                for (v, d) in push.variants.iter().zip(&push.deltas) {
                    for (stat, x) in STAT_NAMES.iter().zip(d.values()) {
                        if x != 0.0 {
                            cmd.push(format!("{v}|{stat}").into_bytes());
                            cmd.push(num(x));
                        }
                    }
                }
            }
            let result = self.run(&self.background, vec![cmd], BACKGROUND_WAIT).await;
            let reply = match result {
                Ok(mut r) => r.pop().unwrap_or(Reply::Nil),
                Err(e) => {
                    self.metrics.exchanges.with_label_values(&["failed"]).inc();
                    return Err(e);
                }
            };
            let Reply::Array(items) = reply else {
                self.metrics.exchanges.with_label_values(&["failed"]).inc();
                return Err(format!("the exchange script answered {reply:?}"));
            };
            let mut totals = Totals {
                arms: vec![ArmStats::default(); push.variants.len()],
                over: Value::Null,
                version: 0,
            };
            for pair in items.chunks(2) {
                let (Some(field), Some(value)) = (
                    pair.first().and_then(Reply::text),
                    pair.get(1).and_then(Reply::text),
                ) else {
                    continue;
                };
                match field.as_str() {
                    "override" => totals.over = serde_json::from_str(&value).unwrap_or(Value::Null),
                    "version" => totals.version = value.parse().unwrap_or(0),
                    _ => {
                        let Some((variant, stat)) = field.rsplit_once('|') else {
                            continue;
                        };
                        let (Some(i), Some(s), Ok(x)) = (
                            push.variants.iter().position(|v| v == variant),
                            STAT_NAMES.iter().position(|n| *n == stat),
                            value.parse::<f64>(),
                        ) else {
                            continue;
                        };
                        let mut vals = totals.arms[i].values();
                        vals[s] = if x.is_finite() { x } else { 0.0 };
                        totals.arms[i] = ArmStats::from_values(vals);
                    }
                }
            }
            self.metrics.exchanges.with_label_values(&["ok"]).inc();
            self.last_ok_ms.store(
                (self.started.elapsed().as_millis() as u64).max(1),
                Ordering::Relaxed,
            );
            if self.key.get().is_none() {
                self.fetch_key().await;
            }
            self.push_deferred().await;
            Ok(totals)
        })
    }

    fn status(&self) -> Value {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        let ago =
            (last > 0).then(|| (self.started.elapsed().as_millis() as u64).saturating_sub(last));
        json!({
            "redis": serde_json::to_value(&self.config.redis).unwrap_or(Value::Null),
            "key_prefix": self.config.key_prefix,
            "sync_interval_ms": self.config.sync_interval.as_millis() as u64,
            "up": self.up.load(Ordering::Relaxed),
            "last_exchange_ms_ago": ago,
            "last_error": *self.last_error.lock().unwrap_or_else(|p| p.into_inner()),
            "key": match self.key.get() {
                Some((_, KeySource::File)) => "key_file",
                Some((_, KeySource::Redis)) => "redis",
                None => "missing",
            },
            "deferred_claims": self.deferred_len(),
            "deferred_overflow": self.metrics.overflow.get(),
        })
    }
}

impl FleetDecisions for Fleet {
    fn seal(&self, id: &[u8], d: &Portable) -> Option<String> {
        let mut payload = [0u8; PAYLOAD];
        payload[0..4].copy_from_slice(&d.model.to_be_bytes());
        payload[4..6].copy_from_slice(&d.variant.to_be_bytes());
        payload[6..10].copy_from_slice(&d.probability.to_bits().to_be_bytes());
        payload[10..18].copy_from_slice(&d.at_unix_ms.to_be_bytes());
        payload[18..22].copy_from_slice(&d.ttl_ms.to_be_bytes());
        payload[22..26].copy_from_slice(&d.latency_us.to_be_bytes());
        let tag = self.mac(id, &payload)?.finalize().into_bytes();
        let mut out = String::with_capacity(id.len() + 1 + TOKEN_TAIL);
        out.push_str(std::str::from_utf8(id).ok()?);
        out.push('.');
        for b in payload.iter().chain(&tag[..TAG]) {
            out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        Some(out)
    }

    fn open(&self, token: &str) -> Option<Result<(String, Portable), Unsealed>> {
        let (id, tail) = token.rsplit_once('.')?;
        if tail.len() != TOKEN_TAIL || id.is_empty() {
            return None;
        }
        let mut raw = [0u8; PAYLOAD + TAG];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(tail.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let (payload, tag) = raw.split_at(PAYLOAD);
        let Some(mac) = self.mac(id.as_bytes(), payload) else {
            return Some(Err(Unsealed::KeyUnknown));
        };
        if mac.verify_truncated_left(tag).is_err() {
            return Some(Err(Unsealed::Forged));
        }
        let u32_at = |i: usize| {
            u32::from_be_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]])
        };
        let mut at = [0u8; 8];
        at.copy_from_slice(&payload[10..18]);
        Some(Ok((
            id.to_string(),
            Portable {
                model: u32_at(0),
                variant: u16::from_be_bytes([payload[4], payload[5]]),
                probability: f32::from_bits(u32_at(6)),
                at_unix_ms: u64::from_be_bytes(at),
                ttl_ms: u32_at(18),
                latency_us: u32_at(22),
            },
        )))
    }

    fn claim(&self, claims: Vec<(u128, Duration)>) -> FleetFuture<'_, Vec<Claim>> {
        Box::pin(async move {
            let n = claims.len();
            if !self.up.load(Ordering::Relaxed) {
                // Known down: no wait at all (the exchanges find out when it is back).
                self.metrics
                    .claims
                    .with_label_values(&["unreachable"])
                    .inc_by(n as u64);
                return vec![Claim::Unreachable; n];
            }
            let commands = claims
                .iter()
                .map(|(k, ttl)| self.set_nx(*k, *ttl))
                .collect();
            match self.run(&self.claims, commands, CLAIM_WAIT).await {
                Ok(replies) if replies.len() == n => replies
                    .into_iter()
                    .map(|r| {
                        let c = match r {
                            Reply::Status(s) if s == "OK" => Claim::First,
                            Reply::Nil => Claim::Taken,
                            _ => Claim::Unreachable,
                        };
                        let label = match c {
                            Claim::First => "first",
                            Claim::Taken => "taken",
                            Claim::Unreachable => "unreachable",
                            Claim::Slow => "slow",
                        };
                        self.metrics.claims.with_label_values(&[label]).inc();
                        c
                    })
                    .collect(),
                // A timeout leaves the fleet up (see `run`): slow, not down.
                _ if self.up.load(Ordering::Relaxed) => {
                    self.metrics
                        .claims
                        .with_label_values(&["slow"])
                        .inc_by(n as u64);
                    vec![Claim::Slow; n]
                }
                _ => {
                    self.metrics
                        .claims
                        .with_label_values(&["unreachable"])
                        .inc_by(n as u64);
                    vec![Claim::Unreachable; n]
                }
            }
        })
    }

    fn defer(&self, claims: Vec<(u128, Duration)>) {
        let now = Instant::now();
        let mut d = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        for (k, ttl) in claims {
            if d.len() >= MAX_DEFERRED {
                self.metrics.overflow.inc();
                continue;
            }
            d.push((k, now + ttl));
            self.metrics.claims.with_label_values(&["deferred"]).inc();
        }
        self.metrics.deferred.set(d.len() as i64);
    }

    fn release(&self, keys: Vec<u128>) {
        // Best effort, off the request: a claim left behind only refuses a retry of
        // feedback that was answered 503.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let commands: Vec<Vec<Vec<u8>>> = keys
            .iter()
            .map(|k| vec![b"DEL".to_vec(), self.claim_name(*k)])
            .collect();
        let url = self.config.redis.clone();
        rt.spawn(async move {
            let work = async {
                let mut c = Conn::open(&url, BACKGROUND_WAIT).await?;
                c.pipeline(&commands).await
            };
            let _ = tokio::time::timeout(BACKGROUND_WAIT, work).await;
        });
    }

    fn claimed(&self, keys: Vec<u128>) -> FleetFuture<'_, Vec<bool>> {
        Box::pin(async move {
            let n = keys.len();
            if !self.up.load(Ordering::Relaxed) {
                return vec![false; n];
            }
            let mut out = Vec::with_capacity(n);
            // In pieces, so one sweep of many decisions is not one huge reply.
            for chunk in keys.chunks(10_000) {
                let commands = chunk
                    .iter()
                    .map(|k| vec![b"EXISTS".to_vec(), self.claim_name(*k)])
                    .collect();
                match self.run(&self.background, commands, BACKGROUND_WAIT).await {
                    Ok(r) if r.len() == chunk.len() => {
                        out.extend(r.into_iter().map(|r| r == Reply::Int(1)));
                    }
                    _ => out.extend(std::iter::repeat_n(false, chunk.len())),
                }
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Joins a fleet whose `key_file` holds `key` (no Redis is asked).
    fn join(key: &str) -> Result<Arc<Fleet>, String> {
        let file = std::env::temp_dir().join(format!(
            "switchyard-fleet-key-{}-{}",
            std::process::id(),
            key.len()
        ));
        std::fs::write(&file, key).unwrap();
        let config = FleetConfig {
            redis: switchyard_config::RedisUrl::parse("redis://127.0.0.1:1").unwrap(),
            key_prefix: "t".into(),
            sync_interval: Duration::from_secs(1),
            key_file: Some(file.display().to_string()),
        };
        let joined = Fleet::new(&config, &Registry::new());
        let _ = std::fs::remove_file(file);
        joined
    }

    fn fleet(key: &str) -> Arc<Fleet> {
        join(key).unwrap()
    }

    /// A sealed decision opens to itself under the same key; any changed digit, or
    /// another key, fails; a plain id is not a token.
    #[test]
    fn tokens_open_only_unaltered_and_under_the_same_key() {
        let f = fleet("sixteen bytes at least");
        let d = Portable {
            model: 0xdead_beef,
            variant: 2,
            probability: 0.25,
            at_unix_ms: 1_790_000_000_000,
            ttl_ms: 600_000,
            latency_us: 1234,
        };
        let token = f.seal(b"client.id.7", &d).unwrap();
        assert_eq!(f.open(&token), Some(Ok(("client.id.7".to_string(), d))));
        let tail = token.len() - TOKEN_TAIL;
        for at in [0, tail - 2, tail, tail + 20, token.len() - 1] {
            let mut b = token.clone().into_bytes();
            b[at] = if b[at] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(b).unwrap();
            assert_eq!(f.open(&altered), Some(Err(Unsealed::Forged)), "digit {at}");
        }
        assert_eq!(
            fleet("another key, also long").open(&token),
            Some(Err(Unsealed::Forged))
        );
        assert_eq!(f.open("0123456789abcdef0123456789abcdef"), None);
        assert_eq!(f.open("a.b"), None);
    }

    #[test]
    fn a_short_key_is_refused() {
        let e = join("short\n").unwrap_err();
        assert!(e.contains("at least 16"), "{e}");
    }
}
