//! Moving frames from a bounded queue onto a socket.
//!
//! The agent's connections and the server's agent links both hand frames
//! to one writer task per socket through a bounded queue; this is that
//! task's loop, so both ends batch the same way.
//!
//! It writes vectored: each frame's header is encoded, and its payload (a
//! command's output, up to 256 KiB) goes to the kernel from where it was
//! read, rather than being copied behind the header first.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::Stream;
use super::handshake::LinkFramed;
use crate::protocol::{Frame, FrameCodec, FrameError, codec::encode_header};

/// Payloads up to this size are copied behind their header (one piece
/// fewer for the kernel); larger ones are written where they are.
const COPY_BELOW: usize = 4 * 1024;

/// Pieces handed to one vectored write (the kernel takes up to 1,024).
const MAX_PIECES: usize = 64;

/// A framed link split for its reader and its writer task. What the
/// handshake read ahead stays with the reader, and what it left unwritten
/// goes first.
pub(crate) fn split(framed: LinkFramed) -> (FramedRead<ReadHalf<Stream>, FrameCodec>, FrameWriter) {
    let parts = framed.into_parts();
    let (read, write) = tokio::io::split(parts.io);
    let mut reader = FramedRead::new(read, parts.codec);
    reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
    let writer = FrameWriter {
        // A stream that cannot take pieces would write each one alone (a
        // TLS record, a segment each): there every frame is copied whole.
        copy_below: if write.is_write_vectored() {
            COPY_BELOW
        } else {
            usize::MAX
        },
        io: write,
        unwritten: parts.write_buf.freeze(),
    };
    (reader, writer)
}

/// The writing half of a link.
pub(crate) struct FrameWriter {
    io: WriteHalf<Stream>,
    unwritten: Bytes,
    /// Payloads shorter than this are copied behind their header.
    copy_below: usize,
}

/// Writes every frame from `queue` until the queue is closed and empty,
/// or a write fails. Frames already queued are written together and
/// flushed once, so a burst of small frames costs one system call.
pub(crate) async fn write_queued(
    queue: &mut mpsc::Receiver<Frame>,
    writer: &mut FrameWriter,
) -> Result<(), FrameError> {
    let mut pieces = std::mem::take(&mut writer.unwritten);
    if !pieces.is_empty() {
        writer.io.write_all_buf(&mut pieces).await?;
    }
    let mut headers = BytesMut::new();
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(frame) = queue.recv().await {
        feed(&frame, writer.copy_below, &mut headers, &mut batch);
        while batch.len() < MAX_PIECES {
            let Ok(frame) = queue.try_recv() else { break };
            feed(&frame, writer.copy_below, &mut headers, &mut batch);
        }
        if !headers.is_empty() {
            batch.push(headers.split().freeze());
        }
        write_all(&mut writer.io, &mut batch).await?;
        writer.io.flush().await?;
    }
    Ok(())
}

/// Adds one frame's bytes to the batch. A frame that cannot be encoded is
/// the fault of its sender alone: it is dropped (and logged), and the
/// connection, which every other channel shares, stays up. (Senders check
/// what can fail before queueing, so this is the last line of defence,
/// not the way errors are reported.)
fn feed(frame: &Frame, copy_below: usize, headers: &mut BytesMut, batch: &mut Vec<Bytes>) {
    if let Err(e) = encode_header(frame, headers) {
        let (ch, kind) = (frame.ch, frame.msg.type_name());
        tracing::error!(ch, kind, error = %e, "a frame could not be encoded and was dropped");
        return;
    }
    if frame.payload.len() < copy_below {
        headers.extend_from_slice(&frame.payload);
    } else {
        batch.push(headers.split().freeze());
        batch.push(frame.payload.clone());
    }
}

/// Writes all of `batch`, as few system calls as the kernel allows.
async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < batch.len() {
        let slices: Vec<std::io::IoSlice<'_>> = batch[first..]
            .iter()
            .filter(|b| !b.is_empty())
            .take(MAX_PIECES)
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        if slices.is_empty() {
            break;
        }
        let mut n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let piece = &mut batch[first];
            let step = n.min(piece.len());
            piece.advance(step);
            n -= step;
            if piece.is_empty() {
                first += 1;
            }
        }
        while first < batch.len() && batch[first].is_empty() {
            first += 1;
        }
    }
    batch.clear();
    Ok(())
}

/// Ends the connection's writing half cleanly: over TLS, the peer gets a
/// `close_notify` and so can tell the end from a cut. Bounded, since a
/// peer that stopped reading could hold the last bytes forever.
pub(crate) async fn close(writer: &mut FrameWriter) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer.io.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Message;
    use futures_util::StreamExt;
    use tokio_util::codec::Framed;

    /// Frames of every size, written through a pipe that takes a few
    /// bytes at a time (so every write is partial, and cuts headers and
    /// payloads anywhere), arrive whole and in order.
    #[tokio::test]
    async fn partial_writes_lose_and_reorder_nothing() {
        let (ours, theirs) = tokio::io::duplex(7);
        let framed = Framed::new(Box::new(ours) as Stream, FrameCodec::new());
        let (_reader, mut writer) = split(framed);
        let sizes = [0, 1, COPY_BELOW - 1, COPY_BELOW, 70_000, 3, 300_000, 0, 5];
        let frames: Vec<Frame> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let payload: Vec<u8> = (0..n).map(|k| (k * 7 + i) as u8).collect();
                Frame::with_payload(i as u32 + 1, Message::Stdout, payload.into())
            })
            .collect();
        let (tx, mut rx) = mpsc::channel(4);
        let sent = frames.clone();
        let writing = tokio::spawn(async move {
            write_queued(&mut rx, &mut writer).await.unwrap();
            close(&mut writer).await;
        });
        tokio::spawn(async move {
            for frame in sent {
                tx.send(frame).await.unwrap();
            }
        });
        let mut read = FramedRead::new(theirs, FrameCodec::new());
        for want in &frames {
            let got = read.next().await.unwrap().unwrap();
            assert_eq!(&got, want);
        }
        writing.await.unwrap();
        assert!(read.next().await.is_none(), "nothing after the last frame");
    }
}
