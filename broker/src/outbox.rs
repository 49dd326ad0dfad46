//! The bounded queue of frames owed to one client, and the handle through
//! which the rest of the broker reaches that client's session.
//!
//! Producers (the hub's fan-out, the session's own replies) never wait: a
//! push that would take the queue over `max_bytes` or `max_messages` fails,
//! the queue is dropped and the session closes with 4008 (slow consumer). The
//! same handle closes a session from outside (shutdown 4010, takeover 4000).
//! An empty queue holds no heap memory beyond the handle itself.
//!
//! **Write-through.** When the session has written everything it was given
//! and waits (it is *idle*), and its connection can take a frame without
//! waiting ([`DirectWrite`], plain-TCP WebSocket), a push writes the frame to
//! the socket on the producer's thread instead of queueing it and waking the
//! session's task: a fan-out then costs one `writev` per subscriber and no
//! task switch. Order is kept because both paths decide under the outbox's
//! lock: a frame is written through only when nothing is queued and the
//! session is not writing; a socket that would block, or takes part of the
//! frame, turns the rest into an ordinary queued frame and wakes the session.
//! What was written through is logged ([`Outbox::take_written`]) so that the
//! session still knows the last offset each subscription delivered.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
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
    /// `bytes` are already framed for the connection (a WebSocket pong, or
    /// the rest of a frame that was written through in part): the transport
    /// writes them as they are.
    pub raw: bool,
}

impl Frame {
    /// A frame that is not a delivery (replies, pings).
    pub fn reply(bytes: Bytes) -> Frame {
        Frame {
            bytes,
            published_at: None,
            delivery: None,
            raw: false,
        }
    }

    /// A protocol message carrying a publication.
    pub fn message(bytes: Bytes, published_at: Option<Instant>, delivery: Delivery) -> Frame {
        Frame {
            bytes,
            published_at,
            delivery: Some(delivery),
            raw: false,
        }
    }

    /// Bytes already framed for the connection.
    pub fn raw(bytes: Bytes) -> Frame {
        Frame {
            bytes,
            published_at: None,
            delivery: None,
            raw: true,
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

/// The outcome of writing a frame through.
#[derive(Debug)]
pub enum Written {
    /// The whole frame is in the socket.
    All,
    /// Part of it is: this raw frame holds the rest.
    Part(Frame),
    /// The socket would block (or failed: the session finds out when it
    /// writes): nothing was written.
    Nothing,
}

/// A connection that can take a frame without waiting, from any thread.
pub trait DirectWrite: Send + Sync + 'static {
    /// Writes `frame` if the socket takes it now; never waits.
    fn try_write(&self, frame: &Frame) -> Written;
}

/// What is counted for each frame written to a client, whichever path
/// wrote it (the session's task or write-through).
#[derive(Debug, Clone)]
pub struct SentMetrics {
    pub messages_out: Counter,
    pub latency: Histogram,
}

impl SentMetrics {
    /// Counts `frame` as written: one message out and, for a publication,
    /// its publish → write latency.
    pub fn count(&self, frame: &Frame) {
        self.messages_out.inc();
        if let Some(at) = frame.published_at {
            self.latency.observe(at.elapsed().as_secs_f64());
        }
    }
}

/// A write-through path and what it counts.
pub struct Direct {
    pub writer: Box<dyn DirectWrite>,
    pub metrics: SentMetrics,
}

impl fmt::Debug for Direct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Direct").finish_non_exhaustive()
    }
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
    /// The close is to happen before anything queued is written.
    urgent: bool,
    /// The delay the close advises the client to wait before reconnecting.
    retry_after_ms: Option<u64>,
    /// The session has written all it took and waits for more: a push may
    /// write through.
    idle: bool,
    direct: Option<Direct>,
    /// Deliveries written through that the session has not seen yet: the
    /// highest offset per subscription (at most one entry per subscription).
    written: Vec<Delivery>,
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
                urgent: false,
                retry_after_ms: None,
                idle: false,
                direct: None,
                written: Vec::new(),
            }),
            waker: AtomicWaker::new(),
            max_bytes,
            max_messages,
        })
    }

    /// Lets pushes write through to the connection while the session idles.
    pub fn attach_direct(&self, direct: Direct) {
        self.inner.lock().direct = Some(direct);
    }

    /// Stops writing through (the session is about to write its last frames
    /// itself, or is gone); drops the path's hold on the connection.
    pub fn detach_direct(&self) {
        let direct = {
            let mut inner = self.inner.lock();
            inner.idle = false;
            inner.direct.take()
        };
        drop(direct);
    }

    /// No write-through until the session has written what it queues next
    /// (it is about to put a frame in front of others, see `push_front`).
    pub fn hold(&self) {
        self.inner.lock().idle = false;
    }

    /// What can still be queued before the slow-consumer limit: bytes and
    /// frames (nothing once closed).
    pub fn room(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        if inner.closed.is_some() {
            return (0, 0);
        }
        (
            self.max_bytes.saturating_sub(inner.bytes),
            self.max_messages.saturating_sub(inner.queue.len()),
        )
    }

    /// Queues a frame without waiting, or writes it through when the session
    /// is idle and the connection takes it now.
    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        {
            let mut inner = self.inner.lock();
            if inner.closed.is_some() {
                return Err(PushError::Closed);
            }
            let mut frame = frame;
            // The rest of a frame written in part must follow it, whatever
            // the limits: the queue was empty.
            let mut must_queue = false;
            if inner.idle
                && let Some(direct) = &inner.direct
            {
                match direct.writer.try_write(&frame) {
                    Written::All => {
                        direct.metrics.count(&frame);
                        if let Some(d) = frame.delivery {
                            inner.note_written(d);
                        }
                        return Ok(());
                    }
                    Written::Part(rest) => {
                        frame = rest;
                        must_queue = true;
                    }
                    Written::Nothing => {}
                }
            }
            // Queued: the session writes it, and what follows it.
            inner.idle = false;
            let bytes = inner.bytes + frame.bytes.len();
            if !must_queue && (bytes > self.max_bytes || inner.queue.len() >= self.max_messages) {
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
    /// Call [`Outbox::hold`] before queueing those, or they may be written
    /// through before this one.
    pub fn push_front(&self, frame: Frame) -> Result<(), PushError> {
        {
            let mut inner = self.inner.lock();
            if inner.closed.is_some() {
                return Err(PushError::Closed);
            }
            inner.idle = false;
            inner.bytes += frame.bytes.len();
            inner.queue.push_front(frame);
        }
        self.waker.wake();
        Ok(())
    }

    /// Hands the deliveries written through since the last call to `f`.
    pub fn take_written(&self, mut f: impl FnMut(Delivery)) {
        let written = {
            let mut inner = self.inner.lock();
            if inner.written.is_empty() {
                return;
            }
            std::mem::take(&mut inner.written)
        };
        for d in written {
            f(d);
        }
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

    /// [`Outbox::close`], advising the client to wait `retry_after_ms`
    /// before it reconnects (`disconnect.retry_after_ms`).
    pub fn close_after(&self, code: CloseCode, retry_after_ms: u64) {
        {
            let mut inner = self.inner.lock();
            if inner.closed.is_none() {
                inner.closed = Some(code);
                inner.retry_after_ms = Some(retry_after_ms);
            }
        }
        self.waker.wake();
    }

    /// The delay the close advised, if any.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.inner.lock().retry_after_ms
    }

    /// Closes the session as a slow consumer (4008) at once, dropping what
    /// is queued: what a full queue does, for a caller that found the
    /// client too far behind elsewhere (a subscription's join buffer).
    pub fn close_slow(&self) {
        {
            let mut inner = self.inner.lock();
            inner.closed = Some(CloseCode::SlowConsumer);
            inner.queue = VecDeque::new();
            inner.bytes = 0;
        }
        self.waker.wake();
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed.is_some()
    }

    /// Closes the session with `code` at once, dropping what is queued and
    /// overriding a close asked before: a takeover, whose new connection
    /// must not wait for this one's stalled socket. Nothing is lost: only
    /// frames written count as delivered, and the session's record (what a
    /// resume replays) is written from those.
    pub fn close_now(&self, code: CloseCode) {
        {
            let mut inner = self.inner.lock();
            inner.closed = Some(code);
            inner.urgent = true;
            inner.queue = VecDeque::new();
            inner.bytes = 0;
        }
        self.waker.wake();
    }

    /// A close that must happen now, before what is queued is written: the
    /// slow-consumer close and [`Outbox::close_now`], whose queues were
    /// dropped. Looked at first, before any write.
    pub fn urgent_close(&self, cx: &mut Context<'_>) -> Option<CloseCode> {
        self.waker.register(cx.waker());
        let inner = self.inner.lock();
        match inner.closed {
            Some(CloseCode::SlowConsumer) => Some(CloseCode::SlowConsumer),
            Some(code) if inner.urgent => Some(code),
            _ => None,
        }
    }

    /// Whether the close is urgent (nothing more is flushed before it).
    pub fn is_urgent(&self) -> bool {
        let inner = self.inner.lock();
        inner.urgent || inner.closed == Some(CloseCode::SlowConsumer)
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
            inner.idle = false;
            return Some(Drained::Frames);
        }
        match inner.closed {
            Some(code) => Some(Drained::Close(code)),
            None => {
                // Everything the session took is written: pushes may write
                // through until it takes frames again.
                inner.idle = true;
                None
            }
        }
    }
}

impl Inner {
    fn note_written(&mut self, d: Delivery) {
        match self.written.iter_mut().find(|w| w.sub == d.sub) {
            Some(w) if d.offset > w.offset => w.offset = d.offset,
            Some(_) => {}
            None => self.written.push(d),
        }
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

    /// A connection that takes what `mode` says and records what it took.
    #[derive(Clone, Default)]
    struct FakeConn {
        wire: Arc<Mutex<Vec<u8>>>,
        /// Bytes the socket takes per write; `None`: all of them.
        room: Arc<Mutex<Option<usize>>>,
    }

    impl DirectWrite for FakeConn {
        fn try_write(&self, frame: &Frame) -> Written {
            let room = *self.room.lock();
            let n = room.unwrap_or(usize::MAX).min(frame.bytes.len());
            self.wire.lock().extend_from_slice(&frame.bytes[..n]);
            if n == frame.bytes.len() {
                Written::All
            } else if n == 0 {
                Written::Nothing
            } else {
                Written::Part(Frame {
                    bytes: frame.bytes.slice(n..),
                    raw: true,
                    ..frame.clone()
                })
            }
        }
    }

    fn message(sub: u32, offset: u64, text: &str) -> Frame {
        Frame::message(
            Bytes::copy_from_slice(text.as_bytes()),
            Some(Instant::now()),
            Delivery {
                sub,
                offset: Offset(offset),
            },
        )
    }

    fn with_direct(conn: &FakeConn) -> Arc<Outbox> {
        let ob = Outbox::new(1 << 20, 1000);
        ob.attach_direct(Direct {
            writer: Box::new(conn.clone()),
            metrics: SentMetrics {
                messages_out: Counter::default(),
                latency: Histogram::new([0.1]),
            },
        });
        ob
    }

    fn drain(ob: &Outbox) -> (Poll<Drained>, Vec<Bytes>) {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = VecDeque::new();
        let p = ob.poll_drain(&mut cx, &mut out, 256);
        (p, out.into_iter().map(|f| f.bytes).collect())
    }

    fn wire(conn: &FakeConn) -> String {
        String::from_utf8(conn.wire.lock().clone()).expect("utf-8")
    }

    #[test]
    fn an_idle_session_gets_frames_written_through_and_learns_the_offsets() {
        let conn = FakeConn::default();
        let ob = with_direct(&conn);
        // Not idle until the session has found its queue empty.
        ob.push(message(1, 1, "a")).expect("room");
        assert_eq!(wire(&conn), "");
        assert_eq!(drain(&ob).1, vec![Bytes::from_static(b"a")]);
        assert_eq!(drain(&ob).0, Poll::Pending);
        // Idle: straight to the connection, nothing queued.
        ob.push(message(1, 2, "b")).expect("room");
        ob.push(message(2, 7, "c")).expect("room");
        ob.push(message(1, 3, "d")).expect("room");
        assert_eq!(wire(&conn), "bcd");
        assert_eq!(drain(&ob).0, Poll::Pending);
        let mut seen = Vec::new();
        ob.take_written(|d| seen.push((d.sub, d.offset.get())));
        seen.sort_unstable();
        assert_eq!(seen, vec![(1, 3), (2, 7)]);
        ob.take_written(|_| panic!("taken already"));
    }

    #[test]
    fn a_socket_that_blocks_turns_write_through_into_queueing_in_order() {
        let conn = FakeConn::default();
        let ob = with_direct(&conn);
        assert_eq!(drain(&ob).0, Poll::Pending);
        *conn.room.lock() = Some(2);
        ob.push(message(1, 1, "abcd")).expect("room");
        // The socket took "ab"; the rest is queued first, as raw bytes.
        *conn.room.lock() = None;
        ob.push(message(1, 2, "ef")).expect("room");
        assert_eq!(wire(&conn), "ab");
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut out = VecDeque::new();
        assert_eq!(
            ob.poll_drain(&mut cx, &mut out, 256),
            Poll::Ready(Drained::Frames)
        );
        let rest = &out[0];
        assert!(rest.raw && rest.bytes == "cd");
        assert_eq!(rest.delivery.map(|d| d.offset.get()), Some(1));
        assert!(!out[1].raw && out[1].bytes == "ef");
        // Until the session has written those and idles again, pushes queue.
        ob.push(message(1, 3, "g")).expect("room");
        assert_eq!(wire(&conn), "ab");
        assert_eq!(drain(&ob).1, vec![Bytes::from_static(b"g")]);
        assert_eq!(drain(&ob).0, Poll::Pending);
        ob.push(message(1, 4, "h")).expect("room");
        assert_eq!(wire(&conn), "abh");
    }

    #[test]
    fn held_detached_or_closed_outboxes_do_not_write_through() {
        let conn = FakeConn::default();
        let ob = with_direct(&conn);
        assert_eq!(drain(&ob).0, Poll::Pending);
        ob.hold();
        ob.push(message(1, 1, "a")).expect("room");
        ob.push_front(Frame::reply(Bytes::from_static(b"first")))
            .expect("room");
        assert_eq!(wire(&conn), "");
        assert_eq!(
            drain(&ob).1,
            vec![Bytes::from_static(b"first"), Bytes::from_static(b"a")]
        );
        assert_eq!(drain(&ob).0, Poll::Pending);
        ob.detach_direct();
        ob.push(message(1, 2, "b")).expect("room");
        assert_eq!(wire(&conn), "");
        assert_eq!(drain(&ob).1, vec![Bytes::from_static(b"b")]);

        let ob = with_direct(&conn);
        assert_eq!(drain(&ob).0, Poll::Pending);
        ob.close(CloseCode::ShuttingDown);
        assert_eq!(ob.push(message(1, 1, "c")), Err(PushError::Closed));
        assert_eq!(wire(&conn), "");
    }
}
