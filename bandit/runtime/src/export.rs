//! The decisions file (`bandit.decisions_file`): every settled decision, one JSON line
//! each, for `switchyard evaluate` to estimate what another policy would have earned.
//!
//! A decision settles when its feedback is taken or when it expires without any. The
//! line is built where that happens (under a decision-log shard lock, so nothing there
//! may block) and handed to a writer thread through a bounded queue; a full queue or a
//! failed write drops the line and counts it (`switchyard_decisions_file_dropped_total`)
//! rather than slowing a request or a feedback.
//!
//! One line: `{"time_ms", "model", "variant", "probability", "reward", "feedback"}`:
//! the Unix time it settled, the variant that answered, the probability it was chosen
//! with (the weight under `mode: weights`; under `per_request`, the variant's P(best) at
//! the last update, an estimate), the reward as the bandit's objective counts it (for a
//! decision without feedback, what no conversion and no revenue would be: 0, or minus
//! the variant's cost under `profit`), and whether feedback came.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, Registry};
use serde_json::json;

/// Lines waiting for the writer, at most (about 150 bytes each).
const QUEUE: usize = 65_536;

/// The writer's end of the decisions file.
#[derive(Debug)]
pub struct DecisionsFile {
    tx: SyncSender<String>,
    /// Lines queued and not yet written and flushed.
    pending: Arc<AtomicU64>,
    dropped: IntCounter,
}

impl DecisionsFile {
    /// Opens `path` for appending (creating it) and starts the writer thread.
    pub fn open(path: &str, registry: &Registry) -> Result<Arc<Self>, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("bandit.decisions_file `{path}`: {e}"))?;
        let written = IntCounter::new(
            "switchyard_decisions_file_lines_total",
            "Settled decisions written to bandit.decisions_file.",
        )
        .map_err(|e| e.to_string())?;
        let dropped = IntCounter::new(
            "switchyard_decisions_file_dropped_total",
            "Settled decisions not written to bandit.decisions_file (queue full or write error).",
        )
        .map_err(|e| e.to_string())?;
        for c in [&written, &dropped] {
            registry
                .register(Box::new(c.clone()))
                .map_err(|e| format!("decisions file metrics: {e}"))?;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let pending = Arc::new(AtomicU64::new(0));
        let (p, d, name) = (pending.clone(), dropped.clone(), path.to_string());
        std::thread::Builder::new()
            .name("decisions-file".into())
            .spawn(move || write_lines(&rx, file, &p, &written, &d, &name))
            .map_err(|e| format!("bandit.decisions_file: cannot start its writer: {e}"))?;
        Ok(Arc::new(DecisionsFile {
            tx,
            pending,
            dropped,
        }))
    }

    /// Queues one settled decision; never blocks.
    pub fn settled(
        &self,
        model: &str,
        variant: &str,
        probability: f32,
        reward: f64,
        feedback: bool,
    ) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let line = json!({
            "time_ms": time_ms,
            "model": model,
            "variant": variant,
            "probability": probability,
            "reward": reward,
            "feedback": feedback,
        })
        .to_string();
        self.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.dropped.inc();
        }
    }

    /// Waits, at most `limit`, until every queued line is written and flushed (at
    /// shutdown).
    pub fn finish(&self, limit: Duration) {
        let until = Instant::now() + limit;
        while self.pending.load(Ordering::Relaxed) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The writer thread: takes what is queued, writes it, flushes, and says so.
fn write_lines(
    rx: &Receiver<String>,
    file: std::fs::File,
    pending: &AtomicU64,
    written: &IntCounter,
    dropped: &IntCounter,
    path: &str,
) {
    let mut out = std::io::BufWriter::new(file);
    let mut failing = false;
    loop {
        let first = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while let Ok(line) = rx.try_recv() {
            batch.push(line);
        }
        let n = batch.len() as u64;
        let result = batch
            .iter()
            .try_for_each(|line| writeln!(out, "{line}"))
            .and_then(|()| out.flush());
        match result {
            Ok(()) => {
                written.inc_by(n);
                failing = false;
            }
            Err(e) => {
                dropped.inc_by(n);
                if !failing {
                    tracing::error!(file = %path, error = %e, "Cannot write bandit.decisions_file; its lines are dropped and counted until it can.");
                    failing = true;
                }
            }
        }
        pending.fetch_sub(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines queued are on disk, one JSON object each, once `finish` returns; appending
    /// to an existing file keeps what it held.
    #[test]
    fn settled_decisions_are_appended_as_json_lines() {
        let dir = std::env::temp_dir().join(format!("sy-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        std::fs::write(&path, "{\"earlier\":true}\n").unwrap();
        let registry = Registry::new();
        let file = DecisionsFile::open(path.to_str().unwrap(), &registry).unwrap();
        file.settled("rec", "a", 0.25, 1.0, true);
        file.settled("rec", "b", 0.75, -0.3, false);
        file.finish(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["earlier"], true);
        assert_eq!(
            (
                &lines[1]["variant"],
                &lines[1]["probability"],
                &lines[1]["feedback"]
            ),
            (&json!("a"), &json!(0.25), &json!(true))
        );
        assert_eq!(
            (&lines[2]["reward"], &lines[2]["feedback"]),
            (&json!(-0.3), &json!(false))
        );
        assert_eq!(file.dropped.get(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_opened_is_a_clear_error() {
        let err =
            DecisionsFile::open("/nonexistent-dir/decisions.jsonl", &Registry::new()).unwrap_err();
        assert!(err.contains("bandit.decisions_file"), "{err}");
    }
}
