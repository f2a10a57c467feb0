//! Binary encoding of frames.
//!
//! Every frame is `MAGIC (4 bytes) | kind (u8) | body`. Bodies are a
//! concatenation of fields, all little-endian, with no padding:
//!
//! | field type | encoding |
//! |---|---|
//! | `u8`, `u16`, `u32`, `u64` | little-endian integer |
//! | `f32`, `f64` | IEEE 754 little-endian |
//! | `bool` | one byte, 0 or 1 |
//! | `string` | `u32` byte length, then UTF-8 bytes (≤ [`MAX_STRING_BYTES`]) |
//! | `Option<T>` | one byte 0 (absent) or 1 (present), then `T` if present |
//! | `list<T>` | `u32` count, then each `T` |
//! | `tensor` | `u8` ndim (1..=[`MAX_TENSOR_DIMS`]), ndim × `u32` dims, then ∏dims × `f32` |
//!
//! Decoding never panics and never allocates more than the frame can hold:
//! every length is checked against the bytes that remain before anything is
//! allocated, and every error names the field that was wrong.

use crate::{Tensor, MAX_TENSOR_ELEMENTS};
use crate::{MAGIC, MAX_FRAME_BYTES, MAX_STRING_BYTES, MAX_TENSOR_DIMS};

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame is larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    /// The frame does not start with [`MAGIC`].
    #[error("frame does not start with the fedsb magic bytes (got {found:02x?})")]
    BadMagic { found: Vec<u8> },
    /// The kind byte names no message of this direction.
    #[error("unknown {direction} message kind 0x{kind:02x}")]
    UnknownKind { direction: &'static str, kind: u8 },
    /// The frame ended inside a field.
    #[error("frame truncated while reading {field}: needed {needed} more bytes, {available} left")]
    Truncated {
        field: &'static str,
        needed: u64,
        available: usize,
    },
    /// Bytes remain after the last field of the message.
    #[error("{count} unexpected trailing bytes after the message")]
    TrailingBytes { count: usize },
    /// A string field is not UTF-8.
    #[error("field {field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    /// A length, count or value is above its protocol limit.
    #[error("{field} is {value}, above the limit of {max}")]
    LimitExceeded {
        field: &'static str,
        value: u64,
        max: u64,
    },
    /// A field holds a value that no valid message has.
    #[error("invalid value {value} for {field}")]
    InvalidValue { field: &'static str, value: u64 },
}

/// Appends fields to a frame.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// Starts a frame of the given kind.
    pub fn frame(kind: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&MAGIC);
        buf.push(kind);
        Self { buf }
    }

    /// Starts a frame of the given kind with room for `capacity` more bytes.
    pub fn frame_with_capacity(kind: u8, capacity: usize) -> Self {
        let mut w = Self {
            buf: Vec::with_capacity(capacity + MAGIC.len() + 1),
        };
        w.buf.extend_from_slice(&MAGIC);
        w.buf.push(kind);
        w
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    /// Writes a string. Encoders never produce strings above the limit: longer
    /// strings are cut at a character boundary.
    pub fn string(&mut self, s: &str) -> &mut Self {
        let mut end = s.len().min(MAX_STRING_BYTES);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u32(end as u32);
        self.buf.extend_from_slice(&s.as_bytes()[..end]);
        self
    }
    /// Writes a list length.
    pub fn len(&mut self, n: usize) -> &mut Self {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }
    pub fn tensor(&mut self, t: &Tensor) -> &mut Self {
        self.u8(t.shape.len() as u8);
        for &d in &t.shape {
            self.u32(d);
        }
        self.buf.reserve(t.data.len() * 4);
        for &x in &t.data {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
        self
    }
    /// The finished frame.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads fields from a frame, checking every length.
#[derive(Debug)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Checks size and magic and returns the kind byte and a reader of the body.
    pub fn frame(bytes: &'a [u8]) -> Result<(u8, Self), DecodeError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::FrameTooLarge {
                len: bytes.len(),
                max: MAX_FRAME_BYTES,
            });
        }
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(DecodeError::BadMagic {
                found: bytes[..bytes.len().min(MAGIC.len())].to_vec(),
            });
        }
        let mut r = Self {
            rest: &bytes[MAGIC.len()..],
        };
        let kind = r.u8("message kind")?;
        Ok((kind, r))
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(DecodeError::Truncated {
                field,
                needed: n as u64,
                available: self.rest.len(),
            });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(field, 1)?[0])
    }
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_le_bytes)
    }
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_le_bytes)
    }
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_le_bytes)
    }
    pub fn f32(&mut self, field: &'static str) -> Result<f32, DecodeError> {
        self.array(field).map(f32::from_le_bytes)
    }
    pub fn f64(&mut self, field: &'static str) -> Result<f64, DecodeError> {
        self.array(field).map(f64::from_le_bytes)
    }
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::InvalidValue {
                field,
                value: u64::from(v),
            }),
        }
    }
    pub fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u32(field)? as usize;
        if len > MAX_STRING_BYTES {
            return Err(DecodeError::LimitExceeded {
                field,
                value: len as u64,
                max: MAX_STRING_BYTES as u64,
            });
        }
        let bytes = self.take(field, len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { field })
    }
    /// Reads a list length, checked against `max` and against the bytes left
    /// (each entry takes at least `min_entry_bytes`).
    pub fn len(
        &mut self,
        field: &'static str,
        max: usize,
        min_entry_bytes: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(DecodeError::LimitExceeded {
                field,
                value: n as u64,
                max: max as u64,
            });
        }
        let needed = n as u64 * min_entry_bytes as u64;
        if needed > self.rest.len() as u64 {
            return Err(DecodeError::Truncated {
                field,
                needed,
                available: self.rest.len(),
            });
        }
        Ok(n)
    }
    pub fn tensor(&mut self, field: &'static str) -> Result<Tensor, DecodeError> {
        let ndim = self.u8(field)? as usize;
        if ndim == 0 || ndim > MAX_TENSOR_DIMS {
            return Err(DecodeError::InvalidValue {
                field,
                value: ndim as u64,
            });
        }
        let mut shape = Vec::with_capacity(ndim);
        let mut elements: u64 = 1;
        for _ in 0..ndim {
            let d = self.u32(field)?;
            elements = elements.saturating_mul(u64::from(d));
            shape.push(d);
        }
        if elements > MAX_TENSOR_ELEMENTS {
            return Err(DecodeError::LimitExceeded {
                field,
                value: elements,
                max: MAX_TENSOR_ELEMENTS,
            });
        }
        let bytes = self.take(field, elements as usize * 4)?;
        let data = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Tensor { shape, data })
    }
    /// Fails unless every byte has been read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                count: self.rest.len(),
            })
        }
    }
}
