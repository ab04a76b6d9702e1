//! The file-descriptor limit: 10,000 connections need more than the usual soft limit of
//! 1024. Raised up to the hard limit; beyond that the run is refused with what to do.

use crate::LoadError;

/// Makes sure `needed` descriptors can be open at once.
pub fn ensure_fds(needed: usize) -> Result<(), LoadError> {
    let needed = needed as u64;
    let got = rlimit::increase_nofile_limit(needed).unwrap_or(0);
    if got >= needed {
        return Ok(());
    }
    let hard = rlimit::Resource::NOFILE
        .get()
        .map_or_else(|_| "unknown".to_string(), |(_, h)| h.to_string());
    Err(LoadError::Limits(format!(
        "this run needs {needed} file descriptors (one per connection, plus a few), but this \
         machine allows {got} (hard limit {hard}); raise it (`ulimit -n {needed}` as root, or \
         LimitNOFILE= in a systemd unit) or lower --concurrency"
    )))
}
