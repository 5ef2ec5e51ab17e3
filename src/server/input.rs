//! One console command's input on its way to the agent link.
//!
//! A key typed while nothing else waits goes straight onto the link
//! (`Controller::try_stdin`). Input that cannot (the agent's credit spent,
//! the link's queue full, input already waiting) is queued here, in order,
//! for a writer task that exists only while some waits: an idle shell
//! holds no task and no channel for its input (with them, an idle shell
//! cost the server about 2.5 KiB more). A command that does not read must
//! never stall the console's loop, so the console only ever queues.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::link::Controller;

/// Input messages queued for one command beyond its agent credit: 64,
/// and at most [`QUEUE_BYTES`] of them.
const QUEUE: usize = 64;
/// Bytes of input queued for one command beyond its agent credit: 1 MiB.
const QUEUE_BYTES: usize = 1024 * 1024;

/// One command's input: see the module's doc.
pub(crate) struct Input {
    control: Controller,
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Bytes queued or being written: a piece holds its room until it is
    /// on the link, so that nothing sent straight can pass it.
    room: Arc<Semaphore>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<(Bytes, bool, OwnedSemaphorePermit)>,
    /// The writer, while there is one.
    writer: Option<JoinHandle<()>>,
    /// The channel has ended: input is refused from now on.
    ended: bool,
}

impl Input {
    pub(crate) fn new(control: Controller) -> Input {
        Input {
            control,
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                room: Arc::new(Semaphore::new(QUEUE_BYTES)),
            }),
        }
    }

    /// Sends `data` (with `eof`, the command's input ends after it) or
    /// queues it; false when it is refused: the queue is full, or the
    /// command has ended.
    pub(crate) fn push(&self, data: Bytes, eof: bool) -> bool {
        // Nothing queued or being written: straight to the link, in order,
        // one task hop fewer for a keystroke.
        let data = if !eof && self.shared.room.available_permits() == QUEUE_BYTES {
            match self.control.try_stdin(data, false) {
                Ok(()) => return true,
                Err(back) => back,
            }
        } else {
            data
        };
        let cost = u32::try_from(data.len().max(1)).unwrap_or(u32::MAX);
        let Ok(room) = self.shared.room.clone().try_acquire_many_owned(cost) else {
            return false;
        };
        let mut queue = lock(&self.shared);
        if queue.ended || queue.waiting.len() >= QUEUE {
            return false;
        }
        queue.waiting.push_back((data, eof, room));
        if queue.writer.is_none() {
            let writer = write(self.control.clone(), self.shared.clone());
            queue.writer = Some(tokio::spawn(writer));
        }
        true
    }

    /// At the console's end: lets what is queued reach the link, for at
    /// most `bound`, then gives the rest up.
    pub(crate) async fn drain(self, bound: Duration) {
        let writer = lock(&self.shared).writer.take();
        if let Some(mut writer) = writer
            && tokio::time::timeout(bound, &mut writer).await.is_err()
        {
            writer.abort();
        }
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Queue> {
    shared.queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes the queue out, in order, each piece once the agent's credit
/// allows; ends when it is empty (the next piece queued starts another).
async fn write(control: Controller, shared: Arc<Shared>) {
    loop {
        let next = {
            let mut queue = lock(&shared);
            let next = queue.waiting.pop_front();
            if next.is_none() {
                // Under the lock that `push` takes: a piece queued from now
                // on finds no writer and starts one.
                queue.writer = None;
            }
            next
        };
        let Some((data, eof, room)) = next else {
            return;
        };
        let sent = control.stdin(data, eof).await;
        // Given back only once the piece is on the link (see `room`).
        drop(room);
        if sent.is_err() {
            let mut queue = lock(&shared);
            queue.ended = true;
            queue.waiting.clear();
            queue.writer = None;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Frame, Message};
    use tokio::sync::mpsc;

    /// The stdin frames that reached the link, as (data, eof).
    fn sent(rx: &mut mpsc::Receiver<Frame>) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        while let Ok(f) = rx.try_recv() {
            if let Message::Stdin { eof } = f.msg {
                out.push((String::from_utf8_lossy(&f.payload).into_owned(), eof));
            }
        }
        out
    }

    /// An input for a channel with `credit` bytes of stdin credit, its
    /// controller (to return credit) and the link's frames.
    fn with_credit(credit: usize) -> (Input, Controller, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(64);
        let control = Controller::for_tests(1, tx, credit);
        (Input::new(control.clone()), control, rx)
    }

    fn writing(input: &Input) -> bool {
        lock(&input.shared).writer.is_some()
    }

    async fn until(what: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while !what() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("in time");
    }

    #[tokio::test]
    async fn keys_go_straight_and_no_writer_task_waits_for_them() {
        let (input, _, mut rx) = with_credit(1024);
        for key in ["a", "b", "c"] {
            assert!(input.push(Bytes::from(key), false));
            assert!(!writing(&input), "a task was started for a key");
        }
        let keys = sent(&mut rx);
        let want: Vec<(String, bool)> = ["a", "b", "c"].map(|k| (k.into(), false)).into();
        assert_eq!(keys, want);
    }

    #[tokio::test]
    async fn input_beyond_the_credit_waits_in_order_and_its_writer_then_ends() {
        let (input, control, mut rx) = with_credit(4);
        // Over the credit: queued, and a writer started for it.
        assert!(input.push(Bytes::from("paste!"), false));
        assert!(writing(&input));
        // A key behind it waits behind it, though it alone would fit.
        assert!(input.push(Bytes::from("k"), false));
        assert!(input.push(Bytes::new(), true));
        tokio::task::yield_now().await;
        assert!(sent(&mut rx).is_empty(), "sent beyond the credit");
        control.credit_for_tests(100);
        until(|| !writing(&input)).await;
        let want = vec![
            ("paste!".to_owned(), false),
            ("k".to_owned(), false),
            (String::new(), true),
        ];
        assert_eq!(sent(&mut rx), want);
        // Nothing waits any more: the next key goes straight again.
        assert!(input.push(Bytes::from("z"), false));
        assert!(!writing(&input));
        assert_eq!(sent(&mut rx), vec![("z".to_owned(), false)]);
    }

    #[tokio::test]
    async fn a_key_never_overtakes_input_being_written() {
        let (input, control, mut rx) = with_credit(4);
        assert!(input.push(Bytes::from("paste!"), false));
        // Until the writer has taken the paste and waits for credit: the
        // queue is empty, but the paste is not on the link.
        until(|| lock(&input.shared).waiting.is_empty()).await;
        assert!(input.push(Bytes::from("k"), false));
        assert!(sent(&mut rx).is_empty(), "the key went past the paste");
        control.credit_for_tests(100);
        until(|| !writing(&input)).await;
        let want = vec![("paste!".to_owned(), false), ("k".to_owned(), false)];
        assert_eq!(sent(&mut rx), want);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_an_ended_command_takes_nothing() {
        let (input, _, _rx) = with_credit(0);
        assert!(input.push(Bytes::from("x"), false));
        // The writer holds the first piece, waiting for credit.
        until(|| lock(&input.shared).waiting.is_empty()).await;
        for _ in 0..QUEUE {
            assert!(input.push(Bytes::from("x"), false));
        }
        assert!(
            !input.push(Bytes::from("x"), false),
            "past the queue's bound"
        );
        // The bytes are bounded too, whatever the count.
        let (input, _, _rx) = with_credit(0);
        let half = Bytes::from(vec![b'x'; QUEUE_BYTES / 2]);
        assert!(input.push(half.clone(), false));
        assert!(input.push(half.clone(), false));
        assert!(!input.push(Bytes::from("x"), false), "past 1 MiB");

        // The link has gone: what was queued is given up, with its writer,
        // and input is refused from then on.
        let (tx, rx) = mpsc::channel(64);
        drop(rx);
        let input = Input::new(Controller::for_tests(1, tx, 1024));
        assert!(
            input.push(Bytes::from("a"), false),
            "queued, not yet known lost"
        );
        until(|| !writing(&input)).await;
        assert!(!input.push(Bytes::from("b"), false));
        assert!(!writing(&input));
    }

    #[tokio::test]
    async fn the_drain_passes_queued_input_on_and_gives_up_at_its_bound() {
        // Credit comes while the console drains: the input reaches the link.
        let (input, control, mut rx) = with_credit(0);
        assert!(input.push(Bytes::from("last words"), true));
        tokio::spawn(async move { control.credit_for_tests(100) });
        input.drain(Duration::from_secs(30)).await;
        assert_eq!(sent(&mut rx), vec![("last words".to_owned(), true)]);

        // No credit ever: the drain ends at its bound, the writer with it.
        let (input, _, mut rx) = with_credit(0);
        assert!(input.push(Bytes::from("never"), false));
        let shared = input.shared.clone();
        input.drain(Duration::from_millis(50)).await;
        assert!(sent(&mut rx).is_empty());
        // The aborted writer's future is dropped: only this test holds it.
        until(|| Arc::strong_count(&shared) == 1).await;
    }
}
