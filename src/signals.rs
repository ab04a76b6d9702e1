//! The stop signals (SIGTERM and SIGINT), caught from the moment [`Stop::catch`] is
//! called until the process ends.
//!
//! Why a value made once rather than `tokio::signal::ctrl_c()` at each wait: tokio's
//! receivers see only the signals that arrive after they were made. A signal arriving
//! while no receiver exists is lost once tokio's handler is installed (its handler
//! replaced the default action), and kills the process before that, without a drain
//! or a summary. `demo` lost a Ctrl-C sent while it printed its table this way (CI
//! failed on it); `serve` had the same gap between printing its addresses and its first
//! wait, and between the first signal and the wait for a second.

/// SIGTERM and SIGINT, each remembered from [`Stop::catch`] on: a signal that arrives
/// between two calls of [`Stop::next`] ends the next one at once.
pub struct Stop {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Stop {
    /// Installs the handlers now (in a tokio runtime). A handler that cannot be installed
    /// is logged, and that signal keeps its default action.
    #[must_use]
    pub fn catch() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::SignalKind;
            let instead = "it keeps its default action";
            Self {
                term: catch(SignalKind::terminate(), "SIGTERM", instead),
                int: catch(SignalKind::interrupt(), "SIGINT", instead),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves at the next SIGTERM or SIGINT not yet seen by an earlier call.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = one(&mut self.term) => {}
                () = one(&mut self.int) => {}
            }
        }
        // Elsewhere Ctrl-C alone, as tokio offers it (with the gap described above).
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `kind` (called `name`) caught from now on (in a tokio runtime), or `None` when its
/// handler cannot be installed: logged, with what happens `instead`.
#[cfg(unix)]
#[must_use]
pub fn catch(
    kind: tokio::signal::unix::SignalKind,
    name: &str,
    instead: &str,
) -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot watch {name}; {instead}.");
            None
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::Stop;
    use std::time::Duration;

    fn raise(signal: libc::c_int) {
        // SAFETY: raising a signal whose handler `Stop::catch` installed in this process.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::raise(signal) };
        assert_eq!(rc, 0);
    }

    /// Signals that arrive while nobody waits are not lost: each ends the next wait.
    #[tokio::test]
    async fn a_signal_between_waits_ends_the_next_wait() {
        let mut stop = Stop::catch();
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGINT] {
            raise(signal);
            tokio::time::timeout(Duration::from_secs(10), stop.next())
                .await
                .unwrap_or_else(|_| panic!("signal {signal} raised before the wait was lost"));
        }
    }
}
