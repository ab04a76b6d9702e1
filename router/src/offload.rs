//! CPU work that must not stall the async workers: decoding and encoding large JSON
//! bodies (local predictions, feedback batches of up to `max_body_bytes`). A 16 MiB body
//! takes tens of milliseconds to parse; on a worker thread that is tens of milliseconds
//! in which every other connection on it waits.
//!
//! Small bodies are handled in place (the hop to another thread costs more than the
//! work). Large ones go to Tokio's blocking pool, at most one per CPU at a time, so a
//! burst of large bodies queues here instead of growing the pool to hundreds of
//! threads; the wait is bounded by the request's own timeouts and the client's patience.

use std::sync::OnceLock;

use tokio::sync::Semaphore;

use crate::error::RouterError;

/// Bodies at least this large are decoded and encoded off the async workers: about
/// 100 µs of JSON parsing, where a thread hop (a few µs) starts to pay.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

fn permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Semaphore::new(cpus)
    })
}

/// Runs `work` (whose input is `size` bytes) in place when small, otherwise on the
/// blocking pool. A panic in `work` is an error for this request, not for the process.
pub async fn cpu<T, F>(size: usize, work: F) -> Result<T, RouterError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if size < OFFLOAD_BYTES {
        return Ok(work());
    }
    // The semaphore is never closed, so acquiring cannot fail; treat it as overload if
    // it somehow does.
    let _permit = permits()
        .acquire()
        .await
        .map_err(|_| RouterError::Overloaded("the decoding pool is closed".into()))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        tracing::error!(error = %e, "Decoding a request body panicked; the request gets 500.");
        RouterError::Inference(format!("decoding the request failed: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn large_work_runs_off_the_calling_thread_and_small_work_in_place() {
        let here = std::thread::current().id();
        let small = cpu(10, move || std::thread::current().id()).await.unwrap();
        assert_eq!(small, here);
        let large = cpu(OFFLOAD_BYTES, move || std::thread::current().id())
            .await
            .unwrap();
        assert_ne!(large, here);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_is_an_error_for_the_request() {
        let r: Result<(), _> = cpu(OFFLOAD_BYTES, || panic!("boom")).await;
        assert!(matches!(r, Err(RouterError::Inference(_))), "{r:?}");
        // And the pool still works.
        assert_eq!(cpu(OFFLOAD_BYTES, || 7).await.unwrap(), 7);
    }
}
