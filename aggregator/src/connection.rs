//! One participant's WebSocket: handshake, decoding, validation of what can be
//! checked without the round, pings and idle timeout.
//!
//! Every rejected message is answered with a typed `Error` frame and counted
//! in `fedsb_messages_rejected_total{reason}`; a refused `Hello` (an
//! unsupported protocol version, a key already connected, a server error)
//! also closes the connection, as a participant's `Leave` does.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use bytes::Bytes;
use fedsb_protocol::{
    ClientMessage, ErrorCode, ParticipantId, ServerMessage, MAX_FRAME_BYTES, PROTOCOL_VERSION,
};
use futures_util::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite;
use tracing::{debug, info};

use crate::config::{ServerSection, MAX_TIMING_SECS};
use crate::coordinator::{Outbox, OUTBOX_FRAMES};
use crate::server::App;

enum Flow {
    Continue,
    Close,
}

struct Connection {
    app: Arc<App>,
    socket: WebSocket,
    participant: Option<ParticipantId>,
}

/// Serves one upgraded WebSocket until it closes.
pub async fn serve_socket(socket: WebSocket, app: Arc<App>) {
    let (frames_tx, mut frames_rx) = mpsc::channel::<Bytes>(OUTBOX_FRAMES);
    let kick = Arc::new(Notify::new());
    let outbox = Outbox {
        frames: frames_tx,
        kick: kick.clone(),
    };
    let (ping_every, idle) = timings(&app.config.server);
    let mut ping = tokio::time::interval_at(after(Instant::now(), ping_every), ping_every);
    let mut last_seen = Instant::now();
    // A connection must say Hello within the idle timeout: answering pings
    // alone does not hold a connection that never joins.
    let hello_by = after(last_seen, idle);
    let mut conn = Connection {
        app,
        socket,
        participant: None,
    };
    let mut outbox = Some(outbox);
    // The close frame to end with (none: a plain close).
    let mut close = None;
    let mut stopping = conn.app.stopping.subscribe();
    loop {
        tokio::select! {
            biased;
            () = kick.notified() => break,
            () = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                // Participants reconnect after a restart; 1001 tells them
                // this is one, not a failure.
                close = Some(CloseFrame {
                    code: close_code::AWAY,
                    reason: "the server is shutting down".into(),
                });
                break;
            }
            Some(frame) = frames_rx.recv() => {
                if conn.send_bytes(frame).await.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(hello_by), if conn.participant.is_none() => {
                info!("no Hello within the idle timeout; closing with 1008");
                close = Some(CloseFrame {
                    code: close_code::POLICY,
                    reason: format!("no Hello within {} s", idle.as_secs()).into(),
                });
                break;
            }
            received = timeout_at(after(last_seen, idle), conn.socket.next()) => {
                let msg = match received {
                    Err(_) => {
                        info!(participant = ?conn.participant, "no frame within the idle timeout; disconnecting");
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        let error = e.to_string();
                        let too_large = e
                            .into_inner()
                            .downcast::<tungstenite::Error>()
                            .is_ok_and(|e| matches!(*e, tungstenite::Error::Capacity(_)));
                        if too_large {
                            // Beyond even the 1 MiB the reader lets through
                            // for a typed FrameTooLarge: counted, and closed
                            // with 1009 (message too big).
                            conn.app.metrics.reject(ErrorCode::FrameTooLarge);
                            info!(participant = ?conn.participant,
                                "a frame far above the protocol's limit; closing with 1009");
                            close = Some(CloseFrame {
                                code: close_code::SIZE,
                                reason: format!("frame above {MAX_FRAME_BYTES} bytes").into(),
                            });
                        } else {
                            debug!(%error, "websocket error");
                        }
                        break;
                    }
                    Ok(Some(Ok(m))) => m,
                };
                last_seen = Instant::now();
                let flow = match msg {
                    Message::Binary(bytes) => conn.on_frame(bytes, &mut outbox).await,
                    Message::Text(_) => {
                        conn.reject(ErrorCode::Malformed,
                            "text frames are not part of the fedsb protocol; send binary frames".into()).await
                    }
                    Message::Ping(_) | Message::Pong(_) => Flow::Continue,
                    Message::Close(_) => Flow::Close,
                };
                if matches!(flow, Flow::Close) {
                    break;
                }
            }
            _ = ping.tick() => {
                if conn.socket.send(Message::Ping(Bytes::new())).await.is_err() {
                    break;
                }
            }
        }
    }
    if let Some(p) = conn.participant {
        conn.app.coordinator.leave(p).await;
    }
    let _ = conn.socket.send(Message::Close(close)).await;
}

/// The ping period and the idle timeout. The configuration keeps both in
/// 1..=[`MAX_TIMING_SECS`] (and the timeout above the period); here they
/// are clamped to that range too, so that no value can panic the
/// connection (a zero period, or an `Instant` overflow).
fn timings(server: &ServerSection) -> (Duration, Duration) {
    let secs = |s: u64| Duration::from_secs(s.clamp(1, MAX_TIMING_SECS));
    (
        secs(server.ping_interval_secs),
        secs(server.idle_timeout_secs),
    )
}

/// `t + d`, without panicking: `t` plus [`MAX_TIMING_SECS`] where `t + d`
/// is beyond what `Instant` holds.
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(MAX_TIMING_SECS)))
        .unwrap_or(t)
}

impl Connection {
    async fn send_bytes(&mut self, frame: Bytes) -> Result<(), axum::Error> {
        self.app.metrics.bytes_sent.inc_by(frame.len() as u64);
        self.socket.send(Message::Binary(frame)).await
    }

    async fn send(&mut self, msg: &ServerMessage) -> Flow {
        match self.send_bytes(Bytes::from(msg.encode())).await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Close,
        }
    }

    async fn reject(&mut self, code: ErrorCode, message: String) -> Flow {
        self.app.metrics.reject(code);
        debug!(participant = ?self.participant, code = code.as_str(), %message, "rejected");
        self.send(&ServerMessage::Error { code, message }).await
    }

    async fn on_frame(&mut self, bytes: Bytes, outbox: &mut Option<Outbox>) -> Flow {
        let len = bytes.len();
        self.app.metrics.bytes_received.inc_by(len as u64);
        if len > MAX_FRAME_BYTES {
            return self
                .reject(
                    ErrorCode::FrameTooLarge,
                    format!("frame of {len} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes"),
                )
                .await;
        }
        if self.participant.is_none() {
            if let Some(v) = ClientMessage::peek_hello_version(&bytes) {
                if v != PROTOCOL_VERSION {
                    self.reject(
                        ErrorCode::VersionMismatch,
                        format!("protocol version {v} is not supported; this aggregator speaks version {PROTOCOL_VERSION}"),
                    )
                    .await;
                    return Flow::Close;
                }
            }
        }
        let msg = match ClientMessage::decode(&bytes) {
            Ok(m) => m,
            Err(e) => return self.reject(ErrorCode::Malformed, e.to_string()).await,
        };
        match (self.participant, msg) {
            (
                None,
                ClientMessage::Hello {
                    client,
                    participant_key,
                    ..
                },
            ) => {
                let Some(outbox) = outbox.take() else {
                    return Flow::Close;
                };
                match self
                    .app
                    .coordinator
                    .join(client, participant_key, outbox)
                    .await
                {
                    Ok(id) => {
                        self.participant = Some(id);
                        Flow::Continue
                    }
                    Err(r) => {
                        self.reject(r.code, r.message).await;
                        Flow::Close
                    }
                }
            }
            (None, _) => {
                self.reject(
                    ErrorCode::NotHandshaken,
                    "the first message must be Hello".into(),
                )
                .await
            }
            (Some(_), ClientMessage::Hello { .. }) => {
                self.reject(
                    ErrorCode::DuplicateHello,
                    "Hello was already received on this connection".into(),
                )
                .await
            }
            (Some(_), ClientMessage::Leave { reason }) => {
                info!(participant = ?self.participant, ?reason, "participant leaves");
                Flow::Close
            }
            (Some(p), ClientMessage::InitGradient { module, gradient }) => {
                // Answered only when wrong; the whole contribution is
                // answered at `InitDone`.
                match self
                    .app
                    .coordinator
                    .init_gradient(p, module, gradient, len as u64)
                    .await
                {
                    Ok(()) => Flow::Continue,
                    Err(r) => self.reject(r.code, r.message).await,
                }
            }
            (Some(p), ClientMessage::InitDone { num_samples }) => {
                match self.app.coordinator.init_done(p, num_samples).await {
                    Ok(num_samples) => {
                        self.send(&ServerMessage::InitAccepted { num_samples })
                            .await
                    }
                    Err(r) => self.reject(r.code, r.message).await,
                }
            }
            (
                Some(p),
                ClientMessage::CentreLogits {
                    logit_sums,
                    num_samples,
                },
            ) => match self
                .app
                .coordinator
                .centre_logits(p, logit_sums, num_samples, len as u64)
                .await
            {
                Ok(num_samples) => {
                    self.send(&ServerMessage::CentreAccepted { num_samples })
                        .await
                }
                Err(r) => self.reject(r.code, r.message).await,
            },
            (Some(p), ClientMessage::Update(update)) => {
                match self.app.coordinator.update(p, update, len as u64).await {
                    Ok(round) => {
                        self.app.metrics.updates_accepted.inc();
                        self.send(&ServerMessage::UpdateAccepted { round }).await
                    }
                    Err(r) => self.reject(r.code, r.message).await,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Huge or zero timings neither panic nor reach `interval_at` as zero:
    /// `ping_interval_secs = u64::MAX` used to panic every connection with
    /// "overflow when adding duration to instant".
    #[tokio::test]
    async fn extreme_timings_do_not_panic() {
        for (ping, idle) in [(u64::MAX, u64::MAX), (0, 0), (10, 45)] {
            let server = ServerSection {
                ping_interval_secs: ping,
                idle_timeout_secs: idle,
                ..ServerSection::default()
            };
            let (ping_every, idle_after) = timings(&server);
            assert!(ping_every >= Duration::from_secs(1), "{ping}");
            assert!(ping_every <= Duration::from_secs(MAX_TIMING_SECS), "{ping}");
            assert!(idle_after >= Duration::from_secs(1), "{idle}");
            assert!(idle_after <= Duration::from_secs(MAX_TIMING_SECS), "{idle}");
            let now = Instant::now();
            let _ping = tokio::time::interval_at(after(now, ping_every), ping_every);
            assert!(after(now, idle_after) > now);
        }
        assert_eq!(
            timings(&ServerSection::default()),
            (Duration::from_secs(10), Duration::from_secs(45))
        );
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::MAX),
            now + Duration::from_secs(MAX_TIMING_SECS)
        );
    }
}
