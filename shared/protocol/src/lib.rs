//! The fedsb wire protocol, version [`PROTOCOL_VERSION`].
//!
//! Participants (browser tabs and native `fedsb join` processes) talk to the
//! aggregator over one WebSocket per participant. Every protocol message is a
//! single **binary** WebSocket frame; text frames are not part of the protocol.
//! This crate holds every message type, the encoding and the limits. It does no
//! I/O and knows nothing of GPUs, so it builds for native targets and wasm32.
//!
//! # Ordering guarantees
//! * The first message a participant sends is always [`ClientMessage::Hello`].
//!   Anything else first is answered with [`ErrorCode::NotHandshaken`].
//! * The server answers a compatible `Hello` with [`ServerMessage::Welcome`],
//!   then the current [`ServerMessage::GlobalModel`] (round 0 is the initial
//!   model), then [`ServerMessage::RoundOpen`] if a round is collecting updates.
//!   An incompatible version is answered with [`ErrorCode::VersionMismatch`] and
//!   the connection is closed.
//! * A participant that presents a participant key whose update for the
//!   collecting round was accepted earlier (before it reconnected, or before
//!   the aggregator restarted) gets [`ServerMessage::UpdateAccepted`] for that
//!   round right before its `RoundOpen`: it must not train that round again.
//! * For each committed round the server broadcasts `GlobalModel` to every
//!   connected participant, then `RoundOpen` for the next round, in that order.
//! * A participant sends at most one [`ClientMessage::Update`] per round; the
//!   server answers each update with [`ServerMessage::UpdateAccepted`] or an
//!   [`ServerMessage::Error`].
//! * After the last round the server sends [`ServerMessage::TaskFinished`].
//!
//! The byte layout is documented in `docs/protocol.md` and in [`codec`].
//!
//! ```
//! use fedsb_protocol::{ClientMessage, PROTOCOL_VERSION};
//! let hello = ClientMessage::Hello {
//!     protocol_version: PROTOCOL_VERSION,
//!     client: "docs".into(),
//!     participant_key: None,
//! };
//! let bytes = hello.encode();
//! assert_eq!(ClientMessage::decode(&bytes).unwrap(), hello);
//! ```

pub mod codec;
mod messages;

pub use codec::DecodeError;
pub use messages::*;

/// The protocol version spoken by this build. Checked at the handshake: the
/// server accepts only participants whose `Hello` carries exactly this value.
/// Version 2 added the participant key to `Hello` and
/// [`ErrorCode::AlreadyConnected`]; version 3 the round's learning rate to
/// [`ServerMessage::RoundOpen`]; version 4 the head's learning rate to
/// [`TaskInfo`]; version 5 the centring of the initial head
/// ([`ServerMessage::CentreRequest`], [`ClientMessage::CentreLogits`],
/// [`ServerMessage::CentreAccepted`]).
pub const PROTOCOL_VERSION: u16 = 5;

/// Four bytes that open every frame: `b"FSB"` and the frame format revision.
pub const MAGIC: [u8; 4] = *b"FSB\x01";

/// Largest frame (WebSocket message payload) either side may send, in bytes.
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Largest LoRA-SB rank r (R is r×r).
pub const MAX_RANK: u32 = 512;

/// Largest number of adapted modules (R matrices) in one update.
pub const MAX_MODULES: u32 = 1024;

/// Largest number of elements of any single tensor.
pub const MAX_TENSOR_ELEMENTS: u64 = (MAX_FRAME_BYTES / 4) as u64;

/// Largest number of dimensions of a tensor.
pub const MAX_TENSOR_DIMS: usize = 4;

/// Longest string field, in bytes of UTF-8.
pub const MAX_STRING_BYTES: usize = 4096;

/// Largest number of entries in a list field other than tensors
/// (module names, files).
pub const MAX_LIST_LEN: usize = 4096;

/// Largest magnitude of any value (an R entry, a head weight or bias) of an
/// `Update` the aggregator accepts. Honest training stays orders of
/// magnitude below it (R₀'s entries are about 1 and AdamW moves each by at
/// most its learning rate a step); a larger value is refused with
/// [`ErrorCode::NonFinite`], so that one participant's finite but huge
/// update (3e38) cannot overflow the mean or the server's step to ∞ or
/// make the global model's evaluation NaN.
pub const MAX_UPDATE_ABS: f32 = 1e4;

/// Shortest participant key, in bytes.
pub const MIN_PARTICIPANT_KEY_BYTES: usize = 16;

/// Longest participant key, in bytes.
pub const MAX_PARTICIPANT_KEY_BYTES: usize = 128;

/// Checks a participant key of [`ClientMessage::Hello`]: 16 to 128 ASCII
/// letters, digits, `-` or `_` (fedsb's participants send 32 hex digits of
/// 16 random bytes). Decoding a `Hello` applies this check.
pub fn check_participant_key(key: &str) -> Result<(), DecodeError> {
    let len = key.len();
    if len < MIN_PARTICIPANT_KEY_BYTES {
        return Err(DecodeError::InvalidValue {
            field: "hello.participant_key length (at least 16 bytes)",
            value: len as u64,
        });
    }
    if len > MAX_PARTICIPANT_KEY_BYTES {
        return Err(DecodeError::LimitExceeded {
            field: "hello.participant_key length",
            value: len as u64,
            max: MAX_PARTICIPANT_KEY_BYTES as u64,
        });
    }
    if let Some(b) = key
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'))
    {
        return Err(DecodeError::InvalidValue {
            field: "hello.participant_key byte (ASCII letters, digits, - and _ only)",
            value: u64::from(b),
        });
    }
    Ok(())
}
