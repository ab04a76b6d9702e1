//! `switchyard demo`: the whole loop on one machine, nothing to install, no network.
//!
//! Three model servers of the bundled digit models (`cnn`: the accurate one, slow and
//! dear; `mlp`: middling; `budget`: cheap and poor), a shadow candidate, the sidecar with
//! a `profit` bandit over the three and a local fallback, and `switchyard load` sending
//! predictions and posting simulated revenue. The revenue's truth favours `mlp`: neither
//! the cheapest nor the most accurate, the one that earns most after its cost. Half-way,
//! `budget`'s server stops: its breaker opens, retries and the fallback answer, and the
//! bandit's share moves. A terminal table every second; a summary at the end.
//!
//! Everything runs in this process on `127.0.0.1`, the load generator on its own thread
//! (its own runtime, as `switchyard load` runs); all of it stops by itself.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;

/// `switchyard demo`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long the demo runs (the outage starts half-way).
    #[arg(long, value_parser = crate::demo::duration, default_value = "60s")]
    pub duration: Duration,
    /// Seeds the revenue draws and the sidecar's choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the sidecar's admin listener (and the dashboard) listens; when that port is
    /// taken, a free one is used and printed.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// Open the dashboard in a browser (xdg-open or open).
    #[arg(long)]
    pub open: bool,
    /// Predictions per second the load generator sends.
    #[arg(long, default_value_t = 300.0)]
    pub rate: f64,
}

fn duration(text: &str) -> Result<Duration, String> {
    switchyard_config::duration::parse(text)
}

/// One variant of the demo's world: what it runs, what it costs, what it earns.
struct Arm {
    name: &'static str,
    model: &'static str,
    /// Added latency (`local.delay`), or empty for none.
    delay: &'static str,
    /// Currency per 1,000 predictions (the config's `cost_per_1k`).
    cost_per_1k: f64,
    /// Chance a prediction leads to a sale (the simulated truth)...
    converts: f64,
}

/// ... worth this much.
const SALE: f64 = 10.0;

impl Arm {
    /// Expected profit per prediction: what the bandit should find.
    fn profit(&self) -> f64 {
        self.converts * SALE - self.cost_per_1k / 1000.0
    }
}

const ARMS: [Arm; 3] = [
    Arm {
        name: "cnn",
        model: "builtin:digits_cnn",
        delay: "3ms",
        cost_per_1k: 2000.0,
        converts: 0.40,
    },
    Arm {
        name: "mlp",
        model: "builtin:digits_mlp",
        delay: "1ms",
        cost_per_1k: 300.0,
        converts: 0.35,
    },
    Arm {
        name: "budget",
        model: "builtin:digits_mlp",
        delay: "",
        cost_per_1k: 50.0,
        converts: 0.15,
    },
];

/// The arm that goes down half-way.
const KILLED: &str = "budget";

/// A model server of one bundled model, as `switchyard model-server` runs it.
async fn model_server(model: &str, delay: &str) -> Result<crate::Running, String> {
    let delay = if delay.is_empty() {
        String::new()
    } else {
        format!("delay: {delay}, ")
    };
    let yaml = format!(
        "models:\n  digits:\n    variants:\n      - name: local\n        weight: 1\n        local: {{model: \"{model}\", {delay}batching: {{num_batch_threads: 1}}}}\n"
    );
    let config = crate::parse_config(&yaml).map_err(|e| e.render("demo model server"))?;
    let data = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let admin = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    crate::start(config, data, admin).map_err(|e| e.to_string())
}

/// The sidecar's config: a profit bandit over the three servers, the candidate as a
/// shadow, the local fallback, borderline predictions kept in `borderline`.
fn sidecar_yaml(
    servers: &[SocketAddr],
    candidate: SocketAddr,
    seed: u64,
    borderline: &std::path::Path,
) -> String {
    let file = serde_json::to_string(&borderline.display().to_string()).unwrap_or_default();
    let mut y = format!(
        r#"seed: {seed}
models:
  digits:
    bandit: {{objective: profit, warmup: 300, min_weight: 0.02, update_interval: 500ms}}
    capture: {{margin: 0.5, sample: 1.0, file: {file}, max_bytes: 16MiB}}
    breaker: {{consecutive_failures: 3, base_ejection: 2s, max_ejection: 10s}}
    retry: {{on: []}}
    fallback: fallback
    shadows:
      - {{name: candidate, upstream: "http://{candidate}", fraction: 0.25}}
    variants:
"#
    );
    for (arm, addr) in ARMS.iter().zip(servers) {
        y += &format!(
            "      - {{name: {}, upstream: \"http://{addr}\", weight: 1, cost_per_1k: {}}}\n",
            arm.name, arm.cost_per_1k
        );
    }
    y += "      - {name: fallback, weight: 0, local: {model: \"builtin:digits_mlp\"}}\n";
    y
}

/// Runs the demo; returns the process's exit code.
pub async fn run(args: DemoArgs) -> u8 {
    match demo(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("switchyard demo: {e}");
            1
        }
    }
}

async fn demo(args: DemoArgs) -> Result<(), String> {
    if args.duration < Duration::from_secs(4) {
        return Err("--duration must be at least 4s (the outage starts half-way)".into());
    }
    let mut servers = Vec::new();
    for arm in &ARMS {
        servers.push(model_server(arm.model, arm.delay).await?);
    }
    let candidate = model_server("builtin:digits_cnn", "").await?;
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.data_addr).collect();
    // Outside the working directory: the demo leaves nothing behind where it is run.
    let scratch = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let borderline = scratch.join("borderline.jsonl");
    let yaml = sidecar_yaml(&addrs, candidate.data_addr, args.seed, &borderline);
    let config = crate::parse_config(&yaml).map_err(|e| e.render("demo sidecar"))?;
    let data = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let admin = match TcpListener::bind(args.admin).await {
        Ok(l) => l,
        Err(_) => TcpListener::bind((args.admin.ip(), 0))
            .await
            .map_err(|e| e.to_string())?,
    };
    let sidecar = crate::start(config, data, admin).map_err(|e| e.to_string())?;
    // Before the address is printed: a Ctrl-C from then on ends the demo with its
    // summary, wherever the loop below is.
    let mut stop = crate::signals::Stop::catch();
    let dashboard = format!("http://{}/dashboard", sidecar.admin_addr);
    println!(
        "switchyard demo: {} of traffic at {}/s; the dashboard is at {dashboard}",
        switchyard_config::duration::format(args.duration),
        args.rate
    );
    if args.open {
        open_browser(&dashboard);
    }

    // The load generator: predictions through the sidecar, revenue posted as feedback.
    let load = switchyard_load::LoadArgs {
        url: format!("http://{}/v1/models/digits:predict", sidecar.data_addr),
        concurrency: vec![64],
        rate: Some(args.rate),
        duration: Some(args.duration),
        requests: None,
        warmup: Duration::ZERO,
        body_file: None,
        headers: Vec::new(),
        h2c: false,
        grpc: false,
        binary: false,
        batch: 1,
        timeout: Duration::from_secs(10),
        threads: Some(1),
        rewards: ARMS
            .iter()
            .map(|a| format!("{}=bernoulli({})*{SALE}", a.name, a.converts))
            .collect(),
        feedback_delay: Duration::ZERO,
        seed: args.seed,
        json: true,
    };
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("switchyard-demo-load".into())
        .spawn(move || {
            let _ = done_tx.send(switchyard_load::run(&load));
        })
        .map_err(|e| e.to_string())?;

    let started = Instant::now();
    let outage_at = args.duration / 2;
    let mut killed: Option<Duration> = None;
    let mut timeline: Vec<(Duration, Value)> = Vec::new();
    let tty = std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let report = loop {
        tokio::select! {
            r = &mut done_rx => break r.map_err(|_| "the load generator stopped".to_string())?.map_err(|e| e.to_string())?,
            () = stop.next() => {
                println!("\nInterrupted: the summary so far.");
                break Value::Null.to_string();
            }
            _ = tick.tick() => {}
        }
        let at = started.elapsed();
        if killed.is_none() && at >= outage_at {
            if let Some(i) = ARMS.iter().position(|a| a.name == KILLED) {
                servers[i].shutdown();
                killed = Some(at);
            }
        }
        let numbers = (*sidecar.numbers()).clone();
        print_view(&numbers, at, args.duration, killed, &dashboard, tty);
        timeline.push((at, numbers));
    };
    let report: Value = serde_json::from_str(&report).unwrap_or(Value::Null);
    let numbers = (*sidecar.numbers()).clone();
    print_summary(&numbers, &timeline, &report, killed, &borderline);
    sidecar.shutdown();
    candidate.shutdown();
    for s in &servers {
        s.shutdown();
    }
    Ok(())
}

fn open_browser(url: &str) {
    for opener in ["xdg-open", "open"] {
        if std::process::Command::new(opener)
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .is_ok()
        {
            return;
        }
    }
    println!("(could not open a browser: visit {url})");
}

/// The variants of the demo's model in one sample.
fn variants(numbers: &Value) -> &[Value] {
    numbers["models"]["digits"]["variants"]
        .as_array()
        .map_or(&[], Vec::as_slice)
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

/// The terminal view: one table, redrawn in place on a terminal (a block per second
/// otherwise, as in CI logs).
fn print_view(
    numbers: &Value,
    at: Duration,
    total: Duration,
    killed: Option<Duration>,
    dashboard: &str,
    tty: bool,
) {
    let mut out = String::new();
    if tty {
        out.push_str("\x1b[H\x1b[2J");
    }
    let model = &numbers["models"]["digits"];
    out.push_str(&format!(
        "switchyard demo  {:>3}s / {}s   dashboard {dashboard}{}\n",
        at.as_secs(),
        total.as_secs(),
        killed.map_or(String::new(), |k| format!(
            "   `{KILLED}` down since {}s",
            k.as_secs()
        )),
    ));
    out.push_str(&format!(
        "{:<9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8} {:>11} {:>9}\n",
        "variant", "weight", "req/s", "p50 ms", "p99 ms", "revenue", "cost", "profit/1k", "breaker"
    ));
    for v in variants(numbers) {
        let ms = |k: &str| v[k].as_f64().map_or("-".into(), |x| format!("{x:.2}"));
        out.push_str(&format!(
            "{:<9} {:>6.1}% {:>7.1} {:>8} {:>8} {:>9.1} {:>8.1} {:>11} {:>9}\n",
            v["name"].as_str().unwrap_or("?"),
            100.0 * num(v, "weight"),
            num(v, "rps"),
            ms("p50_ms"),
            ms("p99_ms"),
            num(v, "revenue"),
            num(v, "cost"),
            v["profit_per_1k"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}")),
            v["breaker"].as_str().unwrap_or("?"),
        ));
    }
    let shadow = &model["shadows"][0];
    out.push_str(&format!(
        "fallbacks {} ({:.1}/s)   shadow `candidate` agreement {}\n",
        model["fallbacks"],
        num(model, "fallbacks_per_s"),
        shadow["agreement"].as_f64().map_or("-".into(), |a| format!(
            "{:.1}% of {}",
            100.0 * a,
            shadow["compared"]
        )),
    ));
    if !tty {
        out.push('\n');
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

/// The end: where traffic went and when, what the bandit's choices cost against a fixed
/// even split of the same requests, failures through the outage, shadow agreement.
fn print_summary(
    numbers: &Value,
    timeline: &[(Duration, Value)],
    report: &Value,
    killed: Option<Duration>,
    borderline: &std::path::Path,
) {
    let best = ARMS
        .iter()
        .max_by(|a, b| a.profit().total_cmp(&b.profit()))
        .map_or("", |a| a.name);
    let requests = |v: &Value| num(v, "requests");
    let all = variants(numbers);
    let total: f64 = all.iter().map(requests).sum();
    let mut out = String::from("\nSummary\n");
    for v in all {
        out.push_str(&format!(
            "  {:<9} {:>6} requests ({:>5.1}%)\n",
            v["name"].as_str().unwrap_or("?"),
            requests(v),
            100.0 * requests(v) / total.max(1.0)
        ));
    }
    // When the winner first held half the traffic, and held it to the end.
    let moved = timeline
        .iter()
        .rposition(|(_, n)| winner_weight(n, best) < 0.5)
        .map_or(timeline.first(), |i| timeline.get(i + 1))
        .map(|(t, _)| *t);
    let final_share = winner_weight(numbers, best);
    out.push_str(&format!(
        "  winner: `{best}` (expected profit {:.3} per prediction; `cnn` {:.3}, `budget` {:.3}), weight {:.1}% at the end{}\n",
        ARMS[1].profit(),
        ARMS[0].profit(),
        ARMS[2].profit(),
        100.0 * final_share,
        moved.map_or(" (never held half the traffic)".into(), |t| format!(", above 50% from {}s on", t.as_secs())),
    ));
    // Regret: expected profit lost against always choosing the winner, for the
    // requests each remote variant answered; the fixed split's on the same count.
    let mu_best = ARMS.iter().map(Arm::profit).fold(f64::MIN, f64::max);
    let (mut n, mut regret) = (0.0, 0.0);
    for arm in &ARMS {
        if let Some(v) = all.iter().find(|v| v["name"] == arm.name) {
            n += requests(v);
            regret += requests(v) * (mu_best - arm.profit());
        }
    }
    let mean_mu = ARMS.iter().map(Arm::profit).sum::<f64>() / ARMS.len() as f64;
    let fixed = n * (mu_best - mean_mu);
    out.push_str(&format!(
        "  regret: {regret:.1} against {fixed:.1} for a fixed even split of the same {n} requests ({:.0}% less)\n",
        if fixed > 0.0 { 100.0 * (1.0 - regret / fixed) } else { 0.0 }
    ));
    let failed = report["errors"].as_u64();
    let fallbacks = &numbers["models"]["digits"]["fallbacks"];
    out.push_str(&format!(
        "  outage: `{KILLED}` stopped at {}; failed requests: {}; answered by the fallback: {fallbacks}\n",
        killed.map_or("-".into(), |k| format!("{}s", k.as_secs())),
        failed.map_or("unknown (interrupted)".into(), |f| f.to_string()),
    ));
    let shadow = &numbers["models"]["digits"]["shadows"][0];
    out.push_str(&format!(
        "  shadow `candidate`: agreement {} over {} compared requests\n",
        shadow["agreement"]
            .as_f64()
            .map_or("-".into(), |a| format!("{:.1}%", 100.0 * a)),
        shadow["compared"]
    ));
    // The writer thread may still be finishing its last lines: count what is there.
    let kept = std::fs::read_to_string(borderline).map_or(0, |t| t.lines().count());
    out.push_str(&format!(
        "  borderline predictions kept for relabelling: {kept} in {}\n",
        borderline.display()
    ));
    if let Some(f) = report.get("feedback") {
        out.push_str(&format!(
            "  feedback: {} sent, {} accepted\n",
            f["sent"], f["accepted"]
        ));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

fn winner_weight(numbers: &Value, best: &str) -> f64 {
    variants(numbers)
        .iter()
        .find(|v| v["name"] == best)
        .map_or(0.0, |v| num(v, "weight"))
}
