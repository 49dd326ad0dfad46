//! The bounded queue of frames owed to one client, and the handle through
//! which the rest of the broker reaches that client's session.
//!
//! Producers (the hub's fan-out, the session's own replies) never wait: a
//! push that would take the queue over `max_bytes` or `max_messages` fails,
//! the queue is dropped and the session closes with 4008 (slow consumer). The
//! same handle closes a session from outside (shutdown 4010, takeover 4000).
//! An empty queue holds no heap memory beyond the handle itself.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tether_protocol::{CloseCode, Offset};

/// One encoded message queued for a client.
#[derive(Debug, Clone)]
pub struct Frame {
    pub bytes: Bytes,
    /// When the publication entered the broker, for the publish→deliver
    /// latency; `None` for replies and replays.
    pub published_at: Option<Instant>,
    /// The subscription and offset a `message` frame carries, so that the
    /// session knows what it has written; `None` for other frames.
    pub delivery: Option<Delivery>,
}

impl Frame {
    /// A frame that is not a delivery (replies, pings).
    pub fn reply(bytes: Bytes) -> Frame {
        Frame {
            bytes,
            published_at: None,
            delivery: None,
        }
    }
}

/// What a `message` frame delivers: the session's subscription number and
/// the offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub sub: u32,
    pub offset: Offset,
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue was full: the session is now closing with 4008.
    #[error("outbox full: client closed as slow consumer")]
    Full,
    /// The session is already closing.
    #[error("session closed")]
    Closed,
}

/// What [`Outbox::poll_drain`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// Frames were moved into the caller's buffer.
    Frames,
    /// The session must close with this code.
    Close(CloseCode),
}

#[derive(Debug)]
struct Inner {
    queue: VecDeque<Frame>,
    bytes: usize,
    closed: Option<CloseCode>,
}

/// A session's outbox; cheap to share as `Arc<Outbox>`.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    waker: AtomicWaker,
    max_bytes: usize,
    max_messages: usize,
}

impl Outbox {
    pub fn new(max_bytes: usize, max_messages: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                bytes: 0,
                closed: None,
            }),
            waker: AtomicWaker::new(),
            max_bytes,
            max_messages,
        })
    }

    /// Queues a frame without waiting.
    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        {
            let mut inner = self.inner.lock();
            if inner.closed.is_some() {
                return Err(PushError::Closed);
            }
            let bytes = inner.bytes + frame.bytes.len();
            if bytes > self.max_bytes || inner.queue.len() >= self.max_messages {
                inner.closed = Some(CloseCode::SlowConsumer);
                inner.queue = VecDeque::new();
                inner.bytes = 0;
                drop(inner);
                self.waker.wake();
                return Err(PushError::Full);
            }
            inner.bytes = bytes;
            inner.queue.push_back(frame);
        }
        self.waker.wake();
        Ok(())
    }

    /// Queues a frame ahead of everything already queued: the `connected`
    /// of a resume, which must precede the replays queued while restoring.
    pub fn push_front(&self, frame: Frame) -> Result<(), PushError> {
        {
            let mut inner = self.inner.lock();
            if inner.closed.is_some() {
                return Err(PushError::Closed);
            }
            inner.bytes += frame.bytes.len();
            inner.queue.push_front(frame);
        }
        self.waker.wake();
        Ok(())
    }

    /// Asks the session to close with `code`; the first close wins. Frames
    /// already queued are still written before the close.
    pub fn close(&self, code: CloseCode) {
        {
            let mut inner = self.inner.lock();
            if inner.closed.is_none() {
                inner.closed = Some(code);
            }
        }
        self.waker.wake();
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed.is_some()
    }

    /// A close that must happen now, before what is queued is written: the
    /// slow-consumer close, whose queue was dropped.
    pub fn urgent_close(&self, cx: &mut Context<'_>) -> Option<CloseCode> {
        self.waker.register(cx.waker());
        match self.inner.lock().closed {
            Some(CloseCode::SlowConsumer) => Some(CloseCode::SlowConsumer),
            _ => None,
        }
    }

    /// Moves up to `max` queued frames into `out`, or reports the close.
    pub fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Frame>,
        max: usize,
    ) -> Poll<Drained> {
        if let Some(d) = self.try_drain(out, max) {
            return Poll::Ready(d);
        }
        self.waker.register(cx.waker());
        match self.try_drain(out, max) {
            Some(d) => Poll::Ready(d),
            None => Poll::Pending,
        }
    }

    fn try_drain(&self, out: &mut VecDeque<Frame>, max: usize) -> Option<Drained> {
        let mut inner = self.inner.lock();
        if !inner.queue.is_empty() {
            let n = inner.queue.len().min(max);
            let mut moved = 0;
            for f in inner.queue.drain(..n) {
                moved += f.bytes.len();
                out.push_back(f);
            }
            inner.bytes -= moved;
            // A burst grew the queue; give the memory back once it is empty.
            if inner.queue.is_empty() && inner.queue.capacity() > 64 {
                inner.queue = VecDeque::new();
            }
            return Some(Drained::Frames);
        }
        inner.closed.map(Drained::Close)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker_ref;

    fn frame(n: usize) -> Frame {
        Frame::reply(Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn over_the_byte_limit_the_session_closes_as_slow() {
        let ob = Outbox::new(100, 1000);
        assert_eq!(ob.push(frame(60)), Ok(()));
        assert_eq!(ob.push(frame(60)), Err(PushError::Full));
        assert_eq!(ob.push(frame(1)), Err(PushError::Closed));
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = VecDeque::new();
        // The queued data of a slow consumer is dropped: close comes first.
        assert_eq!(
            ob.poll_drain(&mut cx, &mut out, 16),
            Poll::Ready(Drained::Close(CloseCode::SlowConsumer))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn over_the_count_limit_the_session_closes_as_slow() {
        let ob = Outbox::new(1 << 20, 2);
        assert!(ob.push(frame(1)).is_ok());
        assert!(ob.push(frame(1)).is_ok());
        assert_eq!(ob.push(frame(1)), Err(PushError::Full));
    }

    #[test]
    fn queued_frames_go_out_before_a_requested_close() {
        let ob = Outbox::new(1000, 1000);
        ob.push(frame(10)).expect("room");
        ob.push(frame(10)).expect("room");
        ob.close(CloseCode::ShuttingDown);
        ob.close(CloseCode::Normal); // the first close wins
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = VecDeque::new();
        assert_eq!(
            ob.poll_drain(&mut cx, &mut out, 1),
            Poll::Ready(Drained::Frames)
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            ob.poll_drain(&mut cx, &mut out, 16),
            Poll::Ready(Drained::Frames)
        );
        assert_eq!(out.len(), 2);
        assert_eq!(
            ob.poll_drain(&mut cx, &mut out, 16),
            Poll::Ready(Drained::Close(CloseCode::ShuttingDown))
        );
    }

    #[test]
    fn empty_outbox_is_pending() {
        let ob = Outbox::new(1000, 1000);
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = VecDeque::new();
        assert_eq!(ob.poll_drain(&mut cx, &mut out, 16), Poll::Pending);
    }
}
