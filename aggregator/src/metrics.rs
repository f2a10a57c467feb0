//! Prometheus metrics served at `/metrics` (text exposition format).

use fedsb_protocol::ErrorCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric of the aggregator.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub participants_connected: Gauge,
    pub current_round: Gauge,
    pub rounds_committed: Counter,
    pub updates_accepted: Counter,
    pub rejected: Family<ReasonLabel, Counter>,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    pub round_duration: Histogram,
    pub aggregation_duration: Histogram,
    pub connections_open: Gauge,
    pub accept_errors: Counter,
    pub open_files_limit: Gauge,
    /// The newest round with an evaluation on the eval set (-1: none yet).
    pub eval_round: Gauge,
    /// That evaluation's accuracy and loss (NaN until there is one).
    pub eval_accuracy: Gauge<f64, AtomicU64>,
    pub eval_loss: Gauge<f64, AtomicU64>,
    pub eval_failures: Counter,
    pub file_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("fedsb");
        let m = Self {
            participants_connected: Gauge::default(),
            current_round: Gauge::default(),
            rounds_committed: Counter::default(),
            updates_accepted: Counter::default(),
            rejected: Family::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            round_duration: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            aggregation_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            connections_open: Gauge::default(),
            accept_errors: Counter::default(),
            open_files_limit: Gauge::default(),
            eval_round: Gauge::default(),
            eval_accuracy: Gauge::default(),
            eval_loss: Gauge::default(),
            eval_failures: Counter::default(),
            file_errors: Counter::default(),
            registry: Registry::default(),
        };
        m.eval_round.set(-1);
        m.eval_accuracy.set(f64::NAN);
        m.eval_loss.set(f64::NAN);
        registry.register(
            "participants_connected",
            "Participants connected and past the handshake",
            m.participants_connected.clone(),
        );
        registry.register(
            "current_round",
            "Round that is collecting updates (0 once the task has finished)",
            m.current_round.clone(),
        );
        registry.register(
            "rounds_committed",
            "Rounds committed by this process",
            m.rounds_committed.clone(),
        );
        registry.register(
            "updates_accepted",
            "Participant updates accepted into a round",
            m.updates_accepted.clone(),
        );
        registry.register(
            "messages_rejected",
            "Participant messages rejected, by reason (the error code sent back)",
            m.rejected.clone(),
        );
        registry.register(
            "bytes_received",
            "WebSocket payload bytes received from participants",
            m.bytes_received.clone(),
        );
        registry.register(
            "bytes_sent",
            "WebSocket payload bytes sent to participants",
            m.bytes_sent.clone(),
        );
        registry.register(
            "round_duration_seconds",
            "Time from a round opening to its commit",
            m.round_duration.clone(),
        );
        registry.register(
            "aggregation_duration_seconds",
            "Time to average a round's updates and write them to disk",
            m.aggregation_duration.clone(),
        );
        registry.register(
            "connections_open",
            "TCP connections open (HTTP, event streams and WebSockets)",
            m.connections_open.clone(),
        );
        registry.register(
            "accept_errors",
            "Connections the listener failed to accept (out of file descriptors and the like)",
            m.accept_errors.clone(),
        );
        registry.register(
            "open_files_limit",
            "The process's soft limit on open files, which bounds the connections it can hold",
            m.open_files_limit.clone(),
        );
        registry.register(
            "eval_round",
            "Newest round evaluated on the task's eval set (-1: none yet, or no [eval])",
            m.eval_round.clone(),
        );
        registry.register(
            "eval_accuracy",
            "Accuracy of the newest evaluated round's global model (NaN: none yet)",
            m.eval_accuracy.clone(),
        );
        registry.register(
            "eval_loss",
            "Mean cross-entropy of the newest evaluated round's global model (NaN: none yet)",
            m.eval_loss.clone(),
        );
        registry.register(
            "eval_failures",
            "Evaluations that failed (an error, or a loss that is not finite); retried later",
            m.eval_failures.clone(),
        );
        registry.register(
            "file_errors",
            "Requests for a served file answered 500: it changed on disk or cannot be read",
            m.file_errors.clone(),
        );
        // Every reason starts at zero, so that an alert on one of them sees
        // a series before the first rejection rather than no metric at all.
        for code in (1..=u16::MAX).map(ErrorCode::from_code) {
            if matches!(code, ErrorCode::Other(_)) {
                break;
            }
            let _ = m.rejected.get_or_create(&ReasonLabel {
                reason: code.as_str(),
            });
        }
        Self { registry, ..m }
    }

    /// Records an evaluation: the gauges follow the newest round evaluated.
    pub fn evaluated(&self, round: u64, accuracy: f64, loss: f64) {
        if round as i64 >= self.eval_round.get() {
            self.eval_round.set(round as i64);
            self.eval_accuracy.set(accuracy);
            self.eval_loss.set(loss);
        }
    }

    /// Counts one rejected message.
    pub fn reject(&self, code: ErrorCode) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: code.as_str(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rejection reason is exposed at zero before the first rejection.
    #[test]
    fn every_rejection_reason_is_exposed_from_the_start() {
        let m = Metrics::new();
        let text = m.encode();
        for code in [
            ErrorCode::VersionMismatch,
            ErrorCode::Malformed,
            ErrorCode::StaleRound,
            ErrorCode::AlreadyConnected,
        ] {
            let line = format!(
                "fedsb_messages_rejected_total{{reason=\"{}\"}} 0\n",
                code.as_str()
            );
            assert!(text.contains(&line), "{line:?} missing from:\n{text}");
        }
        m.reject(ErrorCode::Malformed);
        assert!(m
            .encode()
            .contains("fedsb_messages_rejected_total{reason=\"malformed\"} 1\n"));
    }
}
