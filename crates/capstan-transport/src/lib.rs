//! Cap'n Proto RPC over a byte stream, as both the Capstan core and its providers build it.
//!
//! One function, [`rpc_system`], makes a two-party RPC system with Capstan's message-size limit
//! and flow-control window, over a writer that coalesces messages: capnp-rpc flushes after
//! every message, which under load means one system call per message. [`CoalescingWriter`]
//! turns those flushes into a request, and a companion task flushes once per turn of the event
//! loop, so a burst of messages (64 operations finishing together, or a call followed by its
//! `Finish`) leaves in one write.
//!
//! It knows nothing about providers, processes or the schema's meaning.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use futures::{AsyncRead, AsyncWrite};

/// Settings for one connection.
#[derive(Clone, Copy, Debug)]
pub struct TransportOptions {
    /// The largest message accepted from the peer, in 8-byte words.
    pub max_message_words: usize,
    /// Bytes of `-> stream` calls this side may have in flight on one stream (a provider's
    /// progress `push`es are its streams).
    pub stream_window: usize,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            max_message_words: capstan_schema::DEFAULT_MAX_MESSAGE_WORDS,
            // capnp-rpc's own default is 64 KiB: two or three batches of progress in flight,
            // so a provider waited on each answer and streamed 1.6–1.8 million events/s
            // where the same batches on a raw socket go at 4.3 million. 256 KiB: ~2.5
            // million (512 KiB and 1 MiB measured no more); what a slow host holds back is
            // still bounded, per stream.
            stream_window: 256 * 1024,
        }
    }
}

/// Builds the RPC system for one connection. `bootstrap` is the capability this side offers
/// (a provider offers its `Provider`; the core offers none). Must be called inside a
/// `tokio::task::LocalSet`: it spawns the writer's flusher task.
pub fn rpc_system<R, W>(
    reader: R,
    writer: W,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
    options: TransportOptions,
) -> RpcSystem<Side>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let mut network = twoparty::VatNetwork::new(
        futures::io::BufReader::with_capacity(64 * 1024, reader),
        CoalescingWriter::new(writer),
        side,
        capstan_schema::reader_options(options.max_message_words),
    );
    network.set_window_size(options.stream_window);
    RpcSystem::new(Box::new(SmallFirstSegments(network)), bootstrap)
}

/// First segments of outgoing messages are at most this many words (1 KiB); a larger message
/// grows more segments. capnp-rpc asks for 1024 words (8 KiB, zeroed) for every call, whatever
/// its size: at tens of thousands of calls a second that zeroing and allocation was ~4 % of
/// the core's busiest thread.
const FIRST_SEGMENT_WORDS: u32 = 128;

/// The two-party network with its connections' first-segment sizes capped; otherwise the same.
struct SmallFirstSegments<N>(N);

impl<N: capnp_rpc::VatNetwork<Side>> capnp_rpc::VatNetwork<Side> for SmallFirstSegments<N> {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn capnp_rpc::Connection<Side>>> {
        self.0
            .connect(host_id)
            .map(|c| Box::new(SmallFirstSegment(c)) as Box<dyn capnp_rpc::Connection<Side>>)
    }

    fn accept(
        &mut self,
    ) -> capnp::capability::Promise<Box<dyn capnp_rpc::Connection<Side>>, capnp::Error> {
        use futures::TryFutureExt;
        capnp::capability::Promise::from_future(
            self.0
                .accept()
                .map_ok(|c| Box::new(SmallFirstSegment(c)) as Box<dyn capnp_rpc::Connection<Side>>),
        )
    }

    fn drive_until_shutdown(&mut self) -> capnp::capability::Promise<(), capnp::Error> {
        self.0.drive_until_shutdown()
    }
}

struct SmallFirstSegment(Box<dyn capnp_rpc::Connection<Side>>);

impl capnp_rpc::Connection<Side> for SmallFirstSegment {
    fn get_peer_vat_id(&self) -> Side {
        self.0.get_peer_vat_id()
    }

    fn new_outgoing_message(
        &mut self,
        first_segment_word_size: u32,
    ) -> Box<dyn capnp_rpc::OutgoingMessage> {
        // (capnp-rpc always passes a hint; 0 would mean "no hint", and gets the cap too.)
        let words = match first_segment_word_size {
            0 => FIRST_SEGMENT_WORDS,
            hint => hint.min(FIRST_SEGMENT_WORDS),
        };
        self.0.new_outgoing_message(words)
    }

    fn receive_incoming_message(
        &mut self,
    ) -> capnp::capability::Promise<Option<Box<dyn capnp_rpc::IncomingMessage>>, capnp::Error> {
        self.0.receive_incoming_message()
    }

    fn new_stream(
        &mut self,
    ) -> (
        Box<dyn capnp_rpc::FlowController>,
        capnp::capability::Promise<(), capnp::Error>,
    ) {
        self.0.new_stream()
    }

    fn shutdown(
        &mut self,
        result: capnp::Result<()>,
    ) -> capnp::capability::Promise<(), capnp::Error> {
        self.0.shutdown(result)
    }
}

/// Past this many buffered bytes, writers wait for the flusher.
const MAX_BUFFERED: usize = 256 * 1024;

struct Shared {
    /// Bytes written and not yet handed to the flusher.
    buffer: Vec<u8>,
    /// A flush was requested and has not happened yet.
    dirty: bool,
    /// The writer half was dropped or closed: flush what is left and stop.
    closed: bool,
    /// A write to the stream failed; every later write and flush fails the same way.
    error: Option<(io::ErrorKind, String)>,
    flusher: Option<Waker>,
    writer: Option<Waker>,
}

/// A writer whose `flush` only asks for a flush; a companion task moves the buffered bytes to
/// the stream once per turn of the event loop. Only that task ever touches the stream, so it
/// is the only one waiting on the stream's write readiness (tokio keeps one waker per
/// direction: two tasks polling one write half would lose a wake-up).
pub struct CoalescingWriter {
    shared: Rc<RefCell<Shared>>,
}

impl CoalescingWriter {
    /// Wraps `stream` and spawns its flusher on the current `LocalSet`.
    pub fn new<W: AsyncWrite + Unpin + 'static>(stream: W) -> Self {
        let shared = Rc::new(RefCell::new(Shared {
            buffer: Vec::with_capacity(8 * 1024),
            dirty: false,
            closed: false,
            error: None,
            flusher: None,
            writer: None,
        }));
        tokio::task::spawn_local(flusher(shared.clone(), stream));
        CoalescingWriter { shared }
    }
}

async fn flusher<W: AsyncWrite + Unpin>(shared: Rc<RefCell<Shared>>, mut stream: W) {
    use futures::AsyncWriteExt;
    let mut chunk = Vec::new();
    loop {
        let closed = futures::future::poll_fn(|cx| {
            let mut s = shared.borrow_mut();
            if s.dirty || s.closed {
                Poll::Ready(s.closed)
            } else {
                s.flusher = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        {
            let mut s = shared.borrow_mut();
            s.dirty = false;
            std::mem::swap(&mut chunk, &mut s.buffer);
            if let Some(waker) = s.writer.take() {
                waker.wake();
            }
        }
        let written = async {
            stream.write_all(&chunk).await?;
            stream.flush().await
        }
        .await;
        chunk.clear();
        if let Err(e) = written {
            let mut s = shared.borrow_mut();
            s.error = Some((e.kind(), e.to_string()));
            if let Some(waker) = s.writer.take() {
                waker.wake();
            }
            return;
        }
        if closed && shared.borrow().buffer.is_empty() {
            let _ = stream.close().await;
            return;
        }
    }
}

fn take_error(s: &mut Shared) -> io::Result<()> {
    match &s.error {
        Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
        None => Ok(()),
    }
}

impl AsyncWrite for CoalescingWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.shared.borrow_mut();
        take_error(&mut s)?;
        if s.buffer.len() >= MAX_BUFFERED {
            s.writer = Some(cx.waker().clone());
            // Make sure the flusher is draining what is there.
            s.dirty = true;
            if let Some(waker) = s.flusher.take() {
                waker.wake();
            }
            return Poll::Pending;
        }
        s.buffer.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.shared.borrow_mut();
        take_error(&mut s)?;
        s.dirty = true;
        if let Some(waker) = s.flusher.take() {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.shared.borrow_mut();
        take_error(&mut s)?;
        s.closed = true;
        if let Some(waker) = s.flusher.take() {
            waker.wake();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for CoalescingWriter {
    fn drop(&mut self) {
        let mut s = self.shared.borrow_mut();
        s.closed = true;
        if let Some(waker) = s.flusher.take() {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncWriteExt;

    /// Counts the writes that reach the "socket".
    #[derive(Default, Clone)]
    struct CountingSink(Rc<RefCell<(usize, Vec<u8>)>>);

    impl AsyncWrite for CountingSink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut inner = self.0.borrow_mut();
            inner.0 += 1;
            inner.1.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn local<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    #[test]
    fn flushes_in_one_turn_become_one_write_and_nothing_is_lost() {
        local(async {
            let sink = CountingSink::default();
            let mut writer = CoalescingWriter::new(sink.clone());
            for n in 0..10u8 {
                writer.write_all(&[n; 8]).await.unwrap();
                writer.flush().await.unwrap();
            }
            // Let the flusher run.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            let (writes, bytes) = sink.0.borrow().clone();
            assert_eq!(writes, 1, "ten flushes in one turn leave in one write");
            assert_eq!(bytes.len(), 80);
            assert_eq!(&bytes[72..], &[9u8; 8]);
        });
    }

    #[test]
    fn dropping_the_writer_flushes_what_is_left() {
        local(async {
            let sink = CountingSink::default();
            let mut writer = CoalescingWriter::new(sink.clone());
            writer.write_all(b"last words").await.unwrap();
            drop(writer);
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            assert_eq!(sink.0.borrow().1, b"last words");
        });
    }
}
