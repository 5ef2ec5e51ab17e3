//! Moving frames from a bounded queue onto a framed socket.
//!
//! The agent's connections and the server's agent links both hand frames
//! to one writer task per socket through a bounded queue; this is that
//! task's loop, so both ends batch the same way.

use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;

use crate::protocol::{Frame, FrameError};

/// Writes every frame from `queue` to `sink` until the queue is closed and
/// empty, or a write fails. Frames already queued are written together and
/// flushed once, so a burst of small frames costs one system call.
pub async fn write_queued<S>(
    queue: &mut mpsc::Receiver<Frame>,
    sink: &mut S,
) -> Result<(), FrameError>
where
    S: Sink<Frame, Error = FrameError> + Unpin,
{
    while let Some(frame) = queue.recv().await {
        sink.feed(frame).await?;
        while let Ok(frame) = queue.try_recv() {
            sink.feed(frame).await?;
        }
        sink.flush().await?;
    }
    Ok(())
}
