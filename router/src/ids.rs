//! Request ids: 128 random bits from the operating system, as 32 hex digits.
//!
//! Unguessable matters: feedback is posted by request id, so a guessable id would let one
//! client credit or blame another's prediction. Reading the OS generator once per request
//! would cost a system call each; instead each thread draws 4 KiB at a time and hands out
//! 16 bytes per id.

use std::cell::RefCell;

use http::HeaderValue;

const BATCH: usize = 4096;

struct Pool {
    bytes: [u8; BATCH],
    next: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; BATCH], next: BATCH }) };
}

/// A new request id.
pub fn new_request_id() -> HeaderValue {
    let mut raw = [0u8; 16];
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.next + 16 > BATCH {
            if let Err(e) = getrandom::fill(&mut pool.bytes) {
                // Ids must stay unique even then; they are only as unguessable as the clock.
                tracing::error!(error = %e, "The OS random generator failed; request ids are now guessable.");
                fallback_fill(&mut pool.bytes);
            }
            pool.next = 0;
        }
        let at = pool.next;
        raw.copy_from_slice(&pool.bytes[at..at + 16]);
        // Never hand out the same bytes twice.
        pool.bytes[at..at + 16].fill(0);
        pool.next += 16;
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (i, b) in raw.iter().enumerate() {
        text[2 * i] = HEX[usize::from(b >> 4)];
        text[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("invalid"))
}

fn fallback_fill(bytes: &mut [u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for chunk in bytes.chunks_mut(8) {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let v = crate::selector::stable_hash(&(nanos ^ n.rotate_left(32)).to_le_bytes());
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

/// True for a client-supplied id we keep: 1 to 200 visible ASCII characters.
pub fn acceptable(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    !b.is_empty() && b.len() <= 200 && b.iter().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_hex_across_batches() {
        let ids: HashSet<_> = (0..3 * BATCH / 16).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 3 * BATCH / 16);
        assert!(ids
            .iter()
            .all(|id| id.len() == 32 && id.as_bytes().iter().all(|c| c.is_ascii_hexdigit())));
    }
}
