//! Property tests of the frame codec: any sequence of frames, cut into any
//! pieces or glued together, decodes to exactly the frames encoded.

use bytes::{Bytes, BytesMut};
use conch::protocol::{ExecRequest, Frame, FrameCodec, Message, PtySize};
use conch::vocab::{ErrorCode, ExitStatus, SignalNumber};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        Just(Message::Stdout),
        Just(Message::Stderr),
        Just(Message::Close),
        any::<bool>().prop_map(|eof| Message::Stdin { eof }),
        any::<u64>().prop_map(|add| Message::Window { add }),
        any::<u64>().prop_map(|id| Message::Ping { id }),
        (any::<u16>(), any::<u16>()).prop_map(|(cols, rows)| Message::Resize { cols, rows }),
        ("[a-z_]{1,40}", "\\PC{0,200}").prop_map(|(code, message)| Message::Error {
            code: ErrorCode::from(code.as_str()),
            message
        }),
        (
            any::<Option<i32>>(),
            proptest::option::of(1..=31i32),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(
                |(code, signal, timed_out, duration_ms)| Message::Exit(ExitStatus {
                    code,
                    signal: signal.map(SignalNumber),
                    timed_out,
                    duration_ms
                })
            ),
        Just(Message::Exec),
    ]
}

proptest! {
    /// An exec request survives the trip through its frame's payload.
    #[test]
    fn exec_requests_round_trip(
        cmd in "\\PC{0,300}",
        pty in proptest::option::of(any::<(u16, u16)>()),
        window in proptest::option::of(any::<u64>()),
    ) {
        let req = ExecRequest {
            cmd: Some(cmd),
            pty: pty.map(|(cols, rows)| PtySize { cols, rows }),
            window,
            ..Default::default()
        };
        let frame = Frame::exec(7, &req).unwrap();
        let decoded = decode_in_pieces(&encode(&[frame]), &[]);
        prop_assert_eq!(decoded.len(), 1);
        prop_assert_eq!(decoded[0].exec_request().unwrap(), req);
    }
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        any::<u32>(),
        message(),
        proptest::collection::vec(any::<u8>(), 0..3000),
    )
        .prop_map(|(ch, msg, payload)| Frame::with_payload(ch, msg, Bytes::from(payload)))
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let mut codec = FrameCodec::new();
    for f in frames {
        codec.encode(f.clone(), &mut buf).unwrap();
    }
    buf.to_vec()
}

/// Feeds `bytes` to a decoder in pieces ending at `cuts`, as reads would.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&bytes.len())) {
        let end = end.clamp(start, bytes.len());
        buf.extend_from_slice(&bytes[start..end]);
        start = end;
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            out.push(f);
        }
    }
    assert!(buf.is_empty(), "bytes left over");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_cuts_decode_the_same_frames(
        frames in proptest::collection::vec(frame(), 0..12),
        mut cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let bytes = encode(&frames);
        let mut cuts: Vec<usize> = cuts.drain(..).map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(decode_in_pieces(&bytes, &cuts), frames);
    }

    #[test]
    fn one_byte_at_a_time_and_all_at_once(frames in proptest::collection::vec(frame(), 0..5)) {
        let bytes = encode(&frames);
        let every: Vec<usize> = (1..bytes.len()).collect();
        prop_assert_eq!(decode_in_pieces(&bytes, &every), frames.clone());
        prop_assert_eq!(decode_in_pieces(&bytes, &[]), frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::from(&bytes[..]);
        // Any outcome but a panic or an endless loop is acceptable.
        for _ in 0..100 {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                _ => break,
            }
        }
    }
}

#[test]
fn a_maximal_payload_round_trips() {
    let payload = Bytes::from(vec![0xabu8; conch::protocol::MAX_PAYLOAD_LEN]);
    let frame = Frame::with_payload(7, Message::Stdout, payload);
    let bytes = encode(std::slice::from_ref(&frame));
    assert_eq!(decode_in_pieces(&bytes, &[3, 100, 70000]), vec![frame]);
}
