//! The sender's bounded queue: frames encoded one after another into one buffer under a
//! mutex, with two wake-ups.
//!
//! Producers encode their frame straight into the queue's buffer, without waiting
//! ([`FrameQueue::try_push`]) or waiting for room ([`FrameQueue::push`]); the single writer
//! takes everything queued at once by swapping that buffer for its own emptied one
//! ([`FrameQueue::take`]) and writes it as it is. One uncontended lock per message and one per
//! batch is cheaper than a channel's per-message handshake, and the two buffers are reused, so
//! the memory frames are written into stays in cache; both matter at millions of lines per
//! second. Capacity is counted in messages.

use std::sync::Mutex;

use bytes::BytesMut;
use tokio::sync::Notify;

use crate::message::Frame;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    Full,
    Closed,
}

struct State {
    frames: BytesMut,
    messages: usize,
    closed: bool,
}

pub struct FrameQueue {
    state: Mutex<State>,
    capacity: usize,
    /// Woken when the queue goes from empty to non-empty, or closes.
    readable: Notify,
    /// Woken when the writer took messages (room appeared), or the queue closed.
    writable: Notify,
}

impl FrameQueue {
    pub fn new(capacity: usize) -> Self {
        FrameQueue {
            state: Mutex::new(State {
                frames: BytesMut::new(),
                messages: 0,
                closed: false,
            }),
            capacity: capacity.max(1),
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        joblet_daemon::lock(&self.state)
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.lock().messages
    }

    pub fn try_push(&self, frame: &Frame<'_>) -> Result<(), PushError> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.messages >= self.capacity {
            return Err(PushError::Full);
        }
        frame.encode(&mut state.frames);
        state.messages += 1;
        let was_empty = state.messages == 1;
        drop(state);
        if was_empty {
            self.readable.notify_one();
        }
        Ok(())
    }

    /// Pushes, waiting for room. Fails only when the queue is closed.
    pub async fn push(&self, frame: &Frame<'_>) -> Result<(), PushError> {
        match self.try_push(frame) {
            Err(PushError::Full) => {}
            result => return result,
        }
        loop {
            let room = self.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(frame) {
                Err(PushError::Full) => room.await,
                result => return result,
            }
        }
    }

    /// Moves everything queued into `into` (which must be empty; its buffer becomes the
    /// queue's), waiting while the queue is empty. Returns how many messages it moved: 0 once
    /// the queue is closed and empty.
    pub async fn take(&self, into: &mut BytesMut) -> usize {
        loop {
            let ready = self.readable.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let taken = self.try_take(into);
            if taken > 0 || self.lock().closed {
                return taken;
            }
            ready.await;
        }
    }

    /// Like [`FrameQueue::take`], without waiting.
    pub fn try_take(&self, into: &mut BytesMut) -> usize {
        debug_assert!(into.is_empty(), "taking into a buffer still holding frames");
        let mut state = self.lock();
        let taken = std::mem::take(&mut state.messages);
        if taken > 0 {
            std::mem::swap(&mut state.frames, into);
        }
        drop(state);
        if taken > 0 {
            self.writable.notify_waiters();
        }
        taken
    }

    /// Refuses further pushes; what is queued can still be taken.
    pub fn close(&self) {
        self.lock().closed = true;
        self.readable.notify_one();
        self.writable.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Stream;
    use std::sync::Arc;

    fn frame(sequence: u64) -> Frame<'static> {
        Frame::log("job", sequence, 1, Stream::Stdout, b"line", false)
    }

    fn frames(sequences: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut buf = BytesMut::new();
        sequences.for_each(|s| frame(s).encode(&mut buf));
        buf.to_vec()
    }

    #[tokio::test]
    async fn bounded_fifo_with_waiting_producers() {
        let queue = Arc::new(FrameQueue::new(2));
        assert!(queue.try_push(&frame(1)).is_ok());
        assert!(queue.try_push(&frame(2)).is_ok());
        assert_eq!(queue.try_push(&frame(3)), Err(PushError::Full));
        assert_eq!(queue.len(), 2);
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push(&frame(3)).await }
        });
        let mut taken = BytesMut::new();
        assert_eq!(queue.take(&mut taken).await, 2);
        assert_eq!(taken, frames(1..=2));
        assert!(waiting.await.unwrap().is_ok());
        taken.clear();
        assert_eq!(queue.take(&mut taken).await, 1);
        assert_eq!(taken, frames(3..=3));
        queue.close();
        assert_eq!(queue.try_push(&frame(4)), Err(PushError::Closed));
        taken.clear();
        assert_eq!(queue.take(&mut taken).await, 0);
        assert!(taken.is_empty());
    }
}
