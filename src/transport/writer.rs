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
pub(crate) async fn write_queued<S>(
    queue: &mut mpsc::Receiver<Frame>,
    sink: &mut S,
) -> Result<(), FrameError>
where
    S: Sink<Frame, Error = FrameError> + Unpin,
{
    while let Some(frame) = queue.recv().await {
        feed(sink, frame).await?;
        while let Ok(frame) = queue.try_recv() {
            feed(sink, frame).await?;
        }
        sink.flush().await?;
    }
    Ok(())
}

/// Queues one frame for writing. A frame that cannot be encoded is the
/// fault of its sender alone: it is dropped (and logged), and the
/// connection, which every other channel shares, stays up. Only a failed
/// write ends the loop. (Senders check what can fail before queueing, so
/// this is the last line of defence, not the way errors are reported.)
async fn feed<S>(sink: &mut S, frame: Frame) -> Result<(), FrameError>
where
    S: Sink<Frame, Error = FrameError> + Unpin,
{
    let (ch, kind) = (frame.ch, frame.msg.type_name());
    match sink.feed(frame).await {
        Ok(()) => Ok(()),
        Err(FrameError::Io(e)) => Err(FrameError::Io(e)),
        Err(e) => {
            tracing::error!(ch, kind, error = %e, "a frame could not be encoded and was dropped");
            Ok(())
        }
    }
}

/// Ends the connection's writing half cleanly: over TLS, the peer gets a
/// `close_notify` and so can tell the end from a cut. Bounded, since a
/// peer that stopped reading could hold the last bytes forever.
pub(crate) async fn close<S>(sink: &mut S)
where
    S: Sink<Frame, Error = FrameError> + Unpin,
{
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sink.close()).await;
}
