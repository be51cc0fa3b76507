//! The sender's bounded queue: a mutex-guarded ring of messages with two wake-ups.
//!
//! Producers push without waiting ([`Queue::try_push`]) or wait for room ([`Queue::push`]);
//! the single writer takes everything queued at once ([`Queue::take`]). One uncontended lock
//! per push and one per batch taken is cheaper than a channel's per-message handshake, which
//! matters at millions of lines per second. Capacity is counted in messages.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

pub enum PushError<T> {
    Full(T),
    Closed(T),
}

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
}

pub struct Queue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Woken when the queue goes from empty to non-empty, or closes.
    readable: Notify,
    /// Woken when the writer took messages (room appeared), or the queue closed.
    writable: Notify,
}

impl<T> Queue<T> {
    pub fn new(capacity: usize) -> Self {
        Queue {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.min(65_536)),
                closed: false,
            }),
            capacity: capacity.max(1),
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let mut state = self.lock();
        if state.closed {
            return Err(PushError::Closed(item));
        }
        if state.items.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        state.items.push_back(item);
        let was_empty = state.items.len() == 1;
        drop(state);
        if was_empty {
            self.readable.notify_one();
        }
        Ok(())
    }

    /// Pushes, waiting for room. Fails only when the queue is closed.
    pub async fn push(&self, item: T) -> Result<(), T> {
        let mut item = match self.try_push(item) {
            Ok(()) => return Ok(()),
            Err(PushError::Closed(back)) => return Err(back),
            Err(PushError::Full(back)) => back,
        };
        loop {
            let room = self.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(back)) => return Err(back),
                Err(PushError::Full(back)) => item = back,
            }
            room.await;
        }
    }

    /// Moves up to `max` queued messages into `into`, waiting while the queue is empty.
    /// Returns 0 once the queue is closed and empty.
    pub async fn take(&self, into: &mut Vec<T>, max: usize) -> usize {
        loop {
            let ready = self.readable.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let taken = self.try_take(into, max);
            if taken > 0 || self.lock().closed {
                return taken;
            }
            ready.await;
        }
    }

    /// Moves up to `max` queued messages into `into` without waiting.
    pub fn try_take(&self, into: &mut Vec<T>, max: usize) -> usize {
        let mut state = self.lock();
        let taken = state.items.len().min(max);
        into.extend(state.items.drain(..taken));
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
    use std::sync::Arc;

    #[tokio::test]
    async fn bounded_fifo_with_waiting_producers() {
        let queue = Arc::new(Queue::new(2));
        assert!(queue.try_push(1).is_ok());
        assert!(queue.try_push(2).is_ok());
        assert!(matches!(queue.try_push(3), Err(PushError::Full(3))));
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.push(3).await }
        });
        let mut taken = Vec::new();
        assert_eq!(queue.take(&mut taken, 10).await, 2);
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(queue.take(&mut taken, 10).await, 1);
        assert_eq!(taken, [1, 2, 3]);
        queue.close();
        assert!(matches!(queue.try_push(4), Err(PushError::Closed(4))));
        assert_eq!(queue.take(&mut taken, 10).await, 0);
    }
}
