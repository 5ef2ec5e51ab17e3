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
    pieces: VecDeque<Piece>,
    /// Small input gathered after `pieces`, and where in it the frames
    /// that carried `eof` ended.
    tail: BytesMut,
    tail_eofs: VecDeque<u32>,
    /// Empty frames without `eof`: they write nothing, but each cost its
    /// client a byte of credit, which the channel returns.
    empty: usize,
    sender_gone: bool,
    receiver_gone: bool,
}

/// Input as it waits: bytes, and where among them the frames that carried
/// `eof` ended (offsets from the piece's start as it came). A run of
/// frames with `eof` (a terminal's ^D each) thus costs four bytes a frame
/// rather than an entry.
struct Piece {
    data: Bytes,
    eofs: VecDeque<u32>,
    /// Bytes of `data` already taken from its front.
    taken: u32,
}

impl Piece {
    /// The input up to the next `eof` (with it), or all that is left.
    fn take(&mut self) -> Stdin {
        match self.eofs.pop_front() {
            Some(end) => {
                let n = end.saturating_sub(self.taken);
                self.taken = end;
                let data = self.data.split_to((n as usize).min(self.data.len()));
                Stdin { data, eof: true }
            }
            None => Stdin {
                data: std::mem::take(&mut self.data),
                eof: false,
            },
        }
    }

    fn is_empty(&self) -> bool {
        self.data.is_empty() && self.eofs.is_empty()
    }
}

impl Waiting {
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() || !self.tail_eofs.is_empty() {
            self.pieces.push_back(Piece {
                data: std::mem::take(&mut self.tail).freeze(),
                eofs: std::mem::take(&mut self.tail_eofs),
                taken: 0,
            });
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
        if data.is_empty() && !eof {
            w.empty += 1;
        } else if data.len() <= COPIED_INPUT {
            w.tail.extend_from_slice(&data);
            if eof {
                let end = w.tail.len() as u32;
                w.tail_eofs.push_back(end);
            }
            if w.tail.len() >= TAIL_PIECE {
                w.seal_tail();
            }
        } else {
            w.seal_tail();
            let eofs = if eof {
                VecDeque::from([data.len() as u32])
            } else {
                VecDeque::new()
            };
            w.pieces.push_back(Piece {
                data,
                eofs,
                taken: 0,
            });
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

/// Pieces a drained inbox may keep room for; past it, the room goes.
const KEPT_ROOM: usize = 16;

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
                if w.pieces.is_empty() {
                    w.seal_tail();
                }
                if let Some(front) = w.pieces.front_mut() {
                    let input = front.take();
                    if front.is_empty() {
                        w.pieces.pop_front();
                        // A flood's queue does not outlive it.
                        if w.pieces.is_empty() && w.pieces.capacity() > KEPT_ROOM {
                            w.pieces = VecDeque::new();
                        }
                    }
                    return Some(input);
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
            w.pieces = VecDeque::new();
            w.tail = BytesMut::new();
            w.tail_eofs = VecDeque::new();
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
    /// gathered as it arrives, those with `eof` too: a few pieces, the
    /// link's read buffer let go, every byte in order with each `eof`
    /// where it came, the empty frames counted.
    #[tokio::test]
    async fn a_flood_of_tiny_frames_waits_as_a_few_pieces_in_order() {
        let (tx, mut rx) = inbox();
        let n = 100_000;
        let mut link_buffer = BytesMut::new();
        link_buffer.extend((0..n).map(|i| b'a' + (i % 26) as u8));
        let link_buffer = link_buffer.freeze();
        let mut eofs_sent = Vec::new();
        for i in 0..n {
            let eof = i % 1000 == 999;
            tx.send(link_buffer.slice(i..i + 1), eof);
            if eof {
                eofs_sent.push(i + 1);
                // A run of empty frames with `eof` (a terminal's ^D each).
                for _ in 0..3 {
                    tx.send(Bytes::new(), true);
                    eofs_sent.push(i + 1);
                }
            }
            if i % 1000 == 0 {
                tx.send(Bytes::new(), false);
            }
        }
        let paste = Bytes::from(vec![b'P'; 4 * COPIED_INPUT]);
        tx.send(paste.clone(), false);
        tx.send(Bytes::from_static(b"end"), true);
        eofs_sent.push(n + paste.len() + 3);
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
        let (mut got, mut empty, mut eofs_got) = (Vec::new(), 0, Vec::new());
        while let Some(Stdin { data, eof }) = rx.recv().await {
            empty += usize::from(data.is_empty() && !eof);
            got.extend_from_slice(&data);
            if eof {
                eofs_got.push(got.len());
            }
        }
        let mut expected = link_buffer.to_vec();
        expected.extend_from_slice(&paste);
        expected.extend_from_slice(b"end");
        assert_eq!(got, expected);
        assert_eq!(eofs_got, eofs_sent);
        assert_eq!(empty, n / 1000);
        assert!(rx.0.waiting.lock().unwrap().pieces.capacity() <= KEPT_ROOM);
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
