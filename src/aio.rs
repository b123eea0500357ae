//! The async face (cargo feature `tokio`): a client whose reactor runs on
//! its own thread (the threaded mode), awaited from tokio tasks.
//!
//! [`Client::into_async`] gives an [`AsyncSender`] (cloneable, one per
//! task), an [`AsyncReceiver`] (a [`futures_core::Stream`] of messages)
//! and an [`AsyncHandle`] (stats, peers, [`AsyncHandle::shutdown`]).
//!
//! * **No busy polling, no thread per task.** The receiver waits on the
//!   receive ring's eventfd, registered with tokio (`AsyncFd`). A sender
//!   finding the send queue full registers its task's waker; the reactor
//!   wakes the waiting tasks after it takes commands off the queue.
//! * **Backpressure.** The send queue is bounded, in frames and in bytes
//!   ([`ThreadedOptions::send_queue`], [`ThreadedOptions::send_queue_bytes`]);
//!   while a frame waits for room in a
//!   peer's outbox the reactor takes no further commands, so the queue
//!   fills and [`AsyncSender::send`] stays pending. Memory is bounded by
//!   the queue, the outboxes ([`crate::Options::outbox_limit`]) and the
//!   socket buffers.
//! * **Errors** carry the blocking API's texts. The first message to a
//!   peer waits for the connection verdict; a failure of a later message
//!   (its connection closed before it was written) is returned by the
//!   next call for that peer as [`Error::DeferredSend`].
//!
//! # Cancellation safety
//!
//! As tokio documents it, per method:
//! * [`AsyncSender::send`] is cancel safe: the message is handed over in
//!   one step, as the future completes. A future dropped before it
//!   returned `Ready` sent nothing; one that returned `Ok(())` handed the
//!   whole frame over. Never half a frame, never a duplicate. One dropped
//!   while awaiting a new peer's connection verdict leaves that request
//!   to the next send to the peer, so a send raced against other futures
//!   in a loop still gets through.
//! * [`AsyncReceiver::recv`], [`AsyncReceiver::receive`],
//!   [`AsyncReceiver::recv_many`] and the `Stream` are cancel safe: a
//!   message leaves the ring only in the poll that returns it.
//! * [`AsyncSender::flush`], [`AsyncHandle::stats`] are cancel safe in
//!   effect (dropping them loses only their answer).
//! * [`AsyncSender::broadcast`] is not: once it has been polled past the
//!   queue, the broadcast happens even if the future is dropped, and its
//!   per-peer results are lost.
//! * [`AsyncHandle::shutdown`] is not: the reactor ends either way.
//!
//! Dropping the runtime while traffic flows loses nothing acknowledged:
//! the reactor thread is not a tokio task. Dropping the [`AsyncHandle`]
//! (with the runtime or alone) ends the reactor as
//! [`ReactorHandle::shutdown`] does, writing out what was handed over
//! first; that drop blocks its thread until the reactor has ended, so
//! prefer [`AsyncHandle::shutdown`] inside a task.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::client::{BroadcastResult, Client};
use crate::error::{Error, Result};
use crate::message::IdSeq;
use crate::message::Message;
use crate::proto::{Appended, Outbox, Received, Stats};
use crate::serializer::Serializer;
use crate::threaded::{Ack, Cmd, ReactorHandle, Receiver, Reply, Sender, Shared, ThreadedOptions};
use crate::wire::BufferPool;

impl Client {
    /// Moves this client's reactor onto its own thread and returns the
    /// async face (default queue sizes). Call it inside a tokio runtime
    /// with I/O enabled, as tokio's own I/O types require.
    pub fn into_async(self) -> Result<(AsyncSender, AsyncReceiver, AsyncHandle)> {
        self.into_async_with(ThreadedOptions::default())
    }

    /// [`Client::into_async`] with the given queue sizes.
    pub fn into_async_with(
        self,
        opts: ThreadedOptions,
    ) -> Result<(AsyncSender, AsyncReceiver, AsyncHandle)> {
        if let Err(e) = tokio::runtime::Handle::try_current() {
            return Err(Error::io(
                "The async face needs a tokio runtime",
                std::io::Error::other(e),
            ));
        }
        let (tx, rx, handle) = self.into_threaded_with(opts)?;
        let shared = rx.shared().clone();
        // SAFETY: the eventfd belongs to `Shared`, which `ReadyFd` keeps
        // alive inside the `AsyncFd`: it stays open, and the same
        // descriptor, for the registration's whole life.
        let fd = unsafe {
            AsyncFd::register_with_interest(ReadyFd(shared.clone()), tokio::io::Interest::READABLE)
        }
        .map_err(|e| {
            Error::io(
                "Cannot register the receive ring with tokio",
                e.into_parts().1,
            )
        })?;
        Ok((
            AsyncSender::new(tx),
            AsyncReceiver { inner: rx, fd },
            AsyncHandle { handle, shared },
        ))
    }
}

// ----- sending ---------------------------------------------------------------

/// Hands `slot`'s command over, waiting for room in the queue: `Ready`
/// once handed over (or refused), the command kept in `slot` while
/// pending.
fn poll_push(shared: &Shared, slot: &mut Option<Cmd>, cx: &mut Context<'_>) -> Poll<Result<()>> {
    let Some(cmd) = slot.take() else {
        return Poll::Ready(Ok(()));
    };
    match shared.hand_over(cmd, Some(cx.waker())) {
        Ok(Ok(())) => Poll::Ready(Ok(())),
        Ok(Err(back)) => {
            *slot = Some(back);
            Poll::Pending
        }
        Err(e) => Poll::Ready(Err(e)),
    }
}

/// A command and the answer awaited for it.
struct Request<T> {
    cmd: Option<Cmd>,
    ack: Option<Arc<Ack<Result<T>>>>,
}

impl<T> Request<T> {
    fn new(make: impl FnOnce(Reply<T>) -> Cmd) -> Self {
        let (reply, ack) = Reply::pair();
        Request {
            cmd: Some(make(reply)),
            ack: Some(ack),
        }
    }

    fn poll(&mut self, shared: &Shared, cx: &mut Context<'_>) -> Poll<Result<T>> {
        ready!(poll_push(shared, &mut self.cmd, cx))?;
        let Some(ack) = &self.ack else {
            return Poll::Ready(Err(Error::ReactorPanicked));
        };
        let r = ready!(ack.poll(cx));
        self.ack = None;
        Poll::Ready(r)
    }
}

/// The steps of one message: the connection verdict (first message to a
/// peer only), then the frame's hand-over.
struct Steps {
    connect: Option<(Arc<str>, Request<()>)>,
    frame: Option<Cmd>,
}

impl Steps {
    fn poll(&mut self, tx: &mut AsyncSender, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if let Some((peer, req)) = &mut self.connect {
            ready!(req.poll(&tx.shared, cx))?;
            tx.known.insert(peer.clone());
            self.connect = None;
        }
        poll_push(&tx.shared, &mut self.frame, cx)
    }
}

/// The Sink's open batch on Binary routes: messages to one peer, built
/// into a batch frame here (as the inline client's outbox builds them)
/// and handed over whole when full, when the peer changes, or on flush:
/// one hand-over and one receive-ring entry per batch, not per message.
struct SinkBatch {
    peer: Arc<str>,
    outbox: Outbox,
    /// Messages appended since the last seal.
    open: u32,
    ids: IdSeq,
    pool: BufferPool,
}

impl SinkBatch {
    fn new(peer: Arc<str>) -> Self {
        SinkBatch {
            peer,
            outbox: Outbox::default(),
            open: 0,
            ids: IdSeq::new(),
            pool: BufferPool::new(64 * 1024, 2),
        }
    }

    /// A sealed batch frame and its message count, as a command.
    fn command(&self, frame: bytes::Bytes, count: u32) -> Cmd {
        Cmd::Frame {
            peer: self.peer.clone(),
            frame,
            count,
            ack: None,
        }
    }

    /// Appends one message; a batch that appending sealed goes to
    /// `sealed`.
    #[inline]
    fn append<C: Serialize + ?Sized>(
        &mut self,
        content: &C,
        sealed: &mut Option<Cmd>,
    ) -> Result<()> {
        let r = self.outbox.append(0, &mut self.pool, &mut self.ids, |out| {
            serde_json::to_writer(bytes::BufMut::writer(out), content).map_err(Error::from)
        });
        if !matches!(r, Ok(Appended::Queued)) {
            // A batch is sealed before the record that did not fit is
            // written, so even a failed append may have sealed one.
            self.take_sealed(sealed);
        }
        self.open += u32::from(r.is_ok());
        r.map(drop)
    }

    /// Moves a batch the outbox sealed to `sealed`.
    #[cold]
    #[inline(never)]
    fn take_sealed(&mut self, sealed: &mut Option<Cmd>) {
        if let Some(f) = self.outbox.take_sealed() {
            let count = std::mem::replace(&mut self.open, 0);
            *sealed = Some(self.command(f, count));
        }
    }

    /// Seals the open batch, if any.
    fn seal(&mut self) -> Option<Cmd> {
        if self.open == 0 {
            return None;
        }
        self.outbox.seal(&mut self.ids);
        let f = self.outbox.take_sealed()?;
        let count = std::mem::replace(&mut self.open, 0);
        Some(self.command(f, count))
    }
}

/// The sending side of the async face: `Clone + Send`, one per task.
///
/// Also a [`futures_sink::Sink`] of `(peer, content)` pairs, buffering as
/// sinks do: an item is handed over by a later `poll_ready` or by
/// `poll_flush`, and on Binary routes items to one peer are built into
/// batch frames. The sink's flush completes once every item is handed
/// over to the reactor (what a completed [`AsyncSender::send`] means: the
/// reactor writes it out, at shutdown too), as a channel's sink does;
/// [`AsyncSender::flush`] waits until it is written to the kernel. Items
/// not yet flushed when the sink is dropped are not sent.
pub struct AsyncSender {
    shared: Arc<Shared>,
    arena: BytesMut,
    known: HashSet<Arc<str>>,
    /// The sink's message being handed over (unbatched routes and
    /// self-sends).
    staged: Option<Steps>,
    /// The sink's open batch, its connection verdict (the batch's peer
    /// not yet known), and a sealed batch waiting for room.
    batch: Option<SinkBatch>,
    batch_connect: Option<(Arc<str>, Request<()>)>,
    /// The connect request of a dropped `send`, kept for the next send to
    /// that peer.
    connecting: Option<(Arc<str>, Request<()>)>,
    sealed: Option<Cmd>,
}

impl std::fmt::Debug for AsyncSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncSender")
            .field("id", &self.shared.id())
            .finish()
    }
}

impl Clone for AsyncSender {
    fn clone(&self) -> Self {
        AsyncSender::on(self.shared.clone())
    }
}

impl AsyncSender {
    fn new(tx: Sender) -> Self {
        AsyncSender::on(tx.shared().clone())
    }

    fn on(shared: Arc<Shared>) -> Self {
        AsyncSender {
            shared,
            arena: BytesMut::new(),
            known: HashSet::new(),
            staged: None,
            batch: None,
            batch_connect: None,
            connecting: None,
            sealed: None,
        }
    }

    /// A deferred failure for `peer` (its connection must be verified
    /// again).
    fn take_failure(&mut self, peer: &str) -> Result<()> {
        self.shared.take_failure(peer).inspect_err(|_| {
            self.known.remove(peer);
        })
    }

    /// The frame of `content` for `peer` and the steps to hand it over.
    fn steps<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> Result<Steps> {
        self.take_failure(peer)?;
        let frame = self.shared.frame(&mut self.arena, peer, content)?;
        let (peer, connect) = match self.known.get(peer) {
            Some(p) => (p.clone(), None),
            None => match self.connecting.take() {
                // A connect verdict a dropped send was waiting for: awaited
                // again, not asked for again, so sends raced against other
                // futures still reach the peer.
                Some((p, req)) if &*p == peer => (p.clone(), Some((p, req))),
                other => {
                    self.connecting = other;
                    let p: Arc<str> = Arc::from(peer);
                    let q = p.clone();
                    (
                        p.clone(),
                        Some((q, Request::new(|ack| Cmd::Connect { peer: p, ack }))),
                    )
                }
            },
        };
        Ok(Steps {
            connect,
            frame: Some(Cmd::Frame {
                peer,
                frame,
                count: 1,
                ack: None,
            }),
        })
    }

    /// Sends `content` to `peer`: serializes it now, then waits for room
    /// in the send queue (never failing for want of it, never blocking the
    /// runtime) and hands the frame to the reactor. The first message to
    /// a peer also waits for the connection verdict.
    ///
    /// Cancel safe: dropped before it completed, the message was not
    /// sent; `Ok(())` means it was handed over whole. [`AsyncSender::flush`]
    /// waits until it is written.
    pub fn send<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> SendFuture<'_> {
        let steps = self.steps(peer, content);
        SendFuture { tx: self, steps }
    }

    /// Sends without waiting: [`Error::WouldBlock`] when the send queue is
    /// full. The first message to a peer needs the connection verdict, so
    /// it is refused with [`Error::WouldBlock`] too until
    /// [`AsyncSender::send`] has reached the peer once.
    pub fn try_send<T: Serialize + ?Sized>(&mut self, peer: &str, content: &T) -> Result<()> {
        if !self.known.contains(peer) {
            return Err(self.shared.would_block());
        }
        let mut steps = self.steps(peer, content)?;
        let Some(cmd) = steps.frame.take() else {
            return Ok(());
        };
        match self.shared.hand_over(cmd, None)? {
            Ok(()) => Ok(()),
            Err(_) => Err(self.shared.would_block()),
        }
    }

    /// Sends `content` to every live peer; the result per peer (the
    /// blocking [`Client::broadcast`]'s rules). Not cancel safe (see the
    /// module notes).
    pub async fn broadcast<T: Serialize + ?Sized>(
        &mut self,
        content: &T,
    ) -> Result<BTreeMap<String, BroadcastResult>> {
        let content = serde_json::to_string(content)?;
        let mut req = Request::new(|ack| Cmd::Broadcast { content, ack });
        std::future::poll_fn(|cx| req.poll(&self.shared, cx)).await
    }

    /// Waits until every message handed over so far (by any sender of this
    /// client) is written to the kernel; an error if a connection closed
    /// first.
    pub async fn flush(&mut self) -> Result<()> {
        let mut req = Request::new(|ack| Cmd::Flush { ack });
        std::future::poll_fn(|cx| req.poll(&self.shared, cx)).await
    }

    /// Live peers of the route, sorted, without this client.
    pub fn peers(&self) -> Result<Vec<String>> {
        self.shared.route().peers(Some(self.shared.disk()))
    }

    /// This client's id.
    pub fn id(&self) -> &str {
        self.shared.id()
    }
}

/// The future of [`AsyncSender::send`].
#[must_use = "a send does nothing unless awaited"]
pub struct SendFuture<'a> {
    tx: &'a mut AsyncSender,
    steps: Result<Steps>,
}

impl std::fmt::Debug for SendFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendFuture").finish_non_exhaustive()
    }
}

impl Drop for SendFuture<'_> {
    fn drop(&mut self) {
        // Dropped while waiting for the connect verdict: the request stays
        // with the sender (nothing of the message was handed over).
        if let Ok(steps) = &mut self.steps
            && let Some(c) = steps.connect.take()
        {
            self.tx.connecting = Some(c);
        }
    }
}

impl Future for SendFuture<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        match &mut this.steps {
            Ok(steps) => {
                // Within the task's budget, as tokio's own channels: a
                // task sending in a loop that never waits still yields.
                let coop = ready!(tokio::task::coop::poll_proceed(cx));
                let r = steps.poll(this.tx, cx);
                if r.is_ready() {
                    coop.made_progress();
                }
                r
            }
            Err(_) => {
                let e = std::mem::replace(&mut this.steps, Err(Error::ReactorPanicked));
                Poll::Ready(e.map(drop))
            }
        }
    }
}

impl AsyncSender {
    fn poll_staged(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(mut steps) = self.staged.take() else {
            return Poll::Ready(Ok(()));
        };
        match steps.poll(self, cx) {
            Poll::Pending => {
                self.staged = Some(steps);
                Poll::Pending
            }
            done => done,
        }
    }

    /// The sink's hand-overs: the open batch's connection verdict, a
    /// sealed batch, an unbatched message.
    fn poll_sink_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if let Some((peer, req)) = &mut self.batch_connect {
            let verdict = ready!(req.poll(&self.shared, cx));
            let peer = peer.clone();
            self.batch_connect = None;
            if let Err(e) = verdict {
                // The batch's messages cannot go; the sink reports it.
                self.batch = None;
                self.sealed = None;
                return Poll::Ready(Err(e));
            }
            self.known.insert(peer);
        }
        ready!(poll_push(&self.shared, &mut self.sealed, cx))?;
        self.poll_staged(cx)
    }

    /// Whether a sink item to `peer` goes into a batch frame.
    fn batches(&self, peer: &str) -> bool {
        matches!(self.shared.serializer(), Serializer::Binary)
            && !peer.is_empty()
            && peer != self.shared.id()
    }

    fn start_sink_item<C: Serialize + ?Sized>(&mut self, peer: &str, content: &C) -> Result<()> {
        // The common case first: another message to the open batch's peer.
        if let Some(batch) = &mut self.batch
            && &*batch.peer == peer
            && !self.shared.has_failures()
        {
            return batch.append(content, &mut self.sealed);
        }
        if !self.batches(peer) {
            let mut steps = self.steps(peer, content)?;
            // Hand it over now if the queue has room; otherwise poll_ready
            // and poll_flush finish it.
            if steps.connect.is_none()
                && let Some(cmd) = steps.frame.take()
                && let Err(back) = self.shared.hand_over(cmd, None)?
            {
                steps.frame = Some(back);
            }
            if steps.connect.is_some() || steps.frame.is_some() {
                self.staged = Some(steps);
            }
            return Ok(());
        }
        self.take_failure(peer)?;
        // poll_ready came first, so nothing sealed waits here.
        if self.batch.as_ref().is_some_and(|b| &*b.peer != peer) {
            self.sealed = self.batch.take().and_then(|mut b| b.seal());
        }
        let batch = match &mut self.batch {
            Some(b) => b,
            None => {
                let p: Arc<str> = Arc::from(peer);
                if !self.known.contains(peer) {
                    let q = p.clone();
                    self.batch_connect =
                        Some((p.clone(), Request::new(|ack| Cmd::Connect { peer: q, ack })));
                }
                self.batch.insert(SinkBatch::new(p))
            }
        };
        batch.append(content, &mut self.sealed)
    }
}

impl<P: AsRef<str>, C: Serialize> futures_sink::Sink<(P, C)> for AsyncSender {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.get_mut().poll_sink_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, (peer, content): (P, C)) -> Result<()> {
        self.get_mut().start_sink_item(peer.as_ref(), &content)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_sink_ready(cx))?;
        if let Some(cmd) = this.batch.as_mut().and_then(SinkBatch::seal) {
            this.sealed = Some(cmd);
            ready!(this.poll_sink_ready(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        <Self as futures_sink::Sink<(P, C)>>::poll_flush(self, cx)
    }
}

// ----- receiving -------------------------------------------------------------

/// The receive ring's eventfd, as tokio registers it; the descriptor lives
/// in the shared state, which this keeps alive.
struct ReadyFd(Arc<Shared>);

impl AsRawFd for ReadyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ready_fd().as_raw_fd()
    }
}

/// The receiving side of the async face; a [`futures_core::Stream`] of
/// messages that ends once the reactor has ended and every message was
/// taken.
pub struct AsyncReceiver {
    inner: Receiver,
    fd: AsyncFd<ReadyFd>,
}

impl std::fmt::Debug for AsyncReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncReceiver")
            .field("inner", &self.inner)
            .finish()
    }
}

impl AsyncReceiver {
    /// `Ready(true)` once a message waits, `Ready(false)` once none ever
    /// will (the reactor ended and the ring is empty).
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let r = self.poll_waiting_now(cx);
        if r.is_ready() {
            coop.made_progress();
        }
        r
    }

    fn poll_waiting_now(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            if !self.inner.is_empty() {
                return Poll::Ready(true);
            }
            let mut guard = match ready!(self.fd.poll_read_ready(cx)) {
                Ok(g) => g,
                Err(e) => {
                    log::warn!("ConnectionUnix: receive ring readiness failed: {e}");
                    return Poll::Ready(false);
                }
            };
            // Read `finished` before the last look: every message pushed
            // before the reactor ended is then visible to it.
            let finished = self.inner.shared().is_finished();
            self.inner.shared().drain_ready();
            if !self.inner.is_empty() {
                return Poll::Ready(true);
            }
            if finished {
                return Poll::Ready(false);
            }
            // Clears only the readiness this guard saw: a signal written
            // since is kept, so no wake-up is lost.
            guard.clear_ready();
        }
    }

    /// The next message, in arrival order; `None` once the reactor has
    /// ended and every message was taken. Cancel safe.
    pub async fn recv(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`AsyncReceiver::recv`] as a poll function.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        // Within the task's budget, as tokio's own channels.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        let r = self.poll_next_message(cx);
        if r.is_ready() {
            coop.made_progress();
        }
        r
    }

    fn poll_next_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        loop {
            if let Some(m) = self.inner.pop() {
                return Poll::Ready(Some(m));
            }
            if !ready!(self.poll_waiting_now(cx)) {
                return Poll::Ready(self.inner.pop());
            }
        }
    }

    /// Waits for messages, then lends out every message waiting, in
    /// arrival order, borrowed from the receive buffers (the threaded
    /// [`Receiver::receive`]: no allocation, reference count or copy per
    /// message). Empty once the reactor has ended and every message was
    /// taken. Cancel safe.
    pub async fn receive(&mut self) -> Received<'_> {
        std::future::poll_fn(|cx| self.poll_waiting(cx)).await;
        self.inner.receive(Duration::ZERO)
    }

    /// Waits for messages, then moves up to `max` of them into `out`;
    /// returns how many (0 once the reactor has ended and every message
    /// was taken). Cancel safe.
    pub async fn recv_many(&mut self, out: &mut Vec<Message>, max: usize) -> usize {
        if max == 0 {
            return 0;
        }
        std::future::poll_fn(|cx| self.poll_waiting(cx)).await;
        self.inner.recv_batch(out, max)
    }

    /// A waiting message, if any; never waits.
    pub fn try_recv(&mut self) -> Option<Message> {
        self.inner.try_recv()
    }
}

impl futures_core::Stream for AsyncReceiver {
    type Item = Message;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.get_mut().poll_recv(cx)
    }
}

// ----- the reactor -----------------------------------------------------------

/// Controls the async face's reactor thread.
pub struct AsyncHandle {
    handle: ReactorHandle,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AsyncHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncHandle")
            .field("id", &self.shared.id())
            .finish()
    }
}

impl AsyncHandle {
    /// Writes out everything handed over, disconnects (the blocking
    /// API's rules: socket removed, `.stats` written) and returns the
    /// disconnect's result, with the same error texts. Messages that
    /// arrive meanwhile stay readable from the [`AsyncReceiver`].
    pub async fn shutdown(mut self) -> Result<()> {
        self.handle.request_stop();
        std::future::poll_fn(|cx| self.handle.poll_stopped(cx)).await
    }

    /// This client's counters (`.stats`), as the reactor has them now.
    pub async fn stats(&self) -> Result<Stats> {
        let mut req = Request::new(|ack| Cmd::Stats { ack });
        std::future::poll_fn(|cx| req.poll(&self.shared, cx)).await
    }

    /// Live peers of the route, sorted, without this client.
    pub fn peers(&self) -> Result<Vec<String>> {
        self.shared.route().peers(Some(self.shared.disk()))
    }

    /// Peer events of this client's route as a [`futures_core::Stream`]
    /// (the threaded [`Receiver::peer_events`]: a
    /// [`crate::route::watch::PeerWatch`] on a thread of its own, waiting
    /// on inotify and the peers' pidfds, so a storm of changes never
    /// blocks the runtime). The stream ends once the route is removed
    /// (after every peer is reported as left); dropping it stops the
    /// watching thread within 200 ms.
    pub fn peer_events(&self) -> Result<AsyncPeerEvents> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let closed = self.shared.watch_peers(move |e| tx.send(e).is_ok())?;
        Ok(AsyncPeerEvents { rx, closed })
    }

    /// Whether the reactor thread still runs.
    pub fn is_running(&self) -> bool {
        self.handle.is_running()
    }
}

/// The stream of [`AsyncHandle::peer_events`].
#[derive(Debug)]
pub struct AsyncPeerEvents {
    rx: tokio::sync::mpsc::UnboundedReceiver<crate::route::watch::PeerEvent>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl AsyncPeerEvents {
    /// The next event; `None` once the route is gone and every event was
    /// taken. Cancel safe.
    pub async fn next_event(&mut self) -> Option<crate::route::watch::PeerEvent> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for AsyncPeerEvents {
    type Item = crate::route::watch::PeerEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Drop for AsyncPeerEvents {
    fn drop(&mut self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
    }
}
