//! One channel's input on its way from the connection, which must never
//! wait (every channel shares it), to the task running the channel, which
//! may be busy (sending output while the link is full).
//!
//! The client's stdin credit bounds the bytes waiting here, not the
//! pieces: a frame of one byte costs one byte of credit. Kept as frames,
//! a flood of one-byte frames while the channel's task was busy held a
//! queue entry, a box and a slice of the link's read buffer (keeping all
//! of it alive) per byte. Small input is therefore copied and gathered
//! here as it arrives, as the channel's own queue does
//! ([`super::channel::StdinQueue`]); empty frames are only counted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::channel::{COPIED_INPUT, Stdin, TAIL_PIECE};

/// A new channel's inbox: the connection's end and the channel's.
pub(crate) fn inbox() -> (InboxSender, Inbox) {
    let shared = Arc::new(Shared {
        waiting: Mutex::new(Waiting::default()),
        arrived: Notify::new(),
    });
    (InboxSender(shared.clone()), Inbox(shared))
}

struct Shared {
    waiting: Mutex<Waiting>,
    /// Input arrived, or the sender went: the one receiver looks again.
    arrived: Notify,
}

#[derive(Default)]
struct Waiting {
    pieces: VecDeque<Stdin>,
    /// Small input gathered after `pieces`.
    tail: BytesMut,
    /// Empty frames without `eof`: they write nothing, but each cost its
    /// client a byte of credit, which the channel returns.
    empty: usize,
    sender_gone: bool,
    receiver_gone: bool,
}

impl Waiting {
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let data = std::mem::take(&mut self.tail).freeze();
            self.pieces.push_back(Stdin { data, eof: false });
        }
    }
}

/// The connection's end.
pub(crate) struct InboxSender(Arc<Shared>);

impl InboxSender {
    /// Hands `data` (and `eof`) to the channel without waiting. Dropped
    /// once the channel stopped taking input.
    pub(crate) fn send(&self, data: Bytes, eof: bool) {
        let Ok(mut w) = self.0.waiting.lock() else {
            return;
        };
        if w.receiver_gone {
            return;
        }
        match (data.is_empty(), eof) {
            (true, false) => w.empty += 1,
            (false, false) if data.len() <= COPIED_INPUT => {
                w.tail.extend_from_slice(&data);
                if w.tail.len() >= TAIL_PIECE {
                    w.seal_tail();
                }
            }
            _ => {
                w.seal_tail();
                let data = if data.len() <= COPIED_INPUT {
                    Bytes::copy_from_slice(&data)
                } else {
                    data
                };
                w.pieces.push_back(Stdin { data, eof });
            }
        }
        drop(w);
        self.0.arrived.notify_one();
    }
}

impl Drop for InboxSender {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.waiting.lock() {
            w.sender_gone = true;
        }
        self.0.arrived.notify_one();
    }
}

/// The channel's end.
pub(crate) struct Inbox(Arc<Shared>);

impl Inbox {
    /// The next input in the order it came (small pieces gathered), or
    /// `None` once the connection let go of the channel and all was taken.
    /// Cancel-safe: nothing is taken before it is returned.
    pub(crate) async fn recv(&mut self) -> Option<Stdin> {
        loop {
            {
                let Ok(mut w) = self.0.waiting.lock() else {
                    return None;
                };
                // Empty frames first: they write nothing, so where they
                // go among the rest does not matter, and before an `eof`
                // they are not input after the end.
                if w.empty > 0 {
                    w.empty -= 1;
                    return Some(Stdin {
                        data: Bytes::new(),
                        eof: false,
                    });
                }
                if let Some(piece) = w.pieces.pop_front() {
                    return Some(piece);
                }
                if !w.tail.is_empty() {
                    let data = std::mem::take(&mut w.tail).freeze();
                    return Some(Stdin { data, eof: false });
                }
                if w.sender_gone {
                    return None;
                }
            }
            self.0.arrived.notified().await;
        }
    }

    /// Takes no more input: what waits and what comes is dropped.
    pub(crate) fn close(&mut self) {
        if let Ok(mut w) = self.0.waiting.lock() {
            w.receiver_gone = true;
            w.pieces.clear();
            w.tail = BytesMut::new();
            w.empty = 0;
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of one-byte frames while the channel's task is busy is
    /// gathered as it arrives: a few pieces, the link's read buffer let
    /// go, every byte in order, the empty frames counted and `eof` last.
    #[tokio::test]
    async fn a_flood_of_tiny_frames_waits_as_a_few_pieces_in_order() {
        let (tx, mut rx) = inbox();
        let n = 100_000;
        let mut link_buffer = BytesMut::new();
        link_buffer.extend((0..n).map(|i| b'a' + (i % 26) as u8));
        let link_buffer = link_buffer.freeze();
        for i in 0..n {
            tx.send(link_buffer.slice(i..i + 1), false);
            if i % 1000 == 0 {
                tx.send(Bytes::new(), false);
            }
        }
        let paste = Bytes::from(vec![b'P'; 4 * COPIED_INPUT]);
        tx.send(paste.clone(), false);
        tx.send(Bytes::from_static(b"end"), true);
        {
            let w = rx.0.waiting.lock().unwrap();
            assert!(
                w.pieces.len() <= n / TAIL_PIECE + 4,
                "{n} one-byte frames wait as {} pieces",
                w.pieces.len()
            );
            assert_eq!(w.empty, n / 1000);
        }
        assert!(
            link_buffer.is_unique(),
            "waiting input still holds the link's read buffer"
        );
        drop(tx);
        let (mut got, mut empty, mut eofs) = (Vec::new(), 0, 0);
        while let Some(Stdin { data, eof }) = rx.recv().await {
            assert_eq!(eofs, 0, "nothing after eof");
            empty += usize::from(data.is_empty());
            eofs += usize::from(eof);
            got.extend_from_slice(&data);
        }
        let mut expected = link_buffer.to_vec();
        expected.extend_from_slice(&paste);
        expected.extend_from_slice(b"end");
        assert_eq!(got, expected);
        assert_eq!((empty, eofs), (n / 1000, 1));
    }

    /// The receiver waits for input and wakes for it; it ends once the
    /// sender is gone. A closed inbox drops what comes.
    #[tokio::test]
    async fn the_channel_waits_for_input_and_ends_with_the_connection() {
        let (tx, mut rx) = inbox();
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await.map(|s| s.data);
            let end = rx.recv().await.is_none();
            (first, end)
        });
        tokio::task::yield_now().await;
        tx.send(Bytes::from_static(b"key"), false);
        drop(tx);
        let (first, end) = waiting.await.unwrap();
        assert_eq!(first.as_deref(), Some(&b"key"[..]));
        assert!(end);

        let (tx, mut rx) = inbox();
        tx.send(Bytes::from_static(b"dropped"), false);
        rx.close();
        tx.send(Bytes::from_static(b"too"), true);
        drop(tx);
        assert!(rx.recv().await.is_none());
    }
}
