//! Length-prefixed frames: `u32` big-endian header length, a JSON header,
//! then exactly `len` payload bytes.
//!
//! TCP delivers a byte stream, so one read may hold half a frame or three of
//! them. [`FrameCodec`] keeps no state but the header of a frame whose payload
//! has not fully arrived, and it never looks at a socket: it is a pure
//! function from the bytes seen so far to the frames they complete. An
//! incomplete frame is an ordinary `Ok(None)`, not an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde_json::Value;
use tokio_util::codec::{Decoder, Encoder};

use super::message::{KNOWN_TYPES, Message};

/// The largest header accepted: 64 KiB. Headers carry a command line and its
/// environment, never output, so this is generous; it bounds what a peer can
/// make us buffer before we can even tell what it is sending.
pub const MAX_HEADER_LEN: usize = 64 * 1024;

/// The largest payload of one frame: 1 MiB. Longer data travels as several
/// frames, so one frame never monopolises a connection shared by channels.
pub const MAX_PAYLOAD_LEN: usize = 1024 * 1024;

/// One protocol frame: its header (`type` plus fields), the channel, and the
/// raw payload bytes (never assumed to be UTF-8).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub ch: u32,
    pub msg: Message,
    pub payload: Bytes,
}

impl Frame {
    /// A frame without payload.
    pub fn new(ch: u32, msg: Message) -> Frame {
        Frame {
            ch,
            msg,
            payload: Bytes::new(),
        }
    }

    /// A frame carrying `payload`.
    pub fn with_payload(ch: u32, msg: Message, payload: Bytes) -> Frame {
        Frame { ch, msg, payload }
    }

    /// An `exec` frame: the request travels as JSON in the payload. Fails,
    /// without touching any connection, when the request is larger than a
    /// payload may be.
    pub fn exec(ch: u32, req: &super::ExecRequest) -> Result<Frame, FrameError> {
        let payload = serde_json::to_vec(req).map_err(|e| FrameError::InvalidHeader {
            kind: "exec".into(),
            reason: e.to_string(),
        })?;
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(FrameError::PayloadTooLarge(payload.len() as u64));
        }
        Ok(Frame::with_payload(ch, Message::Exec, Bytes::from(payload)))
    }

    /// The [`super::ExecRequest`] an `exec` frame carries.
    pub fn exec_request(&self) -> Result<super::ExecRequest, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// A frame whose payload is `value` as JSON (`put`, `get`, `file`);
    /// fails as [`Frame::exec`] does.
    pub fn json<T: serde::Serialize>(
        ch: u32,
        msg: Message,
        value: &T,
    ) -> Result<Frame, FrameError> {
        let payload = serde_json::to_vec(value).map_err(|e| FrameError::InvalidHeader {
            kind: msg.type_name().into(),
            reason: e.to_string(),
        })?;
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(FrameError::PayloadTooLarge(payload.len() as u64));
        }
        Ok(Frame::with_payload(ch, msg, Bytes::from(payload)))
    }

    /// The JSON payload of a `put`, `get` or `file` frame.
    pub fn payload_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// Why bytes could not be decoded into a frame (or a frame encoded).
///
/// Every variant but `Io` is a protocol error: the peer broke the format, the
/// connection cannot be resynchronised, and it must be closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("header length {0} is outside 1..={MAX_HEADER_LEN}")]
    HeaderLength(usize),
    #[error("header is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("header is not a JSON object")]
    NotObject,
    #[error("header has no \"type\" string")]
    MissingType,
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("header has no valid \"ch\" (an unsigned 32-bit integer)")]
    BadChannel,
    #[error("payload length {0} is above the limit of {MAX_PAYLOAD_LEN} bytes")]
    PayloadTooLarge(u64),
    #[error("invalid {kind:?} header: {reason}")]
    InvalidHeader { kind: String, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The `tokio_util` codec for [`Frame`]s, shared by agent and server.
#[derive(Debug)]
pub struct FrameCodec {
    /// A frame whose header is decoded and whose payload (of the given length)
    /// has not fully arrived yet; kept so the header is parsed only once.
    pending: Option<(u32, Message, usize)>,
    max_header: usize,
    max_payload: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec {
            pending: None,
            max_header: MAX_HEADER_LEN,
            max_payload: MAX_PAYLOAD_LEN,
        }
    }
}

/// The largest header a peer may send before it has authenticated: 4 KiB
/// (an `auth` frame is about 250 bytes), with no payload at all. An
/// unauthenticated peer can thus make the agent buffer 4 KiB, not 1 MiB.
pub const MAX_HANDSHAKE_HEADER_LEN: usize = 4 * 1024;

impl FrameCodec {
    /// The codec with the protocol's limits.
    pub fn new() -> FrameCodec {
        FrameCodec::default()
    }

    /// The codec for a connection that has not authenticated yet.
    pub fn handshake() -> FrameCodec {
        FrameCodec {
            pending: None,
            max_header: MAX_HANDSHAKE_HEADER_LEN,
            max_payload: 0,
        }
    }
}

/// Parses and validates one header, returning `(ch, message, payload length)`.
fn parse_header(bytes: &[u8], max_payload: usize) -> Result<(u32, Message, usize), FrameError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(FrameError::NotObject);
    };
    let kind = match obj.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        _ => return Err(FrameError::MissingType),
    };
    if !KNOWN_TYPES.contains(&kind.as_str()) {
        return Err(FrameError::UnknownType(kind));
    }
    let ch = obj
        .get("ch")
        .and_then(Value::as_u64)
        .and_then(|ch| u32::try_from(ch).ok())
        .ok_or(FrameError::BadChannel)?;
    let len = match obj.get("len") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| FrameError::InvalidHeader {
            kind: kind.clone(),
            reason: "\"len\" is not an unsigned integer".into(),
        })?,
    };
    if len > max_payload as u64 {
        return Err(FrameError::PayloadTooLarge(len));
    }
    let msg: Message =
        serde_json::from_value(Value::Object(obj)).map_err(|e| FrameError::InvalidHeader {
            kind,
            reason: e.to_string(),
        })?;
    Ok((ch, msg, len as usize))
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if self.pending.is_none() {
            if src.len() < 4 {
                return Ok(None);
            }
            let header_len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
            if header_len == 0 || header_len > self.max_header {
                return Err(FrameError::HeaderLength(header_len));
            }
            if src.len() < 4 + header_len {
                src.reserve(4 + header_len - src.len());
                return Ok(None);
            }
            src.advance(4);
            let header = src.split_to(header_len);
            self.pending = Some(parse_header(&header, self.max_payload)?);
        }
        let payload_len = self.pending.as_ref().map_or(0, |p| p.2);
        if src.len() < payload_len {
            src.reserve(payload_len - src.len());
            return Ok(None);
        }
        let (ch, msg, _) = self.pending.take().expect("pending header checked above");
        let payload = src.split_to(payload_len).freeze();
        Ok(Some(Frame { ch, msg, payload }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&frame, dst)
    }
}

/// Appends the wire form of `frame` to `dst`.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
    if frame.payload.len() > MAX_PAYLOAD_LEN {
        return Err(FrameError::PayloadTooLarge(frame.payload.len() as u64));
    }
    // One pass from the typed message to the header's bytes: `ch` and
    // `len` first, then `type` and the message's fields.
    #[derive(serde::Serialize)]
    struct Header<'a> {
        ch: u32,
        #[serde(skip_serializing_if = "is_zero")]
        len: usize,
        #[serde(flatten)]
        msg: &'a Message,
    }
    fn is_zero(n: &usize) -> bool {
        *n == 0
    }
    let header = serde_json::to_vec(&Header {
        ch: frame.ch,
        len: frame.payload.len(),
        msg: &frame.msg,
    })
    .map_err(|e| FrameError::InvalidHeader {
        kind: frame.msg.type_name().into(),
        reason: e.to_string(),
    })?;
    if header.len() > MAX_HEADER_LEN {
        return Err(FrameError::HeaderLength(header.len()));
    }
    dst.reserve(4 + header.len() + frame.payload.len());
    dst.put_u32(header.len() as u32);
    dst.put_slice(&header);
    dst.put_slice(&frame.payload);
    Ok(())
}

/// Fuzzing: bytes from a peer, arriving in pieces whose sizes the input
/// also picks (the first byte), through the link's codec, the handshake's
/// and one with 64-byte limits. The decoder must give frames or a typed
/// error, never panic or hold more than one header and payload; every
/// frame it gives encodes back to bytes it decodes to the same frame.
#[cfg(feature = "fuzzing")]
pub fn fuzz_decode(data: &[u8]) {
    let Some((&piece, data)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    // Small limits too, so that inputs of a few KiB reach every refusal.
    let small = FrameCodec {
        pending: None,
        max_header: 64,
        max_payload: 64,
    };
    for mut codec in [FrameCodec::new(), FrameCodec::handshake(), small] {
        let mut src = BytesMut::new();
        'feed: for chunk in data.chunks(piece) {
            src.extend_from_slice(chunk);
            loop {
                match codec.decode(&mut src) {
                    Ok(Some(frame)) => {
                        assert!(frame.payload.len() <= codec.max_payload);
                        let mut wire = BytesMut::new();
                        if encode_frame(&frame, &mut wire).is_err() {
                            continue;
                        }
                        let again = FrameCodec::new()
                            .decode(&mut wire)
                            .expect("an encoded frame decodes")
                            .expect("an encoded frame is whole");
                        assert_eq!((again.ch, &again.msg), (frame.ch, &frame.msg));
                        assert_eq!(again.payload, frame.payload);
                        assert!(wire.is_empty());
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            // What waits is at most one header and one payload.
            assert!(src.len() <= 4 + codec.max_header + codec.max_payload + piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf)? {
            out.push(f);
        }
        Ok(out)
    }

    fn raw(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn the_documented_example_round_trips() {
        // The worked example of docs/protocol.md, byte for byte.
        let frame = Frame::with_payload(1, Message::Stdout, Bytes::from_static(b"hi\n"));
        let mut encoded = BytesMut::new();
        FrameCodec::new()
            .encode(frame.clone(), &mut encoded)
            .unwrap();
        let expected = raw(r#"{"ch":1,"len":3,"type":"stdout"}"#, b"hi\n");
        assert_eq!(&expected[..4], &[0, 0, 0, 32]);
        assert_eq!(&encoded[..], &expected[..]);
        // Key order does not matter to the decoder.
        let reordered = raw(r#"{"type":"stdout","ch":1,"len":3}"#, b"hi\n");
        assert_eq!(decode_all(&reordered).unwrap(), vec![frame]);
    }

    #[test]
    fn malformed_headers_give_typed_errors() {
        let zero = [0u8, 0, 0, 0];
        assert!(matches!(
            decode_all(&zero),
            Err(FrameError::HeaderLength(0))
        ));
        let huge = ((MAX_HEADER_LEN + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode_all(&huge),
            Err(FrameError::HeaderLength(_))
        ));
        assert!(matches!(
            decode_all(&raw("[1,2]", b"")),
            Err(FrameError::NotObject)
        ));
        assert!(matches!(
            decode_all(&raw("{nope", b"")),
            Err(FrameError::InvalidJson(_))
        ));
        assert!(matches!(
            decode_all(&raw(r#"{"ch":0}"#, b"")),
            Err(FrameError::MissingType)
        ));
        assert!(matches!(
            decode_all(&raw(r#"{"type":"launch","ch":0}"#, b"")),
            Err(FrameError::UnknownType(t)) if t == "launch"
        ));
        assert!(matches!(
            decode_all(&raw(r#"{"type":"ping","id":1}"#, b"")),
            Err(FrameError::BadChannel)
        ));
        assert!(matches!(
            decode_all(&raw(r#"{"type":"stdin","ch":1,"len":1048577}"#, b"")),
            Err(FrameError::PayloadTooLarge(1048577))
        ));
        assert!(matches!(
            decode_all(&raw(r#"{"type":"window","ch":1,"add":"lots"}"#, b"")),
            Err(FrameError::InvalidHeader { .. })
        ));
        assert!(matches!(
            decode_all(&raw("\u{feff}{}", b"")),
            Err(FrameError::InvalidJson(_))
        ));
    }

    #[test]
    fn oversized_payload_is_refused_before_it_arrives() {
        // Only the header is present: the codec must not wait for 2 MiB.
        let bytes = raw(r#"{"type":"stdout","ch":1,"len":2097152}"#, b"");
        assert!(matches!(
            decode_all(&bytes),
            Err(FrameError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn encoder_refuses_oversized_payload() {
        let frame = Frame::with_payload(
            1,
            Message::Stdout,
            Bytes::from(vec![0; MAX_PAYLOAD_LEN + 1]),
        );
        let mut buf = BytesMut::new();
        assert!(FrameCodec::new().encode(frame, &mut buf).is_err());
        assert!(buf.is_empty());
    }
}
