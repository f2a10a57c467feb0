//! Ctrl-C and SIGTERM for the long-running commands: the first asks for a
//! graceful stop, the caller decides what a second one does.

/// The signals that stop `fedsb serve` and `fedsb join`, listened to from
/// creation on (in a tokio runtime's context).
pub struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    #[cfg(unix)]
    pub fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(signal = name, error = %e, "cannot listen for the signal");
                None
            }
        };
        Self {
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
            terminate: listen(SignalKind::terminate(), "SIGTERM"),
        }
    }

    #[cfg(not(unix))]
    pub fn new() -> Self {
        Self {}
    }

    /// The next signal's name and the exit status of a process it kills.
    #[cfg(unix)]
    pub async fn next(&mut self) -> (&'static str, i32) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            let received = match s {
                Some(s) => s.recv().await.is_some(),
                None => false,
            };
            if !received {
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            () = recv(&mut self.interrupt) => ("SIGINT", 130),
            () = recv(&mut self.terminate) => ("SIGTERM", 143),
        }
    }

    #[cfg(not(unix))]
    pub async fn next(&mut self) -> (&'static str, i32) {
        match tokio::signal::ctrl_c().await {
            Ok(()) => ("Ctrl-C", 130),
            Err(_) => std::future::pending().await,
        }
    }
}
