//! A channel's control frames, handed from the connection's reader to the
//! channel's task: never waits, and bounded by what they mean rather than
//! by a queue.
//!
//! One reader serves every channel of a connection, and a server's link is
//! shared by all its users. Through a bounded queue, a channel that was not
//! reading its controls (waiting for its start place, or its task waiting
//! for room on the link) made the reader wait once the queue was full, and
//! with it every other channel of the link: one user's resizes held up
//! everyone's input. These frames need no queue: a resize replaces the one
//! not yet applied, window credit adds up, signals are kept in order up to
//! [`SIGNALS_KEPT`] (a second ^C for a program that asks for one is kept)
//! and past that only a kind not already waiting, and close and detach are
//! kept once each, in the order they came. So the state is a few words
//! however many come.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use nix::sys::signal::Signal;

use super::channel::Control;
use crate::protocol::PtySize;

/// Signals kept in the order they came, repeats included; past this
/// many, a signal of a kind already waiting is merged into it.
const SIGNALS_KEPT: usize = 16;

/// What has come for a channel and not been taken yet.
#[derive(Default)]
struct Pending {
    window: u64,
    resize: Option<PtySize>,
    /// In the order they came: at most [`SIGNALS_KEPT`], and then at most
    /// one more of each kind (standard signals are about 31).
    signals: std::collections::VecDeque<Signal>,
    /// `Close` and `Detach`, each at most once, in the order they first
    /// came: a writer's close then its page's detach must end a shared
    /// shell, not leave it running.
    ends: Vec<Control>,
    /// The connection has let go: once the rest is taken, nothing more.
    ended: bool,
}

impl Pending {
    /// The next to act on: the credit, the size, the signals, then close
    /// and detach as they came, so that an end comes after what was sent
    /// before it.
    fn take(&mut self) -> Option<Control> {
        if self.window > 0 {
            return Some(Control::Window(std::mem::take(&mut self.window)));
        }
        if let Some(size) = self.resize.take() {
            return Some(Control::Resize(size));
        }
        if let Some(sig) = self.signals.pop_front() {
            return Some(Control::Signal(sig));
        }
        if !self.ends.is_empty() {
            return Some(self.ends.remove(0));
        }
        None
    }
}

struct Shared {
    pending: Mutex<Pending>,
    /// The channel's task, waiting in [`Controls::recv`].
    ready: AtomicWaker,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The connection's end: [`ControlSender::send`] never waits.
pub(crate) struct ControlSender {
    shared: Arc<Shared>,
}

/// The channel's end.
pub(crate) struct Controls {
    shared: Arc<Shared>,
}

/// A new channel's control hand-off.
pub(crate) fn controls() -> (ControlSender, Controls) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        ready: AtomicWaker::new(),
    });
    (
        ControlSender {
            shared: shared.clone(),
        },
        Controls { shared },
    )
}

impl ControlSender {
    /// Keeps `control` for the channel (merged with what waits) and wakes it.
    pub(crate) fn send(&self, control: Control) {
        {
            let mut pending = self.shared.pending();
            match control {
                Control::Window(add) => pending.window = pending.window.saturating_add(add),
                Control::Resize(size) => pending.resize = Some(size),
                Control::Signal(sig) => {
                    if pending.signals.len() < SIGNALS_KEPT || !pending.signals.contains(&sig) {
                        pending.signals.push_back(sig);
                    }
                }
                Control::Detach | Control::Close => {
                    let end = std::mem::discriminant(&control);
                    if !pending
                        .ends
                        .iter()
                        .any(|e| std::mem::discriminant(e) == end)
                    {
                        pending.ends.push(control);
                    }
                }
            }
        }
        self.shared.ready.wake();
    }
}

impl Drop for ControlSender {
    fn drop(&mut self) {
        self.shared.pending().ended = true;
        self.shared.ready.wake();
    }
}

impl Controls {
    /// The next control; `None` once the connection has let go of the
    /// channel and everything sent before has been taken. Cancel-safe:
    /// nothing is taken unless it is returned.
    ///
    /// A channel polls this on every turn of its output loop, so the wait
    /// costs a waker's registration (atomics, as an mpsc receiver's does),
    /// not a waiter list's lock: there is only ever one receiver.
    pub(crate) async fn recv(&mut self) -> Option<Control> {
        std::future::poll_fn(|cx| {
            // Registered before the look, so a send after it wakes us.
            self.shared.ready.register(cx.waker());
            let mut pending = self.shared.pending();
            match pending.take() {
                Some(control) => Poll::Ready(Some(control)),
                None if pending.ended => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut Controls) -> Vec<Control> {
        let mut got = Vec::new();
        while let Some(c) = futures_util::FutureExt::now_or_never(rx.recv()).flatten() {
            got.push(c);
        }
        got
    }

    #[tokio::test]
    async fn a_flood_keeps_what_it_means_in_a_few_words() {
        let (tx, mut rx) = controls();
        for i in 0..100_000u32 {
            let cols = (i % 300) as u16 + 1; // the last: 100
            tx.send(Control::Resize(PtySize { cols, rows: 24 }));
            tx.send(Control::Window(3));
            tx.send(Control::Signal(if i % 2 == 0 {
                Signal::SIGINT
            } else {
                Signal::SIGHUP
            }));
        }
        tx.send(Control::Close);
        tx.send(Control::Signal(Signal::SIGTERM));
        let got = drain(&mut rx);
        let mut want = vec![
            Control::Window(300_000),
            Control::Resize(PtySize {
                cols: 100,
                rows: 24,
            }),
        ];
        // The first ones as they came, repeats included; then only a kind
        // not already waiting.
        for _ in 0..SIGNALS_KEPT / 2 {
            want.push(Control::Signal(Signal::SIGINT));
            want.push(Control::Signal(Signal::SIGHUP));
        }
        want.push(Control::Signal(Signal::SIGTERM));
        want.push(Control::Close);
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        // Taken: nothing waits, and the channel is still open.
        assert!(futures_util::FutureExt::now_or_never(rx.recv()).is_none());
    }

    /// A writer's close, then its page's detach, ends a shared shell; a
    /// detach, then a close, leaves it (the close then is a watcher's).
    #[test]
    fn close_and_detach_keep_their_order() {
        for ends in [
            [Control::Close, Control::Detach],
            [Control::Detach, Control::Close],
        ] {
            let (tx, mut rx) = controls();
            let want = format!("{ends:?}");
            for end in ends {
                tx.send(end);
                tx.send(Control::Close);
                tx.send(Control::Detach);
            }
            assert_eq!(format!("{:?}", drain(&mut rx)), want);
        }
    }

    #[tokio::test]
    async fn what_came_before_the_connection_let_go_is_taken_first() {
        let (tx, mut rx) = controls();
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            let third = rx.recv().await;
            (first, second, third)
        });
        tokio::task::yield_now().await;
        tx.send(Control::Detach);
        tx.send(Control::Window(5));
        drop(tx);
        let (first, second, third) = waiting.await.unwrap();
        assert_eq!(
            format!("{:?}", [first, second, third]),
            format!(
                "{:?}",
                [Some(Control::Window(5)), Some(Control::Detach), None]
            )
        );
    }
}
